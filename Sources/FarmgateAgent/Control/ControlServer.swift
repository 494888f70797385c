import CLinux
import FarmgateSupport
import Dispatch
#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import ServiceLifecycle
import Synchronization

/// A request on the control socket: one line of JSON, `{"command": "status"}`.
public struct ControlRequest: Codable, Sendable, Hashable {
    public var command: String
    public var arguments: [String: String]?

    public init(command: String, arguments: [String: String]? = nil) {
        self.command = command
        self.arguments = arguments
    }
}

/// The daemon's side of the control socket that the installer's CLI talks to.
///
/// The socket lives under the runtime directory, is created mode 0660 (owner and group only) in a directory the agent
/// creates mode 0750, and answers one request per connection: a line of JSON in, a line of JSON out.
///
/// Clients are served concurrently, each on a thread of its own (never on the concurrency pool: `recv` and `send` block), at
/// most ``maximumClients`` at once; a client past that gets a one-line "busy" answer at once rather than waiting. A client
/// that has not sent its whole request line within ``clientTimeout`` is dropped, so a stuck `farmgate status` never holds
/// up the next one. The accepting thread sleeps in `poll` on the socket and on a pipe that shutdown writes to: it wakes for
/// a client or for shutdown, never on a timer. Shutdown also wakes every client thread (`shutdown(2)` on its socket) and
/// waits for them briefly.
public final class ControlServer: Service {
    /// Answers one request with the bytes of a JSON document.
    public typealias Handler = @Sendable (ControlRequest) async -> [UInt8]

    /// The most clients served at once.
    public let maximumClients: Int
    /// How long a client has to send its request line.
    public let clientTimeout: Duration

    private let path: String
    private let handler: Handler
    private let logger: Logger
    private let clients = ClientSet()

    /// - Parameters:
    ///   - path: the socket's path.
    ///   - maximumClients: the most clients served at once (default 8); more get a "busy" answer.
    ///   - clientTimeout: how long a client may take to send its request (default 5 s).
    ///   - handler: answers a request; runs on the concurrency pool while the client's thread waits for it.
    public init(
        path: String, logger: Logger, maximumClients: Int = 8, clientTimeout: Duration = .seconds(5), handler: @escaping Handler
    ) {
        self.path = path
        self.handler = handler
        self.logger = logger
        self.maximumClients = max(1, maximumClients)
        self.clientTimeout = clientTimeout
    }

    /// The file beside the buffer that names the socket the running agent answers on.
    public static func socketPointer(forBuffer bufferPath: String) -> String { bufferPath + ".control" }

    /// Writes `socket` to the pointer file unless it holds it already (a start or reload writes it at most once; not
    /// synced: it is a hint for `farmgate status`, read again at every start). Failures only lose the hint. Blocking.
    public static func recordSocket(_ socket: String, at pointer: String) {
        if (try? FileSystem.text(pointer, limit: 8192)) == socket + "\n" { return }
        try? DurableFile.replace(pointer, with: Array((socket + "\n").utf8), temporary: pointer + ".tmp", mode: 0o644, durably: false)
    }

    /// The socket the pointer file beside `bufferPath` names, if any. Blocking.
    public static func recordedSocket(forBuffer bufferPath: String) -> String? {
        guard let text = try? FileSystem.text(socketPointer(forBuffer: bufferPath), limit: 8192) else { return nil }
        let path = text.trimmingWhitespace()
        return path.hasPrefix("/") ? path : nil
    }

    public func run() async throws {
        let fd = try listen()
        let wake = try WakePipe()
        logger.info("Control socket listening", metadata: ["path": "\(path)"])
        let path = self.path
        let clients = self.clients
        try await withGracefulShutdownHandler {
            try await withTaskCancellationHandler {
                try await runOffPool(name: "farmgate-control") { [self] in
                    self.acceptLoop(fd, wake: wake.readEnd)
                    close(fd)
                    unlink(path)
                    clients.stop()
                    wake.close()
                    if !clients.waitUntilIdle(timeout: .seconds(2)) {
                        self.logger.warning("Control socket clients still running at shutdown; leaving them")
                    }
                }
            } onCancel: {
                clients.stop()
                wake.signal()
            }
        } onGracefulShutdown: {
            clients.stop()
            wake.signal()
        }
    }

