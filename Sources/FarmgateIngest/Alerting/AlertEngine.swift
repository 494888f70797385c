import FarmgateSupport
import Foundation
public import FarmgateWire
public import Logging
import Metrics
public import ServiceLifecycle
import Synchronization

/// Evaluates alert rules off the request path and writes every state change, its history and its notifications in one
/// transaction (``AlertStore/applyAlertChanges(_:now:)``).
///
/// **Feed and record.** The engine is a ``CommitObserver``: ``committed(_:)`` puts the batch in a bounded queue and
/// returns at once, so that an upload never waits for evaluation. The queue is a fast path, not the record: readings
/// are committed before the engine sees them, so the engine keeps a durable watermark per device (the highest sequence
/// it evaluated, saved every tick) and, at start and whenever the queue overflowed or a write failed, reads what lies
/// above it back from the store (``catchUp()``). A process that dies between a commit and its evaluation loses no
/// transition: the next start evaluates those readings.
///
/// **Reading time.** Reading-driven rules (above, below, rate of change, sensor fault, out of range) are evaluated in
/// the order of reading timestamps per series (a rule on one sensor), and `for` is measured between reading
/// timestamps. No-data, device-offline and calibration-overdue rules run on the engine's timer against the wall clock.
///
/// **After an outage.** A reading is *late* when it arrives more than ``Settings/lateAfter`` after it was taken (a
/// backlog). Transitions caused by late readings are kept in the history at once but not notified one by one; a reading
/// older than the newest one its series already evaluated (the agent sends the newest batch of a backlog first) is not
/// evaluated in place. Either way the alert is given a late report, due once its backlog has been quiet for
/// ``Settings/lateQuiet``: the engine replays the reported stretch from the store on through the newest reading already
/// judged, keeps the transitions it finds, gives the alert the state the replay ends in, and writes ONE notification per
/// alert (`late: true`, the newest 20 transitions, a description such as "tank1.ph below 5.5 from 03:12 to 05:40,
/// reported late", or a count, span and the newest episode beyond 5). A condition that began and ended inside the
/// backlog is reported that way, as resolved at the reading that ended it, never as firing; one that still holds makes
/// the alert firing. Nothing is notified for a backlog in which the condition never fired, unless it resolved an alert
/// whose firing was notified before it (a late resolved notification). A reading out of order that
/// is not late (seconds behind a newer one) takes the same replay at once, right after its batch is written, and is
/// notified as it happened, not as late.
///
/// **Series memory.** A rate-of-change rule needs the readings of its window, a sensor-fault rule the run of flagged
/// readings before the one at hand. The engine keeps both in memory while it evaluates a device's batches one after
/// another (a batch whose lowest sequence follows the last one it evaluated); before any other batch (the first after a
/// start, one after readings another instance evaluated, a gap) it derives them again from the stored readings before
/// the batch's first (``memories(of:sensorRowID:before:store:)``). So a restart, or a device whose uploads alternate
/// between instances, fires at the same reading as one engine that saw everything; the late-report replay starts from
/// the same derivation.
///
/// **Silences and acknowledgements.** An alert whose labels a silence matches still changes state and keeps its
/// history (the transitions are marked `silenced`), but no notification is written for it: nothing reaches the outbox,
/// so nothing is sent when the silence ends. Acknowledging records who and when; it is cleared when the alert fires
/// again.
///
/// **Several instances** (PostgreSQL): each evaluates the batches it received, from the alert rows as stored. Every
/// evaluation of a device's readings moves the device's evaluation cursor (``AlertEvaluationCursor``) from the version
/// read before the alerts, in the transaction of its changes; a write that finds the cursor or an alert changed by
/// another instance is refused as a whole (``AlertStoreConflict``), and the engine reads the alerts again and evaluates
/// once more, readings older than the newest the other instance judged as out of order (replayed in time order). So
/// one device's batches are judged one evaluation at a time across instances, each transition recorded, and notified,
/// once, and a decision that writes no alert (the condition does not hold, no alert yet) is checked too.
public actor AlertEngine: CommitObserver, Service {
    /// How many of a sensor's newest calibration events a calibration-overdue rule looks through for one the circuit
    /// kept (``CalibrationEvent/keptByCircuit``).
    static let calibrationLookback = 20

    public struct Settings: Sendable, Hashable {
        /// How often timer rules (no data, device offline), late reports, rule reloads and watermark saves run.
        public var tick: Duration
        /// A reading taken longer than this before it arrived is late (part of a backlog).
        public var lateAfter: Duration
        /// A late report is written once its alert's backlog has been quiet this long.
        public var lateQuiet: Duration
        /// Batches waiting for evaluation; beyond it the engine catches up from the store instead.
        public var queueLimit: Int
        /// How often calibration-overdue rules ask the store.
        public var calibrationInterval: Duration

        /// - Parameters: every default documented: tick 5 s, late after 5 min, late quiet 30 s, queue 1,000 batches,
        ///   calibrations every 5 min. `[alerting]` in `ingest.toml` sets them (``IngestConfiguration/alerting``).
        public init(
            tick: Duration = .seconds(5), lateAfter: Duration = .seconds(300), lateQuiet: Duration = .seconds(30), queueLimit: Int = 1_000,
            calibrationInterval: Duration = .seconds(300)
        ) {
            self.tick = tick
            self.lateAfter = lateAfter
            self.lateQuiet = lateQuiet
            self.queueLimit = queueLimit
            self.calibrationInterval = calibrationInterval
        }
    }

    private struct SeriesKey: Hashable {
        var farmID: Int64
        var rule: String
        var deviceRowID: Int64
        var sensorRowID: Int64
    }

    /// A farm's reading-driven rules, indexed once per change of its rules: a sensor is matched against them once (its
    /// ``SensorSeries`` keeps the positions of the rules that select it), and a stored alert finds its rule by name.
    private struct ReadingRules {
        var rules: [AlertRule]
        /// Aligned with `rules`: what the loop over readings needs.
        var conditions: [AlertCondition]
        var position: [String: Int]

        init(_ all: [AlertRule]) {
            rules = all.filter(\.kind.isReadingDriven)
            conditions = rules.map(AlertCondition.init)
            position = Dictionary(rules.enumerated().map { ($1.name, $0) }, uniquingKeysWith: { first, _ in first })
        }
    }

    /// What the engine keeps per sensor for its reading-driven rules: which rules select it, and each one's memory.
    private struct SensorSeries {
        /// Positions in the farm's ``ReadingRules/rules``, ascending (the walk beside the stored alerts relies on it).
        var rules: [Int]
        /// Aligned with `rules`.
        var memories: [SeriesMemory]
        /// The device epoch the memories are current for (nil: never derived). See ``deviceEpoch``.
        var epoch: UInt64?
    }

    /// A late report names each episode up to this many; beyond, it counts them and names the newest.
    static let lateEpisodesTold = 5

    private let store: any IngestStore & AlertStore
    private let settings: Settings
    private let logger: Logger
    private let now: @Sendable () -> Timestamp
    /// Called after a write that put rows in the outbox: `serve` wakes this instance's delivery workers with it.
    private let notificationsWritten: (@Sendable () -> Void)?
    private nonisolated let queue: AsyncStream<CommittedBatch>
    private nonisolated let continuation: AsyncStream<CommittedBatch>.Continuation
    private nonisolated let mustCatchUp = Atomic<Bool>(true)
    /// Per device: the lowest sequence of a batch the full queue dropped (merged into ``failedFrom`` by the engine).
    private nonisolated let dropped = Mutex<[Int64: UInt64]>([:])

    private var rulesByFarm: [Int64: [AlertRule]] = [:]
    private var readingRules: [Int64: ReadingRules] = [:]
    private var farmNames: [Int64: String] = [:]
    private var silencesByFarm: [Int64: [AlertSilence]] = [:]
    /// Per sensor row: its reading-driven rules and their memories; cleared whenever the rules change.
    private var series: [Int64: SensorSeries] = [:]
    /// Per sensor row: the newest reading timestamp evaluated in order (older readings wait for a late report).
    private var lastEvaluated: [Int64: Timestamp] = [:]
    /// Per device: the highest sequence of the last batch this engine evaluated. A batch that starts right after it
    /// holds the device's next readings, so every memory is current; any other batch (the first after a start, one
    /// after readings that another instance evaluated, a gap) raises the device's epoch, and each sensor's memories
    /// are derived again from the stored readings before they are used.
    private var evaluatedThrough: [Int64: UInt64] = [:]
    private var deviceEpoch: [Int64: UInt64] = [:]
    /// Per device: the version its evaluation cursor took with this engine's last write (``AlertEvaluationCursor``).
    /// Another version when it is read next means another engine evaluated readings of the device in between.
    private var cursorVersions: [Int64: Int64] = [:]
    /// Per device: the highest sequence evaluated, and whether it changed since the last save.
    private var watermarks: [Int64: UInt64] = [:]
    private var dirtyWatermarks: Set<Int64> = []
    /// Per device: the highest sequence a catch-up read; the feed skips readings at or below it (already evaluated).
    private var scannedThrough: [Int64: UInt64] = [:]
    private var lastCalibrationCheck: Timestamp?
    /// Set when a batch held readings out of order but not late: their re-evaluation is due at once, after the write.
    private var reorderedDue = false
    /// Whether rules were read from the store once (the first read compares against nothing).
    private var loadedOnce = false
    /// ``AlertStore/alertConfigurationStamp()`` as of the last load of rules and silences.
    private var configurationStamp: String?
    /// When the last check of that stamp started: batches committed before it need no check of their own (under load,
    /// one query covers the whole queue instead of one per batch).
    private var stampCheckedFrom: ContinuousClock.Instant?
    /// When this engine started: no-data and offline rules count silence from here at the earliest.
    private var startedAt: Timestamp
    /// Per device: the lowest sequence whose evaluation failed; the watermark stays below it until a catch-up succeeds.
    private var failedFrom: [Int64: UInt64] = [:]
    /// The devices a catch-up is reading back now: their batches from the queue wait for the next one.
    private var catchingUp: Set<Int64> = []

    private let transitionsCounter = Counter(label: "farmgate_ingest_alert_transitions_total")
    private let notificationsCounter = Counter(label: "farmgate_ingest_alert_notifications_total")
    /// Notifications merged into a receiver's row not sent yet instead of written as a row of their own (per receiver).
    private let coalescedCounter = Counter(label: "farmgate_ingest_notifications_coalesced_total")
    private let droppedCounter = Counter(label: "farmgate_ingest_alert_queue_overflows_total")
    private let errorsCounter = Counter(label: "farmgate_ingest_alert_evaluation_errors_total")
    private let derivedCounter = Counter(label: "farmgate_ingest_alert_memories_derived_total")

    /// - Parameters:
    ///   - notificationsWritten: called (outside any transaction) after each write that added outbox rows, so that
    ///     delivery starts at once instead of at the next poll (`serve` passes ``NotificationDelivery/wake()``).
    public init(
        store: any IngestStore & AlertStore, settings: Settings = Settings(), logger: Logger, now: @escaping @Sendable () -> Timestamp = { .now() },
        notificationsWritten: (@Sendable () -> Void)? = nil
    ) {
        self.store = store
        self.settings = settings
        self.logger = logger
        self.now = now
        self.notificationsWritten = notificationsWritten
        startedAt = now()
        (queue, continuation) = AsyncStream.makeStream(of: CommittedBatch.self, bufferingPolicy: .bufferingOldest(max(1, settings.queueLimit)))
    }

    // MARK: The feed

    public nonisolated func committed(_ batch: CommittedBatch) {
        if case .dropped = continuation.yield(batch) {
            // Nothing is lost: the readings are stored, and the next tick reads them back above the watermark, which
            // stays below them until then.
            if let lowest = batch.readings.map(\.sequence).min() {
                dropped.withLock { $0[batch.device.rowID] = min($0[batch.device.rowID] ?? lowest, lowest) }
            }
            mustCatchUp.store(true, ordering: .relaxed)
            droppedCounter.increment()
        }
    }

    /// Evaluates until the group shuts down: catches up first, then takes batches from the queue and runs the timer.
    /// On shutdown the queue is drained and the watermarks saved.
    public func run() async throws {
        startedAt = now()
        await reload()
        // Before the queue: readings committed while no engine ran are evaluated first, in sequence order.
        mustCatchUp.store(false, ordering: .relaxed)
        await catchUp()
        await withTaskGroup(of: Void.self) { group in
            // The consumer ends when the queue is finished and empty: every batch handed over before the stop is evaluated.
            group.addTask {
                for await batch in self.queue { await self.evaluate(batch) }
            }
            await withTaskGroup(of: Void.self) { timer in
                timer.addTask {
                    while !Task.isCancelled {
                        await self.tick()
                        do { try await Task.sleep(for: self.settings.tick) } catch { return }
                    }
                }
                try? await gracefulShutdown()
                timer.cancelAll()
            }
            continuation.finish()
            await group.waitForAll()
        }
        await saveWatermarks()
    }

    /// One round of the timer: rules and silences reloaded, a catch-up when needed, timer rules, due late reports,
    /// watermarks saved. `serve` runs it every ``Settings/tick``; tests call it directly.
    public func tick() async {
        await reload()
        if mustCatchUp.exchange(false, ordering: .relaxed) { await catchUp() }
        await evaluateTimerRules()
        await fireHeldStates()
        await writeLateReports()
        await saveWatermarks()
    }

    /// Reads every device's readings above its watermark back from the store and evaluates them (after a restart, a
    /// full queue, a failed write).
    public func catchUp() async {
        mergeDropped()
        do {
            for progress in try await store.alertProgress() {
                let device = progress.device.rowID
                var after = [progress.watermark, watermarks[device]].compactMap { $0 }.max()
                if let failure = failedFrom.removeValue(forKey: device) {
                    after = failure == 0 ? nil : min(after ?? failure - 1, failure - 1)
                }
                guard let highest = progress.highest, after.map({ $0 < highest }) ?? true else { continue }
                catchingUp.insert(device)
                defer { catchingUp.remove(device) }
                while true {
                    let page = try await store.alertCatchUpReadings(device: progress.device, afterSequence: after, limit: 5_000)
                    guard let last = page.last else { break }
                    scannedThrough[device] = max(scannedThrough[device] ?? 0, last.sequence)
                    await evaluate(CommittedBatch(device: progress.device, receivedAt: now(), readings: page), fromCatchUp: true)
                    after = last.sequence
                    if page.count < 5_000 { break }
                }
            }
        } catch {
            errorsCounter.increment()
            mustCatchUp.store(true, ordering: .relaxed)
            logger.storeFailure("alert engine cannot catch up from the store; trying again at the next tick", error: error)
        }
    }

    /// Reloads rules and silences when the store's ``AlertStore/alertConfigurationStamp()`` moved since the last load:
    /// one small query for every batch committed after the last such query started (so one for a whole queue under load),
    /// so that a rule or silence acknowledged (by the CLI, the API or another instance) before a batch was stored applies
    /// to that batch and to the notifications written for it, not only after the next tick.
    private func reloadIfChanged() async {
        let started = ContinuousClock.now
        do {
            let stamp = try await store.alertConfigurationStamp()
            if stamp != configurationStamp {
                await reload()
            } else {
                stampCheckedFrom = max(stampCheckedFrom ?? started, started)
            }
        } catch {
            errorsCounter.increment()
            logger.storeFailure("alert engine cannot check whether rules changed; keeping the ones it has", error: error)
        }
    }

    /// Reloads rules and silences from the store (rules added by another instance or the CLI count within a tick).
    public func reload() async {
        do {
            // Read first: a change written while the rules are read shows as a stamp that moved at the next check.
            let started = ContinuousClock.now
            let stamp = try await store.alertConfigurationStamp()
            var rules: [Int64: [AlertRule]] = [:]
            var written: [Int64: [String: Timestamp]] = [:]
            for stored in try await store.alertRules(farmID: nil) {
                rules[stored.farmID, default: []].append(stored.rule)
                written[stored.farmID, default: [:]][stored.rule.name] = stored.updatedAt
                farmNames[stored.farmID] = stored.farm
            }
            let previous = rulesByFarm
            let changed = rules != rulesByFarm
            if changed {
                // Rules changed: sensors are matched again, and memories derived again under the new rules.
                series = [:]
                readingRules = rules.mapValues(ReadingRules.init)
            }
            rulesByFarm = rules
            var silences: [Int64: [AlertSilence]] = [:]
            for farm in rules.keys { silences[farm] = try await store.alertSilences(farmID: farm, endingAfter: now()) }
            silencesByFarm = silences
            if changed { await settleRuleChanges(from: previous, to: rules, written: written, first: !loadedOnce) }
            loadedOnce = true
            configurationStamp = stamp
            stampCheckedFrom = max(stampCheckedFrom ?? started, started)
        } catch {
            errorsCounter.increment()
            logger.storeFailure("alert engine cannot read rules from the store; keeping the ones it has", error: error)
        }
    }

    /// Ends the alerts of removed rules and hands firing alerts over when a rule's receivers change, so that every
    /// receiver that was told an alert fired is told it ended, and none is told of an end it never saw begin:
    /// - a rule removed: its firing alerts resolve now ("the rule was removed"), notified to the receivers the rule had
    ///   (on the first read after a start, when the engine never saw the rule, to the receivers its alert was
    ///   notified to); its pending alerts go back to inactive. A rule added again under the name starts afresh.
    /// - a rule replaced so that it no longer selects an alert's sensor or device (a narrower `device`/`sensor` glob,
    ///   another quantity, a kind of the other level): that alert ends as for a removed rule ("no longer selects").
    /// - a rule's receivers changed while an alert of it fires: the receivers dropped get a resolved notification
    ///   saying they are no longer notified of it; those added get a firing one (the alert as it stands); from then on
    ///   every transition goes to the rule's receivers.
    /// Each is written with the alert's version, so of several instances that see the change, one writes it.
    /// The hand-over notifications carry the rule's stored `updatedAt` as their `reportedAt`, so their idempotency keys
    /// are the same on every instance that sees the change: a second instance's copy is not written again.
    private func settleRuleChanges(
        from previous: [Int64: [AlertRule]], to current: [Int64: [AlertRule]], written: [Int64: [String: Timestamp]], first: Bool
    ) async {
        let at = now()
        for farmID in Set(previous.keys).union(current.keys) {
            let old = Dictionary((previous[farmID] ?? []).map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
            let new = Dictionary((current[farmID] ?? []).map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
            guard first || old != new else { continue }
            do {
                let records = try await store.alertRecords(farmID: farmID, changedSince: Timestamp(microseconds: Int64.min), limit: 1_000_000)
                var outbox: [AlertOutboxRow]?
                // To judge whether a changed rule still selects each active alert's sensor (read only when one is active).
                let sensors: [Int64: AlertSensor] = records.contains(where: \.state.isActive)
                    ? Dictionary(try await store.alertSensors(farmID: farmID).map { ($0.sensorRowID, $0) }, uniquingKeysWith: { first, _ in first }) : [:]
                var changes: [AlertChange] = []
                for original in records where original.state.isActive {
                    var record = original
                    let farm = farmNames[farmID] ?? ""
                    if let rule = new[record.rule], Self.selects(rule, record, sensors: sensors) {
                        // Still there: hand a firing alert over when its receivers changed.
                        guard record.state == .firing, let before = old[record.rule], before.receivers != rule.receivers else { continue }
                        let dropped = before.receivers.filter { !rule.receivers.contains($0) }
                        let added = rule.receivers.filter { !before.receivers.contains($0) }
                        guard !dropped.isEmpty || !added.isEmpty else { continue }
                        var change = AlertChange(record: record)
                        let changedAt = written[farmID]?[rule.name] ?? at
                        if !isSilenced(labels(rule, farm: farm, record: record), farmID: farmID, at: at) {
                            var ended = notification(
                                rule, farm: farm, record: record, status: .resolved, transitions: [], late: false,
                                description: "No longer notified to this receiver: the rule's receivers changed while the alert fired (it still fires).",
                                value: record.value, quantity: nil)
                            ended.endsAt = at
                            ended.reportedAt = changedAt
                            var told = notification(
                                rule, farm: farm, record: record, status: .firing, transitions: [], late: false,
                                description: "Notified to this receiver from now on: the rule's receivers changed while the alert fired.",
                                value: record.value, quantity: nil)
                            told.reportedAt = changedAt
                            if !dropped.isEmpty { change.notifications.append(.init(transitionIndex: nil, notification: ended, receivers: dropped)) }
                            if !added.isEmpty { change.notifications.append(.init(transitionIndex: nil, notification: told, receivers: added)) }
                        }
                        changes.append(change)
                        continue
                    }
                    // The rule is gone, or changed so that it no longer selects the alert's sensor (or device): the
                    // alert ends now, as for a removed rule (nothing would ever judge it again).
                    let from = record.state
                    record.state = from == .firing ? .resolved : .inactive
                    record.pendingSince = nil
                    record.lateFrom = nil
                    record.lateTo = nil
                    record.lateDue = nil
                    if from == .firing { record.endsAt = at }
                    var change = AlertChange(
                        record: record, transitions: [AlertTransitionRecord(from: from, to: record.state, at: at, value: nil, notified: true, recordedAt: at)])
                    let description = new[record.rule] == nil
                        ? "Resolved because its rule \(record.rule) was removed."
                        : "Resolved because its rule \(record.rule) changed and no longer selects this \(record.sensorRowID == 0 ? "device" : "sensor")."
                    if from == .firing, let gone = old[record.rule] {
                        if isSilenced(labels(gone, farm: farm, record: record), farmID: farmID, at: at) {
                            change.transitions[0].silenced = true
                        } else {
                            let ended = notification(
                                gone, farm: farm, record: record, status: .resolved, transitions: change.transitions, late: false, description: description,
                                value: record.value, quantity: nil, at: change.transitions[0])
                            change.notifications = [.init(transitionIndex: 0, notification: ended)]
                            change.receivers = gone.receivers
                        }
                    } else if from == .firing {
                        // Removed before this engine read it (while the ingest was down): the receivers and words of the
                        // alert's newest notification.
                        if outbox == nil { outbox = try await store.alertOutbox(farmID: farmID) }
                        let rows = (outbox ?? []).filter { $0.alertID == record.id }
                        if let newest = rows.last, var ended = try? JSONDecoder().decode(AlertNotification.self, from: Data(newest.payload.utf8)) {
                            ended.status = .resolved
                            ended.endsAt = at
                            ended.startsAt = record.startsAt ?? ended.startsAt
                            ended.late = false
                            ended.description = description
                            ended.transitions = [AlertNotification.Transition(state: AlertState.resolved.rawValue, at: at)]
                            ended.coalesced = nil
                            ended.reportedAt = nil
                            change.notifications = [.init(transitionIndex: 0, notification: ended)]
                            change.receivers = rows.map(\.receiver).reduce(into: [String]()) { if !$0.contains($1) { $0.append($1) } }
                        }
                    }
                    countTransitions(change.transitions)
                    changes.append(change)
                }
                for change in changes {
                    do { try await apply([change]) } catch is AlertStoreConflict { continue }  // another instance settled it
                }
                if !changes.isEmpty {
                    logger.info("alert rules changed: alerts of removed or narrowed rules ended, receiver changes handed over", metadata: ["farm": "\(farmNames[farmID] ?? String(farmID))", "alerts": "\(changes.count)"])
                }
            } catch {
                errorsCounter.increment()
                logger.storeFailure("alert engine cannot settle the alerts of changed rules", error: error, metadata: ["farm": "\(farmNames[farmID] ?? String(farmID))"])
            }
        }
    }

    /// Whether `rule` still selects `record`'s sensor (or device): a rule replaced with a narrower `device`/`sensor`
    /// glob, another quantity or a kind of the other level (device offline against the others) no longer does.
    private static func selects(_ rule: AlertRule, _ record: AlertRecord, sensors: [Int64: AlertSensor]) -> Bool {
        guard rule.kind == .deviceOffline else {
            guard record.sensorRowID != 0 else { return false }
            if let sensor = sensors[record.sensorRowID] {
                return rule.matches(device: sensor.device, sensor: sensor.sensor, quantity: sensor.quantity)
            }
            // A sensor the store no longer lists (its device revoked): judged by its names.
            return Glob.matches(rule.device, record.device ?? "") && Glob.matches(rule.sensor, record.sensor ?? "")
        }
        return record.sensorRowID == 0 && Glob.matches(rule.device, record.device ?? "")
    }

    // MARK: Reading-driven rules

    /// Evaluates one committed batch (the queue's consumer; tests call it directly).
    public func evaluate(_ batch: CommittedBatch) async {
        await evaluate(batch, fromCatchUp: false)
    }

    private func evaluate(_ batch: CommittedBatch, fromCatchUp: Bool) async {
        mergeDropped()
        // A device with readings waiting for a catch-up (batches the full queue dropped, an evaluation that failed) or
        // being caught up now: its later batches wait for the catch-up too, which reads them back with the rest, in
        // sequence order. Judged from the queue meanwhile, a batch was judged without the readings before it: an alert
        // all of whose earlier transitions were dropped started again from inactive ("resolved", then "inactive →
        // pending"), or resolved at the wrong reading, and the catch-up's replay could not take those transitions back
        // (a tester, 2026-12-07, with `queue_limit` exceeded). So the batch goes the way of a dropped one.
        if !fromCatchUp, failedFrom[batch.device.rowID] != nil || catchingUp.contains(batch.device.rowID),
            let lowest = batch.readings.map(\.sequence).min()
        {
            watermarksHold(device: batch.device.rowID, below: lowest)
            mustCatchUp.store(true, ordering: .relaxed)
            return
        }
        if let checked = stampCheckedFrom, checked >= batch.committedAt {
            // A check that started after this batch's commit saw the rules and silences it must be judged by.
        } else {
            await reloadIfChanged()
        }
        let device = batch.device
        var readings = batch.readings
        if !fromCatchUp, let scanned = scannedThrough[device.rowID] { readings.removeAll { $0.sequence <= scanned } }
        guard var top = readings.first?.sequence, var lowest = readings.first?.sequence else { return }
        for reading in readings {
            top = max(top, reading.sequence)
            lowest = min(lowest, reading.sequence)
        }
        // Readings of the device this engine did not evaluate may lie between its last batch and this one: every
        // memory of the device's series is derived again before it is used.
        var followsOn = evaluatedThrough[device.rowID].map { $0 &+ 1 == lowest } ?? false
        if !followsOn { deviceEpoch[device.rowID, default: 0] &+= 1 }
        var epoch = deviceEpoch[device.rowID] ?? 0
        var evaluated = false
        defer {
            if evaluated {
                evaluatedThrough[device.rowID] = top
                var saved = top
                if let failure = failedFrom[device.rowID] { saved = min(saved, failure > 0 ? failure - 1 : 0) }
                if saved > (watermarks[device.rowID] ?? 0) || watermarks[device.rowID] == nil, failedFrom[device.rowID] != 0 {
                    watermarks[device.rowID] = max(watermarks[device.rowID] ?? 0, saved)
                    dirtyWatermarks.insert(device.rowID)
                }
            }
        }
        guard let farmRules = readingRules[device.farmID], !farmRules.rules.isEmpty else {
            evaluated = true
            return
        }
        // Per sensor: its readings in time order and the rules that select it (matched once per sensor and rule set).
        var bySensor: [Int64: [CommittedReading]] = [:]
        for reading in readings { bySensor[reading.sensorRowID, default: []].append(reading) }
        var work: [(sensor: Int64, readings: [CommittedReading])] = []
        work.reserveCapacity(bySensor.count)
        for (sensor, var sensorReadings) in bySensor {
            guard let first = sensorReadings.first else { continue }
            if series[sensor] == nil {
                let matched = farmRules.rules.indices.filter {
                    farmRules.rules[$0].matches(device: device.device.rawValue, sensor: first.sensor.rawValue, quantity: first.quantity)
                }
                series[sensor] = SensorSeries(rules: matched, memories: Array(repeating: SeriesMemory(), count: matched.count), epoch: nil)
            }
            guard series[sensor]?.rules.isEmpty == false else { continue }
            sensorReadings.sort { ($0.timestamp, $0.sequence) < ($1.timestamp, $1.sequence) }
            work.append((sensor, sensorReadings))
        }
        guard !work.isEmpty else {
            evaluated = true
            return
        }
        // A failed write leaves the memories of this batch's sensors ahead of what was recorded: they are derived again
        // from the store (no copy is kept: one per batch would cost a copy of every window it touches).
        let savedNewest = work.map { lastEvaluated[$0.sensor] }
        func restore() {
            for (index, item) in work.enumerated() {
                series[item.sensor]?.epoch = nil
                lastEvaluated[item.sensor] = savedNewest[index]
            }
        }
        let newest = work.compactMap { $0.readings.last?.timestamp }.max() ?? batch.receivedAt
        for attempt in 1...3 {
            do {
                // Read before the alerts: a write by another engine after this read moves the version, and this
                // evaluation's write then fails and is made again from what that engine wrote.
                let cursor = try await store.alertEvaluationCursor(deviceRowID: device.rowID)
                // An engine that has not written this device's cursor yet (just started, or the device is new to it)
                // takes any version but 0 as another's: that engine may have judged newer readings without writing an
                // alert (no alert yet, condition false), and this batch's older readings must then be replayed in order.
                if attempt > 1 || cursorVersions[device.rowID].map({ $0 != cursor.version }) ?? (cursor.version != 0) {
                    // Another engine evaluated readings of this device since this one last did: every memory is derived
                    // again, and readings older than the newest it judged are out of order (replayed in time order).
                    followsOn = false
                    deviceEpoch[device.rowID, default: 0] &+= 1
                    epoch = deviceEpoch[device.rowID] ?? 0
                    if let judged = cursor.newest {
                        for item in work {
                            // The cursor is the device's: its newest judged reading may be another sensor's. Readings
                            // of this sensor are out of order only if another batch stored one of its readings between
                            // them and that time (one that engine may have judged); a sensor new to the device has none.
                            if let first = item.readings.first?.timestamp, first <= judged,
                                try await !Self.othersStored(of: item.readings, sensorRowID: item.sensor, from: first, through: judged, store: store)
                            {
                                continue
                            }
                            lastEvaluated[item.sensor] = max(lastEvaluated[item.sensor] ?? judged, judged)
                        }
                    }
                }
                for item in work where series[item.sensor]?.epoch != epoch {
                    try await deriveMemories(sensor: item.sensor, farm: farmRules, before: item.readings, epoch: epoch)
                }
                var records: [Int64: [(position: Int, record: AlertRecord)]] = [:]
                for record in try await store.alertRecords(deviceRowID: device.rowID) where record.sensorRowID != 0 {
                    guard let position = farmRules.position[record.rule] else { continue }
                    records[record.sensorRowID, default: []].append((position, record))
                }
                let current = now()
                var changes: [AlertChange] = []
                for item in work {
                    evaluate(sensor: item.sensor, item.readings, farm: farmRules, device: device, receivedAt: batch.receivedAt, followsOn: followsOn, now: current,
                             records: records[item.sensor] ?? [], into: &changes)
                }
                try await dropResolutionsNeverAnnounced(&changes)
                try await apply(
                    changes, durability: .withNextSyncedCommit,
                    cursor: AlertCursorAdvance(deviceRowID: device.rowID, expectedVersion: cursor.version, newest: newest))
                cursorVersions[device.rowID] = cursor.version + 1
                evaluated = true
                if reorderedDue {
                    reorderedDue = false
                    await writeLateReports()
                }
                return
            } catch let conflict as AlertStoreConflict {
                restore()
                logger.debug("alert changed by another writer; evaluating again", metadata: ["alert": "\(conflict.alert)", "attempt": "\(attempt)"])
            } catch {
                restore()
                errorsCounter.increment()
                mustCatchUp.store(true, ordering: .relaxed)
                logger.storeFailure("alert engine cannot write alert state; the readings are evaluated again from the store", error: error)
                watermarksHold(device: device.rowID, below: lowest)
                return
            }
        }
        mustCatchUp.store(true, ordering: .relaxed)
        watermarksHold(device: device.rowID, below: lowest)
    }

    /// Whether a reading of the sensor from another batch than `readings` (the sensor's readings in this one, in time
    /// order) is stored with `from <= timestamp <= through`.
    private static func othersStored(
        of readings: [CommittedReading], sensorRowID: Int64, from: Timestamp, through: Timestamp, store: any IngestStore & AlertStore
    ) async throws -> Bool {
        let mine = Set(readings.map(\.sequence))
        // One more than this batch can hold in the range: a full page holds another batch's reading.
        let found = try await store.readings(
            sensorRowID: sensorRowID, from: from, to: Timestamp(microseconds: through.microseconds + 1), limit: readings.count + 1)
        return found.contains { !mine.contains($0.sequence) }
    }

    /// A receiver is told an alert resolved only when it was told the alert fired, as Alertmanager does: an alert that
    /// fired under a silence and resolves after the silence ended records its resolution (marked silenced) and notifies
    /// nobody. Only resolutions whose firing is not in the same change are looked up (the alert's newest transitions).
    private func dropResolutionsNeverAnnounced(_ changes: inout [AlertChange]) async throws {
        for index in changes.indices where changes[index].record.id != 0 {
            let change = changes[index]
            let unannounced = change.notifications.indices.filter { n in
                guard change.notifications[n].notification.status == .resolved, let at = change.notifications[n].transitionIndex,
                    change.transitions.indices.contains(at)
                else { return false }
                return !change.transitions[..<at].contains { $0.to == .firing }
            }
            guard !unannounced.isEmpty else { continue }
            let history = try await store.alertTransitions(alertIDs: [change.record.id], newestPerAlert: 10)
            guard let fired = history.last(where: { $0.to == .firing }), fired.silenced else { continue }
            for n in unannounced.reversed() {
                if let at = change.notifications[n].transitionIndex { changes[index].transitions[at].silenced = true }
                changes[index].notifications.remove(at: n)
            }
        }
    }

    /// Rebuilds the memories of `sensor`'s rate-of-change and sensor-fault rules as they stand just before the first
    /// of `readings` that will be evaluated, from the readings stored before it.
    private func deriveMemories(sensor: Int64, farm: ReadingRules, before readings: [CommittedReading], epoch: UInt64) async throws {
        guard var entry = series[sensor] else { return }
        entry.epoch = epoch
        let rules = entry.rules.map { farm.rules[$0] }
        guard rules.contains(where: { $0.kind == .rateOfChange || $0.kind == .sensorFault }) else {
            series[sensor] = entry  // nothing to remember across readings
            return
        }
        let newest = lastEvaluated[sensor]
        guard let time = readings.first(where: { reading in newest.map { reading.timestamp > $0 } ?? true })?.timestamp ?? readings.first?.timestamp else { return }
        entry.memories = try await Self.memories(of: rules, sensorRowID: sensor, before: time, store: store)
        series[sensor] = entry
        derivedCounter.increment()
    }

    /// The memory of each of `rules` on one sensor just before `time`, from the readings stored before it: a rate
    /// window holds the sensor's non-faulty readings within the rule's window, a fault run counts the faulty readings
    /// that end at `time` (at most the largest `count`, which decides as well as the whole run would). Used when the
    /// engine has not seen the readings before (a start, another instance, a gap) and by the late-report replay.
    static func memories(of rules: [AlertRule], sensorRowID: Int64, before time: Timestamp, store: any IngestStore & AlertStore) async throws -> [SeriesMemory] {
        var memories = Array(repeating: SeriesMemory(), count: rules.count)
        let longestWindow = rules.compactMap { $0.kind == .rateOfChange ? $0.windowMicroseconds : nil }.max()
        let longestRun = rules.compactMap { $0.kind == .sensorFault ? ($0.count ?? 1) : nil }.max()
        if let longestWindow {
            // Page by page into the windows, which keep only what can still be an extreme: a long window (up to 366
            // days) is never held in memory whole.
            // The next page starts at the last one's final timestamp, not after it (readings of one microsecond may
            // straddle two pages); those already taken at that microsecond are skipped (the order is time, then
            // sequence, so they come first).
            let pageSize = 5_000
            var cursor = Timestamp(microseconds: time.microseconds - longestWindow)
            var takenAtCursor = 0
            while true {
                let fetched = try await store.readings(sensorRowID: sensorRowID, from: cursor, to: time, limit: pageSize + takenAtCursor)
                let page = fetched.dropFirst(min(takenAtCursor, fetched.prefix { $0.timestamp == cursor }.count))
                for (index, rule) in rules.enumerated() where rule.kind == .rateOfChange {
                    let start = time.microseconds - (rule.windowMicroseconds ?? 0)
                    for reading in page where reading.timestamp.microseconds >= start && !reading.quality.contains(.sensorFault) {
                        memories[index].window.append(reading.timestamp.microseconds, reading.value)
                    }
                }
                guard fetched.count == pageSize + takenAtCursor, let last = fetched.last else { break }
                takenAtCursor = last.timestamp == cursor ? takenAtCursor + page.count : page.reversed().prefix { $0.timestamp == last.timestamp }.count
                cursor = last.timestamp
            }
        }
        if let longestRun {
            let run = try await faultRun(sensorRowID: sensorRowID, before: time, upTo: longestRun, store: store)
            for index in rules.indices where rules[index].kind == .sensorFault { memories[index].faultRun = run }
        }
        return memories
    }

    /// How many readings in a row flagged `sensor_fault` end just before `time` (counted up to `limit`): looks back in
    /// spans that double from 10 minutes until a reading without the flag, `limit` flagged ones, or the sensor's first.
    static func faultRun(sensorRowID: Int64, before time: Timestamp, upTo limit: Int, store: any IngestStore & AlertStore) async throws -> Int {
        var run = 0
        var upper = time.microseconds
        var span: Int64 = 600_000_000
        while run < limit {
            let lower = upper - span
            var page: [StoredReading] = []
            var cursor = Timestamp(microseconds: lower)
            while true {
                let part = try await store.readings(sensorRowID: sensorRowID, from: cursor, to: Timestamp(microseconds: upper), limit: 5_000)
                page += part
                guard part.count == 5_000, let last = part.last else { break }
                cursor = Timestamp(microseconds: last.timestamp.microseconds + 1)
            }
            for reading in page.reversed() {
                guard reading.quality.contains(.sensorFault) else { return run }
                run += 1
                if run >= limit { return run }
            }
            if page.isEmpty, try await store.readings(sensorRowID: sensorRowID, from: nil, to: Timestamp(microseconds: lower), limit: 1).isEmpty { return run }
            upper = lower
            span = min(span * 2, 400 * 86_400_000_000)
        }
        return run
    }

    private func mergeDropped() {
        let lost = dropped.withLock { pending in
            defer { pending = [:] }
            return pending
        }
        for (device, sequence) in lost { watermarksHold(device: device, below: sequence) }
    }

    /// Keeps the device's saved watermark below readings whose evaluation failed, so that a catch-up reads them again.
    private func watermarksHold(device: Int64, below sequence: UInt64?) {
        guard let sequence else { return }
        failedFrom[device] = min(failedFrom[device] ?? sequence, sequence)
        scannedThrough[device] = nil
    }

    /// Evaluates every rule of one sensor over its readings (in time order) and appends the alerts that changed.
    private func evaluate(
        sensor: Int64, _ readings: [CommittedReading], farm: ReadingRules, device: DeviceIdentity, receivedAt: Timestamp, followsOn: Bool,
        now current: Timestamp, records: [(position: Int, record: AlertRecord)], into changes: inout [AlertChange]
    ) {
        // Taken out of the map while it changes, so that its arrays are not shared and change in place.
        guard let last = readings.last, var entry = series.removeValue(forKey: sensor) else { return }
        defer { series[sensor] = entry }
        let newestBefore = lastEvaluated[sensor]
        guard var columns = SensorReadings(readings, after: newestBefore) else { return }
        // The sensor's few stored alerts in rule order, walked beside its rules (in rule order too): no lookup, no
        // hashing per rule (a dictionary lookup per rule and sensor was the engine's largest cost after the rules).
        let stored = records.count > 1 ? records.sorted { $0.position < $1.position } : records
        var next = 0
        for (slot, position) in entry.rules.enumerated() {
            while next < stored.count, stored[next].position < position { next += 1 }
            let found = next < stored.count && stored[next].position == position ? next : nil
            // The common case, decided from the batch's summary: no alert, and the condition holds at no reading.
            if found == nil, columns.skips(farm.conditions[position], memory: &entry.memories[slot]) { continue }
            // An alert record (280 bytes) is copied only for the rules evaluated reading by reading.
            evaluate(
                farm.conditions[position], of: farm.rules, at: position, columns, after: newestBefore, memory: &entry.memories[slot],
                record: found.map { stored[$0].record }, sensorRowID: sensor, device: device, receivedAt: receivedAt, followsOn: followsOn, now: current,
                into: &changes)
        }
        lastEvaluated[sensor] = max(newestBefore ?? last.timestamp, last.timestamp)
    }

    /// One rule over one sensor's readings in time order; a reading at or before the newest one evaluated (`after`,
    /// or the stored alert's) is out of order and waits for a late report. Appends the alert's change, if any. An
    /// alert that does not exist and a condition that does not hold allocate nothing.
    private func evaluate(
        _ condition: AlertCondition, of rules: [AlertRule], at position: Int, _ readings: SensorReadings, after newestBefore: Timestamp?,
        memory: inout SeriesMemory, record stored: AlertRecord?, sensorRowID: Int64, device: DeviceIdentity,
        receivedAt: Timestamp, followsOn: Bool, now current: Timestamp, into changes: inout [AlertChange]
    ) {
        func fresh() -> AlertRecord {
            let rule = rules[position]
            return AlertRecord(
                farmID: device.farmID, rule: rule.name, deviceRowID: device.rowID, sensorRowID: sensorRowID, device: device.device.rawValue,
                sensor: readings.sensor,
                fingerprint: AlertEvaluator.fingerprint(farm: device.farm, rule: rule.name, device: device.device.rawValue, sensor: readings.sensor),
                updatedAt: receivedAt)
        }
        var alert = stored
        var newest = newestBefore
        if let judged = stored?.lastReading, newest.map({ judged > $0 }) ?? true { newest = judged }
        let lateAfter = settings.lateAfter.wholeMicroseconds
        var transitions: [AlertTransitionRecord] = []
        var outOfOrder: (Timestamp, Timestamp)?
        // Whether a reading out of order was also late (taken more than `late_after` before it arrived).
        var outOfOrderLate = false
        for index in 0..<readings.count {
            let time = readings.times[index]
            if let newest, time <= newest {
                outOfOrder = (min(outOfOrder?.0 ?? time, time), max(outOfOrder?.1 ?? time, time))
                if receivedAt.microseconds - time.microseconds > lateAfter { outOfOrderLate = true }
                continue
            }
            newest = time
            let value = readings.values[index]
            guard
                let holds = AlertEvaluator.holds(
                    condition, value: value, quality: readings.qualities[index], at: time, active: alert?.state == .firing, memory: &memory)
            else { continue }
            if case .none = alert {
                // No alert yet and the condition does not hold: an inactive alert stays inactive, nothing to record.
                guard holds else { continue }
                alert = fresh()
            }
            // Moved in place (optional chaining on a mutating method): no copy of the record per reading.
            let moves = alert?.step(holds: holds, at: time, value: value, forMicroseconds: condition.forMicroseconds) ?? []
            guard !moves.isEmpty else { continue }
            let late = receivedAt.microseconds - time.microseconds > lateAfter
            for move in moves {
                transitions.append(AlertTransitionRecord(from: move.from, to: move.to, at: time, value: value, late: late, notified: !late, recordedAt: current))
            }
        }
        guard !transitions.isEmpty || outOfOrder != nil else { return }
        // A batch that does not follow on from the device's last evaluated one and holds late transitions is part of a
        // backlog whose older readings have not all arrived (the agent sends the newest batch of a backlog first, and
        // its first readings may lie in the middle of an episode). None of its transitions is notified on its own: the
        // late report tells the whole stretch once, from a replay of every reading in time order.
        if !followsOn, transitions.contains(where: \.late) {
            for index in transitions.indices {
                transitions[index].late = true
                transitions[index].notified = false
            }
        }
        let rule = rules[position]
        var record = alert ?? fresh()
        record.lastReading = newest
        let farm = device.farm
        let before = stored
        // Live transitions that notify (firing, resolved), each with a notification of its own.
        let notifiable = transitions.indices.filter { !transitions[$0].late && (transitions[$0].to == .firing || transitions[$0].to == .resolved) }
        // Late transitions of this batch followed by a live one (a backlog that reaches the present, in order) fold into
        // that live notification, unless out-of-order readings wait for a late report anyway.
        let foldLate = transitions.contains(where: \.late) && !notifiable.isEmpty && outOfOrder == nil && before?.lateDue == nil
        if foldLate {
            for index in transitions.indices where transitions[index].late { transitions[index].notified = true }
        }
        let late = foldLate ? [] : transitions.filter(\.late)
        if !late.isEmpty || outOfOrder != nil {
            let times = late.map(\.at) + (outOfOrder.map { [$0.0, $0.1] } ?? [])
            record.lateFrom = ([record.lateFrom].compactMap { $0 } + times).min()
            record.lateTo = ([record.lateTo].compactMap { $0 } + times).max()
            if late.isEmpty, !outOfOrderLate, before?.lateDue == nil {
                // Readings out of order but not late (a batch that arrived a few seconds after a newer one): no backlog
                // to wait for. The stretch is replayed in time order right after this batch is written, and what it
                // changes is recorded and notified then, not as late.
                record.lateDue = current
                reorderedDue = true
            } else {
                record.lateDue = Timestamp(microseconds: current.microseconds + settings.lateQuiet.wholeMicroseconds)
            }
        }
        if transitions.isEmpty, before?.lateDue != nil, before?.lateFrom == record.lateFrom, before?.lateTo == record.lateTo {
            // The same stretch again (a backlog batch re-sent): nothing new to record.
            return
        }
        var change = AlertChange(record: record, transitions: transitions)
        if !notifiable.isEmpty {
            let labels = labels(rule, farm: farm, record: record)
            if isSilenced(labels, farmID: device.farmID, at: current) {
                change.transitions = transitions.map { var t = $0; if !t.late || foldLate { t.silenced = true }; return t }
            } else {
                var previous = -1
                for (position, index) in notifiable.enumerated() {
                    let covered = Array(transitions[(previous + 1)...index])
                    previous = index
                    let folded = position == 0 && foldLate
                    let what = "\(record.sensor ?? record.device ?? rule.name) \(rule.conditionText)"
                    change.notifications.append(
                        AlertChange.PlannedNotification(
                            transitionIndex: index,
                            notification: notification(
                                rule, farm: farm, record: record, status: transitions[index].to == .firing ? .firing : .resolved, transitions: covered,
                                late: folded, description: folded ? "\(AlertEvaluator.episodes(covered, what: what, limit: Self.lateEpisodesTold)), reported late" : nil,
                                value: transitions[index].value, quantity: readings.quantity, at: transitions[index])))
                }
                change.receivers = rule.receivers
            }
        }
        countTransitions(transitions)
        changes.append(change)
    }

    // MARK: Late reports

    /// Writes the late reports that are due: one notification per alert for everything its backlog showed.
    private func writeLateReports() async {
        let current = now()
        let due: [AlertRecord]
        do {
            due = try await store.alertRecordsWithLateReportDue(now: current)
        } catch {
            errorsCounter.increment()
            logger.storeFailure("alert engine cannot read due late reports", error: error)
            return
        }
        for record in due {
            do {
                try await writeLateReport(record, now: current)
            } catch is AlertStoreConflict {
                continue  // another instance wrote it, or a batch changed the alert: due again at the next tick if still needed
            } catch {
                errorsCounter.increment()
                logger.storeFailure("alert engine cannot write a late report", error: error, metadata: ["alert": "\(record.fingerprint)"])
            }
        }
    }

    private func writeLateReport(_ original: AlertRecord, now current: Timestamp) async throws {
        var record = original
        let from = record.lateFrom ?? current
        let to = record.lateTo ?? current
        record.lateFrom = nil
        record.lateTo = nil
        record.lateDue = nil
        guard let rule = rulesByFarm[record.farmID]?.first(where: { $0.name == record.rule }) else {
            try await apply([AlertChange(record: record, markAllNotified: true)])
            return
        }
        // Late by the README's rule (a reading more than `late_after` old on arrival): a stretch of readings that came
        // out of order but in time (a batch sent 20 s after a newer one) is written at once, and is not "late".
        let late = current.microseconds - from.microseconds > settings.lateAfter.wholeMicroseconds
        // The replay runs on to the newest reading the alert was judged at: the readings after the stretch were judged
        // before the stretch arrived (the newest batch of a backlog comes first), so the state they left is not the
        // state the readings in time order give. The replay's is, and the alert takes it (its state, start and end).
        let end = [to, record.lastReading, lastEvaluated[record.sensorRowID]].compactMap { $0 }.max() ?? to
        let history = try await store.alertTransitions(alertIDs: [record.id])
        var found: [AlertTransitionRecord] = []
        if rule.kind.isReadingDriven, record.sensorRowID != 0 {
            let replayed = try await replay(rule, record: record, history: history, from: from, to: end, late: late, now: current)
            found = replayed.found
            let state = replayed.state
            record.state = state.state
            record.pendingSince = state.pendingSince
            if state.state == .firing || state.state == .resolved {
                record.startsAt = state.startsAt ?? record.startsAt
                record.endsAt = state.state == .firing ? nil : (state.endsAt ?? record.endsAt)
            }
            if let value = state.value { record.value = value }
            record.lastReading = end
        }
        // A transition is the same one when it reached the same state at the same reading.
        func moment(_ transition: AlertTransitionRecord) -> String { "\(transition.to.rawValue)@\(transition.at.microseconds)" }
        let known = Set(history.map(moment))
        let fresh = found.filter { !known.contains(moment($0)) }
        // Inside the replayed stretch the replay (every stored reading in time order, from the state before it) is the
        // account: transitions recorded while the backlog arrived out of order (a newest batch judged before the
        // readings under it) may disagree with it there, and are kept in the history but left out of the report.
        let notified = Set(history.filter(\.notified).map(moment))
        let unreported = history.filter { !$0.notified && ($0.at < from || $0.at > end) } + found.filter { !notified.contains(moment($0)) }
        let covered = unreported.sorted { $0.at < $1.at }
        var seen: Set<String> = []
        let episodes = covered.filter { seen.insert("\($0.from.rawValue)>\($0.to.rawValue)@\($0.at.microseconds)").inserted }
        var change = AlertChange(record: record, transitions: fresh.map { var t = $0; t.notified = true; return t }, markAllNotified: true)
        // Told when the condition fired inside the stretch, or when the stretch resolved an alert whose firing was told
        // before it (a tester, 2026-12-07: such a receiver was left with an alert firing for good).
        if episodes.contains(where: { $0.to == .firing || ($0.from == .firing && $0.to == .resolved) }) {
            let what = "\(record.sensor ?? record.device ?? rule.name) \(rule.conditionText)"
            // Bounded like a merged live notification: a probe flapping through a two-hour backlog is thousands of
            // episodes. The text counts them and tells the newest; the notification lists the newest transitions.
            let text = AlertEvaluator.episodes(episodes, what: what, limit: Self.lateEpisodesTold)
            let labels = labels(rule, farm: farmNames[record.farmID] ?? "", record: record)
            if isSilenced(labels, farmID: record.farmID, at: current) {
                change.transitions = change.transitions.map { var t = $0; t.silenced = true; return t }
            } else {
                let quantity = try await store.alertSensors(farmID: record.farmID).first { $0.sensorRowID == record.sensorRowID }?.quantity
                var report = notification(
                    rule, farm: farmNames[record.farmID] ?? "", record: record, status: record.state == .firing ? .firing : .resolved,
                    transitions: Array(episodes.suffix(AlertNotification.mergedTransitionsKept)), late: late,
                    description: late ? "\(text), reported late" : text, value: episodes.last?.value ?? record.value, quantity: quantity)
                report.reportedAt = current
                change.notifications = [AlertChange.PlannedNotification(transitionIndex: nil, notification: report)]
                change.receivers = rule.receivers
            }
        }
        countTransitions(fresh)
        try await apply([change])
        logger.info(
            late ? "alert late report written" : "alert re-evaluated after readings out of order",
            metadata: [
                "alert": "\(record.fingerprint)", "rule": "\(record.rule)", "sensor": "\(record.sensor ?? "")", "from": "\(RFC3339.format(from))",
                "to": "\(RFC3339.format(end))", "transitions": "\(episodes.count)", "notified": "\(!change.notifications.isEmpty)",
            ])
    }

    /// Replays the readings of `record`'s sensor from `from` to `to` (plus the rule's `for` or window before, for
    /// context) from the state the history gives at that point, and returns the transitions inside the stretch and the
    /// state the alert is in after its last reading.
    private func replay(
        _ rule: AlertRule, record: AlertRecord, history: [AlertTransitionRecord], from: Timestamp, to: Timestamp, late: Bool, now current: Timestamp
    ) async throws -> (found: [AlertTransitionRecord], state: AlertRecord) {
        let context = max(rule.forMicroseconds, rule.windowMicroseconds ?? 0)
        let start = Timestamp(microseconds: from.microseconds - context)
        var state = AlertRecord(
            farmID: record.farmID, rule: record.rule, deviceRowID: record.deviceRowID, sensorRowID: record.sensorRowID, device: record.device,
            sensor: record.sensor, fingerprint: record.fingerprint, updatedAt: current)
        if let before = history.last(where: { $0.at < start }) {
            state.state = before.to
            state.pendingSince = before.to == .pending ? before.at : nil
            state.startsAt = before.to == .firing ? before.at : history.last(where: { $0.at < start && $0.to == .firing })?.at
            state.endsAt = before.to == .resolved ? before.at : nil
        }
        var memories = try await Self.memories(of: [rule], sensorRowID: record.sensorRowID, before: start, store: store)
        var memory = memories.removeFirst()
        var found: [AlertTransitionRecord] = []
        var cursor: Timestamp? = start
        let end = Timestamp(microseconds: to.microseconds + 1)
        while true {
            let page = try await store.readings(sensorRowID: record.sensorRowID, from: cursor, to: end, limit: 5_000)
            for reading in page {
                guard let holds = AlertEvaluator.holds(rule, value: reading.value, quality: reading.quality, at: reading.timestamp, active: state.state == .firing, memory: &memory)
                else { continue }
                for move in AlertEvaluator.step(&state, holds: holds, at: reading.timestamp, value: reading.value, forMicroseconds: rule.forMicroseconds)
                where reading.timestamp >= from {
                    found.append(AlertTransitionRecord(from: move.from, to: move.to, at: reading.timestamp, value: reading.value, late: late, recordedAt: current))
                }
            }
            guard page.count == 5_000, let last = page.last else { break }
            cursor = Timestamp(microseconds: last.timestamp.microseconds + 1)
        }
        return (found, state)
    }

    // MARK: Timer rules

    private func evaluateTimerRules() async {
        let current = now()
        let checkCalibrations = lastCalibrationCheck.map { current.microseconds - $0.microseconds >= settings.calibrationInterval.wholeMicroseconds } ?? true
        if checkCalibrations { lastCalibrationCheck = current }
        for (farmID, rules) in rulesByFarm {
            let timerRules = rules.filter { !$0.kind.isReadingDriven && ($0.kind != .calibrationOverdue || checkCalibrations) }
            guard !timerRules.isEmpty else { continue }
            do {
                let sensors = try await store.alertSensors(farmID: farmID)
                let stored = try await store.alertRecords(farmID: farmID, changedSince: Timestamp(microseconds: Int64.min), limit: 1_000_000)
                var records: [SeriesKey: AlertRecord] = [:]
                for record in stored {
                    records[SeriesKey(farmID: farmID, rule: record.rule, deviceRowID: record.deviceRowID, sensorRowID: record.sensorRowID)] = record
                }
                var changes: [AlertChange] = []
                for rule in timerRules {
                    for (target, judged) in try await timerConditions(rule, sensors: sensors, now: current) {
                        // Not judged yet (silent by the store, but the engine started less than `after` ago): the alert
                        // stays as it is, a firing one firing with its start, an inactive one inactive.
                        guard let holds = judged else { continue }
                        let key = SeriesKey(farmID: farmID, rule: rule.name, deviceRowID: target.deviceRowID, sensorRowID: target.sensorRowID)
                        guard holds || records[key]?.state == .firing else { continue }
                        var record = records[key] ?? AlertRecord(
                            farmID: farmID, rule: rule.name, deviceRowID: target.deviceRowID, sensorRowID: target.sensorRowID, device: target.device,
                            sensor: target.sensor,
                            fingerprint: AlertEvaluator.fingerprint(farm: farmNames[farmID] ?? "", rule: rule.name, device: target.device, sensor: target.sensor),
                            updatedAt: current)
                        let moves = AlertEvaluator.timerStep(&record, holds: holds, at: current)
                        guard let move = moves.last else { continue }
                        record.lastReading = target.newest
                        let transitions = moves.map { AlertTransitionRecord(from: $0.from, to: $0.to, at: current, value: nil, recordedAt: current) }
                        changes.append(
                            timerChange(
                                rule, farmID: farmID, record: record, transitions: transitions, status: move.to == .firing ? .firing : .resolved, value: nil,
                                quantity: target.quantity, at: current))
                    }
                }
                try await apply(changes)
            } catch is AlertStoreConflict {
                continue  // another instance moved one of these alerts first; the next tick judges again
            } catch {
                errorsCounter.increment()
                logger.storeFailure("alert engine cannot evaluate timer rules", error: error, metadata: ["farm": "\(farmNames[farmID] ?? String(farmID))"])
            }
        }
    }

    /// How long past a pending alert's `for` the timer waits for readings still on their way before it fires it without
    /// one: a site sends its readings in batches (`batch_max_age`, 20 s by default), and a change inside `for` must not
    /// come after the alert fired.
    static let heldStateGrace = Timestamp(microseconds: 30_000_000)

    /// Fires the pending alerts on `state` sensors (float switches, leak sensors) whose `for` has passed with no reading
    /// since: such a sensor stores only its changes and a heartbeat (15 minutes), so `for`, measured between reading
    /// timestamps, would otherwise end only at the next heartbeat (a tester, 2026-12-07: a `for = "10s"` float alert
    /// fired 15 minutes late). The state held from the reading that made the alert pending, so the alert fires at that
    /// reading's time plus `for`, once the wall clock is ``heldStateGrace`` past it. Other sensors read on an interval:
    /// their next reading decides, as before.
    private func fireHeldStates() async {
        let current = now()
        for (farmID, rules) in rulesByFarm {
            let held = rules.filter { $0.kind.isReadingDriven && $0.forMicroseconds > 0 }
            guard !held.isEmpty else { continue }
            do {
                let pending = try await store.alertRecords(farmID: farmID, changedSince: Timestamp(microseconds: Int64.min), limit: 1_000_000)
                    .filter { $0.state == .pending && $0.pendingSince != nil && $0.sensorRowID != 0 }
                guard !pending.isEmpty else { continue }
                let sensors = try await store.alertSensors(farmID: farmID)
                var changes: [AlertChange] = []
                for var record in pending {
                    guard let rule = held.first(where: { $0.name == record.rule }), let since = record.pendingSince,
                        let sensor = sensors.first(where: { $0.sensorRowID == record.sensorRowID }), sensor.quantity == .state
                    else { continue }
                    let due = Timestamp(microseconds: since.microseconds + rule.forMicroseconds)
                    // A reading after `due` would have fired it on the reading path: only an alert whose newest judged
                    // reading is the one that made it pending (or another before `due`) waits for the timer.
                    guard current.microseconds - due.microseconds >= Self.heldStateGrace.microseconds,
                        (record.lastReading ?? since) <= due
                    else { continue }
                    let moves = AlertEvaluator.timerStep(&record, holds: true, at: due)
                    let transitions = moves.map { AlertTransitionRecord(from: $0.from, to: $0.to, at: due, value: record.value, recordedAt: current) }
                    changes.append(
                        timerChange(
                            rule, farmID: farmID, record: record, transitions: transitions, status: .firing, value: record.value, quantity: sensor.quantity,
                            at: current))
                }
                try await apply(changes)
            } catch is AlertStoreConflict {
                continue  // another instance (or a batch) moved one of these alerts first; the next tick judges again
            } catch {
                errorsCounter.increment()
                logger.storeFailure("alert engine cannot fire pending alerts of state sensors", error: error, metadata: ["farm": "\(farmNames[farmID] ?? String(farmID))"])
            }
        }
    }

    /// A change the timer made (a timer rule's move, a held state's firing): its transitions, counted, and its
    /// notification to the rule's receivers, or the transitions marked silenced.
    private func timerChange(
        _ rule: AlertRule, farmID: Int64, record: AlertRecord, transitions: [AlertTransitionRecord], status: AlertNotification.Status, value: Double?,
        quantity: Quantity?, at current: Timestamp
    ) -> AlertChange {
        var change = AlertChange(record: record, transitions: transitions)
        let farm = farmNames[farmID] ?? ""
        if isSilenced(labels(rule, farm: farm, record: record), farmID: farmID, at: current) {
            change.transitions = transitions.map { var t = $0; t.silenced = true; return t }
        } else {
            change.notifications = [
                AlertChange.PlannedNotification(
                    transitionIndex: nil,
                    notification: notification(
                        rule, farm: farm, record: record, status: status, transitions: transitions, late: false, description: nil, value: value,
                        quantity: quantity))
            ]
            change.receivers = rule.receivers
        }
        countTransitions(transitions)
        return change
    }

    private struct TimerTarget {
        var deviceRowID: Int64
        var device: String
        var sensorRowID: Int64
        var sensor: String?
        var quantity: Quantity?
        var newest: Timestamp?
    }

    /// Each target of `rule` and whether its condition holds: true (fires), false (the cause is gone: a firing alert
    /// resolves) or nil (cannot be judged yet: the alert keeps its state).
    private func timerConditions(_ rule: AlertRule, sensors: [AlertSensor], now current: Timestamp) async throws -> [(TimerTarget, Bool?)] {
        let after = rule.afterMicroseconds ?? 0
        let started = startedAt
        // No data and offline are counted from the engine's start at the earliest: while the ingest was down no device
        // could upload, so its silence then says nothing about the device (its agent buffers and sends the backlog
        // once the ingest is back). Calibrations do not depend on the ingest running.
        // The newest reading comes from the store (`latest`), so it survives a restart. A target that has reported
        // within `after` is not silent (false). One silent for longer by the store, but for less than `after` since
        // this engine started, is not known yet (nil): it neither fires nor resolves, so that a restart does not end
        // an alert that fired before it (and fire it again `after` later with a new start).
        func silent(_ newest: Timestamp?, since firstSeen: Timestamp) -> Bool? {
            guard current.microseconds - (newest ?? firstSeen).microseconds > after else { return false }
            return current.microseconds - started.microseconds > after ? true : nil
        }
        switch rule.kind {
        case .noData:
            return sensors.filter { rule.matches(device: $0.device, sensor: $0.sensor, quantity: $0.quantity) }.map { sensor in
                (TimerTarget(deviceRowID: sensor.deviceRowID, device: sensor.device, sensorRowID: sensor.sensorRowID, sensor: sensor.sensor, quantity: sensor.quantity, newest: sensor.newestReading),
                 silent(sensor.newestReading, since: sensor.firstSeen))
            }
        case .deviceOffline:
            var devices: [Int64: (name: String, newest: Timestamp?, firstSeen: Timestamp)] = [:]
            for sensor in sensors where Glob.matches(rule.device, sensor.device) {
                let entry = devices[sensor.deviceRowID]
                devices[sensor.deviceRowID] = (
                    sensor.device, [entry?.newest, sensor.newestReading].compactMap { $0 }.max(), min(entry?.firstSeen ?? sensor.firstSeen, sensor.firstSeen)
                )
            }
            return devices.map { row, entry in
                (TimerTarget(deviceRowID: row, device: entry.name, sensorRowID: 0, sensor: nil, quantity: nil, newest: entry.newest), silent(entry.newest, since: entry.firstSeen))
            }
        case .calibrationOverdue:
            guard let calibrations = store as? any CalibrationStore else { return [] }
            var result: [(TimerTarget, Bool?)] = []
            for sensor in sensors where rule.matches(device: sensor.device, sensor: sensor.sensor, quantity: sensor.quantity) {
                guard let id = try? SensorID(sensor.sensor) else { continue }
                // An event whose circuit says it holds fewer points than were taken is no calibration (the circuit
                // did not keep it): the newest one the circuit kept counts. Looked for among the newest few: a sensor
                // with more unkept calibrations in a row than that is overdue, which is what it is in effect.
                let last = try await calibrations.calibrations(deviceRowID: sensor.deviceRowID, sensor: id, limit: Self.calibrationLookback)
                    .first(where: \.keptByCircuit)?.time
                result.append(
                    (TimerTarget(deviceRowID: sensor.deviceRowID, device: sensor.device, sensorRowID: sensor.sensorRowID, sensor: sensor.sensor, quantity: sensor.quantity, newest: last),
                     current.microseconds - (last ?? sensor.firstSeen).microseconds > after))
            }
            return result
        default:
            return []
        }
    }

    // MARK: Plumbing

    /// Writes `changes`; `durability` is ``AlertWriteDurability/withNextSyncedCommit`` only for the changes of
    /// batches of readings, which a restart evaluates again from the store when the watermark that covers them was not
    /// saved (see ``AlertWriteDurability``). Timer rules and late reports are judged against the wall clock and write
    /// synced.
    private func apply(_ changes: [AlertChange], durability: AlertWriteDurability = .immediate, cursor: AlertCursorAdvance? = nil) async throws {
        guard !changes.isEmpty || cursor != nil else { return }
        let written = try await store.applyAlertChanges(changes, now: now(), durability: durability, advancing: cursor)
        if written.coalesced > 0 { coalescedCounter.increment(by: written.coalesced) }
        let notified = changes.reduce(0) { $0 + $1.notifications.count }
        if notified > 0 {
            notificationsCounter.increment(by: notified)
            notificationsWritten?()
        }
    }

    /// Saves the watermarks that moved since the last save.
    public func saveWatermarks() async {
        guard !dirtyWatermarks.isEmpty else { return }
        var batch: [Int64: UInt64] = [:]
        for device in dirtyWatermarks { if let value = watermarks[device] { batch[device] = value } }
        do {
            try await store.saveAlertWatermarks(batch)
            dirtyWatermarks = []
        } catch {
            errorsCounter.increment()
            logger.storeFailure("alert engine cannot save its watermarks; it will evaluate some readings again after a restart", error: error)
        }
    }

    private func countTransitions(_ transitions: [AlertTransitionRecord]) {
        if !transitions.isEmpty { transitionsCounter.increment(by: transitions.count) }
    }

    private func isSilenced(_ labels: [String: String], farmID: Int64, at time: Timestamp) -> Bool {
        (silencesByFarm[farmID] ?? []).contains { $0.silences(labels, at: time) }
    }

    private func labels(_ rule: AlertRule, farm: String, record: AlertRecord) -> [String: String] {
        var labels = rule.labels
        labels["alertname"] = rule.name
        labels["farm"] = farm
        labels["severity"] = rule.severity
        if let device = record.device { labels["device"] = device }
        if let sensor = record.sensor { labels["sensor"] = sensor }
        return labels
    }

    private func notification(
        _ rule: AlertRule, farm: String, record: AlertRecord, status: AlertNotification.Status, transitions: [AlertTransitionRecord], late: Bool,
        description: String?, value: Double?, quantity: Quantity?, at transition: AlertTransitionRecord? = nil
    ) -> AlertNotification {
        // A notification for an earlier transition of a batch carries that transition's times, not the final state's.
        var record = record
        if let transition, transition.to == .firing {
            record.startsAt = transition.at
            record.endsAt = nil
        } else if let transition, transition.to == .resolved {
            record.endsAt = transition.at
            if let began = transitions.last(where: { $0.to == .firing }) { record.startsAt = began.at }
        }
        return AlertNotification(
            farm: farm, rule: rule.name, alertID: record.id, transitionID: 0, fingerprint: record.fingerprint, status: status, severity: rule.severity,
            labels: labels(rule, farm: farm, record: record),
            summary: rule.renderSummary(device: record.device, sensor: record.sensor, value: value, quantity: quantity), description: description,
            startsAt: record.startsAt ?? record.pendingSince ?? transitions.first?.at ?? now(), endsAt: status == .resolved ? record.endsAt : nil, late: late,
            transitions: transitions.suffix(AlertNotification.mergedTransitionsKept).map { AlertNotification.Transition(state: $0.to.rawValue, at: $0.at) },
            value: value)
    }
}
