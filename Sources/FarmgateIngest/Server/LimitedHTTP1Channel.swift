public import HummingbirdCore
public import Logging
public import NIOCore
import FarmgateSupport
import FarmgateWire
import HTTPTypes
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
import Synchronization

/// The connection limits of the ingest's HTTP server (`[server]` in the configuration).
public struct ConnectionLimits: Sendable, Hashable {
    /// See ``IngestConfiguration/Server/idleTimeout``.
    public var idleTimeout: Duration
    /// See ``IngestConfiguration/Server/headerTimeout``.
    public var headerTimeout: Duration
    /// See ``IngestConfiguration/Server/bodyTimeout``.
    public var bodyTimeout: Duration
    /// Connections answered normally; see ``IngestConfiguration/Server/maxConnections``.
    public var maxConnections: Int

    /// Connections past ``maxConnections`` that are still accepted, to be answered 503 and closed; past those, the server
    /// stops accepting and new connections wait in the kernel's backlog, so the process never runs out of descriptors.
    public static let refusalHeadroom = 64
    /// The largest request head the HTTP parser takes (the framework's default); larger ones are answered 431.
    public static let maxHeaderBytes = 80 * 1024
    /// `Retry-After` of the 503 answered past ``maxConnections``.
    public static let retryAfterSeconds = 5

    public init(server: IngestConfiguration.Server) {
        idleTimeout = server.idleTimeout
        headerTimeout = server.headerTimeout
        bodyTimeout = server.bodyTimeout
        maxConnections = server.maxConnections
    }
}

/// Hummingbird's HTTP/1.1 child channel with the ingest's connection limits around it.
///
/// Built through Hummingbird's public `HTTPServerBuilder`: each accepted connection gets
/// 1. a count against ``ConnectionLimits/maxConnections``; past it, ``ConnectionRefusalHandler`` answers 503 and closes;
/// 2. ``RequestBytesObserver`` in front of the HTTP parser, and ``ConnectionTimeoutHandler`` after it (through
///    `HTTP1Channel.Configuration.additionalChannelHandlers`), which enforce the idle, header and body timeouts and answer
///    parser errors as JSON, ``ResponseHeaderTrimmer``, which drops the framework's `Date` header,
///    ``RequestTargetNormalizer``, which decodes escaped unreserved characters in the request target, and
///    ``LatestFastPathHandler``, which answers cached `latest` reads on the event loop;
/// 3. then the unchanged `HTTP1Channel` pipeline and request loop.
public struct LimitedHTTP1Channel: ServerChildChannel {
    public typealias Value = HTTP1Channel.Value

    let http1: HTTP1Channel
    let limits: ConnectionLimits
    let connections: ConnectionCounter
    let metrics: IngestMetrics?

    /// - Parameters:
    ///   - responder: the application's responder (from `HTTPServerBuilder`).
    ///   - limits: the connection limits.
    ///   - connections: the shared count of open connections.
    ///   - metrics: where refusals and timeouts are counted.
    ///   - fastPath: answers `latest` reads on the event loop when it can (``LatestFastPathHandler``); nil for none.
    init(
        responder: @escaping HTTPChannelHandler.Responder, limits: ConnectionLimits, connections: ConnectionCounter, metrics: IngestMetrics?,
        fastPath: LatestFastPath? = nil
    ) {
        self.http1 = Self.http1Channel(responder: responder, limits: limits, metrics: metrics, fastPath: fastPath)
        self.limits = limits
        self.connections = connections
        self.metrics = metrics
    }

