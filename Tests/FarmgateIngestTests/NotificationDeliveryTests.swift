import FarmgateTestSupport
import FarmgateWire
import Foundation
import Prometheus
import Synchronization
import ServiceLifecycle
import Testing

@testable import FarmgateIngest

/// The delivery workers against real webhook receivers on loopback (``TestHTTPServer``) and a real store: intermittent
/// failures, dead letters, pacing, a slow receiver beside a fast one, an expired claim. Timed (in TIMED_SUITES).
@Suite("Notification delivery to webhooks", .serialized)
struct NotificationDeliveryTests {
    @Test("A receiver that fails intermittently (5xx, resets, closes, hangs, answers too late) gets every notification, repeats only with the same key, every request signed", arguments: StoreKind.allCases)
    func intermittentReceiver(kind: StoreKind) async throws {
        // Every third request answered at once; the others fail in each way a receiver can, one answers after the timeout.
        let pattern: [TestResponse] = [
            .reply(500), .reset, .reply(200), .hang, .close, .reply(200), .reply(503, headers: ["Retry-After": "0"]),
            .delayed(.milliseconds(1500), .reply(200)), .reply(200),
        ]
        let server = try TestHTTPServer { _, index in pattern[index % pattern.count] }
        defer { server.stop() }
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "hook", url: server.url + "/alerts")
            var expected: [String: AlertNotification] = [:]
            for alert in Int64(1)...12 {
                // Fired just now: the text's "so far" changes from one second to the next.
                var notification = testNotification(alert)
                notification.startsAt = .now()
                _ = try await store.enqueueNotification(notification, receiverID: receiver.id, dueAt: .now())
                expected[notification.idempotencyKey(receiver: receiver.id)] = notification
            }
            let registry = PrometheusCollectorRegistry()
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(), metrics: NotificationMetrics(registry: registry), logger: testLogger)
            let done = try await withDelivery(delivery) {
                try await eventually(timeout: .seconds(90), every: .milliseconds(100)) { try await rows(store, .delivered).count == 12 }
            }
            let states = try await rows(store).map { "\($0.id) \($0.state) \($0.attempts) \($0.lastError ?? "")" }
            #expect(done, "not all delivered: \(states)")

            let requests = server.requests
            #expect(requests.count > 12, "the pattern makes receivers fail; only \(requests.count) requests")
            var answered = Set<String>()
            for (index, request) in requests.enumerated() {
                let key = request.idempotencyKey
                guard let notification = expected[key] else {
                    Issue.record("request \(index) carries an unknown idempotency key '\(key)'")
                    continue
                }
                if case .reply(200, _, _) = pattern[index % pattern.count] { answered.insert(key) }
                if case .delayed = pattern[index % pattern.count] { answered.insert(key) }
                // Signed over the timestamp and the exact body, with the receiver's secret.
                let verified = WebhookSignature.verify(
                    body: request.body, timestamp: request.headers["x-farmgate-timestamp"] ?? "", signature: request.headers["x-farmgate-signature"] ?? "",
                    secret: "s3cret", now: Timestamp.now().microseconds / 1_000_000)
                #expect(verified, "request \(index) does not verify")
                #expect(!WebhookSignature.verify(
                    body: request.body + [32], timestamp: request.headers["x-farmgate-timestamp"] ?? "", signature: request.headers["x-farmgate-signature"] ?? "",
                    secret: "s3cret", now: Timestamp.now().microseconds / 1_000_000))
                // The Alertmanager body of exactly this notification: a repeat is the same notification, never another.
                let body = try #require(request.webhook, "request \(index) is not an Alertmanager webhook body")
                #expect(body.version == "4")
                #expect(body.receiver == "hook")
                #expect(body.status == "firing")
                #expect(body.alerts.count == 1)
                #expect(body.alerts.first?.fingerprint == notification.fingerprint)
                #expect(body.alerts.first?.labels["sensor"] == notification.labels["sensor"])
                #expect(body.alerts.first?.annotations["summary"] == notification.summary)
                #expect(body.alerts.first?.endsAt == "0001-01-01T00:00:00Z")
                #expect(body.alerts.first?.generatorURL == "https://ingest.example.net/v1/farms/f1/alerts")
                #expect(body.farmgate.idempotencyKey == key)
                #expect(body.farmgate.transitionID == notification.transitionID)
                #expect(request.path == "/alerts")
            }
            #expect(answered == Set(expected.keys), "keys never answered 2xx: \(Set(expected.keys).subtracting(answered))")
            // A repeat is the same request: the text is told as of when the notification was written, not when sent.
            for (key, sent) in Dictionary(grouping: requests, by: \.idempotencyKey) {
                #expect(Set(sent.map(\.body)).count == 1, "notification \(key) was sent with different bodies")
            }
            for row in try await rows(store) {
                #expect(row.state == .delivered)
                #expect(row.deliveredAt != nil)
                #expect(row.attempts >= 1)
            }
            #expect((metric(registry, #"farmgate_ingest_notifications_total{result="delivered"}"#) ?? 0) >= 12)
            #expect((metric(registry, #"farmgate_ingest_notifications_total{result="retried"}"#) ?? 0) > 0)
        }
    }

    @Test("After max_attempts a notification is a dead letter (counted), and a retry from the admin delivers it with the same key", arguments: StoreKind.allCases)
    func deadLetterThenRetry(kind: StoreKind) async throws {
        let healthy = Atomic<Bool>(false)
        let server = try TestHTTPServer { _, _ in healthy.load(ordering: .relaxed) ? .reply(204) : .json(500, #"{"error":"down"}"#) }
        defer { server.stop() }
        let refusing = try TestHTTPServer { _, _ in .json(400, #"{"error":"bad payload"}"#) }
        defer { refusing.stop() }
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "hook", url: server.url)
            let strict = try await addWebhook(store, name: "strict", url: refusing.url)
            let id = try #require(try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: .now()))
            let refusedID = try #require(try await store.enqueueNotification(testNotification(2), receiverID: strict.id, dueAt: .now()))
            let registry = PrometheusCollectorRegistry()
            let delivery = try NotificationDelivery(
                store: store, configuration: fastNotify(maxAttempts: 3), metrics: NotificationMetrics(registry: registry), logger: testLogger)
            try await withDelivery(delivery) {
                let dead = try await eventually(timeout: .seconds(30)) { try await rows(store, .dead).count == 2 }
                let states = try await rows(store).map { "\($0.id) \($0.state) \($0.attempts)" }
                #expect(dead, "\(states)")
                let letters = try await rows(store, .dead)
                let letter = try #require(letters.first { $0.id == id })
                #expect(letter.attempts == 3)
                #expect(letter.lastError?.contains("HTTP 500") == true)
                #expect(server.requests.count == 3)
                // A 4xx other than 408/425/429 cannot get better by retrying: dead after one attempt.
                let refused = try #require(letters.first { $0.id == refusedID })
                #expect(refused.attempts == 1)
                #expect(refused.lastError?.contains("HTTP 400") == true)
                #expect(refusing.requests.count == 1)
                #expect(metric(registry, #"farmgate_ingest_notifications_total{result="dead"}"#) == 2)
                #expect(metric(registry, #"farmgate_ingest_notifications_total{result="retried"}"#) == 2)
                let gauge = await eventually(timeout: .seconds(15)) { metric(registry, #"farmgate_ingest_notification_outbox{state="dead"}"#) == 2 }
                #expect(gauge)

                // The receiver is fixed; the operator retries the dead letter.
                healthy.store(true, ordering: .relaxed)
                try await store.retryNotification(id: id, now: .now())
                let delivered = try await eventually(timeout: .seconds(10)) { try await rows(store, .delivered).map(\.id) == [id] }
                #expect(delivered)
                #expect(server.requests.count == 4)
                #expect(Set(server.requests.map(\.idempotencyKey)) == [testNotification(1).idempotencyKey(receiver: receiver.id)])
                // Delivered rows cannot be retried, unknown ids are named.
                await #expect(throws: OutboxRetryRefused.self) { try await store.retryNotification(id: id, now: .now()) }
                await #expect(throws: IngestStoreError.self) { try await store.retryNotification(id: 999_999, now: .now()) }
            }
        }
    }

    @Test("max_per_minute spaces deliveries evenly and drops none", arguments: StoreKind.allCases)
    func rateLimitDelaysNeverDrops(kind: StoreKind) async throws {
        let server = try TestHTTPServer { _, _ in .reply(200) }
        defer { server.stop() }
        try await withOutboxStore(kind) { store in
            // 120 a minute: one every 500 ms.
            let receiver = try await addWebhook(store, name: "paced", url: server.url, maxPerMinute: 120)
            // Slots are wall-clock times (shared by every instance through the store), so arrivals are measured in wall
            // time too: a step of this VM's clock during the test once made the monotonic gaps 0.36 s shorter.
            let started = Date()
            for alert in Int64(1)...6 { _ = try await store.enqueueNotification(testNotification(alert), receiverID: receiver.id, dueAt: .now()) }
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(), logger: testLogger)
            try await withDelivery(delivery) {
                let done = try await eventually(timeout: .seconds(20)) { try await rows(store, .delivered).count == 6 }
                #expect(done)
            }
            let times = server.requests.map(\.receivedAtWall).sorted()
            #expect(times.count == 6, "every notification once, none dropped: \(times.count) requests")
            // Each send waits for its slot, 500 ms after the one before, so the k-th request to arrive cannot arrive before
            // k × 500 ms: only k slots come earlier. (Spacing between arrivals is not asserted: on a loaded machine one
            // send's connection can be slow and the next one's fast, which brings two arrivals close without any
            // minute seeing more than 120.)
            for (k, time) in times.enumerated() {
                let after = time.timeIntervalSince(started)
                #expect(after >= Double(500 * k - 10) / 1000, "request \(k + 1) arrived \(after) s after the start at 120 a minute")
            }
        }
    }

    @Test("A receiver that hangs holds only its own slots: another receiver's notifications go out meanwhile")
    func slowReceiverDoesNotHoldOthers() async throws {
        let slow = try TestHTTPServer { _, _ in .hang }
        defer { slow.stop() }
        let fast = try TestHTTPServer { _, _ in .reply(200) }
        defer { fast.stop() }
        try await withOutboxStore(.sqlite) { store in
            let stuck = try await addWebhook(store, name: "stuck", url: slow.url)
            let quick = try await addWebhook(store, name: "quick", url: fast.url)
            for alert in Int64(1)...8 { _ = try await store.enqueueNotification(testNotification(alert), receiverID: stuck.id, dueAt: .now()) }
            for alert in Int64(11)...18 { _ = try await store.enqueueNotification(testNotification(alert), receiverID: quick.id, dueAt: .now()) }
            let delivery = try NotificationDelivery(
                store: store, configuration: fastNotify(requestTimeout: .seconds(5), claimTimeout: .seconds(10), perReceiver: 2), logger: testLogger)
            let started = ContinuousClock.now
            try await withDelivery(delivery) {
                let quickDone = try await eventually(timeout: .seconds(4)) {
                    try await rows(store, .delivered).filter { $0.receiver == "quick" }.count == 8
                }
                #expect(quickDone, "the fast receiver waited for the hanging one")
                #expect(ContinuousClock.now - started < .seconds(5))
                // The hanging receiver never had more than its two slots.
                #expect(slow.connectionCount <= 2)
                #expect(try await rows(store, .delivering).filter { $0.receiver == "stuck" }.count <= 2)
            }
        }
    }

    @Test("Receivers that hang on one host and port hold only their own slots: a healthy receiver on the same server gets every notification at the first attempt")
    func hungReceiversOnTheSameServerDoNotStarveAnother() async throws {
        let server = try TestHTTPServer { request, _ in request.path.hasPrefix("/hang") ? .hang : .reply(200) }
        defer { server.stop() }
        try await withOutboxStore(.sqlite) { store in
            // Four hung receivers with four slots each: 16 connections to the server, twice AsyncHTTPClient's default
            // per-host pool of 8.
            for index in 1...4 {
                let hung = try await addWebhook(store, name: "hung\(index)", url: server.url + "/hang\(index)")
                for alert in Int64(1)...4 {
                    _ = try await store.enqueueNotification(testNotification(Int64(index) * 100 + alert), receiverID: hung.id, dueAt: .now())
                }
            }
            let healthy = try await addWebhook(store, name: "healthy", url: server.url + "/ok")
            let delivery = try NotificationDelivery(
                store: store, configuration: fastNotify(requestTimeout: .seconds(20), claimTimeout: .seconds(60), perReceiver: 4), logger: testLogger)
            try await withDelivery(delivery) {
                let hanging = await eventually(timeout: .seconds(30)) { server.requests.filter { $0.path.hasPrefix("/hang") }.count == 16 }
                #expect(hanging, "\(server.requests.count) requests reached the server")
                for alert in Int64(1)...10 { _ = try await store.enqueueNotification(testNotification(alert), receiverID: healthy.id, dueAt: .now()) }
                delivery.wake()
                let done = try await eventually(timeout: .seconds(15)) {
                    try await rows(store, .delivered).filter { $0.receiver == "healthy" }.count == 10
                }
                let healthyRows = try await rows(store).filter { $0.receiver == "healthy" }
                #expect(done, "the healthy receiver waited behind the hung ones: \(healthyRows.map { "\($0.state) \($0.lastError ?? "")" })")
                #expect(healthyRows.allSatisfy { $0.attempts == 1 }, "\(healthyRows.map(\.attempts))")
            }
        }
    }

    @Test("A graceful stop cuts a hung delivery short after the stop grace, not its request timeout, and puts the row back due now, the attempt not counted", arguments: StoreKind.allCases)
    func stopCutsAHungDeliveryShort(kind: StoreKind) async throws {
        let server = try TestHTTPServer { _, _ in .hang }
        defer { server.stop() }
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "hung", url: server.url)
            let id = try #require(try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: .now()))
            let delivery = try NotificationDelivery(
                store: store, configuration: fastNotify(requestTimeout: .seconds(60), claimTimeout: .seconds(600)), logger: testLogger)
            let group = ServiceGroup(configuration: .init(services: [delivery], logger: testLogger))
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await group.run() }
                let sent = await server.waitForRequests(1, timeout: .seconds(30))
                #expect(sent)
                let stopping = ContinuousClock.now
                await group.triggerGracefulShutdown()
                try await tasks.waitForAll()
                let took = ContinuousClock.now - stopping
                #expect(took < NotificationDelivery.stopGrace + .seconds(4), "the stop took \(took) with a request timeout of 60 s")
            }
            let row = try #require(try await rows(store).first { $0.id == id })
            #expect(row.state == .pending, "\(row.state)")
            #expect(row.attempts == 0)
            #expect(row.nextAttemptAt.microseconds <= Timestamp.now().microseconds)
            #expect(row.lastError?.contains("cut short by the ingest stopping") == true, "\(row.lastError ?? "nil")")
        }
    }

    @Test("A claim left by an instance that died expires, and the row is delivered with the same idempotency key", arguments: StoreKind.allCases)
    func expiredClaimIsDeliveredWithTheSameKey(kind: StoreKind) async throws {
        let server = try TestHTTPServer { _, _ in .reply(200) }
        defer { server.stop() }
        try await withOutboxStore(kind) { store in
            let receiver = try await addWebhook(store, name: "hook", url: server.url)
            let id = try #require(try await store.enqueueNotification(testNotification(7), receiverID: receiver.id, dueAt: .now()))
            // An instance claims it and dies before sending anything.
            let ghost = try await store.claimNotifications(
                OutboxClaimRequest(claimant: "ghost", now: .now(), claimDuration: .seconds(1), lookahead: .milliseconds(50), limit: 10, perReceiver: 10, maxAttempts: 5))
            #expect(ghost.map(\.entry.id) == [id])
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(), logger: testLogger, instanceID: "survivor")
            try await withDelivery(delivery) {
                // Not before the claim expires.
                try await Task.sleep(for: .milliseconds(500))
                #expect(server.requests.isEmpty)
                let done = try await eventually(timeout: .seconds(10)) { try await rows(store, .delivered).count == 1 }
                #expect(done)
            }
            let row = try #require(try await rows(store).first)
            #expect(row.attempts == 2)
            #expect(row.claimedBy == "survivor")
            #expect(server.requests.map(\.idempotencyKey) == [testNotification(7).idempotencyKey(receiver: receiver.id)])
            // The ghost's late completion is refused: the row is no longer its claim.
            let late = try await store.completeNotification(id: id, claim: OutboxClaim(claimant: "ghost", attempt: 1), outcome: .retry(at: .now(), error: "late"))
            #expect(!late)
            #expect(try await rows(store).first?.state == .delivered)
        }
    }
}
