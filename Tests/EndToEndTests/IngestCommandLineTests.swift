import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Testing

/// `farmgate-ingest` as an operator runs it: what `serve` refuses. The real binary.
@Suite struct IngestCommandLineTests {
    /// Two `serve` processes on one SQLite file would each keep their own latest values, stale with the other's
    /// writes: the second is refused at once, the admin commands still work beside the first, and once the first has
    /// stopped a new one starts.
    @Test func aSecondServeOnOneSQLiteFileIsRefused() async throws {
        let farm = try await Farm(name: "lock")
        try await farm.startIngest()
        let otherPort = try freePort()
        let text = try String(contentsOfFile: farm.ingestConfig, encoding: .utf8).replacingOccurrences(of: "port = \(farm.port)", with: "port = \(otherPort)")
        let config = try farm.dir.write("ingest-b.toml", text)
        let second = try Child(Farm.ingestBinary, ["serve", "--config", config], logPath: farm.dir.file("ingest-b.log"))
        let exited = await eventually(timeout: .seconds(20), every: .milliseconds(100)) { !second.isRunning }
        #expect(exited, "a second serve on the same SQLite file kept running: \(second.log)")
        if exited {
            #expect(second.process.terminationStatus == 75, "\(second.log)")
            #expect(second.log.contains("another farmgate-ingest serve is running on the SQLite file") && second.log.contains("one serve per file"), "\(second.log)")
        }
        // The admin commands work while serve runs.
        _ = try await farm.createDevice("site-lock", farm: "lock")
        #expect(await farm.httpStatus("/readyz") == 200)
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
        // The lock goes with its process.
        try await farm.startIngest()
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
