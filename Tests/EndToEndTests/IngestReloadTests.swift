import FarmgateTestSupport
import Foundation
import Testing

/// SIGHUP to the real `farmgate-ingest serve` (what `systemctl reload farmgate-ingest` sends): the TLS certificate is
/// read again, a broken one is refused with the running one kept, and the process never dies of the signal.
@Suite("End to end: ingest SIGHUP", .serialized)
struct IngestReloadTests {
    /// Whether `/healthz` answers 200 over a new TLS connection that trusts only `certificates`' CA.
    func trusted(_ certificates: TestCertificates, port: Int) async throws -> Bool {
        let result = try await runCommand(
            "/usr/bin/curl",
            ["-sS", "--noproxy", "*", "--max-time", "5", "--cacert", certificates.caFile, "-o", "/dev/null", "-w", "%{http_code}", "https://localhost:\(port)/healthz"])
        return result.status == 0 && result.stdout == "200"
    }

    @Test("SIGHUP reloads the TLS certificate; a broken file is refused in the log and the running certificate stays")
    func certificateOnHangup() async throws {
        let farm = try await Farm()
        for name in ["first", "second"] { try FileManager.default.createDirectory(atPath: farm.dir.file(name), withIntermediateDirectories: true) }
        let first = try await TestCertificates.make(in: farm.dir.file("first"))
        let second = try await TestCertificates.make(in: farm.dir.file("second"))
        let certificate = farm.dir.file("ingest.crt"), key = farm.dir.file("ingest.key")
        try first.install(certificate: certificate, key: key)
        let config = try String(contentsOfFile: farm.ingestConfig, encoding: .utf8).replacingOccurrences(
            of: "port = \(farm.port)\n", with: "port = \(farm.port)\ntls_certificate = \"\(certificate)\"\ntls_key = \"\(key)\"\n")
        try config.write(toFile: farm.ingestConfig, atomically: true, encoding: .utf8)
        let ingest = try Child(Farm.ingestBinary, ["serve", "--config", farm.ingestConfig], logPath: farm.dir.file("ingest.log"))
        let port = farm.port
        let ready = try await eventually(timeout: .seconds(20), every: .milliseconds(200)) { try await trusted(first, port: port) }
        try #require(ready, "the ingest did not serve the first certificate: \(ingest.log)")
        #expect(try await !trusted(second, port: port))

        try second.install(certificate: certificate, key: key)
        ingest.signal(SIGHUP)
        let reloaded = try await eventually(timeout: .seconds(10), every: .milliseconds(100)) { try await trusted(second, port: port) }
        #expect(reloaded, "a new connection did not get the certificate after SIGHUP: \(ingest.log)")
        #expect(try await !trusted(first, port: port))
        #expect(ingest.log.contains("TLS certificate reloaded"), "\(ingest.log)")

        // A key that belongs to another certificate: refused, said in the log, and the running certificate stays.
        try FileManager.default.removeItem(atPath: key)
        try FileManager.default.copyItem(atPath: first.keyFile, toPath: key)
        ingest.signal(SIGHUP)
        let refused = await eventually(timeout: .seconds(10), every: .milliseconds(100)) { ingest.log.contains("TLS certificate not reloaded") }
        #expect(refused, "\(ingest.log)")
        #expect(ingest.log.contains("tls_key"), "the refusal does not name the key: \(ingest.log)")
        #expect(ingest.isRunning)
        #expect(try await trusted(second, port: port))

        #expect(await ingest.stop() == 0, "\(ingest.log)")
    }

    @Test("without TLS a SIGHUP is logged as nothing to reload, and the ingest goes on serving")
    func hangupWithoutTLS() async throws {
        let farm = try await Farm()
        try await farm.startIngest()
        let ingest = try #require(farm.ingest)
        ingest.signal(SIGHUP)
        let logged = await eventually(timeout: .seconds(10), every: .milliseconds(100)) { ingest.log.contains("SIGHUP: nothing to reload") }
        #expect(logged, "\(ingest.log)")
        #expect(ingest.isRunning)
        #expect(await farm.httpStatus("/healthz") == 200)
        #expect(await ingest.stop() == 0, "\(ingest.log)")
    }
}
