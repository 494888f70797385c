import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A plain blocking TCP connection to 127.0.0.1, for tests that must send what no HTTP client would (a malformed head,
/// a head one byte a second, thousands of idle connections). Every call blocks: use it from a thread of its own
/// (`runOffPool`), never from the concurrency pool.
public final class RawConnection: @unchecked Sendable {
    // @unchecked: the descriptor is only used by the one thread that runs a test step at a time.
    public let fd: Int32

    /// Connects to `127.0.0.1:port`.
    public init(port: Int) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EMFILE) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else {
            let code = errno
            close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: code) ?? .ECONNREFUSED)
        }
        self.fd = fd
    }

    /// Sends all of `bytes`; false when the connection is gone.
    @discardableResult
    public func send(_ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if sent <= 0 { return false }
            offset += sent
        }
        return true
    }

    @discardableResult
    public func send(_ text: String) -> Bool { send(Array(text.utf8)) }

    /// Reads until the server closes the connection or `timeout` passes; returns what arrived and whether it was closed.
    public func readUntilClosed(timeout: Duration) -> (bytes: [UInt8], closed: Bool) {
        let deadline = ContinuousClock.now + timeout
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16_384)
        while true {
            let left = ContinuousClock.now.duration(to: deadline)
            guard left > .zero else { return (received, false) }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let milliseconds = Int32(max(1, left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
            let ready = poll(&poller, 1, milliseconds)
            if ready < 0 {
                if errno == EINTR { continue }
                return (received, true)
            }
            if ready == 0 { continue }
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { return (received, true) }
            received += buffer[0..<count]
        }
    }

    /// Reads one HTTP/1.1 response with a `Content-Length` (what the ingest always sends); nil on close or timeout.
    public func readResponse(timeout: Duration) -> (status: Int, head: String, body: [UInt8])? {
        readResponses(1, timeout: timeout).first
    }

    /// Why the last ``readResponses(_:timeout:)`` returned fewer answers than asked: the server's close, a failed read
    /// (with its `errno`), or the time running out; for a failing test's message.
    public private(set) var shortReadReason = ""

    /// Reads `count` HTTP/1.1 responses with a `Content-Length` that arrive back to back (answers to pipelined
    /// requests), in order; fewer when the connection closes or the time runs out (``shortReadReason`` says which).
    public func readResponses(_ count: Int, timeout: Duration) -> [(status: Int, head: String, body: [UInt8])] {
        let start = ContinuousClock.now
        let deadline = start + timeout
        shortReadReason = ""
        var received: [UInt8] = []
        func short(_ reason: String) -> String {
            "\(reason) after \(start.duration(to: .now)), \(received.count) bytes of a partial answer held"
        }
        var responses: [(status: Int, head: String, body: [UInt8])] = []
        var buffer = [UInt8](repeating: 0, count: 16_384)
        let separator: [UInt8] = Array("\r\n\r\n".utf8)
        while ContinuousClock.now < deadline {
            while responses.count < count, let end = received.firstRange(of: separator) {
                let head = String(decoding: received[..<end.lowerBound], as: UTF8.self)
                let length = head.split(separator: "\r\n").compactMap { line -> Int? in
                    let parts = line.split(separator: ":", maxSplits: 1)
                    guard parts.count == 2, parts[0].lowercased() == "content-length" else { return nil }
                    return Int(parts[1].trimmingCharacters(in: .whitespaces))
                }.first ?? 0
                guard received.count - end.upperBound >= length else { break }
                let status = head.split(separator: " ").dropFirst().first.flatMap { Int($0) } ?? 0
                responses.append((status, head, Array(received[end.upperBound..<(end.upperBound + length)])))
                received.removeFirst(end.upperBound + length)
            }
            if responses.count == count { return responses }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 50) >= 0 || errno == EINTR else {
                shortReadReason = short("poll failed (errno \(errno))")
                return responses
            }
            if poller.revents == 0 { continue }
            let read = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if read < 0, errno == EINTR { continue }
            if read <= 0 {
                shortReadReason = short(read == 0 ? "closed by the server" : "read failed (errno \(errno), revents \(poller.revents))")
                return responses
            }
            received += buffer[0..<read]
        }
        shortReadReason = short("timed out")
        return responses
    }

    public private(set) var drained: [UInt8] = []

    /// Whether the server has closed the connection, checked without waiting; what it sent before is kept in ``drained``.
    public func checkClosed() -> Bool {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if count > 0 {
                drained += buffer[0..<count]
                continue
            }
            if count == 0 { return true }
            return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR
        }
    }

    deinit { close(fd) }
}

/// Raises this process's soft limit on open files to its hard limit (children inherit it); returns the new soft limit.
@discardableResult
public func raiseOpenFileLimit() -> Int {
    var limit = rlimit()
    let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
    guard getrlimit(resource, &limit) == 0 else { return 0 }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(resource, &limit)
        _ = getrlimit(resource, &limit)
    }
    return limit.rlim_cur == rlim_t.max ? Int.max : Int(limit.rlim_cur)
}
