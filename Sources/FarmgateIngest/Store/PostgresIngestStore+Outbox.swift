import FarmgateSupport
import FarmgateWire
import Foundation
import PostgresNIO

/// Alert receivers and the notification outbox on PostgreSQL (migrations 2 and 8), for several instances at once.
///
/// A claim is one short transaction: expired claims past the attempt limit become dead letters; the receivers with due
/// rows are locked `FOR NO KEY UPDATE SKIP LOCKED` (another instance claiming for the same receiver skips it this
/// round, and the engine's inserts, which only take `FOR KEY SHARE` on the receiver through the foreign key, never
/// wait); each receiver's due rows are locked `FOR UPDATE SKIP LOCKED`, marked `delivering` with `claimed_by` and
/// `claimed_until_us`, and the receiver's pacing (`next_send_at_us`) is moved past the slots handed out.
///
/// The delivery workers time their claims by the database's clock (``OutboxClaimClock/store``): instances' clocks
/// drift apart, and an instance running a minute ahead would otherwise see another's live claims as expired, deliver
/// them a second time, and sweep those at their last attempt into dead letters. Completions keep the instance's times
/// (a retry's due time, when it was delivered): a pending row has no owner, so a skewed clock only moves its next
/// attempt by the skew (NTP is still worth having: a backoff shorter than the skew of an instance running behind is
/// not waited).
extension PostgresIngestStore: NotificationOutboxStore {
    static let receiverColumns = """
        r.id, r.farm_id, f.name, r.name, r.kind, r.url, r.secret, r.username, r.email_from, r.email_to, r.max_per_minute::int8,
        r.created_at_us, r.next_send_at_us, r.group_wait_us, r.group_interval_us
        """
    static let entryColumns = """
        o.id, f.name, o.receiver_id, r.name, o.alert_id, o.transition_id, o.idempotency_key, o.payload, o.state, o.attempts::int8,
        o.next_attempt_at_us, o.claimed_by, o.claimed_until_us, o.last_error, o.created_at_us, o.delivered_at_us, o.last_attempt_at_us,
        o.transitions::int8, o.first_transition_at_us, o.coalesced_at_us, o.reached
        """

    public func addAlertReceiver(farm: String, _ spec: AlertReceiverSpec, createdAt: Timestamp) async throws -> AlertReceiver {
        let rows: [(Int64, Int64)]
        do {
            rows = try await self.rows(
                """
                INSERT INTO alert_receivers(farm_id, name, kind, url, secret, username, email_from, email_to, max_per_minute, created_at_us,
                    group_wait_us, group_interval_us)
                SELECT id, \(spec.name), \(spec.kind.rawValue), \(spec.url), \(spec.secret), \(spec.username), \(spec.emailFrom), \(spec.emailTo),
                    \(spec.maxPerMinute)::integer, \(createdAt.microseconds), \(spec.groupWait.wholeMicroseconds), \(spec.groupInterval.wholeMicroseconds)
                FROM farms WHERE name = \(farm)
                RETURNING id, farm_id
                """
            ) { try $0.decode((Int64, Int64).self) }
        } catch let error as PSQLError where error.isUniqueViolation {
            throw IngestStoreError.alreadyExists("receiver '\(spec.name)' in farm '\(farm)'")
        }
        guard let first = rows.first else { throw IngestStoreError.notFound("farm '\(farm)'") }
        return AlertReceiver(id: first.0, farmID: first.1, farm: farm, spec: spec, createdAt: createdAt)
    }

    public func alertReceivers(farm: String) async throws -> [AlertReceiver] {
        guard try await self.farm(named: farm) != nil else { throw IngestStoreError.notFound("farm '\(farm)'") }
        return try await rows(
            """
            SELECT \(unescaped: Self.receiverColumns) FROM alert_receivers r JOIN farms f ON f.id = r.farm_id
            WHERE f.name = \(farm) ORDER BY r.name COLLATE "C"
            """
        ) { try Self.receiver($0).receiver }
    }

