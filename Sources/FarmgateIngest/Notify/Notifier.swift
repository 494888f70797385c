public import FarmgateWire
import FarmgateSupport
import Foundation
public import Logging

/// Renders a notification for its receiver and sends it: the Alertmanager webhook body with its signature and
/// idempotency headers, or an e-mail. Used by the delivery workers and by `alert receiver test`.
public final class Notifier: Sendable {
    private let webhook: WebhookSender
    private let smtp: SMTPSender
    private let externalURL: String

    /// - Throws: ``DeliveryFailure`` when `[notify] ca_file` cannot be loaded.
    public init(configuration: NotifyConfiguration, logger: Logger) throws {
        webhook = try WebhookSender(configuration: configuration, logger: logger)
        smtp = SMTPSender(configuration: configuration)
        externalURL = configuration.externalURL
    }

    /// Sends `notification` to `receiver` with `idempotencyKey`; returns a short account (`HTTP 200`, `mail accepted`)
    /// and, for e-mail, every recipient the message has now reached.
    ///
    /// Webhooks carry `Idempotency-Key`, and, when the receiver has a secret, `X-Farmgate-Timestamp` and
    /// `X-Farmgate-Signature` (``WebhookSignature``).
    ///
    /// - Parameters:
    ///   - asOf: When the text is told as of ("firing since 03:12 (5m so far)", the mail's `Date`): the delivery passes
    ///     when the notification was written, so that every attempt under one idempotency key sends the same body.
    ///   - signedAt: The signature's timestamp: the time of this attempt, never `asOf`. Receivers refuse a timestamp more
    ///     than five minutes off their clock, so a retry after an outage, a paced backlog or `alert outbox retry` signed
    ///     with the time the notification was written would be refused for good. Only the two headers change between
    ///     attempts; the body and the key do not.
    ///   - reached: The e-mail recipients an earlier attempt reached (``OutboxEntry/reached``): the message goes to the
    ///     receiver's other recipients only (its `To:` still names them all).
    /// - Throws: ``DeliveryFailure``, with every recipient reached so far in its ``DeliveryFailure/reached``.
    public func send(
        _ notification: AlertNotification, idempotencyKey: String, to receiver: AlertReceiver, asOf: Timestamp = .now(), signedAt: Timestamp = .now(),
        reached: [String] = []
    ) async throws(DeliveryFailure) -> (account: String, reached: [String]) {
        let spec = receiver.spec
        switch spec.kind {
        case .webhook:
            let body: [UInt8]
            do {
                body = try AlertmanagerWebhook(
                    notification, receiver: spec.name, idempotencyKey: idempotencyKey, externalURL: externalURL, now: asOf
                ).encoded()
            } catch {
                throw DeliveryFailure("cannot encode the notification: \(error)", retryable: false)
            }
            var headers = [("Idempotency-Key", idempotencyKey)]
            if let secret = spec.secret, !secret.isEmpty {
                let timestamp = signedAt.microseconds / 1_000_000
                headers.append((WebhookSignature.timestampHeader, String(timestamp)))
                headers.append((WebhookSignature.signatureHeader, WebhookSignature.sign(body: body, timestamp: timestamp, secret: secret)))
            }
            return (try await webhook.post(spec.url, headers: headers, body: body), [])
        case .email:
            guard let from = spec.emailFrom, let to = spec.emailTo else {
                throw DeliveryFailure("receiver '\(spec.name)' has no --from or --email address; remove it and add it again", retryable: false)
            }
            let recipients = to.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            let message = EmailMessage(notification, idempotencyKey: idempotencyKey, from: from, to: recipients, externalURL: externalURL, now: asOf)
            let envelope = recipients.filter { !reached.contains($0) }
            let server = SMTPSender.redacted(spec.url)
            guard !envelope.isEmpty else { return ("every recipient already has it (\(reached.joined(separator: ", ")))", reached) }
            do {
                try await smtp.send(message, envelope: envelope, url: spec.url, username: spec.username, password: spec.secret)
            } catch {
                throw error.reaching(reached)
            }
            let also = envelope.count < recipients.count ? " (the others had it already)" : ""
            return ("mail accepted by \(server) for \(envelope.joined(separator: ", "))" + also, reached + envelope)
        }
    }

    /// Throws ``DeliveryFailure`` when `[notify] ca_file` is set and holds no PEM certificate.
    public static func checkCAFile(_ configuration: NotifyConfiguration) throws(DeliveryFailure) {
        try WebhookSender.trustRoots(configuration)
    }

    /// Closes the webhook client's connections.
    public func shutdown() async {
        await webhook.shutdown()
    }

    /// The notification `alert receiver test` sends: a firing alert named `farmgate-test` that says it is a test.
    public static func testNotification(farm: String, receiver: AlertReceiver, now: Timestamp) -> AlertNotification {
        AlertNotification(
            farm: farm, rule: "farmgate-test", alertID: 0, transitionID: now.microseconds, fingerprint: "farmgate-test-\(receiver.id)", status: .firing,
            severity: "info", labels: ["alertname": "farmgate-test", "farm": farm, "severity": "info"],
            summary: "Test notification from farmgate-ingest to receiver \(receiver.name)",
            description: "Sent by `farmgate-ingest alert receiver test`; nothing is wrong.", startsAt: now)
    }
}

