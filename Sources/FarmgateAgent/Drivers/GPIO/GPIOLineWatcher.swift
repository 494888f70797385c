import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization

/// Watches one GPIO line on a thread of its own: requests it (again, with backoff, after the chip vanished or when it
/// is missing at start), waits for edge events with a short timeout so that it notices ``stop()``, and feeds them to
/// the line's ``GPIOLineMonitor``. Sensors read the monitor's answers at their own interval; a flow sensor and a count
/// sensor on one pulse line share one watcher.
final class GPIOLineWatcher: Sendable {
    let request: GPIOLineRequest
    let mode: GPIOLineMonitor.Mode
    let activeLow: Bool
    private let backend: any GPIOBackend
    private let state = Mutex(State())
    private let thread: DedicatedThread
    private let logger: Logger

    private struct State {
        var monitor: GPIOLineMonitor?
        var error: SensorError?
        var stopping = false
        var users = 0
        /// The first request of the line was tried (it succeeded, or `error` says why not).
        var tried = false
        /// The thread left its loop: no edge is applied any more.
        var finished = false
    }

    init(request: GPIOLineRequest, mode: GPIOLineMonitor.Mode, activeLow: Bool, backend: any GPIOBackend, logger: Logger) {
        self.request = request
        self.mode = mode
        self.activeLow = activeLow
        self.backend = backend
        var logger = logger
        logger[metadataKey: "gpio_line"] = "\(request.name)"
        self.logger = logger
        thread = DedicatedThread(name: "farmgate-gpio")
    }

    /// Starts watching (once).
    func start() {
        let thread = self.thread
        Task { [self] in
            do { try await thread.run { self.watch() } } catch {
                // Stopped before the thread ran it: nothing will be applied.
                state.withLock { $0.finished = true }
            }
        }
    }

    /// Asks the thread to release the line and end; it notices within one wait (100 ms).
    func stop() {
        state.withLock { $0.stopping = true }
        thread.shutdown()
    }

    /// Waits, at most `timeout`, for the thread to leave its loop after ``stop()``: the edges it took are applied then.
    func waitUntilFinished(timeout: Duration) async {
        let until = ContinuousClock.now + timeout
        while !state.withLock({ $0.finished }), ContinuousClock.now < until {
            try? await Task.sleep(for: .milliseconds(5))
        }
    }

    /// Waits, at most `timeout`, until the thread tried to request the line once (it answers right after the driver is
    /// made, before the line is requested); true when it did.
    func waitUntilTried(timeout: Duration) async -> Bool {
        let until = ContinuousClock.now + timeout
        while true {
            if state.withLock({ $0.tried || $0.monitor != nil }) { return true }
            if ContinuousClock.now >= until || Task.isCancelled { return false }
            try? await Task.sleep(for: .milliseconds(2))
        }
    }

    /// The pulses counted since the watcher started, up to the line's clock now (0 before the line was requested).
    var totalPulses: UInt64 {
        let now = backend.now()
        return state.withLock { state in state.monitor?.pulses(at: now) ?? 0 }
    }

    /// Whether the thread tried to request the line once (it succeeded, or the line's error says why not).
    var tried: Bool { state.withLock { $0.tried || $0.monitor != nil } }

    /// Answers a question about the line, or throws why the line cannot be read.
    func withMonitor<T>(_ body: (inout GPIOLineMonitor, Int64) -> T) throws(SensorError) -> T {
        try withMonitor { monitor, now, _ in body(&monitor, now) }
    }

    /// Answers a question about the line, also told whether edges that happened by `now` are still on their way to the
    /// monitor (``GPIOBackend/clockReading()``): the monitor's state is then older than `now`.
    func withMonitor<T>(_ body: (inout GPIOLineMonitor, Int64, Bool) -> T) throws(SensorError) -> T {
        let (now, pending) = backend.clockReading()
        return try state.withLock { state throws(SensorError) -> T in
            if let error = state.error { throw error }
            guard var monitor = state.monitor else {
                throw SensorError(
                    .timeout,
                    "GPIO line \(request.name) was not requested in time; check that the chip exists (`gpiodetect`), that the line is free (`gpioinfo`) and that the agent's user is in the gpio group")
            }
            let result = body(&monitor, now, pending)
            state.monitor = monitor
            return result
        }
    }

    func retain() { state.withLock { $0.users += 1 } }

    /// Returns how many users remain.
    func release() -> Int { state.withLock { state in state.users -= 1; return state.users } }

