public import FarmgateWire

/// Where the alert engine, the alert commands and the alert API keep rules, alerts, their history, silences and the
/// engine's progress (migration 5 on SQLite, 3 on PostgreSQL). Adopted by both stores; checked by one conformance suite.
///
/// The one write that matters is ``applyAlertChanges(_:now:)``: an alert's new state, its transitions and the outbox rows
/// of its notification in ONE transaction, with an optimistic check of the alert's `version` so that two instances that
/// evaluated the same alert from different readings never both record a transition (the second gets
/// ``AlertStoreConflict`` and evaluates again from the stored state). On PostgreSQL the `UPDATE ... WHERE version = $n`
/// takes the alert row's lock, so the later of two writers waits, then sees the new version and fails the check.
public protocol AlertStore: Sendable {
    // MARK: Rules
    /// Stores `rule` for the farm. Throws ``IngestStoreError/alreadyExists(_:)`` when a rule of that name exists and
    /// `replace` is false.
    func putAlertRule(farmID: Int64, rule: AlertRule, replace: Bool, at: Timestamp) async throws
    /// The rules of one farm (by name), or of every farm when `farmID` is nil.
    func alertRules(farmID: Int64?) async throws -> [StoredAlertRule]
    /// Removes the rule; false when there was none. Its alerts and their history stay.
    func removeAlertRule(farmID: Int64, name: String) async throws -> Bool
    /// A short text that changes whenever a rule or a silence of any farm is added, changed or removed (a counter that
    /// triggers on both tables move, so one row is read): the engine compares it before each batch, so that a rule or silence acknowledged before a
    /// batch was stored applies to it, without reading every rule for every batch.
    func alertConfigurationStamp() async throws -> String

    // MARK: Silences
    func addAlertSilence(farmID: Int64, _ silence: AlertSilence) async throws -> Int64
    /// The silences of one farm that end after `endingAfter` (nil: all).
    func alertSilences(farmID: Int64, endingAfter: Timestamp?) async throws -> [AlertSilence]
    func removeAlertSilence(farmID: Int64, id: Int64) async throws -> Bool

    // MARK: Alerts
    /// The alerts of a device (sensor alerts and its device-level ones), for the engine.
    func alertRecords(deviceRowID: Int64) async throws -> [AlertRecord]
    /// The alerts of a farm that are pending or firing, or changed at or after `changedSince`, newest change first.
    func alertRecords(farmID: Int64, changedSince: Timestamp, limit: Int) async throws -> [AlertRecord]
    /// Alerts whose late report is due (`late_due_us <= now`).
    func alertRecordsWithLateReportDue(now: Timestamp) async throws -> [AlertRecord]
    /// The history of the given alerts, by time then id: all of it, or with `newestPerAlert` only that many of each
    /// alert's newest transitions (by id), found by seeks on `(alert_id, id)` however long the history is.
    func alertTransitions(alertIDs: [Int64], newestPerAlert: Int?) async throws -> [AlertTransitionRecord]
    /// Acknowledges an alert of the farm; false when the farm has no such alert.
    func acknowledgeAlert(farmID: Int64, alertID: Int64, by: String, at: Timestamp) async throws -> Bool
    /// Writes the changes in one transaction (see the type's documentation). A notification for a receiver whose newest
    /// row of the alert was never claimed is merged into that row instead of added (``OutboxCoalescing``).
    /// - Parameter durability: whether the commit waits for the disk (``AlertWriteDurability``).
    /// - Returns: the alert ids, in order, and how many notifications were merged.
    /// - Throws: ``AlertStoreConflict`` when an alert changed since it was read; nothing is written then.
    /// - Parameter cursor: for the changes of an evaluation of a device's readings: the device's evaluation cursor is
    ///   advanced in the same transaction, first, and only from the version the engine read (``AlertCursorAdvance``);
    ///   written even when `changes` is empty.
    @discardableResult
    func applyAlertChanges(_ changes: [AlertChange], now: Timestamp, durability: AlertWriteDurability, advancing cursor: AlertCursorAdvance?) async throws
        -> AlertChangesWritten

