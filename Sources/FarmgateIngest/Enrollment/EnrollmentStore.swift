public import FarmgateWire

/// Where the ingest keeps one-time enrollment tokens (SQLite migration 7, PostgreSQL migration 6: `enrollment_tokens`;
/// `revoked_at_us` since SQLite migration 10, PostgreSQL migration 10).
///
/// A token names a farm and a device (which need not exist yet). The store keeps only the SHA-256 of its secret. When it
/// is exchanged, the device is created with a new key or given one (``redeemEnrollmentToken(rowID:farmID:device:deviceKeyID:deviceSecretHash:sealedKey:client:at:)``),
/// in the same transaction that marks the token used, so a token yields at most one key, and never a second device.
///
/// So that an exchange whose answer was lost can be repeated, the new key is kept beside the token for a grace window,
/// **sealed** with a key derived from the token's secret (``EnrollmentSeal``): the store alone cannot open it, only the
/// holder of the token. After the window the sealed key is forgotten.
public protocol EnrollmentStore: Sendable {
    /// Stores a new token for `device` of `farm`. Throws ``IngestStoreError/notFound(_:)`` for an unknown farm and
    /// ``IngestStoreError/alreadyExists(_:)`` (starting with "enrollment token id") when the key id is taken.
    func createEnrollmentToken(
        farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], createdAt: Timestamp, expiresAt: Timestamp
    ) async throws -> EnrollmentTokenRecord

    /// The token with id `keyID`, used or not, or nil.
    func enrollmentToken(keyID: String) async throws -> EnrollmentTokenRecord?

    /// Tokens newest first (by creation, then row), of `farm` or of every farm.
    ///
    /// - Parameters:
    ///   - farm: only this farm's tokens; nil for every farm.
    ///   - usableAt: when given, only the tokens that could still be exchanged then: unused, unrevoked and expiring after
    ///     it. Nil lists every token, used, expired and revoked ones too.
    /// - Throws: ``IngestStoreError/notFound(_:)`` naming the farm when `farm` does not exist.
    func enrollmentTokens(farm: String?, usableAt: Timestamp?) async throws -> [EnrollmentTokenRecord]

    /// Revokes the token `keyID` at `at`, provided it is unused, unrevoked and unexpired then: from now on
    /// ``redeemEnrollmentToken(rowID:farmID:device:deviceKeyID:deviceSecretHash:sealedKey:client:at:)`` refuses it.
    /// A token that was already used is not marked revoked (the device key it produced is not the token's to withdraw),
    /// but its sealed key is forgotten, so that the same answer cannot be fetched again with it.
    ///
    /// - Returns: what happened (see ``EnrollmentRevocation``), with the token as it is now.
    /// - Throws: ``IngestStoreError/notFound(_:)`` naming the token when no token has id `keyID`.
    func revokeEnrollmentToken(keyID: String, at: Timestamp) async throws -> EnrollmentRevocation

    /// In one transaction: marks the token `rowID` used by `client` at `at` with the sealed key, provided it is still
    /// unused, unrevoked and unexpired at `at`; then creates `device` in farm `farmID` with the key, or, when it exists, replaces its
    /// key and lifts a revocation (its sensors and readings are kept).
    ///
    /// - Returns: what happened; ``EnrollmentRedemption/notRedeemable`` (nothing changed) when another exchange used the
    ///   token first, or it expired or was revoked meanwhile: read it again to answer.
    /// - Throws: ``IngestStoreError/alreadyExists(_:)`` starting with "API key id" when the device key id is taken (draw
    ///   another key; nothing changed).
    func redeemEnrollmentToken(
        rowID: Int64, farmID: Int64, device: DeviceID, deviceKeyID: String, deviceSecretHash: [UInt8], sealedKey: [UInt8],
        client: String, at: Timestamp
    ) async throws -> EnrollmentRedemption

    /// Forgets the sealed keys of tokens used before `usedBefore` (the grace window is over: the same answer is never
    /// given again, so nothing needs to keep it).
    ///
    /// - Returns: how many were forgotten.
    @discardableResult
    func forgetSealedEnrollmentKeys(usedBefore: Timestamp) async throws -> Int
}

