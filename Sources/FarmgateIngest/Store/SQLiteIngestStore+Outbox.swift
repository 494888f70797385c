import FarmgateSupport
import FarmgateWire
import Foundation

/// Alert receivers and the notification outbox on SQLite (migrations 4 and 8). Every write, claims included, runs on
/// the single writer thread in one `BEGIN IMMEDIATE` transaction, so a claim is exclusive by construction; the claim
/// itself is short (a few indexed statements) and never waits on a receiver. One process owns the database, so its
/// clock is the only one: a claim is timed by the request's `now` whatever its ``OutboxClaimClock``.
extension SQLiteIngestStore: NotificationOutboxStore {
    static let receiverColumns = """
        r.id, r.farm_id, f.name, r.name, r.kind, r.url, r.secret, r.username, r.email_from, r.email_to, r.max_per_minute,
        r.created_at_us, r.next_send_at_us, r.group_wait_us, r.group_interval_us
        """
    static let entryColumns = """
        o.id, f.name, o.receiver_id, r.name, o.alert_id, o.transition_id, o.idempotency_key, o.payload, o.state, o.attempts,
        o.next_attempt_at_us, o.claimed_by, o.claimed_until_us, o.last_error, o.created_at_us, o.delivered_at_us, o.last_attempt_at_us,
        o.transitions, o.first_transition_at_us, o.coalesced_at_us, o.reached
        """