    // MARK: Engine progress
    /// The device's evaluation cursor (version 0 and no time when no evaluation of its readings was written yet).
    func alertEvaluationCursor(deviceRowID: Int64) async throws -> AlertEvaluationCursor
    /// Per device that has readings: the highest sequence the engine evaluated (nil: none) and the highest stored.
    func alertProgress() async throws -> [AlertDeviceProgress]
    func saveAlertWatermarks(_ watermarks: [Int64: UInt64]) async throws
    /// Up to `limit` readings of the device above `afterSequence`, in sequence order: the engine's catch-up.
    func alertCatchUpReadings(device: DeviceIdentity, afterSequence: UInt64?, limit: Int) async throws -> [CommittedReading]
    /// Every sensor of the farm with its newest reading's time, for the timer rules.
    func alertSensors(farmID: Int64) async throws -> [AlertSensor]
    /// The outbox rows of a farm, oldest first (the CLI and tests; delivery claims rows itself).
    func alertOutbox(farmID: Int64) async throws -> [AlertOutboxRow]
}

extension AlertStore {
    /// ``applyAlertChanges(_:now:durability:)`` synced before it returns.
    @discardableResult
    public func applyAlertChanges(_ changes: [AlertChange], now: Timestamp) async throws -> AlertChangesWritten {
        try await applyAlertChanges(changes, now: now, durability: .immediate, advancing: nil)
    }

    /// ``applyAlertChanges(_:now:durability:advancing:)`` without an evaluation cursor (timer rules, late reports,
    /// rule changes, the CLI: each changes alerts it read, which their versions check).
    @discardableResult
    public func applyAlertChanges(_ changes: [AlertChange], now: Timestamp, durability: AlertWriteDurability) async throws -> AlertChangesWritten {
        try await applyAlertChanges(changes, now: now, durability: durability, advancing: nil)
    }
}

/// What ``AlertStore/applyAlertChanges(_:now:durability:)`` wrote.
public struct AlertChangesWritten: Sendable, Hashable {
    /// The alert ids, in the order of the changes.
    public var alertIDs: [Int64]
    /// Outbox rows that took a notification merged into them instead of a row of its own (one per receiver).
    public var coalesced: Int

    public init(alertIDs: [Int64] = [], coalesced: Int = 0) {
        self.alertIDs = alertIDs
        self.coalesced = coalesced
    }
}

/// How soon an alert write must be on the disk.
///
/// The engine's writes for batches of readings are the only writes besides the batches themselves on the ingest's
/// path: with SQLite's one writer, a synced commit of each of them (one `fdatasync` per batch with a transition, as
/// many as the batches themselves in the 1,000-rule benchmark) halved the write rate. They can wait for the next synced
/// commit because they can be derived again: the engine's watermark, which says up to which reading alerts were
/// evaluated, is saved by a synced commit after them, and every synced commit on SQLite's write-ahead log syncs the
/// frames before it. So a power loss takes the alert writes only together with the watermark that covers them, and the
/// engine evaluates those readings again from the store after the restart; a notification is claimed for delivery (a
/// synced write) before it is sent, so nothing that went out is lost. A process that dies (`kill -9`) loses nothing: a
/// commit is in the operating system's cache when it returns.
public enum AlertWriteDurability: Sendable, Hashable {
    /// Synced before the call returns (SQLite `synchronous=FULL`, as every other write of the ingest).
    case immediate
    /// Visible at once; on the disk with the store's next synced commit (SQLite: `synchronous=NORMAL` for this
    /// transaction only; PostgreSQL: `synchronous_commit = off` for it, the WAL being flushed in order by the next
    /// synchronous commit, the watermark's among them). Every evaluation of a batch against rules writes (it moves the
    /// device's ``AlertEvaluationCursor``), so a flush per batch would bound the engine by the disk's sync latency.
    case withNextSyncedCommit
}

