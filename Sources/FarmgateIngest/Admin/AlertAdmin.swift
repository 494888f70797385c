import FarmgateSupport
public import FarmgateWire
import Foundation

/// The alert administration behind `farmgate-ingest alert ...` and the alert API, as a library so that both run the same
/// code: rules, alerts with their history, acknowledgements, silences.
public struct AlertAdmin: Sendable {
    public let store: any AdministrationStore & AlertStore

    public init(store: any AdministrationStore & AlertStore) {
        self.store = store
    }

    /// The alert administration of `admin`'s store; throws when the store keeps no alerts.
    public init(_ admin: IngestAdmin) throws {
        guard let store = admin.store as? any AdministrationStore & AlertStore else {
            throw IngestStoreError.notFound("alerting in this store")
        }
        self.store = store
    }

    public func farm(_ name: String) async throws -> FarmRecord {
        guard let farm = try await store.farm(named: name) else { throw IngestStoreError.notFound("farm '\(name)'") }
        return farm
    }

    // MARK: Rules

    /// Adds `rule` (or replaces the rule of that name when `replace`).
    ///
    /// - Throws: ``AlertRuleError`` (field `receivers`) when the rule names a receiver the farm does not have: its
    ///   notifications would go nowhere.
    public func putRule(farm: String, _ rule: AlertRule, replace: Bool) async throws {
        try await checkReceivers(farm: farm, [rule])
        try await store.putAlertRule(farmID: try await self.farm(farm).id, rule: rule, replace: replace, at: .now())
    }

    /// Stores every rule of a file, replacing rules of the same names; other rules of the farm stay. Nothing is stored
    /// when a rule names a receiver the farm does not have.
    public func load(farm: String, _ rules: [AlertRule]) async throws {
        try await checkReceivers(farm: farm, rules)
        let farmID = try await self.farm(farm).id
        for rule in rules { try await store.putAlertRule(farmID: farmID, rule: rule, replace: true, at: .now()) }
    }

    /// Refuses rules that name receivers `farm` does not have (a typo would otherwise send their alerts nowhere).
    func checkReceivers(farm: String, _ rules: [AlertRule]) async throws {
        guard rules.contains(where: { !$0.receivers.isEmpty }), let outbox = store as? any NotificationOutboxStore else { return }
        let known = Set(try await outbox.alertReceivers(farm: farm).map(\.name))
        for rule in rules {
            let unknown = rule.receivers.filter { !known.contains($0) }
            guard !unknown.isEmpty else { continue }
            let names = unknown.map { "'\($0)'" }.joined(separator: ", ")
            let have = known.isEmpty ? "it has none" : "it has \(known.sorted().joined(separator: ", "))"
            throw AlertRuleError(
                field: "receivers",
                message: "rule '\(rule.name)' names \(names), which farm \(farm) has no receiver of (\(have)): its alerts would notify nobody; add the receiver first (`farmgate-ingest alert receiver add --farm \(farm) --name NAME ...`) or correct the name",
                rule: rule.name)
        }
    }

    /// The names of `farm`'s rules that notify `receiver`.
    public func rules(farm: String, notifying receiver: String) async throws -> [String] {
        try await rules(farm: farm).filter { $0.receivers.contains(receiver) }.map(\.name)
    }

    public func rules(farm: String) async throws -> [AlertRule] {
        try await store.alertRules(farmID: try await self.farm(farm).id).map(\.rule)
    }

    public func rule(farm: String, name: String) async throws -> AlertRule {
        guard let rule = try await rules(farm: farm).first(where: { $0.name == name }) else {
            throw IngestStoreError.notFound("alert rule '\(name)' in farm '\(farm)'")
        }
        return rule
    }

    public func removeRule(farm: String, name: String) async throws {
        guard try await store.removeAlertRule(farmID: try await self.farm(farm).id, name: name) else {
            throw IngestStoreError.notFound("alert rule '\(name)' in farm '\(farm)'")
        }
    }

    // MARK: Alerts

    /// How many of an alert's newest transitions ``alerts(farm:recent:limit:now:)`` gives: a flapping sensor can
    /// record millions in a year, and one answer must not hold them all.
    public static let transitionsPerAlert = 100

