import ArgumentParser
import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOSSL
import Synchronization

/// A self-signed ECDSA P-256 certificate for `localhost` and 127.0.0.1, made with the `openssl` command; the agent trusts it
/// as its CA (`[upload] ca_file`).
struct BenchCertificate {
    var certificate: String
    var key: String

    static func make(in directory: String) throws -> BenchCertificate {
        let made = BenchCertificate(certificate: directory + "/cert.pem", key: directory + "/key.pem")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", made.key, "-out", made.certificate,
        ]
        let log = directory + "/openssl.log"
        guard FileManager.default.createFile(atPath: log, contents: nil) else { throw ValidationError("cannot create \(log)") }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        defer { try? handle.close() }
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            throw ValidationError("openssl could not make a test certificate (is the openssl command installed?): \(output)")
        }
        return made
    }
}

/// The baseline's receiver: an HTTP/1.1 server over TLS on 127.0.0.1 that takes InfluxDB v2 writes
/// (`POST /api/v2/write`, line protocol, `Content-Encoding: gzip`) and answers as InfluxDB does, `204 No Content` with its
/// two version headers. It checks that each body unzips to the number of lines sent, so that the baseline cannot measure
/// an empty or broken body.
final class LineProtocolSink: Sendable {
    /// Requests answered and lines received.
    let requests = Atomic<Int>(0)
    let lines = Atomic<Int>(0)

    /// Runs the sink (TLS with `certificate`, or plain with nil) while `body` runs with its port.
    static func withRunning<T: Sendable>(
        certificate: BenchCertificate?, logger: Logger, _ body: @escaping @Sendable (Int, LineProtocolSink) async throws -> T
    ) async throws -> T {
        let sink = LineProtocolSink()
        let router = Router()
        router.post("/api/v2/write") { [sink] request, _ -> Response in
            let buffer = try await request.body.collect(upTo: 16 << 20)
            let zipped = Array(buffer.readableBytesView)
            let text = request.headers[.contentEncoding] == "gzip" ? try Gzip.decompress(zipped, maxOutput: 64 << 20) : zipped
            sink.lines.add(text.reduce(0) { $0 + ($1 == 0x0A ? 1 : 0) }, ordering: .relaxed)
            sink.requests.add(1, ordering: .relaxed)
            var headers = HTTPFields()
            headers[HTTPField.Name("X-Influxdb-Build")!] = "OSS"
            headers[HTTPField.Name("X-Influxdb-Version")!] = "v2.7.11"
            return Response(status: .noContent, headers: headers)
        }
        let port = Atomic<Int>(0)
        var serverLogger = logger
        serverLogger.logLevel = .critical
        let server: HTTPServerBuilder
        if let certificate {
            var tls = TLSConfiguration.makeServerConfiguration(
                certificateChain: try NIOSSLCertificate.fromPEMFile(certificate.certificate).map { .certificate($0) },
                privateKey: .privateKey(try NIOSSLPrivateKey(file: certificate.key, format: .pem)))
            // InfluxDB's write API is HTTP/1.1 here: offering only that keeps libcurl from negotiating h2.
            tls.applicationProtocols = ["http/1.1"]
            server = try .tls(.http1(), tlsConfiguration: tls)
        } else {
            server = .http1()
        }
        let app = Application(
            router: router, server: server, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { channel in port.store(channel.localAddress?.port ?? 0, ordering: .relaxed) }, logger: serverLogger)
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask {
                try await app.runService()
                return nil
            }
            defer { group.cancelAll() }
            var waited = 0
            while port.load(ordering: .relaxed) == 0 {
                waited += 1
                guard waited < 500 else { throw ValidationError("the line protocol sink did not start") }
                try await Task.sleep(for: .milliseconds(10))
            }
            return try await body(port.load(ordering: .relaxed), sink)
        }
    }
}
