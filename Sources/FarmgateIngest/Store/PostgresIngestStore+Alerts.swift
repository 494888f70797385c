public import FarmgateWire
import Foundation
import PostgresNIO

/// Alert rules, alerts, transitions, silences and the engine's watermarks on PostgreSQL (migration 3). The same contract
/// as the SQLite store; ``applyAlertChanges(_:now:)`` is one transaction whose `UPDATE ... WHERE version = $n` locks the
/// alert row, so that of two instances changing one alert the later waits, fails the check, and evaluates again.
extension PostgresIngestStore: AlertStore {
    // MARK: Rules

    public func putAlertRule(farmID: Int64, rule: AlertRule, replace: Bool, at: Timestamp) async throws {
        let json = try alertJSON(rule)
        let name = rule.name
        if replace {
            _ = try await rows(
                """
                INSERT INTO alert_rules(farm_id, name, definition, updated_at_us) VALUES (\(farmID), \(name), \(json), \(at.microseconds))
                ON CONFLICT (farm_id, name) DO UPDATE SET definition = excluded.definition, updated_at_us = excluded.updated_at_us RETURNING id
                """
            ) { try $0.decode(Int64.self) }
            return
        }
        do {
            _ = try await rows(
                "INSERT INTO alert_rules(farm_id, name, definition, updated_at_us) VALUES (\(farmID), \(name), \(json), \(at.microseconds)) RETURNING id"
            ) { try $0.decode(Int64.self) }
        } catch let error as PSQLError where error.isUniqueViolation {
            throw IngestStoreError.alreadyExists("alert rule '\(name)'")
        }
    }

    public func alertRules(farmID: Int64?) async throws -> [StoredAlertRule] {
        try await rows(
            """
            SELECT r.farm_id, f.name, r.definition, r.updated_at_us FROM alert_rules r JOIN farms f ON f.id = r.farm_id
            WHERE \(farmID)::int8 IS NULL OR r.farm_id = \(farmID) ORDER BY f.name COLLATE "C", r.name COLLATE "C"
            """
        ) { row in
            let (farmID, farm, definition, updated) = try row.decode((Int64, String, String, Int64).self)
            return StoredAlertRule(farmID: farmID, farm: farm, rule: try decodeAlertJSON(AlertRule.self, definition), updatedAt: Timestamp(microseconds: updated))
        }
    }

    public func removeAlertRule(farmID: Int64, name: String) async throws -> Bool {
        try await !rows("DELETE FROM alert_rules WHERE farm_id = \(farmID) AND name = \(name) RETURNING id") { try $0.decode(Int64.self) }.isEmpty
    }

    public func alertConfigurationStamp() async throws -> String {
        try await rows("SELECT version FROM alert_configuration_version WHERE id = 1") { String(try $0.decode(Int64.self)) }.first ?? ""
    }

    // MARK: Silences

    public func addAlertSilence(farmID: Int64, _ silence: AlertSilence) async throws -> Int64 {
        let matchers = try alertJSON(silence.matchers)
        let ids = try await rows(
            """
            INSERT INTO alert_silences(farm_id, matchers, starts_at_us, ends_at_us, created_by, comment)
            VALUES (\(farmID), \(matchers), \(silence.startsAt.microseconds), \(silence.endsAt.microseconds), \(silence.createdBy), \(silence.comment)) RETURNING id
            """
        ) { try $0.decode(Int64.self) }
        guard let id = ids.first else { throw IngestStoreError.corrupt("adding a silence returned no id") }
        return id
    }

