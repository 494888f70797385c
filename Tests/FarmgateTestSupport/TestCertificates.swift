import Foundation

/// A test CA and a server certificate for 127.0.0.1 and localhost, made by the `openssl` tool in `directory`
/// (valid two days, EC P-256 keys): `ca.pem`, `server.pem`, `server.key`.
public struct TestCertificates: Sendable {
    public let caFile: String
    public let certificateFile: String
    public let keyFile: String

    /// - Parameter days: how long the server certificate is valid (the CA: two days).
    public static func make(in directory: String, days: Int = 2) async throws -> TestCertificates {
        let curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        try await openssl(["req", "-x509"] + curve + ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Farmgate test CA"], in: directory)
        try await openssl(["req"] + curve + ["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"], in: directory)
        try "subjectAltName=IP:127.0.0.1,DNS:localhost\n".write(toFile: directory + "/san.ext", atomically: true, encoding: .utf8)
        try await openssl(
            ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "\(days)", "-extfile", "san.ext", "-out", "server.pem"],
            in: directory)
        return TestCertificates(caFile: directory + "/ca.pem", certificateFile: directory + "/server.pem", keyFile: directory + "/server.key")
    }

    /// Copies the server certificate and key over `certificate` and `key` (the files a configuration names), as a
    /// renewal would.
    public func install(certificate: String, key: String) throws {
        for (from, to) in [(certificateFile, certificate), (keyFile, key)] {
            try? FileManager.default.removeItem(atPath: to)
            try FileManager.default.copyItem(atPath: from, toPath: to)
        }
    }

    /// Runs openssl on a thread of its own (never the concurrency pool) and fails when it exits non-zero.
    private static func openssl(_ arguments: [String], in directory: String) async throws {
        let status: Int32 = try await withCheckedThrowingContinuation { continuation in
            let thread = Thread {
                let process = Process()
                process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
                process.arguments = arguments
                process.currentDirectoryURL = URL(fileURLWithPath: directory)
                process.standardOutput = FileHandle.nullDevice
                process.standardError = FileHandle.nullDevice
                do {
                    try process.run()
                    process.waitUntilExit()
                    continuation.resume(returning: process.terminationStatus)
                } catch {
                    continuation.resume(throwing: error)
                }
            }
            thread.start()
        }
        guard status == 0 else { throw TestServerError("openssl \(arguments.prefix(2).joined(separator: " ")) exited \(status)") }
    }
}