    /// Between requests of a line whose chip is missing or vanished: 1 s, doubling, at most 5 s, so that a chip that is
    /// back (a USB GPIO expander replugged, an overlay loaded) is watched again within seconds. An attempt costs one
    /// open of the chip; the log says once that the line is lost and once that it is back, not at every attempt.
    static let reopenBackoff = Backoff(initial: .seconds(1), maximum: .seconds(5))

    private func watch() {
        defer { state.withLock { $0.finished = true } }
        var line: (any GPIOLine)?
        var backoff = Self.reopenBackoff
        while !state.withLock({ $0.stopping }) {
            guard let current = line else {
                do throws(SensorError) {
                    let opened = try backend.open(request)
                    let level = try opened.level()
                    let now = backend.now()
                    // Edges the line already holds (an events file's lines appended while the agent was down) came after
                    // the level it reads: they are applied before anyone sees the monitor, so that its first state is
                    // the line's state now, not the one before them stamped now.
                    let early = try opened.waitForEvents(timeout: .zero)
                    state.withLock { state in
                        var monitor = state.monitor ?? GPIOLineMonitor(mode: mode, activeLow: activeLow, physicalLevel: level, at: now)
                        if state.monitor != nil { monitor.restart(physicalLevel: level, at: now) }
                        for event in early { monitor.apply(event) }
                        state.monitor = monitor
                        state.error = nil
                        state.tried = true
                    }
                    if backoff.failures > 0 { logger.info("GPIO line is back") }
                    backoff.reset()
                    line = opened
                } catch {
                    if backoff.failures == 0 { logger.warning("Cannot request the GPIO line", metadata: ["error": "\(error)"]) }
                    state.withLock { $0.error = error; $0.tried = true }
                    pause(backoff.ceiling)
                    backoff.recordFailure()
                }
                continue
            }
            do throws(SensorError) {
                let events = try current.waitForEvents(timeout: .milliseconds(100))
                guard !events.isEmpty else { continue }
                state.withLock { state in
                    for event in events { state.monitor?.apply(event) }
                }
            } catch {
                logger.warning("GPIO line lost; requesting it again with backoff", metadata: ["error": "\(error)"])
                state.withLock { $0.error = error }
                line = nil
                pause(backoff.ceiling)
                backoff.recordFailure()
            }
        }
    }

    /// Sleeps `duration` in short steps, returning early when asked to stop.
    private func pause(_ duration: Duration) {
        let until = ContinuousClock.now + duration
        while ContinuousClock.now < until, !state.withLock({ $0.stopping }) {
            let step = min(until - ContinuousClock.now, .milliseconds(50))
            sleepBlocking(step)
        }
    }
}

/// The line watchers of this process: a flow and a count sensor on one line share one.
final class GPIOLineWatchers: Sendable {
    static let shared = GPIOLineWatchers()

    private let watchers = Mutex<[String: GPIOLineWatcher]>([:])

    /// The watcher of `request` on `backend`, created and started on first use.
    /// The watcher of `request`'s line on `backend` (made and started if none runs), and its pulse total at that moment:
    /// 0 for a new one, taken before its thread starts, since that thread may count the line's first edges (an events
    /// file's, at once) before the caller could look; the running total for one another driver already watches.
    func watcher(
        for request: GPIOLineRequest, mode: GPIOLineMonitor.Mode, activeLow: Bool, backend: any GPIOBackend, logger: Logger
    ) throws(SensorError) -> (watcher: GPIOLineWatcher, pulseOrigin: UInt64) {
        let key = "\(ObjectIdentifier(backend).hashValue)|\(request.name)"
        return try watchers.withLock { watchers throws(SensorError) -> (watcher: GPIOLineWatcher, pulseOrigin: UInt64) in
            if let watcher = watchers[key] {
                guard watcher.mode == mode, watcher.activeLow == activeLow, watcher.request == request else {
                    throw SensorError(.fault, "GPIO line \(request.name) is already watched with other settings")
                }
                watcher.retain()
                return (watcher, watcher.totalPulses)
            }
            let watcher = GPIOLineWatcher(request: request, mode: mode, activeLow: activeLow, backend: backend, logger: logger)
            watcher.retain()
            watchers[key] = watcher
            let origin = watcher.totalPulses
            watcher.start()
            return (watcher, origin)
        }
    }

    /// Gives up one use of `watcher`; the last stops it. Returns whether it was the last.
    @discardableResult
    func release(_ watcher: GPIOLineWatcher, backend: any GPIOBackend) -> Bool {
        let key = "\(ObjectIdentifier(backend).hashValue)|\(watcher.request.name)"
        let last = watchers.withLock { watchers -> Bool in
            guard watcher.release() == 0 else { return false }
            if watchers[key] === watcher { watchers[key] = nil }
            return true
        }
        if last { watcher.stop() }
        return last
    }
}