    public func alertSilences(farmID: Int64, endingAfter: Timestamp?) async throws -> [AlertSilence] {
        try await rows(
            """
            SELECT id, matchers, starts_at_us, ends_at_us, created_by, comment FROM alert_silences
            WHERE farm_id = \(farmID) AND ends_at_us > \(endingAfter?.microseconds ?? Int64.min) ORDER BY id
            """
        ) { row in
            let (id, matchers, starts, ends, by, comment) = try row.decode((Int64, String, Int64, Int64, String, String).self)
            return AlertSilence(
                id: id, matchers: try decodeAlertJSON([String: String].self, matchers), startsAt: Timestamp(microseconds: starts),
                endsAt: Timestamp(microseconds: ends), createdBy: by, comment: comment)
        }
    }

    public func removeAlertSilence(farmID: Int64, id: Int64) async throws -> Bool {
        try await !rows("DELETE FROM alert_silences WHERE farm_id = \(farmID) AND id = \(id) RETURNING id") { try $0.decode(Int64.self) }.isEmpty
    }

    // MARK: Alerts

    private static let alertColumns = """
        id, farm_id, rule, device_id, sensor_id, device, sensor, fingerprint, state, pending_since_us, starts_at_us, ends_at_us,
        last_reading_us, value, acknowledged_at_us, acknowledged_by, late_from_us, late_to_us, late_due_us, version, updated_at_us
        """

    public func alertRecords(deviceRowID: Int64) async throws -> [AlertRecord] {
        try await rows("SELECT \(unescaped: Self.alertColumns) FROM alerts WHERE device_id = \(deviceRowID)", Self.alertRecord)
    }

    public func alertRecords(farmID: Int64, changedSince: Timestamp, limit: Int) async throws -> [AlertRecord] {
        try await rows(
            """
            SELECT \(unescaped: Self.alertColumns) FROM alerts WHERE farm_id = \(farmID)
                AND (state IN ('pending', 'firing') OR updated_at_us >= \(changedSince.microseconds))
            ORDER BY updated_at_us DESC, id DESC LIMIT \(limit)
            """, Self.alertRecord)
    }

    public func alertRecordsWithLateReportDue(now: Timestamp) async throws -> [AlertRecord] {
        try await rows(
            "SELECT \(unescaped: Self.alertColumns) FROM alerts WHERE late_due_us IS NOT NULL AND late_due_us <= \(now.microseconds) ORDER BY late_due_us LIMIT 1000",
            Self.alertRecord)
    }

    @Sendable static func alertRecord(_ row: PostgresRow) throws -> AlertRecord {
        let columns = row.makeRandomAccess()
        func value<T: PostgresDecodable>(_ index: Int, _ type: T.Type) throws -> T { try columns[index].decode(T.self, context: .default) }
        func time(_ index: Int) throws -> Timestamp? { try value(index, Int64?.self).map { Timestamp(microseconds: $0) } }
        let stateText = try value(8, String.self)
        guard let state = AlertState(rawValue: stateText) else { throw IngestStoreError.corrupt("alert state '\(stateText)'") }
        return AlertRecord(
            id: try value(0, Int64.self), farmID: try value(1, Int64.self), rule: try value(2, String.self), deviceRowID: try value(3, Int64.self),
            sensorRowID: try value(4, Int64.self), device: try value(5, String?.self), sensor: try value(6, String?.self),
            fingerprint: try value(7, String.self), state: state, pendingSince: try time(9), startsAt: try time(10), endsAt: try time(11),
            lastReading: try time(12), value: try value(13, Double?.self), acknowledgedAt: try time(14), acknowledgedBy: try value(15, String?.self),
            lateFrom: try time(16), lateTo: try time(17), lateDue: try time(18), version: try value(19, Int64.self),
            updatedAt: Timestamp(microseconds: try value(20, Int64.self)))
    }