    /// Hummingbird's HTTP/1.1 channel with ``ConnectionTimeoutHandler``, ``ResponseHeaderTrimmer``,
    /// ``RequestTargetNormalizer`` and (given a `fastPath`) ``LatestFastPathHandler`` after the parser;
    /// ``LimitedTLSChannel`` serves HTTP/1.1 over TLS with the same.
    static func http1Channel(
        responder: @escaping HTTPChannelHandler.Responder, limits: ConnectionLimits, metrics: IngestMetrics?, fastPath: LatestFastPath?
    ) -> HTTP1Channel {
        let timeouts = ConnectionTimeoutHandler.Timeouts(limits)
        return HTTP1Channel(
            responder: responder,
            configuration: HTTP1Channel.Configuration(
                additionalChannelHandlers: [
                    ConnectionTimeoutHandler(timeouts: timeouts, metrics: metrics), ResponseHeaderTrimmer(), RequestTargetNormalizer(),
                ] + (fastPath.map { [LatestFastPathHandler(fastPath: $0)] } ?? []),
                httpDecoderConfiguration: .init(
                    maxHeaderFieldSize: ConnectionLimits.maxHeaderBytes, maxHeaderListSize: ConnectionLimits.maxHeaderBytes)))
    }

    public func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        let open = connections.opened()
        let connections = self.connections
        channel.closeFuture.whenComplete { _ in connections.closed() }
        let refused = open > limits.maxConnections
        let added = channel.eventLoop.makeCompletedFuture {
            if refused {
                metrics?.connectionRefused(.tooManyConnections)
                try channel.pipeline.syncOperations.addHandler(ConnectionRefusalHandler(open: open, limit: limits.maxConnections))
            } else {
                try channel.pipeline.syncOperations.addHandler(RequestBytesObserver())
            }
        }
        return added.flatMap { Self.setup(http1, channel: channel, logger: logger) }
    }

    /// `http1.setup`, then ``RequestHeadGuard``, ``KeepAliveNormalizer`` and ``ExpectContinueHandler`` in front of the
    /// framework's conversion to HTTP types.
    static func setup(_ http1: HTTP1Channel, channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        http1.setup(channel: channel, logger: logger).flatMapThrowing { value in
            let codec = try channel.pipeline.syncOperations.handler(type: HTTP1ToHTTPServerCodec.self)
            try channel.pipeline.syncOperations.addHandlers(
                [RequestHeadGuard(), KeepAliveNormalizer(), ExpectContinueHandler()], position: .before(codec))
            return value
        }
    }

    public func handle(value: Value, logger: Logger) async {
        await http1.handle(value: value, logger: logger)
    }
}

/// The number of open connections, shared by every connection's setup.
public final class ConnectionCounter: Sendable {
    private let count = Atomic<Int>(0)

    public init() {}

    /// Counts a new connection; returns how many are open with it.
    func opened() -> Int { count.wrappingAdd(1, ordering: .relaxed).newValue }

    /// Counts a closed connection.
    func closed() { count.wrappingSubtract(1, ordering: .relaxed) }

    /// Connections open now.
    public var open: Int { count.load(ordering: .relaxed) }
}

/// Answers a connection past the cap at once with 503 `unavailable` (JSON, `Retry-After`, `Connection: close`) and closes
/// it, without parsing anything it sends. The write side is closed first and the connection dropped when the client
/// closes or after a second, so that its request bytes do not turn the close into a reset that loses the answer.
final class ConnectionRefusalHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let open: Int
    private let limit: Int
    private var answered = false

    init(open: Int, limit: Int) {
        self.open = open
        self.limit = limit
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { answer(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        answer(context: context)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Discarded: this connection is answered without being read.
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { context.close(promise: nil) }
    }

    private func answer(context: ChannelHandlerContext) {
        guard !answered else { return }
        answered = true
        let body = jsonBuffer(
            APIErrorBody(
                code: "unavailable",
                message:
                    "the ingest has \(limit) connections open, its limit ([server] max_connections); retry after \(ConnectionLimits.retryAfterSeconds) s, and reuse one connection (keep-alive) instead of opening many"
            ))
        var head = ByteBuffer(
            string: "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: \(body.readableBytes)\r\n"
                + "retry-after: \(ConnectionLimits.retryAfterSeconds)\r\nconnection: close\r\n\r\n")
        head.writeImmutableBuffer(body)
        let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(head)).assumeIsolated().whenComplete { _ in
            let context = loopBoundContext.value
            context.close(mode: .output, promise: nil)
            context.eventLoop.assumeIsolated().scheduleTask(in: .seconds(1)) {
                loopBoundContext.value.close(promise: nil)
            }
        }
    }
}

