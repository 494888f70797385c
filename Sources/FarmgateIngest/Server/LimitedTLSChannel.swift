public import HummingbirdCore
import HummingbirdHTTP2
public import Logging
public import NIOCore
import NIOSSL
import NIOTLS

/// The ingest's own TLS (`[server] tls_certificate`, `tls_key`) with the same connection limits as
/// ``LimitedHTTP1Channel``, serving HTTP/2 or HTTP/1.1 as the client chooses by ALPN.
///
/// Each accepted connection
/// 1. counts against ``ConnectionLimits/maxConnections``; past it, the TLS handshake offers only `http/1.1` and
///    ``ConnectionRefusalHandler`` answers 503 through TLS and closes, whatever the client asked for;
/// 2. must finish its TLS handshake within `header_timeout`, else it is closed (counted as a header timeout);
/// 3. then, when the client chose `h2` (and `[server] http2` is on), runs Hummingbird's `HTTP2Channel`, closed after
///    `idle_timeout` without open streams; otherwise the same HTTP/1.1 pipeline as without TLS (``RequestBytesObserver``
///    after the TLS handler, ``ConnectionTimeoutHandler``, idle/header/body timeouts).
///
/// Request bodies are bounded by the controllers (`max_body_bytes`) whatever the protocol. HTTP/2 streams have no header
/// or body timeout of their own: a stream that stops sending holds its connection until the client goes away.
public struct LimitedTLSChannel: ServerChildChannel {
    /// What the handshake led to.
    enum Negotiated: Sendable {
        case http1(HTTP1Channel.Value)
        case http2(HTTP2Channel.Value)
        /// Past `max_connections`: answered 503 and closed.
        case refused
    }

    public struct Value: ServerChildChannelValue {
        let negotiated: EventLoopFuture<Negotiated>
        public let channel: any Channel
    }

    let http1: HTTP1Channel
    let http2: HTTP2Channel?
    let context: NIOSSLContext
    let refusingContext: NIOSSLContext
    let limits: ConnectionLimits
    let connections: ConnectionCounter
    let metrics: IngestMetrics?

    /// - Parameters:
    ///   - responder: the application's responder (from `HTTPServerBuilder`).
    ///   - tls: the certificate chain and key.
    ///   - http2: whether `h2` is offered by ALPN.
    ///   - limits: the connection limits.
    ///   - connections: the shared count of open connections.
    ///   - metrics: where refusals and timeouts are counted.
    /// - Throws: when BoringSSL refuses the certificate or key (``ServerTLS/load(certificateFile:keyFile:)`` checks
    ///   this when the configuration is loaded).
    public init(
        responder: @escaping HTTPChannelHandler.Responder, tls: ServerTLS, http2: Bool, limits: ConnectionLimits, connections: ConnectionCounter,
        metrics: IngestMetrics?
    ) throws {
        self.http1 = LimitedHTTP1Channel.http1Channel(responder: responder, limits: limits, metrics: metrics)
        self.http2 =
            http2
            ? HTTP2Channel(
                responder: responder,
                configuration: HTTP2ChannelConfiguration(
                    idleTimeout: limits.idleTimeout, streamConfiguration: HTTP1Channel.Configuration(additionalChannelHandlers: [ResponseHeaderTrimmer()])))
            : nil
        self.context = try NIOSSLContext(configuration: tls.configuration(http2: http2))
        self.refusingContext = try NIOSSLContext(configuration: tls.configuration(http2: false))
        self.limits = limits
        self.connections = connections
        self.metrics = metrics
    }

    public func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        let open = connections.opened()
        let connections = self.connections
        channel.closeFuture.whenComplete { _ in connections.closed() }
        let refused = open > limits.maxConnections
        let (http1, http2, limit, metrics) = (self.http1, self.http2, limits.maxConnections, self.metrics)
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: refused ? refusingContext : context))
            let negotiation = NIOTypedApplicationProtocolNegotiationHandler<Negotiated> { result, channel in
                if refused {
                    metrics?.connectionRefused(.tooManyConnections)
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ConnectionRefusalHandler(open: open, limit: limit))
                        return .refused
                    }
                }
                switch result {
                case .negotiated("h2"):
                    guard let http2 else { break }
                    return http2.setup(channel: channel, logger: logger).map { .http2($0) }
                case .negotiated("http/1.1"), .fallback:
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(RequestBytesObserver())
                    }.flatMap {
                        http1.setup(channel: channel, logger: logger).map { .http1($0) }
                    }
                case .negotiated:
                    break
                }
                // Only what the server offered can be chosen; anything else is a broken client.
                return channel.close().flatMapThrowing { throw UnexpectedApplicationProtocol() }
            }
            try channel.pipeline.syncOperations.addHandler(negotiation)
            let negotiated = negotiation.protocolNegotiationResult
            // The handshake has no timer of its own: a client that connects and sends nothing is closed after the time a
            // request head may take.
            let handshakeTimer = channel.eventLoop.scheduleTask(in: TimeAmount(limits.headerTimeout)) {
                metrics?.connectionTimedOut(.header)
                channel.close(promise: nil)
            }
            negotiated.whenComplete { _ in handshakeTimer.cancel() }
            return Value(negotiated: negotiated, channel: channel)
        }
    }

    public func handle(value: Value, logger: Logger) async {
        let negotiated: Negotiated
        do {
            negotiated = try await value.negotiated.get()
        } catch {
            logger.debug("TLS connection ended before its protocol was set up", metadata: ["error": "\(error)"])
            return
        }
        switch negotiated {
        case .http1(let connection):
            await http1.handle(value: connection, logger: logger)
        case .http2(let connection):
            await http2?.handle(value: connection, logger: logger)
        case .refused:
            // The refusal handler closes the connection; it stays counted as open until then.
            try? await value.channel.closeFuture.get()
        }
    }
}

/// ALPN chose a protocol the ingest did not offer.
struct UnexpectedApplicationProtocol: Error {}
