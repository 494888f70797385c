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

    fileprivate mutating func refill(now: ContinuousClock.Instant) {
        guard now > updated else { return }
        let elapsed = updated.duration(to: now)
        let seconds = elapsed / .seconds(1)
        tokens = min(capacity, tokens + seconds * rate)
        updated = now
    }
}

extension TokenBucket {
    /// How long until the bucket is full again at `now` (zero when it is).
    public func timeUntilFull(now: ContinuousClock.Instant) -> Duration {
        var copy = self
        copy.refill(now: now)
        let missing = capacity - copy.tokens
        guard missing > 0 else { return .zero }
        return .milliseconds(Int64((missing / rate * 1000).rounded(.up)))
    }

    /// Whole tokens left at `now`.
    public func remaining(now: ContinuousClock.Instant) -> Int {
        var copy = self
        copy.refill(now: now)
        return Int(copy.tokens.rounded(.down))
    }
}

/// One token bucket per key (a device, a read token, a client address), in memory and bounded.
///
/// Buckets that have refilled completely are forgotten (an absent bucket is a full one, so forgetting changes nothing).
/// When more than ``maxKeys`` keys are limited at once, the newest ones share one overflow bucket: memory stays bounded
/// whatever the number of distinct keys, and the overflow bucket limits them together, which errs on the side of the store.
///
/// With several ingest instances each enforces its own limit; that is acceptable for a limit that only protects the
/// store from a misbehaving client.
public final class KeyedRateLimiter<Key: Hashable & Sendable>: Sendable {
    private struct State {
        var buckets: [Key: TokenBucket] = [:]
        var overflow: TokenBucket?
        var lastSweep: ContinuousClock.Instant
    }

    /// Tokens per second per key.
    public let rate: Double
    /// How many requests a key may make at once.
    public let burst: Int
    /// The most buckets kept; see the type's documentation.
    public let maxKeys: Int
    /// The name of the policy in the `RateLimit-Policy` and `RateLimit` headers.
    public let policy: String
    private let state: Mutex<State>

    /// - Parameters:
    ///   - rate: tokens per second per key.
    ///   - burst: the size of each bucket.
    ///   - maxKeys: the most buckets kept at once (default 10 000).
    ///   - policy: the policy's name in the headers.
    public init(rate: Double, burst: Int, maxKeys: Int = 10_000, policy: String = "default") {
        self.rate = rate
        self.burst = burst
        self.maxKeys = max(maxKeys, 1)
        self.policy = policy
        self.state = Mutex(State(lastSweep: .now))
    }

    /// Takes one token from `key`'s bucket and says what is left.
    public func acquire(_ key: Key, now: ContinuousClock.Instant = .now) -> RateLimitStatus {
        update(key, now: now) { bucket in bucket.take(now: now) }
    }

    /// What `key`'s bucket holds, without taking a token: `.limited` when a request now would be refused.
    public func peek(_ key: Key, now: ContinuousClock.Instant = .now) -> RateLimitStatus {
        update(key, now: now, store: false) { bucket in
            var copy = bucket
            return copy.take(now: now)
        }
    }

    private func update(
        _ key: Key, now: ContinuousClock.Instant, store: Bool = true, _ body: (inout TokenBucket) -> TokenBucket.Decision
    ) -> RateLimitStatus {
        let (rate, burst, maxKeys, policy) = (self.rate, self.burst, self.maxKeys, self.policy)
        return state.withLock { state in
            if state.buckets.count >= maxKeys / 2, state.lastSweep.duration(to: now) > .seconds(1) {
                state.buckets = state.buckets.filter { !$0.value.isFull(now: now) }
                if state.overflow?.isFull(now: now) == true { state.overflow = nil }
                state.lastSweep = now
            }
            let fresh = TokenBucket(rate: rate, capacity: burst, now: now)
            let decision: TokenBucket.Decision
            let bucket: TokenBucket
            if var existing = state.buckets[key] {
                decision = body(&existing)
                if store { state.buckets[key] = existing }
                bucket = existing
            } else if state.buckets.count < maxKeys {
                var created = fresh
                decision = body(&created)
                if store { state.buckets[key] = created }
                bucket = created
            } else {
                var shared = state.overflow ?? fresh
                decision = body(&shared)
                if store { state.overflow = shared }
                bucket = shared
            }
            let retryAfter: Duration? = if case .limited(let wait) = decision { wait } else { nil }
            return RateLimitStatus(
                policy: policy, limit: burst, window: .milliseconds(Int64((Double(burst) / rate * 1000).rounded(.up))),
                remaining: bucket.remaining(now: now), reset: bucket.timeUntilFull(now: now), retryAfter: retryAfter)
        }
    }

    /// How many buckets are kept (tests check the bound).
    var count: Int { state.withLock { $0.buckets.count } }
}

/// One token bucket per device (the row id of its credential).
public typealias RateLimiter = KeyedRateLimiter<Int64>

extension KeyedRateLimiter where Key == Int64 {
    /// Takes one token from `device`'s bucket.
    public func take(device: Int64, now: ContinuousClock.Instant = .now) -> TokenBucket.Decision {
        acquire(device, now: now).decision
    }
}
