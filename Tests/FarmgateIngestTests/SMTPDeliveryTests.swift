import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

/// E-mail notifications through libcurl's SMTP to a real SMTP server on loopback (``SMTPSink``): STARTTLS with a test
/// certificate made by openssl, AUTH PLAIN and LOGIN, and the refusals that must not be retried. Timed (in TIMED_SUITES).
@Suite("Notification delivery by e-mail", .serialized)
struct SMTPDeliveryTests {
    let scratch: Scratch
    let certificates: TestCertificates

    init() async throws {
        scratch = try Scratch(prefix: "fg-smtp")
        certificates = try await TestCertificates.make(in: scratch.path)
    }

    func sink(_ configure: (inout SMTPSink.Options) -> Void = { _ in }) async throws -> SMTPSink {
        var options = SMTPSink.Options()
        options.credentials = ("farm", "pa55 word")
        configure(&options)
        return try await SMTPSink(certificate: certificates.certificateFile, key: certificates.keyFile, options: options)
    }

    static func mailReceiver(_ store: any NotificationOutboxStore, url: String, password: String = "pa55 word") async throws -> AlertReceiver {
        try await AlertDeliveryAdmin(store: store).addReceiver(
            farm: "f1",
            AlertReceiverSpec(
                name: "grower", kind: .email, url: url, secret: password, username: "farm", emailFrom: "ingest@farm.example",
                emailTo: "grower@farm.example, night@farm.example", maxPerMinute: 600))
    }