    /// Active alerts and those that changed within `recent`, newest change first, each with its newest
    /// ``transitionsPerAlert`` transitions (`transitionsOmitted` says whether older ones exist).
    public func alerts(farm: String, recent: Duration = .seconds(86_400), limit: Int = 500, now: Timestamp = .now()) async throws -> [AlertView] {
        let farmRecord = try await self.farm(farm)
        let since = Timestamp(microseconds: now.microseconds - recent.wholeMicroseconds)
        let records = try await store.alertRecords(farmID: farmRecord.id, changedSince: since, limit: limit)
        // One more than shown tells whether older transitions exist.
        let history = Dictionary(
            grouping: try await store.alertTransitions(alertIDs: records.map(\.id), newestPerAlert: Self.transitionsPerAlert + 1), by: \.alertID)
        let severities = Dictionary(try await store.alertRules(farmID: farmRecord.id).map { ($0.rule.name, $0.rule.severity) }, uniquingKeysWith: { a, _ in a })
        return records.map { record in
            var transitions = history[record.id] ?? []
            // The store gave the newest by id, in time order: the one more than shown is the lowest id.
            let omitted = transitions.count > Self.transitionsPerAlert
            if omitted, let oldest = transitions.map(\.id).min() { transitions.removeAll { $0.id == oldest } }
            var view = AlertView(record, severity: severities[record.rule], history: transitions)
            view.transitionsOmitted = omitted
            return view
        }
    }

    /// Records who acknowledged the alert. `by` is a name: a control character in it is refused (``AlertRuleError``).
    public func acknowledge(farm: String, alertID: Int64, by: String) async throws {
        if let problem = by.controlCharacterProblem() { throw AlertRuleError(field: "by", message: problem) }
        guard try await store.acknowledgeAlert(farmID: try await self.farm(farm).id, alertID: alertID, by: by, at: .now()) else {
            throw IngestStoreError.notFound("alert \(alertID) in farm '\(farm)'")
        }
    }

    // MARK: Silences

    /// The longest silence: that of rule durations (366 days).
    public static let longestSilence = AlertRuleFile.maximumDuration
    /// ``longestSilence`` in microseconds.
    static let silenceLengthMax = Int64(longestSilence.components.seconds) * 1_000_000
    /// The longest matcher glob, as a rule label's value.
    static let silenceGlobMax = 256
    static let silenceMatchersMax = 32

    /// Adds a silence and returns its id. Matchers are label globs (`alertname`, `device`, `sensor`, `severity`, or a
    /// rule's own labels); at least one is required, so that a typo never silences a whole farm by accident. `comment` is
    /// free text (tabs taken), `by` a name; a control character in either is refused (``AlertRuleError``).
    public func addSilence(farm: String, matchers: [String: String], until: Timestamp, comment: String, by: String, now: Timestamp = .now()) async throws -> Int64 {
        if let problem = comment.controlCharacterProblem(allowingTab: true) { throw AlertRuleError(field: "comment", message: problem) }
        if let problem = by.controlCharacterProblem() { throw AlertRuleError(field: "created_by", message: problem) }
        guard !matchers.isEmpty else { throw AlertRuleError(field: "matchers", message: "at least one matcher is required, e.g. alertname=ph-low or device=greenhouse-*") }
        guard matchers.count <= Self.silenceMatchersMax else { throw AlertRuleError(field: "matchers", message: "at most \(Self.silenceMatchersMax) matchers") }
        for (name, glob) in matchers.sorted(by: { $0.key < $1.key }) {
            if let problem = name.controlCharacterProblem() ?? glob.controlCharacterProblem() {
                throw AlertRuleError(field: "matchers", message: "'\(name.prefix(64))': \(problem)")
            }
            // A label name as rules write them (`labels`), so that a typo is refused rather than matching nothing.
            guard AlertRuleSpec.isLabelName(name) else {
                throw AlertRuleError(
                    field: "matchers",
                    message: "label name '\(name.prefix(64))' must be 1 to 64 of A-Z a-z 0-9 _, not starting with a digit (alertname, device, sensor, severity, farm or a rule's label)")
            }
            guard glob.count <= Self.silenceGlobMax else {
                throw AlertRuleError(field: "matchers", message: "the glob of '\(name)' is longer than \(Self.silenceGlobMax) characters")
            }
            // Globs have `*` and `?` only: a bracket (`[a-z]`, an unfinished `[a-`) would match itself literally, never
            // what it was written for.
            guard !glob.contains(where: { $0 == "[" || $0 == "]" }) else {
                throw AlertRuleError(field: "matchers", message: "the glob of '\(name)' ('\(glob.prefix(64))') is not valid: only * (any run) and ? (one character) are wildcards, and [ ] is not taken")
            }
        }
        guard until > now else { throw AlertRuleError(field: "until", message: "must be in the future (got \(RFC3339.format(until)))") }
        // As rule durations: at most 366 days, so that every silence ends in a year RFC 3339 can write.
        let (span, overflow) = until.microseconds.subtractingReportingOverflow(now.microseconds)
        guard !overflow, span <= Self.silenceLengthMax else {
            throw AlertRuleError(field: "ends_at", message: "must be at most 366 days from now (as a duration, at most 366d); a longer silence is refused")
        }
        return try await store.addAlertSilence(
            farmID: try await self.farm(farm).id, AlertSilence(matchers: matchers, startsAt: now, endsAt: until, createdBy: by, comment: comment))
    }

