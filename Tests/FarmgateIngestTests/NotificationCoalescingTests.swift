import FarmgateSupport
import FarmgateWire
import Foundation
import PostgresNIO
import Synchronization
import Testing

@testable import FarmgateIngest

/// A flapping alert's notifications merged into the receiver's row not sent yet (``OutboxCoalescing``), on both stores,
/// and against concurrent claims on PostgreSQL.
@Suite("Notification coalescing for a flapping alert", .serialized)
struct NotificationCoalescingTests {
    @Test(
        "a sensor flapping while its receiver waits for its slot: one row per claim, telling the newest state and how often it changed",
        arguments: StoreKind.allCases)
    func flappingWhilePaced(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            let outbox = try #require(h.store as? any NotificationOutboxStore)
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5 })
            let first = h.clock.now
            // 40 batches, each one reading across the threshold: 20 firings and 20 resolutions, nothing claimed yet.
            var flapper = Flapper()
            for _ in 0..<40 { try await flapper.flap(h) }
            var rows = try await h.outbox()
            #expect(rows.count == 1, "\(rows.count) rows for 40 transitions of one alert at one receiver")
            var row = try #require(rows.first)
            var told = try notification(row)
            #expect(row.transitions == 40)
            #expect(told.status == .resolved)
            #expect(told.coalesced == AlertNotification.Coalesced(fired: 20, resolved: 20, since: first, newestTransitionID: try await newestTransitionID(h)))
            // The row keeps the key of its first transition: the receiver has never seen it.
            #expect(row.idempotencyKey == told.idempotencyKey(receiver: row.receiverID))
            #expect(told.transitions.count == AlertNotification.mergedTransitionsKept)
            #expect(told.transitions.last?.state == "resolved")

            // One batch of 9 readings flapping: merged the same way, in the engine's one transaction.
            let values = (0..<9).map { $0 % 2 == 0 ? 5.0 : 6.0 }
            try await h.send(values.enumerated().map { (Int64($0.offset), $0.element) }, start: h.clock.now)
            h.clock.advance(seconds: 10)
            flapper.low = false
            rows = try await h.outbox()
            #expect(rows.count == 1)
            row = try #require(rows.first)
            told = try notification(row)
            #expect(row.transitions == 49)
            #expect(told.status == .firing && told.value == 5.0)
            #expect(told.coalesced?.fired == 25 && told.coalesced?.resolved == 24)

            // What the receiver gets: the newest state, and how often it changed since when.
            let webhook = AlertmanagerWebhook(told, receiver: "grower", idempotencyKey: row.idempotencyKey, externalURL: "", now: h.clock.now)
            #expect(webhook.alerts.first?.annotations["transitions"] == "49")
            #expect(webhook.alerts.first?.annotations["transitions_since"] == RFC3339.format(first))
            #expect(webhook.farmgate.coalesced?.fired == 25)
            let since = RFC3339.format(first)
            #expect(webhook.alerts.first?.annotations["description"]?.contains("Fired 25 times and resolved 24 times since \(since)") == true)
            #expect(NotificationText.subject(told).contains("changed 49 times"))
            #expect(NotificationText.emailBody(told, idempotencyKey: row.idempotencyKey, externalURL: "", now: h.clock.now).contains("resolved 24 times since \(since)"))
            let entry = try #require(try await outbox.outboxEntries(farm: "f1", state: .pending, limit: 10).first)
            #expect(entry.transitions == 49 && entry.firstTransitionAt == first && entry.coalescedAt != nil)
            #expect(AlertDeliveryAdmin.describe(entry).contains("49 transitions since \(since)"))
            #expect(AlertDeliveryAdmin.json(entry).contains("\"transitions\":49"))

            // The receiver's slot comes: the row is claimed as it stands.
            let claimed = try #require(try await claim(outbox, h, "a").first)
            #expect(claimed.entry.payload == row.payload)
            // Flapping goes on while it is delivered: a new row, the claimed one untouched.
            for _ in 0..<10 { try await flapper.flap(h) }
            rows = try await h.outbox()
            #expect(rows.count == 2)
            #expect(rows.first?.payload == claimed.entry.payload)
            #expect(rows.last?.transitions == 10)
            #expect(try await outbox.completeNotification(id: claimed.entry.id, claim: claimed.claim, outcome: .delivered(at: h.clock.now)))
            for _ in 0..<5 { try await flapper.flap(h) }
            rows = try await h.outbox()
            #expect(rows.count == 2)
            #expect(rows.last?.transitions == 15)
            // 64 transitions notified, all of them told, none twice.
            #expect(try await notifiableTransitions(h).count == rows.map(\.transitions).reduce(0, +))
        }
    }

    @Test(
        "a receiver's group wait holds an alert's first notification and takes its changes; its group interval spaces the next ones",
        arguments: StoreKind.allCases)
    func groupWaitAndInterval(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            let outbox = try #require(h.store as? any NotificationOutboxStore)
            _ = try await outbox.addAlertReceiver(
                farm: "f1",
                AlertReceiverSpec(name: "grouped", kind: .webhook, url: "http://127.0.0.1:9/hook", groupWait: .seconds(30), groupInterval: .seconds(300)),
                createdAt: h.clock.now)
            let stored = try #require(try await outbox.alertReceivers(farm: "f1").first { $0.spec.name == "grouped" })
            #expect(stored.spec.groupWait == .seconds(30) && stored.spec.groupInterval == .seconds(300))
            #expect(AlertDeliveryAdmin.describe(stored).hasSuffix("group wait 30s, interval 5m"), "\(AlertDeliveryAdmin.describe(stored))")
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5; $0.receivers = ["grower", "grouped"] })
            func rows(_ receiver: String) async throws -> [OutboxEntry] {
                try await outbox.outboxEntries(farm: "f1", state: nil, limit: 100).filter { $0.receiver == receiver }.sorted { $0.id < $1.id }
            }
            func seconds(_ time: Timestamp?, after origin: Timestamp) -> Int64? { time.map { ($0.microseconds - origin.microseconds) / 1_000_000 } }

            // The alert fires: the receiver without grouping is due at once, the grouped one 30 s later.
            let first = h.clock.now
            var flapper = Flapper()
            try await flapper.flap(h)
            #expect(try await rows("grower").map { seconds($0.nextAttemptAt, after: first) } == [0])
            #expect(try await rows("grouped").map { seconds($0.nextAttemptAt, after: first) } == [30])
            // A claim before then takes only the other receiver's row; the grouped row takes the next nine changes.
            let early = try await claim(outbox, h, "a")
            #expect(early.map(\.entry.receiver) == ["grower"])
            for _ in 0..<9 { try await flapper.flap(h) }
            var grouped = try await rows("grouped")
            #expect(grouped.count == 1 && grouped.first?.transitions == 10, "\(grouped.map(\.transitions))")
            #expect(try await rows("grower").count == 2, "the receiver that keeps up got the first change, then the rest merged")

            // Its wait over, it is claimed with the ten changes and delivered.
            h.clock.set(Timestamp(microseconds: first.microseconds + 30_000_000))
            let due = try await claim(outbox, h, "b").filter { $0.entry.receiver == "grouped" }
            let delivered = try #require(due.first)
            #expect(delivered.entry.transitions == 10)
            let sentAt = h.clock.now
            #expect(try await outbox.completeNotification(id: delivered.entry.id, claim: delivered.claim, outcome: .delivered(at: sentAt)))

            // The next changes wait for the group interval after that delivery, merged into one row.
            for _ in 0..<3 { try await flapper.flap(h) }
            grouped = try await rows("grouped")
            #expect(grouped.count == 2)
            #expect(seconds(grouped.last?.nextAttemptAt, after: sentAt) == 300)
            #expect(grouped.last?.transitions == 3)
            h.clock.set(Timestamp(microseconds: sentAt.microseconds + 200_000_000))
            #expect(try await claim(outbox, h, "c").filter { $0.entry.receiver == "grouped" }.isEmpty, "not before the interval")
            h.clock.set(Timestamp(microseconds: sentAt.microseconds + 300_000_000))
            let second = try #require(try await claim(outbox, h, "c").first { $0.entry.receiver == "grouped" })
            #expect(try await outbox.completeNotification(id: second.entry.id, claim: second.claim, outcome: .delivered(at: h.clock.now)))

            // Quiet for longer than the interval: the next change is a new group, due after the wait.
            h.clock.advance(seconds: 3_600)
            let later = h.clock.now
            try await flapper.flap(h)
            #expect(seconds(try await rows("grouped").last?.nextAttemptAt, after: later) == 30)
            // Every notifiable transition reached the grouped receiver's rows once.
            #expect(try await notifiableTransitions(h).count == (try await rows("grouped")).map(\.transitions).reduce(0, +))
        }
    }

    @Test(
        "a row a claim touched is never merged into: being delivered, its attempt taken back (429), retried after it was dead",
        arguments: StoreKind.allCases)
    func touchedRowsAreNeverChanged(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            let outbox = try #require(h.store as? any NotificationOutboxStore)
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5 })
            var flapper = Flapper()
            try await flapper.flap(h)
            // Being delivered.
            let delivering = try #require(try await claim(outbox, h, "a").first)
            try await flapper.flap(h)
            var rows = try await h.outbox()
            #expect(rows.count == 2)
            #expect(rows[0].payload == delivering.entry.payload)
            // Sent (while it is being delivered, the alert's newer row waits: per-alert order at a receiver).
            #expect(try await outbox.completeNotification(id: delivering.entry.id, claim: delivering.claim, outcome: .delivered(at: h.clock.now)))
            // Asked for time: pending again with its attempt taken back (attempts 0), but the receiver has seen it.
            let deferred = try #require(try await claim(outbox, h, "b").first)
            #expect(deferred.entry.id == rows[1].id)
            let later = Timestamp(microseconds: h.clock.now.microseconds + 3_600_000_000)
            #expect(try await outbox.completeNotification(id: deferred.entry.id, claim: deferred.claim, outcome: .deferred(at: later, error: "HTTP 429")))
            #expect(try await outbox.outboxEntries(farm: "f1", state: .pending, limit: 10).first { $0.id == deferred.entry.id }?.attempts == 0)
            try await flapper.flap(h)
            rows = try await h.outbox()
            #expect(rows.count == 3)
            #expect(rows[1].payload == deferred.entry.payload)
            // The alert's newer row waits until the deferred one, due in an hour, has gone out first.
            #expect(try await claim(outbox, h, "c").isEmpty, "a newer notification of the alert overtook one waiting for the receiver's time")
            h.clock.set(later)
            let resent = try #require(try await claim(outbox, h, "b").first)
            #expect(resent.entry.id == deferred.entry.id)
            #expect(try await outbox.completeNotification(id: resent.entry.id, claim: resent.claim, outcome: .delivered(at: h.clock.now)))
            // Dead, then retried by the operator: pending, no attempts, no claim; still sent before.
            let dead = try #require(try await claim(outbox, h, "c").first)
            #expect(dead.entry.id == rows[2].id)
            #expect(try await outbox.completeNotification(id: dead.entry.id, claim: dead.claim, outcome: .dead(at: h.clock.now, error: "HTTP 400")))
            try await outbox.retryNotification(id: dead.entry.id, now: h.clock.now)
            try await flapper.flap(h)
            rows = try await h.outbox()
            #expect(rows.count == 4)
            #expect(rows[2].payload == dead.entry.payload)
            #expect(rows.map(\.transitions) == [1, 1, 1, 1])
            // The newest row, never claimed, takes the next transition.
            try await flapper.flap(h)
            rows = try await h.outbox()
            #expect(rows.count == 4, "the row no claim touched was not merged into")
            #expect(rows.map(\.transitions) == [1, 1, 1, 2])
            #expect(try notification(rows[3]).status == .firing)
        }
    }

    @Test("each receiver has its own row: one that was claimed gets a new row, the other's waiting row takes the change", arguments: StoreKind.allCases)
    func perReceiver(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            let outbox = try #require(h.store as? any NotificationOutboxStore)
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5; $0.receivers = ["grower", "on-call"] })
            var flapper = Flapper()
            try await flapper.flap(h)
            var rows = try await h.outbox()
            let grower = try #require(rows.first { $0.receiver == "grower" })
            // Only the grower's row is claimed (the on-call receiver is busy here).
            let onCall = try #require(rows.first { $0.receiver == "on-call" })
            let claimed = try await claim(outbox, h, "a", busy: [onCall.receiverID: 10])
            #expect(claimed.map(\.entry.id) == [grower.id])
            try await flapper.flap(h)
            rows = try await h.outbox()
            #expect(rows.count == 3)
            #expect(rows.first { $0.id == onCall.id }?.transitions == 2)
            #expect(rows.filter { $0.receiver == "grower" }.map(\.transitions) == [1, 1])
        }
    }

    @Test("on PostgreSQL, a claim holding the row when the engine writes: the engine waits, then adds a row; what the claim read is what stays")
    func claimHoldingTheRow() async throws {
        try await AlertHarness.with(.postgres) { h in
            let store = try #require(h.store as? PostgresIngestStore)
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5 })
            var flapper = Flapper()
            try await flapper.flap(h)
            let row = try #require(try await h.outbox().first)
            let (locked, lockedContinuation) = AsyncStream<Void>.makeStream()
            let engineDone = Flag()
            // A claim's transaction: takes the row as `claimNotifications` does, then holds it while the engine writes.
            async let claimed: String = store.transaction { connection in
                var payload = ""
                for try await id in try await connection.query(
                    "SELECT id FROM alert_outbox WHERE id = \(row.id) AND state = 'pending' FOR UPDATE SKIP LOCKED", logger: testLogger
                ).decode(Int64.self) { _ = id }
                for try await text in try await connection.query(
                    """
                    UPDATE alert_outbox SET state = 'delivering', claimed_by = 'instance-x', attempts = attempts + 1, claimed_until_us = 0,
                        last_attempt_at_us = 0 WHERE id = \(row.id) RETURNING payload
                    """, logger: testLogger
                ).decode(String.self) { payload = text }
                lockedContinuation.yield()
                try await Task.sleep(for: .milliseconds(500))
                #expect(!engineDone.isSet, "the engine's write did not wait for the claim's lock")
                return payload
            }
            for await _ in locked { break }
            try await flapper.flap(h)
            engineDone.set()
            let payload = try await claimed
            #expect(payload == row.payload)
            var rows = try await h.outbox()
            #expect(rows.count == 2)
            #expect(rows[0].payload == payload && rows[0].state == "delivering")
            #expect(try notification(rows[1]).status == .resolved)
            try await flapper.flap(h)
            rows = try await h.outbox()
            #expect(rows.map(\.transitions) == [1, 2])
        }
    }

    @Test("on PostgreSQL, claims racing a flapping alert's writes: every transition told exactly once, no claimed row changed")
    func claimsRacingMerges() async throws {
        try await AlertHarness.with(.postgres) { h in
            let outbox = try #require(h.store as? any NotificationOutboxStore)
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5; $0.receivers = ["grower", "on-call"] })
            let done = Flag()
            // The claimers start after the first ten changes, which therefore merge into the receivers' first rows
            // whatever the scheduling; from then on claims and merges race.
            let claiming = Flag()
            let start = h.clock.now
            // Two claimers (two instances) take a row each whenever one is due, and deliver it at once.
            let sent = try await withThrowingTaskGroup(of: [Int64: String].self) { group in
                for claimant in ["a", "b"] {
                    group.addTask {
                        var sent: [Int64: String] = [:]
                        var step: Int64 = 0
                        while !claiming.isSet { try await Task.sleep(for: .milliseconds(1)) }
                        while true {
                            let finished = done.isSet
                            step += 1
                            let now = Timestamp(microseconds: start.microseconds + step * 2_000_000)
                            let got = try await outbox.claimNotifications(
                                OutboxClaimRequest(
                                    claimant: claimant, now: now, claimDuration: .seconds(3600), lookahead: .seconds(1), limit: 1, perReceiver: 1,
                                    maxAttempts: 5))
                            for claimed in got {
                                sent[claimed.entry.id] = claimed.entry.payload
                                // Delivering takes a while, during which the alert may change again.
                                try await Task.sleep(for: .milliseconds(Int.random(in: 0...15)))
                                #expect(try await outbox.completeNotification(id: claimed.entry.id, claim: claimed.claim, outcome: .delivered(at: now)))
                            }
                            if finished, got.isEmpty, try await outbox.outboxEntries(farm: "f1", state: .pending, limit: 1).isEmpty { break }
                            if got.isEmpty { try await Task.sleep(for: .milliseconds(1)) }
                        }
                        return sent
                    }
                }
                var flapper = Flapper()
                for index in 0..<150 {
                    try await flapper.flap(h)
                    if index == 9 { claiming.set() }
                }
                done.set()
                var all: [Int64: String] = [:]
                for try await sent in group { all.merge(sent) { first, _ in first } }
                return all
            }
            let rows = try await h.outbox()
            #expect(rows.allSatisfy { $0.state == "delivered" })
            #expect(Set(sent.keys) == Set(rows.map(\.id)))
            // What each claim took is what the row still holds: nothing changed after a claim.
            for row in rows { #expect(sent[row.id] == row.payload, "row \(row.id) changed after it was claimed") }
            // Each receiver's rows, in order, tell the notifiable transitions one after another: none lost, none twice.
            let notifiable = try await notifiableTransitions(h)
            #expect(notifiable.count == 150)
            for receiver in ["grower", "on-call"] {
                var told: [Int64] = []
                for row in rows where row.receiver == receiver {
                    let n = try notification(row)
                    let newest = n.coalesced?.newestTransitionID ?? n.transitionID
                    let range = notifiable.filter { $0 >= n.transitionID && $0 <= newest }
                    #expect(range.count == row.transitions, "row \(row.id) tells \(row.transitions) transitions, covers \(range.count)")
                    told += range
                }
                #expect(told == notifiable, "\(receiver): \(told.count) transitions told for \(notifiable.count)")
            }
            #expect(rows.count < 300, "\(rows.count) rows: nothing was merged")
        }
    }

    @Test("an outbox from before the migration: its rows tell one transition each, and a waiting one takes the next change", arguments: StoreKind.allCases)
    func upgradedOutbox(kind: StoreKind) async throws {
        let notification = AlertNotification(
            farm: "f1", rule: "ph-low", alertID: 7, transitionID: 70, fingerprint: "fp", status: .firing, severity: "warning", labels: [:],
            summary: "pH low", startsAt: testNow, transitions: [.init(state: "pending", at: testNow), .init(state: "firing", at: testNow)])
        let payload = try OutboxPayload.encode(notification)
        let key = notification.idempotencyKey(receiver: 1)
        let insert = """
            INSERT INTO farms(id, name, created_at_us) VALUES (1, 'f1', 0);
            INSERT INTO alert_receivers(id, farm_id, name, kind, url, created_at_us) VALUES (1, 1, 'grower', 'webhook', 'http://127.0.0.1:9/', 0);
            INSERT INTO alert_outbox(farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, next_attempt_at_us, created_at_us)
                VALUES (1, 1, 7, 70, '\(key)', '\(payload.replacingOccurrences(of: "'", with: "''"))', 0, 0);
            """
        switch kind {
        case .sqlite:
            let directory = try TemporaryDirectory()
            defer { directory.remove() }
            let path = directory.path + "/ingest.sqlite"
            try await runOffPool {
                let db = try sqliteIngestFile(at: path, migratedTo: 11)
                try db.execute(insert)
            }
            let store = try SQLiteIngestStore(path: path, logger: testLogger)
            defer { store.close() }
            #expect(try await store.migrate().map(\.version) == Array(12...SQLiteSchema.currentVersion))
            try await checkUpgraded(store, key: key, notification: notification)
        case .postgres:
            try await withTestDatabase { settings in
                try await postgresSchema(migratedTo: 12, settings)
                for statement in insert.split(separator: ";").map({ $0.trimmingCharacters(in: .whitespacesAndNewlines) }) where !statement.isEmpty {
                    try await adminQuery(settings, statement)
                }
                let store = try PostgresIngestStore(settings: settings, logger: testLogger)
                try await withRunning(store) { _ in
                    #expect(try await store.migrate().map(\.version) == Array(13...PostgresSchema.currentVersion))
                    try await checkUpgraded(store, key: key, notification: notification)
                }
            }
        }
    }

    private func checkUpgraded(_ store: any NotificationOutboxStore, key: String, notification: AlertNotification) async throws {
        let old = try #require(try await store.outboxEntries(farm: "f1", state: nil, limit: 10).first)
        #expect(old.transitions == 1 && old.firstTransitionAt == nil && old.coalescedAt == nil)
        #expect(AlertDeliveryAdmin.describe(old).contains("\t1 transition\t"))
        // The alert resolves: the row written before the upgrade, never sent, takes it.
        var resolved = notification
        resolved.transitionID = 71
        resolved.status = .resolved
        resolved.endsAt = Timestamp(microseconds: testNow.microseconds + 60_000_000)
        resolved.transitions = [.init(state: "resolved", at: Timestamp(microseconds: testNow.microseconds + 60_000_000))]
        let merged = try #require(OutboxCoalescing.merged(resolved, into: OutboxCoalescing.Tail(id: old.id, state: "pending", attempts: 0, payload: old.payload)))
        #expect(merged.coalesced == AlertNotification.Coalesced(fired: 1, resolved: 1, since: testNow, newestTransitionID: 71))
        #expect(merged.idempotencyKey(receiver: 1) == key)
    }
}

