import HTTPTypes
import NIOCore
import NIOHTTPTypes

/// Puts ``LatestFastPath`` in a connection's HTTP/1.1 pipeline, after ``ConnectionTimeoutHandler`` (which so sees every
/// request and answer, and keeps timing the connection) and before the framework's request loop.
///
/// A candidate request's head is held until its end arrives; then either the fast path answers it (the answer is
/// flushed when the read completes, so pipelined answers leave together) or head and end go on to the router. Answers
/// stay in request order: nothing is answered here while the router still owes an answer on this connection. Nothing
/// is answered here either while the channel is not writable (its outbound buffer over the high-water mark): those
/// requests go to the router, whose request loop applies backpressure, so a client that never reads cannot grow the
/// server's memory.
final class LatestFastPathHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    private let fastPath: LatestFastPath
    /// A candidate head waiting for its end, with its farm segment.
    private var held: (head: HTTPRequest, farm: Substring)?
    private var memo = LatestFastPath.ConnectionMemo()
    /// The peer's address, read once.
    private var client: ClientAddress?
    /// Requests passed to the router whose answer has not ended yet.
    private var routerOwes = 0
    private var needsFlush = false

    init(fastPath: LatestFastPath) {
        self.fastPath = fastPath
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            // Not while the socket is behind: a client that sends reads without reading the answers would otherwise
            // have them all written into memory here; the router's request loop waits for the socket instead.
            if routerOwes == 0, held == nil, context.channel.isWritable, let farm = LatestFastPath.candidate(head) {
                held = (head, farm)
                return
            }
            passHeld(context: context)
            routerOwes += 1
            context.fireChannelRead(data)
        case .body:
            passHeld(context: context)
            context.fireChannelRead(data)
        case .end:
            if let (head, farm) = held {
                let client = self.client ?? ClientAddress(context.channel.remoteAddress)
                self.client = client
                if let (response, body) = fastPath.answer(head, farmName: farm, client: client, memo: &memo) {
                    held = nil
                    context.write(wrapOutboundOut(.head(response)), promise: nil)
                    context.write(wrapOutboundOut(.body(body)), promise: nil)
                    context.write(wrapOutboundOut(.end(nil)), promise: nil)
                    needsFlush = true
                    return
                }
            }
            passHeld(context: context)
            context.fireChannelRead(data)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if needsFlush {
            needsFlush = false
            context.flush()
        }
        context.fireChannelReadComplete()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = unwrapOutboundIn(data) { routerOwes = max(0, routerOwes - 1) }
        context.write(data, promise: promise)
    }

    /// A held head turned out to be the router's (a body part, another head behind it, or an answer the fast path
    /// could not give): pass it on first.
    private func passHeld(context: ChannelHandlerContext) {
        guard let (head, _) = held else { return }
        held = nil
        routerOwes += 1
        context.fireChannelRead(wrapInboundOut(.head(head)))
    }
}
