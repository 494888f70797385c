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
        let microseconds = ttl.components.seconds * 1_000_000 + ttl.components.attoseconds / 1_000_000_000_000
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
