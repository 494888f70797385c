#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// Why a serial operation failed, in terms the installer can act on.
public struct SerialError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Kind: String, Sendable, Hashable {
        /// The device does not exist (unplugged, wrong path).
        case notFound = "not_found"
        /// The agent's user may not open it (not in the device's group).
        case permissionDenied = "permission_denied"
        /// Another process holds it (a second agent, `farmgate scan`, a terminal program).
        case busy
        /// The device went away while open (EIO, ENODEV, hang-up): a USB adapter was unplugged.
        case disconnected
        /// Nothing came within the deadline.
        case timeout
        /// termios refused the settings, or another system call failed.
        case io
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }

    /// Whether the port must be closed and opened again before the next request.
    public var needsReopen: Bool { kind == .disconnected || kind == .notFound || kind == .io }
}

/// One open serial port: a raw, non-blocking, exclusively held file descriptor whose every read and write is bounded by a
/// deadline through `poll`.
///
/// Not thread-safe: it belongs to the one thread of its ``SerialLine`` (the fd is closed in `deinit` on that thread).
public final class SerialPort {
    /// The path as configured (`/dev/serial/by-id/usb-FTDI_...`), shown in every error.
    public let path: String
    /// The device the path resolved to when it was opened (`/dev/ttyUSB0`).
    public let resolvedPath: String
    public let settings: SerialSettings
    private var fd: Int32

    /// Opens `path` in raw mode with `settings`, takes it exclusively (TIOCEXCL and an flock, so that two agents, or
    /// `farmgate scan` and the agent, never share a port) and discards whatever the device sent before.
    public init(path: String, settings: SerialSettings) throws(SerialError) {
        self.path = path
        self.settings = settings
        // A by-id link names the adapter, not the ttyUSB number the kernel happened to give it; resolve it now so that
        // a replug (same link, new tty) is followed at the next open.
        var resolved = path
        if let real = realpath(path, nil) {
            resolved = String(cString: real)
            free(real)
        }
        self.resolvedPath = resolved
        let shown = resolved == path ? path : "\(path) (\(resolved))"

        let descriptor = open(path, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC)
        guard descriptor >= 0 else {
            let code = errno
            throw SerialPort.openError(code, path: path, shown: shown)
        }
        fd = descriptor
        do {
            try configure(shown: shown)
        } catch {
            Glibc.close(descriptor)
            fd = -1
            throw error
        }
    }

    deinit {
        if fd >= 0 { Glibc.close(fd) }
    }

