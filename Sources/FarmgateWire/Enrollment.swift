/// Enrollment: a site exchanges a one-time token (`fge_…`, from `farmgate-ingest enroll-token create`) for its device
/// key, so that the key itself never has to be copied by hand (`farmgate enroll URL TOKEN`).
///
/// `POST /v1/enroll` with `Authorization: Bearer fge_…` and an optional JSON body ``EnrollmentRequest``; the answer is an
/// ``EnrollmentAnswer``, or an error body (``APIErrorBody``) with one of ``EnrollmentErrorCode``.
public enum EnrollmentProtocol {
    /// Where a token is exchanged.
    public static let path = "/v1/enroll"
    /// The prefix of an enrollment token.
    public static let tokenPrefix = "fge_"
}

/// What the site may say when it exchanges a token: `{"device": "greenhouse-1"}`.
///
/// `device` is the `[device] id` of the site's configuration, when it has one: a token made for another device is then
/// refused (409 `device_mismatch`) and **not** used up, so the installer can fix the mistake and try again.
public struct EnrollmentRequest: Codable, Hashable, Sendable {
    public var device: String?

    public init(device: String? = nil) {
        self.device = device
    }
}

/// The answer to a successful exchange:
/// `{"farm": "f", "device": "d", "key": "fgd_…", "action": "created", "repeated": false}`.
public struct EnrollmentAnswer: Codable, Hashable, Sendable {
    /// What the exchange did to the device.
    public enum Action: String, Codable, Hashable, Sendable {
        /// The device did not exist: it was registered with this key.
        case created
        /// The device existed: it got this new key, and its old key stopped working (its sensors and readings are kept,
        /// a revocation is lifted).
        case rotated
    }

    public var farm: String
    public var device: String
    /// The device key (`fgd_…`). Write it where the agent reads it; never print it.
    public var key: String
    public var action: Action
    /// True when the token had already been exchanged moments ago (the first answer was lost): this is the same key
    /// again, not a new one, and nothing changed on the ingest.
    public var repeated: Bool

    public init(farm: String, device: String, key: String, action: Action, repeated: Bool) {
        self.farm = farm
        self.device = device
        self.key = key
        self.action = action
        self.repeated = repeated
    }
}

/// The stable error codes of `POST /v1/enroll`.
public enum EnrollmentErrorCode {
    /// 401: no token, a malformed one, or one the ingest does not know (mistyped, or made on another ingest).
    public static let invalidToken = "invalid_token"
    /// 410: the token's time to live has passed; make a new one.
    public static let tokenExpired = "token_expired"
    /// 410: the token was used already, longer ago than the grace window in which the same answer is given again.
    public static let tokenUsed = "token_used"
    /// 410: the token was revoked (`farmgate-ingest enroll-token revoke`) before it was used; make a new one.
    public static let tokenRevoked = "token_revoked"
    /// 409: the site's `[device] id` is not the device the token was made for; the token is not used up.
    public static let deviceMismatch = "device_mismatch"
    /// 429: too many enrollment attempts from this address; `Retry-After` says when to try again.
    public static let rateLimited = "rate_limited"
}