    public func alertTransitions(alertIDs: [Int64], newestPerAlert: Int?) async throws -> [AlertTransitionRecord] {
        guard !alertIDs.isEmpty else { return [] }
        let query: PostgresQuery
        if let newest = newestPerAlert {
            // One index probe per alert on (alert_id, id): a window function would read every transition of a flapping alert.
            query = """
                SELECT t.id, t.alert_id, t.from_state, t.to_state, t.at_us, t.value, t.late, t.silenced, t.notified, t.recorded_at_us
                FROM unnest(\(alertIDs)::int8[]) AS a(id)
                CROSS JOIN LATERAL (SELECT * FROM alert_transitions WHERE alert_id = a.id ORDER BY id DESC LIMIT \(Int64(max(0, newest)))) AS t
                ORDER BY t.alert_id, t.at_us, t.id
                """
        } else {
            query = """
                SELECT id, alert_id, from_state, to_state, at_us, value, late, silenced, notified, recorded_at_us FROM alert_transitions
                WHERE alert_id = ANY(\(alertIDs)) ORDER BY alert_id, at_us, id
                """
        }
        return try await rows(query) { row in
            let (id, alertID, fromText, toText, at, value, late, silenced, notified, recorded) = try row.decode(
                (Int64, Int64, String, String, Int64, Double?, Bool, Bool, Bool, Int64).self)
            guard let from = AlertState(rawValue: fromText), let to = AlertState(rawValue: toText) else {
                throw IngestStoreError.corrupt("alert transition \(id)")
            }
            return AlertTransitionRecord(
                id: id, alertID: alertID, from: from, to: to, at: Timestamp(microseconds: at), value: value, late: late, silenced: silenced,
                notified: notified, recordedAt: Timestamp(microseconds: recorded))
        }
    }

    public func acknowledgeAlert(farmID: Int64, alertID: Int64, by: String, at: Timestamp) async throws -> Bool {
        try await !rows(
            """
            UPDATE alerts SET acknowledged_at_us = \(at.microseconds), acknowledged_by = \(by), version = version + 1, updated_at_us = \(at.microseconds)
            WHERE farm_id = \(farmID) AND id = \(alertID) RETURNING id
            """
        ) { try $0.decode(Int64.self) }.isEmpty
    }