/// Thrown by ``AlertStore/applyAlertChanges(_:now:durability:advancing:)`` when another writer changed one of the alerts,
/// or the device's evaluation cursor (``AlertEvaluationCursor``), first.
public struct AlertStoreConflict: Error, Sendable, CustomStringConvertible {
    public var alert: String
    public init(alert: String) { self.alert = alert }
    public var description: String { "alert \(alert) was changed by another writer" }
}

public struct StoredAlertRule: Sendable, Hashable {
    public var farmID: Int64
    public var farm: String
    public var rule: AlertRule
    public var updatedAt: Timestamp

    public init(farmID: Int64, farm: String, rule: AlertRule, updatedAt: Timestamp) {
        self.farmID = farmID
        self.farm = farm
        self.rule = rule
        self.updatedAt = updatedAt
    }
}

/// Where an alert is in its life.
public enum AlertState: String, Sendable, Codable, CaseIterable {
    /// The condition does not hold (a pending alert whose condition cleared before `for` returns here).
    case inactive
    /// The condition holds, not yet for the rule's `for`.
    case pending
    case firing
    /// Fired, and the condition cleared.
    case resolved

    public var isActive: Bool { self == .pending || self == .firing }
}

/// One alert: a rule on one sensor (or one device for `device_offline`), with its current state.
public struct AlertRecord: Sendable, Hashable {
    /// 0 for an alert not stored yet.
    public var id: Int64
    public var farmID: Int64
    public var rule: String
    public var deviceRowID: Int64
    /// 0 for a device-level alert.
    public var sensorRowID: Int64
    public var device: String?
    public var sensor: String?
    public var fingerprint: String
    public var state: AlertState
    public var pendingSince: Timestamp?
    /// When it last began firing.
    public var startsAt: Timestamp?
    /// When it last resolved.
    public var endsAt: Timestamp?
    /// The newest reading timestamp the engine had evaluated when the state last changed.
    public var lastReading: Timestamp?
    public var value: Double?
    public var acknowledgedAt: Timestamp?
    public var acknowledgedBy: String?
    /// A late report (a backlog) waiting to be written: the reading times it covers and when it is due.
    public var lateFrom: Timestamp?
    public var lateTo: Timestamp?
    public var lateDue: Timestamp?
    /// Raised by every write; the expected value in an ``AlertChange``.
    public var version: Int64
    public var updatedAt: Timestamp

    public init(
        id: Int64 = 0, farmID: Int64, rule: String, deviceRowID: Int64, sensorRowID: Int64, device: String?, sensor: String?, fingerprint: String,
        state: AlertState = .inactive, pendingSince: Timestamp? = nil, startsAt: Timestamp? = nil, endsAt: Timestamp? = nil,
        lastReading: Timestamp? = nil, value: Double? = nil, acknowledgedAt: Timestamp? = nil, acknowledgedBy: String? = nil,
        lateFrom: Timestamp? = nil, lateTo: Timestamp? = nil, lateDue: Timestamp? = nil, version: Int64 = 0, updatedAt: Timestamp
    ) {
        self.id = id
        self.farmID = farmID
        self.rule = rule
        self.deviceRowID = deviceRowID
        self.sensorRowID = sensorRowID
        self.device = device
        self.sensor = sensor
        self.fingerprint = fingerprint
        self.state = state
        self.pendingSince = pendingSince
        self.startsAt = startsAt
        self.endsAt = endsAt
        self.lastReading = lastReading
        self.value = value
        self.acknowledgedAt = acknowledgedAt
        self.acknowledgedBy = acknowledgedBy
        self.lateFrom = lateFrom
        self.lateTo = lateTo
        self.lateDue = lateDue
        self.version = version
        self.updatedAt = updatedAt
    }
}