    public func updateAlertReceiver(farm: String, _ spec: AlertReceiverSpec) async throws -> AlertReceiver {
        let rows = try await self.rows(
            """
            UPDATE alert_receivers r SET kind = \(spec.kind.rawValue), url = \(spec.url), secret = \(spec.secret), username = \(spec.username),
                email_from = \(spec.emailFrom), email_to = \(spec.emailTo), max_per_minute = \(spec.maxPerMinute)::integer,
                group_wait_us = \(spec.groupWait.wholeMicroseconds), group_interval_us = \(spec.groupInterval.wholeMicroseconds)
            FROM farms f WHERE f.id = r.farm_id AND f.name = \(farm) AND r.name = \(spec.name)
            RETURNING r.id, r.farm_id, r.created_at_us
            """
        ) { try $0.decode((Int64, Int64, Int64).self) }
        guard let first = rows.first else { throw IngestStoreError.notFound("receiver '\(spec.name)' in farm '\(farm)'") }
        return AlertReceiver(id: first.0, farmID: first.1, farm: farm, spec: spec, createdAt: Timestamp(microseconds: first.2))
    }

    public func removeAlertReceiver(farm: String, name: String) async throws -> Int {
        let logger = self.logger
        return try await transaction { connection in
            var found: Int64?
            for try await id in try await connection.query(
                """
                SELECT r.id FROM alert_receivers r JOIN farms f ON f.id = r.farm_id WHERE f.name = \(farm) AND r.name = \(name) FOR UPDATE OF r
                """, logger: logger
            ).decode(Int64.self) { found = id }
            guard let id = found else { throw IngestStoreError.notFound("receiver '\(name)' in farm '\(farm)'") }
            var undelivered = 0
            for try await count in try await connection.query(
                "SELECT count(*) FROM alert_outbox WHERE receiver_id = \(id) AND state <> 'delivered'", logger: logger
            ).decode(Int64.self) { undelivered = Int(count) }
            try await connection.query("DELETE FROM alert_outbox WHERE receiver_id = \(id)", logger: logger)
            try await connection.query("DELETE FROM alert_receivers WHERE id = \(id)", logger: logger)
            return undelivered
        }
    }

    public func enqueueNotification(_ notification: AlertNotification, receiverID: Int64, dueAt: Timestamp) async throws -> Int64? {
        let payload = try OutboxPayload.encode(notification)
        let key = notification.idempotencyKey(receiver: receiverID)
        return try await rows(
            """
            INSERT INTO alert_outbox(farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, next_attempt_at_us, created_at_us,
                transitions, first_transition_at_us)
            SELECT farm_id, id, \(notification.alertID), \(notification.transitionID), \(key), \(payload), \(dueAt.microseconds), \(dueAt.microseconds),
                \(Int32(clamping: notification.transitionCount)), \(notification.firstTransitionAt.microseconds)
            FROM alert_receivers WHERE id = \(receiverID)
            ON CONFLICT (idempotency_key) DO NOTHING RETURNING id
            """
        ) { try $0.decode(Int64.self) }.first
    }

