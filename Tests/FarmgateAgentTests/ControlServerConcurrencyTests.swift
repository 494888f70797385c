import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Logging
import Testing

@testable import FarmgateAgent

#if canImport(Glibc)
import Glibc
#endif

/// The control server with real Unix sockets: concurrent clients, a silent client dropped after its timeout, a bounded number
/// of clients, and a prompt shutdown. (An extension of ``ControlSocketTests`` so that it runs in the timed pass of `make test`.)
extension ControlSocketTests {
    /// A running server on a fresh socket path; `slow` requests take two seconds to answer.
    struct Running {
        let scratch: Scratch
        let path: String
        let task: Task<Void, any Error>

        init(maximumClients: Int = 8, clientTimeout: Duration = .seconds(1)) async throws {
            scratch = try Scratch(prefix: "fg-ctl", in: URL(fileURLWithPath: "/tmp"))
            let path = scratch.file("control.sock")
            self.path = path
            let server = ControlServer(
                path: path, logger: Logger(label: "test.control"), maximumClients: maximumClients, clientTimeout: clientTimeout
            ) { request in
                if request.command == "slow" { try? await Task.sleep(for: .seconds(2)) }
                return Array("{\"ok\":true,\"error\":\"\(request.command)\"}".utf8)
            }
            task = Task { try await server.run() }
            let up = await eventually(timeout: .seconds(10), every: .milliseconds(20)) {
                (try? await Self.request("ping", path: path)) != nil
            }
            #expect(up, "the control server did not come up")
        }

        static func request(_ command: String, path: String) async throws -> String {
            try await runOffPool(name: "test-control-client") {
                String(decoding: try ControlClient.send(ControlRequest(command: command), to: path, timeoutSeconds: 10), as: UTF8.self)
            }
        }

        /// Connects and sends nothing; returns the descriptor (the caller closes it).
        func silentClient() throws -> Int32 {
            try UnixSocket.connect(path, timeoutSeconds: 10)
        }
    }

    /// Seconds until `fd` reads end of stream (the server dropped it), measured on a thread of its own; nil if it never did.
    static func secondsUntilClosed(_ fd: Int32) async throws -> Double? {
        try await runOffPool(name: "test-silent-client") {
            let start = ContinuousClock.now
            var byte: UInt8 = 0
            let n = recv(fd, &byte, 1, 0)  // SO_RCVTIMEO 10 s from connect
            return n == 0 ? (ContinuousClock.now - start) / .seconds(1) : nil
        }
    }

    @Test("A client that says nothing does not delay a concurrent status, and is dropped after the timeout")
    func silentClientDoesNotBlock() async throws {
        let server = try await Running(clientTimeout: .seconds(1))
        let silent = try server.silentClient()
        defer { close(silent) }
        let closed = Task { try await Self.secondsUntilClosed(silent) }

        let clock = ContinuousClock()
        let start = clock.now
        let answer = try await Running.request("status", path: server.path)
        let elapsed = start.duration(to: clock.now)
        #expect(answer == #"{"ok":true,"error":"status"}"#)
        #expect(elapsed < .seconds(1), "status took \(elapsed) next to a silent client")

        let dropped = try await closed.value
        #expect(dropped != nil, "the silent client was never dropped")
        #expect((dropped ?? 99) < 5, "the silent client was dropped after \(String(describing: dropped)) s, timeout 1 s")
        server.task.cancel()
        _ = try? await server.task.value
    }

    @Test("A slow request does not delay a concurrent one")
    func slowRequestDoesNotBlock() async throws {
        let server = try await Running()
        let path = server.path
        let slow = Task { try await Running.request("slow", path: path) }
        try await Task.sleep(for: .milliseconds(200))
        let clock = ContinuousClock()
        let start = clock.now
        #expect(try await Running.request("status", path: server.path) == #"{"ok":true,"error":"status"}"#)
        #expect(start.duration(to: clock.now) < .seconds(1))
        #expect(try await slow.value == #"{"ok":true,"error":"slow"}"#)
        server.task.cancel()
        _ = try? await server.task.value
    }

    @Test("Past the maximum number of clients a new one is told the agent is busy, at once")
    func boundedClients() async throws {
        let server = try await Running(maximumClients: 2, clientTimeout: .seconds(3))
        // The start-up ping's thread must be done before two silent clients take both places.
        try await Task.sleep(for: .milliseconds(300))
        let first = try server.silentClient()
        let second = try server.silentClient()
        defer {
            close(first)
            close(second)
        }
        try await Task.sleep(for: .milliseconds(200))  // both admitted
        let answer = try await Running.request("status", path: server.path)
        #expect(answer.contains("\"ok\":false") && answer.contains("already serving 2 control clients"), "\(answer)")
        // Once the silent ones time out, clients are served again.
        let served = await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            (try? await Running.request("status", path: server.path)) == #"{"ok":true,"error":"status"}"#
        }
        #expect(served)
        server.task.cancel()
        _ = try? await server.task.value
    }

    @Test("Shutdown is prompt with a silent client connected, and removes the socket")
    func promptShutdown() async throws {
        let server = try await Running(clientTimeout: .seconds(30))
        let silent = try server.silentClient()
        defer { close(silent) }
        try await Task.sleep(for: .milliseconds(200))
        let clock = ContinuousClock()
        let start = clock.now
        server.task.cancel()
        _ = try? await server.task.value
        let elapsed = start.duration(to: clock.now)
        #expect(elapsed < .seconds(1), "shutdown took \(elapsed)")
        #expect(!FileManager.default.fileExists(atPath: server.path))
        // The silent client was woken and closed too, long before its 30 s timeout.
        #expect(try await Self.secondsUntilClosed(silent) != nil)
    }
}