/// Drops the `Date` header the framework adds to every response. No client of the ingest reads it (the agent learns
/// whether its clock is synchronised from the kernel, and `Retry-After` is sent in seconds), and on a metered link it is the one header that changes every
/// second: about 37 bytes per HTTP/1.1 response, and about 25 per HTTP/2 response that HPACK cannot index. RFC 9110
/// §6.6.1 asks origin servers with a clock to send it; the ingest's answers are not cached, which is what it serves.
///
/// In an HTTP/2 stream (`http2Stream`) it also puts ``EndStreamOnLastData`` first in the stream's pipeline, below the
/// framework's HTTP/2 codec, which the stream's configuration cannot reach.
final class ResponseHeaderTrimmer: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    private let http2Stream: Bool

    init(http2Stream: Bool = false) {
        self.http2Stream = http2Stream
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if http2Stream {
            // Without it the response is only a few bytes longer.
            try? context.pipeline.syncOperations.addHandler(EndStreamOnLastData(), position: .first)
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .head(var head) = unwrapOutboundIn(data), head.headerFields[.date] != nil else {
            context.write(data, promise: promise)
            return
        }
        head.headerFields[.date] = nil
        context.write(wrapOutboundOut(.head(head)), promise: promise)
    }
}

/// Decodes the percent-encoded unreserved characters of each request's target (`/%68ealthz` is `/healthz`, `?%64evice=`
/// is `?device=`), which RFC 3986 §6.2.2.2 makes equivalent to the characters, before the fast path and the router
/// read it: the router matches fixed segments as written and Hummingbird decodes no query parameter's name. Every
/// other escape stays as it is, so an escaped slash (`%2F`) is no separator and path parameters are decoded once, as
/// before (``Parameters/decoded(_:)``; `%2525` is still `%25`).
final class RequestTargetNormalizer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(var head) = unwrapInboundIn(data), let path = head.path, let normalized = Self.decodingUnreserved(path) else {
            context.fireChannelRead(data)
            return
        }
        head.path = normalized
        context.fireChannelRead(wrapInboundOut(.head(head)))
    }

    /// `target` with its escaped unreserved characters (ALPHA, DIGIT, `-`, `.`, `_`, `~`) decoded; nil when it has none.
    /// Also nil when a `%` starts no escape (`%zz`): decoding around it could make one of it (`%%36%38` would read `%68`),
    /// so such a target is left to be refused or taken as written, as before.
    static func decodingUnreserved(_ target: String) -> String? {
        guard target.utf8.contains(UInt8(ascii: "%")) else { return nil }
        let bytes = Array(target.utf8)
        var decoded: [UInt8] = []
        decoded.reserveCapacity(bytes.count)
        var index = 0
        while index < bytes.count {
            guard bytes[index] == UInt8(ascii: "%") else {
                decoded.append(bytes[index])
                index += 1
                continue
            }
            guard index + 2 < bytes.count, let high = hexValue(bytes[index + 1]), let low = hexValue(bytes[index + 2]) else { return nil }
            let character = high << 4 | low
            if isUnreserved(character) {
                decoded.append(character)
            } else {
                decoded.append(contentsOf: bytes[index...(index + 2)])
            }
            index += 3
        }
        // Only ASCII escapes were replaced by ASCII characters: the bytes are still the target's valid UTF-8.
        return decoded.count < bytes.count ? String(decoding: decoded, as: UTF8.self) : nil
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }

    /// RFC 3986 §2.3.
    private static func isUnreserved(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
            UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
            true
        default: false
        }
    }
}