    public func claimNotifications(_ request: OutboxClaimRequest) async throws -> [ClaimedNotification] {
        guard request.limit > 0 else { return [] }
        let logger = self.logger
        let maxAttempts = request.maxAttempts
        let called = ContinuousClock.now
        return try await transaction { connection in
            // `now` in the claim's clock, and how far the claimant's clock is ahead of it (its slots are moved by that).
            let now: Int64
            let offset: Int64
            switch request.clock {
            case .claimant:
                now = request.now.microseconds
                offset = 0
            case .store:
                var read: Int64?
                for try await value in try await connection.query(
                    "SELECT \(unescaped: Self.databaseClockMicroseconds)", logger: logger
                ).decode(Int64.self) { read = value }
                guard let read else { throw IngestStoreError.corrupt("clock_timestamp() returned no row") }
                now = read
                offset = request.now.microseconds + (ContinuousClock.now - called).wholeMicroseconds - read
            }
            let storeNow = Timestamp(microseconds: now)
            let horizon = now + max(1, request.lookahead.wholeMicroseconds)
            try await connection.query(
                """
                UPDATE alert_outbox SET state = 'dead', claimed_by = NULL, claimed_until_us = NULL,
                    last_error = 'the instance delivering it stopped before it finished (attempt ' || attempts || ' of ' || \(maxAttempts)::integer
                        || '); last error: ' || coalesce(last_error, 'none')
                WHERE state = 'delivering' AND next_attempt_at_us <= \(now) AND attempts >= \(maxAttempts)::integer
                """, logger: logger)
            // Receivers with due rows that can take one now, the longest-waiting first: not one whose pacing has no
            // slot before the horizon, nor one with no room at this instance. Those would otherwise fill the 200 and
            // starve every receiver past them for as long as they stay behind.
            let full = request.busy.keys.filter { request.room(for: $0) == 0 }.sorted()
            let delivering = request.delivering.sorted()
            var due: [Int64] = []
            for try await id in try await connection.query(
                """
                SELECT o.receiver_id FROM alert_outbox o JOIN alert_receivers r ON r.id = o.receiver_id
                WHERE o.state IN ('pending', 'delivering') AND o.next_attempt_at_us <= \(now) AND r.next_send_at_us < \(horizon)
                    AND o.receiver_id <> ALL(\(full)::int8[]) AND \(unescaped: OutboxOrdering.noOlderUnsent)
                GROUP BY o.receiver_id ORDER BY min(o.next_attempt_at_us) LIMIT 200
                """, logger: logger
            ).decode(Int64.self) { due.append(id) }
            guard !due.isEmpty else { return [] }
            var receivers: [(AlertReceiver, Timestamp)] = []
            for try await row in try await connection.query(
                """
                SELECT \(unescaped: Self.receiverColumns) FROM alert_receivers r JOIN farms f ON f.id = r.farm_id
                WHERE r.id = ANY(\(due)) AND r.next_send_at_us < \(horizon)
                FOR NO KEY UPDATE OF r SKIP LOCKED
                """, logger: logger
            ) { receivers.append(try Self.receiver(row)) }
            let order = Dictionary(uniqueKeysWithValues: due.enumerated().map { ($1, $0) })
            receivers.sort { order[$0.0.id, default: 0] < order[$1.0.id, default: 0] }

            var claimed: [ClaimedNotification] = []
            for (receiver, nextSend) in receivers where claimed.count < request.limit {
                let room = min(request.room(for: receiver.id), request.limit - claimed.count)
                let pacing = ReceiverPacing(maxPerMinute: receiver.spec.maxPerMinute)
                let slots = pacing.slots(next: nextSend, now: storeNow, lookahead: request.lookahead, count: room)
                guard !slots.isEmpty else { continue }
                var ids: [Int64] = []
                for try await id in try await connection.query(
                    """
                    SELECT o.id FROM alert_outbox o WHERE o.receiver_id = \(receiver.id) AND o.state IN ('pending', 'delivering')
                        AND o.next_attempt_at_us <= \(now) AND o.id <> ALL(\(delivering)::int8[]) AND \(unescaped: OutboxOrdering.noOlderUnsent)
                    ORDER BY o.next_attempt_at_us, o.id LIMIT \(slots.count) FOR UPDATE OF o SKIP LOCKED
                    """, logger: logger
                ).decode(Int64.self) { ids.append(id) }
                let used = Array(slots.prefix(ids.count))
                guard !used.isEmpty else { continue }
                let untils = used.map { $0.microseconds + request.claimDuration.wholeMicroseconds }
                let slotTimes = used.map(\.microseconds)
                try await connection.query(
                    """
                    UPDATE alert_outbox o SET state = 'delivering', claimed_by = \(request.claimant), claimed_until_us = c.until,
                        next_attempt_at_us = c.until, attempts = o.attempts + 1, last_attempt_at_us = c.slot
                    FROM unnest(\(ids)::int8[], \(untils)::int8[], \(slotTimes)::int8[]) AS c(id, until, slot)
                    WHERE o.id = c.id
                    """, logger: logger)
                try await connection.query(
                    "UPDATE alert_receivers SET next_send_at_us = \(pacing.next(after: used, stored: nextSend).microseconds) WHERE id = \(receiver.id)",
                    logger: logger)
                let slotByID = Dictionary(uniqueKeysWithValues: zip(ids, used))
                for try await row in try await connection.query(
                    """
                    SELECT \(unescaped: Self.entryColumns) FROM alert_outbox o JOIN alert_receivers r ON r.id = o.receiver_id
                    JOIN farms f ON f.id = o.farm_id WHERE o.id = ANY(\(ids)) ORDER BY o.next_attempt_at_us, o.id
                    """, logger: logger
                ) {
                    let entry = try Self.entry(row)
                    let slot = slotByID[entry.id] ?? storeNow
                    claimed.append(ClaimedNotification(entry: entry, receiver: receiver, slot: Timestamp(microseconds: slot.microseconds + offset)))
                }
            }
            return claimed
        }
    }

