import FarmgateWire
import PostgresNIO

/// Enrollment tokens in the `enrollment_tokens` table (migrations 6 and 10); see ``EnrollmentStore``.
extension PostgresIngestStore: EnrollmentStore {
    public func createEnrollmentToken(
        farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], createdAt: Timestamp, expiresAt: Timestamp
    ) async throws -> EnrollmentTokenRecord {
        let hash = ByteBuffer(bytes: secretHash)
        let inserted: [(Int64, Int64)]
        do {
            inserted = try await rows(
                """
                INSERT INTO enrollment_tokens(farm_id, device_name, key_id, secret_sha256, created_at_us, expires_at_us)
                SELECT id, \(device.rawValue), \(keyID), \(hash), \(createdAt.microseconds), \(expiresAt.microseconds)
                FROM farms WHERE name = \(farm) RETURNING id, farm_id
                """
            ) { try $0.decode((Int64, Int64).self) }
        } catch let error as PSQLError where error.isUniqueViolation {
            throw IngestStoreError.alreadyExists("enrollment token id '\(keyID)'")
        }
        guard let (rowID, farmID) = inserted.first else { throw IngestStoreError.notFound("farm '\(farm)'") }
        return EnrollmentTokenRecord(
            rowID: rowID, farmID: farmID, farm: farm, device: device, keyID: keyID, secretHash: secretHash, createdAt: createdAt,
            expiresAt: expiresAt)
    }

    public func enrollmentToken(keyID: String) async throws -> EnrollmentTokenRecord? {
        try await rows(
            "SELECT \(unescaped: Self.tokenColumns) FROM enrollment_tokens t JOIN farms f ON f.id = t.farm_id WHERE t.key_id = \(keyID)",
            Self.enrollmentToken
        ).first
    }

    public func enrollmentTokens(farm: String?, usableAt: Timestamp?) async throws -> [EnrollmentTokenRecord] {
        var farmID: Int64?
        if let farm {
            guard let id = try await rows("SELECT id FROM farms WHERE name = \(farm)", { try $0.decode(Int64.self) }).first else {
                throw IngestStoreError.notFound("farm '\(farm)'")
            }
            farmID = id
        }
        let usable = usableAt?.microseconds
        return try await rows(
            """
            SELECT \(unescaped: Self.tokenColumns) FROM enrollment_tokens t JOIN farms f ON f.id = t.farm_id
            WHERE (\(farmID)::int8 IS NULL OR t.farm_id = \(farmID))
                AND (\(usable)::int8 IS NULL OR (t.used_at_us IS NULL AND t.revoked_at_us IS NULL AND t.expires_at_us > \(usable)))
            ORDER BY t.created_at_us DESC, t.id DESC
            """, Self.enrollmentToken)
    }

    public func revokeEnrollmentToken(keyID: String, at: Timestamp) async throws -> EnrollmentRevocation {
        let logger = self.logger
        return try await transaction { connection in
            // Against an exchange of the same token, the row lock orders the two and READ COMMITTED re-checks the WHERE
            // clause on the row the other changed: the token is either revoked or used, never both.
            var revoked = false
            for try await _ in try await connection.query(
                """
                UPDATE enrollment_tokens SET revoked_at_us = \(at.microseconds)
                WHERE key_id = \(keyID) AND used_at_us IS NULL AND revoked_at_us IS NULL AND expires_at_us > \(at.microseconds)
                RETURNING id
                """, logger: logger
            ).decode(Int64.self) { revoked = true }
            var forgot = false
            if !revoked {
                for try await _ in try await connection.query(
                    """
                    UPDATE enrollment_tokens SET sealed_key = NULL
                    WHERE key_id = \(keyID) AND used_at_us IS NOT NULL AND sealed_key IS NOT NULL RETURNING id
                    """, logger: logger
                ).decode(Int64.self) { forgot = true }
            }
            var record: EnrollmentTokenRecord?
            for try await row in try await connection.query(
                "SELECT \(unescaped: Self.tokenColumns) FROM enrollment_tokens t JOIN farms f ON f.id = t.farm_id WHERE t.key_id = \(keyID)",
                logger: logger)
            {
                record = try Self.enrollmentToken(row)
            }
            guard let record else { throw IngestStoreError.notFound("enrollment token '\(keyID)'") }
            return EnrollmentRevocation(record, revokedNow: revoked, forgotSealedKey: forgot)
        }
    }

    /// The columns ``enrollmentToken(_:)`` decodes, over `enrollment_tokens t` joined with `farms f`.
    private static let tokenColumns = """
        t.id, t.farm_id, f.name, t.device_name, t.secret_sha256, t.created_at_us, t.expires_at_us, t.used_at_us, t.used_by, t.action,
        t.sealed_key, t.key_id, t.revoked_at_us
        """

    @Sendable private static func enrollmentToken(_ row: PostgresRow) throws -> EnrollmentTokenRecord {
        let (rowID, farmID, farm, deviceName, hash, created, expires, used, usedBy, actionText, sealed, keyID, revoked) = try row.decode(
            (Int64, Int64, String, String, ByteBuffer, Int64, Int64, Int64?, String?, String?, ByteBuffer?, String, Int64?).self)
        var action: EnrollmentAnswer.Action?
        if let actionText {
            guard let parsed = EnrollmentAnswer.Action(rawValue: actionText) else { throw IngestStoreError.corrupt("enrollment action '\(actionText)'") }
            action = parsed
        }
        return EnrollmentTokenRecord(
            rowID: rowID, farmID: farmID, farm: farm, device: try pgDeviceID(deviceName), keyID: keyID,
            secretHash: Array(hash.readableBytesView), createdAt: Timestamp(microseconds: created), expiresAt: Timestamp(microseconds: expires),
            usedAt: used.map { Timestamp(microseconds: $0) }, usedBy: usedBy, action: action, sealedKey: sealed.map { Array($0.readableBytesView) },
            revokedAt: revoked.map { Timestamp(microseconds: $0) })
    }

    public func redeemEnrollmentToken(
        rowID: Int64, farmID: Int64, device: DeviceID, deviceKeyID: String, deviceSecretHash: [UInt8], sealedKey: [UInt8],
        client: String, at: Timestamp
    ) async throws -> EnrollmentRedemption {
        let sealed = ByteBuffer(bytes: sealedKey)
        let hash = ByteBuffer(bytes: deviceSecretHash)
        let logger = self.logger
        do {
            return try await transaction { connection in
                // Only an unused, unrevoked, unexpired token changes. A second exchange of the same token waits on the row lock of the
                // first and then finds it used (READ COMMITTED re-checks the WHERE clause on the updated row).
                var claimed = false
                for try await _ in try await connection.query(
                    """
                    UPDATE enrollment_tokens SET used_at_us = \(at.microseconds), used_by = \(client), sealed_key = \(sealed)
                    WHERE id = \(rowID) AND used_at_us IS NULL AND revoked_at_us IS NULL AND expires_at_us > \(at.microseconds)
                    RETURNING id
                    """, logger: logger
                ).decode(Int64.self) { claimed = true }
                guard claimed else { return .notRedeemable }
                var farmName: String?
                for try await name in try await connection.query("SELECT name FROM farms WHERE id = \(farmID)", logger: logger).decode(String.self) {
                    farmName = name
                }
                guard let farmName else { throw IngestStoreError.notFound("farm #\(farmID)") }
                // One statement creates the device or gives it the new key; xmax = 0 only on a row this statement inserted.
                var result: (Int64, Bool)?
                for try await row in try await connection.query(
                    """
                    INSERT INTO devices(farm_id, name, key_id, secret_sha256, created_at_us)
                    VALUES (\(farmID), \(device.rawValue), \(deviceKeyID), \(hash), \(at.microseconds))
                    ON CONFLICT (farm_id, name) DO UPDATE SET
                        key_id = excluded.key_id, secret_sha256 = excluded.secret_sha256, revoked = false, revoked_at_us = NULL
                    RETURNING id::int8, (xmax = 0)
                    """, logger: logger
                ).decode((Int64, Bool).self) { result = row }
                guard let (deviceRow, inserted) = result else { throw IngestStoreError.corrupt("enrolling device '\(device)' returned no row") }
                let action: EnrollmentAnswer.Action = inserted ? .created : .rotated
                try await connection.query(
                    "UPDATE enrollment_tokens SET device_id = \(Int32(truncatingIfNeeded: deviceRow)), action = \(action.rawValue) WHERE id = \(rowID)",
                    logger: logger)
                return .redeemed(DeviceIdentity(farmID: farmID, farm: farmName, rowID: deviceRow, device: device), action)
            }
        } catch let error as PSQLError where error.isUniqueViolation {
            throw IngestStoreError.alreadyExists("API key id '\(deviceKeyID)'")
        }
    }

    @discardableResult
    public func forgetSealedEnrollmentKeys(usedBefore: Timestamp) async throws -> Int {
        try await rows(
            "UPDATE enrollment_tokens SET sealed_key = NULL WHERE sealed_key IS NOT NULL AND used_at_us < \(usedBefore.microseconds) RETURNING id"
        ) { try $0.decode(Int64.self) }.count
    }
}
