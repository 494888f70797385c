public import FarmgateWire

/// One notification as the alert engine writes it into the outbox (`alert_outbox.payload`, JSON) and the delivery
/// workers render it for a receiver: the Alertmanager webhook body (version 4) or an e-mail.
///
/// The engine writes one row per (transition, receiver) in the same transaction as the state change, with
/// `idempotency_key` = ``idempotencyKey(receiver:)``, so that a crash mid-delivery retries with the same key.
public struct AlertNotification: Codable, Sendable, Hashable {
    public enum Status: String, Codable, Sendable {
        case firing, resolved
    }

    /// One state change folded into this notification (a backlog replayed after an outage holds several).
    public struct Transition: Codable, Sendable, Hashable {
        /// `pending`, `firing` or `resolved`.
        public var state: String
        /// When it happened, by reading timestamps (RFC 3339 in JSON).
        public var at: Timestamp

        public init(state: String, at: Timestamp) {
            self.state = state
            self.at = at
        }
    }

    public var farm: String
    public var rule: String
    /// `alerts.id` of the alert this notification is about.
    public var alertID: Int64
    /// `alert_transitions.id` of the transition that caused it.
    public var transitionID: Int64
    /// Stable per alert (rule + device + sensor): Alertmanager's `fingerprint`.
    public var fingerprint: String
    public var status: Status
    public var severity: String
    /// Labels: at least `alertname` (the rule), `farm`, `severity`, `device` and `sensor` when the alert has them,
    /// plus the rule's own labels.
    public var labels: [String: String]
    /// The rule's summary template, rendered.
    public var summary: String
    /// More text: for a backlog, what happened while the site was offline.
    public var description: String?
    public var startsAt: Timestamp
    public var endsAt: Timestamp?
    /// True when the transitions were learnt from readings that arrived late (a backlog after an outage).
    public var late: Bool
    public var transitions: [Transition]
    /// The value that caused the transition, when there is one.
    public var value: Double?
    /// On a late report: when the engine wrote it. A report has no transition of its own (``transitionID`` is the
    /// alert's newest, which a live notification may already carry), so this gives it a key of its own.
    public var reportedAt: Timestamp?

    public init(
        farm: String, rule: String, alertID: Int64, transitionID: Int64, fingerprint: String, status: Status, severity: String,
        labels: [String: String], summary: String, description: String? = nil, startsAt: Timestamp, endsAt: Timestamp? = nil,
        late: Bool = false, transitions: [Transition] = [], value: Double? = nil
    ) {
        self.farm = farm
        self.rule = rule
        self.alertID = alertID
        self.transitionID = transitionID
        self.fingerprint = fingerprint
        self.status = status
        self.severity = severity
        self.labels = labels
        self.summary = summary
        self.description = description
        self.startsAt = startsAt
        self.endsAt = endsAt
        self.late = late
        self.transitions = transitions
        self.value = value
    }

    enum CodingKeys: String, CodingKey {
        case farm, rule, fingerprint, status, severity, labels, summary, description, late, transitions, value
        case alertID = "alert_id"
        case transitionID = "transition_id"
        case startsAt = "starts_at"
        case endsAt = "ends_at"
        case reportedAt = "reported_at"
    }

    /// The idempotency key of this notification at `receiver` (an `alert_receivers.id`): the same on every retry.
    /// `farmgate-<alert>-<transition>-<receiver>`; a late report's ends in `-late-<unix µs when it was written>`.
    public func idempotencyKey(receiver: Int64) -> String {
        let key = "farmgate-\(alertID)-\(transitionID)-\(receiver)"
        return reportedAt.map { "\(key)-late-\($0.microseconds)" } ?? key
    }
}
