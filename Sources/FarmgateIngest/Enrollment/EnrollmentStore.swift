public import FarmgateWire

/// Where the ingest keeps one-time enrollment tokens (SQLite migration 7, PostgreSQL migration 6: `enrollment_tokens`).
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

    /// In one transaction: marks the token `rowID` used by `client` at `at` with the sealed key, provided it is still
    /// unused and unexpired at `at`; then creates `device` in farm `farmID` with the key, or, when it exists, replaces its
    /// key and lifts a revocation (its sensors and readings are kept).
    ///
    /// - Returns: what happened; ``EnrollmentRedemption/notRedeemable`` (nothing changed) when another exchange used the
    ///   token first or it expired meanwhile: read it again to answer.
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

    public init(
        rowID: Int64, farmID: Int64, farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], createdAt: Timestamp,
        expiresAt: Timestamp, usedAt: Timestamp? = nil, usedBy: String? = nil, action: EnrollmentAnswer.Action? = nil, sealedKey: [UInt8]? = nil
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
    }
}

/// The outcome of ``EnrollmentStore/redeemEnrollmentToken(rowID:farmID:device:deviceKeyID:deviceSecretHash:sealedKey:client:at:)``.
public enum EnrollmentRedemption: Sendable, Hashable {
    /// The token is now used; the device was created or got the new key.
    case redeemed(DeviceIdentity, EnrollmentAnswer.Action)
    /// Nothing changed: the token was used by another exchange first, or it expired.
    case notRedeemable
}