    public func completeNotification(id: Int64, claim: OutboxClaim, outcome: OutboxCompletion, reached: [String]?) async throws -> Bool {
        // Bound as text and applied only when given (`reached` untouched for nil).
        let keepReached = reached == nil
        let reachedText = OutboxReached.encode(reached)
        let query: PostgresQuery
        switch outcome {
        case .delivered(let at):
            query = """
                UPDATE alert_outbox SET state = 'delivered', delivered_at_us = \(at.microseconds), claimed_until_us = NULL, last_error = NULL,
                    reached = CASE WHEN \(keepReached) THEN reached ELSE \(reachedText) END
                WHERE id = \(id) AND state = 'delivering' AND claimed_by = \(claim.claimant) AND attempts = \(claim.attempt)::integer RETURNING id
                """
        case .retry(let at, let error):
            query = """
                UPDATE alert_outbox SET state = 'pending', next_attempt_at_us = \(at.microseconds), claimed_until_us = NULL,
                    last_error = \(String(error.prefix(1000))),
                    reached = CASE WHEN \(keepReached) THEN reached ELSE \(reachedText) END
                WHERE id = \(id) AND state = 'delivering' AND claimed_by = \(claim.claimant) AND attempts = \(claim.attempt)::integer RETURNING id
                """
        case .deferred(let at, let error):
            query = """
                UPDATE alert_outbox SET state = 'pending', next_attempt_at_us = \(at.microseconds), claimed_until_us = NULL,
                    last_error = \(String(error.prefix(1000))), attempts = attempts - 1,
                    reached = CASE WHEN \(keepReached) THEN reached ELSE \(reachedText) END
                WHERE id = \(id) AND state = 'delivering' AND claimed_by = \(claim.claimant) AND attempts = \(claim.attempt)::integer RETURNING id
                """
        case .dead(_, let error):
            query = """
                UPDATE alert_outbox SET state = 'dead', claimed_until_us = NULL, last_error = \(String(error.prefix(1000))),
                    reached = CASE WHEN \(keepReached) THEN reached ELSE \(reachedText) END
                WHERE id = \(id) AND state = 'delivering' AND claimed_by = \(claim.claimant) AND attempts = \(claim.attempt)::integer RETURNING id
                """
        }
        return try await rows(query) { try $0.decode(Int64.self) }.count == 1
    }

    public func outboxEntries(farm: String?, state: OutboxState?, limit: Int) async throws -> [OutboxEntry] {
        try await rows(
            """
            SELECT \(unescaped: Self.entryColumns) FROM alert_outbox o JOIN alert_receivers r ON r.id = o.receiver_id JOIN farms f ON f.id = o.farm_id
            WHERE (\(farm)::text IS NULL OR f.name = \(farm)) AND (\(state?.rawValue)::text IS NULL OR o.state = \(state?.rawValue))
            ORDER BY o.id DESC LIMIT \(max(0, limit))
            """
        ) { try Self.entry($0) }
    }

