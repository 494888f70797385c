import CLinux
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One timer thread for many deadlines.
///
/// Every `Task.sleep` registers a timer with Dispatch, which wakes its manager thread (a write to an eventfd, a
/// `timerfd_settime`) to reprogram it, and a deadline that is cancelled costs a task woken only to end. At 50 sensors
/// and 1 Hz that was most of the agent's CPU: a sleep per sensor and a deadline per read, 100 registrations a second.
/// This timer keeps its deadlines in memory under a lock and sleeps on a condition variable until the earliest one:
/// scheduling a later deadline, or cancelling one, wakes nobody, and deadlines at the same instant (sensors sharing a
/// phase) fire in one wake-up.
///
/// Actions run on the timer's own thread (never on the Swift concurrency pool) and must be short and never block: they
/// resume a continuation. The thread starts with the first deadline and lives as long as the process.
public final class SharedTimer: @unchecked Sendable {
    /// The process's timer (one thread for everything that uses it).
    public static let shared = SharedTimer(name: "farmgate-timer")

    /// A scheduled action, for ``cancel(_:)``.
    public struct Token: Hashable, Sendable {
        fileprivate let id: UInt64
    }

    private struct Entry {
        let deadline: ContinuousClock.Instant
        let action: @Sendable () -> Void
    }

    private enum ThreadState {
        case notStarted
        case running
        /// Waiting on the condition until this instant (nil: until signalled).
        case waiting(until: ContinuousClock.Instant?)
    }

    private let name: String
    // Everything below is guarded by `mutex`.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private var entries: [UInt64: Entry] = [:]
    private var nextID: UInt64 = 0
    private var thread: ThreadState = .notStarted

    /// A timer whose thread is named `name` (at most 15 bytes show in `top -H`).
    public init(name: String) {
        self.name = name
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        condition = .allocate(capacity: 1)
        condition.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        // Waits are measured on the monotonic clock: setting the wall clock (NTP at boot) must not move them.
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    // Only reached by a timer that never started its thread (a running thread holds its timer for good).
    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    /// Runs `action` on the timer's thread at `deadline` (at once if it has passed), unless ``cancel(_:)`` comes first.
    @discardableResult
    public func schedule(at deadline: ContinuousClock.Instant, _ action: @escaping @Sendable () -> Void) -> Token {
        pthread_mutex_lock(mutex)
        nextID &+= 1
        let id = nextID
        entries[id] = Entry(deadline: deadline, action: action)
        var start = false
        switch thread {
        case .notStarted:
            thread = .running
            start = true
        case .running:
            break  // it looks at every entry before it waits again
        case .waiting(let until):
            if until.map({ deadline < $0 }) ?? true { pthread_cond_signal(condition) }
        }
        pthread_mutex_unlock(mutex)
        if start, !startOSThread(name: name, stackSize: 256 << 10, { [self] in self.run() }) {
            // No thread to be had (TasksMax=): run the action at once rather than never; a deadline that fires early
            // only ends a wait early.
            pthread_mutex_lock(mutex)
            thread = .notStarted
            let orphans = entries.values.map(\.action)
            entries.removeAll()
            pthread_mutex_unlock(mutex)
            for orphan in orphans { orphan() }
        }
        return Token(id: id)
    }

    /// Runs `action` after `delay`.
    @discardableResult
    public func schedule(after delay: Duration, _ action: @escaping @Sendable () -> Void) -> Token {
        schedule(at: .now + delay, action)
    }

    /// Forgets a scheduled action; nothing happens if it already ran. Wakes nobody.
    public func cancel(_ token: Token) {
        pthread_mutex_lock(mutex)
        entries[token.id] = nil
        pthread_mutex_unlock(mutex)
    }

    /// How many actions are scheduled (for tests).
    public var pending: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return entries.count
    }

    /// Suspends the task until `deadline`, like `Task.sleep(until:clock: .continuous)`: throws `CancellationError` as
    /// soon as the task is cancelled.
    public func sleep(until deadline: ContinuousClock.Instant) async throws {
        try Task.checkCancellation()
        guard deadline > .now else { return }
        let wake = OnceContinuation<Void>()
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                wake.install(continuation)
                let token = schedule(at: deadline) { wake.resume(with: .success(())) }
                wake.onResume { [self] in cancel(token) }
            }
        } onCancel: {
            wake.resume(with: .failure(CancellationError()))
        }
    }

    /// Suspends the task for `duration`; see ``sleep(until:)``.
    public func sleep(for duration: Duration) async throws {
        try await sleep(until: .now + duration)
    }

    private func run() {
        pthread_mutex_lock(mutex)
        while true {
            let now = ContinuousClock.now
            var due: [(ContinuousClock.Instant, UInt64)] = []
            var earliest: ContinuousClock.Instant?
            for (id, entry) in entries {
                if entry.deadline <= now {
                    due.append((entry.deadline, id))
                } else if earliest.map({ entry.deadline < $0 }) ?? true {
                    earliest = entry.deadline
                }
            }
            if !due.isEmpty {
                // In deadline order, then in the order they were scheduled.
                due.sort { ($0.0, $0.1) < ($1.0, $1.1) }
                let actions = due.compactMap { entries.removeValue(forKey: $0.1)?.action }
                thread = .running
                pthread_mutex_unlock(mutex)
                for action in actions { action() }
                pthread_mutex_lock(mutex)
                continue
            }
            thread = .waiting(until: earliest)
            if let earliest {
                var wakeAt = timespec()
                clock_gettime(CLOCK_MONOTONIC, &wakeAt)
                // At most a day at a time: the loop looks again when it wakes, and the sum below cannot overflow.
                let (seconds, attoseconds) = min(earliest - now, .seconds(86_400)).components
                let nanoseconds = Int(wakeAt.tv_nsec) + Int(attoseconds / 1_000_000_000) + 1
                wakeAt.tv_sec += Int(seconds) + nanoseconds / 1_000_000_000
                wakeAt.tv_nsec = nanoseconds % 1_000_000_000
                pthread_cond_timedwait(condition, mutex, &wakeAt)
            } else {
                pthread_cond_wait(condition, mutex)
            }
            thread = .running
        }
    }
}
