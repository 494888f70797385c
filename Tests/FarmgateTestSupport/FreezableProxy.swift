import NIOCore
import NIOPosix
import Synchronization

/// A Unix-socket forwarder for tests that can be frozen: while frozen it forwards no byte in either direction on any
/// connection and accepts no new one (they wait in the listen backlog, as a client's connect succeeds), yet closes
/// nothing. What a half-open TCP connection looks like to both ends (a NAT or firewall that dropped its state, a peer that
/// vanished without a reset), and what a `socat` stopped with SIGSTOP does. ``thaw()`` carries on where it stopped.
///
/// Runs on NIO's event loops (no blocking call on the concurrency pool); a frozen channel simply stops reading
/// (`autoRead` off), so the kernel buffers fill and the writers' sends then wait, as on a dead network path.
public final class FreezableProxy: Sendable {
    /// The socket clients connect to.
    public let path: String
    private let server: any Channel
    private let shared: Shared

    private final class Shared: Sendable {
        struct State {
            var frozen = false
            var channels: [any Channel] = []
            var accepted = 0
        }
        let state = Mutex(State())
    }

    /// Listens on `path` (a socket file, under 108 bytes) and forwards each connection to the socket `target`.
    public init(listeningAt path: String, forwardingTo target: String) async throws {
        self.path = path
        let shared = Shared()
        self.shared = shared
        server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { inbound in
                ClientBootstrap(group: inbound.eventLoop)
                    .channelInitializer { outbound in
                        outbound.eventLoop.makeCompletedFuture { try outbound.pipeline.syncOperations.addHandler(Forward(to: inbound)) }
                    }
                    .connect(unixDomainSocketPath: target)
                    .flatMapThrowing { outbound in
                        // Both channels are on the inbound's event loop: set up synchronously, before either reads.
                        try inbound.pipeline.syncOperations.addHandler(Forward(to: outbound))
                        let frozen = shared.state.withLock { state in
                            state.channels += [inbound, outbound]
                            state.accepted += 1
                            return state.frozen
                        }
                        if frozen {
                            try inbound.syncOptions?.setOption(.autoRead, value: false)
                            try outbound.syncOptions?.setOption(.autoRead, value: false)
                        }
                    }
            }
            .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
    }

    /// The connections accepted so far.
    public var accepted: Int { shared.state.withLock { $0.accepted } }

    /// Stops forwarding and accepting; returns once no channel reads any more.
    public func freeze() async {
        let channels = shared.state.withLock { state in
            state.frozen = true
            return state.channels.filter(\.isActive)
        }
        for channel in [server] + channels { try? await channel.setOption(.autoRead, value: false).get() }
    }

    /// Forwards and accepts again.
    public func thaw() async {
        let channels = shared.state.withLock { state in
            state.frozen = false
            return state.channels.filter(\.isActive)
        }
        for channel in [server] + channels { try? await channel.setOption(.autoRead, value: true).get() }
    }

    /// Closes the listening socket and every connection.
    public func stop() async {
        let channels = shared.state.withLock { state in
            defer { state.channels = [] }
            return state.channels
        }
        try? await server.close().get()
        for channel in channels { try? await channel.close().get() }
    }

    /// Writes what one side reads to the other; closes the other when one side closes.
    private final class Forward: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let partner: any Channel

        init(to partner: any Channel) { self.partner = partner }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            partner.writeAndFlush(unwrapInboundIn(data), promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            partner.close(promise: nil)
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }
    }
}
