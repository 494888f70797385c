public import FarmgateWire
import Foundation

/// The body of a webhook notification: Alertmanager's webhook payload, version 4, so that receivers written for
/// Alertmanager (chat bridges, paging services, `alertmanager-webhook-logger`) take it unchanged. One notification
/// carries one alert. Farmgate's own fields are under `farmgate`, which Alertmanager receivers ignore.
///
/// `groupLabels` are the alert's labels and `groupKey` is built from them the way Alertmanager builds it
/// (`{}:{alertname="ph-low", device="site-1", ...}`), so a receiver that follows incidents by group key sees one per
/// alert. `endsAt` of a firing alert is `0001-01-01T00:00:00Z`, as Alertmanager sends it. A notification that later
/// ones of a flapping alert were merged into carries the annotations `transitions` (how many times it fired and
/// resolved, as a number) and `transitions_since` (RFC 3339), and `farmgate.coalesced`.
public struct AlertmanagerWebhook: Codable, Sendable, Hashable {
    public struct Alert: Codable, Sendable, Hashable {
        public var status: String
        public var labels: [String: String]
        public var annotations: [String: String]
        public var startsAt: String
        public var endsAt: String
        public var generatorURL: String
        public var fingerprint: String
    }

    /// What Farmgate adds: the idempotency key (also in the `Idempotency-Key` header; here it is covered by the signature).
    public struct Farmgate: Codable, Sendable, Hashable {
        public var idempotencyKey: String
        public var farm: String
        public var alertID: Int64
        public var transitionID: Int64
        public var late: Bool
        public var value: Double?
        /// `state@RFC 3339` of each transition folded into this notification (the newest 20 when several were merged).
        public var transitions: [String]
        /// Present when later notifications of the alert were merged into this one while it waited (a flapping
        /// alert): how often it fired and resolved, since when, and the newest transition's id.
        public var coalesced: Coalesced?
    }

    /// ``AlertNotification/Coalesced`` as the webhook tells it.
    public struct Coalesced: Codable, Sendable, Hashable {
        public var transitions: Int
        public var fired: Int
        public var resolved: Int
        /// RFC 3339.
        public var since: String
        public var newestTransitionID: Int64
    }

    public var version: String
    public var groupKey: String
    public var truncatedAlerts: Int
    public var status: String
    public var receiver: String
    public var groupLabels: [String: String]
    public var commonLabels: [String: String]
    public var commonAnnotations: [String: String]
    public var externalURL: String
    public var alerts: [Alert]
    public var farmgate: Farmgate

    /// Renders `notification` for the receiver named `receiver`.
    public init(_ notification: AlertNotification, receiver: String, idempotencyKey: String, externalURL: String, now: Timestamp) {
        var labels = notification.labels
        labels["alertname"] = labels["alertname"] ?? notification.rule
        labels["farm"] = labels["farm"] ?? notification.farm
        labels["severity"] = labels["severity"] ?? notification.severity
        var annotations = ["summary": notification.summary, "description": NotificationText.description(notification, now: now)]
        if let value = notification.value { annotations["value"] = NotificationText.number(value) }
        if let coalesced = notification.coalesced {
            annotations["transitions"] = "\(coalesced.transitions)"
            annotations["transitions_since"] = RFC3339.format(coalesced.since)
        }
        let status = notification.status.rawValue
        let generatorURL = externalURL.isEmpty ? "" : "\(externalURL)/v1/farms/\(notification.farm)/alerts"
        version = "4"
        groupKey = "{}:{" + labels.sorted { $0.key < $1.key }.map { "\($0.key)=\(Self.quoted($0.value))" }.joined(separator: ", ") + "}"
        truncatedAlerts = 0
        self.status = status
        self.receiver = receiver
        groupLabels = labels
        commonLabels = labels
        commonAnnotations = annotations
        self.externalURL = externalURL
        alerts = [
            Alert(
                status: status, labels: labels, annotations: annotations, startsAt: RFC3339.format(notification.startsAt),
                endsAt: notification.status == .resolved ? RFC3339.format(notification.endsAt ?? now) : "0001-01-01T00:00:00Z",
                generatorURL: generatorURL, fingerprint: notification.fingerprint)
        ]
        farmgate = Farmgate(
            idempotencyKey: idempotencyKey, farm: notification.farm, alertID: notification.alertID, transitionID: notification.transitionID,
            late: notification.late, value: notification.value,
            transitions: notification.transitions.map { "\($0.state)@\(RFC3339.format($0.at))" },
            coalesced: notification.coalesced.map {
                Coalesced(
                    transitions: $0.transitions, fired: $0.fired, resolved: $0.resolved, since: RFC3339.format($0.since),
                    newestTransitionID: $0.newestTransitionID)
            })
    }

    /// The exact bytes sent (and signed): JSON with sorted keys.
    public func encoded() throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array(try encoder.encode(self))
    }

    private static func quoted(_ text: String) -> String {
        "\"" + text.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
    }
}
