import FarmgateSupport
public import FarmgateWire
import Foundation
import Logging

/// Alert rules, alerts, transitions, silences and the engine's watermarks in the SQLite store (migration 5).
/// Writes run on the writer thread, each in one transaction; reads on the reader thread.
extension SQLiteIngestStore: AlertStore {
    // MARK: Rules

    public func putAlertRule(farmID: Int64, rule: AlertRule, replace: Bool, at: Timestamp) async throws {
        let json = try alertJSON(rule)
        try await writer.withValue { db in
            if replace {
                try db.connection.query(
                    """
                    INSERT INTO alert_rules(farm_id, name, definition, updated_at_us) VALUES (?, ?, ?, ?)
                    ON CONFLICT (farm_id, name) DO UPDATE SET definition = excluded.definition, updated_at_us = excluded.updated_at_us
                    """, [.integer(farmID), .text(rule.name), .text(json), .integer(at.microseconds)])
            } else {
                do {
                    try db.connection.query(
                        "INSERT INTO alert_rules(farm_id, name, definition, updated_at_us) VALUES (?, ?, ?, ?)",
                        [.integer(farmID), .text(rule.name), .text(json), .integer(at.microseconds)])
                } catch let error as SQLiteError where error.isConstraint {
                    throw IngestStoreError.alreadyExists("alert rule '\(rule.name)'")
                }
            }
        }
    }

    public func alertRules(farmID: Int64?) async throws -> [StoredAlertRule] {
        let rows = try await reader.withValue { db in
            try db.connection.query(
                """
                SELECT r.farm_id, f.name, r.definition, r.updated_at_us FROM alert_rules r JOIN farms f ON f.id = r.farm_id
                WHERE ? IS NULL OR r.farm_id = ? ORDER BY f.name, r.name
                """, [farmID.map { .integer($0) } ?? .null, farmID.map { .integer($0) } ?? .null])
        }
        return try rows.map { row in
            StoredAlertRule(
                farmID: row.int(0), farm: row.string(1), rule: try decodeAlertJSON(AlertRule.self, row.string(2)),
                updatedAt: Timestamp(microseconds: row.int(3)))
        }
    }

    public func removeAlertRule(farmID: Int64, name: String) async throws -> Bool {
        try await writer.withValue { db in
            try db.connection.query("DELETE FROM alert_rules WHERE farm_id = ? AND name = ?", [.integer(farmID), .text(name)])
            return db.connection.changes > 0
        }
    }

    public func alertConfigurationStamp() async throws -> String {
        let rows = try await reader.withValue { db in
            try db.connection.query("SELECT version FROM alert_configuration_version WHERE id = 1")
        }
        return rows.first.map { String($0.int(0)) } ?? ""
    }

    // MARK: Silences

