import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import NIOSSL
import Prometheus
import ServiceLifecycle
import Testing

@testable import FarmgateIngest

/// The ingest's own TLS (`[server] tls_certificate`, `tls_key`, `http2`) against the agent's libcurl client: certificates
/// made by the `openssl` tool, the real application on loopback, HTTP/2 chosen by ALPN.
@Suite("Ingest TLS and HTTP/2 (openssl certificates, libcurl client)")
struct IngestTLSTests {
    /// Runs the ingest with `server` (its port replaced by a free one) and TLS from `certificates`, and calls `body` with
    /// its `https` base URL.
    func withIngest<T: Sendable>(
        _ fixture: Fixture, certificates: TestCertificates, server: IngestConfiguration.Server = .init(),
        limits: IngestConfiguration.Limits = .init(), served: ServerCertificates? = nil, registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
        _ body: (String) async throws -> T
    ) async throws -> T {
        var configuration = IngestConfiguration()
        configuration.server = server
        configuration.server.port = try freePort()
        configuration.server.tls = try served?.tls ?? ServerTLS.load(certificateFile: certificates.certificateFile, keyFile: certificates.keyFile)
        configuration.limits = limits
        let (running, runningContinuation) = AsyncStream<Void>.makeStream()
        let app = buildApplication(
            configuration: configuration, store: fixture.store, registry: registry, logger: testLogger, now: { testNow },
            certificates: served, onServerRunning: { runningContinuation.yield() })
        let serviceGroup = ServiceGroup(configuration: .init(services: [app], logger: testLogger))
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await serviceGroup.run() }
            for await _ in running { break }
            do {
                let value = try await body("https://localhost:\(configuration.server.port)")
                await serviceGroup.triggerGracefulShutdown()
                return value
            } catch {
                await serviceGroup.triggerGracefulShutdown()
                throw error
            }
        }
    }

    /// A fresh store and certificates in a scratch directory, then ``withIngest(_:certificates:server:limits:served:_:)``;
    /// `body` gets the base URL, the store, the certificates and the scratch directory.
    func withTLSIngest(
        server: IngestConfiguration.Server = .init(), limits: IngestConfiguration.Limits = .init(),
        _ body: (_ base: String, _ fixture: Fixture, _ certificates: TestCertificates, _ scratch: Scratch) async throws -> Void
    ) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let scratch = try Scratch(prefix: "fg-tls")
        defer { try? FileManager.default.removeItem(at: scratch.url) }
        let certificates = try await TestCertificates.make(in: scratch.path)
        try await withIngest(fixture, certificates: certificates, server: server, limits: limits) { base in
            try await body(base, fixture, certificates, scratch)
        }
    }

    func client(_ certificates: TestCertificates, http2: Bool = true) throws -> FarmgateAgent.HTTPClient {
        try FarmgateAgent.HTTPClient(configuration: .init(caFile: certificates.caFile, useProxyEnvironment: false, http2: http2), logger: testLogger)
    }

    func post(_ client: FarmgateAgent.HTTPClient, _ base: String, key: APIKey, sequences: ClosedRange<UInt64>) async throws -> FarmgateAgent.HTTPResponse {
        try await client.post(
            base + IngestProtocol.batchesPath,
            headers: [HTTPHeader("Authorization", "Bearer \(key.text)"), HTTPHeader("Content-Type", IngestProtocol.jsonBatchMediaType)],
            body: BatchJSON.encode(try phBatch(sequences: sequences)))
    }

    func receipt(_ response: FarmgateAgent.HTTPResponse) throws -> IngestReceipt {
        try JSONDecoder().decode(IngestReceipt.self, from: Data(response.body))
    }

    @Test("batches go over HTTP/2 on one connection, without Date or Server headers; HTTP/1.1 over TLS still works")
    func http2AndHTTP1() async throws {
        try await withTLSIngest { base, fixture, certificates, scratch in
            let http2 = try client(certificates)
            defer { http2.close() }
            var connections = 0
            for round in 0..<5 {
                let first = UInt64(round * 10 + 1)
                let response = try await post(http2, base, key: fixture.deviceKey, sequences: first...(first + 9))
                #expect(response.status == 200)
                #expect(response.httpVersion == .http2)
                #expect(try receipt(response).accepted == 10)
                #expect(response.header("date") == nil, "\(response.headers)")
                #expect(response.header("server") == nil, "\(response.headers)")
                connections += response.newConnections
            }
            #expect(connections == 1, "5 requests opened \(connections) connections")
            // A GET on the same handle reuses the connection too.
            let health = try await http2.get(base + "/healthz", headers: [])
            #expect(health.status == 200)
            #expect(health.httpVersion == .http2)
            #expect(health.newConnections == 0)

            // A client that asks for HTTP/1.1 only is served HTTP/1.1 over TLS, keep-alive included.
            let http1 = try client(certificates, http2: false)
            defer { http1.close() }
            let repeated = try await post(http1, base, key: fixture.deviceKey, sequences: 1...10)
            #expect(repeated.status == 200)
            #expect(repeated.httpVersion == .http1_1)
            #expect(try receipt(repeated).duplicates == 10)
            #expect(repeated.header("date") == nil)
            let next = try await post(http1, base, key: fixture.deviceKey, sequences: 51...60)
            #expect(next.httpVersion == .http1_1)
            #expect(next.newConnections == 0)
            #expect(try receipt(next).accepted == 10)

            // The curl tool with --http1.1 (ALPN offers http/1.1 only) agrees.
            let tool = try await runCurl(["--http1.1", "--cacert", certificates.caFile, "-o", "/dev/null", "-w", "%{http_version} %{http_code}", base + "/healthz"])
            #expect(tool == "1.1 200")
            let toolHTTP2 = try await runCurl(["--cacert", certificates.caFile, "-o", "/dev/null", "-w", "%{http_version} %{http_code}", base + "/healthz"])
            #expect(toolHTTP2 == "2 200")
        }
    }

    @Test("with http2 = false only HTTP/1.1 is offered")
    func http2Off() async throws {
        try await withTLSIngest(server: .init(http2: false)) { base, fixture, certificates, scratch in
            let client = try client(certificates)
            defer { client.close() }
            let response = try await post(client, base, key: fixture.deviceKey, sequences: 1...10)
            #expect(response.status == 200)
            #expect(response.httpVersion == .http1_1)
        }
    }

    @Test("max_body_bytes holds over HTTP/2: a larger body is answered 413")
    func bodyLimitOverHTTP2() async throws {
        try await withTLSIngest(limits: .init(maxBodyBytes: 2048, maxDecompressedBytes: 2048)) { base, fixture, certificates, scratch in
            let client = try client(certificates)
            defer { client.close() }
            let large = try await post(client, base, key: fixture.deviceKey, sequences: 1...200)
            #expect(large.status == 413)
            #expect(large.httpVersion == .http2)
            #expect(String(decoding: large.body, as: UTF8.self).contains(IngestErrorCode.payloadTooLarge))
            // The connection survives the refused stream.
            let small = try await post(client, base, key: fixture.deviceKey, sequences: 1...5)
            #expect(small.status == 200)
        }
    }

    @Test("past max_connections a TLS connection is answered 503 over HTTP/1.1, whatever the client asked for")
    func connectionCap() async throws {
        try await withTLSIngest(server: .init(maxConnections: 2)) { base, fixture, certificates, scratch in
            // Two clients, each holding one keep-alive connection.
            var held: [FarmgateAgent.HTTPClient] = []
            defer { held.forEach { $0.close() } }
            for _ in 0..<2 {
                let client = try client(certificates)
                held.append(client)
                #expect(try await client.get(base + "/healthz", headers: []).status == 200)
            }
            let third = try client(certificates)
            defer { third.close() }
            let refused = try await third.get(base + "/healthz", headers: [])
            #expect(refused.status == 503)
            #expect(refused.httpVersion == .http1_1)
            #expect(refused.header("retry-after") == "5")
            #expect(String(decoding: refused.body, as: UTF8.self).contains("max_connections"))
            // Once a held connection closes, a new one is served again (over HTTP/2).
            held.removeLast().close()
            let served = await eventually(timeout: .seconds(10), every: .milliseconds(100)) {
                let client = try? self.client(certificates)
                defer { client?.close() }
                guard let response = try? await client?.get(base + "/healthz", headers: []) else { return false }
                return response.status == 200 && response.httpVersion == .http2
            }
            #expect(served)
        }
    }

    @Test("timeouts: a TCP connection that never starts its handshake is closed after header_timeout; an idle HTTP/2 connection after idle_timeout")
    func timeouts() async throws {
        try await withTLSIngest(server: .init(idleTimeout: .seconds(1), headerTimeout: .seconds(1))) { base, fixture, certificates, scratch in
            let port = try #require(Int(base.split(separator: ":").last ?? ""))
            let closed = try await runOffPool(name: "raw-tls") {
                let connection = try RawConnection(port: port)
                return connection.readUntilClosed(timeout: .seconds(10)).closed
            }
            #expect(closed, "a silent connection was still open after 10 s with header_timeout = 1 s")

            let client = try client(certificates)
            defer { client.close() }
            let first = try await client.get(base + "/healthz", headers: [])
            #expect(first.httpVersion == .http2)
            #expect(first.newConnections == 1)
            try await Task.sleep(for: .seconds(3))
            let afterIdle = try await client.get(base + "/healthz", headers: [])
            #expect(afterIdle.status == 200)
            #expect(afterIdle.newConnections == 1, "the idle HTTP/2 connection was still open after 3 s with idle_timeout = 1 s")
        }
    }

    @Test("over HTTP/2 a stream whose body stops arriving is answered 408 after body_timeout; HTTP/2 uploads go on")
    func streamBodyTimeout() async throws {
        try await withTLSIngest(server: .init(bodyTimeout: .seconds(1))) { base, fixture, certificates, scratch in
            let key = fixture.deviceKey.text
            // The curl tool, uploading from a pipe that gets the body's first bytes and then nothing: a stream that stalls
            // mid-body (`-T .`: stdin read without blocking, so that curl reads the answer while its upload waits). Its
            // output goes to a file; it is waited for here, and killed with SIGKILL if it hangs (this process may ignore
            // SIGTERM for its own services, and a child inherits that).
            let outputFile = scratch.path + "/curl.out"
            _ = FileManager.default.createFile(atPath: outputFile, contents: nil)
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
            process.arguments = [
                "-sS", "-v", "--noproxy", "*", "--http2", "--cacert", certificates.caFile, "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                "-X", "POST", "-H", "Authorization: Bearer \(key)", "-H", "Content-Type: \(IngestProtocol.jsonBatchMediaType)",
                "-H", "Content-Length: 100000", "-T", ".", base + IngestProtocol.batchesPath,
            ]
            let input = Pipe()
            process.standardInput = input
            process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outputFile))
            _ = FileManager.default.createFile(atPath: outputFile + ".err", contents: nil)
            process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: outputFile + ".err"))
            let started = ContinuousClock.now
            try process.run()
            input.fileHandleForWriting.write(Data(#"{"device":"d1","sensors":["#.utf8))
            while process.isRunning, started.duration(to: .now) < .seconds(15) { try await Task.sleep(for: .milliseconds(20)) }
            let finished = !process.isRunning
            let elapsed = started.duration(to: .now)
            if !finished { kill(process.processIdentifier, SIGKILL) }
            try? input.fileHandleForWriting.close()
            let printed = ((try? String(contentsOfFile: outputFile, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(finished, "the stalled stream was still open after 15 s with body_timeout = 1 s: \((try? String(contentsOfFile: outputFile + ".err", encoding: .utf8)) ?? "")")
            #expect(printed == "2 408", "curl printed '\(printed)'")
            #expect(elapsed >= .milliseconds(900), "answered after \(elapsed), before body_timeout")
            // The ingest goes on serving HTTP/2 streams.
            let client = try client(certificates)
            defer { client.close() }
            let after = try await post(client, base, key: fixture.deviceKey, sequences: 1...5)
            #expect(after.status == 200 && after.httpVersion == .http2)
        }
    }

    @Test("a reloaded certificate is served from the next connection on; a broken file keeps the running one")
    func certificateReload() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let scratch = try Scratch(prefix: "fg-tls")
        defer { try? FileManager.default.removeItem(at: scratch.url) }
        for name in ["first", "second"] { try FileManager.default.createDirectory(atPath: scratch.file(name), withIntermediateDirectories: true) }
        let first = try await TestCertificates.make(in: scratch.file("first"))
        // Valid a day longer than the first: the expiry metric tells them apart.
        let second = try await TestCertificates.make(in: scratch.file("second"), days: 3)
        // The files the configuration names; each set of certificates has its own CA.
        let certificateFile = scratch.path + "/served.crt", keyFile = scratch.path + "/served.key"
        try first.install(certificate: certificateFile, key: keyFile)
        let served = try ServerCertificates(tls: try ServerTLS.load(certificateFile: certificateFile, keyFile: keyFile), http2: true)
        let registry = PrometheusCollectorRegistry()
        /// `farmgate_ingest_tls_certificate_expiry_timestamp_seconds` as `/metrics` shows it.
        func expiry() -> Double? {
            String(decoding: registry.emitToBuffer(), as: UTF8.self).split(separator: "\n")
                .first { $0.hasPrefix("farmgate_ingest_tls_certificate_expiry_timestamp_seconds ") }
                .flatMap { $0.split(separator: " ").last.flatMap { Double($0) } }
        }
        /// When the earliest certificate of a PEM chain expires, in Unix seconds.
        func notAfter(_ file: String) throws -> Double? {
            try NIOSSLCertificate.fromPEMFile(file).map { Double($0.notValidAfter) }.min()
        }
        try await withIngest(fixture, certificates: first, served: served, registry: registry) { base in
            /// Whether a new connection verifies against `certificates`' CA.
            func trusted(_ certificates: TestCertificates) async throws -> Bool {
                let result = try await runProgram(
                    "/usr/bin/curl", ["-sS", "--noproxy", "*", "--cacert", certificates.caFile, "-o", "/dev/null", "-w", "%{http_code}", base + "/healthz"],
                    capturing: .standardOutput)
                return result.status == 0 && result.output == "200"
            }
            #expect(try await trusted(first))
            #expect(try await !trusted(second))
            #expect(try expiry() != nil && expiry() == notAfter(first.certificateFile), "\(String(describing: expiry()))")
            // A client that keeps its connection keeps the certificate it began with.
            let client = try client(first)
            defer { client.close() }
            #expect(try await client.get(base + "/healthz", headers: []).status == 200)

            try second.install(certificate: certificateFile, key: keyFile)
            let reloaded = try served.reload()
            #expect(reloaded.certificateChain == (try NIOSSLCertificate.fromPEMFile(second.certificateFile)))
            #expect(try await trusted(second), "a new connection did not get the reloaded certificate")
            #expect(try expiry() == notAfter(second.certificateFile) && expiry() != notAfter(first.certificateFile))
            #expect(try await !trusted(first))
            let kept = try await client.get(base + "/healthz", headers: [])
            #expect(kept.status == 200 && kept.newConnections == 0, "the open connection was not kept")

            // A certificate file that is not PEM: the reload fails naming it, and the running certificate stays.
            try "not a certificate\n".write(toFile: certificateFile, atomically: true, encoding: .utf8)
            do throws(ServerTLS.LoadError) {
                try served.reload()
                Issue.record("a certificate file that is not PEM was reloaded")
            } catch {
                #expect(error.key == "tls_certificate" && error.message.contains(certificateFile), "\(error)")
            }
            #expect(try await trusted(second))
            #expect(try expiry() == notAfter(second.certificateFile))
        }
    }

    /// Runs the `curl` tool and returns what it printed.
    func runCurl(_ arguments: [String]) async throws -> String {
        try await runProgram("/usr/bin/curl", ["-sS", "--noproxy", "*"] + arguments, capturing: .standardOutput).output
    }
}

@Suite("[server] TLS configuration")
struct IngestTLSConfigurationTests {
    func parse(_ text: String, in directory: String) throws(ConfigurationError) -> IngestConfiguration {
        try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: directory)
    }

    func error(_ text: String, in directory: String) -> ConfigurationError? {
        do {
            _ = try parse(text, in: directory)
            return nil
        } catch {
            return error
        }
    }

    @Test("both files load, relative to the configuration; http2 defaults to true")
    func loads() async throws {
        let scratch = try Scratch(prefix: "fg-tlsconf")
        defer { try? FileManager.default.removeItem(at: scratch.url) }
        _ = try await TestCertificates.make(in: scratch.path)
        let configuration = try parse("[server]\ntls_certificate = \"server.pem\"\ntls_key = \"server.key\"\n", in: scratch.path)
        let tls = try #require(configuration.server.tls)
        #expect(tls.certificateFile == scratch.file("server.pem"))
        #expect(tls.certificateChain.count == 1)
        #expect(configuration.server.http2)
        let off = try parse("[server]\ntls_certificate = \"server.pem\"\ntls_key = \"server.key\"\nhttp2 = false\n", in: scratch.path)
        #expect(!off.server.http2)
        #expect(try parse("", in: scratch.path).server.tls == nil)
    }

    @Test("one key without the other is a located error naming the missing key")
    func bothOrNeither() async throws {
        let scratch = try Scratch(prefix: "fg-tlsconf")
        defer { try? FileManager.default.removeItem(at: scratch.url) }
        _ = try await TestCertificates.make(in: scratch.path)
        let onlyCertificate = try #require(error("[server]\nport = 8443\ntls_certificate = \"server.pem\"\n", in: scratch.path))
        #expect(onlyCertificate.key == "server.tls_certificate")
        #expect(onlyCertificate.line == 3)
        #expect(onlyCertificate.message.contains("needs tls_key"))
        let onlyKey = try #require(error("[server]\ntls_key = \"server.key\"\n", in: scratch.path))
        #expect(onlyKey.key == "server.tls_key")
        #expect(onlyKey.message.contains("needs tls_certificate"))
    }

    @Test("a missing, non-PEM or mismatched file is an error naming the file and what is wrong")
    func badFiles() async throws {
        let scratch = try Scratch(prefix: "fg-tlsconf")
        defer { try? FileManager.default.removeItem(at: scratch.url) }
        _ = try await TestCertificates.make(in: scratch.path)
        _ = try scratch.write("garbage.pem", "not a certificate\n")

        let missing = try #require(error("[server]\ntls_certificate = \"nope.pem\"\ntls_key = \"server.key\"\n", in: scratch.path))
        #expect(missing.key == "server.tls_certificate")
        #expect(missing.message.contains(scratch.file("nope.pem")) && missing.message.contains("does not exist"), "\(missing)")

        let missingKey = try #require(error("[server]\ntls_certificate = \"server.pem\"\ntls_key = \"nope.key\"\n", in: scratch.path))
        #expect(missingKey.key == "server.tls_key")

        let directory = try #require(error("[server]\ntls_certificate = \".\"\ntls_key = \"server.key\"\n", in: scratch.path))
        #expect(directory.message.contains("is a directory"), "\(directory)")

        let notPEM = try #require(error("[server]\ntls_certificate = \"garbage.pem\"\ntls_key = \"server.key\"\n", in: scratch.path))
        #expect(notPEM.key == "server.tls_certificate")
        #expect(notPEM.message.contains(scratch.file("garbage.pem")) && notPEM.message.contains("no certificate"), "\(notPEM)")

        let certificateAsKey = try #require(error("[server]\ntls_certificate = \"server.pem\"\ntls_key = \"server.pem\"\n", in: scratch.path))
        #expect(certificateAsKey.key == "server.tls_key")
        #expect(certificateAsKey.message.contains("not an unencrypted PEM private key"), "\(certificateAsKey)")

        let otherKey = try #require(error("[server]\ntls_certificate = \"server.pem\"\ntls_key = \"ca.key\"\n", in: scratch.path))
        #expect(otherKey.key == "server.tls_key")
        #expect(otherKey.message.contains("does not belong"), "\(otherKey)")

        let emptyPath = try #require(error("[server]\ntls_certificate = \"\"\ntls_key = \"server.key\"\n", in: scratch.path))
        #expect(emptyPath.key == "server.tls_certificate")
    }
}
