import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Testing

/// `farmgate-ingest` as an operator runs it: what `serve` refuses and what `migrate` says. The real binary; PostgreSQL
/// from `.ci/with-postgres`.
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

    /// `migrate` says what it did beyond migrations: the partitions it made ahead, and the rows it moved into them.
    @Test func migrateSaysWhichPartitionsItCreated() async throws {
        let cluster = try PostgresEndToEndTests.Cluster.fromEnvironment()
        let url = try await cluster.createDatabase()
        let scratch = try Scratch(prefix: "fg-migrate")
        let config = try scratch.write("ingest.toml", "[storage]\nurl = \"\(url)\"\n")
        let first = try await runCommand(Farm.ingestBinary, ["migrate", "--config", config])
        #expect(first.status == 0, "\(first.stderr)")
        #expect(first.stdout.contains("Applied migration 1:"), "\(first.stdout)")
        #expect(first.stdout.contains("Created 9 daily partitions of readings (readings_"), "\(first.stdout)")
        #expect(first.stdout.contains("moved 0 rows into them from readings_default."), "\(first.stdout)")
        #expect(first.stdout.contains("Created 4 monthly partitions of rollups_1m (rollups_1m_"), "\(first.stdout)")
        let again = try await runCommand(Farm.ingestBinary, ["migrate", "--config", config])
        #expect(again.status == 0 && again.stdout.contains("is up to date") && !again.stdout.contains("Created"), "\(again.stdout)")
    }
}
