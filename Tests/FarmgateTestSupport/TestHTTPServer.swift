import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A request as the test server received it.
public struct RecordedRequest: Sendable {
    /// Which TCP connection carried it, numbered from 1 in the order they were accepted.
    public var connection: Int
    public var method: String
    public var path: String
    /// Header names in lower case.
    public var headers: [String: String]
    public var body: [UInt8]
    public var receivedAt: ContinuousClock.Instant
    /// The wall-clock time it arrived, for comparing with what a product schedules in wall time (the notification
    /// outbox's send slots): a step of the system clock moves those slots against the monotonic clock.
    public var receivedAtWall: Date = Date()
}

/// What the test server does with one request.
public enum TestResponse: Sendable {
    /// Answers with this status, headers and body (Content-Length is added).
    case reply(Int, headers: [String: String] = [:], body: [UInt8] = [])
    /// Never answers; keeps the connection open until the client gives up (or the server stops).
    case hang
    /// Closes the connection without answering.
    case close
    /// Resets the connection (RST, through SO_LINGER 0) without answering.
    case reset
    /// Sends these bytes, whatever they are (not HTTP: another service on the port), then closes.
    case raw([UInt8])
    /// Waits, then does what the inner response says.
    indirect case delayed(Duration, TestResponse)
    /// Sends the head of `status` announcing a body of a megabyte, then `chunk` bytes of it every `interval` until the
    /// client goes away (or the megabyte is out): an answer whose body trickles, or, with a long interval, never ends.
    case trickle(Int, chunk: Int = 1, every: Duration)

    public static func json(_ status: Int, _ text: String, headers: [String: String] = [:]) -> TestResponse {
        var all = headers
        all["Content-Type"] = "application/json"
        return .reply(status, headers: all, body: Array(text.utf8))
    }
}

/// Shared by the uploader tests and the end-to-end tests (a misbehaving ingest for the real `farmgate` binary).
/// A tiny scriptable HTTP/1.1 server on 127.0.0.1 for tests: blocking POSIX sockets, one thread to accept and one per
/// connection (never the Swift concurrency pool). Keep-alive: a connection serves requests until the client closes it.
///
/// Bytes that do not start like an HTTP request (a TLS ClientHello) get a plain `400` and the connection is closed, as a
/// real plain-HTTP server would do.
public final class TestHTTPServer: Sendable {
    public typealias Handler = @Sendable (_ request: RecordedRequest, _ index: Int) -> TestResponse

    public let port: Int
    private let listener: Int32
    private let handler: Handler
    private let state = Mutex(State())

    private struct State {
        var requests: [RecordedRequest] = []
        var connections = 0
        var openSockets: Set<Int32> = []
        var stopped = false
    }

    /// Starts listening on an ephemeral port of 127.0.0.1. `handler` gets each request and its index (0, 1, ...).
    public init(handler: @escaping Handler) throws {
        self.handler = handler
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestServerError("socket: \(String(cString: strerror(errno)))") }
        var yes: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else {
            close(fd)
            throw TestServerError("bind/listen: \(String(cString: strerror(errno)))")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        port = Int(UInt16(bigEndian: address.sin_port))
        listener = fd
        let thread = Thread { [self] in acceptLoop() }
        thread.name = "test-http-accept"
        thread.start()
    }

    /// A server that answers the `n`th request with `responses[n]`, and every later one with `then`.
    public convenience init(script responses: [TestResponse], then fallback: TestResponse = .reply(500)) throws {
        try self.init { _, index in index < responses.count ? responses[index] : fallback }
    }

    deinit { stop() }

    public var url: String { "http://127.0.0.1:\(port)" }

    public var requests: [RecordedRequest] { state.withLock { $0.requests } }

    /// TCP connections accepted so far.
    public var connectionCount: Int { state.withLock { $0.connections } }

