import Synchronization

/// A token bucket: holds up to `capacity` tokens, refills at `rate` tokens per second, each request takes one.
///
/// A pure state machine: the caller passes the time, so tests need no sleeping.
public struct TokenBucket: Sendable, Hashable {
    /// What happened to a request.
    public enum Decision: Sendable, Hashable {
        /// Let it through.
        case allowed
        /// Refuse it; one token will be available after this long.
        case limited(retryAfter: Duration)
    }

    public let rate: Double
    public let capacity: Double
    public private(set) var tokens: Double
    public private(set) var updated: ContinuousClock.Instant

    /// A full bucket at `now`.
    public init(rate: Double, capacity: Int, now: ContinuousClock.Instant) {
        self.rate = max(rate, 1e-9)
        self.capacity = Double(max(capacity, 1))
        self.tokens = self.capacity
        self.updated = now
    }

    /// Takes one token if there is one.
    public mutating func take(now: ContinuousClock.Instant) -> Decision {
        refill(now: now)
        if tokens >= 1 {
            tokens -= 1
            return .allowed
        }
        let seconds = (1 - tokens) / rate
        return .limited(retryAfter: .milliseconds(Int64((seconds * 1000).rounded(.up))))
    }

    /// Whether the bucket would be full at `now` (an idle device whose entry can be forgotten).
    public func isFull(now: ContinuousClock.Instant) -> Bool {
        var copy = self
        copy.refill(now: now)
        return copy.tokens >= capacity
    }

    private mutating func refill(now: ContinuousClock.Instant) {
        guard now > updated else { return }
        let elapsed = updated.duration(to: now)
        let seconds = elapsed / .seconds(1)
        tokens = min(capacity, tokens + seconds * rate)
        updated = now
    }
}

/// One token bucket per device, in memory, bounded: buckets that have refilled completely are forgotten.
///
/// With several ingest instances each enforces its own limit; that is acceptable for a limit that only protects the
/// store from a misbehaving device.
public final class RateLimiter: Sendable {
    private struct State {
        var buckets: [Int64: TokenBucket] = [:]
        var lastSweep: ContinuousClock.Instant
    }

    public let rate: Double
    public let burst: Int
    private let state: Mutex<State>

    /// - Parameters:
    ///   - rate: requests per second per device.
    ///   - burst: how many requests a device may make at once.
    public init(rate: Double, burst: Int) {
        self.rate = rate
        self.burst = burst
        self.state = Mutex(State(lastSweep: .now))
    }

    /// Takes one token from `device`'s bucket.
    public func take(device: Int64, now: ContinuousClock.Instant = .now) -> TokenBucket.Decision {
        let rate = self.rate
        let burst = self.burst
        return state.withLock { state in
            if state.buckets.count > 1024, state.lastSweep.duration(to: now) > .seconds(10) {
                state.buckets = state.buckets.filter { !$0.value.isFull(now: now) }
                state.lastSweep = now
            }
            var bucket = state.buckets[device] ?? TokenBucket(rate: rate, capacity: burst, now: now)
            let decision = bucket.take(now: now)
            state.buckets[device] = bucket
            return decision
        }
    }
}