    public func retryNotification(id: Int64, now: Timestamp) async throws {
        let logger = self.logger
        try await transaction { connection in
            var found: String?
            for try await text in try await connection.query("SELECT state FROM alert_outbox WHERE id = \(id) FOR UPDATE", logger: logger).decode(String.self) {
                found = text
            }
            guard let text = found else { throw IngestStoreError.notFound("notification \(id)") }
            guard let state = OutboxState(rawValue: text) else { throw IngestStoreError.corrupt("outbox state '\(text)'") }
            guard state == .dead || state == .pending else { throw OutboxRetryRefused(id: id, state: state) }
            try await connection.query(
                """
                UPDATE alert_outbox SET state = 'pending', attempts = 0, next_attempt_at_us = \(now.microseconds), claimed_by = NULL,
                    claimed_until_us = NULL WHERE id = \(id)
                """, logger: logger)
        }
    }

    public func releaseClaims(now: Timestamp) async throws -> Int {
        let released = try await rows(
            """
            UPDATE alert_outbox SET claimed_until_us = \(now.microseconds), next_attempt_at_us = least(next_attempt_at_us, \(now.microseconds))
            WHERE state = 'delivering' RETURNING id
            """
        ) { try $0.decode(Int64.self) }
        return released.count
    }

    public func outboxCounts() async throws -> [OutboxState: Int] {
        var counts = Dictionary(uniqueKeysWithValues: OutboxState.allCases.map { ($0, 0) })
        for (text, count) in try await rows("SELECT state, count(*) FROM alert_outbox GROUP BY state", { try $0.decode((String, Int64).self) }) {
            if let state = OutboxState(rawValue: text) { counts[state] = Int(count) }
        }
        return counts
    }

    // MARK: Rows

    private static func entry(_ row: PostgresRow) throws -> OutboxEntry {
        let (id, farm, receiverID, receiver, alertID, transitionID, key, payload, stateText) = try row.decode(
            (Int64, String, Int64, String, Int64, Int64, String, String, String).self)
        let columns = row.makeRandomAccess()
        guard let state = OutboxState(rawValue: stateText) else { throw IngestStoreError.corrupt("outbox state '\(stateText)'") }
        func time(_ index: Int) throws -> Timestamp? { try columns[index].decode(Int64?.self).map { Timestamp(microseconds: $0) } }
        return OutboxEntry(
            id: id, farm: farm, receiverID: receiverID, receiver: receiver, alertID: alertID, transitionID: transitionID, idempotencyKey: key,
            payload: payload, state: state, attempts: Int(try columns[9].decode(Int64.self)),
            nextAttemptAt: Timestamp(microseconds: try columns[10].decode(Int64.self)), claimedBy: try columns[11].decode(String?.self),
            claimedUntil: try time(12), lastError: try columns[13].decode(String?.self),
            createdAt: Timestamp(microseconds: try columns[14].decode(Int64.self)), deliveredAt: try time(15), lastAttemptAt: try time(16),
            transitions: Int(try columns[17].decode(Int64.self)), firstTransitionAt: try time(18), coalescedAt: try time(19),
            reached: OutboxReached.decode(try columns[20].decode(String?.self)))
    }

    private static func receiver(_ row: PostgresRow) throws -> (receiver: AlertReceiver, nextSend: Timestamp) {
        let (id, farmID, farm, name, kindText, url, secret, username, emailFrom, emailTo, maxPerMinute, createdAt, nextSend, groupWait, groupInterval) =
            try row.decode((Int64, Int64, String, String, String, String, String?, String?, String?, String?, Int64, Int64, Int64, Int64, Int64).self)
        guard let kind = AlertReceiverKind(rawValue: kindText) else { throw IngestStoreError.corrupt("receiver kind '\(kindText)'") }
        let spec = AlertReceiverSpec(
            name: name, kind: kind, url: url, secret: secret, username: username, emailFrom: emailFrom, emailTo: emailTo, maxPerMinute: Int(maxPerMinute),
            groupWait: .microseconds(groupWait), groupInterval: .microseconds(groupInterval))
        return (AlertReceiver(id: id, farmID: farmID, farm: farm, spec: spec, createdAt: Timestamp(microseconds: createdAt)), Timestamp(microseconds: nextSend))
    }
}