    /// Waits until at least `count` requests arrived, or `timeout` passed. Returns whether they did.
    @discardableResult
    public func waitForRequests(_ count: Int, timeout: Duration = .seconds(10)) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if state.withLock({ $0.requests.count }) >= count { return true }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return state.withLock { $0.requests.count } >= count
    }

    /// Stops accepting and closes every connection.
    public func stop() {
        let sockets = state.withLock { state -> Set<Int32>? in
            guard !state.stopped else { return nil }
            state.stopped = true
            return state.openSockets
        }
        guard let sockets else { return }
        shutdown(listener, Int32(SHUT_RDWR))
        for socket in sockets { shutdown(socket, Int32(SHUT_RDWR)) }
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                break
            }
            let number = state.withLock { state -> Int? in
                guard !state.stopped else { return nil }
                state.connections += 1
                state.openSockets.insert(client)
                return state.connections
            }
            guard let number else {
                close(client)
                break
            }
            let thread = Thread { [self] in serve(client, connection: number) }
            thread.name = "test-http-conn-\(number)"
            thread.start()
        }
        close(listener)
    }

    private func serve(_ socket: Int32, connection: Int) {
        defer {
            state.withLock { _ = $0.openSockets.remove(socket) }
            close(socket)
        }
        var buffer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        func fill() -> Bool {
            let count = chunk.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { return false }
            buffer.append(contentsOf: chunk[0..<count])
            return true
        }
        let terminator: [UInt8] = Array("\r\n\r\n".utf8)
        while true {
            // Head.
            var headEnd: Int?
            while headEnd == nil {
                if let first = buffer.first, !(UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(first) {
                    send(socket, Array("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".utf8))
                    return
                }
                headEnd = buffer.firstRange(of: terminator)?.upperBound
                if headEnd == nil, !fill() { return }
            }
            guard let headEnd else { return }
            let head = String(decoding: buffer[..<headEnd], as: UTF8.self)
            var lines = head.components(separatedBy: "\r\n").filter { !$0.isEmpty }
            guard !lines.isEmpty else { return }
            let requestLine = lines.removeFirst().split(separator: " ").map(String.init)
            guard requestLine.count >= 2 else { return }
            var headers: [String: String] = [:]
            for line in lines {
                guard let colon = line.firstIndex(of: ":") else { continue }
                headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
            let length = Int(headers["content-length"] ?? "0") ?? 0
            while buffer.count < headEnd + length {
                if !fill() { return }
            }
            let body = Array(buffer[headEnd..<(headEnd + length)])
            buffer.removeFirst(headEnd + length)
            let request = RecordedRequest(
                connection: connection, method: requestLine[0], path: requestLine[1], headers: headers, body: body,
                receivedAt: .now, receivedAtWall: Date())
            let index = state.withLock { state -> Int in
                state.requests.append(request)
                return state.requests.count - 1
            }
            var response = handler(request, index)
            while case .delayed(let pause, let inner) = response {
                let (seconds, attoseconds) = pause.components
                Thread.sleep(forTimeInterval: Double(seconds) + Double(attoseconds) / 1e18)
                response = inner
            }
            switch response {
            case .delayed:
                return
            case .reply(let status, let extra, let body):
                var text = "HTTP/1.1 \(status) \(Self.reason(status))\r\nContent-Length: \(body.count)\r\n"
                for (name, value) in extra.sorted(by: { $0.key < $1.key }) { text += "\(name): \(value)\r\n" }
                text += "\r\n"
                guard send(socket, Array(text.utf8) + body) else { return }
            case .hang:
                while fill() {}
                return
            case .close:
                return
            case .raw(let bytes):
                _ = send(socket, bytes)
                return
            case .reset:
                var linger = linger(l_onoff: 1, l_linger: 0)
                setsockopt(socket, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<linger>.size))
                return
            case .trickle(let status, let chunk, let interval):
                let length = 1 << 20
                guard send(socket, Array("HTTP/1.1 \(status) \(Self.reason(status))\r\nContent-Length: \(length)\r\n\r\n".utf8)) else { return }
                var sent = 0
                while sent < length {
                    let count = max(1, min(chunk, length - sent))
                    guard send(socket, [UInt8](repeating: UInt8(ascii: "x"), count: count)) else { return }
                    sent += count
                    guard clientStays(socket, for: interval) else { return }
                }
                return
            }
        }
    }

    /// Waits `interval` unless the client closes the connection (or the server stops) first; returns whether it is
    /// still there.
    private func clientStays(_ socket: Int32, for interval: Duration) -> Bool {
        let deadline = ContinuousClock.now + interval
        while ContinuousClock.now < deadline {
            let left = deadline - ContinuousClock.now
            var descriptor = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, Int32(min(1000, max(1, left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))))
            if ready < 0, errno != EINTR { return false }
            if ready > 0 {
                var byte: UInt8 = 0
                if recv(socket, &byte, 1, Int32(MSG_PEEK)) <= 0 { return false }
                // The client sent something (it should not): leave it unread and keep waiting.
                Thread.sleep(forTimeInterval: 0.01)
            }
        }
        return true
    }

    @discardableResult
    private func send(_ socket: Int32, _ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes[offset...].withUnsafeBytes { Glibc.send(socket, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard sent > 0 else { return false }
            offset += sent
        }
        return true
    }

    private static func reason(_ status: Int) -> String {
        switch status {
        case 200: "OK"
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 403: "Forbidden"
        case 413: "Content Too Large"
        case 415: "Unsupported Media Type"
        case 422: "Unprocessable Content"
        case 429: "Too Many Requests"
        case 500: "Internal Server Error"
        case 502: "Bad Gateway"
        case 503: "Service Unavailable"
        default: "Status"
        }
    }
}

public struct TestServerError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