/// A flag set once, read from other tasks.
private final class Flag: Sendable {
    private let value = Mutex(false)
    var isSet: Bool { value.withLock { $0 } }
    func set() { value.withLock { $0 = true } }
}

/// Sends one reading a second that crosses the `below 5.5` threshold: each one a firing or a resolution.
private struct Flapper {
    var low = true

    mutating func flap(_ h: AlertHarness) async throws {
        try await h.send([(0, low ? 5.0 : 6.0)], start: h.clock.now)
        low.toggle()
        h.clock.advance(seconds: 1)
    }
}

private func notification(_ row: AlertOutboxRow) throws -> AlertNotification {
    try OutboxPayload.decode(row.payload)
}

/// Claims one due row at the harness's clock (one a second: the receivers' pacing), as instance `claimant`.
private func claim(_ outbox: any NotificationOutboxStore, _ h: AlertHarness, _ claimant: String, busy: [Int64: Int] = [:]) async throws
    -> [ClaimedNotification]
{
    h.clock.advance(seconds: 2)
    return try await outbox.claimNotifications(
        OutboxClaimRequest(
            claimant: claimant, now: h.clock.now, claimDuration: .seconds(3600), lookahead: .seconds(1), limit: 10, perReceiver: 10, busy: busy,
            maxAttempts: 5))
}

/// The ids of the alert's firing and resolved transitions, in order.
private func notifiableTransitions(_ h: AlertHarness) async throws -> [Int64] {
    let alert = try #require(try await h.alerts().first)
    return try await h.store.alertTransitions(alertIDs: [alert.id], newestPerAlert: nil).filter { $0.to == .firing || $0.to == .resolved }.map(\.id)
        .sorted()
}

private func newestTransitionID(_ h: AlertHarness) async throws -> Int64 {
    try #require(try await notifiableTransitions(h).last)
}
