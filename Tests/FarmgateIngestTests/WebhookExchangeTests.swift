import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import Testing

@testable import FarmgateIngest

/// One webhook exchange from end to end, against receivers on loopback that misbehave in the ways the review of
/// notification delivery found uncovered: a signature checked against the receiver's clock on a retry, a body that
/// trickles or never ends, `Retry-After` in every form, a certificate that does not verify, a redirect. Timed (the
/// request timeout is what several of them measure).
@Suite("Webhook exchanges", .serialized)
struct WebhookExchangeTests {
    /// Runs `body` with a sender, shut down however `body` ends (AsyncHTTPClient traps on a client that was not).
    func withSender<T: Sendable>(_ configuration: NotifyConfiguration, _ body: (WebhookSender) async throws -> T) async throws -> T {
        let sender = try WebhookSender(configuration: configuration, logger: testLogger)
        do {
            let result = try await body(sender)
            await sender.shutdown()
            return result
        } catch {
            await sender.shutdown()
            throw error
        }
    }

    // MARK: The signature's timestamp

    @Test("A notification written 10 minutes ago is signed at each attempt: a receiver that refuses timestamps more than 5 minutes off takes every one")
    func signedAtEachAttempt() async throws {
        let server = try TestHTTPServer(script: [.reply(500)], then: .reply(200))
        defer { server.stop() }
        try await withOutboxStore(.sqlite) { store in
            let receiver = try await addWebhook(store, name: "hook", url: server.url)
            let written = Timestamp(microseconds: Timestamp.now().microseconds - 600_000_000)
            _ = try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: written)
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(), logger: testLogger)
            try await withDelivery(delivery) {
                let done = try await eventually(timeout: .seconds(30)) { try await rows(store, .delivered).count == 1 }
                #expect(done)
            }
            let requests = server.requests
            #expect(requests.count == 2)
            let now = Timestamp.now().microseconds / 1_000_000
            for request in requests {
                let timestamp = try #require(Int64(request.headers["x-farmgate-timestamp"] ?? ""))
                #expect(abs(now - timestamp) <= 60, "signed \(now - timestamp) s ago")
                // What the README tells receivers to do: refuse more than 5 minutes off, then check the HMAC.
                #expect(
                    WebhookSignature.verify(
                        body: request.body, timestamp: request.headers["x-farmgate-timestamp"] ?? "",
                        signature: request.headers["x-farmgate-signature"] ?? "", secret: "s3cret", now: now))
            }
            // Only the signature headers change between attempts: the body and the key stay.
            #expect(Set(requests.map(\.body)).count == 1)
            #expect(Set(requests.map(\.idempotencyKey)).count == 1)
        }
    }

    // MARK: Bodies that never end

    @Test("A 2xx whose body trickles on counts as delivered when the request timeout ends it, not hours later")
    func trickling2xxEndsAtTheTimeout() async throws {
        let server = try TestHTTPServer { _, _ in .trickle(200, every: .milliseconds(100)) }
        defer { server.stop() }
        let started = ContinuousClock.now
        let account = try await withSender(fastNotify(requestTimeout: .seconds(1))) { try await $0.post(server.url, headers: [], body: Array("{}".utf8)) }
        let took = ContinuousClock.now - started
        #expect(account.hasPrefix("HTTP 200"))
        #expect(account.contains("did not end within"), "\(account)")
        #expect(took >= .milliseconds(900) && took < .seconds(3), "took \(took) with a request timeout of 1 s")
    }

    @Test("A 503 whose body stalls after the head fails within the request timeout, retryable, with what arrived")
    func stalledErrorBodyEndsAtTheTimeout() async throws {
        let server = try TestHTTPServer { _, _ in .trickle(503, every: .seconds(3600)) }
        defer { server.stop() }
        let started = ContinuousClock.now
        let failure = try await withSender(fastNotify(requestTimeout: .seconds(1))) { await Self.failure(of: $0, posting: server.url) }
        let took = ContinuousClock.now - started
        #expect(failure?.retryable == true)
        #expect(failure?.message.contains("HTTP 503") == true, "\(String(describing: failure))")
        #expect(failure?.message.contains("did not end within") == true, "\(String(describing: failure))")
        #expect(took < .seconds(3), "took \(took) with a request timeout of 1 s")
    }

    @Test("A long error body is read up to 4 KiB, then the exchange ends without waiting for the rest")
    func longBodyIsCutAtTheExcerpt() async throws {
        // A megabyte, a KiB every 10 ms: ten seconds to send it all.
        let server = try TestHTTPServer { _, _ in .trickle(500, chunk: 1024, every: .milliseconds(10)) }
        defer { server.stop() }
        let started = ContinuousClock.now
        let failure = try await withSender(fastNotify(requestTimeout: .seconds(8))) { await Self.failure(of: $0, posting: server.url) }
        let took = ContinuousClock.now - started
        let message = failure?.message ?? ""
        #expect(failure?.retryable == true)
        #expect(message.hasPrefix("HTTP 500"), "\(message)")
        #expect(!message.contains("did not end"), "the excerpt was complete: \(message)")
        #expect(message.count < 500)
        #expect(took < .seconds(3), "took \(took): the body was read past its excerpt")
    }

    @Test("Through the delivery workers: a receiver that answers 200 and never ends the body gets the notification delivered once")
    func stalled2xxIsDeliveredOnce() async throws {
        let server = try TestHTTPServer { _, _ in .trickle(200, every: .seconds(3600)) }
        defer { server.stop() }
        try await withOutboxStore(.sqlite) { store in
            let receiver = try await addWebhook(store, name: "hook", url: server.url)
            _ = try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: .now())
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(requestTimeout: .seconds(1)), logger: testLogger)
            try await withDelivery(delivery) {
                let done = try await eventually(timeout: .seconds(30)) { try await rows(store, .delivered).count == 1 }
                #expect(done)
            }
            #expect(try await rows(store).first?.attempts == 1)
            #expect(server.requests.count == 1)
        }
    }

    // MARK: Retry-After

    /// The forms themselves are read by `RetryAfter` (FarmgateWire), tested with the agent's backoff.
    @Test("A receiver's Retry-After is read as the agent reads the ingest's, and huge values are bounded")
    func retryAfterValues() {
        let now = Timestamp(microseconds: 784_111_747_000_000)  // Sun, 06 Nov 1994 08:49:07 GMT
        #expect(WebhookRetryAfter.delay("120", now: now) == .seconds(120))
        #expect(WebhookRetryAfter.delay("Sun, 06 Nov 1994 08:49:37 GMT", now: now) == .seconds(30))
        #expect(WebhookRetryAfter.delay("soon", now: now) == nil)
        #expect(WebhookRetryAfter.delay("99999999999999999999999", now: now) == WebhookRetryAfter.ceiling)
        #expect(WebhookRetryAfter.delay("999999999999", now: now) == WebhookRetryAfter.ceiling)
        #expect(WebhookRetryAfter.delay("Fri, 31 Dec 9999 23:59:59 GMT", now: now) == WebhookRetryAfter.ceiling)
    }

    @Test("The wait after a Retry-After is never shorter than the backoff and at most an hour")
    func retryDelayBounds() {
        let configuration = NotifyConfiguration(backoffInitial: .seconds(10), backoffMax: .seconds(600))
        func delay(_ asked: Duration?, attempt: Int = 3) -> Duration {
            NotificationDelivery.retryDelay(
                for: DeliveryFailure("HTTP 503", retryable: true, retryAfter: asked), attempt: attempt, configuration: configuration)
        }
        // Attempt 3: a backoff of 40 s, drawn between 20 and 40.
        for asked in [nil, Duration.zero, .seconds(1)] {
            let wait = delay(asked)
            #expect(wait >= .seconds(20) && wait <= .seconds(40), "Retry-After \(String(describing: asked)) waited \(wait)")
        }
        #expect(delay(.seconds(1200)) == .seconds(1200), "longer than backoff_max, shorter than an hour: obeyed")
        #expect(delay(.seconds(7200)) == NotificationDelivery.retryAfterMax)
        #expect(delay(WebhookRetryAfter.ceiling, attempt: 10_000) == .seconds(3600))
        #expect(NotificationDelivery.retryAfterMax > configuration.backoffMax)
    }

    @Test(
        "Retry-After of a 429 or 503 reaches the delivery in both forms; on other statuses, or unreadable, it is none",
        arguments: [
            (429, "120", Duration.seconds(120)), (503, "date+120", .seconds(120)), (503, "-5", nil), (500, "120", nil), (429, "0", .zero),
        ] as [(Int, String, Duration?)])
    func retryAfterFromTheReceiver(status: Int, header: String, expected: Duration?) async throws {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        let value = header == "date+120" ? formatter.string(from: Date().addingTimeInterval(120)) : header
        let server = try TestHTTPServer { _, _ in .reply(status, headers: ["Retry-After": value]) }
        defer { server.stop() }
        let failure = try await withSender(fastNotify()) { await Self.failure(of: $0, posting: server.url) }
        #expect(failure?.retryable == true)
        if let expected {
            let got = failure?.retryAfter ?? .seconds(-1)
            #expect(got <= expected && got >= expected - .seconds(2), "Retry-After: \(value) read as \(String(describing: failure?.retryAfter))")
        } else {
            #expect(failure?.retryAfter == nil, "Retry-After: \(value) on \(status) read as \(String(describing: failure?.retryAfter))")
        }
    }

    @Test("A receiver that asks for time with 503 and Retry-After is waited for without using up attempts")
    func askingForTimeDoesNotUseUpAttempts() async throws {
        let server = try TestHTTPServer { _, index in index < 3 ? .reply(503, headers: ["Retry-After": "1"]) : .reply(200) }
        defer { server.stop() }
        try await withOutboxStore(.sqlite) { store in
            let receiver = try await addWebhook(store, name: "hook", url: server.url)
            _ = try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: .now())
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(maxAttempts: 2), logger: testLogger)
            try await withDelivery(delivery) {
                let done = try await eventually(timeout: .seconds(30)) { try await rows(store, .delivered).count == 1 }
                let states = try await rows(store).map { "\($0.state) \($0.attempts) \($0.lastError ?? "")" }
                #expect(done, "\(states)")
            }
            #expect(try await rows(store).first?.attempts == 1, "the waits the receiver asked for were counted as attempts")
            let times = server.requests.map(\.receivedAt)
            #expect(times.count == 4)
            for (earlier, later) in zip(times, times.dropFirst()) { #expect(later - earlier >= .milliseconds(900), "Retry-After: 1 not obeyed") }
        }
    }

    @Test("Asking for time is free only for a day after the notification was written; then those attempts count")
    func askingForTimeIsBounded() async throws {
        let server = try TestHTTPServer { _, _ in .reply(503, headers: ["Retry-After": "1"]) }
        defer { server.stop() }
        try await withOutboxStore(.sqlite) { store in
            let receiver = try await addWebhook(store, name: "hook", url: server.url)
            let written = Timestamp(microseconds: Timestamp.now().microseconds - NotificationDelivery.deferralLimit.wholeMicroseconds - 3_600_000_000)
            _ = try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: written)
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(maxAttempts: 2), logger: testLogger)
            try await withDelivery(delivery) {
                let dead = try await eventually(timeout: .seconds(30)) { try await rows(store, .dead).count == 1 }
                #expect(dead)
            }
            let row = try #require(try await rows(store).first)
            #expect(row.attempts == 2)
            #expect(row.lastError?.contains("HTTP 503") == true)
            #expect(server.requests.count == 2)
        }
    }

    @Test("Retry-After: 0 does not retry at once: the backoff is waited, and the attempts count")
    func retryAfterZeroWaitsTheBackoff() async throws {
        let server = try TestHTTPServer { _, _ in .reply(429, headers: ["Retry-After": "0"]) }
        defer { server.stop() }
        try await withOutboxStore(.sqlite) { store in
            let receiver = try await addWebhook(store, name: "hook", url: server.url)
            _ = try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: .now())
            let configuration = NotifyConfiguration(
                maxAttempts: 3, backoffInitial: .milliseconds(400), backoffMax: .seconds(2), requestTimeout: .seconds(1), connectTimeout: .seconds(1),
                claimTimeout: .seconds(4), pollInterval: .milliseconds(50))
            let delivery = try NotificationDelivery(store: store, configuration: configuration, logger: testLogger)
            try await withDelivery(delivery) {
                let dead = try await eventually(timeout: .seconds(30)) { try await rows(store, .dead).count == 1 }
                #expect(dead)
            }
            let times = server.requests.map(\.receivedAt)
            #expect(times.count == 3)
            // Backoff of attempt 1 is 200–400 ms, of attempt 2 400–800 ms.
            for (earlier, later) in zip(times, times.dropFirst()) { #expect(later - earlier >= .milliseconds(190), "retried \(later - earlier) later") }
        }
    }

    /// How posting `{}` to `url` failed; nil (and an issue recorded) when it was taken for a delivery.
    static func failure(of sender: WebhookSender, posting url: String) async -> DeliveryFailure? {
        do {
            let account = try await sender.post(url, headers: [], body: Array("{}".utf8))
            Issue.record("\(url) answered \(account), taken for a delivery")
            return nil
        } catch {
            return error
        }
    }

    // A tester, 2026-12-07: `alert receiver test` against a receiver that was down said "connection reset (error set):
    // Connection refused (errno: 111)", NIO's words.
    @Test("A receiver where nothing listens is told as a refused connection, retryable")
    func refusedConnectionInWords() async throws {
        let port = try freePort()
        let failure = try await withSender(NotifyConfiguration()) { await Self.failure(of: $0, posting: "http://127.0.0.1:\(port)/alerts") }
        #expect(failure?.retryable == true)
        #expect(failure?.message == "no answer from http://127.0.0.1:\(port)/…: connection refused (nothing listens there: is the receiver running, and is the port right?)",
                "\(failure?.message ?? "")")
    }

    // MARK: TLS and redirects

    @Test("A receiver whose certificate does not verify is a dead letter after one attempt, saying why")
    func untrustedCertificateIsDeadAtOnce() async throws {
        let scratch = try Scratch(prefix: "fg-webhook-tls")
        let certificates = try await TestCertificates.make(in: scratch.path)
        let receiverServer = try await TLSReceiver(certificates: certificates, host: "127.0.0.1")
        try await withOutboxStore(.sqlite) { store in
            // No ca_file: the system CAs do not know the test CA.
            let receiver = try await addWebhook(store, name: "hook", url: "https://127.0.0.1:\(receiverServer.port)/alerts")
            _ = try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: .now())
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(), logger: testLogger)
            try await withDelivery(delivery) {
                let dead = try await eventually(timeout: .seconds(30)) { try await rows(store, .dead).count == 1 }
                let states = try await rows(store).map { "\($0.state) \($0.attempts) \($0.lastError ?? "")" }
                #expect(dead, "\(states)")
            }
            let row = try #require(try await rows(store).first)
            #expect(row.attempts == 1)
            let lastError = row.lastError ?? ""
            #expect(lastError.contains("TLS certificate of https://127.0.0.1:\(receiverServer.port)/… does not verify"), "\(lastError)")
            #expect(row.lastError?.contains("ca_file") == true)
        }
        #expect(receiverServer.requests == 0)
        await receiverServer.stop()
    }

    @Test("A certificate for another address is refused for good; the same receiver with the CA trusted and the right address takes the post")
    func certificateForAnotherHost() async throws {
        let scratch = try Scratch(prefix: "fg-webhook-tls")
        let certificates = try await TestCertificates.make(in: scratch.path)
        // The certificate names 127.0.0.1 and localhost.
        let elsewhere = try await TLSReceiver(certificates: certificates, host: "127.0.0.2")
        let right = try await TLSReceiver(certificates: certificates, host: "127.0.0.1")
        let (failure, byAddress, byName) = try await withSender(fastNotify(caFile: certificates.caFile)) { sender in
            let failure = await Self.failure(of: sender, posting: "https://127.0.0.2:\(elsewhere.port)/")
            let byAddress = try await sender.post("https://127.0.0.1:\(right.port)/", headers: [], body: Array("{}".utf8))
            let byName = try await sender.post("https://localhost:\(right.port)/", headers: [], body: Array("{}".utf8))
            return (failure, byAddress, byName)
        }
        #expect(failure?.retryable == false, "\(String(describing: failure))")
        #expect(failure?.message.contains("not for this host name") == true, "\(String(describing: failure))")
        #expect(byAddress == "HTTP 200")
        #expect(byName == "HTTP 200")
        #expect(elsewhere.requests == 0)
        #expect(right.requests == 2)
        await elsewhere.stop()
        await right.stop()
    }

    @Test("A redirect is not followed: the notification is a dead letter after one request, saying so")
    func redirectIsNotFollowed() async throws {
        let target = try TestHTTPServer { _, _ in .reply(200) }
        defer { target.stop() }
        let server = try TestHTTPServer { _, _ in .reply(301, headers: ["Location": target.url + "/moved"]) }
        defer { server.stop() }
        try await withOutboxStore(.sqlite) { store in
            let receiver = try await addWebhook(store, name: "hook", url: server.url)
            _ = try await store.enqueueNotification(testNotification(1), receiverID: receiver.id, dueAt: .now())
            let delivery = try NotificationDelivery(store: store, configuration: fastNotify(), logger: testLogger)
            try await withDelivery(delivery) {
                let dead = try await eventually(timeout: .seconds(30)) { try await rows(store, .dead).count == 1 }
                #expect(dead)
            }
            let row = try #require(try await rows(store).first)
            #expect(row.attempts == 1)
            #expect(row.lastError?.contains("HTTP 301") == true)
            #expect(row.lastError?.contains("redirects are not followed") == true, "\(row.lastError ?? "")")
        }
        #expect(server.requests.count == 1)
        #expect(target.requests.isEmpty)
    }
}

