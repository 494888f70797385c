public import FarmgateWire

/// One notification as the alert engine writes it into the outbox (`alert_outbox.payload`, JSON) and the delivery
/// workers render it for a receiver: the Alertmanager webhook body (version 4) or an e-mail.
///
/// The engine writes one row per (transition, receiver) in the same transaction as the state change, with
/// `idempotency_key` = ``idempotencyKey(receiver:)``, so that a crash mid-delivery retries with the same key. When the
/// receiver's newest row for the alert has not been sent yet, the engine merges the new notification into that row
/// instead (``merging(_:)``, ``Coalesced``): a flapping alert waits in the outbox as one notification that tells the
/// newest state and how often it changed, never as a queue of stale ones.
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
    /// Set when later notifications of the alert were merged into this one while it waited to be sent: what they told
    /// together. Nil for a notification that stands for itself alone.
    public var coalesced: Coalesced?
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
        case coalesced
    }

    /// What a notification that stands for several tells about them: how many times the alert fired and resolved, since
    /// when, and which transition is the newest. The notification's own fields (status, times, value, summary) are the
    /// newest one's; ``AlertNotification/transitionID`` stays the first one's, because the idempotency key is built
    /// from it and the receiver has never seen that key.
    public struct Coalesced: Codable, Sendable, Hashable {
        /// `firing` transitions told, in every notification merged (a live notification tells one).
        public var fired: Int
        /// `resolved` transitions told.
        public var resolved: Int
        /// When the first transition told happened.
        public var since: Timestamp
        /// `alert_transitions.id` of the newest transition told.
        public var newestTransitionID: Int64

        public init(fired: Int, resolved: Int, since: Timestamp, newestTransitionID: Int64) {
            self.fired = fired
            self.resolved = resolved
            self.since = since
            self.newestTransitionID = newestTransitionID
        }

        /// How many changes of state the notification stands for.
        public var transitions: Int { fired + resolved }

        enum CodingKeys: String, CodingKey {
            case fired, resolved, since
            case newestTransitionID = "newest_transition_id"
        }
    }

    /// At most this many ``transitions`` are kept when notifications are merged (the newest); ``Coalesced`` counts them all.
    public static let mergedTransitionsKept = 20

    /// A live notification: neither a late report nor one that folds a backlog in. Only those are merged.
    public var isLive: Bool { !late && reportedAt == nil }

    /// How many firing or resolved transitions this notification tells (at least 1): `alert_outbox.transitions`.
    public var transitionCount: Int {
        if let coalesced { return max(1, coalesced.transitions) }
        return max(1, transitions.count(where: { $0.state == Status.firing.rawValue || $0.state == Status.resolved.rawValue }))
    }

    /// When the first transition it tells happened: `alert_outbox.first_transition_at_us`.
    public var firstTransitionAt: Timestamp {
        coalesced?.since ?? transitions.first?.at ?? startsAt
    }

    /// This notification, written and never sent, with `newer` (a later notification of the same alert) merged in:
    /// `newer`'s state, summary, value and times; this one's identity (``alertID``, ``transitionID``, so the same
    /// idempotency key); the transitions of both (the newest ``mergedTransitionsKept``) and ``coalesced`` counting all.
    public func merging(_ newer: AlertNotification) -> AlertNotification {
        func count(_ notification: AlertNotification, _ status: Status) -> Int {
            notification.transitions.count(where: { $0.state == status.rawValue })
        }
        let before =
            coalesced
            ?? Coalesced(fired: count(self, .firing), resolved: count(self, .resolved), since: firstTransitionAt, newestTransitionID: transitionID)
        var merged = newer
        merged.alertID = alertID
        merged.transitionID = transitionID
        merged.reportedAt = reportedAt
        merged.transitions = Array((transitions + newer.transitions).suffix(Self.mergedTransitionsKept))
        merged.coalesced = Coalesced(
            fired: before.fired + (newer.coalesced?.fired ?? count(newer, .firing)),
            resolved: before.resolved + (newer.coalesced?.resolved ?? count(newer, .resolved)),
            since: min(before.since, newer.firstTransitionAt), newestTransitionID: newer.coalesced?.newestTransitionID ?? newer.transitionID)
        return merged
    }

    /// The idempotency key of this notification at `receiver` (an `alert_receivers.id`): the same on every retry.
    /// `farmgate-<alert>-<transition>-<receiver>`; a late report's ends in `-late-<unix µs when it was written>`.
    public func idempotencyKey(receiver: Int64) -> String {
        let key = "farmgate-\(alertID)-\(transitionID)-\(receiver)"
        return reportedAt.map { "\(key)-late-\($0.microseconds)" } ?? key
    }
}
