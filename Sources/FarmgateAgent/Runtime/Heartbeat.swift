import Synchronization

/// Proof that a long-running loop is still making progress, for the systemd watchdog (``WatchdogGate``).
///
/// A loop calls ``beat(_:within:)`` each time round, saying how long it may take before it comes round again (its
/// sleep plus the longest step it can legitimately take). Nothing else happens: no task, no timer, one lock and a
/// dictionary write, so the call costs nothing measurable in the loops it sits in. A loop that does not come back by its
/// own deadline (plus ``margin``) is stale: a read that ignores its timeout, a commit that never returns.
///
/// One heartbeat can hold several keys (the sampler has one per sensor loop); it is stale when any key is.
public final class Heartbeat: Sendable {
    /// Slack added to every deadline for scheduling delays on a busy board. systemd then waits a whole `WatchdogSec` after
    /// the last ping before it restarts the agent, so a component must be late by far more than this to cause a restart.
    public static let margin: Duration = .seconds(2)

    /// The component's name in logs and in the status line: `sampler`, `buffer`, `uploader`.
    public let component: String
    private struct State {
        var started = false
        var deadlines: [String: ContinuousClock.Instant] = [:]
    }
    private let state = Mutex(State())

    public init(component: String) {
        self.component = component
    }

    /// Records progress of the loop `key`: it promises to beat again within `allowance` (``margin`` is added).
    public func beat(_ key: String = "", within allowance: Duration) {
        let deadline = ContinuousClock.now.advanced(by: allowance + Self.margin)
        state.withLock {
            $0.started = true
            $0.deadlines[key] = deadline
        }
    }

    /// Marks the component as running before any loop beat (a sampler whose loops have not reached their first tick yet).
    public func start() {
        state.withLock { $0.started = true }
    }

    /// Forgets the loop `key` (it ended on purpose).
    public func end(_ key: String = "") {
        _ = state.withLock { $0.deadlines.removeValue(forKey: key) }
    }

    /// Whether the component has started (``start()`` or a first ``beat(_:within:)``).
    public var started: Bool { state.withLock { $0.started } }

    /// The keys whose deadline passed before `now`, sorted.
    public func staleKeys(at now: ContinuousClock.Instant = .now) -> [String] {
        state.withLock { $0.deadlines.filter { $0.value < now }.map(\.key) }.sorted()
    }
}