/// An https webhook receiver on loopback with the test certificate: answers each request `200` and closes the
/// connection. Counts the requests that got through TLS.
private final class TLSReceiver: Sendable {
    let port: Int
    private let channel: any Channel
    private let counter: RequestCounter

    init(certificates: TestCertificates, host: String) async throws {
        let tls = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(certificates.certificateFile).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: certificates.keyFile, format: .pem)))
        let context = try NIOSSLContext(configuration: tls)
        let counter = RequestCounter()
        self.counter = counter
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: context))
                    try channel.pipeline.syncOperations.addHandler(OKResponder(counter: counter))
                }
            }
            .bind(host: host, port: 0).get()
        port = channel.localAddress?.port ?? 0
    }

    var requests: Int { counter.count }

    func stop() async {
        try? await channel.close()
    }
}

private final class RequestCounter: Sendable {
    private let value = Mutex(0)
    var count: Int { value.withLock { $0 } }
    func increment() { value.withLock { $0 += 1 } }
}

/// Reads one request (head and `Content-Length` body) and answers `200` with `Connection: close`.
private final class OKResponder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let counter: RequestCounter
    private var received: [UInt8] = []

    init(counter: RequestCounter) {
        self.counter = counter
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        received += unwrapInboundIn(data).readableBytesView
        guard let end = received.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound else { return }
        let head = String(decoding: received[..<end], as: UTF8.self).lowercased()
        let length = head.split(separator: "\r\n").first { $0.hasPrefix("content-length:") }
            .flatMap { Int($0.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces)) } ?? 0
        guard received.count >= end + length else { return }
        counter.increment()
        received = []
        context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")), promise: nil)
        context.close(promise: nil)
    }
}