    public func addAlertSilence(farmID: Int64, _ silence: AlertSilence) async throws -> Int64 {
        let matchers = try alertJSON(silence.matchers)
        return try await writer.withValue { db in
            try db.connection.query(
                "INSERT INTO alert_silences(farm_id, matchers, starts_at_us, ends_at_us, created_by, comment) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    .integer(farmID), .text(matchers), .integer(silence.startsAt.microseconds), .integer(silence.endsAt.microseconds),
                    .text(silence.createdBy), .text(silence.comment),
                ])
            return db.connection.lastInsertRowID
        }
    }

    public func alertSilences(farmID: Int64, endingAfter: Timestamp?) async throws -> [AlertSilence] {
        let rows = try await reader.withValue { db in
            try db.connection.query(
                "SELECT id, matchers, starts_at_us, ends_at_us, created_by, comment FROM alert_silences WHERE farm_id = ? AND ends_at_us > ? ORDER BY id",
                [.integer(farmID), .integer(endingAfter?.microseconds ?? Int64.min)])
        }
        return try rows.map { row in
            AlertSilence(
                id: row.int(0), matchers: try decodeAlertJSON([String: String].self, row.string(1)), startsAt: Timestamp(microseconds: row.int(2)),
                endsAt: Timestamp(microseconds: row.int(3)), createdBy: row.string(4), comment: row.string(5))
        }
    }

    public func removeAlertSilence(farmID: Int64, id: Int64) async throws -> Bool {
        try await writer.withValue { db in
            try db.connection.query("DELETE FROM alert_silences WHERE farm_id = ? AND id = ?", [.integer(farmID), .integer(id)])
            return db.connection.changes > 0
        }
    }

    // MARK: Alerts

    static let alertColumns = """
        id, farm_id, rule, device_id, sensor_id, device, sensor, fingerprint, state, pending_since_us, starts_at_us, ends_at_us,
        last_reading_us, value, acknowledged_at_us, acknowledged_by, late_from_us, late_to_us, late_due_us, version, updated_at_us
        """

    public func alertRecords(deviceRowID: Int64) async throws -> [AlertRecord] {
        try await alertQuery("SELECT \(Self.alertColumns) FROM alerts WHERE device_id = ?", [.integer(deviceRowID)])
    }

    public func alertRecords(farmID: Int64, changedSince: Timestamp, limit: Int) async throws -> [AlertRecord] {
        try await alertQuery(
            """
            SELECT \(Self.alertColumns) FROM alerts WHERE farm_id = ? AND (state IN ('pending', 'firing') OR updated_at_us >= ?)
            ORDER BY updated_at_us DESC, id DESC LIMIT ?
            """, [.integer(farmID), .integer(changedSince.microseconds), .integer(Int64(limit))])
    }

    public func alertRecordsWithLateReportDue(now: Timestamp) async throws -> [AlertRecord] {
        try await alertQuery(
            "SELECT \(Self.alertColumns) FROM alerts WHERE late_due_us IS NOT NULL AND late_due_us <= ? ORDER BY late_due_us LIMIT 1000",
            [.integer(now.microseconds)])
    }

    private func alertQuery(_ sql: String, _ values: [SQLiteValue]) async throws -> [AlertRecord] {
        let rows = try await reader.withValue { db in try db.query(sql, values) }
        return try rows.map(Self.alertRecord)
    }

    static func alertRecord(_ row: [SQLiteValue]) throws -> AlertRecord {
        guard let state = AlertState(rawValue: row.string(8)) else { throw IngestStoreError.corrupt("alert state '\(row.string(8))'") }
        return AlertRecord(
            id: row.int(0), farmID: row.int(1), rule: row.string(2), deviceRowID: row.int(3), sensorRowID: row.int(4), device: row.optionalString(5),
            sensor: row.optionalString(6), fingerprint: row.string(7), state: state, pendingSince: row.timestamp(9), startsAt: row.timestamp(10),
            endsAt: row.timestamp(11), lastReading: row.timestamp(12), value: row.optionalDouble(13), acknowledgedAt: row.timestamp(14),
            acknowledgedBy: row.optionalString(15), lateFrom: row.timestamp(16), lateTo: row.timestamp(17), lateDue: row.timestamp(18),
            version: row.int(19), updatedAt: Timestamp(microseconds: row.int(20)))
    }

    public func alertTransitions(alertIDs: [Int64], newestPerAlert: Int?) async throws -> [AlertTransitionRecord] {
        guard !alertIDs.isEmpty else { return [] }
        let ids = try alertJSON(alertIDs)
        let columns = "id, alert_id, from_state, to_state, at_us, value, late, silenced, notified, recorded_at_us"
        let rows = try await reader.withValue { db in
            guard let newest = newestPerAlert else {
                return try db.connection.query(
                    """
                    SELECT \(columns) FROM alert_transitions
                    WHERE alert_id IN (SELECT value FROM json_each(?)) ORDER BY alert_id, at_us, id
                    """, [.text(ids)])
            }
            // One seek per alert on (alert_id, id): a window function would read every transition of a flapping alert.
            var rows: [[SQLiteValue]] = []
            for alertID in alertIDs {
                rows += try db.connection.query(
                    "SELECT \(columns) FROM alert_transitions WHERE alert_id = ? ORDER BY id DESC LIMIT ?",
                    [.integer(alertID), .integer(Int64(max(0, newest)))])
            }
            return rows.sorted { ($0.int(1), $0.int(4), $0.int(0)) < ($1.int(1), $1.int(4), $1.int(0)) }
        }
        return try rows.map { row in
            guard let from = AlertState(rawValue: row.string(2)), let to = AlertState(rawValue: row.string(3)) else {
                throw IngestStoreError.corrupt("alert transition \(row.int(0))")
            }
            return AlertTransitionRecord(
                id: row.int(0), alertID: row.int(1), from: from, to: to, at: Timestamp(microseconds: row.int(4)), value: row.optionalDouble(5),
                late: row.int(6) != 0, silenced: row.int(7) != 0, notified: row.int(8) != 0, recordedAt: Timestamp(microseconds: row.int(9)))
        }
    }

    public func acknowledgeAlert(farmID: Int64, alertID: Int64, by: String, at: Timestamp) async throws -> Bool {
        try await writer.withValue { db in
            try db.connection.query(
                "UPDATE alerts SET acknowledged_at_us = ?, acknowledged_by = ?, version = version + 1, updated_at_us = ? WHERE farm_id = ? AND id = ?",
                [.integer(at.microseconds), .text(by), .integer(at.microseconds), .integer(farmID), .integer(alertID)])
            return db.connection.changes > 0
        }
    }

    /// With ``AlertWriteDurability/withNextSyncedCommit`` the transaction runs at `synchronous=NORMAL` (no `fdatasync`
    /// at its commit) and the writer is set back to `FULL` before any other write can run on it.
    public func applyAlertChanges(_ changes: [AlertChange], now: Timestamp, durability: AlertWriteDurability, advancing cursor: AlertCursorAdvance?) async throws
        -> AlertChangesWritten
    {
        guard !changes.isEmpty || cursor != nil else { return AlertChangesWritten() }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let logger = self.logger
        return try await writer.withValue { db in
            guard durability == .withNextSyncedCommit else { return try Self.applyAlertChanges(changes, cursor: cursor, now: now, encoder: encoder, in: db) }
            try db.connection.execute("PRAGMA synchronous=NORMAL")
            let written = Result { try Self.applyAlertChanges(changes, cursor: cursor, now: now, encoder: encoder, in: db) }
            // Every later write on this connection (the batches) must be synced again. Setting the flag does no I/O and
            // takes no lock, so it fails only when SQLite cannot allocate; it is tried three times, and a failure is
            // logged as critical and thrown, never passed over.
            var restored: (any Error)?
            for _ in 1...3 {
                do {
                    try db.connection.execute("PRAGMA synchronous=FULL")
                    restored = nil
                    break
                } catch {
                    restored = error
                }
            }
            if let restored {
                logger.critical(
                    "the SQLite writer could not be set back to synchronous=FULL after an alert write; commits may not be synced until a restart",
                    metadata: ["error": "\(restored)"])
                throw restored
            }
            return try written.get()
        }
    }

    private static func applyAlertChanges(_ changes: [AlertChange], cursor: AlertCursorAdvance?, now: Timestamp, encoder: JSONEncoder, in db: CachedConnection) throws
        -> AlertChangesWritten
    {
        try db.connection.transaction { () throws -> AlertChangesWritten in
            var written = AlertChangesWritten()
            if let cursor {
                // First: the device's evaluations are serialised by it (see `AlertEvaluationCursor`).
                if cursor.expectedVersion == 0 {
                    try db.query(
                        "INSERT INTO alert_cursors(device_id, version, newest_us) VALUES (?, 1, ?) ON CONFLICT (device_id) DO NOTHING",
                        [.integer(cursor.deviceRowID), .integer(cursor.newest.microseconds)])
                } else {
                    try db.query(
                        "UPDATE alert_cursors SET version = version + 1, newest_us = max(coalesce(newest_us, ?1), ?1) WHERE device_id = ?2 AND version = ?3",
                        [.integer(cursor.newest.microseconds), .integer(cursor.deviceRowID), .integer(cursor.expectedVersion)])
                }
                guard db.connection.changes == 1 else { throw AlertStoreConflict(alert: "evaluation cursor of device row \(cursor.deviceRowID)") }
            }
            for change in changes {
                let record = change.record
                let columns: [SQLiteValue] = [
                    .text(record.state.rawValue), record.pendingSince.sqlite, record.startsAt.sqlite, record.endsAt.sqlite, record.lastReading.sqlite,
                    record.value.map { .real($0) } ?? .null, record.acknowledgedAt.sqlite, record.acknowledgedBy.map { .text($0) } ?? .null,
                    record.lateFrom.sqlite, record.lateTo.sqlite, record.lateDue.sqlite, .integer(now.microseconds),
                ]
                var alertID = record.id
                if alertID == 0 {
                    let inserted = try db.query(
                        """
                        INSERT INTO alerts(state, pending_since_us, starts_at_us, ends_at_us, last_reading_us, value, acknowledged_at_us,
                            acknowledged_by, late_from_us, late_to_us, late_due_us, updated_at_us,
                            farm_id, rule, device_id, sensor_id, device, sensor, fingerprint)
                        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                        ON CONFLICT (farm_id, rule, device_id, sensor_id) DO NOTHING RETURNING id
                        """,
                        columns + [
                            .integer(record.farmID), .text(record.rule), .integer(record.deviceRowID), .integer(record.sensorRowID),
                            record.device.map { .text($0) } ?? .null, record.sensor.map { .text($0) } ?? .null, .text(record.fingerprint),
                        ])
                    guard let row = inserted.first else { throw AlertStoreConflict(alert: record.fingerprint) }
                    alertID = row.int(0)
                } else {
                    try db.query(
                        """
                        UPDATE alerts SET state = ?, pending_since_us = ?, starts_at_us = ?, ends_at_us = ?, last_reading_us = ?, value = ?,
                            acknowledged_at_us = ?, acknowledged_by = ?, late_from_us = ?, late_to_us = ?, late_due_us = ?, updated_at_us = ?,
                            version = version + 1
                        WHERE id = ? AND version = ?
                        """, columns + [.integer(alertID), .integer(record.version)])
                    guard db.connection.changes == 1 else { throw AlertStoreConflict(alert: record.fingerprint) }
                }
                written.alertIDs.append(alertID)
                if change.markAllNotified {
                    try db.query("UPDATE alert_transitions SET notified = 1 WHERE alert_id = ? AND notified = 0", [.integer(alertID)])
                }
                var transitionIDs: [Int64] = []
                for transition in change.transitions {
                    try db.query(
                        """
                        INSERT INTO alert_transitions(alert_id, from_state, to_state, at_us, value, late, silenced, notified, recorded_at_us)
                        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                        """,
                        [
                            .integer(alertID), .text(transition.from.rawValue), .text(transition.to.rawValue), .integer(transition.at.microseconds),
                            transition.value.map { .real($0) } ?? .null, .integer(transition.late ? 1 : 0), .integer(transition.silenced ? 1 : 0),
                            .integer(transition.notified ? 1 : 0), .integer(now.microseconds),
                        ])
                    transitionIDs.append(db.connection.lastInsertRowID)
                }
                for planned in change.notifications {
                    var notification = planned.notification
                    var transitionID = planned.transitionIndex.flatMap { transitionIDs.indices.contains($0) ? transitionIDs[$0] : nil } ?? transitionIDs.last ?? 0
                    if transitionID == 0 {
                        // The alert's newest transition: retention always keeps it (`alert_transitions_newest` finds it).
                        transitionID = try db.queryInt("SELECT max(id) FROM alert_transitions WHERE alert_id = ?", [.integer(alertID)]) ?? 0
                    }
                    notification.alertID = alertID
                    notification.transitionID = transitionID
                    let payload = String(decoding: try encoder.encode(notification), as: UTF8.self)
                    for name in planned.receivers ?? change.receivers {
                        guard let receiverRow = try db.query(OutboxCoalescing.receiverRow + " WHERE farm_id = ? AND name = ?", [.integer(record.farmID), .text(name)]).first
                        else { continue }
                        let receiver = receiverRow.int(0)
                        let grouping = OutboxCoalescing.Grouping(waitMicroseconds: receiverRow.int(1), intervalMicroseconds: receiverRow.int(2))
                        // A row the receiver has not been sent yet takes the new state instead (see `OutboxCoalescing`).
                        let tail = try db.query(
                            OutboxCoalescing.newestRow + " WHERE alert_id = ? AND receiver_id = ? ORDER BY id DESC LIMIT 1",
                            [.integer(alertID), .integer(receiver)]
                        ).first.map { row in
                            OutboxCoalescing.Tail(
                                id: row.int(0), state: row.string(1), attempts: row.int(2), claimedBy: row.optionalString(3), lastAttemptAt: row.optionalInt(4),
                                payload: row.string(5))
                        }
                        if let tail, let merged = OutboxCoalescing.merged(notification, into: tail) {
                            try db.query(
                                """
                                UPDATE alert_outbox SET payload = ?, transitions = ?, first_transition_at_us = ?, coalesced_at_us = ?
                                WHERE id = ? AND \(OutboxCoalescing.untouched)
                                """,
                                [
                                    .text(String(decoding: try encoder.encode(merged), as: UTF8.self)), .integer(Int64(merged.transitionCount)),
                                    .integer(merged.firstTransitionAt.microseconds), .integer(now.microseconds), .integer(tail.id),
                                ])
                            if db.connection.changes == 1 {
                                written.coalesced += 1
                                continue
                            }
                        }
                        try db.query(
                            """
                            INSERT INTO alert_outbox(farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, state, next_attempt_at_us, created_at_us,
                                transitions, first_transition_at_us)
                            VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING
                            """,
                            [
                                .integer(record.farmID), .integer(receiver), .integer(alertID), .integer(transitionID),
                                .text(notification.idempotencyKey(receiver: receiver)), .text(payload),
                                .integer(OutboxCoalescing.due(notification, now: now, grouping: grouping, after: tail).microseconds), .integer(now.microseconds),
                                .integer(Int64(notification.transitionCount)), .integer(notification.firstTransitionAt.microseconds),
                            ])
                    }
                }
            }
            return written
        }
    }

    // MARK: Engine progress

    public func alertEvaluationCursor(deviceRowID: Int64) async throws -> AlertEvaluationCursor {
        let rows = try await reader.withValue { db in
            try db.connection.query("SELECT version, newest_us FROM alert_cursors WHERE device_id = ?", [.integer(deviceRowID)])
        }
        guard let row = rows.first else { return AlertEvaluationCursor() }
        return AlertEvaluationCursor(version: row.int(0), newest: row.optionalInt(1).map { Timestamp(microseconds: $0) })
    }

    public func alertProgress() async throws -> [AlertDeviceProgress] {
        let rows = try await reader.withValue { db in
            try db.connection.query(
                """
                SELECT f.id, f.name, d.id, d.name, w.sequence, d.highest_sequence FROM devices d JOIN farms f ON f.id = d.farm_id
                LEFT JOIN alert_watermarks w ON w.device_id = d.id WHERE d.highest_sequence IS NOT NULL
                """)
        }
        return try rows.map { row in
            AlertDeviceProgress(
                device: DeviceIdentity(farmID: row.int(0), farm: row.string(1), rowID: row.int(2), device: try DeviceID(row.string(3))),
                watermark: row.optionalInt(4).map { UInt64(clamping: $0) }, highest: row.optionalInt(5).map { UInt64(clamping: $0) })
        }
    }

    public func saveAlertWatermarks(_ watermarks: [Int64: UInt64]) async throws {
        guard !watermarks.isEmpty else { return }
        try await writer.withValue { db in
            try db.connection.transaction {
                for (device, sequence) in watermarks {
                    try db.connection.query(
                        """
                        INSERT INTO alert_watermarks(device_id, sequence) VALUES (?, ?)
                        ON CONFLICT (device_id) DO UPDATE SET sequence = max(sequence, excluded.sequence)
                        """, [.integer(device), .integer(Int64(clamping: sequence))])
                }
            }
        }
    }

    public func alertCatchUpReadings(device: DeviceIdentity, afterSequence: UInt64?, limit: Int) async throws -> [CommittedReading] {
        let after = afterSequence.map { Int64(clamping: $0) } ?? -1
        let rows = try await reader.withValue { db in
            try db.connection.query(
                """
                SELECT r.sensor_id, s.name, s.quantity, r.sequence, r.timestamp_us, r.value, r.flags
                FROM readings r JOIN sensors s ON s.id = r.sensor_id WHERE r.device_id = ? AND r.sequence > ? ORDER BY r.sequence LIMIT ?
                """, [.integer(device.rowID), .integer(after), .integer(Int64(limit))])
        }
        return try rows.map { row in
            guard let quantity = Quantity(rawValue: row.string(2)) else { throw IngestStoreError.corrupt("quantity '\(row.string(2))'") }
            return CommittedReading(
                sensorRowID: row.int(0), sensor: try SensorID(row.string(1)), quantity: quantity, sequence: UInt64(clamping: row.int(3)),
                timestamp: Timestamp(microseconds: row.int(4)), value: row.double(5), quality: QualityFlags(rawValue: UInt16(truncatingIfNeeded: row.int(6))))
        }
    }

    public func alertSensors(farmID: Int64) async throws -> [AlertSensor] {
        let rows = try await reader.withValue { db in
            try db.connection.query(
                """
                SELECT d.id, d.name, s.id, s.name, s.quantity, s.first_seen_us, l.timestamp_us
                FROM sensors s JOIN devices d ON d.id = s.device_id LEFT JOIN latest l ON l.sensor_id = s.id
                WHERE d.farm_id = ? AND d.revoked = 0 ORDER BY d.name, s.name
                """, [.integer(farmID)])
        }
        return try rows.map { row in
            guard let quantity = Quantity(rawValue: row.string(4)) else { throw IngestStoreError.corrupt("quantity '\(row.string(4))'") }
            return AlertSensor(
                deviceRowID: row.int(0), device: row.string(1), sensorRowID: row.int(2), sensor: row.string(3), quantity: quantity,
                firstSeen: Timestamp(microseconds: row.int(5)), newestReading: row.timestamp(6))
        }
    }

    public func alertOutbox(farmID: Int64) async throws -> [AlertOutboxRow] {
        let rows = try await reader.withValue { db in
            try db.connection.query(
                """
                SELECT o.id, o.receiver_id, r.name, o.alert_id, o.transition_id, o.idempotency_key, o.state, o.payload, o.transitions
                FROM alert_outbox o JOIN alert_receivers r ON r.id = o.receiver_id WHERE o.farm_id = ? ORDER BY o.id
                """, [.integer(farmID)])
        }
        return rows.map { row in
            AlertOutboxRow(
                id: row.int(0), receiverID: row.int(1), receiver: row.string(2), alertID: row.int(3), transitionID: row.int(4),
                idempotencyKey: row.string(5), state: row.string(6), payload: row.string(7), transitions: Int(row.int(8)))
        }
    }
}