    private func listen() throws(ControlSocketError) -> Int32 {
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
        if !FileSystem.isDirectory(directory) {
            do {
                try FileSystem.createDirectories(directory, mode: 0o750)
                // 0750 whatever the umask (the unit's UMask=0077 made it 0700): the group may reach the socket.
                chmod(directory, 0o750)
            } catch {
                throw ControlSocketError("cannot create the runtime directory \(directory): \(error.reason)")
            }
        }
        // Only a socket is ever replaced: whatever else is at the path (a file, a link, a directory) is someone's, and stays.
        var info = stat()
        if lstat(path, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFSOCK else {
                throw ControlSocketError(
                    "\(path) exists and is not a socket (it is \(FileSystem.kind(of: info.st_mode))); the agent creates its control socket "
                        + "there and leaves that file alone: set [control] socket to a path of its own, or move the file away")
            }
            if let fd = try? UnixSocket.connect(path, timeoutSeconds: 1) {
                close(fd)
                throw ControlSocketError("another farmgate agent is already running (it answers on \(path)); stop it first")
            }
            unlink(path)  // stale: left by an agent that was killed
        }
        var address = try UnixSocket.address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ControlSocketError("cannot create the control socket: \(UnixSocket.errnoText())") }
        let previousMask = umask(0o117)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(previousMask)
        guard rc == 0 else {
            let reason = UnixSocket.errnoText()
            close(fd)
            throw ControlSocketError("cannot bind the control socket \(path): \(reason)")
        }
        chmod(path, 0o660)
        guard Glibc.listen(fd, 16) == 0 else {
            let reason = UnixSocket.errnoText()
            close(fd)
            throw ControlSocketError("cannot listen on \(path): \(reason)")
        }
        return fd
    }

    /// Sleeps in `poll` until a client connects or the wake pipe is written (shutdown); no timeout, no polling.
    private func acceptLoop(_ fd: Int32, wake: Int32) {
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
        while true {
            fds[0].revents = 0
            fds[1].revents = 0
            let ready = poll(&fds, 2, -1)
            if ready < 0 {
                if errno == EINTR { continue }
                logger.error("Control socket poll failed; the control socket stops", metadata: ["error": "\(UnixSocket.errnoText())"])
                return
            }
            if fds[1].revents != 0 { return }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let client = accept(fd, nil, nil)
            guard client >= 0 else {
                // Out of descriptors: the pending connection stays readable, so pause rather than spin on it.
                if errno == EMFILE || errno == ENFILE {
                    logger.warning("Control socket cannot accept a client: too many open files", metadata: ["error": "\(UnixSocket.errnoText())"])
                    usleep(100_000)
                }
                continue
            }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            UnixSocket.setTimeouts(client, seconds: 2)  // for the answer's send; the request's read has its own deadline
            switch clients.admit(client, maximum: maximumClients) {
            case .admitted:
                let started = startOSThread(name: "farmgate-control-client", stackSize: 512 << 10) { [self] in
                    self.serve(client)
                    self.clients.finish(client)
                }
                if !started {
                    logger.warning("Control socket cannot start a thread for a client; closing it")
                    clients.finish(client)
                }
            case .busy:
                let answer = ControlAnswer(
                    ok: false, error: "the agent is already serving \(maximumClients) control clients; try again in a few seconds")
                _ = UnixSocket.writeAll(client, Self.encode(answer) + [0x0A])
                close(client)
            case .stopping:
                close(client)
            }
        }
    }

    private func serve(_ client: Int32) {
        let deadline = ContinuousClock.now + clientTimeout
        guard let line = UnixSocket.readLine(client, limit: 64 << 10, deadline: deadline) else { return }
        let response: [UInt8]
        if let request = try? JSONDecoder().decode(ControlRequest.self, from: Data(line)) {
            let done = DispatchSemaphore(value: 0)
            let slot = Mutex<[UInt8]>([])
            let handler = self.handler
            Task {
                let bytes = await handler(request)
                slot.withLock { $0 = bytes }
                done.signal()
            }
            done.wait()
            response = slot.withLock { $0 }
        } else {
            response = Array(#"{"ok":false,"error":"not a control request: send one line of JSON such as {\"command\":\"status\"}"}"#.utf8)
        }
        _ = UnixSocket.writeAll(client, response + [0x0A])
    }

    /// The JSON of `answer` (sorted keys, slashes unescaped), or a fixed error when it cannot be encoded.
    public static func encode<T: Encodable>(_ answer: T) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? Array(encoder.encode(answer))) ?? Array(#"{"ok":false,"error":"cannot encode the answer"}"#.utf8)
    }
}

/// The clients being served: admitted up to a maximum, woken (`shutdown(2)`) and no longer admitted once stopping.
private final class ClientSet: Sendable {
    enum Admission { case admitted, busy, stopping }

    private struct State {
        var active: Set<Int32> = []
        var stopping = false
    }

    private let state = Mutex(State())
    private let idle = DispatchGroup()