/// One kept state change of an alert.
public struct AlertTransitionRecord: Sendable, Hashable {
    public var id: Int64
    public var alertID: Int64
    public var from: AlertState
    public var to: AlertState
    /// By reading timestamps (the wall clock for timer rules).
    public var at: Timestamp
    public var value: Double?
    /// Learnt from readings that arrived late (a backlog).
    public var late: Bool
    /// A silence matched when it happened: no notification was written for it.
    public var silenced: Bool
    /// A notification covering it was written to the outbox (or it needs none).
    public var notified: Bool
    public var recordedAt: Timestamp

    public init(
        id: Int64 = 0, alertID: Int64 = 0, from: AlertState, to: AlertState, at: Timestamp, value: Double?, late: Bool = false, silenced: Bool = false,
        notified: Bool = true, recordedAt: Timestamp
    ) {
        self.id = id
        self.alertID = alertID
        self.from = from
        self.to = to
        self.at = at
        self.value = value
        self.late = late
        self.silenced = silenced
        self.notified = notified
        self.recordedAt = recordedAt
    }
}

/// What the engine writes for one alert: its new row (``AlertRecord/version`` = the version it read; id 0 inserts),
/// new transitions, and notifications, each written once per receiver of `receivers` (names of the farm's
/// `alert_receivers`; unknown names are skipped) with ``AlertNotification/alertID`` and ``AlertNotification/transitionID``
/// filled in by the store: the id of the transition at ``PlannedNotification/transitionIndex`` in `transitions`, or when
/// that is nil the alert's latest transition.
public struct AlertChange: Sendable {
    public struct PlannedNotification: Sendable {
        public var transitionIndex: Int?
        public var notification: AlertNotification
        /// The receivers of this notification when not the change's ``AlertChange/receivers`` (a rule whose receivers
        /// changed while its alert fired tells the ones dropped and the ones added different things).
        public var receivers: [String]?

        public init(transitionIndex: Int?, notification: AlertNotification, receivers: [String]? = nil) {
            self.transitionIndex = transitionIndex
            self.notification = notification
            self.receivers = receivers
        }
    }

    public var record: AlertRecord
    public var transitions: [AlertTransitionRecord]
    public var notifications: [PlannedNotification]
    public var receivers: [String]
    /// Marks every earlier transition of the alert notified (a late report covers them).
    public var markAllNotified: Bool

    public init(
        record: AlertRecord, transitions: [AlertTransitionRecord] = [], notifications: [PlannedNotification] = [], receivers: [String] = [],
        markAllNotified: Bool = false
    ) {
        self.record = record
        self.transitions = transitions
        self.notifications = notifications
        self.receivers = receivers
        self.markAllNotified = markAllNotified
    }
}

/// A silence: alerts whose labels match every matcher (a glob per label) send no notification until `endsAt`.
public struct AlertSilence: Sendable, Hashable, Codable {
    public var id: Int64
    public var matchers: [String: String]
    public var startsAt: Timestamp
    public var endsAt: Timestamp
    public var createdBy: String
    public var comment: String

    public init(id: Int64 = 0, matchers: [String: String], startsAt: Timestamp, endsAt: Timestamp, createdBy: String, comment: String) {
        self.id = id
        self.matchers = matchers
        self.startsAt = startsAt
        self.endsAt = endsAt
        self.createdBy = createdBy
        self.comment = comment
    }

    enum CodingKeys: String, CodingKey {
        case id, matchers, comment
        case startsAt = "starts_at"
        case endsAt = "ends_at"
        case createdBy = "created_by"
    }

    /// Whether it silences an alert with `labels` at `time`.
    public func silences(_ labels: [String: String], at time: Timestamp) -> Bool {
        guard startsAt <= time, time < endsAt else { return false }
        return matchers.allSatisfy { key, pattern in Glob.matches(pattern, labels[key] ?? "") }
    }
}

