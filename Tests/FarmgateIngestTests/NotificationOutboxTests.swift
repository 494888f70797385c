import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

@testable import FarmgateIngest

/// The outbox role on both stores (claims, pacing, receivers), and two instances delivering from one PostgreSQL.
@Suite("Notification outbox", .serialized)
struct NotificationOutboxTests {
    @Test("Concurrent claims never hand out one row twice, and claims respect per-receiver room and pacing", arguments: StoreKind.allCases)
    func claimsAreExclusive(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            var receivers: [AlertReceiver] = []
            for index in 0..<3 { receivers.append(try await addWebhook(store, name: "r\(index)", url: "http://127.0.0.1:9/")) }
            for alert in Int64(1)...60 {
                _ = try await store.enqueueNotification(testNotification(alert), receiverID: receivers[Int(alert) % 3].id, dueAt: testNow)
            }
            // The same notification again is not a second row.
            #expect(try await store.enqueueNotification(testNotification(1), receiverID: receivers[1].id, dueAt: testNow) == nil)
            let now = Timestamp(microseconds: testNow.microseconds + 1_000_000)
            let claims = try await withThrowingTaskGroup(of: [ClaimedNotification].self) { group in
                for claimant in 0..<8 {
                    group.addTask {
                        var mine: [ClaimedNotification] = []
                        // Until nothing is pending: a claimer that finds every receiver locked by others gets nothing this round.
                        for _ in 0..<500 {
                            let got = try await store.claimNotifications(
                                OutboxClaimRequest(
                                    claimant: "c\(claimant)", now: now, claimDuration: .seconds(60), lookahead: .seconds(1), limit: 5, perReceiver: 100,
                                    maxAttempts: 5))
                            mine += got
                            if got.isEmpty {
                                if try await rows(store, .pending).isEmpty { break }
                                try await Task.sleep(for: .milliseconds(2))
                            }
                        }
                        return mine
                    }
                }
                var all: [ClaimedNotification] = []
                for try await mine in group { all += mine }
                return all
            }
            let ids = claims.map(\.entry.id)
            #expect(ids.count == Set(ids).count, "a row was claimed twice")
            #expect(ids.count == 60)
            for claim in claims {
                #expect(claim.entry.state == .delivering)
                #expect(claim.entry.attempts == 1)
                #expect(claim.entry.claimedBy == claim.claim.claimant)
                #expect(claim.entry.claimedUntil == Timestamp(microseconds: claim.slot.microseconds + 60_000_000))
            }
            #expect(try await rows(store, .pending).isEmpty)
        }
    }

    @Test("Pacing: at most max_per_minute slots a minute per receiver, however many claimers", arguments: StoreKind.allCases)
    func pacingAcrossClaimers(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "paced", url: "http://127.0.0.1:9/", maxPerMinute: 6)
            for alert in Int64(1)...20 { _ = try await store.enqueueNotification(testNotification(alert), receiverID: receiver.id, dueAt: testNow) }
            var slots: [Timestamp] = []
            // Two claimers every 5 s for two minutes of the store's clock, each with room for everything.
            for step in 0..<24 {
                let now = Timestamp(microseconds: testNow.microseconds + Int64(step) * 5_000_000)
                for claimant in ["a", "b"] {
                    slots += try await store.claimNotifications(
                        OutboxClaimRequest(
                            claimant: claimant, now: now, claimDuration: .seconds(3600), lookahead: .seconds(1), limit: 20, perReceiver: 20, maxAttempts: 5)
                    ).map(\.slot)
                }
            }
            slots.sort()
            // 6 a minute: one every 10 s, so 12 in two minutes, never two within 10 s.
            #expect(slots.count == 12, "\(slots.count) slots in two minutes at 6 a minute")
            for (earlier, later) in zip(slots, slots.dropFirst()) { #expect(later.microseconds - earlier.microseconds >= 10_000_000) }
        }
    }

    @Test(
        "Receivers past the 200 longest-waiting are claimed when those 200 cannot take a row now (paced out, or no room here)",
        arguments: StoreKind.allCases)
    func receiversPastTheFirstTwoHundredAreNotStarved(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            func claim(at now: Timestamp, busy: [Int64: Int] = [:]) async throws -> [ClaimedNotification] {
                try await store.claimNotifications(
                    OutboxClaimRequest(
                        claimant: "a", now: now, claimDuration: .seconds(3600), lookahead: .seconds(1), limit: 1_000, perReceiver: 2, busy: busy,
                        maxAttempts: 5))
            }
            // 200 receivers at one notification a minute, each with two rows due: the first claim takes one row of
            // each and uses its slot for the next minute; the second rows wait, the oldest rows of the outbox.
            var slow: [AlertReceiver] = []
            for index in 0..<200 {
                let receiver = try await addWebhook(store, name: "slow\(index)", url: "http://127.0.0.1:9/", maxPerMinute: 1)
                slow.append(receiver)
                for alert in [Int64(1), 2] { _ = try await store.enqueueNotification(testNotification(alert), receiverID: receiver.id, dueAt: testNow) }
            }
            #expect(try await claim(at: testNow).count == 200)
            // A receiver whose row came a second later.
            let late = try await addWebhook(store, name: "late", url: "http://127.0.0.1:9/")
            let row = try #require(try await store.enqueueNotification(testNotification(3), receiverID: late.id, dueAt: Timestamp(microseconds: testNow.microseconds + 1_000_000)))
            let next = try await claim(at: Timestamp(microseconds: testNow.microseconds + 2_000_000))
            #expect(next.map(\.entry.id) == [row], "a receiver behind 200 paced-out ones was not claimed")

            // The same with 200 receivers that have no room at this instance (their deliveries still running here).
            let fast = try await addWebhook(store, name: "fast", url: "http://127.0.0.1:9/")
            var busy: [Int64: Int] = [:]
            for receiver in slow { busy[receiver.id] = 2 }
            let later = Timestamp(microseconds: testNow.microseconds + 120_000_000)
            let waiting = try #require(try await store.enqueueNotification(testNotification(4), receiverID: fast.id, dueAt: later))
            let taken = try await claim(at: later, busy: busy)
            #expect(taken.map(\.entry.id) == [waiting], "a receiver behind 200 busy ones was not claimed")
        }
    }

    @Test(
        "An instance never claims a row its own delivery still holds, so after `alert outbox retry` a stale attempt's completion is refused",
        arguments: StoreKind.allCases)
    func aStaleAttemptCannotCompleteARetriedRow(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "hook", url: "http://127.0.0.1:9/")
            let row = try #require(try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: testNow))
            func claim(_ claimant: String, at seconds: Int64, delivering: Set<Int64> = []) async throws -> [ClaimedNotification] {
                try await store.claimNotifications(
                    OutboxClaimRequest(
                        claimant: claimant, now: Timestamp(microseconds: testNow.microseconds + seconds * 1_000_000), claimDuration: .seconds(10),
                        lookahead: .seconds(1), limit: 10, perReceiver: 10, maxAttempts: 1, delivering: delivering))
            }
            // Instance a's only attempt hangs past its claim; b's next claim turns the expired claim into a dead letter.
            let stale = try #require(try await claim("a", at: 0).first)
            #expect(stale.claim == OutboxClaim(claimant: "a", attempt: 1))
            #expect(try await claim("b", at: 20).isEmpty)
            #expect(try await rows(store, .dead).map(\.id) == [row])
            // The operator retries it: attempts start again at 0.
            try await store.retryNotification(id: row, now: Timestamp(microseconds: testNow.microseconds + 30_000_000))
            // a, still delivering it, does not claim it (with the count restarted, its claim would be (a, 1) again).
            #expect(try await claim("a", at: 31, delivering: [row]).isEmpty)
            let fresh = try await claim("b", at: 31)
            #expect(fresh.map(\.claim) == [OutboxClaim(claimant: "b", attempt: 1)])
            // a's hung attempt ends: its completion no longer applies.
            #expect(try await !store.completeNotification(id: row, claim: stale.claim, outcome: .delivered(at: .now())))
            #expect(try await rows(store, .delivering).map(\.claimedBy) == ["b"])
        }
    }

    @Test("Releasing the claims of a stopped process makes its rows due at once, their attempts counted; a completion of the stopped claim is refused once retaken", arguments: StoreKind.allCases)
    func releasedClaimsAreDueAtOnce(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "hook", url: "http://127.0.0.1:9/")
            let row = try #require(try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: testNow))
            func claim(_ claimant: String, at seconds: Int64) async throws -> [ClaimedNotification] {
                try await store.claimNotifications(
                    OutboxClaimRequest(
                        claimant: claimant, now: Timestamp(microseconds: testNow.microseconds + seconds * 1_000_000), claimDuration: .seconds(3600),
                        lookahead: .seconds(1), limit: 10, perReceiver: 10, maxAttempts: 5))
            }
            let stopped = try #require(try await claim("a", at: 0).first)
            // The claim holds for an hour: nothing to claim a minute later.
            #expect(try await claim("b", at: 60).isEmpty)
            #expect(try await store.releaseClaims(now: Timestamp(microseconds: testNow.microseconds + 61_000_000)) == 1)
            let retaken = try await claim("b", at: 61)
            #expect(retaken.map(\.entry.id) == [row])
            #expect(retaken.map(\.claim) == [OutboxClaim(claimant: "b", attempt: 2)])
            #expect(try await !store.completeNotification(id: row, claim: stopped.claim, outcome: .delivered(at: .now())))
            // Nothing else is released: pending and delivered rows are not claims.
            #expect(try await store.completeNotification(id: row, claim: OutboxClaim(claimant: "b", attempt: 2), outcome: .delivered(at: .now())))
            #expect(try await store.releaseClaims(now: Timestamp(microseconds: testNow.microseconds + 62_000_000)) == 0)
            #expect(try await rows(store, .delivered).map(\.id) == [row])
        }
    }

    @Test("On PostgreSQL claims run on the database's clock: an instance whose clock is 10 minutes ahead neither takes over nor kills another's live claim")
    func claimsUseTheDatabaseClock() async throws {
        try await withOutboxStore(.postgres) { store in
            let receiver = try await addWebhook(store, name: "hook", url: "http://127.0.0.1:9/")
            let live = try #require(try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: .now()))
            func claim(_ claimant: String, now: Timestamp, maxAttempts: Int) async throws -> [ClaimedNotification] {
                try await store.claimNotifications(
                    OutboxClaimRequest(
                        claimant: claimant, now: now, claimDuration: .seconds(60), lookahead: .seconds(1), limit: 10, perReceiver: 10,
                        maxAttempts: maxAttempts, clock: .store))
            }
            // Instance A, its clock right, holds the row for a minute.
            let first = try await claim("a", now: .now(), maxAttempts: 1)
            #expect(first.map(\.entry.id) == [live])
            let waiting = try #require(try await store.enqueueNotification(testNotification(2), receiverID: receiver.id, dueAt: .now()))
            // Instance B runs 10 minutes ahead: it takes the row that is due, not A's.
            let skewed = Timestamp(microseconds: Timestamp.now().microseconds + 600_000_000)
            let second = try await claim("b", now: skewed, maxAttempts: 5)
            #expect(second.map(\.entry.id) == [waiting], "instance b took over a live claim")
            // Its send slot is in its own clock: it sends now, not ten minutes late.
            for claimed in second { #expect(abs(claimed.slot.microseconds - skewed.microseconds) < 5_000_000, "slot \(claimed.slot), b's now \(skewed)") }
            // Nor does its sweep take A's claim, at A's last attempt, for one whose instance died.
            #expect(try await claim("b", now: skewed, maxAttempts: 1).isEmpty)
            let row = try #require(try await rows(store).first { $0.id == live })
            #expect(row.state == .delivering)
            #expect(row.claimedBy == "a")
            let first0 = try #require(first.first)
            #expect(try await store.completeNotification(id: live, claim: first0.claim, outcome: .delivered(at: .now())))
        }
    }

    @Test("A deferred attempt is taken back; a late completion of a claim that was taken over is still refused", arguments: StoreKind.allCases)
    func deferralKeepsTheFence(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "hook", url: "http://127.0.0.1:9/")
            let id = try #require(try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: testNow))
            func claim(_ claimant: String, at seconds: Int64) async throws -> ClaimedNotification? {
                try await store.claimNotifications(
                    OutboxClaimRequest(
                        claimant: claimant, now: Timestamp(microseconds: testNow.microseconds + seconds * 1_000_000), claimDuration: .seconds(60),
                        lookahead: .seconds(1), limit: 10, perReceiver: 10, maxAttempts: 5)
                ).first
            }
            // A claims (attempt 1) and stalls past its claim; B takes over (attempt 2) and is asked to wait.
            let a = try #require(try await claim("a", at: 1))
            let b = try #require(try await claim("b", at: 120))
            #expect(b.entry.attempts == 2)
            let later = Timestamp(microseconds: testNow.microseconds + 200_000_000)
            #expect(try await store.completeNotification(id: id, claim: b.claim, outcome: .deferred(at: later, error: "HTTP 503")))
            var row = try #require(try await rows(store).first)
            #expect(row.state == .pending)
            #expect(row.attempts == 1)
            #expect(row.lastError == "HTTP 503")
            // A claims it again (attempt 2 once more): A's first, stale completion (attempt 1) is still refused.
            let again = try #require(try await claim("a", at: 201))
            #expect(again.entry.attempts == 2)
            #expect(try await !store.completeNotification(id: id, claim: a.claim, outcome: .dead(at: .now(), error: "stale")))
            #expect(try await store.completeNotification(id: id, claim: again.claim, outcome: .delivered(at: .now())))
            row = try #require(try await rows(store).first)
            #expect(row.state == .delivered)
            #expect(row.attempts == 2)
        }
    }

    @Test("A receiver that rules name: removal refused, then with force taken out of those rules, the others kept", arguments: StoreKind.allCases)
    func receiverRemovedFromRules(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            let alerts = try #require(store as? any AdministrationStore & AlertStore)
            let rules = AlertAdmin(store: alerts)
            let admin = AlertDeliveryAdmin(store: store)
            _ = try await addWebhook(store, name: "chat", url: "https://hooks.example.net/a")
            _ = try await addWebhook(store, name: "pager", url: "https://hooks.example.net/b")
            try await rules.putRule(farm: "f1", try spec("ph-low", "below") { $0.threshold = 5.5; $0.receivers = ["chat", "pager"] }.validated(), replace: false)
            try await rules.putRule(farm: "f1", try spec("ph-high", "above") { $0.threshold = 7; $0.receivers = ["chat"] }.validated(), replace: false)
            try await rules.putRule(farm: "f1", try spec("ec-high", "above") { $0.threshold = 3; $0.receivers = ["pager"] }.validated(), replace: false)
            let refused = await #expect(throws: AlertReceiverSpecError.self) { _ = try await admin.removeReceiver(farm: "f1", name: "chat") }
            #expect(refused?.description.contains("'ph-low', 'ph-high'") == true || refused?.description.contains("'ph-high', 'ph-low'") == true, "\(refused?.description ?? "")")
            #expect(try await store.alertReceivers(farm: "f1").map(\.name).sorted() == ["chat", "pager"])
            let removed = try await admin.removeReceiver(farm: "f1", name: "chat", force: true)
            #expect(removed.rules.sorted() == ["ph-high", "ph-low"])
            #expect(try await store.alertReceivers(farm: "f1").map(\.name) == ["pager"])
            let after = Dictionary(uniqueKeysWithValues: try await rules.rules(farm: "f1").map { ($0.name, $0.receivers) })
            #expect(after == ["ph-low": ["pager"], "ph-high": [], "ec-high": ["pager"]])
        }
    }

    @Test("Receivers: added, listed without change, refused twice, removed with their notifications counted", arguments: StoreKind.allCases)
    func receivers(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            let admin = AlertDeliveryAdmin(store: store)
            let mail = try await admin.addReceiver(
                farm: "f1",
                AlertReceiverSpec(
                    name: "grower", kind: .email, url: "smtp://mail.example.net:587", secret: "pw", username: "farm", emailFrom: "ingest@example.net",
                    emailTo: "a@example.net, b@example.net", maxPerMinute: 10))
            let hook = try await addWebhook(store, name: "chat", url: "https://hooks.example.net/services/T0/B0/token")
            let listed = try await store.alertReceivers(farm: "f1")
            #expect(listed == [hook, mail])
            await #expect(throws: IngestStoreError.alreadyExists("receiver 'chat' in farm 'f1'")) {
                _ = try await addWebhook(store, name: "chat", url: "https://other.example.net/")
            }
            await #expect(throws: IngestStoreError.self) { _ = try await store.alertReceivers(farm: "nowhere") }
            await #expect(throws: AlertReceiverSpecError.self) {
                _ = try await admin.addReceiver(farm: "f1", AlertReceiverSpec(name: "x", kind: .webhook, url: "ftp://example.net/"))
            }
            // A port out of range, a line break in the URL, an empty secret (it would sign with nothing).
            for (url, secret, phrase) in [
                ("http://127.0.0.1:99999/x", nil, "a port is 1 to 65535"), ("http://127.0.0.1:0/x", nil, "a port is 1 to 65535"),
                ("https://hooks.example.net/a\r\nX-Injected: 1", nil, "control character"), ("https://hooks.example.net/", "", "--secret is empty"),
                // A tester, 2026-12-07: taken, and never sent.
                ("http://user:hunter2@hooks.example.net/x", nil, "has a user name or password before @, which is not sent"),
            ] as [(String, String?, String)] {
                let refused = await #expect(throws: AlertReceiverSpecError.self) {
                    _ = try await admin.addReceiver(farm: "f1", AlertReceiverSpec(name: "x", kind: .webhook, url: url, secret: secret))
                }
                #expect(refused?.description.contains(phrase) == true, "\(url): \(refused?.description ?? "")")
            }
            await #expect(throws: AlertReceiverSpecError.self) {
                _ = try await admin.addReceiver(
                    farm: "f1", AlertReceiverSpec(name: "y", kind: .email, url: "smtp://mail.example.net:587", emailFrom: "me", emailTo: "a@example.net"))
            }
            // A tester, 2026-12-07: an SMTP server without a port was taken, and libcurl would have used 25 or 465.
            let portless = await #expect(throws: AlertReceiverSpecError.self) {
                _ = try await admin.addReceiver(
                    farm: "f1", AlertReceiverSpec(name: "y", kind: .email, url: "smtps://mail.example.net", emailFrom: "me@example.net", emailTo: "a@example.net"))
            }
            #expect(portless?.description.contains("has no port: write smtp://mail.example.net:587") == true, "\(portless?.description ?? "")")
            // A tester, 2026-12-07: a refused address was echoed with its CR and LF, which broke the log line.
            let injected = await #expect(throws: AlertReceiverSpecError.self) {
                _ = try await admin.addReceiver(
                    farm: "f1",
                    AlertReceiverSpec(
                        name: "y", kind: .email, url: "smtp://mail.example.net:587", emailFrom: "me@example.net", emailTo: "a@example.net\r\nRCPT TO:<b@x>"))
            }
            let injectedText = injected?.description ?? ""
            #expect(injectedText.contains(#"a@example.net\u{D}\u{A}RCPT TO:<b@x>"#), "\(injectedText)")
            #expect(!injectedText.contains("\r") && !injectedText.contains("\n"), "\(injectedText)")
            // Secrets and URL paths (which hold tokens) are never in what the CLI prints.
            let printed = listed.map(AlertDeliveryAdmin.describe).joined(separator: "\n")
            #expect(!printed.contains("token") && !printed.contains("pw\t") && !printed.contains("s3cret"))
            #expect(printed.contains("https://hooks.example.net/…"))

            _ = try await store.enqueueNotification(testNotification(1), receiverID: hook.id, dueAt: testNow)
            let newest = try #require(try await store.enqueueNotification(testNotification(2), receiverID: hook.id, dueAt: testNow))

            // An update keeps the receiver's id and its notifications; what it changes is stored and listed.
            let updated = try await admin.updateReceiver(farm: "f1", name: "chat") {
                $0.url = "https://hooks.example.net/v2"
                $0.secret = "n3w"
                $0.maxPerMinute = 5
                $0.groupWait = .seconds(30)
                $0.groupInterval = .seconds(300)
            }
            #expect(updated.id == hook.id && updated.createdAt == hook.createdAt)
            let relisted = try await store.alertReceivers(farm: "f1")
            #expect(relisted == [updated, mail])
            #expect(relisted.first?.spec.secret == "n3w" && relisted.first?.spec.groupInterval == .seconds(300))
            #expect(try await rows(store).count == 2)
            // Validated like a new receiver; neither the kind nor the name changes; an unknown receiver is not found.
            await #expect(throws: AlertReceiverSpecError.self) { _ = try await admin.updateReceiver(farm: "f1", name: "chat") { $0.url = "ftp://x/" } }
            await #expect(throws: AlertReceiverSpecError.self) { _ = try await admin.updateReceiver(farm: "f1", name: "chat") { $0.kind = .email } }
            await #expect(throws: AlertReceiverSpecError.self) { _ = try await admin.updateReceiver(farm: "f1", name: "chat") { $0.name = "other" } }
            await #expect(throws: IngestStoreError.self) { _ = try await admin.updateReceiver(farm: "f1", name: "nobody") { $0.maxPerMinute = 1 } }
            await #expect(throws: IngestStoreError.self) {
                _ = try await store.updateAlertReceiver(farm: "f2", AlertReceiverSpec(name: "chat", kind: .webhook, url: "https://x.example.net/"))
            }
            #expect(try await store.alertReceivers(farm: "f1").first?.spec.url == "https://hooks.example.net/v2")

            #expect(try await store.removeAlertReceiver(farm: "f1", name: "chat") == 2)
            #expect(try await rows(store).isEmpty)
            #expect(try await store.alertReceivers(farm: "f1") == [mail])
            await #expect(throws: IngestStoreError.self) { _ = try await store.removeAlertReceiver(farm: "f1", name: "chat") }
            // The removed rows were the newest: a new notification must not take one of their ids (on SQLite it took
            // max(id) + 1 before migration 19), or `outbox retry <id>` and the log would name another notification.
            let next = try #require(try await store.enqueueNotification(testNotification(3), receiverID: mail.id, dueAt: testNow))
            #expect(next > newest, "id \(next) after the removed \(newest)")
        }
    }

    @Test("Two instances on one PostgreSQL deliver each notification exactly once")
    func twoInstancesOnPostgres() async throws {
        let server = try TestHTTPServer { _, _ in .delayed(.milliseconds(5), .reply(200)) }
        defer { server.stop() }
        try await withTestDatabase(migrated: true) { settings in
            let first = try PostgresIngestStore(settings: settings, logger: testLogger)
            let second = try PostgresIngestStore(settings: settings, logger: testLogger)
            try await withRunning(first) { _ in
                try await withRunning(second) { _ in
                    try await first.migrate()
                    try await second.migrate()
                    _ = try await first.createFarm(name: "f1", createdAt: testNow)
                    var receivers: [AlertReceiver] = []
                    for index in 0..<3 { receivers.append(try await addWebhook(first, name: "r\(index)", url: server.url + "/r\(index)")) }
                    var keys = Set<String>()
                    for alert in Int64(1)...60 {
                        let receiver = receivers[Int(alert) % 3]
                        _ = try await first.enqueueNotification(testNotification(alert), receiverID: receiver.id, dueAt: .now())
                        keys.insert(testNotification(alert).idempotencyKey(receiver: receiver.id))
                    }
                    let a = try NotificationDelivery(store: first, configuration: fastNotify(), logger: testLogger, instanceID: "instance-a")
                    let b = try NotificationDelivery(store: second, configuration: fastNotify(), logger: testLogger, instanceID: "instance-b")
                    try await withDelivery(a) {
                        try await withDelivery(b) {
                            let done = try await eventually(timeout: .seconds(60), every: .milliseconds(100)) { try await rows(first, .delivered).count == 60 }
                            #expect(done)
                        }
                    }
                    let seen = server.requests.map(\.idempotencyKey)
                    #expect(seen.count == 60, "\(seen.count) requests for 60 notifications")
                    #expect(Set(seen) == keys)
                    let byInstance = Dictionary(grouping: try await rows(first), by: { $0.claimedBy ?? "-" }).mapValues(\.count)
                    #expect(byInstance.keys.allSatisfy { $0 == "instance-a" || $0 == "instance-b" }, "\(byInstance)")
                }
            }
        }
    }
}