    /// Always a synchronous commit (`durability` is not used: PostgreSQL groups concurrent commits into one flush).
    public func applyAlertChanges(_ changes: [AlertChange], now: Timestamp, durability: AlertWriteDurability, advancing cursor: AlertCursorAdvance?) async throws
        -> AlertChangesWritten
    {
        guard !changes.isEmpty || cursor != nil else { return AlertChangesWritten() }
        let logger = self.logger
        return try await transaction(asynchronousCommit: durability == .withNextSyncedCommit) { connection in
            var written = AlertChangesWritten()
            if let cursor {
                // First, so that two instances writing for one device queue on its cursor row before any alert row
                // (see `AlertEvaluationCursor`): the later one's UPDATE sees the version moved and changes nothing.
                let device = Int32(clamping: cursor.deviceRowID)
                var moved = false
                if cursor.expectedVersion == 0 {
                    for try await _ in try await connection.query(
                        """
                        INSERT INTO alert_cursors(device_id, version, newest_us) VALUES (\(device), 1, \(cursor.newest.microseconds))
                        ON CONFLICT (device_id) DO NOTHING RETURNING device_id
                        """, logger: logger
                    ) { moved = true }
                } else {
                    for try await _ in try await connection.query(
                        """
                        UPDATE alert_cursors SET version = version + 1, newest_us = greatest(newest_us, \(cursor.newest.microseconds))
                        WHERE device_id = \(device) AND version = \(cursor.expectedVersion) RETURNING device_id
                        """, logger: logger
                    ) { moved = true }
                }
                guard moved else { throw AlertStoreConflict(alert: "evaluation cursor of device row \(cursor.deviceRowID)") }
            }
            for change in changes {
                let r = change.record
                let (pending, starts, ends, last) = (r.pendingSince?.microseconds, r.startsAt?.microseconds, r.endsAt?.microseconds, r.lastReading?.microseconds)
                let (acked, lateFrom, lateTo, lateDue) = (r.acknowledgedAt?.microseconds, r.lateFrom?.microseconds, r.lateTo?.microseconds, r.lateDue?.microseconds)
                var alertID: Int64?
                if r.id == 0 {
                    for try await id in try await connection.query(
                        """
                        INSERT INTO alerts(state, pending_since_us, starts_at_us, ends_at_us, last_reading_us, value, acknowledged_at_us,
                            acknowledged_by, late_from_us, late_to_us, late_due_us, updated_at_us,
                            farm_id, rule, device_id, sensor_id, device, sensor, fingerprint)
                        VALUES (\(r.state.rawValue), \(pending), \(starts), \(ends), \(last), \(r.value), \(acked), \(r.acknowledgedBy),
                            \(lateFrom), \(lateTo), \(lateDue), \(now.microseconds), \(r.farmID), \(r.rule), \(r.deviceRowID), \(r.sensorRowID),
                            \(r.device), \(r.sensor), \(r.fingerprint))
                        ON CONFLICT (farm_id, rule, device_id, sensor_id) DO NOTHING RETURNING id
                        """, logger: logger
                    ).decode(Int64.self) { alertID = id }
                } else {
                    for try await id in try await connection.query(
                        """
                        UPDATE alerts SET state = \(r.state.rawValue), pending_since_us = \(pending), starts_at_us = \(starts), ends_at_us = \(ends),
                            last_reading_us = \(last), value = \(r.value), acknowledged_at_us = \(acked), acknowledged_by = \(r.acknowledgedBy),
                            late_from_us = \(lateFrom), late_to_us = \(lateTo), late_due_us = \(lateDue), updated_at_us = \(now.microseconds),
                            version = version + 1
                        WHERE id = \(r.id) AND version = \(r.version) RETURNING id
                        """, logger: logger
                    ).decode(Int64.self) { alertID = id }
                }
                guard let alertID else { throw AlertStoreConflict(alert: r.fingerprint) }
                written.alertIDs.append(alertID)
                if change.markAllNotified {
                    try await connection.query("UPDATE alert_transitions SET notified = true WHERE alert_id = \(alertID) AND NOT notified", logger: logger)
                }
                var transitionIDs: [Int64] = []
                for t in change.transitions {
                    for try await id in try await connection.query(
                        """
                        INSERT INTO alert_transitions(alert_id, from_state, to_state, at_us, value, late, silenced, notified, recorded_at_us)
                        VALUES (\(alertID), \(t.from.rawValue), \(t.to.rawValue), \(t.at.microseconds), \(t.value), \(t.late), \(t.silenced), \(t.notified),
                            \(now.microseconds)) RETURNING id
                        """, logger: logger
                    ).decode(Int64.self) { transitionIDs.append(id) }
                }
                for planned in change.notifications {
                    var notification = planned.notification
                    var transitionID = planned.transitionIndex.flatMap { transitionIDs.indices.contains($0) ? transitionIDs[$0] : nil } ?? transitionIDs.last ?? 0
                    if transitionID == 0 {
                        // The alert's newest transition: retention always keeps it (`alert_transitions_newest` finds it).
                        for try await id in try await connection.query(
                            "SELECT coalesce(max(id), 0) FROM alert_transitions WHERE alert_id = \(alertID)", logger: logger
                        ).decode(Int64.self) { transitionID = id }
                    }
                    notification.alertID = alertID
                    notification.transitionID = transitionID
                    let payload = try alertJSON(notification)
                    for name in planned.receivers ?? change.receivers {
                        var receiverID: Int64?
                        var grouping = OutboxCoalescing.Grouping()
                        for try await (id, wait, interval) in try await connection.query(
                            "\(unescaped: OutboxCoalescing.receiverRow) WHERE farm_id = \(r.farmID) AND name = \(name)", logger: logger
                        ).decode((Int64, Int64, Int64).self) {
                            receiverID = id
                            grouping = OutboxCoalescing.Grouping(waitMicroseconds: wait, intervalMicroseconds: interval)
                        }
                        guard let receiverID else { continue }
                        // A row the receiver has not been sent yet takes the new state instead (see `OutboxCoalescing`). Read
                        // without a lock: the UPDATE below locks only a row that is still untouched, so this transaction
                        // never waits for retention or a claim holding a delivered, dead or delivering row.
                        var tail: OutboxCoalescing.Tail?
                        for try await row in try await connection.query(
                            """
                            \(unescaped: OutboxCoalescing.newestRow) WHERE alert_id = \(alertID) AND receiver_id = \(receiverID)
                            ORDER BY id DESC LIMIT 1
                            """, logger: logger
                        ).decode((Int64, String, Int32, String?, Int64?, String).self) {
                            tail = OutboxCoalescing.Tail(id: row.0, state: row.1, attempts: Int64(row.2), claimedBy: row.3, lastAttemptAt: row.4, payload: row.5)
                        }
                        if let tail, let merged = OutboxCoalescing.merged(notification, into: tail) {
                            let mergedPayload = try alertJSON(merged)
                            var updated = false
                            for try await _ in try await connection.query(
                                """
                                UPDATE alert_outbox SET payload = \(mergedPayload), transitions = \(Int32(clamping: merged.transitionCount)),
                                    first_transition_at_us = \(merged.firstTransitionAt.microseconds), coalesced_at_us = \(now.microseconds)
                                WHERE id = \(tail.id) AND \(unescaped: OutboxCoalescing.untouched) RETURNING id
                                """, logger: logger
                            ).decode(Int64.self) { updated = true }
                            if updated {
                                written.coalesced += 1
                                continue
                            }
                        }
                        let key = notification.idempotencyKey(receiver: receiverID)
                        let due = OutboxCoalescing.due(notification, now: now, grouping: grouping, after: tail)
                        try await connection.query(
                            """
                            INSERT INTO alert_outbox(farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, state, next_attempt_at_us, created_at_us,
                                transitions, first_transition_at_us)
                            VALUES (\(r.farmID), \(receiverID), \(alertID), \(transitionID), \(key), \(payload), 'pending', \(due.microseconds), \(now.microseconds),
                                \(Int32(clamping: notification.transitionCount)), \(notification.firstTransitionAt.microseconds))
                            ON CONFLICT (idempotency_key) DO NOTHING
                            """, logger: logger)
                    }
                }
            }
            return written
        }
    }