/// Per device: how many evaluations of its readings were written, and the newest reading time they judged.
///
/// An alert's `version` checks writes to alerts that exist. An evaluation that decides to write nothing (no alert yet,
/// the condition does not hold) has no row to check, so on its own it could not see that another instance fired an
/// alert from an older reading of the same device meanwhile, and the alert would stay firing after the newer reading.
/// So every evaluation of a device's readings advances the device's cursor, from the version it read before it read
/// the alerts, in the transaction of its changes (or alone): of two engines evaluating one device at once, the second
/// to commit finds the version moved, writes nothing (``AlertStoreConflict``), reads the alerts again and judges its
/// readings against them, readings older than `newest` as out of order (the replay of late reports puts them in time
/// order). Evaluations of one device are thus serialised across instances, and each transition recorded once.
public struct AlertEvaluationCursor: Sendable, Hashable {
    public var version: Int64
    /// The newest reading time of the device that an evaluation judged (nil: none).
    public var newest: Timestamp?

    public init(version: Int64 = 0, newest: Timestamp? = nil) {
        self.version = version
        self.newest = newest
    }
}

/// The cursor move that goes with an evaluation's changes: from `expectedVersion` (as read) to the next, `newest` the
/// newest reading time the evaluation judged (the stored time keeps the larger).
public struct AlertCursorAdvance: Sendable, Hashable {
    public var deviceRowID: Int64
    public var expectedVersion: Int64
    public var newest: Timestamp

    public init(deviceRowID: Int64, expectedVersion: Int64, newest: Timestamp) {
        self.deviceRowID = deviceRowID
        self.expectedVersion = expectedVersion
        self.newest = newest
    }
}

public struct AlertDeviceProgress: Sendable, Hashable {
    public var device: DeviceIdentity
    public var watermark: UInt64?
    public var highest: UInt64?

    public init(device: DeviceIdentity, watermark: UInt64?, highest: UInt64?) {
        self.device = device
        self.watermark = watermark
        self.highest = highest
    }
}

public struct AlertSensor: Sendable, Hashable {
    public var deviceRowID: Int64
    public var device: String
    public var sensorRowID: Int64
    public var sensor: String
    public var quantity: Quantity
    public var firstSeen: Timestamp
    public var newestReading: Timestamp?

    public init(deviceRowID: Int64, device: String, sensorRowID: Int64, sensor: String, quantity: Quantity, firstSeen: Timestamp, newestReading: Timestamp?) {
        self.deviceRowID = deviceRowID
        self.device = device
        self.sensorRowID = sensorRowID
        self.sensor = sensor
        self.quantity = quantity
        self.firstSeen = firstSeen
        self.newestReading = newestReading
    }
}

public struct AlertOutboxRow: Sendable, Hashable {
    public var id: Int64
    public var receiverID: Int64
    public var receiver: String
    public var alertID: Int64
    public var transitionID: Int64
    public var idempotencyKey: String
    public var state: String
    public var payload: String
    /// How many firing or resolved transitions the row tells (more than 1 once notifications were merged into it).
    public var transitions: Int

    public init(
        id: Int64, receiverID: Int64, receiver: String, alertID: Int64, transitionID: Int64, idempotencyKey: String, state: String, payload: String,
        transitions: Int = 1
    ) {
        self.transitions = transitions
        self.id = id
        self.receiverID = receiverID
        self.receiver = receiver
        self.alertID = alertID
        self.transitionID = transitionID
        self.idempotencyKey = idempotencyKey
        self.state = state
        self.payload = payload
    }
}

extension AlertStore {
    /// The whole history of the given alerts, by time then id.
    func alertTransitions(alertIDs: [Int64]) async throws -> [AlertTransitionRecord] {
        try await alertTransitions(alertIDs: alertIDs, newestPerAlert: nil)
    }
}