    @Test("A late resolved notification goes out over STARTTLS with AUTH, says what fired, for how long and that it is late", arguments: ["PLAIN", "LOGIN"])
    func startTLSAndAuth(mechanism: String) async throws {
        let sink = try await sink { $0.mechanisms = [mechanism] }
        let caFile = certificates.caFile
        let key = try await withOutboxStore(.sqlite) { store in
            let receiver = try await Self.mailReceiver(store, url: sink.url)
            let notification = testNotification(3, status: .resolved, late: true)
            _ = try await store.enqueueNotification(notification, receiverID: receiver.id, dueAt: .now())
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(requestTimeout: .seconds(5), claimTimeout: .seconds(10), caFile: caFile), logger: testLogger)
            try await withDelivery(delivery) {
                let done = try await eventually(timeout: .seconds(20)) { try await rows(store, .delivered).count == 1 }
                let states = try await rows(store).map { "\($0.state) \($0.lastError ?? "")" }
                #expect(done, "\(states)")
            }
            return notification.idempotencyKey(receiver: receiver.id)
        }
        await sink.stop()
        // One transaction per recipient (so that a refusal is that recipient's alone), the same message.
        #expect(sink.messages.map(\.recipients) == [["grower@farm.example"], ["night@farm.example"]])
        #expect(Set(sink.messages.map(\.data)).count == 1)
        let message = try #require(sink.messages.first)
        #expect(message.tls, "the message was sent before TLS")
        #expect(message.mechanism == mechanism)
        #expect(message.username == "farm" && message.password == "pa55 word")
        #expect(message.from == "ingest@farm.example")
        // Nothing but EHLO and STARTTLS in clear.
        let commands = sink.commands
        let tlsAt = try #require(commands.firstIndex(of: "STARTTLS"))
        #expect(commands[..<tlsAt].allSatisfy { $0.hasPrefix("EHLO") })
        let text = message.data.replacingOccurrences(of: "=\r\n", with: "")
        #expect(text.contains("Subject: [RESOLVED] pH below 5.5 on site-1 tank3.ph after 2h (farm f1, reported late)"))
        #expect(text.contains("Message-ID: <\(key)@farm.example>"))
        #expect(text.contains("Content-Type: text/plain; charset=utf-8"))
        #expect(text.contains("it fired from 2025-12-31T22:00:00Z for 2h."))
        #expect(text.contains("Reported late: the readings behind this notification arrived after the site was offline; meanwhile: firing at 2025-12-31T22:00:00Z, resolved at 2026-01-01T00:00:00Z."))
        #expect(text.contains("Value: 5.31"))
        #expect(text.contains("  sensor =3D tank3.ph"))
    }

    @Test("A server without STARTTLS gets nothing in clear, and the notification is a dead letter at once")
    func noSTARTTLSIsRefusedForGood() async throws {
        let sink = try await sink { $0.offerSTARTTLS = false }
        let caFile = certificates.caFile
        try await withOutboxStore(.sqlite) { store in
            let receiver = try await Self.mailReceiver(store, url: sink.url)
            _ = try await store.enqueueNotification(testNotification(4), receiverID: receiver.id, dueAt: .now())
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(requestTimeout: .seconds(5), claimTimeout: .seconds(10), caFile: caFile), logger: testLogger)
            try await withDelivery(delivery) {
                let dead = try await eventually(timeout: .seconds(20)) { try await rows(store, .dead).count == 1 }
                #expect(dead)
            }
            let row = try #require(try await rows(store).first)
            #expect(row.attempts == 1)
            #expect(row.lastError?.contains("STARTTLS") == true)
        }
        await sink.stop()
        #expect(sink.messages.isEmpty)
        #expect(!sink.commands.contains { $0.hasPrefix("AUTH") || $0.hasPrefix("MAIL") })
    }

    @Test("A refused login and a refused recipient are not retried; a certificate from another CA is refused")
    func refusals() async throws {
        let sink = try await sink { $0.refusedRecipients = ["night@farm.example"] }
        let notifier = try Notifier(configuration: fastNotify(requestTimeout: .seconds(5), caFile: certificates.caFile), logger: testLogger)
        let receiver = AlertReceiver(
            id: 1, farmID: 1, farm: "f1",
            spec: AlertReceiverSpec(
                name: "grower", kind: .email, url: sink.url, secret: "wrong", username: "farm", emailFrom: "ingest@farm.example", emailTo: "grower@farm.example"),
            createdAt: testNow)
        do {
            _ = try await notifier.send(testNotification(5), idempotencyKey: "k1", to: receiver)
            Issue.record("a wrong password was accepted")
        } catch {
            #expect(!error.retryable)
            #expect(error.message.contains("refused the login"))
        }
        var badRecipient = receiver
        badRecipient.spec.secret = "pa55 word"
        badRecipient.spec.emailTo = "night@farm.example"
        do {
            _ = try await notifier.send(testNotification(5), idempotencyKey: "k2", to: badRecipient)
            Issue.record("a refused recipient was accepted")
        } catch {
            #expect(!error.retryable, "\(error)")
        }
        let untrusting = try Notifier(configuration: fastNotify(requestTimeout: .seconds(5)), logger: testLogger)
        var good = receiver
        good.spec.secret = "pa55 word"
        do {
            _ = try await untrusting.send(testNotification(5), idempotencyKey: "k3", to: good)
            Issue.record("a certificate from an unknown CA was trusted")
        } catch {
            #expect(!error.retryable)
            #expect(error.message.contains("certificate"))
        }
        _ = try await notifier.send(testNotification(5), idempotencyKey: "k4", to: good)
        await notifier.shutdown()
        await untrusting.shutdown()
        await sink.stop()
        #expect(sink.messages.count == 1)
    }

    // A tester, 2026-12-07: one recipient the server refused stopped the message for all of the receiver's
    // recipients, and the notification became a dead letter that nobody had received.
    @Test("A recipient the server refuses holds the message from no other; one refused for now gets it on a retry; nobody gets it twice", arguments: StoreKind.allCases)
    func recipientsApart(kind: StoreKind) async throws {
        let sink = try await sink { $0.refusedRecipients = ["typo@farm.example"] }
        sink.deferRecipients(["busy@farm.example"])
        let caFile = certificates.caFile
        try await withOutboxStore(kind) { store in
            let admin = AlertDeliveryAdmin(store: store)
            let receiver = try await admin.addReceiver(
                farm: "f1",
                AlertReceiverSpec(
                    name: "grower", kind: .email, url: sink.url, secret: "pa55 word", username: "farm", emailFrom: "ingest@farm.example",
                    emailTo: "grower@farm.example, busy@farm.example, typo@farm.example", maxPerMinute: 6000))
            let id = try #require(try await store.enqueueNotification(testNotification(8), receiverID: receiver.id, dueAt: .now()))
            let delivery = try NotificationDelivery(
                store: store, configuration: fastNotify(maxAttempts: 1000, requestTimeout: .seconds(5), claimTimeout: .seconds(10), caFile: caFile),
                logger: testLogger)
            try await withDelivery(delivery) {
                // The first attempt reaches grower; busy is refused for now, so the row waits for a retry.
                let firstDone = try await eventually(timeout: .seconds(20)) { try await rows(store).first?.reached == ["grower@farm.example"] }
                let first = try #require(try await rows(store).first)
                #expect(firstDone, "\(first)")
                #expect(first.lastError?.contains("busy@farm.example (451 4.2.0 mailbox busy, try later)") == true, "\(String(describing: first.lastError))")
                #expect(first.lastError?.contains("typo@farm.example (550 5.1.1 no such user)") == true, "\(first.lastError ?? "")")
                // Once busy takes mail again, a retry reaches it; typo alone is left, refused for good: a dead letter.
                sink.deferRecipients([])
                let dead = try await eventually(timeout: .seconds(20)) { try await rows(store, .dead).count == 1 }
                let row = try #require(try await rows(store).first)
                #expect(dead, "\(row)")
                #expect(row.reached == ["grower@farm.example", "busy@farm.example"])
                #expect(AlertDeliveryAdmin.json(row).contains(#""reached":["grower@farm.example","busy@farm.example"]"#), "\(AlertDeliveryAdmin.json(row))")
                #expect(row.lastError?.contains("typo@farm.example (550 5.1.1 no such user)") == true, "\(row.lastError ?? "")")
                #expect(row.lastError?.contains("alert outbox retry") == true, "\(row.lastError ?? "")")
                // The address fixed and the row retried: only the new address gets it.
                _ = try await admin.updateReceiver(farm: "f1", name: "grower") { $0.emailTo = "grower@farm.example, busy@farm.example, night@farm.example" }
                try await store.retryNotification(id: id, now: .now())
                let delivered = try await eventually(timeout: .seconds(20)) { try await rows(store, .delivered).count == 1 }
                let after = try await rows(store)
                #expect(delivered, "\(after)")
                #expect(try await rows(store).first?.reached == ["grower@farm.example", "busy@farm.example", "night@farm.example"])
            }
        }
        await sink.stop()
        #expect(sink.messages.flatMap(\.recipients) == ["grower@farm.example", "busy@farm.example", "night@farm.example"])
    }

    /// The receiver `grower` on `sink`, logging in as `farm`.
    static func receiver(_ sink: SMTPSink) -> AlertReceiver {
        AlertReceiver(
            id: 1, farmID: 1, farm: "f1",
            spec: AlertReceiverSpec(
                name: "grower", kind: .email, url: sink.url, secret: "pa55 word", username: "farm", emailFrom: "ingest@farm.example",
                emailTo: "grower@farm.example"),
            createdAt: testNow)
    }

    // A tester, 2026-12-07: a server that took the body and went silent held the delivery for request_timeout plus
    // libcurl's 120 s (the QUIT on closing waited its default response timeout), and another instance took the claim
    // over and sent the message again.
    @Test("A server that never answers the end of the body is given up on within twice the request timeout, retryable")
    func silentAfterTheBody() async throws {
        let sink = try await sink { $0.silentAfterData = true }
        let notifier = try Notifier(configuration: fastNotify(requestTimeout: .seconds(2), caFile: certificates.caFile), logger: testLogger)
        let receiver = Self.receiver(sink)
        let started = ContinuousClock.now
        do {
            _ = try await notifier.send(testNotification(7), idempotencyKey: "k-silent", to: receiver)
            Issue.record("taken for delivered although the server never answered the body")
        } catch {
            #expect(error.retryable, "\(error)")
            #expect(error.message.contains("timed out"), "\(error)")
        }
        let took = started.duration(to: .now)
        #expect(took < .seconds(8), "took \(took)")
        await notifier.shutdown()
        await sink.stop()
        #expect(sink.messages.count == 1, "the body reached the server")
    }

    @Test(
        "A login or STARTTLS turned down with a temporary 4xx reply is retried; with 5xx it is refused for good",
        arguments: [
            ("AUTH", "454 4.7.0 Temporary authentication failure", true), ("AUTH", "535 5.7.8 authentication failed", false),
            ("STARTTLS", "454 4.7.0 TLS not available due to temporary reason", true), ("STARTTLS", "554 5.7.3 TLS not available", false),
        ])
    func temporaryRefusalsAreRetried(command: String, reply: String, retryable: Bool) async throws {
        let sink = try await sink { options in
            if command == "AUTH" { options.authReply = reply } else { options.startTLSReply = reply }
        }
        let notifier = try Notifier(configuration: fastNotify(requestTimeout: .seconds(5), caFile: certificates.caFile), logger: testLogger)
        let receiver = Self.receiver(sink)
        do {
            _ = try await notifier.send(testNotification(6), idempotencyKey: "k-\(command)", to: receiver)
            Issue.record("the message was accepted although the server answered \(command) with \(reply)")
        } catch {
            #expect(error.retryable == retryable, "\(error)")
            #expect(error.message.contains(String(reply.prefix(3))), "the reply code is not in '\(error.message)'")
        }
        await notifier.shutdown()
        await sink.stop()
        #expect(sink.messages.isEmpty)
        #expect(sink.commands.contains { $0.hasPrefix(command) }, "the server never saw \(command): \(sink.commands)")
    }
}
