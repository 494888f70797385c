import FarmgateSupport
import FarmgateWire
import Foundation
public import Logging

/// What `farmgate-ingest alert receiver ...` and `alert outbox ...` do, as a library so that tests run the same code.
public struct AlertDeliveryAdmin: Sendable {
    public let store: any NotificationOutboxStore

    public init(store: any NotificationOutboxStore) {
        self.store = store
    }

    /// Validates `spec` (``AlertReceiverValidation``) and adds it to `farm`.
    public func addReceiver(farm: String, _ spec: AlertReceiverSpec) async throws -> AlertReceiver {
        try validateFarmName(farm)
        try AlertReceiverValidation.validate(spec)
        return try await store.addAlertReceiver(farm: farm, spec, createdAt: .now())
    }

    /// Changes the receiver `name` of `farm` with `change` (it cannot rename it or change its kind), validates the result
    /// like a new receiver and stores it; its notifications stay (removing and adding it again would drop them).
    public func updateReceiver(farm: String, name: String, _ change: (inout AlertReceiverSpec) throws -> Void) async throws -> AlertReceiver {
        try validateFarmName(farm)
        let current = try await receiver(farm: farm, name: name)
        var spec = current.spec
        try change(&spec)
        guard spec.name == current.spec.name, spec.kind == current.spec.kind else {
            throw AlertReceiverSpecError("a receiver's name and kind cannot change: add a new receiver and remove this one")
        }
        try AlertReceiverValidation.validate(spec)
        return try await store.updateAlertReceiver(farm: farm, spec)
    }

    /// Removes the receiver `name` of `farm` with its notifications. Refused (``AlertReceiverSpecError``) while rules of
    /// the farm name it, since their alerts would then notify nobody, unless `force`: then the name is taken out of those
    /// rules first (so no rule names a receiver that does not exist, and a receiver added later under the name is not
    /// notified by them unawares).
    /// - Returns: how many undelivered notifications were dropped, and the rules the name was taken out of.
    public func removeReceiver(farm: String, name: String, force: Bool = false) async throws -> (dropped: Int, rules: [String]) {
        try validateFarmName(farm)
        var unnamed: [String] = []
        if let alerts = store as? any AdministrationStore & AlertStore {
            let admin = AlertAdmin(store: alerts)
            let naming = try await admin.rules(farm: farm).filter { $0.receivers.contains(name) }
            if !naming.isEmpty, !force {
                throw AlertReceiverSpecError(
                    "receiver '\(name)' is named by the rule\(naming.count == 1 ? "" : "s") \(naming.prefix(10).map { "'\($0.name)'" }.joined(separator: ", "))\(naming.count > 10 ? " and \(naming.count - 10) more" : "") of farm \(farm), whose alerts would then notify nobody: change or remove those rules first, or pass --force to remove it anyway (and take it out of them)")
            }
            for var rule in naming {
                rule.receivers.removeAll { $0 == name }
                try await admin.putRule(farm: farm, rule, replace: true)
                unnamed.append(rule.name)
            }
        }
        return (try await store.removeAlertReceiver(farm: farm, name: name), unnamed)
    }

    /// The receiver `name` of `farm`. Throws ``IngestStoreError/notFound(_:)``.
    public func receiver(farm: String, name: String) async throws -> AlertReceiver {
        guard let receiver = try await store.alertReceivers(farm: farm).first(where: { $0.name == name }) else {
            throw IngestStoreError.notFound("receiver '\(name)' in farm '\(farm)' (see `farmgate-ingest alert receiver list --farm \(farm)`)")
        }
        return receiver
    }

    /// Sends a test notification to the receiver now, directly (not through the outbox), and returns what it answered
    /// and how long it took. Throws ``DeliveryFailure`` with what went wrong.
    public func test(farm: String, name: String, configuration: NotifyConfiguration, logger: Logger) async throws -> (account: String, duration: Duration) {
        let receiver = try await receiver(farm: farm, name: name)
        let notifier = try Notifier(configuration: configuration, logger: logger)
        let now = Timestamp.now()
        let notification = Notifier.testNotification(farm: farm, receiver: receiver, now: now)
        let started = ContinuousClock.now
        do {
            let sent = try await notifier.send(
                notification, idempotencyKey: "farmgate-test-\(receiver.id)-\(now.microseconds)", to: receiver, asOf: now, signedAt: now)
            await notifier.shutdown()
            return (sent.account, ContinuousClock.now - started)
        } catch {
            await notifier.shutdown()
            throw error
        }
    }