/// Says `Connection: close` on every request that does not keep its connection alive, as HTTP/1.1 defines it: an
/// HTTP/1.0 request without `Connection: keep-alive`, and a `close` token in any case or list (`Close`,
/// `keep-alive, close`). The conversion to HTTP types drops the version, and the framework closes after an answer
/// only when the header is exactly `close`; without this an HTTP/1.0 client that reads until the connection closes
/// (health checkers, old scripts) waited for `idle_timeout`.
///
/// An HTTP/1.0 request that asked for `Connection: keep-alive` gets it back in its answer (RFC 9112 §C.2.2): an HTTP/1.0
/// client takes a connection for closed after each answer unless the server says otherwise. The answer to a request
/// that does not keep its connection says `Connection: close` (§9.6: the server closes after it).
final class KeepAliveNormalizer: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    /// What the answer to a request says of its connection.
    private enum Answer {
        case asIs
        case keptAlive  // an HTTP/1.0 request kept alive
        case closing
    }

    /// For each request not yet answered, in order (pipelining).
    private var answers: [Answer] = []

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(var head) = unwrapInboundIn(data) else {
            context.fireChannelRead(data)
            return
        }
        answers.append(!head.isKeepAlive ? .closing : head.version == .http1_0 ? .keptAlive : .asIs)
        guard !head.isKeepAlive, head.headers[canonicalForm: "connection"] != ["close"] else {
            context.fireChannelRead(data)
            return
        }
        head.headers.replaceOrAdd(name: "connection", value: "close")
        context.fireChannelRead(wrapInboundOut(.head(head)))
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .head(var head) = unwrapOutboundIn(data), head.status.code >= 200, !answers.isEmpty else {
            context.write(data, promise: promise)
            return
        }
        let answer = answers.removeFirst()
        guard answer != .asIs, !head.headers.contains(name: "connection") else {
            context.write(data, promise: promise)
            return
        }
        head.headers.add(name: "connection", value: answer == .keptAlive ? "keep-alive" : "close")
        context.write(wrapOutboundOut(.head(head)), promise: promise)
    }
}

/// What ``RequestHeadGuard`` refuses a request with; ``ConnectionTimeoutHandler`` answers it as JSON and closes.
struct RequestHeadRefusal: Error, Hashable {
    var status: HTTPResponse.Status
    var code: String
    var message: String
}

