import Hummingbird

/// Limits failed authentications per client address (a token bucket per IPv4 address or IPv6 /64, in a bounded table).
///
/// ``admit(_:now:)`` only looks at the bucket; ``recordFailure(_:now:)`` takes a token. So successes cost nothing, and a
/// client is refused only once its failures have emptied its bucket. While refused, every request of that address that
/// needs a key is answered 429 (it cannot be told apart from the flood without asking the store).
public final class FailedAuthenticationLimiter: Sendable {
    let limiter: KeyedRateLimiter<ClientAddress>

    /// - Parameters:
    ///   - rate: failed authentications per second and address, once the burst is spent.
    ///   - burst: failed authentications an address may make at once.
    ///   - maxClients: addresses tracked at once; past it, new addresses share one bucket.
    public init(rate: Double, burst: Int, maxClients: Int = 10_000) {
        limiter = KeyedRateLimiter(rate: rate, burst: burst, maxKeys: maxClients, policy: "auth_failures")
    }

    /// Throws 429 `rate_limited` with `Retry-After` and the rate-limit headers when `client` has no failure left.
    func admit(_ client: ClientAddress, now: ContinuousClock.Instant = .now) throws(APIError) {
        let status = limiter.peek(client, now: now)
        guard status.isLimited else { return }
        throw APIError(
            .tooManyRequests, code: "rate_limited",
            message:
                "too many failed authentications from this address (more than \(limiter.burst) at once or \(limiter.rate) per second); retry after \(status.retryAfterSeconds) s with a valid key",
            headers: status.headers)
    }

    /// Counts one failed authentication of `client`.
    func recordFailure(_ client: ClientAddress, now: ContinuousClock.Instant = .now) {
        _ = limiter.acquire(client, now: now)
    }
}