    public func silences(farm: String, now: Timestamp = .now()) async throws -> [AlertSilence] {
        try await store.alertSilences(farmID: try await self.farm(farm).id, endingAfter: now)
    }

    public func removeSilence(farm: String, id: Int64) async throws {
        guard try await store.removeAlertSilence(farmID: try await self.farm(farm).id, id: id) else {
            throw IngestStoreError.notFound("silence \(id) in farm '\(farm)'")
        }
    }
}

/// One alert as the API and `alert list --json` show it.
public struct AlertView: Codable, Sendable, Hashable {
    public struct Transition: Codable, Sendable, Hashable {
        public var from: String
        public var to: String
        public var at: Timestamp
        public var value: Double?
        public var late: Bool
        public var silenced: Bool
    }

    public var id: Int64
    public var rule: String
    public var severity: String?
    public var device: String?
    public var sensor: String?
    public var fingerprint: String
    public var state: String
    public var pendingSince: Timestamp?
    public var startsAt: Timestamp?
    public var endsAt: Timestamp?
    public var value: Double?
    public var acknowledgedAt: Timestamp?
    public var acknowledgedBy: String?
    /// A late report (a backlog) is being gathered and will be notified at this time.
    public var lateReportDue: Timestamp?
    public var updatedAt: Timestamp
    /// The newest transitions (at most ``AlertAdmin/transitionsPerAlert``), by time.
    public var transitions: [Transition]
    /// Older transitions exist than those listed (kept until `[retention] alert_history`).
    public var transitionsOmitted = false

    enum CodingKeys: String, CodingKey {
        case id, rule, severity, device, sensor, fingerprint, state, value, transitions
        case transitionsOmitted = "transitions_omitted"
        case pendingSince = "pending_since"
        case startsAt = "starts_at"
        case endsAt = "ends_at"
        case acknowledgedAt = "acknowledged_at"
        case acknowledgedBy = "acknowledged_by"
        case lateReportDue = "late_report_due"
        case updatedAt = "updated_at"
    }

    public init(_ record: AlertRecord, severity: String?, history: [AlertTransitionRecord]) {
        id = record.id
        rule = record.rule
        self.severity = severity
        device = record.device
        sensor = record.sensor
        fingerprint = record.fingerprint
        state = record.state.rawValue
        pendingSince = record.pendingSince
        startsAt = record.startsAt
        endsAt = record.endsAt
        value = record.value
        acknowledgedAt = record.acknowledgedAt
        acknowledgedBy = record.acknowledgedBy
        lateReportDue = record.lateDue
        updatedAt = record.updatedAt
        transitions = history.map {
            Transition(from: $0.from.rawValue, to: $0.to.rawValue, at: $0.at, value: $0.value, late: $0.late, silenced: $0.silenced)
        }
    }
}