/// Refuses, before the framework sees it, a request head that HTTP/1.1 (RFC 9112) says a server must not serve as it
/// is; the answer is a JSON error and the connection is closed, since what follows the head cannot be trusted to be
/// framed as the client meant:
/// - 400 `bad_request` for an HTTP/1.1 request without `Host`, for any request with more than one, or with one that
///   is not a host (§3.2: "A server MUST respond with a 400");
/// - 501 `unsupported_transfer_encoding` for a transfer coding other than `chunked` (`gzip, chunked`): the parser
///   would take the body as chunked and pass on a body still compressed (§6.1); a body is compressed with
///   `Content-Encoding` instead. On an HTTP/1.0 request `Transfer-Encoding` is 400 (§6.1: its framing is faulty);
/// - 405 `method_not_allowed` for `CONNECT`: the ingest is not a proxy, and the parser would take the rest of the
///   connection for a tunnel.
final class RequestHeadGuard: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart

    /// Set once a request was refused: what follows it on the connection is dropped while the answer goes out.
    private var refused = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }
        if case .head(let head) = unwrapInboundIn(data), let refusal = Self.refusal(of: head) {
            refused = true
            context.fireErrorCaught(refusal)
            return
        }
        context.fireChannelRead(data)
    }

    static func refusal(of head: HTTPRequestHead) -> RequestHeadRefusal? {
        // Surrounding whitespace is not part of a field's value (RFC 9110 §5.5).
        let hosts = head.headers["host"].map { $0.trimmingWhitespace() }
        if hosts.count > 1 {
            return RequestHeadRefusal(
                status: .badRequest, code: "bad_request", message: "the request has \(hosts.count) Host headers; send exactly one (RFC 9112 §3.2)")
        }
        if let host = hosts.first, !isHost(host) {
            return RequestHeadRefusal(
                status: .badRequest, code: "bad_request",
                message: "the request's Host header is not a host and port (\(String(host.prefix(100)).debugDescription)); send the server's name or address, as in Host: ingest.example.com")
        }
        if hosts.isEmpty, (head.version.major, head.version.minor) >= (1, 1) {
            return RequestHeadRefusal(
                status: .badRequest, code: "bad_request", message: "an HTTP/1.1 request needs a Host header (RFC 9112 §3.2); add one, as in Host: ingest.example.com")
        }
        if head.method == .CONNECT {
            return RequestHeadRefusal(
                status: .methodNotAllowed, code: "method_not_allowed", message: "the ingest is not a proxy and takes no CONNECT; see the HTTP API in the README")
        }
        let codings = head.headers["transfer-encoding"].flatMap { $0.split(separator: ",") }.map { $0.trimmingWhitespace().lowercased() }
        if head.headers.contains(name: "transfer-encoding"), codings.isEmpty || codings.contains("") {
            // An empty coding: a proxy in front may frame the body otherwise than the parser does, which ignores it.
            return RequestHeadRefusal(
                status: .badRequest, code: "bad_request", message: "the request's Transfer-Encoding is empty or has an empty coding; send chunked, or Content-Length alone")
        }
        if !codings.isEmpty, (head.version.major, head.version.minor) < (1, 1) {
            return RequestHeadRefusal(
                status: .badRequest, code: "bad_request", message: "an HTTP/1.0 request cannot use Transfer-Encoding (RFC 9112 §6.1); send Content-Length instead")
        }
        if !codings.isEmpty, codings != ["chunked"] {
            return RequestHeadRefusal(
                status: .init(code: 501, reasonPhrase: "Not Implemented"), code: "unsupported_transfer_encoding",
                message:
                    "the ingest takes Transfer-Encoding: chunked alone, not \(codings.joined(separator: ", ").debugDescription); compress the body with Content-Encoding instead")
        }
        return nil
    }

    /// Whether `value` is a `Host` header's value (`uri-host [ ":" port ]`, RFC 9110 §7.2 and RFC 3986 §3.2.2): empty
    /// (RFC 9112 §3.2 allows it), or a name or IPv4 address (unreserved, percent-encoded and sub-delimiter characters),
    /// or a bracketed IPv6 address (hexadecimal digits, colons and dots), each with an optional port of up to five
    /// digits. A port without a host, a second colon outside brackets or an unclosed bracket is no host.
    static func isHost(_ value: String) -> Bool {
        guard !value.isEmpty else { return true }
        var host = Substring(value)
        var port: Substring?
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return false }
            let literal = host[host.index(after: host.startIndex)..<close]
            guard literal.contains(":"), literal.allSatisfy({ $0.isHexDigit || $0 == ":" || $0 == "." }) else { return false }
            let rest = host[host.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":") else { return false }
                port = rest.dropFirst()
            }
            host = host[...close]
        } else {
            if let colon = host.firstIndex(of: ":") {
                port = host[host.index(after: colon)...]
                host = host[..<colon]
            }
            guard !host.isEmpty, host.unicodeScalars.allSatisfy(isRegisteredNameCharacter) else { return false }
        }
        if let port { return port.count <= 5 && port.allSatisfy { $0.isASCII && $0.isNumber } }
        return true
    }

    /// RFC 3986's `unreserved`, `sub-delims` and `%` (of percent-encoding).
    private static func isRegisteredNameCharacter(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar {
        case "a"..."z", "A"..."Z", "0"..."9", "-", ".", "_", "~", "%", "!", "$", "&", "'", "(", ")", "*", "+", ",", ";", "=": true
        default: false
        }
    }
}

/// Answers `Expect: 100-continue` (RFC 9110 §10.1.1) with `100 Continue` as the request's head arrives, so that a client
/// that waits for it before sending its body (curl does for bodies of 1 MiB or more, and whenever asked) sends at once
/// instead of after its own timeout (a second for curl). The final answer follows as usual, whatever it is. An HTTP/1.0
/// request, or one without a body, is passed on as it is (the expectation is then ignored, as the RFC asks).
final class ExpectContinueHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let head) = unwrapInboundIn(data), head.headers.contains(name: "expect"), head.version.major == 1, head.version.minor >= 1,
            head.headers[canonicalForm: "expect"].contains(where: { $0.lowercased() == "100-continue" }),
            head.headers[canonicalForm: "content-length"] != ["0"] && !(head.headers["content-length"].isEmpty && head.headers["transfer-encoding"].isEmpty)
        {
            context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))), promise: nil)
        }
        context.fireChannelRead(data)
    }
}
