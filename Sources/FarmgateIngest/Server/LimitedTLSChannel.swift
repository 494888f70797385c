public import HummingbirdCore
import HummingbirdHTTP2
public import Logging
public import NIOCore
import NIOHTTP2
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
///    `idle_timeout` without open streams, each stream with ``ConnectionTimeoutHandler``'s body timeout (a stream whose
///    body stops arriving is answered 408 and reset after `body_timeout`; the connection's other streams go on);
///    otherwise the same HTTP/1.1 pipeline as without TLS (``RequestBytesObserver`` after the TLS handler,
///    ``ConnectionTimeoutHandler``, idle/header/body timeouts).
///
/// Request bodies are bounded by the controllers (`max_body_bytes`) whatever the protocol.
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
    let certificates: ServerCertificates
    let limits: ConnectionLimits
    let connections: ConnectionCounter
    let metrics: IngestMetrics?

    /// - Parameters:
    ///   - responder: the application's responder (from `HTTPServerBuilder`).
    ///   - certificates: the certificate and key each new connection is set up with, and whether `h2` is offered by ALPN.
    ///   - limits: the connection limits.
    ///   - connections: the shared count of open connections.
    ///   - metrics: where refusals and timeouts are counted.
    ///   - fastPath: answers `latest` reads over HTTP/1.1 on the event loop when it can; nil for none.
    init(
        responder: @escaping HTTPChannelHandler.Responder, certificates: ServerCertificates, limits: ConnectionLimits, connections: ConnectionCounter,
        metrics: IngestMetrics?, fastPath: LatestFastPath? = nil
    ) {
        self.http1 = LimitedHTTP1Channel.http1Channel(responder: responder, limits: limits, metrics: metrics, fastPath: fastPath)
        self.http2 =
            certificates.http2
            ? HTTP2Channel(
                responder: responder,
                configuration: HTTP2ChannelConfiguration(
                    idleTimeout: limits.idleTimeout,
                    streamConfiguration: HTTP1Channel.Configuration(additionalChannelHandlers: [
                        ConnectionTimeoutHandler(timeouts: ConnectionTimeoutHandler.Timeouts(limits), metrics: metrics, http2Stream: true),
                        ResponseHeaderTrimmer(http2Stream: true), RequestTargetNormalizer(),
                    ])))
            : nil
        self.certificates = certificates
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
            // The certificate served now (``ServerCertificates`` swaps it on SIGHUP).
            let contexts = certificates.current
            try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: refused ? contexts.refusing : contexts.serving))
            try channel.pipeline.syncOperations.addHandler(WriteCoalescingHandler())
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
                        LimitedHTTP1Channel.setup(http1, channel: channel, logger: logger).map { .http1($0) }
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

/// Joins the small writes between two flushes into one buffer, so that TLS seals one record per flush instead of one
/// per write. Each TLS 1.3 record costs 22 bytes (header, content type, tag), and the HTTP/2 and HTTP/1.1 encoders write
/// a response as several buffers (an HTTP/2 frame header and its payload apart): without this an HTTP/2 answer of a
/// receipt took four records. Buffers of 16 KiB or more (a record's most) pass through as they are, uncopied.
final class WriteCoalescingHandler: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    static let largeWrite = 16 * 1024

    private var pending: ByteBuffer?
    private var promises: [EventLoopPromise<Void>] = []

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .byteBuffer(let buffer) = unwrapOutboundIn(data), buffer.readableBytes < Self.largeWrite else {
            writePending(context: context)
            context.write(data, promise: promise)
            return
        }
        if var joined = pending {
            pending = nil
            joined.writeImmutableBuffer(buffer)
            pending = joined
        } else {
            pending = buffer
        }
        if let promise { promises.append(promise) }
        if let pending, pending.readableBytes >= Self.largeWrite { writePending(context: context) }
    }

    func flush(context: ChannelHandlerContext) {
        writePending(context: context)
        context.flush()
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        writePending(context: context)
        context.close(mode: mode, promise: promise)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        writePending(context: context)
    }

    private func writePending(context: ChannelHandlerContext) {
        guard let buffer = pending else { return }
        pending = nil
        let waiting = promises
        promises = []
        var promise: EventLoopPromise<Void>?
        if waiting.count == 1 {
            promise = waiting[0]
        } else if !waiting.isEmpty {
            let joined = context.eventLoop.makePromise(of: Void.self)
            for each in waiting { joined.futureResult.cascade(to: each) }
            promise = joined
        }
        context.write(wrapOutboundOut(.byteBuffer(buffer)), promise: promise)
    }
}

/// Sets the `END_STREAM` flag of an HTTP/2 response on its last `DATA` frame instead of sending an empty `DATA` frame
/// for it: 9 bytes and, through TLS, a record less per response, and libcurl then sees the stream end with its body
/// rather than cancelling it with a `RST_STREAM` of its own (another 13 bytes and record upstream). The frame before the
/// end is held until the next write or flush, never longer, so a streamed body is not delayed.
///
/// Added first in each HTTP/2 stream's pipeline (where frames leave it) by ``ResponseHeaderTrimmer``.
final class EndStreamOnLastData: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = HTTP2Frame.FramePayload
    typealias OutboundOut = HTTP2Frame.FramePayload

    private var held: (frame: HTTP2Frame.FramePayload.Data, promise: EventLoopPromise<Void>?)?

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .data(let incoming) = unwrapOutboundIn(data) else {
            writeHeld(context: context)
            context.write(data, promise: promise)
            return
        }
        if let (last, lastPromise) = held {
            held = nil
            if incoming.endStream, incoming.data.readableBytes == 0, incoming.paddingBytes == nil {
                var ending = last
                ending.endStream = true
                var combined = lastPromise
                if let promise {
                    if let lastPromise { promise.futureResult.cascade(to: lastPromise) }
                    combined = promise
                }
                context.write(wrapOutboundOut(.data(ending)), promise: combined)
                return
            }
            context.write(wrapOutboundOut(.data(last)), promise: lastPromise)
        }
        if incoming.endStream {
            context.write(data, promise: promise)
        } else {
            held = (incoming, promise)
        }
    }

    func flush(context: ChannelHandlerContext) {
        writeHeld(context: context)
        context.flush()
    }

    func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        writeHeld(context: context)
        context.close(mode: mode, promise: promise)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        writeHeld(context: context)
    }

    private func writeHeld(context: ChannelHandlerContext) {
        guard let (frame, promise) = held else { return }
        held = nil
        context.write(wrapOutboundOut(.data(frame)), promise: promise)
    }
}