    private func configure(shown: String) throws(SerialError) {
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            if code == EWOULDBLOCK || code == EAGAIN {
                throw SerialError(
                    .busy,
                    "\(shown) is locked by another process (a second farmgate agent or `farmgate scan`: flock); stop it first")
            }
        }
        if ioctl(fd, UInt(TIOCEXCL)) != 0 {
            let code = errno
            // A pseudo-terminal or an unusual driver may not support it; the flock above still keeps other agents out.
            if code != ENOTTY && code != EINVAL {
                throw SerialError(.io, "\(shown): cannot take the port exclusively (TIOCEXCL): \(String(cString: strerror(code)))")
            }
        }
        var options = termios()
        guard tcgetattr(fd, &options) == 0 else {
            let code = errno
            if code == ENOTTY {
                throw SerialError(.io, "\(shown) is not a serial port (tcgetattr: not a terminal); check the path")
            }
            throw SerialError(.io, "\(shown): tcgetattr failed: \(String(cString: strerror(code)))")
        }
        cfmakeraw(&options)
        options.c_cflag |= tcflag_t(CLOCAL | CREAD)
        options.c_cflag &= ~(tcflag_t(CSIZE) | tcflag_t(CSTOPB) | tcflag_t(PARENB) | tcflag_t(PARODD) | tcflag_t(CRTSCTS))
        switch settings.dataBits {
        case 5: options.c_cflag |= tcflag_t(CS5)
        case 6: options.c_cflag |= tcflag_t(CS6)
        case 7: options.c_cflag |= tcflag_t(CS7)
        default: options.c_cflag |= tcflag_t(CS8)
        }
        switch settings.parity {
        case .none: break
        case .even: options.c_cflag |= tcflag_t(PARENB)
        case .odd: options.c_cflag |= tcflag_t(PARENB | PARODD)
        }
        if settings.stopBits == 2 { options.c_cflag |= tcflag_t(CSTOPB) }
        options.c_iflag &= ~tcflag_t(IXON | IXOFF | IXANY)
        // Non-blocking reads through poll: VMIN and VTIME play no part, but leave them defined.
        withUnsafeMutableBytes(of: &options.c_cc) { cc in
            cc[Int(VMIN)] = 0
            cc[Int(VTIME)] = 0
        }
        guard let speed = SerialSettings.speed(for: settings.baud) else {
            throw SerialError(.io, "\(shown): \(settings.baud) baud is not supported; use one of \(SerialSettings.supportedBauds)")
        }
        cfsetispeed(&options, speed)
        cfsetospeed(&options, speed)
        guard tcsetattr(fd, TCSANOW, &options) == 0 else {
            let code = errno
            throw SerialError(.io, "\(shown): cannot set \(settings) (tcsetattr: \(String(cString: strerror(code))))")
        }
        // Whatever the device sent before we listened (an EZO circuit in continuous mode streams a reading per second)
        // is stale.
        tcflush(fd, TCIOFLUSH)
    }

    static func openError(_ code: Int32, path: String, shown: String) -> SerialError {
        switch code {
        case ENOENT, ENXIO, ENODEV:
            return SerialError(
                .notFound,
                "\(shown) does not exist: is the USB adapter plugged in? (`ls -l /dev/serial/by-id/` lists the adapters present)")
        case EACCES, EPERM:
            var group = "dialout"
            var info = stat()
            if stat(path, &info) == 0, let entry = getgrgid(info.st_gid), let name = entry.pointee.gr_name {
                group = String(cString: name)
            }
            let user = getpwuid(geteuid()).flatMap { $0.pointee.pw_name.map { String(cString: $0) } } ?? "the agent's user"
            return SerialError(
                .permissionDenied,
                "permission denied opening \(shown): add \(user) to the '\(group)' group (sudo usermod -aG \(group) \(user)) and restart the agent, which only gets new groups when it starts")
        case EBUSY:
            return SerialError(.busy, "\(shown) is in use by another process (a second farmgate agent, `farmgate scan`, or a terminal program); stop it first")
        default:
            return SerialError(.io, "cannot open \(shown): \(String(cString: strerror(code)))")
        }
    }

    /// Discards input the device sent that nobody read yet.
    public func discardInput() {
        if fd >= 0 { tcflush(fd, TCIFLUSH) }
    }

    /// Writes all of `bytes` before `deadline`.
    public func write(_ bytes: [UInt8], deadline: ContinuousClock.Instant) throws(SerialError) {
        var offset = 0
        while offset < bytes.count {
            try wait(for: Int16(POLLOUT), until: deadline, what: "writing")
            let written = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if written < 0 {
                let code = errno
                if code == EAGAIN || code == EINTR { continue }
                throw failure(code, "writing")
            }
            offset += written
        }
    }

    /// The bytes that arrive before `deadline`: returns as soon as some are there, or an empty array at the deadline.
    public func read(until deadline: ContinuousClock.Instant, max: Int = 256) throws(SerialError) -> [UInt8] {
        do {
            try wait(for: Int16(POLLIN), until: deadline, what: "reading")
        } catch where error.kind == .timeout {
            return []
        }
        var buffer = [UInt8](repeating: 0, count: max)
        let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        if count < 0 {
            let code = errno
            if code == EAGAIN || code == EINTR { return [] }
            throw failure(code, "reading")
        }
        if count == 0 {
            // A tty that reports readable but has nothing to read has been hung up.
            throw SerialError(.disconnected, "\(path) was disconnected (end of file while reading): is the USB adapter still plugged in?")
        }
        return Array(buffer[0..<count])
    }

    private func wait(for events: Int16, until deadline: ContinuousClock.Instant, what: String) throws(SerialError) {
        while true {
            guard fd >= 0 else { throw SerialError(.disconnected, "\(path) is closed") }
            let remaining = deadline - ContinuousClock.now
            let milliseconds = remaining <= .zero ? 0 : Int32(min(remaining / .milliseconds(1), 60_000).rounded(.up))
            var request = pollfd(fd: fd, events: events, revents: 0)
            let ready = poll(&request, 1, milliseconds)
            if ready < 0 {
                let code = errno
                if code == EINTR { continue }
                throw failure(code, what)
            }
            if ready == 0 {
                if ContinuousClock.now >= deadline { throw SerialError(.timeout, "\(path): nothing within the deadline while \(what)") }
                continue
            }
            if request.revents & Int16(POLLNVAL) != 0 {
                throw SerialError(.disconnected, "\(path) was closed under the agent (POLLNVAL)")
            }
            // Data that arrived before a hang-up is still readable; the hang-up shows on the read after it.
            if request.revents & events != 0 { return }
            if request.revents & Int16(POLLHUP | POLLERR) != 0 {
                throw SerialError(.disconnected, "\(path) was disconnected while \(what) (hang-up): is the USB adapter still plugged in?")
            }
        }
    }

    private func failure(_ code: Int32, _ what: String) -> SerialError {
        switch code {
        case EIO, ENODEV, EBADF, ENXIO:
            SerialError(.disconnected, "\(path) was disconnected while \(what) (\(String(cString: strerror(code)))): is the USB adapter still plugged in?")
        default:
            SerialError(.io, "\(path): \(what) failed: \(String(cString: strerror(code)))")
        }
    }
}