    /// One line per receiver for `alert receiver list`: name, kind, where it sends (without secrets), the rate limit,
    /// and its grouping when it has one.
    public static func describe(_ receiver: AlertReceiver) -> String {
        let spec = receiver.spec
        var grouping = ""
        if spec.groupWait > .zero || spec.groupInterval > .zero {
            grouping = "\tgroup wait \(ConfigTable.format(spec.groupWait)), interval \(ConfigTable.format(spec.groupInterval))"
        }
        switch spec.kind {
        case .webhook:
            let signed = (spec.secret ?? "").isEmpty ? "unsigned" : "signed"
            return "\(spec.name)\twebhook\t\(redactedURL(spec.url))\t\(signed)\t\(spec.maxPerMinute)/min" + grouping
        case .email:
            let auth = (spec.username ?? "").isEmpty ? "no login" : "login \(spec.username ?? "")"
            return "\(spec.name)\temail\t\(spec.emailTo ?? "") via \(redactedURL(spec.url)) from \(spec.emailFrom ?? "")\t\(auth)\t\(spec.maxPerMinute)/min"
                + grouping
        }
    }

    /// `scheme://host:port`, plus `/…` when the URL has a path: webhook paths often hold a token (chat services), so
    /// they are never printed.
    public static func redactedURL(_ url: String) -> String {
        guard let components = URLComponents(string: url), let scheme = components.scheme, let host = components.host else { return "(unreadable URL)" }
        let port = components.port.map { ":\($0)" } ?? ""
        let path = components.path.count > 1 || components.query != nil ? "/…" : ""
        return "\(scheme)://\(host)\(port)\(path)"
    }

    /// One line of `alert outbox list`.
    public static func describe(_ entry: OutboxEntry) -> String {
        let when: String
        switch entry.state {
        case .delivered: when = "delivered " + (entry.deliveredAt.map(RFC3339.format) ?? "-")
        case .pending: when = "next " + RFC3339.format(entry.nextAttemptAt)
        case .delivering: when = "claimed by \(entry.claimedBy ?? "-") until " + (entry.claimedUntil.map(RFC3339.format) ?? "-")
        case .dead: when = "last tried " + (entry.lastAttemptAt.map(RFC3339.format) ?? "-")
        }
        let error = entry.lastError.map { NotificationText.singleLine(String($0.prefix(200))) } ?? ""
        return "\(entry.id)\t\(entry.state.rawValue)\t\(entry.attempts)\t\(entry.farm)/\(entry.receiver)\t\(entry.idempotencyKey)\t\(told(entry))\t\(when)\t\(error)"
    }

    /// How many transitions a row tells: `1 transition`, or `37 transitions since 2026-01-01T10:02:00Z` for a flapping
    /// alert's notifications merged into one row.
    static func told(_ entry: OutboxEntry) -> String {
        guard entry.transitions > 1 else { return "1 transition" }
        return "\(entry.transitions) transitions" + (entry.firstTransitionAt.map { " since " + RFC3339.format($0) } ?? "")
    }

    /// One outbox row as a JSON object (one line), for `alert outbox list --json`.
    public static func json(_ entry: OutboxEntry) -> String {
        var object: [String: Any] = [
            "id": entry.id, "state": entry.state.rawValue, "attempts": entry.attempts, "farm": entry.farm, "receiver": entry.receiver,
            "alert_id": entry.alertID, "transition_id": entry.transitionID, "idempotency_key": entry.idempotencyKey,
            "next_attempt_at": RFC3339.format(entry.nextAttemptAt), "created_at": RFC3339.format(entry.createdAt),
        ]
        if let value = entry.lastError { object["last_error"] = value }
        if let value = entry.claimedBy { object["claimed_by"] = value }
        if let value = entry.deliveredAt { object["delivered_at"] = RFC3339.format(value) }
        if let value = entry.lastAttemptAt { object["last_attempt_at"] = RFC3339.format(value) }
        object["transitions"] = entry.transitions
        if let value = entry.firstTransitionAt { object["first_transition_at"] = RFC3339.format(value) }
        if let value = entry.coalescedAt { object["coalesced_at"] = RFC3339.format(value) }
        if !entry.reached.isEmpty { object["reached"] = entry.reached }
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }
}
