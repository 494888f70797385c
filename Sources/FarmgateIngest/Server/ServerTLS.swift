import Foundation
public import NIOSSL

/// The ingest's own TLS (`[server] tls_certificate` and `tls_key`): the certificate chain and private key, read and
/// checked when the configuration is loaded, so that a missing, unreadable or mismatched file stops the start with a
/// message naming the file instead of failing every handshake later.
///
/// ```swift
/// let tls = try ServerTLS.load(certificateFile: "/etc/farmgate/ingest.crt", keyFile: "/etc/farmgate/ingest.key")
/// let server = IngestConfiguration.Server(port: 8443, tls: tls)
/// ```
public struct ServerTLS: Sendable, Hashable {
    /// The PEM file with the server's certificate first, then any intermediates.
    public var certificateFile: String
    /// The PEM file with the private key of the first certificate (unencrypted).
    public var keyFile: String
    /// The certificates of ``certificateFile``, in order.
    public var certificateChain: [NIOSSLCertificate]
    /// The key of ``keyFile``.
    public var privateKey: NIOSSLPrivateKey

    /// What is wrong with one of the two files; ``key`` names the configuration key (`tls_certificate` or `tls_key`).
    public struct LoadError: Error, Hashable, Sendable, CustomStringConvertible {
        public var key: String
        public var message: String
        public var description: String { "\(key): \(message)" }
    }

    /// Reads and checks the two PEM files: each must be readable and hold what its key names, and the key must belong to
    /// the first certificate.
    ///
    /// - Throws: ``LoadError`` naming the key, the file and the problem.
    public static func load(certificateFile: String, keyFile: String) throws(LoadError) -> ServerTLS {
        let certificateBytes = try read(certificateFile, key: "tls_certificate", what: "the certificate chain")
        guard certificateBytes.containsPEMBlock("CERTIFICATE") else {
            throw LoadError(
                key: "tls_certificate",
                message: "\(certificateFile) holds no certificate (no -----BEGIN CERTIFICATE----- block); give the server certificate then its intermediates in PEM")
        }
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMBytes(certificateBytes)
        } catch {
            throw LoadError(
                key: "tls_certificate",
                message: "\(certificateFile) is not a valid PEM certificate chain (\(error)); give the server certificate then its intermediates, each between -----BEGIN CERTIFICATE----- and -----END CERTIFICATE-----")
        }
        guard !chain.isEmpty else {
            throw LoadError(
                key: "tls_certificate",
                message: "\(certificateFile) holds no certificate (no -----BEGIN CERTIFICATE----- block); give the server certificate then its intermediates in PEM")
        }
        let keyBytes = try read(keyFile, key: "tls_key", what: "the private key")
        let privateKey: NIOSSLPrivateKey
        do {
            privateKey = try NIOSSLPrivateKey(bytes: keyBytes, format: .pem)
        } catch {
            throw LoadError(
                key: "tls_key",
                message: "\(keyFile) is not an unencrypted PEM private key (\(error)); give the key of the certificate (-----BEGIN PRIVATE KEY----- or -----BEGIN EC/RSA PRIVATE KEY-----), without a passphrase")
        }
        let tls = ServerTLS(certificateFile: certificateFile, keyFile: keyFile, certificateChain: chain, privateKey: privateKey)
        do {
            _ = try NIOSSLContext(configuration: tls.configuration(http2: true))
        } catch {
            throw LoadError(
                key: "tls_key",
                message: "the key in \(keyFile) does not belong to the first certificate of \(certificateFile), or the two cannot be used together (\(error)); give the key the certificate was issued for")
        }
        return tls
    }

    /// The server's TLS settings: TLS 1.2 or later, no client certificates, and by ALPN `h2` (when `http2`) then
    /// `http/1.1`.
    public func configuration(http2: Bool) -> TLSConfiguration {
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: certificateChain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        configuration.minimumTLSVersion = .tlsv12
        configuration.applicationProtocols = http2 ? ["h2", "http/1.1"] : ["http/1.1"]
        return configuration
    }

    private static func read(_ path: String, key: String, what: String) throws(LoadError) -> [UInt8] {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw LoadError(key: key, message: "\(path) does not exist; give the PEM file with \(what)")
        }
        guard !isDirectory.boolValue else { throw LoadError(key: key, message: "\(path) is a directory; give the PEM file with \(what)") }
        guard FileManager.default.isReadableFile(atPath: path), let data = FileManager.default.contents(atPath: path) else {
            throw LoadError(key: key, message: "cannot read \(path); check its permissions (the ingest's user must be able to read it)")
        }
        return [UInt8](data)
    }
}

extension [UInt8] {
    /// Whether the bytes hold a `-----BEGIN <label>-----` line.
    fileprivate func containsPEMBlock(_ label: String) -> Bool {
        let marker = Array("-----BEGIN \(label)-----".utf8)
        guard count >= marker.count else { return false }
        return (0...(count - marker.count)).contains { start in self[start..<(start + marker.count)].elementsEqual(marker) }
    }
}
