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
            let mode: PostgresClient.Configuration.TLS =
                switch try tlsConfiguration() {
                case nil: .disable
                case let (configuration, required)?: required ? .require(configuration) : .prefer(configuration)
                }
            return .init(host: host, port: port, username: username, password: password, database: database, tls: mode)
        }
    }

    /// The same settings for one connection outside any pool (``probe(logger:)``), with `connect_timeout`.
    ///
    /// - Throws: ``PostgresStoreError/tls(_:)`` when the CA file cannot be loaded or the TLS context made.
    func connectionConfiguration() throws -> PostgresConnection.Configuration {
        var configuration: PostgresConnection.Configuration
        switch endpoint {
        case .unixSocket(let path):
            configuration = .init(unixSocketPath: path, username: username, password: password, database: database)
        case .tcp(let host, let port):
            let mode: PostgresConnection.Configuration.TLS
            switch try tlsConfiguration() {
            case nil:
                mode = .disable
            case let (tls, required)?:
                let context: NIOSSLContext
                do {
                    context = try NIOSSLContext(configuration: tls)
                } catch {
                    throw PostgresStoreError.tls("cannot make a TLS context: \(error)")
                }
                mode = required ? .require(context) : .prefer(context)
            }
            configuration = .init(host: host, port: port, username: username, password: password, database: database, tls: mode)
        }
        configuration.options.connectTimeout = TimeAmount(connectTimeout)
        return configuration
    }

    /// The TLS `sslmode` asks for over TCP, and whether it is required (else preferred); nil for none.
    private func tlsConfiguration() throws -> (configuration: TLSConfiguration, required: Bool)? {
        var configuration = TLSConfiguration.makeClientConfiguration()
        switch tls {
        case .disable:
            return nil
        case .prefer, .require:
            configuration.certificateVerification = .none
            return (configuration, tls == .require)
        case .verifyFull:
            configuration.certificateVerification = .fullVerification
            if let caFile {
                do {
                    configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile))
                } catch {
                    throw PostgresStoreError.tls("cannot load the CA file \(caFile): \(error); it must hold PEM certificates")
                }
            }
            return (configuration, true)
        }
    }
}
