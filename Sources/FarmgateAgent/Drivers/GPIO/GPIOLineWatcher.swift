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
        Task { [self] in try? await thread.run { self.watch() } }
    }

    /// Asks the thread to release the line and end; it notices within one wait (100 ms).
    func stop() {
        state.withLock { $0.stopping = true }
        thread.shutdown()
    }

    /// Answers a question about the line, or throws why the line cannot be read.
    func withMonitor<T>(_ body: (inout GPIOLineMonitor, Int64) -> T) throws(SensorError) -> T {
        let now = backend.now()
        return try state.withLock { state throws(SensorError) -> T in
            if let error = state.error { throw error }
            guard var monitor = state.monitor else {
                throw SensorError(.timeout, "GPIO line \(request.name) is not requested yet")
            }
            let result = body(&monitor, now)
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
        var line: (any GPIOLine)?
        var backoff = Self.reopenBackoff
        while !state.withLock({ $0.stopping }) {
            guard let current = line else {
                do throws(SensorError) {
                    let opened = try backend.open(request)
                    let level = try opened.level()
                    let now = backend.now()
                    state.withLock { state in
                        if state.monitor == nil {
                            state.monitor = GPIOLineMonitor(mode: mode, activeLow: activeLow, physicalLevel: level, at: now)
                        } else {
                            state.monitor?.restart(physicalLevel: level, at: now)
                        }
                        state.error = nil
                    }
                    if backoff.failures > 0 { logger.info("GPIO line is back") }
                    backoff.reset()
                    line = opened
                } catch {
                    if backoff.failures == 0 { logger.warning("Cannot request the GPIO line", metadata: ["error": "\(error)"]) }
                    state.withLock { $0.error = error }
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
    func watcher(
        for request: GPIOLineRequest, mode: GPIOLineMonitor.Mode, activeLow: Bool, backend: any GPIOBackend, logger: Logger
    ) throws(SensorError) -> GPIOLineWatcher {
        let key = "\(ObjectIdentifier(backend).hashValue)|\(request.name)"
        return try watchers.withLock { watchers throws(SensorError) -> GPIOLineWatcher in
            if let watcher = watchers[key] {
                guard watcher.mode == mode, watcher.activeLow == activeLow, watcher.request == request else {
                    throw SensorError(.fault, "GPIO line \(request.name) is already watched with other settings")
                }
                watcher.retain()
                return watcher
            }
            let watcher = GPIOLineWatcher(request: request, mode: mode, activeLow: activeLow, backend: backend, logger: logger)
            watcher.retain()
            watchers[key] = watcher
            watcher.start()
            return watcher
        }
    }

    /// Gives up one use of `watcher`; the last stops it.
    func release(_ watcher: GPIOLineWatcher, backend: any GPIOBackend) {
        let key = "\(ObjectIdentifier(backend).hashValue)|\(watcher.request.name)"
        let last = watchers.withLock { watchers -> Bool in
            guard watcher.release() == 0 else { return false }
            if watchers[key] === watcher { watchers[key] = nil }
            return true
        }
        if last { watcher.stop() }
    }
}
