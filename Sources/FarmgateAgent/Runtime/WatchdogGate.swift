/// Decides whether the agent may send systemd its next `WATCHDOG=1`: only while every supervised component has started and
/// none has missed its own deadline (``Heartbeat``).
///
/// When a component is stuck the pings stop; systemd restarts the agent `WatchdogSec` after the last one. The gate itself
/// keeps no state: it reads the heartbeats at the moment it is asked, so a component that recovers in time resumes the
/// pings and nothing restarts.
public struct WatchdogGate: Sendable {
    /// What the gate found.
    public enum Verdict: Equatable, Sendable {
        /// Every component is running and on time: ping.
        case alive
        /// These components have not started yet (start-up): do not ping, not an error.
        case starting([String])
        /// These components (`sampler tank1.ph`, `uploader`) are late: do not ping.
        case stale([String])
    }

    public let heartbeats: [Heartbeat]

    public init(heartbeats: [Heartbeat]) {
        self.heartbeats = heartbeats
    }

    /// Looks at every heartbeat at `now`.
    public func verdict(at now: ContinuousClock.Instant = .now) -> Verdict {
        let notStarted = heartbeats.filter { !$0.started }.map(\.component)
        if !notStarted.isEmpty { return .starting(notStarted) }
        var late: [String] = []
        for heartbeat in heartbeats {
            for key in heartbeat.staleKeys(at: now) {
                late.append(key.isEmpty ? heartbeat.component : "\(heartbeat.component) \(key)")
            }
        }
        return late.isEmpty ? .alive : .stale(late)
    }
}
