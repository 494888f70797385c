public import HTTPTypes

/// What a rate limiter decided for one request and what the caller has left, rendered as response headers.
///
/// ## Which headers, and why both forms
/// Every answer that went through a limiter carries two forms of the same numbers:
///
/// - the current IETF draft (draft-ietf-httpapi-ratelimit-headers, revisions 08 and later): the structured fields
///   `RateLimit-Policy: "device";q=40;w=2` (quota `q` requests, refilled over `w` seconds) and
///   `RateLimit: "device";r=12;t=2` (`r` requests left, the quota fully restored in `t` seconds);
/// - the older draft's `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` (same meanings, plain integers),
///   which is what most deployed clients, proxies and HTTP libraries read today.
///
/// The draft is not an RFC yet and its field syntax changed between revisions; the older fields are what clients
/// actually parse. Sending both costs a few dozen bytes and serves both kinds of client. A 429 also carries
/// `Retry-After` (RFC 9110), the only one of these a client must obey; the agent does.
///
/// Our limiters are token buckets, so "the quota resets" means the bucket is full again: `t` and `RateLimit-Reset` can be
/// longer than `Retry-After`, which is when the next single request will be accepted.
public struct RateLimitStatus: Sendable, Hashable {
    /// The policy's name (`device`, `read`, `auth_failures`).
    public var policy: String
    /// The bucket's size: requests allowed at once.
    public var limit: Int
    /// How long an empty bucket takes to fill.
    public var window: Duration
    /// Whole requests left.
    public var remaining: Int
    /// How long until the bucket is full again.
    public var reset: Duration
    /// Set when the request was refused: when one token will be there again.
    public var retryAfter: Duration?

    public init(policy: String, limit: Int, window: Duration, remaining: Int, reset: Duration, retryAfter: Duration?) {
        self.policy = policy
        self.limit = limit
        self.window = window
        self.remaining = remaining
        self.reset = reset
        self.retryAfter = retryAfter
    }

    /// Whether the request was refused.
    public var isLimited: Bool { retryAfter != nil }

    /// The decision alone, as ``TokenBucket`` states it.
    public var decision: TokenBucket.Decision { retryAfter.map { .limited(retryAfter: $0) } ?? .allowed }

    /// `Retry-After` in whole seconds, at least 1 (the header has no fractions; 0 would invite an immediate retry).
    public var retryAfterSeconds: Int { retryAfter.map { Self.wholeSeconds($0, minimum: 1) } ?? 0 }

    /// The rate-limit headers described on the type; `Retry-After` too when the request was refused.
    public var headers: HTTPFields {
        var fields = HTTPFields()
        add(to: &fields)
        return fields
    }

    /// Adds the headers described on the type to `fields` (replacing earlier values).
    public func add(to fields: inout HTTPFields) {
        let window = Self.wholeSeconds(window, minimum: 1)
        let reset = Self.wholeSeconds(reset, minimum: 0)
        let remaining = max(remaining, 0)
        fields[HTTPField.Name.rateLimitPolicy] = "\"\(policy)\";q=\(limit);w=\(window)"
        fields[HTTPField.Name.rateLimit] = "\"\(policy)\";r=\(remaining);t=\(reset)"
        fields[HTTPField.Name.rateLimitLimit] = String(limit)
        fields[HTTPField.Name.rateLimitRemaining] = String(remaining)
        fields[HTTPField.Name.rateLimitReset] = String(reset)
        if isLimited { fields[.retryAfter] = String(retryAfterSeconds) }
    }

    static func wholeSeconds(_ duration: Duration, minimum: Int) -> Int {
        max(minimum, Int((duration / .seconds(1)).rounded(.up)))
    }
}

extension HTTPField.Name {
    // The names are constant, valid tokens: the initialiser cannot fail for them; the fallback only satisfies the type.
    static let rateLimitPolicy = HTTPField.Name("RateLimit-Policy") ?? .retryAfter
    static let rateLimit = HTTPField.Name("RateLimit") ?? .retryAfter
    static let rateLimitLimit = HTTPField.Name("RateLimit-Limit") ?? .retryAfter
    static let rateLimitRemaining = HTTPField.Name("RateLimit-Remaining") ?? .retryAfter
    static let rateLimitReset = HTTPField.Name("RateLimit-Reset") ?? .retryAfter
}
