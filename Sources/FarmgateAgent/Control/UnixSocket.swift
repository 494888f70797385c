import CLinux
import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Errors from the control socket, phrased for an installer.
public struct ControlSocketError: Error, CustomStringConvertible, Sendable {
    public let description: String
    /// The agent took the request but gave no answer in time: it may still be working on it.
    public let unanswered: Bool

    public init(_ description: String, unanswered: Bool = false) {
        self.description = description
        self.unanswered = unanswered
    }
}

/// Thin helpers over AF_UNIX stream sockets (blocking calls: only ever used on a dedicated thread or in the CLI).
enum UnixSocket {
    static func address(_ path: String) throws(ControlSocketError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else {
            throw ControlSocketError("control socket path must be 1 to \(capacity - 1) bytes: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, byte) in bytes.enumerated() { raw[i] = byte }
            raw[bytes.count] = 0
        }
        return address
    }

    static func errnoText() -> String { String(cString: strerror(errno)) }

    /// Connects to `path`; throws with the reason (ENOENT, ECONNREFUSED, EACCES) spelled out.
    ///
    /// - Parameter settling: how long to keep trying while there is no socket or nobody listens on it (every 100 ms):
    ///   an agent reloading its configuration (SIGHUP) closes its control socket and opens it again, and a command
    ///   run in between should wait for it rather than say the agent is not running.
    static func connect(_ path: String, timeoutSeconds: Int, settling: Duration = .zero) throws(ControlSocketError) -> Int32 {
        let deadline = ContinuousClock.now + settling
        while true {
            do {
                return try connectOnce(path, timeoutSeconds: timeoutSeconds, lastTry: ContinuousClock.now >= deadline)
            } catch is Retry {
                var pause = timespec(tv_sec: 0, tv_nsec: 100_000_000)
                nanosleep(&pause, nil)
            } catch let error as ControlSocketError {
                throw error
            } catch {
                throw ControlSocketError("cannot reach the agent at \(path): \(error)")
            }
        }
    }

    private struct Retry: Error {}

    private static func connectOnce(_ path: String, timeoutSeconds: Int, lastTry: Bool) throws -> Int32 {
        var address = try address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ControlSocketError("cannot create a socket: \(errnoText())") }
        setTimeouts(fd, seconds: timeoutSeconds)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let code = errno
            close(fd)
            if !lastTry, code == ENOENT || code == ECONNREFUSED { throw Retry() }
            let reason: String
            switch code {
            case ENOENT: reason = "no such socket"
            case ECONNREFUSED:
                // connect(2) answers ECONNREFUSED for a file that is not a socket too: not a stale socket then.
                var info = stat()
                if stat(path, &info) == 0, info.st_mode & S_IFMT != S_IFSOCK {
                    throw ControlSocketError(
                        "cannot reach the agent at \(path): that is \(FileSystem.kind(of: info.st_mode)), not a socket; give the agent's control socket ([control] socket, by default \(AgentConfiguration.defaultControlSocket))")
                }
                reason = "connection refused (a stale socket: the agent is not running)"
            case EACCES:
                // The socket is there and the agent may well run: only who asks is wrong (not "is it running? start it").
                throw ControlSocketError(
                    "cannot reach the agent at \(path): permission denied; run the command as root (sudo) or as a member of the farmgate group (sudo usermod -aG farmgate $USER, then log in again)")
            default: reason = String(cString: strerror(code))
            }
            throw ControlSocketError(
                "cannot reach the agent at \(path): \(reason). Is `farmgate agent` running? Start it with "
                    + "`sudo systemctl start farmgate` (or run `farmgate agent --config <file>`); `systemctl status farmgate` "
                    + "and `journalctl -u farmgate` say why it stopped")
        }
        return fd
    }

    static func setTimeouts(_ fd: Int32, seconds: Int) {
        var timeout = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            offset += n
        }
        return true
    }

    /// Reads until a newline, end of stream or `limit` bytes, giving up at `deadline` however slowly the bytes trickle in
    /// (a client that sends a byte a second never holds a thread longer than the deadline). nil when no line came in time.
    static func readLine(_ fd: Int32, limit: Int, deadline: ContinuousClock.Instant) -> [UInt8]? {
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while data.count < limit {
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard remaining > .zero else { return nil }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, Int32(clamping: Int(remaining / .milliseconds(1)) + 1))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { return nil }
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            guard n > 0 else { return data.isEmpty ? nil : data }
            data.append(contentsOf: chunk[0..<n])
            if let newline = data.firstIndex(of: 0x0A) { return Array(data[..<newline]) }
        }
        return nil
    }
}
