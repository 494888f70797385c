public import Logging
import NIOSSL
public import ServiceLifecycle
import Synchronization
import UnixSignals

/// The TLS contexts the ingest's connections are set up with, replaceable while it runs: `serve` reads the certificate
/// and key files again on SIGHUP (``CertificateReloadOnHangup``), so that a renewed certificate (certbot's deploy hook,
/// `systemctl reload farmgate-ingest`) is served from the next connection on, without a restart. Connections already
/// open keep the certificate they began with.
public final class ServerCertificates: Sendable {
    /// What a connection is set up with: the context that offers `h2` when HTTP/2 is on, and the one offering only
    /// `http/1.1` that answers connections past `max_connections`.
    struct Contexts: Sendable {
        var tls: ServerTLS
        var serving: NIOSSLContext
        var refusing: NIOSSLContext
    }

    /// Whether `h2` is offered by ALPN (`[server] http2`).
    public let http2: Bool
    private let state: Mutex<Contexts>
    /// Told of the certificate served, at once and after each reload (the expiry metric).
    private let observers = Mutex<[@Sendable (ServerTLS) -> Void]>([])

    /// - Throws: when BoringSSL refuses the certificate or key (``ServerTLS/load(certificateFile:keyFile:)`` checked
    ///   this already when the configuration was loaded).
    public init(tls: ServerTLS, http2: Bool) throws {
        self.http2 = http2
        state = Mutex(try Self.contexts(tls, http2: http2))
    }

    /// The contexts for a new connection.
    var current: Contexts { state.withLock { $0 } }

    /// The certificate being served.
    public var tls: ServerTLS { state.withLock { $0.tls } }

    /// Reads the two files again and serves them from the next connection on; on any error the running certificate
    /// stays.
    ///
    /// - Throws: ``ServerTLS/LoadError`` naming the key, the file and what is wrong.
    @discardableResult
    public func reload() throws(ServerTLS.LoadError) -> ServerTLS {
        let running = tls
        let loaded = try ServerTLS.load(certificateFile: running.certificateFile, keyFile: running.keyFile)
        let contexts: Contexts
        do {
            contexts = try Self.contexts(loaded, http2: http2)
        } catch {
            throw ServerTLS.LoadError(key: "tls_key", message: "the certificate and key cannot be used together (\(error))")
        }
        state.withLock { $0 = contexts }
        for observer in observers.withLock({ $0 }) { observer(loaded) }
        return loaded
    }

    /// Calls `observer` with the certificate served now, and again after each reload.
    func observe(_ observer: @escaping @Sendable (ServerTLS) -> Void) {
        observers.withLock { $0.append(observer) }
        observer(tls)
    }

    private static func contexts(_ tls: ServerTLS, http2: Bool) throws -> Contexts {
        Contexts(
            tls: tls, serving: try NIOSSLContext(configuration: tls.configuration(http2: http2)),
            refusing: try NIOSSLContext(configuration: tls.configuration(http2: false)))
    }
}

/// A service of `serve`: on SIGHUP, reads `[server] tls_certificate` and `tls_key` again (``ServerCertificates``) and
/// says in the log what it serves now, or why it keeps the running certificate. Without TLS it says that nothing is
/// reloaded; either way a SIGHUP no longer ends the process (the default action of the signal).
public struct CertificateReloadOnHangup: Service {
    let certificates: ServerCertificates?
    let logger: Logger

    public init(certificates: ServerCertificates?, logger: Logger) {
        self.certificates = certificates
        self.logger = logger
    }

    public func run() async throws {
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        for await _ in hangups.cancelOnGracefulShutdown() {
            guard let certificates else {
                logger.notice(
                    "SIGHUP: nothing to reload (no [server] tls_certificate); the rest of the configuration is read at start: restart to change it")
                continue
            }
            do {
                let tls = try certificates.reload()
                logger.notice(
                    "SIGHUP: TLS certificate reloaded; new connections get it, open ones keep theirs",
                    metadata: [
                        "server.tls_certificate": "\(tls.certificateFile)",
                        "server.tls_subject": "\(tls.certificateChain.first.map { String(describing: $0) } ?? "")",
                    ])
            } catch {
                logger.error(
                    "SIGHUP: TLS certificate not reloaded; the running one stays. Fix the file and send SIGHUP again",
                    metadata: ["error": "\(error)"])
            }
        }
    }
}