    func admit(_ fd: Int32, maximum: Int) -> Admission {
        let admission: Admission = state.withLock { state in
            if state.stopping { return .stopping }
            guard state.active.count < maximum else { return .busy }
            state.active.insert(fd)
            return .admitted
        }
        if admission == .admitted { idle.enter() }
        return admission
    }

    /// Called by a client's thread when it is done: forgets the socket and closes it (under the lock, so that ``stop()``
    /// never shuts down a descriptor number that was closed and reused).
    func finish(_ fd: Int32) {
        state.withLock { state in
            state.active.remove(fd)
            close(fd)
        }
        idle.leave()
    }

    /// Admits no more clients and wakes those being served: their blocked `recv` returns at once.
    func stop() {
        state.withLock { state in
            state.stopping = true
            for fd in state.active { shutdown(fd, Int32(SHUT_RDWR)) }
        }
    }

    /// Waits (blocking) until every admitted client has finished, at most `timeout`. Returns whether they all did.
    func waitUntilIdle(timeout: Duration) -> Bool {
        idle.wait(timeout: .now() + .milliseconds(Int(timeout / .milliseconds(1)))) == .success
    }
}

/// A pipe whose write end wakes the accepting thread's `poll`. Writes after ``close()`` are ignored, so a late shutdown
/// signal never writes to a descriptor number that was reused.
private final class WakePipe: Sendable {
    private let fds: Mutex<(read: Int32, write: Int32)?>
    let readEnd: Int32

    init() throws(ControlSocketError) {
        var pair: [Int32] = [-1, -1]
        guard pipe(&pair) == 0 else {
            throw ControlSocketError("cannot create the control socket's wake pipe: \(UnixSocket.errnoText())")
        }
        for fd in pair {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        }
        fds = Mutex((pair[0], pair[1]))
        readEnd = pair[0]
    }

    func signal() {
        fds.withLock { fds in
            guard let fds else { return }
            var byte: UInt8 = 1
            _ = write(fds.write, &byte, 1)  // a full pipe (EAGAIN) is already readable: nothing to add
        }
    }

    func close() {
        fds.withLock { fds in
            guard let pair = fds else { return }
            _ = Glibc.close(pair.read)
            _ = Glibc.close(pair.write)
            fds = nil
        }
    }

    deinit { close() }
}

/// The CLI's side of the control socket.
public enum ControlClient {
    /// How long the installer's commands wait for the agent's socket to come back (a reload closes and reopens it).
    public static let cliSettling: Duration = .seconds(3)

    /// Sends `request` to the agent listening on `path` and returns its JSON answer. Blocks the calling thread (use it from
    /// the command line, not from the concurrency pool).
    ///
    /// - Parameters:
    ///   - timeoutSeconds: how long connecting and sending may wait, and the whole answer. A request that makes the
    ///     agent work for long (a requeue of the whole quarantine) needs a longer one.
    ///   - settling: how long to wait for a socket that is missing or refuses (an agent reloading its configuration
    ///     opens it again within a moment) before saying the agent is not running: ``cliSettling`` for the commands an
    ///     installer runs; zero (the default) for callers that poll or run on the concurrency pool.
    /// - Throws: ``ControlSocketError``, with ``ControlSocketError/unanswered`` when the request was sent but no answer came.
    public static func send(_ request: ControlRequest, to path: String, timeoutSeconds: Int = 10, settling: Duration = .zero) throws -> [UInt8] {
        let fd = try UnixSocket.connect(path, timeoutSeconds: timeoutSeconds, settling: settling)
        defer { close(fd) }
        let body = try JSONEncoder().encode(request)
        // An agent serving its maximum of clients answers "busy" and closes without reading: the send may then fail
        // while that answer is waiting to be read, so read whatever came back before deciding.
        let sent = UnixSocket.writeAll(fd, Array(body) + [0x0A])
        let asked = ContinuousClock.now
        // The whole answer within the timeout, however slowly its bytes trickle: a peer writing a byte every few seconds
        // (a wedged or foreign process on the socket) held `status`, `reload` and the rest for ever.
        guard let answer = UnixSocket.readLine(fd, limit: 16 << 20, deadline: asked + .seconds(timeoutSeconds)) else {
            guard sent else { throw ControlSocketError("the agent closed the control socket \(path) before the request was sent") }
            // A connection closed well before the timeout is the agent going away.
            if asked.duration(to: .now) < .seconds(timeoutSeconds) - .milliseconds(500) {
                throw ControlSocketError(
                    "the agent closed the control socket \(path) without answering (did it stop? `journalctl -u farmgate` says)",
                    unanswered: true)
            }
            throw ControlSocketError("the agent did not answer on \(path) within \(timeoutSeconds) s", unanswered: true)
        }
        return answer
    }
}