    public func addAlertReceiver(farm: String, _ spec: AlertReceiverSpec, createdAt: Timestamp) async throws -> AlertReceiver {
        try await writer.withValue { db in
            guard let farmID = try db.connection.queryInt("SELECT id FROM farms WHERE name = ?", [.text(farm)]) else {
                throw IngestStoreError.notFound("farm '\(farm)'")
            }
            do {
                try db.connection.query(
                    """
                    INSERT INTO alert_receivers(farm_id, name, kind, url, secret, username, email_from, email_to, max_per_minute, created_at_us,
                        group_wait_us, group_interval_us)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                    [
                        .integer(farmID), .text(spec.name), .text(spec.kind.rawValue), .text(spec.url), optional(spec.secret), optional(spec.username),
                        optional(spec.emailFrom), optional(spec.emailTo), .integer(Int64(spec.maxPerMinute)), .integer(createdAt.microseconds),
                        .integer(spec.groupWait.wholeMicroseconds), .integer(spec.groupInterval.wholeMicroseconds),
                    ])
            } catch let error as SQLiteError where error.isConstraint {
                throw IngestStoreError.alreadyExists("receiver '\(spec.name)' in farm '\(farm)'")
            }
            return AlertReceiver(id: db.connection.lastInsertRowID, farmID: farmID, farm: farm, spec: spec, createdAt: createdAt)
        }
    }

    public func alertReceivers(farm: String) async throws -> [AlertReceiver] {
        try await reader.withValue { db in
            guard try db.connection.queryInt("SELECT id FROM farms WHERE name = ?", [.text(farm)]) != nil else {
                throw IngestStoreError.notFound("farm '\(farm)'")
            }
            return try db.withStatement(
                "SELECT \(Self.receiverColumns) FROM alert_receivers r JOIN farms f ON f.id = r.farm_id WHERE f.name = ? ORDER BY r.name",
                [.text(farm)]
            ) { statement in
                var receivers: [AlertReceiver] = []
                while try statement.step() { receivers.append(try Self.receiver(statement).receiver) }
                return receivers
            }
        }
    }

    public func updateAlertReceiver(farm: String, _ spec: AlertReceiverSpec) async throws -> AlertReceiver {
        try await writer.withValue { db in
            try db.withStatement(
                """
                UPDATE alert_receivers SET kind = ?, url = ?, secret = ?, username = ?, email_from = ?, email_to = ?, max_per_minute = ?,
                    group_wait_us = ?, group_interval_us = ?
                WHERE id = (SELECT r.id FROM alert_receivers r JOIN farms f ON f.id = r.farm_id WHERE f.name = ? AND r.name = ?)
                RETURNING id, farm_id, created_at_us
                """,
                [
                    .text(spec.kind.rawValue), .text(spec.url), optional(spec.secret), optional(spec.username), optional(spec.emailFrom),
                    optional(spec.emailTo), .integer(Int64(spec.maxPerMinute)), .integer(spec.groupWait.wholeMicroseconds),
                    .integer(spec.groupInterval.wholeMicroseconds), .text(farm), .text(spec.name),
                ]
            ) { statement in
                guard try statement.step() else { throw IngestStoreError.notFound("receiver '\(spec.name)' in farm '\(farm)'") }
                return AlertReceiver(
                    id: statement.int64(0), farmID: statement.int64(1), farm: farm, spec: spec, createdAt: Timestamp(microseconds: statement.int64(2)))
            }
        }
    }

    public func removeAlertReceiver(farm: String, name: String) async throws -> Int {
        try await writer.withValue { db in
            try db.connection.transaction { () throws -> Int in
                guard
                    let id = try db.connection.queryInt(
                        "SELECT r.id FROM alert_receivers r JOIN farms f ON f.id = r.farm_id WHERE f.name = ? AND r.name = ?", [.text(farm), .text(name)])
                else { throw IngestStoreError.notFound("receiver '\(name)' in farm '\(farm)'") }
                let undelivered = try db.connection.queryInt(
                    "SELECT count(*) FROM alert_outbox WHERE receiver_id = ? AND state <> 'delivered'", [.integer(id)]) ?? 0
                try db.connection.query("DELETE FROM alert_outbox WHERE receiver_id = ?", [.integer(id)])
                try db.connection.query("DELETE FROM alert_receivers WHERE id = ?", [.integer(id)])
                return Int(undelivered)
            }
        }
    }

    public func enqueueNotification(_ notification: AlertNotification, receiverID: Int64, dueAt: Timestamp) async throws -> Int64? {
        let payload = try OutboxPayload.encode(notification)
        let key = notification.idempotencyKey(receiver: receiverID)
        return try await writer.withValue { db in
            try db.withStatement(
                """
                INSERT INTO alert_outbox(farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, next_attempt_at_us, created_at_us,
                    transitions, first_transition_at_us)
                SELECT farm_id, id, ?, ?, ?, ?, ?, ?, ?, ? FROM alert_receivers WHERE id = ?
                ON CONFLICT (idempotency_key) DO NOTHING RETURNING id
                """,
                [
                    .integer(notification.alertID), .integer(notification.transitionID), .text(key), .text(payload), .integer(dueAt.microseconds),
                    .integer(dueAt.microseconds), .integer(Int64(notification.transitionCount)), .integer(notification.firstTransitionAt.microseconds),
                    .integer(receiverID),
                ]
            ) { statement in try statement.step() ? statement.int64(0) : nil }
        }
    }

    public func claimNotifications(_ request: OutboxClaimRequest) async throws -> [ClaimedNotification] {
        guard request.limit > 0 else { return [] }
        return try await writer.withValue { db in
            try db.connection.transaction { () throws -> [ClaimedNotification] in
                let now = request.now.microseconds
                try db.withStatement(
                    """
                    UPDATE alert_outbox SET state = 'dead', claimed_by = NULL, claimed_until_us = NULL,
                        last_error = 'the instance delivering it stopped before it finished (attempt ' || attempts || ' of ' || ? || '); last error: '
                            || coalesce(last_error, 'none')
                    WHERE state = 'delivering' AND next_attempt_at_us <= ? AND attempts >= ?
                    """, [.integer(Int64(request.maxAttempts)), .integer(now), .integer(Int64(request.maxAttempts))]
                ) { statement in _ = try statement.step() }
                // Receivers with due rows that can take one now, the longest-waiting first: not one whose pacing has no
                // slot before the horizon, nor one with no room at this instance. Those would otherwise fill the 200 and
                // starve every receiver past them for as long as they stay behind.
                let horizon = now + max(1, request.lookahead.wholeMicroseconds)
                let full = request.busy.keys.filter { request.room(for: $0) == 0 }.sorted().map(String.init).joined(separator: ",")
                let delivering = "[" + request.delivering.sorted().map(String.init).joined(separator: ",") + "]"
                let due = try db.withStatement(
                    """
                    SELECT o.receiver_id FROM alert_outbox o JOIN alert_receivers r ON r.id = o.receiver_id
                    WHERE o.state IN ('pending', 'delivering') AND o.next_attempt_at_us <= ? AND r.next_send_at_us < ?
                        AND o.receiver_id NOT IN (SELECT value FROM json_each(?)) AND \(OutboxOrdering.noOlderUnsent)
                    GROUP BY o.receiver_id ORDER BY min(o.next_attempt_at_us) LIMIT 200
                    """, [.integer(now), .integer(horizon), .text("[" + full + "]")]
                ) { statement in
                    var ids: [Int64] = []
                    while try statement.step() { ids.append(statement.int64(0)) }
                    return ids
                }
                var claimed: [ClaimedNotification] = []
                for receiverID in due where claimed.count < request.limit {
                    let room = min(request.room(for: receiverID), request.limit - claimed.count)
                    guard room > 0 else { continue }
                    guard
                        let found = try db.withStatement(
                            "SELECT \(Self.receiverColumns) FROM alert_receivers r JOIN farms f ON f.id = r.farm_id WHERE r.id = ?", [.integer(receiverID)],
                            { statement in try statement.step() ? try Self.receiver(statement) : nil })
                    else { continue }
                    let (receiver, nextSend) = found
                    let pacing = ReceiverPacing(maxPerMinute: receiver.spec.maxPerMinute)
                    let slots = pacing.slots(next: nextSend, now: request.now, lookahead: request.lookahead, count: room)
                    guard !slots.isEmpty else { continue }
                    let ids = try db.withStatement(
                        """
                        SELECT o.id FROM alert_outbox o WHERE o.receiver_id = ? AND o.state IN ('pending', 'delivering') AND o.next_attempt_at_us <= ?
                            AND o.id NOT IN (SELECT value FROM json_each(?)) AND \(OutboxOrdering.noOlderUnsent)
                        ORDER BY o.next_attempt_at_us, o.id LIMIT ?
                        """, [.integer(receiverID), .integer(now), .text(delivering), .integer(Int64(slots.count))]
                    ) { statement in
                        var ids: [Int64] = []
                        while try statement.step() { ids.append(statement.int64(0)) }
                        return ids
                    }
                    let used = Array(slots.prefix(ids.count))
                    for (id, slot) in zip(ids, used) {
                        let until = slot.microseconds + request.claimDuration.wholeMicroseconds
                        let entry = try db.withStatement(
                            """
                            UPDATE alert_outbox SET state = 'delivering', claimed_by = ?, claimed_until_us = ?, next_attempt_at_us = ?,
                                attempts = attempts + 1, last_attempt_at_us = ?
                            WHERE id = ? RETURNING id
                            """, [.text(request.claimant), .integer(until), .integer(until), .integer(slot.microseconds), .integer(id)]
                        ) { statement in try statement.step() }
                        guard entry, let row = try Self.entries(where: "o.id = ?", [.integer(id)], limit: 1, in: db).first else { continue }
                        claimed.append(ClaimedNotification(entry: row, receiver: receiver, slot: slot))
                    }
                    try db.withStatement(
                        "UPDATE alert_receivers SET next_send_at_us = ? WHERE id = ?",
                        [.integer(pacing.next(after: used, stored: nextSend).microseconds), .integer(receiverID)]
                    ) { statement in _ = try statement.step() }
                }
                return claimed
            }
        }
    }

    public func completeNotification(id: Int64, claim: OutboxClaim, outcome: OutboxCompletion, reached: [String]?) async throws -> Bool {
        let (sql, values) = OutboxCompletionSQL.sqlite(outcome)
        let reachedSet = reached == nil ? "" : ", reached = ?"
        let reachedValue: [SQLiteValue] = reached == nil ? [] : [optional(OutboxReached.encode(reached))]
        return try await writer.withValue { db in
            try db.connection.query(
                sql + reachedSet + " WHERE id = ? AND state = 'delivering' AND claimed_by = ? AND attempts = ?",
                values + reachedValue + [.integer(id), .text(claim.claimant), .integer(Int64(claim.attempt))])
            return db.connection.changes == 1
        }
    }

    public func outboxEntries(farm: String?, state: OutboxState?, limit: Int) async throws -> [OutboxEntry] {
        var conditions: [String] = []
        var values: [SQLiteValue] = []
        if let farm {
            conditions.append("f.name = ?")
            values.append(.text(farm))
        }
        if let state {
            conditions.append("o.state = ?")
            values.append(.text(state.rawValue))
        }
        let filter = conditions.isEmpty ? "1" : conditions.joined(separator: " AND ")
        let bound = values
        return try await reader.withValue { db in try Self.entries(where: filter, bound, limit: limit, in: db) }
    }

    public func retryNotification(id: Int64, now: Timestamp) async throws {
        try await writer.withValue { db in
            try db.connection.transaction {
                let rows = try db.connection.query("SELECT state FROM alert_outbox WHERE id = ?", [.integer(id)])
                guard let text = rows.first?.first?.string else { throw IngestStoreError.notFound("notification \(id)") }
                guard let state = OutboxState(rawValue: text) else { throw IngestStoreError.corrupt("outbox state '\(text)'") }
                guard state == .dead || state == .pending else { throw OutboxRetryRefused(id: id, state: state) }
                try db.connection.query(
                    "UPDATE alert_outbox SET state = 'pending', attempts = 0, next_attempt_at_us = ?, claimed_by = NULL, claimed_until_us = NULL WHERE id = ?",
                    [.integer(now.microseconds), .integer(id)])
            }
        }
    }

    public func releaseClaims(now: Timestamp) async throws -> Int {
        try await writer.withValue { db in
            try db.connection.query(
                """
                UPDATE alert_outbox SET claimed_until_us = ?1, next_attempt_at_us = min(next_attempt_at_us, ?1)
                WHERE state = 'delivering'
                """, [.integer(now.microseconds)])
            return db.connection.changes
        }
    }

    public func outboxCounts() async throws -> [OutboxState: Int] {
        try await reader.withValue { db in
            var counts = Dictionary(uniqueKeysWithValues: OutboxState.allCases.map { ($0, 0) })
            for row in try db.connection.query("SELECT state, count(*) FROM alert_outbox GROUP BY state") {
                if let text = row.first?.string, let state = OutboxState(rawValue: text), let count = row.last?.int64 { counts[state] = Int(count) }
            }
            return counts
        }
    }

    // MARK: Rows

    private static func entries(where filter: String, _ values: [SQLiteValue], limit: Int, in db: CachedConnection) throws -> [OutboxEntry] {
        try db.withStatement(
            """
            SELECT \(entryColumns) FROM alert_outbox o JOIN alert_receivers r ON r.id = o.receiver_id JOIN farms f ON f.id = o.farm_id
            WHERE \(filter) ORDER BY o.id DESC LIMIT ?
            """, values + [.integer(Int64(max(0, limit)))]
        ) { statement in
            var entries: [OutboxEntry] = []
            while try statement.step() {
                guard let state = OutboxState(rawValue: statement.text(8)) else { throw IngestStoreError.corrupt("outbox state '\(statement.text(8))'") }
                func time(_ column: Int32) -> Timestamp? { statement.isNull(column) ? nil : Timestamp(microseconds: statement.int64(column)) }
                func text(_ column: Int32) -> String? { statement.isNull(column) ? nil : statement.text(column) }
                entries.append(
                    OutboxEntry(
                        id: statement.int64(0), farm: statement.text(1), receiverID: statement.int64(2), receiver: statement.text(3),
                        alertID: statement.int64(4), transitionID: statement.int64(5), idempotencyKey: statement.text(6), payload: statement.text(7),
                        state: state, attempts: Int(statement.int64(9)), nextAttemptAt: Timestamp(microseconds: statement.int64(10)),
                        claimedBy: text(11), claimedUntil: time(12), lastError: text(13), createdAt: Timestamp(microseconds: statement.int64(14)),
                        deliveredAt: time(15), lastAttemptAt: time(16), transitions: Int(statement.int64(17)), firstTransitionAt: time(18),
                        coalescedAt: time(19), reached: OutboxReached.decode(text(20))))
            }
            return entries
        }
    }

    private static func receiver(_ statement: SQLiteStatement) throws -> (receiver: AlertReceiver, nextSend: Timestamp) {
        guard let kind = AlertReceiverKind(rawValue: statement.text(4)) else { throw IngestStoreError.corrupt("receiver kind '\(statement.text(4))'") }
        func text(_ column: Int32) -> String? { statement.isNull(column) ? nil : statement.text(column) }
        let spec = AlertReceiverSpec(
            name: statement.text(3), kind: kind, url: statement.text(5), secret: text(6), username: text(7), emailFrom: text(8), emailTo: text(9),
            maxPerMinute: Int(statement.int64(10)), groupWait: .microseconds(statement.int64(13)), groupInterval: .microseconds(statement.int64(14)))
        return (
            AlertReceiver(
                id: statement.int64(0), farmID: statement.int64(1), farm: statement.text(2), spec: spec, createdAt: Timestamp(microseconds: statement.int64(11))),
            Timestamp(microseconds: statement.int64(12))
        )
    }
}

private func optional(_ text: String?) -> SQLiteValue {
    text.map { .text($0) } ?? .null
}

/// The `UPDATE ... SET` part of a completion on SQLite.
enum OutboxCompletionSQL {
    static func sqlite(_ outcome: OutboxCompletion) -> (String, [SQLiteValue]) {
        switch outcome {
        case .delivered(let at):
            ("UPDATE alert_outbox SET state = 'delivered', delivered_at_us = ?, claimed_until_us = NULL, last_error = NULL", [.integer(at.microseconds)])
        case .retry(let at, let error):
            (
                "UPDATE alert_outbox SET state = 'pending', next_attempt_at_us = ?, claimed_until_us = NULL, last_error = ?",
                [.integer(at.microseconds), .text(String(error.prefix(1000)))]
            )
        case .deferred(let at, let error):
            (
                "UPDATE alert_outbox SET state = 'pending', next_attempt_at_us = ?, claimed_until_us = NULL, last_error = ?, attempts = attempts - 1",
                [.integer(at.microseconds), .text(String(error.prefix(1000)))]
            )
        case .dead(_, let error):
            ("UPDATE alert_outbox SET state = 'dead', claimed_until_us = NULL, last_error = ?", [.text(String(error.prefix(1000)))])
        }
    }
}