/// What `alert receiver add` checks before storing a receiver.
public enum AlertReceiverValidation {
    /// The longest `--group-wait` and `--group-interval`: a day (a notification held longer is no longer news).
    public static let maximumGrouping: Duration = .seconds(86_400)

    /// Throws a message that says what to fix.
    public static func validate(_ spec: AlertReceiverSpec) throws(AlertReceiverSpecError) {
        do { _ = try DeviceID(spec.name) } catch {
            throw AlertReceiverSpecError("invalid receiver name '\(spec.name.prefix(80))': use 1 to 64 characters of A-Z a-z 0-9 . _ -")
        }
        guard (1...100_000).contains(spec.maxPerMinute) else {
            throw AlertReceiverSpecError("--max-per-minute must be between 1 and 100000 (got \(spec.maxPerMinute))")
        }
        for (option, value) in [("--group-wait", spec.groupWait), ("--group-interval", spec.groupInterval)] where !(Duration.zero...maximumGrouping).contains(value) {
            throw AlertReceiverSpecError("\(option) must be from 0s to 24h, such as 30s or 5m (got \(ConfigTable.format(value)))")
        }
        if let problem = spec.url.controlCharacterProblem() {
            throw AlertReceiverSpecError("the receiver's URL \(problem)")
        }
        if let secret = spec.secret, secret.isEmpty {
            throw AlertReceiverSpecError("--secret is empty: give the shared secret the receiver checks signatures with, or leave --secret out for an unsigned receiver")
        }
        let components = URLComponents(string: spec.url)
        if let port = components?.port, !(1...65535).contains(port) {
            throw AlertReceiverSpecError("the receiver's URL has the port \(port); a port is 1 to 65535 (got '\(spec.url.prefix(200).escapingControlCharacters)')")
        }
        let scheme = components?.scheme?.lowercased() ?? ""
        let host = components?.host ?? ""
        switch spec.kind {
        case .webhook:
            guard scheme == "http" || scheme == "https", !host.isEmpty else {
                throw AlertReceiverSpecError("--webhook must be an http:// or https:// URL with a host, such as https://hooks.example.net/farmgate (got '\(spec.url.prefix(200).escapingControlCharacters)')")
            }
            // Never sent (the client takes no login from the URL), so the receiver would refuse every notification.
            if components?.user != nil || components?.password != nil {
                throw AlertReceiverSpecError(
                    "--webhook has a user name or password before @, which is not sent; remove it, and have the receiver check the signature (--secret) or a token in the URL's path")
            }
        case .email:
            guard scheme == "smtp" || scheme == "smtps", !host.isEmpty, (components?.path ?? "").count <= 1 else {
                throw AlertReceiverSpecError(
                    "--smtp must be smtp://HOST:PORT (STARTTLS, usually port 587) or smtps://HOST:PORT (TLS, usually 465) (got '\(spec.url.prefix(200).escapingControlCharacters)')")
            }
            // Without one libcurl would take 25 (smtp) or 465 (smtps): most submission servers want 587, and port 25 is
            // often blocked outbound; say which, rather than guess.
            guard components?.port != nil else {
                throw AlertReceiverSpecError(
                    "--smtp '\(spec.url.prefix(200).escapingControlCharacters)' has no port: write smtp://\(host):587 (STARTTLS submission) or smtps://\(host):465 (TLS), or the port your mail server takes")
            }
            for (option, address) in [("--from", spec.emailFrom)] + (spec.emailTo ?? "").split(separator: ",").map({ ("--email", String($0)) }) {
                guard let address = address?.trimmingCharacters(in: .whitespaces), isAddress(address) else {
                    throw AlertReceiverSpecError(
                        "\(option) must be an e-mail address such as grower@example.net (got '\((address ?? "").prefix(200).escapingControlCharacters)')")
                }
            }
            guard let to = spec.emailTo, !to.trimmingCharacters(in: .whitespaces).isEmpty else {
                throw AlertReceiverSpecError("--email needs at least one address")
            }
            if spec.secret != nil, (spec.username ?? "").isEmpty {
                throw AlertReceiverSpecError("a password needs --username too")
            }
        }
    }

    /// `local@domain`, no spaces, angle brackets or control characters (they would break the SMTP envelope).
    static func isAddress(_ text: String) -> Bool {
        let parts = text.split(separator: "@", omittingEmptySubsequences: false)
        return parts.count == 2 && !parts[0].isEmpty && !parts[1].isEmpty && text.count <= 254
            && text.unicodeScalars.allSatisfy { $0.value > 32 && $0.value != 127 && !"<>,;\"".unicodeScalars.contains($0) }
    }
}

public struct AlertReceiverSpecError: Error, Sendable, Hashable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
