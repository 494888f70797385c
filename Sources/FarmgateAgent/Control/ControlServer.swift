import CLinux
import FarmgateSupport
import Foundation
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
/// creates mode 0750, and answers one request per connection: a line of JSON in, a line of JSON out. Blocking `accept`
/// and `recv` run on a thread of their own.
public final class ControlServer: Service {
    /// Answers one request with the bytes of a JSON document.
    public typealias Handler = @Sendable (ControlRequest) async -> [UInt8]

    private let path: String
    private let handler: Handler
    private let logger: Logger
    private let stopping = Atomic<Bool>(false)

    public init(path: String, logger: Logger, handler: @escaping Handler) {
        self.path = path
        self.handler = handler
        self.logger = logger
    }

    public func run() async throws {
        let fd = try listen()
        logger.info("Control socket listening", metadata: ["path": "\(path)"])
        let path = self.path
        try await withGracefulShutdownHandler {
            try await withTaskCancellationHandler {
                try await runOffPool(name: "farmgate-control") { [self] in
                    self.acceptLoop(fd)
                    close(fd)
                    unlink(path)
                }
            } onCancel: {
                self.stopping.store(true, ordering: .relaxed)
            }
        } onGracefulShutdown: {
            self.stopping.store(true, ordering: .relaxed)
        }
    }

    private func listen() throws(ControlSocketError) -> Int32 {
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
        if !FileManager.default.fileExists(atPath: directory) {
            do {
                try FileManager.default.createDirectory(
                    atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o750])
            } catch {
                throw ControlSocketError("cannot create the runtime directory \(directory): \(error.localizedDescription)")
            }
        }
        if FileManager.default.fileExists(atPath: path) {
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
        guard Foundation.listen(fd, 16) == 0 else {
            let reason = UnixSocket.errnoText()
            close(fd)
            throw ControlSocketError("cannot listen on \(path): \(reason)")
        }
        return fd
    }

    private func acceptLoop(_ fd: Int32) {
        while !stopping.load(ordering: .relaxed) {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, 200)
            guard ready > 0 else { continue }
            let client = accept(fd, nil, nil)
            guard client >= 0 else { continue }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            serve(client)
            close(client)
        }
    }

    private func serve(_ client: Int32) {
        UnixSocket.setTimeouts(client, seconds: 5)
        guard let line = UnixSocket.readLine(client, limit: 64 << 10) else { return }
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
}

/// The CLI's side of the control socket.
public enum ControlClient {
    /// Sends `request` to the agent listening on `path` and returns its JSON answer. Blocks the calling thread (use it from
    /// the command line, not from the concurrency pool).
    public static func send(_ request: ControlRequest, to path: String, timeoutSeconds: Int = 10) throws -> [UInt8] {
        let fd = try UnixSocket.connect(path, timeoutSeconds: timeoutSeconds)
        defer { close(fd) }
        let body = try JSONEncoder().encode(request)
        guard UnixSocket.writeAll(fd, Array(body) + [0x0A]) else {
            throw ControlSocketError("the agent closed the control socket \(path) before the request was sent")
        }
        guard let answer = UnixSocket.readLine(fd, limit: 16 << 20) else {
            throw ControlSocketError("the agent did not answer on \(path) within \(timeoutSeconds) s")
        }
        return answer
    }
}