    // MARK: Engine progress

    public func alertEvaluationCursor(deviceRowID: Int64) async throws -> AlertEvaluationCursor {
        let found = try await rows("SELECT version, newest_us FROM alert_cursors WHERE device_id = \(Int32(clamping: deviceRowID))") { row in
            let (version, newest) = try row.decode((Int64, Int64?).self)
            return AlertEvaluationCursor(version: version, newest: newest.map { Timestamp(microseconds: $0) })
        }
        return found.first ?? AlertEvaluationCursor()
    }

    public func alertProgress() async throws -> [AlertDeviceProgress] {
        try await rows(
            """
            SELECT f.id, f.name, d.id::int8, d.name, w.sequence, d.highest_sequence FROM devices d JOIN farms f ON f.id = d.farm_id
            LEFT JOIN alert_watermarks w ON w.device_id = d.id WHERE d.highest_sequence IS NOT NULL
            """
        ) { row in
            let (farmID, farm, rowID, name, watermark, highest) = try row.decode((Int64, String, Int64, String, Int64?, Int64?).self)
            return AlertDeviceProgress(
                device: DeviceIdentity(farmID: farmID, farm: farm, rowID: rowID, device: try pgDeviceID(name)),
                watermark: watermark.map { UInt64(clamping: $0) }, highest: highest.map { UInt64(clamping: $0) })
        }
    }

