import FarmgateSupport
import FarmgateWire

/// Enrollment tokens in the `enrollment_tokens` table (migrations 7 and 10); see ``EnrollmentStore``.
extension SQLiteIngestStore: EnrollmentStore {
    public func createEnrollmentToken(
        farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], createdAt: Timestamp, expiresAt: Timestamp
    ) async throws -> EnrollmentTokenRecord {
        try await writer.withValue { db in
            try db.connection.transaction { () throws -> EnrollmentTokenRecord in
                guard let farmID = try db.connection.queryInt("SELECT id FROM farms WHERE name = ?", [.text(farm)]) else {
                    throw IngestStoreError.notFound("farm '\(farm)'")
                }
                do {
                    try db.connection.query(
                        """
                        INSERT INTO enrollment_tokens(farm_id, device_name, key_id, secret_sha256, created_at_us, expires_at_us)
                        VALUES (?, ?, ?, ?, ?, ?)
                        """,
                        [
                            .integer(farmID), .text(device.rawValue), .text(keyID), .blob(secretHash), .integer(createdAt.microseconds),
                            .integer(expiresAt.microseconds),
                        ])
                } catch let error as SQLiteError where error.isConstraint {
                    throw IngestStoreError.alreadyExists("enrollment token id '\(keyID)'")
                }
                return EnrollmentTokenRecord(
                    rowID: db.connection.lastInsertRowID, farmID: farmID, farm: farm, device: device, keyID: keyID, secretHash: secretHash,
                    createdAt: createdAt, expiresAt: expiresAt)
            }
        }
    }

    public func enrollmentToken(keyID: String) async throws -> EnrollmentTokenRecord? {
        try await reader.withValue { db in try Self.enrollmentTokens(db, where: "t.key_id = ?", [.text(keyID)]).first }
    }

    public func enrollmentTokens(farm: String?, usableAt: Timestamp?) async throws -> [EnrollmentTokenRecord] {
        try await reader.withValue { db in
            var conditions: [String] = []
            var values: [SQLiteValue] = []
            if let farm {
                guard let farmID = try db.connection.queryInt("SELECT id FROM farms WHERE name = ?", [.text(farm)]) else {
                    throw IngestStoreError.notFound("farm '\(farm)'")
                }
                conditions.append("t.farm_id = ?")
                values.append(.integer(farmID))
            }
            if let usableAt {
                conditions.append("t.used_at_us IS NULL AND t.revoked_at_us IS NULL AND t.expires_at_us > ?")
                values.append(.integer(usableAt.microseconds))
            }
            return try Self.enrollmentTokens(db, where: conditions.isEmpty ? "1" : conditions.joined(separator: " AND "), values)
        }
    }

    public func revokeEnrollmentToken(keyID: String, at: Timestamp) async throws -> EnrollmentRevocation {
        try await writer.withValue { db in
            try db.connection.transaction { () throws -> EnrollmentRevocation in
                // The writer's BEGIN IMMEDIATE orders this against an exchange of the same token: one of them wins.
                try db.connection.query(
                    """
                    UPDATE enrollment_tokens SET revoked_at_us = ?
                    WHERE key_id = ? AND used_at_us IS NULL AND revoked_at_us IS NULL AND expires_at_us > ?
                    """, [.integer(at.microseconds), .text(keyID), .integer(at.microseconds)])
                let revoked = db.connection.changes == 1
                var forgot = false
                if !revoked {
                    try db.connection.query(
                        "UPDATE enrollment_tokens SET sealed_key = NULL WHERE key_id = ? AND used_at_us IS NOT NULL AND sealed_key IS NOT NULL",
                        [.text(keyID)])
                    forgot = db.connection.changes == 1
                }
                guard let record = try Self.enrollmentTokens(db, where: "t.key_id = ?", [.text(keyID)]).first else {
                    throw IngestStoreError.notFound("enrollment token '\(keyID)'")
                }
                return EnrollmentRevocation(record, revokedNow: revoked, forgotSealedKey: forgot)
            }
        }
    }

    /// The tokens matching `condition` (over `enrollment_tokens t` joined with `farms f`), newest first.
    private static func enrollmentTokens(_ db: CachedConnection, where condition: String, _ values: [SQLiteValue]) throws -> [EnrollmentTokenRecord] {
        try db.withStatement(
            """
            SELECT t.id, t.farm_id, f.name, t.device_name, t.secret_sha256, t.created_at_us, t.expires_at_us, t.used_at_us, t.used_by,
                t.action, t.sealed_key, t.key_id, t.revoked_at_us
            FROM enrollment_tokens t JOIN farms f ON f.id = t.farm_id WHERE \(condition)
            ORDER BY t.created_at_us DESC, t.id DESC
            """, values
        ) { statement throws -> [EnrollmentTokenRecord] in
            var records: [EnrollmentTokenRecord] = []
            while try statement.step() {
                let device: DeviceID
                do { device = try DeviceID(statement.text(3)) } catch { throw IngestStoreError.corrupt("\(error)") }
                var action: EnrollmentAnswer.Action?
                if !statement.isNull(9) {
                    guard let parsed = EnrollmentAnswer.Action(rawValue: statement.text(9)) else {
                        throw IngestStoreError.corrupt("enrollment action '\(statement.text(9))'")
                    }
                    action = parsed
                }
                records.append(
                    EnrollmentTokenRecord(
                        rowID: statement.int64(0), farmID: statement.int64(1), farm: statement.text(2), device: device, keyID: statement.text(11),
                        secretHash: statement.blob(4), createdAt: Timestamp(microseconds: statement.int64(5)),
                        expiresAt: Timestamp(microseconds: statement.int64(6)),
                        usedAt: statement.isNull(7) ? nil : Timestamp(microseconds: statement.int64(7)),
                        usedBy: statement.isNull(8) ? nil : statement.text(8), action: action,
                        sealedKey: statement.isNull(10) ? nil : statement.blob(10),
                        revokedAt: statement.isNull(12) ? nil : Timestamp(microseconds: statement.int64(12))))
            }
            return records
        }
    }

    public func redeemEnrollmentToken(
        rowID: Int64, farmID: Int64, device: DeviceID, deviceKeyID: String, deviceSecretHash: [UInt8], sealedKey: [UInt8],
        client: String, at: Timestamp
    ) async throws -> EnrollmentRedemption {
        try await writer.withValue { db in
            try db.connection.transaction { () throws -> EnrollmentRedemption in
                // Only an unused, unrevoked, unexpired token changes; the writer's BEGIN IMMEDIATE serialises exchanges of one token.
                try db.connection.query(
                    """
                    UPDATE enrollment_tokens SET used_at_us = ?, used_by = ?, sealed_key = ?
                    WHERE id = ? AND used_at_us IS NULL AND revoked_at_us IS NULL AND expires_at_us > ?
                    """, [.integer(at.microseconds), .text(client), .blob(sealedKey), .integer(rowID), .integer(at.microseconds)])
                guard db.connection.changes == 1 else { return .notRedeemable }
                guard let farm = try db.connection.query("SELECT name FROM farms WHERE id = ?", [.integer(farmID)]).first?.first,
                    case .text(let farmName) = farm
                else { throw IngestStoreError.notFound("farm #\(farmID)") }
                let existing = try db.connection.queryInt(
                    "SELECT id FROM devices WHERE farm_id = ? AND name = ?", [.integer(farmID), .text(device.rawValue)])
                let action: EnrollmentAnswer.Action
                let deviceRow: Int64
                do {
                    if let existing {
                        try db.connection.query(
                            "UPDATE devices SET key_id = ?, secret_sha256 = ?, revoked = 0, revoked_at_us = NULL WHERE id = ?",
                            [.text(deviceKeyID), .blob(deviceSecretHash), .integer(existing)])
                        (action, deviceRow) = (.rotated, existing)
                    } else {
                        try db.connection.query(
                            "INSERT INTO devices(farm_id, name, key_id, secret_sha256, created_at_us) VALUES (?, ?, ?, ?, ?)",
                            [.integer(farmID), .text(device.rawValue), .text(deviceKeyID), .blob(deviceSecretHash), .integer(at.microseconds)])
                        (action, deviceRow) = (.created, db.connection.lastInsertRowID)
                    }
                } catch let error as SQLiteError where error.isConstraint {
                    throw IngestStoreError.alreadyExists("API key id '\(deviceKeyID)'")
                }
                try db.connection.query(
                    "UPDATE enrollment_tokens SET device_id = ?, action = ? WHERE id = ?",
                    [.integer(deviceRow), .text(action.rawValue), .integer(rowID)])
                return .redeemed(DeviceIdentity(farmID: farmID, farm: farmName, rowID: deviceRow, device: device), action)
            }
        }
    }

    @discardableResult
    public func forgetSealedEnrollmentKeys(usedBefore: Timestamp) async throws -> Int {
        try await writer.withValue { db in
            try db.connection.query(
                "UPDATE enrollment_tokens SET sealed_key = NULL WHERE sealed_key IS NOT NULL AND used_at_us < ?", [.integer(usedBefore.microseconds)])
            return db.connection.changes
        }
    }
}
