import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1

/// Fired inbound by ``RequestBytesObserver`` each time bytes arrive, before they are parsed, so that
/// ``ConnectionTimeoutHandler`` can tell a waiting connection (idle) from one that has started a request (reading its head),
/// and see how a request begins.
struct RequestBytesArrived: Sendable {
    var bytes: ByteBuffer
}

/// What a request's body stream fails with when its connection ended before the body did (``ConnectionTimeoutHandler``).
struct RequestBodyCut: Error, CustomStringConvertible {
    var description: String { "the connection ended before the request body did" }
}

/// The first handler of a connection's pipeline: announces every read with ``RequestBytesArrived`` and passes it on.
final class RequestBytesObserver: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.fireUserInboundEventTriggered(RequestBytesArrived(bytes: unwrapInboundIn(data)))
        context.fireChannelRead(data)
    }
}

/// Bounds how long a connection may hold the server without making progress, and answers protocol errors as JSON.
///
/// It sits after HTTP parsing and watches one connection:
/// - **idle** (`idle_timeout`): after a response, until the first byte of the next request; the connection is closed
///   silently, as keep-alive allows;
/// - **head** (`header_timeout`): from the first byte of a request (for a new connection: from its opening) until its
///   head is parsed; past it the answer is 408 `request_timeout` and the connection is closed (slowloris);
/// - **body** (`body_timeout`): from the head until the body's end, in total (a body trickling a byte a second never
///   resets it); past it the answer is 408 unless one was already started, and the connection is closed.
/// No timer runs while the application computes an answer: that is the application's own time.
///
/// A request the HTTP parser refuses (malformed line or headers, a header section over the decoder's limit) would get
/// an empty 400 from the framework; here it gets the ingest's JSON error body, 431 `request_header_fields_too_large` for
/// a header section that is too large, 501 `method_not_implemented` for a method the parser does not know (`FOO`, `get`;
/// RFC 9110 §9.1) in a request that begins with a token and a space as a request line does, 505
/// `http_version_not_supported` for a version other than HTTP/1.0 and HTTP/1.1 (RFC 9110 §15.6.6; HTTP/2's preface on a
/// connection that did not choose HTTP/2 by ALPN, and an HTTP/0.9 request line, answered as soon as its line is in), 400
/// `bad_request` otherwise (naming `Content-Length` beside `Transfer-Encoding`, RFC 9112 §6.3), and the connection is
/// closed; so is a head that ``RequestHeadGuard`` refuses, with its status and code.
final class ConnectionTimeoutHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    /// What the running timer bounds.
    enum Phase: String { case idle, header, body }

    struct Timeouts: Sendable {
        var idle: TimeAmount
        var header: TimeAmount
        var body: TimeAmount

        init(idle: TimeAmount, header: TimeAmount, body: TimeAmount) {
            self.idle = idle
            self.header = header
            self.body = body
        }

        /// `[server] idle_timeout`, `header_timeout` and `body_timeout`.
        init(_ limits: ConnectionLimits) {
            self.init(idle: TimeAmount(limits.idleTimeout), header: TimeAmount(limits.headerTimeout), body: TimeAmount(limits.bodyTimeout))
        }
    }

    private let timeouts: Timeouts
    /// The shortest of the three: the armed timer never fires later than this after it was armed.
    private let checkInterval: TimeAmount
    private let metrics: IngestMetrics?
    /// The connection's one timer, when armed.
    private var timer: Scheduled<Void>?
    /// What is being timed, and until when.
    private var phase: Phase?
    private var deadline: NIODeadline = .distantFuture
    /// Requests whose head arrived and whose response has not ended.
    private var requestsOpen = 0
    /// Whether the response to the oldest open request has started.
    private var responseStarted = false
    private var readingHead = false
    /// Whether the request being read began like a request line, with a token and a space: a method the parser refuses
    /// is then one it does not know (501); otherwise the bytes are no request (400: a TLS handshake on the plain port,
    /// binary garbage). True when its beginning was not seen (it came in one read after the request before it).
    private var startsWithToken = true
    /// The first read of the head being read (a view of the read's buffer, no copy), for what the parser's errors do
    /// not say: which headers were there, whether it was HTTP/2's preface. Released when the head is parsed.
    private var headStart: ByteBuffer?
    private var readingBody = false
    private var closing = false
    /// The refusal of a request the parser refused while earlier ones were still being answered: sent once they are.
    private var refusalAfterOpenRequests: (status: HTTPResponse.Status, code: String, message: String)?
    /// Whether the connection's bytes so far end where a request ends, so that the next read begins a request: true on
    /// a new connection and after a read whose last request ended in it, at the empty line that ends a head (or a chunked
    /// body) or with its body. A read that ended elsewhere may have cut a pipelined head, and the next read then begins
    /// inside it (`Bearer KEY`, `d2 HTTP/1.1`), which looks like a request line and is not one.
    private var readEndedRequest = true
    /// Whether the read being parsed ends with an empty line; whether the request being parsed has a body.
    private var readEndsWithEmptyLine = false
    private var requestHasBody = false

    /// In an HTTP/2 stream (one request, one answer): the header and body phases only, and a 408 without
    /// `Connection: close` (a connection-specific field that HTTP/2 forbids); closing ends the stream, not the connection.
    private let http2Stream: Bool

    init(timeouts: Timeouts, metrics: IngestMetrics?, http2Stream: Bool = false) {
        self.timeouts = timeouts
        self.checkInterval = min(timeouts.idle, timeouts.header, timeouts.body)
        self.metrics = metrics
        self.http2Stream = http2Stream
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { startFirstRequestTimer(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        startFirstRequestTimer(context: context)
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        disarm()
    }

    func channelInactive(context: ChannelHandlerContext) {
        disarm()
        // The connection (or HTTP/2 stream) ended inside a request's body: a body cut in transit, one the parser
        // refused partway (a bad chunk, bytes past the declared length), or one whose body_timeout this handler answered.
        // The application's body stream would otherwise just end, as after the body's last byte (Hummingbird's request
        // body ends with the inbound stream), and a cut body that happened to hold a whole batch was stored while the
        // client was told 400. Failing the stream first makes the body's reader throw: nothing is stored.
        if readingBody {
            readingBody = false
            context.fireErrorCaught(RequestBodyCut())
        }
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let arrived = event as? RequestBytesArrived else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        let beginsRequest = readEndedRequest
        readEndedRequest = false
        readEndsWithEmptyLine = Self.endsWithEmptyLine(arrived.bytes.readableBytesView)
        // Body bytes, or more of a head already being timed: nothing changes.
        guard !readingBody, !readingHead else { return }
        readingHead = true
        startsWithToken = !beginsRequest || Self.startsWithToken(arrived.bytes.readableBytesView)
        headStart = beginsRequest ? arrived.bytes : nil
        // A new connection's header timer runs from its opening; keep it.
        if phase != .header { start(.header, context: context) }
        // HTTP/0.9's request line (`GET /healthz` and the line's end): the parser takes it for a head whose fields
        // follow, and waits for the empty line until `header_timeout`; nothing can follow it that would make it HTTP/1.x.
        // Only with no request open, so that the answer cannot be taken for an earlier request's, and only for a read that
        // begins a request and holds that line alone, as an HTTP/0.9 client sends it.
        if beginsRequest, requestsOpen == 0, !readingBody, Self.isVersionlessRequestLine(arrived.bytes.readableBytesView) {
            metrics?.connectionRefused(.malformed)
            answerAndClose(context: context, status: .httpVersionNotSupported, code: "http_version_not_supported", message: Self.versionAdvice)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head:
            readingHead = false
            startsWithToken = true
            headStart = nil
            readingBody = true
            requestHasBody = false
            requestsOpen += 1
            if requestsOpen == 1 { responseStarted = false }
            start(.body, context: context)
        case .body:
            requestHasBody = true
        case .end:
            readingBody = false
            if phase == .body { stopTiming() }
            // Whatever follows in this read begins another request, whose head is parsed here too unless the read cut it.
            // The read ended with this request if it ends with an empty line; after a body, that is taken to be so.
            readEndedRequest = readEndsWithEmptyLine || requestHasBody
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head(let response):
            // An informational answer (100 Continue) is not the response.
            if response.status.kind != .informational { responseStarted = true }
            context.write(data, promise: promise)
        case .body:
            context.write(data, promise: promise)
        case .end:
            requestsOpen = max(0, requestsOpen - 1)
            responseStarted = false
            context.write(data, promise: promise)
            if requestsOpen == 0, let refusal = refusalAfterOpenRequests {
                // The requests before the refused one are answered: its refusal goes out now, and the connection closes.
                refusalAfterOpenRequests = nil
                writeRefusalAndClose(context: context, status: refusal.status, code: refusal.code, message: refusal.message)
                return
            }
            if requestsOpen == 0, !readingHead, !readingBody, !http2Stream { start(.idle, context: context) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let answer: (HTTPResponse.Status, String, String)?
        switch error {
        case HTTPParserError.closedConnection:
            // Bytes after a request that closes the connection (`Connection: close`, HTTP/1.0): the parser refuses them,
            // but that request was whole and is being answered (a batch may be committed already). Its answer goes out
            // and the connection closes after it, as the request asked; what followed is ignored. A 400 "not valid
            // HTTP" here would be taken for the answer to the committed batch.
            if requestsOpen == 0 { context.close(promise: nil) }
            return
        case HTTPParserError.headerOverflow:
            answer = (
                .init(code: 431, reasonPhrase: "Request Header Fields Too Large"), "request_header_fields_too_large",
                "the request's header section is larger than \(ConnectionLimits.maxHeaderBytes / 1024) KiB or has too many fields; send fewer or shorter headers"
            )
        case HTTPParserError.invalidEOFState where readingBody:
            // The client closed its side before the declared body arrived: a body cut in transit, which the delivery
            // contract treats as transient (the agent sends the same batch again).
            answer = (
                .badRequest, IngestErrorCode.incompleteBody,
                "the request body ended before its declared length (the connection was closed mid-body); send it again"
            )
        case HTTPParserError.invalidMethod where startsWithToken:
            // llhttp knows the registered methods (PROPFIND, QUERY, ... reach the router, which answers them 501) and
            // refuses any other token.
            let refusal = APIError.methodNotImplemented(nil)
            answer = (refusal.status, refusal.code, refusal.message)
        case let error as HTTPParserError where [.paused, .invalidVersion].contains(error) && headStart.map(Self.isHTTP2Preface) == true:
            // llhttp pauses on `PRI * HTTP/2.0` (for a server that would switch to HTTP/2 there): h2c with prior knowledge.
            answer = (
                .httpVersionNotSupported, "http_version_not_supported",
                "this is HTTP/2's connection preface (h2c with prior knowledge); the ingest serves HTTP/2 only over TLS, chosen by ALPN in the handshake: on this connection send HTTP/1.1"
            )
        case HTTPParserError.invalidVersion where headStart.map({ Self.requestLineEndsWithBareLF($0.readableBytesView) }) == true:
            answer = (
                .badRequest, "bad_request",
                "the request line ends with a bare LF; end every line of the head with CRLF (\\r\\n, RFC 9112 §2.2)"
            )
        case HTTPParserError.invalidVersion:
            // HTTP/2.0 and HTTP/0.9 are parsed and refused by NIO (major version not 1); llhttp refuses any other version
            // by the same error, HTTP/1.2 and a malformed one (`HTTP/1.1x`) included, which cannot be told apart here.
            answer = (.httpVersionNotSupported, "http_version_not_supported", Self.versionAdvice)
        case let error as HTTPParserError
        where [.unknown, .invalidContentLength].contains(error) && headStart.map({ Self.hasBothFramings($0.readableBytesView) }) == true:
            // llhttp refuses the pair (by "invalid Transfer-Encoding" or "invalid Content-Length", whichever came second).
            answer = (
                .badRequest, "bad_request",
                "the request has both Content-Length and Transfer-Encoding, two framings of one body that a proxy on the way may read otherwise than the ingest (RFC 9112 §6.3); drop Content-Length and keep Transfer-Encoding: chunked, or send the body with Content-Length alone"
            )
        case let error as HTTPParserError where headStart.map({ Self.hasRepeatedTransferEncoding($0.readableBytesView) }) == true:
            answer = (
                .badRequest, "bad_request",
                "the request has more than one Transfer-Encoding field (\(error)); chunked may be applied once only (RFC 9112 §6.1): send one Transfer-Encoding: chunked"
            )
        case let error as HTTPParserError:
            answer = (.badRequest, "bad_request", "the request is not valid HTTP/1.1 (\(error)); fix the client")
        case let refusal as RequestHeadRefusal:
            answer = (refusal.status, refusal.code, refusal.message)
        case is HTTP1TypeConversionError:
            answer = (.badRequest, "bad_request", "the request's line or headers cannot be represented (an invalid method, path or header); fix the client")
        default:
            answer = nil
        }
        guard let (status, code, message) = answer else {
            context.fireErrorCaught(error)
            return
        }
        // Already answered (an HTTP/0.9 line, refused as it arrived, that the parser then refuses too): counted once.
        if !closing { metrics?.connectionRefused(.malformed) }
        answerAndClose(context: context, status: status, code: code, message: message)
    }

    // MARK: Timers

    private func startFirstRequestTimer(context: ChannelHandlerContext) {
        guard phase == nil, requestsOpen == 0, !closing else { return }
        start(.header, context: context)
    }

    /// Times `phase` from now. A keep-alive request passes through three phases, so this costs no scheduling: it only
    /// moves ``deadline``. The connection's one timer, armed at most ``checkInterval`` ahead, is never later than a new
    /// deadline; when it fires it expires the phase or arms itself again for what is left.
    private func start(_ phase: Phase, context: ChannelHandlerContext) {
        guard !closing else { return }
        self.phase = phase
        let delay = switch phase {
        case .idle: timeouts.idle
        case .header: timeouts.header
        case .body: timeouts.body
        }
        deadline = .now() + delay
        if timer == nil { arm(at: deadline, context: context) }
    }

    /// Nothing is timed (the application's own time); the armed timer, if any, finds that when it fires.
    private func stopTiming() {
        phase = nil
        deadline = .distantFuture
    }

    private func arm(at wanted: NIODeadline, context: ChannelHandlerContext) {
        let fires = min(wanted, .now() + checkInterval)
        let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: fires) { [self] in
            self.timerFired(context: loopBoundContext.value)
        }
    }

    private func disarm() {
        timer?.cancel()
        timer = nil
        stopTiming()
    }

    private func timerFired(context: ChannelHandlerContext) {
        timer = nil
        guard let phase, !closing else { return }
        if deadline > .now() {
            arm(at: deadline, context: context)
        } else {
            expired(phase, context: context)
        }
    }

    private func expired(_ phase: Phase, context: ChannelHandlerContext) {
        stopTiming()
        metrics?.connectionTimedOut(phase)
        switch phase {
        case .idle:
            closing = true
            context.close(promise: nil)
        case .header:
            answerAndClose(
                context: context, status: .requestTimeout, code: "request_timeout",
                message: "the request's headers did not arrive within \(Self.describe(timeouts.header)); send the whole request head at once")
        case .body:
            answerAndClose(
                context: context, status: .requestTimeout, code: "request_timeout",
                message: "the request body did not arrive within \(Self.describe(timeouts.body)) of its headers; send it faster or in smaller batches")
        }
    }

    /// Writes a JSON error and closes, unless an answer is already under way (then it only closes: two answers to one
    /// request would be worse than none).
    private func answerAndClose(context: ChannelHandlerContext, status: HTTPResponse.Status, code: String, message: String) {
        guard !closing else { return }
        closing = true
        disarm()
        // A request after whole ones still being answered (pipelined, the parser refused the next head): its refusal
        // waits for their answers, which come first, in order (RFC 9112 §9.3.2). Written at once, it was taken for
        // the first request's answer, a stored batch's included, and that answer never came.
        if requestsOpen > 0, !readingBody, context.channel.isActive {
            refusalAfterOpenRequests = (status, code, message)
            return
        }
        // No request open and none being read (a head, or nothing yet), or one open whose answer has not started. A body
        // still arriving after its request was answered (a 401 before the body) gets no second answer.
        let canAnswer = (requestsOpen == 0 && !readingBody) || (requestsOpen == 1 && !responseStarted)
        guard canAnswer, context.channel.isActive else {
            context.close(promise: nil)
            return
        }
        writeRefusalAndClose(context: context, status: status, code: code, message: message)
    }

    /// Writes a JSON error answer and closes the connection (the stream, in HTTP/2) once it is out.
    private func writeRefusalAndClose(context: ChannelHandlerContext, status: HTTPResponse.Status, code: String, message: String) {
        guard context.channel.isActive else {
            context.close(promise: nil)
            return
        }
        let body = jsonBuffer(APIErrorBody(code: code, message: message))
        var fields = HTTPFields()
        fields[.contentType] = jsonContentType
        fields[.contentLength] = String(body.readableBytes)
        if !http2Stream { fields[.connection] = "close" }
        context.write(wrapOutboundOut(.head(HTTPResponse(status: status, headerFields: fields))), promise: nil)
        context.write(wrapOutboundOut(.body(body)), promise: nil)
        let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).assumeIsolated().whenComplete { _ in
            loopBoundContext.value.close(promise: nil)
        }
    }

    /// The answer to a request line whose version is not HTTP/1.1 or HTTP/1.0.
    static let versionAdvice =
        "the request line does not end in HTTP/1.1 or HTTP/1.0, the versions the ingest serves on this connection; send HTTP/1.1 (HTTP/2 only over TLS, chosen by ALPN)"

    /// Whether `bytes` begin with HTTP/2's connection preface (RFC 9113 §3.4), as far as its request line.
    static func isHTTP2Preface(_ bytes: ByteBuffer) -> Bool {
        bytes.readableBytesView.starts(with: "PRI * HTTP/2.0".utf8)
    }

    /// Whether `bytes` are a whole request line of a method and a target and no version (HTTP/0.9's `GET /path`), and
    /// nothing after it: a token, one space, and up to the line's end no other space.
    static func isVersionlessRequestLine(_ bytes: ByteBufferView) -> Bool {
        guard let end = bytes.firstIndex(of: UInt8(ascii: "\n")), end == bytes.index(before: bytes.endIndex), startsWithToken(bytes) else {
            return false
        }
        var line = bytes[bytes.startIndex..<end]
        if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
        guard let space = line.firstIndex(of: UInt8(ascii: " ")) else { return false }
        let target = line[line.index(after: space)...]
        return !target.isEmpty && !target.contains(UInt8(ascii: " "))
    }

    /// Whether `bytes` end with an empty line (`\r\n\r\n` or `\n\n`), as a head and a chunked body end.
    static func endsWithEmptyLine(_ bytes: ByteBufferView) -> Bool {
        bytes.reversed().prefix(while: { $0 == UInt8(ascii: "\n") || $0 == UInt8(ascii: "\r") }).count(where: { $0 == UInt8(ascii: "\n") }) >= 2
    }

    /// Whether the header section at the start of `bytes` (up to its empty line, or as far as `bytes` go) has both a
    /// `Content-Length` and a `Transfer-Encoding` field.
    static func hasBothFramings(_ bytes: ByteBufferView) -> Bool {
        let count = framingFields(bytes)
        return count.contentLength > 0 && count.transferEncoding > 0
    }

    /// Whether the head in `bytes` has more than one `Transfer-Encoding` field (llhttp refuses `chunked` twice with an
    /// error it does not name).
    static func hasRepeatedTransferEncoding(_ bytes: ByteBufferView) -> Bool {
        framingFields(bytes).transferEncoding > 1
    }

    /// How many `Content-Length` and `Transfer-Encoding` fields the head in `bytes` has.
    private static func framingFields(_ bytes: ByteBufferView) -> (contentLength: Int, transferEncoding: Int) {
        var contentLength = 0
        var transferEncoding = 0
        // The first line is the request line; each later one a field, until the empty one.
        for line in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).dropFirst() {
            let field = line.last == UInt8(ascii: "\r") ? line.dropLast() : line[...]
            if field.isEmpty { break }
            guard let colon = field.firstIndex(of: UInt8(ascii: ":")) else { continue }
            switch String(decoding: field[..<colon], as: UTF8.self).lowercased() {
            case "content-length": contentLength += 1
            case "transfer-encoding": transferEncoding += 1
            default: break
            }
        }
        return (contentLength, transferEncoding)
    }

    /// Whether the request line in `bytes` ends with a bare LF after an HTTP/1.x version (`GET / HTTP/1.1\n`): llhttp
    /// refuses that as an invalid version, but the version is fine and the line's end is not.
    static func requestLineEndsWithBareLF(_ bytes: ByteBufferView) -> Bool {
        guard let end = bytes.firstIndex(of: UInt8(ascii: "\n")) else { return false }
        let line = bytes[..<end]
        guard line.last != UInt8(ascii: "\r"), line.count > 9 else { return false }
        let version = Array(line.suffix(9))
        return version == Array(" HTTP/1.1".utf8) || version == Array(" HTTP/1.0".utf8)
    }

    /// Whether `bytes` begin with a token (RFC 9110 §5.6.2) and a space, or with a token as far as they or their first
    /// 32 bytes go (a method cut by the end of a read, or longer than any the ingest implements).
    static func startsWithToken(_ bytes: ByteBufferView) -> Bool {
        let start = bytes.prefix(32)
        guard let end = start.firstIndex(where: { !isTokenCharacter($0) }) else { return true }
        return end != start.startIndex && start[end] == UInt8(ascii: " ")
    }

    /// RFC 9110's `tchar`.
    private static func isTokenCharacter(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): true
        default: "!#$%&'*+-.^_`|~".utf8.contains(byte)
        }
    }

    static func describe(_ amount: TimeAmount) -> String {
        let milliseconds = amount.nanoseconds / 1_000_000
        return milliseconds % 1000 == 0 ? "\(milliseconds / 1000) s" : "\(milliseconds) ms"
    }
}