    public func saveAlertWatermarks(_ watermarks: [Int64: UInt64]) async throws {
        guard !watermarks.isEmpty else { return }
        let devices = Array(watermarks.keys)
        let sequences = devices.map { Int64(clamping: watermarks[$0] ?? 0) }
        _ = try await rows(
            """
            INSERT INTO alert_watermarks(device_id, sequence) SELECT d, s FROM unnest(\(devices)::int8[], \(sequences)::int8[]) AS u(d, s)
            ON CONFLICT (device_id) DO UPDATE SET sequence = greatest(alert_watermarks.sequence, excluded.sequence) RETURNING device_id::int8
            """
        ) { try $0.decode(Int64.self) }
    }

    public func alertCatchUpReadings(device: DeviceIdentity, afterSequence: UInt64?, limit: Int) async throws -> [CommittedReading] {
        let after = afterSequence.map { Int64(clamping: $0) } ?? -1
        return try await rows(
            """
            SELECT r.sensor_id::int8, s.name, s.quantity, r.first_sequence + u.o, r.first_ts + u.t, u.v, coalesce(r.flags[u.i], 0::smallint)
            FROM readings r JOIN sensors s ON s.id = r.sensor_id,
                unnest(r.sequence_offsets, r.time_offsets, r.reading_values) WITH ORDINALITY AS u(o, t, v, i)
            WHERE r.device_id = \(device.rowID) AND r.first_sequence > \(after - PostgresReadingChunk.maximumSequenceSpan)
                AND r.last_sequence > \(after) AND r.first_sequence + u.o > \(after)
            ORDER BY 4 LIMIT \(limit)
            """
        ) { row in
            let (sensorRow, sensor, quantity, sequence, timestamp, value, flags) = try row.decode((Int64, String, String, Int64, Int64, Double, Int16).self)
            return CommittedReading(
                sensorRowID: sensorRow, sensor: try pgSensorID(sensor), quantity: try pgQuantity(quantity), sequence: UInt64(clamping: sequence),
                timestamp: Timestamp(microseconds: timestamp), value: value, quality: QualityFlags(rawValue: UInt16(bitPattern: flags)))
        }
    }

    public func alertSensors(farmID: Int64) async throws -> [AlertSensor] {
        try await rows(
            """
            SELECT d.id::int8, d.name, s.id::int8, s.name, s.quantity, s.first_seen_us, l.timestamp_us
            FROM sensors s JOIN devices d ON d.id = s.device_id LEFT JOIN latest l ON l.sensor_id = s.id
            WHERE d.farm_id = \(farmID) AND NOT d.revoked ORDER BY d.name COLLATE "C", s.name COLLATE "C"
            """
        ) { row in
            let (deviceRow, device, sensorRow, sensor, quantity, firstSeen, newest) = try row.decode((Int64, String, Int64, String, String, Int64, Int64?).self)
            return AlertSensor(
                deviceRowID: deviceRow, device: device, sensorRowID: sensorRow, sensor: sensor, quantity: try pgQuantity(quantity),
                firstSeen: Timestamp(microseconds: firstSeen), newestReading: newest.map { Timestamp(microseconds: $0) })
        }
    }

    public func alertOutbox(farmID: Int64) async throws -> [AlertOutboxRow] {
        try await rows(
            """
            SELECT o.id, o.receiver_id, r.name, o.alert_id, o.transition_id, o.idempotency_key, o.state, o.payload, o.transitions::int8
            FROM alert_outbox o JOIN alert_receivers r ON r.id = o.receiver_id WHERE o.farm_id = \(farmID) ORDER BY o.id
            """
        ) { row in
            let (id, receiverID, receiver, alertID, transitionID, key, state, payload, transitions) = try row.decode(
                (Int64, Int64, String, Int64, Int64, String, String, String, Int64).self)
            return AlertOutboxRow(
                id: id, receiverID: receiverID, receiver: receiver, alertID: alertID, transitionID: transitionID, idempotencyKey: key, state: state,
                payload: payload, transitions: Int(transitions))
        }
    }
}
