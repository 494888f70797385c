import NIOSSL
import PostgresNIO

extension PostgresSettings {
    /// postgres-nio's configuration for these settings (endpoint, credentials, TLS), without the pool's options: the
    /// store's pool and the latest-value listener's single connection are both built from it.
    ///
    /// - Throws: ``PostgresStoreError/tls(_:)`` when the CA file cannot be loaded.
    func clientConfiguration() throws -> PostgresClient.Configuration {
        switch endpoint {
        case .unixSocket(let path):
            return .init(unixSocketPath: path, username: username, password: password, database: database)
        case .tcp(let host, let port):
            var configuration = TLSConfiguration.makeClientConfiguration()
            let mode: PostgresClient.Configuration.TLS
            switch tls {
            case .disable:
                mode = .disable
            case .prefer, .require:
                configuration.certificateVerification = .none
                mode = tls == .prefer ? .prefer(configuration) : .require(configuration)
            case .verifyFull:
                configuration.certificateVerification = .fullVerification
                if let caFile {
                    do {
                        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile))
                    } catch {
                        throw PostgresStoreError.tls("cannot load the CA file \(caFile): \(error); it must hold PEM certificates")
                    }
                }
                mode = .require(configuration)
            }
            return .init(host: host, port: port, username: username, password: password, database: database, tls: mode)
        }
    }
}
