#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Tells systemd how a `Type=notify` service is doing: the `sd_notify(3)` protocol without libsystemd.
///
/// systemd passes the path of an `AF_UNIX` datagram socket in `$NOTIFY_SOCKET` (a leading `@` names an abstract socket);
/// each message is one datagram of `KEY=VALUE` lines. `READY=1` ends the start-up (`systemctl start` returns, units
/// ordered after this one start), `STATUS=` is the line `systemctl status` shows, `STOPPING=1` announces a graceful stop,
/// and `WATCHDOG=1` proves liveness when the unit sets `WatchdogSec=` (systemd passes the interval in `$WATCHDOG_USEC`).
/// Linking libsystemd for these few lines would pull its dependencies onto the site's small board.
///
/// Sending never blocks (`MSG_DONTWAIT`): a lost status line is harmless, and a full queue at systemd is its problem to
/// report, not a reason to stall the daemon. Outside systemd (no `$NOTIFY_SOCKET`) ``init(environment:)`` returns nil.
///
/// ```swift
/// let notifier = SystemdNotifier(environment: ProcessInfo.processInfo.environment)
/// try notifier?.send(["READY=1", "STATUS=serving"])
/// ```
public struct SystemdNotifier: Sendable, CustomStringConvertible {
    /// The socket address as systemd gave it (`/run/systemd/notify`, or `@name` for an abstract socket).
    public let socketPath: String
    /// `$WATCHDOG_USEC` when it is meant for this process (`$WATCHDOG_PID` unset or ours); nil when there is no watchdog.
    public let watchdogTimeout: Duration?

    /// The environment variable that names the socket.
    public static let socketVariable = "NOTIFY_SOCKET"

    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`; nil when the process is not run by systemd as a
    /// notify service (or the variable is empty).
    public init?(environment: [String: String]) {
        guard let path = environment[Self.socketVariable], !path.isEmpty else { return nil }
        self.init(socketPath: path, watchdogTimeout: Self.watchdogTimeout(environment: environment))
    }

    public init(socketPath: String, watchdogTimeout: Duration? = nil) {
        self.socketPath = socketPath
        self.watchdogTimeout = watchdogTimeout
    }

    public var description: String { "systemd notify socket \(socketPath)" }

    /// The watchdog timeout systemd asks for, or nil: `$WATCHDOG_USEC` must be a positive integer, and `$WATCHDOG_PID`, when
    /// set, must be this process (a child that inherited the environment must not ping for its parent).
    public static func watchdogTimeout(environment: [String: String]) -> Duration? {
        guard let text = environment["WATCHDOG_USEC"], let microseconds = UInt64(text), microseconds > 0 else { return nil }
        if let pid = environment["WATCHDOG_PID"], !pid.isEmpty, pid != String(getpid()) { return nil }
        return .microseconds(Int64(clamping: microseconds))
    }

    /// How often to ping: half the timeout, as sd_watchdog_enabled(3) recommends, so that one late ping is not fatal.
    public var watchdogPingInterval: Duration? { watchdogTimeout.map { $0 / 2 } }

    /// Sends `lines` (each `KEY=VALUE`, no newline inside a value) as one datagram.
    /// - Throws: ``SystemdNotifyError`` naming the socket and the system's reason.
    public func send(_ lines: [String]) throws(SystemdNotifyError) {
        try send(message: lines.map { $0.replacing("\n", with: " ") }.joined(separator: "\n"))
    }

    /// Sends `message` as one datagram, as it is.
    public func send(message: String) throws(SystemdNotifyError) {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var pathBytes = Array(socketPath.utf8)
        let abstract = pathBytes.first == UInt8(ascii: "@")
        if abstract { pathBytes[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard !pathBytes.isEmpty, pathBytes.count < capacity, abstract || pathBytes.first == UInt8(ascii: "/") else {
            throw SystemdNotifyError(socketPath: socketPath, reason: "not an absolute socket path or @abstract name that fits sockaddr_un")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
        }
        // sun_path follows sun_family. A path socket's address includes its terminating NUL; an abstract name's length is
        // exactly its bytes.
        let length = socklen_t(MemoryLayout<sa_family_t>.size + pathBytes.count + (abstract ? 0 : 1))
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemdNotifyError(socketPath: socketPath, reason: Self.errorText(errno)) }
        defer { close(fd) }
        let bytes = Array(message.utf8)
        let sent = bytes.withUnsafeBytes { body in
            withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sockaddrPointer in
                    sendto(fd, body.baseAddress, body.count, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL), sockaddrPointer, length)
                }
            }
        }
        guard sent == bytes.count else {
            throw SystemdNotifyError(socketPath: socketPath, reason: sent < 0 ? Self.errorText(errno) : "short send")
        }
    }

    static func errorText(_ code: Int32) -> String {
        String(cString: strerror(code))
    }
}

/// A notification could not be sent; names the socket and why.
public struct SystemdNotifyError: Error, CustomStringConvertible, Sendable {
    public let socketPath: String
    public let reason: String

    public var description: String { "cannot notify systemd at \(socketPath): \(reason)" }
}