/// A stored enrollment token (never its secret: only the SHA-256).
public struct EnrollmentTokenRecord: Sendable, Hashable {
    public var rowID: Int64
    public var farmID: Int64
    public var farm: String
    public var device: DeviceID
    /// The public part of the token (`fge_<keyID>_…`), also what the log names it by.
    public var keyID: String
    public var secretHash: [UInt8]
    public var createdAt: Timestamp
    public var expiresAt: Timestamp
    /// When it was exchanged, or nil while it is unused.
    public var usedAt: Timestamp?
    /// The client address that exchanged it.
    public var usedBy: String?
    /// What the exchange did to the device.
    public var action: EnrollmentAnswer.Action?
    /// The device key sealed with the token's secret, kept for the grace window after the exchange.
    public var sealedKey: [UInt8]?
    /// When `farmgate-ingest enroll-token revoke` withdrew it (before it was used), or nil.
    public var revokedAt: Timestamp?

    public init(
        rowID: Int64, farmID: Int64, farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], createdAt: Timestamp,
        expiresAt: Timestamp, usedAt: Timestamp? = nil, usedBy: String? = nil, action: EnrollmentAnswer.Action? = nil, sealedKey: [UInt8]? = nil,
        revokedAt: Timestamp? = nil
    ) {
        self.rowID = rowID
        self.farmID = farmID
        self.farm = farm
        self.device = device
        self.keyID = keyID
        self.secretHash = secretHash
        self.createdAt = createdAt
        self.expiresAt = expiresAt
        self.usedAt = usedAt
        self.usedBy = usedBy
        self.action = action
        self.sealedKey = sealedKey
        self.revokedAt = revokedAt
    }

    /// What the token is at `now`: revoked before used, used before expired.
    public func state(at now: Timestamp) -> EnrollmentTokenState {
        if let revokedAt { return .revoked(at: revokedAt) }
        if let usedAt { return .used(at: usedAt, by: usedBy) }
        if expiresAt <= now { return .expired }
        return .unused
    }
}

/// The state of an enrollment token at some time (``EnrollmentTokenRecord/state(at:)``).
public enum EnrollmentTokenState: Sendable, Hashable {
    /// It can still be exchanged.
    case unused
    /// It was exchanged at `at` by the client address `by`.
    case used(at: Timestamp, by: String?)
    /// Its time to live passed unused.
    case expired
    /// It was revoked unused at `at`.
    case revoked(at: Timestamp)

    /// The state's name in `enroll-token list --json`: unused, used, expired or revoked.
    public var name: String {
        switch self {
        case .unused: "unused"
        case .used: "used"
        case .expired: "expired"
        case .revoked: "revoked"
        }
    }
}

/// The outcome of ``EnrollmentStore/revokeEnrollmentToken(keyID:at:)``; each carries the token as it is now.
public enum EnrollmentRevocation: Sendable, Hashable {
    /// The token was usable and is now revoked.
    case revoked(EnrollmentTokenRecord)
    /// It had been revoked before; nothing changed.
    case alreadyRevoked(EnrollmentTokenRecord)
    /// It had been used; it is not marked revoked and the device key it produced is untouched.
    /// `forgotSealedKey` says whether the grace window's sealed key was still kept and is now forgotten (the same
    /// answer can no longer be fetched with the token).
    case alreadyUsed(EnrollmentTokenRecord, forgotSealedKey: Bool)
    /// It expired unused; nothing changed.
    case expired(EnrollmentTokenRecord)
}

/// The outcome of ``EnrollmentStore/redeemEnrollmentToken(rowID:farmID:device:deviceKeyID:deviceSecretHash:sealedKey:client:at:)``.
public enum EnrollmentRedemption: Sendable, Hashable {
    /// The token is now used; the device was created or got the new key.
    case redeemed(DeviceIdentity, EnrollmentAnswer.Action)
    /// Nothing changed: the token was used by another exchange first, or it expired or was revoked.
    case notRedeemable
}

extension EnrollmentRevocation {
    /// What a revocation did, from the token read back in its transaction.
    ///
    /// - Parameters:
    ///   - revokedNow: whether the transaction marked the token revoked.
    ///   - forgotSealedKey: whether it forgot the sealed key of a used token.
    init(_ record: EnrollmentTokenRecord, revokedNow: Bool, forgotSealedKey: Bool) {
        if revokedNow {
            self = .revoked(record)
        } else if record.revokedAt != nil {
            self = .alreadyRevoked(record)
        } else if record.usedAt != nil {
            self = .alreadyUsed(record, forgotSealedKey: forgotSealedKey)
        } else {
            self = .expired(record)
        }
    }
}
