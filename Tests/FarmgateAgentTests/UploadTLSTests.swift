import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Logging
import Testing

/// TLS for real: certificates made by the `openssl` tool, TLS terminated by `socat` in front of the loopback test
/// server, libcurl verifying the chain. Both tools come from Debian (`.ci/install-deps` installs them).
@Suite("Upload over TLS (openssl certificates, socat in front of a loopback server)")
struct UploadTLSTests {
    let logger = Logger(label: "test.tls")

    @Test func theConfiguredCAFileIsTrustedAndNothingElseIs() async throws {
        let pki = try await TestPKI()
        defer { pki.remove() }
        let server = try TestHTTPServer { request, _ in .reply(200, body: Array("got \(request.body.count) bytes".utf8)) }
        let tls = try await TLSTerminator(port: try freePort(), backendPort: server.port, pki: pki)
        defer { tls.stop() }
        let url = "https://127.0.0.1:\(tls.port)/v1/batches"

        // Trusting the CA that signed the server's certificate: the request goes through, encrypted.
        let trusting = try HTTPClient(configuration: .init(caFile: pki.caFile, useProxyEnvironment: false), logger: logger)
        let response = try await trusting.post(url, headers: [HTTPHeader("Content-Type", "application/octet-stream")], body: [1, 2, 3])
        #expect(response.status == 200)
        #expect(String(decoding: response.body, as: UTF8.self) == "got 3 bytes")
        #expect(server.requests.count == 1)

        // The system CAs (no ca_file) do not know this CA: refused before any byte of the request is sent.
        let system = try HTTPClient(configuration: .init(useProxyEnvironment: false), logger: logger)
        let systemError = await #expect(throws: HTTPClientError.self) { try await system.post(url, headers: [], body: [1]) }
        #expect(systemError?.kind == .tls)

        // Another CA's file: refused too, and the message says it is about the certificate.
        let other = try HTTPClient(configuration: .init(caFile: pki.otherCAFile, useProxyEnvironment: false), logger: logger)
        let otherError = await #expect(throws: HTTPClientError.self) { try await other.post(url, headers: [], body: [1]) }
        #expect(otherError?.kind == .tls)
        #expect(otherError?.detail.lowercased().contains("certificate") == true, "\(otherError?.detail ?? "")")
        #expect(server.requests.count == 1, "refused handshakes reach no server")
    }
}

/// A throwaway certificate authority, a server certificate it signed for 127.0.0.1, and an unrelated second CA.
struct TestPKI {
    let directory: String
    var caFile: String { directory + "/ca.pem" }
    var otherCAFile: String { directory + "/other-ca.pem" }
    var certificate: String { directory + "/server.pem" }
    var key: String { directory + "/server.key" }

    init() async throws {
        let directory = NSTemporaryDirectory() + "farmgate-tls-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        self.directory = directory
        try "subjectAltName=IP:127.0.0.1\n".write(toFile: directory + "/san.cnf", atomically: true, encoding: .utf8)
        let curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for ca in ["ca", "other-ca"] {
            try await Self.openssl(["req", "-x509"] + curve + ["-keyout", "\(ca).key", "-out", "\(ca).pem", "-days", "2", "-subj", "/CN=Farmgate test \(ca)"], in: directory)
        }
        try await Self.openssl(["req"] + curve + ["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"], in: directory)
        try await Self.openssl(
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2",
             "-extfile", "san.cnf"], in: directory)
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }

    private static func openssl(_ arguments: [String], in directory: String) async throws {
        let status = try await runOffPool(name: "test-openssl") { () throws -> Int32 in
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
            process.arguments = arguments
            process.currentDirectoryURL = URL(fileURLWithPath: directory)
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            process.waitUntilExit()
            return process.terminationStatus
        }
        guard status == 0 else { throw TestPKIError("openssl \(arguments.prefix(2).joined(separator: " ")) exited \(status)") }
    }
}

struct TestPKIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// `socat` accepting TLS on `port` with the test PKI's server certificate and forwarding plain TCP to `backendPort`.
final class TLSTerminator: Sendable {
    let port: Int
    private let process: Process

    init(port: Int, backendPort: Int, pki: TestPKI) async throws {
        self.port = port
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/socat")
        process.arguments = [
            "OPENSSL-LISTEN:\(port),bind=127.0.0.1,reuseaddr,fork,verify=0,cert=\(pki.certificate),key=\(pki.key)",
            "TCP:127.0.0.1:\(backendPort)",
        ]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        self.process = process
        // Ready once it accepts a TCP connection.
        let deadline = ContinuousClock.now + .seconds(10)
        while !Self.accepts(port) {
            guard process.isRunning, ContinuousClock.now < deadline else {
                stop()
                throw TestPKIError("socat did not listen on 127.0.0.1:\(port)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
    }

    deinit { stop() }

    private static func accepts(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }
}
