import FarmgateSupport
import Logging
import Synchronization

/// The one owner of a serial port: every request for it, from any sensor, runs on the line's own thread, one at a time
/// (several sensors on one port never interleave their bytes), and the port is opened, lost and opened again here.
///
/// The port is opened at the first request, not at start: a device missing when the agent starts (an unplugged USB
/// adapter) makes that sensor's reads fail as `disconnected` until it is plugged in, and never stops the agent. After an
/// unplug (EIO, ENODEV, hang-up) the port is closed; the next request opens it again at once, and while that keeps
/// failing, attempts are spaced by a capped exponential backoff so that a missing device costs almost nothing.
public final class SerialLine: Sendable {
    /// The configured path (shown in errors and logs).
    public let path: String
    public let settings: SerialSettings
    let backoffInitial: Duration
    let backoffMax: Duration
    private let thread: DedicatedThread
    private let state: State
    private let attachments = Mutex<[String: any Sendable]>([:])
    private let logger: Logger

    // @unchecked: every field is read and written only by jobs on `thread`, which run one at a time.
    private final class State: @unchecked Sendable {
        var port: SerialPort?
        /// Counts successful opens, so that what sits behind the port (an EZO circuit's initialisation) knows when it is
        /// talking to a device opened afresh.
        var generation = 0
        var failures = 0
        var nextAttempt: ContinuousClock.Instant?
        var lastError: SerialError?
        var closed = false
    }

    public init(
        path: String, settings: SerialSettings, backoffInitial: Duration = .seconds(1), backoffMax: Duration = .seconds(5),
        logger: Logger
    ) {
        self.path = path
        self.settings = settings
        self.backoffInitial = backoffInitial
        self.backoffMax = backoffMax
        self.thread = DedicatedThread(name: "farmgate-serial")
        self.state = State()
        var logger = logger
        logger[metadataKey: "port"] = "\(path)"
        self.logger = logger
    }

    deinit {
        // The port goes with `state` (closing a tty does not block); the thread ends once its queue is empty.
        thread.shutdown()
    }

    /// Runs `body` with the open port on the line's thread, opening it first when needed.
    ///
    /// `body` gets the port and its generation (which changes at every open). A ``SerialError`` that means the device is
    /// gone (or was never there) closes the port so that the next request opens it again.
    /// - Throws: ``SerialError`` when the port cannot be opened (now, or during the backoff after failed attempts), and
    ///   whatever `body` throws.
    public func withPort<T: Sendable>(_ body: @escaping @Sendable (SerialPort, Int) throws -> T) async throws -> T {
        let state = self.state
        let path = self.path
        let settings = self.settings
        let logger = self.logger
        let backoff = (backoffInitial, backoffMax)
        return try await thread.run { () throws -> T in
            guard !state.closed else { throw SerialError(.disconnected, "\(path) is closed (the agent is stopping)") }
            let port = try SerialLine.open(state, path: path, settings: settings, backoff: backoff, logger: logger)
            do {
                return try body(port, state.generation)
            } catch let error as SerialError where error.needsReopen {
                state.port = nil
                state.lastError = error
                logger.warning("Serial port lost; it is opened again at the next read", metadata: ["error": "\(error)"])
                throw error
            }
        }
    }

    private static func open(
        _ state: State, path: String, settings: SerialSettings, backoff: (Duration, Duration), logger: Logger
    ) throws(SerialError) -> SerialPort {
        if let port = state.port { return port }
        let now = ContinuousClock.now
        if let next = state.nextAttempt, now < next, let last = state.lastError {
            let wait = ((next - now) / .milliseconds(100)).rounded(.up) / 10
            throw SerialError(last.kind, "\(last.message) (next attempt in \(wait) s)")
        }
        do {
            let port = try SerialPort(path: path, settings: settings)
            state.port = port
            state.generation += 1
            if state.failures > 0 || state.generation > 1 {
                logger.notice("Serial port opened again", metadata: ["device": "\(port.resolvedPath)", "after_failures": "\(state.failures)"])
            } else {
                logger.info("Serial port opened", metadata: ["device": "\(port.resolvedPath)", "settings": "\(settings)"])
            }
            state.failures = 0
            state.nextAttempt = nil
            state.lastError = nil
            return port
        } catch {
            if state.failures == 0 {
                logger.warning("Cannot open serial port", metadata: ["error": "\(error)"])
            }
            state.failures += 1
            state.lastError = error
            let factor = Double(1 << min(state.failures - 1, 20))
            state.nextAttempt = now + min(backoff.0 * factor, backoff.1)
            throw error
        }
    }

    /// The value shared by everything behind this port under `key` (an EZO circuit's session), made on first use.
    public func attachment<T: Sendable>(_ key: String, make: () -> T) -> T {
        attachments.withLock { attachments in
            if let existing = attachments[key] as? T { return existing }
            let made = make()
            attachments[key] = made
            return made
        }
    }

    /// Closes the port and stops the thread once queued requests are done; later requests fail.
    public func close() async {
        let state = self.state
        _ = try? await thread.run { state.closed = true; state.port = nil }
        thread.shutdown()
    }
}

/// One ``SerialLine`` per configured port for the whole agent, so that sensors naming the same port share its owner.
public final class SerialPortRegistry: Sendable {
    private let lines = Mutex<[String: SerialLine]>([:])
    private let logger: Logger
    let backoffInitial: Duration
    let backoffMax: Duration

    public init(
        backoffInitial: Duration = .seconds(1), backoffMax: Duration = .seconds(5), logger: Logger = Logger(label: "farmgate.serial")
    ) {
        self.backoffInitial = backoffInitial
        self.backoffMax = backoffMax
        self.logger = logger
    }

    /// The owner of `path`; made on first use. The configuration check already refused one port with two settings.
    /// - Throws: ``SerialError`` when `path` is already in use with other settings.
    public func line(path: String, settings: SerialSettings) throws(SerialError) -> SerialLine {
        let logger = self.logger
        let (initial, maximum) = (backoffInitial, backoffMax)
        let result: Result<SerialLine, SerialError> = lines.withLock { lines in
            if let existing = lines[path] {
                guard existing.settings == settings else {
                    return .failure(SerialError(.busy, "\(path) is already used at \(existing.settings), not \(settings)"))
                }
                return .success(existing)
            }
            let line = SerialLine(path: path, settings: settings, backoffInitial: initial, backoffMax: maximum, logger: logger)
            lines[path] = line
            return .success(line)
        }
        return try result.get()
    }
}
