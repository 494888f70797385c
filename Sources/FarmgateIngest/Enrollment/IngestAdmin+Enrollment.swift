import FarmgateSupport
public import FarmgateWire

extension IngestAdmin {
    /// The longest time to live of an enrollment token: a token is a credential until it is used.
    public static let maximumEnrollmentTTL: Duration = .seconds(30 * 86_400)

    /// A new one-time enrollment token for `device` of `farm` (the device need not exist: the exchange creates it, or gives
    /// an existing one a new key). The token is returned only now: the store keeps its hash.
    ///
    /// - Parameters:
    ///   - ttl: how long the token may be exchanged, 1 minute to 30 days.
    ///   - store: where tokens go (the same store as ``store``, seen in its ``EnrollmentStore`` role).
    /// - Throws: ``IngestStoreError/notFound(_:)`` for an unknown farm.
    public func createEnrollmentToken(
        farm: String, device: DeviceID, ttl: Duration, in store: any EnrollmentStore, now: Timestamp = .now()
    ) async throws -> (token: APIKey, record: EnrollmentTokenRecord) {
        let microseconds = ttl.wholeMicroseconds
        for attempt in 1...5 {
            let key = APIKey.generate(kind: .enrollment)
            do {
                let record = try await store.createEnrollmentToken(
                    farm: farm, device: device, keyID: key.keyID, secretHash: key.secretHash, createdAt: now,
                    expiresAt: Timestamp(microseconds: now.microseconds + microseconds))
                return (key, record)
            } catch IngestStoreError.alreadyExists(let what) where what.hasPrefix("enrollment token id") && attempt < 5 {
                continue
            }
        }
        throw IngestStoreError.alreadyExists("enrollment token id")
    }
}

extension IngestAdmin {
    /// The enrollment tokens of `farm` (or of every farm), newest first.
    ///
    /// - Parameters:
    ///   - all: also the tokens that can no longer be exchanged (used, expired, revoked); by default only usable ones.
    /// - Throws: ``IngestStoreError/notFound(_:)`` for an unknown farm.
    public func enrollmentTokens(
        farm: String?, all: Bool, in store: any EnrollmentStore, now: Timestamp = .now()
    ) async throws -> [EnrollmentTokenRecord] {
        try await store.enrollmentTokens(farm: farm, usableAt: all ? nil : now)
    }

    /// Revokes the enrollment token `keyID` now, if it can still be exchanged (see
    /// ``EnrollmentStore/revokeEnrollmentToken(keyID:at:)``). The device key an earlier exchange produced is untouched.
    ///
    /// - Throws: ``IngestStoreError/notFound(_:)`` naming the token when no token has that id.
    public func revokeEnrollmentToken(keyID: String, in store: any EnrollmentStore, now: Timestamp = .now()) async throws -> EnrollmentRevocation {
        try await store.revokeEnrollmentToken(keyID: keyID, at: now)
    }
}

/// One token as `farmgate-ingest enroll-token list --json` prints it: never the secret nor its hash.
public struct EnrollmentTokenListing: Sendable, Hashable, Codable {
    /// The token's id, the `<id>` of `fge_<id>_<secret>`.
    public var keyID: String
    public var farm: String
    public var device: String
    /// RFC 3339, UTC.
    public var created: String
    /// RFC 3339, UTC.
    public var expires: String
    /// unused, used, expired or revoked (``EnrollmentTokenState/name``).
    public var state: String
    /// When it was exchanged (RFC 3339), for a used token.
    public var usedAt: String?
    /// The client address that exchanged it, for a used token.
    public var usedBy: String?
    /// What the exchange did to the device: created or rotated, for a used token.
    public var action: String?
    /// When it was revoked (RFC 3339), for a revoked token.
    public var revokedAt: String?

    enum CodingKeys: String, CodingKey {
        case keyID = "key_id", farm, device, created, expires, state
        case usedAt = "used_at", usedBy = "used_by", action
        case revokedAt = "revoked_at"
    }

    public init(_ record: EnrollmentTokenRecord, now: Timestamp) {
        keyID = record.keyID
        farm = record.farm
        device = record.device.rawValue
        created = RFC3339.format(record.createdAt)
        expires = RFC3339.format(record.expiresAt)
        let state = record.state(at: now)
        self.state = state.name
        if case .used(let at, let by) = state {
            usedAt = RFC3339.format(at)
            usedBy = by
            action = record.action?.rawValue
        }
        if case .revoked(let at) = state { revokedAt = RFC3339.format(at) }
    }

    /// The STATE column of the table: unused, `used at T from ADDRESS`, expired, or `revoked at T`.
    public var stateText: String {
        switch state {
        case "used": "used at \(usedAt ?? "?") from \(usedBy ?? "an unknown address")"
        case "revoked": "revoked at \(revokedAt ?? "?")"
        default: state
        }
    }
}
