#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization

/// Plays systemd's side of `$NOTIFY_SOCKET`: a bound `AF_UNIX` datagram socket (a path, or an abstract `@name`) whose
/// messages a thread of its own records with the time they arrived.
public final class NotifyListener: Sendable {
    public struct Message: Sendable {
        public var fields: [String]
        public var at: ContinuousClock.Instant
    }

    /// What to put in `$NOTIFY_SOCKET`.
    public let address: String
    private let fd: Int32
    private let messages = Mutex<[Message]>([])
    private let stopped = Mutex(false)
    private let done = DispatchSemaphore(value: 0)

    public init(address: String) throws {
        self.address = address
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw NotifyListenerError("socket: \(errno)") }
        var sun = sockaddr_un()
        sun.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(address.utf8)
        let abstract = bytes.first == UInt8(ascii: "@")
        if abstract { bytes[0] = 0 }
        withUnsafeMutableBytes(of: &sun.sun_path) { $0.copyBytes(from: bytes) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + (abstract ? 0 : 1))
        let bound = withUnsafePointer(to: &sun) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0 else {
            close(fd)
            throw NotifyListenerError("bind \(address): \(errno)")
        }
        var timeout = timeval(tv_sec: 0, tv_usec: 100_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let thread = Thread { [self] in receive() }
        thread.start()
    }

    private func receive() {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !stopped.withLock({ $0 }) {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { continue }
            let text = String(decoding: buffer[..<count], as: UTF8.self)
            let message = Message(fields: text.split(separator: "\n").map(String.init), at: .now)
            messages.withLock { $0.append(message) }
        }
        done.signal()
    }

    public var received: [Message] { messages.withLock { $0 } }

    /// The messages holding a field that starts with `prefix` (`READY=1`, `STATUS=`, `WATCHDOG=1`).
    public func messages(with prefix: String) -> [Message] {
        received.filter { $0.fields.contains { $0.hasPrefix(prefix) } }
    }

    /// Every `STATUS=` text received, in order.
    public var statusLines: [String] {
        received.flatMap { $0.fields.filter { $0.hasPrefix("STATUS=") }.map { String($0.dropFirst("STATUS=".count)) } }
    }

    public func stop() {
        stopped.withLock { $0 = true }
        done.wait()
        close(fd)
        if !address.hasPrefix("@") { unlink(address) }
    }
}

public struct NotifyListenerError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