func alertJSON(_ value: some Encodable) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

func decodeAlertJSON<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
    do {
        return try JSONDecoder().decode(T.self, from: Data(text.utf8))
    } catch {
        throw IngestStoreError.corrupt("stored alert data cannot be read: \(error)")
    }
}

extension Optional where Wrapped == Timestamp {
    var sqlite: SQLiteValue { self.map { .integer($0.microseconds) } ?? .null }
}

extension Array where Element == SQLiteValue {
    func int(_ index: Int) -> Int64 { optionalInt(index) ?? 0 }
    func optionalInt(_ index: Int) -> Int64? {
        guard index < count else { return nil }
        switch self[index] {
        case .integer(let value): return value
        case .real(let value): return Int64(value)
        default: return nil
        }
    }
    func double(_ index: Int) -> Double { optionalDouble(index) ?? 0 }
    func optionalDouble(_ index: Int) -> Double? {
        guard index < count else { return nil }
        switch self[index] {
        case .real(let value): return value
        case .integer(let value): return Double(value)
        default: return nil
        }
    }
    func string(_ index: Int) -> String { optionalString(index) ?? "" }
    func optionalString(_ index: Int) -> String? {
        guard index < count, case .text(let text) = self[index] else { return nil }
        return text
    }
    func timestamp(_ index: Int) -> Timestamp? { optionalInt(index).map { Timestamp(microseconds: $0) } }
}
