import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Prometheus
import Synchronization
import Testing

@testable import FarmgateIngest

/// `[retention] alert_history` on both stores: transitions recorded before the cut-off go, each alert's newest (by id)
/// stays however old, an alert gathering a late report keeps its whole history, outbox rows are left as they are,
/// and the run counts what went in its report, its log line and the retention metric.
@Suite struct AlertHistoryRetentionTests {
    /// 30 days: at ``testNow`` (2026-01-01) the cut-off is 2025-12-02T00:00:00Z.
    static let retention = IngestConfiguration.Retention(alertHistory: .seconds(30 * 86_400))
    static let cutoff = "2025-12-02T00:00:00Z"

    static func daysAgo(_ days: Int64) -> Timestamp { Timestamp(microseconds: testNow.microseconds - days * 86_400_000_000) }

    /// A transition as the tests compare them: `from>to@days ago` (reading time).
    static func text(_ transition: AlertTransitionRecord) -> String {
        "\(transition.from.rawValue)>\(transition.to.rawValue)@\((testNow.microseconds - transition.at.microseconds) / 86_400_000_000)"
    }

    /// The store's alerts, written the way the engine writes them (``AlertStore/applyAlertChanges(_:now:durability:)``),
    /// with their transitions recorded at chosen times.
    struct History: Sendable {
        let store: any IngestStore & AlertStore
        let farmID: Int64
        let deviceRowID: Int64

        /// Records `moves` (each `from`, `to` and its reading time in days ago) as one change of the alert of `rule`,
        /// written `recorded` days ago; a notification for the first move that fires, to receiver `grower` (delivered, so
        /// never merged into by the next write). With
        /// `lateDue` the alert is left gathering a late report.
        func write(_ rule: String, _ moves: [(AlertState, AlertState, Int64)], recorded: Int64, lateDue: Bool = false) async throws {
            let now = AlertHistoryRetentionTests.daysAgo(recorded)
            var record =
                try await store.alertRecords(deviceRowID: deviceRowID).first { $0.rule == rule }
                ?? AlertRecord(
                    farmID: farmID, rule: rule, deviceRowID: deviceRowID, sensorRowID: 0, device: "d1", sensor: nil, fingerprint: "fp-\(rule)",
                    updatedAt: now)
            record.state = moves.last?.1 ?? record.state
            if lateDue {
                record.lateFrom = AlertHistoryRetentionTests.daysAgo(moves.map(\.2).max() ?? recorded)
                record.lateTo = now
                record.lateDue = Timestamp(microseconds: testNow.microseconds + 30_000_000)
            }
            let transitions = moves.map { AlertTransitionRecord(from: $0.0, to: $0.1, at: AlertHistoryRetentionTests.daysAgo($0.2), value: 5.2, recordedAt: now) }
            var change = AlertChange(record: record, transitions: transitions, receivers: ["grower"])
            if let firing = moves.firstIndex(where: { $0.1 == .firing }) {
                let notification = AlertNotification(
                    farm: "f1", rule: rule, alertID: 0, transitionID: 0, fingerprint: record.fingerprint, status: .firing, severity: "warning",
                    labels: ["alertname": rule], summary: "\(rule) fired", startsAt: transitions[firing].at)
                change.notifications = [AlertChange.PlannedNotification(transitionIndex: firing, notification: notification)]
            }
            try await store.applyAlertChanges([change], now: now)
            // Sent long ago: each write's notification is a row of its own, as in an outbox that has been delivering.
            try await markOutboxDelivered(store, at: testNow)
        }

        /// Every alert's transitions by rule, each as ``AlertHistoryRetentionTests/text(_:)``, in time order.
        func transitions() async throws -> [String: [String]] {
            let alerts = try await store.alertRecords(deviceRowID: deviceRowID)
            let rules = Dictionary(uniqueKeysWithValues: alerts.map { ($0.id, $0.rule) })
            let history = try await store.alertTransitions(alertIDs: alerts.map(\.id))
            return Dictionary(grouping: history) { rules[$0.alertID] ?? "?" }.mapValues { $0.map(AlertHistoryRetentionTests.text) }
        }

        /// The highest transition id of any alert.
        func highestTransitionID() async throws -> Int64 {
            let alerts = try await store.alertRecords(deviceRowID: deviceRowID)
            return try await store.alertTransitions(alertIDs: alerts.map(\.id)).map(\.id).max() ?? 0
        }
    }

    /// A fresh store of `kind` with farm `f1`, device `d1`, receiver `grower`, and five alerts (the 30-day cut-off
    /// falls 30 days ago; "N" below is N days ago):
    /// - `flapping`: recorded at 100 (three transitions in one write, so at one recorded time), 60, 31 (six old), 10 and
    ///   1 (three new);
    /// - `quiet`: recorded at 200 (two) and 120 (its newest): all old;
    /// - `out-of-order`: recorded at 90 (two, read at 90), then at 80 one read at 95: its newest by id is not its latest
    ///   by reading time;
    /// - `gathering`: recorded at 70 and 40, and its late report is due;
    /// - `backlog`: read 200 days ago, recorded 2 days ago (a site's backlog).
    static func withHistory<T: Sendable>(_ kind: StoreKind, _ body: @Sendable (History) async throws -> T) async throws -> T {
        try await withFreshStore(kind) { base in
            guard let store = base as? any IngestStore & AlertStore else { throw IngestStoreError.notFound("alerting") }
            let admin = IngestAdmin(store: store)
            let farm = try await admin.createFarm(name: "f1")
            _ = try await admin.createDevice(farm: "f1", device: try deviceID("d1"))
            let device = try #require(try await store.devices(farmID: farm.id).first)
            try await addReceiver(store, farmID: farm.id, name: "grower")
            let history = History(store: store, farmID: farm.id, deviceRowID: device.rowID)
            try await history.write("quiet", [(.inactive, .pending, 200), (.pending, .firing, 200)], recorded: 200)
            try await history.write("flapping", [(.inactive, .pending, 100), (.pending, .firing, 100), (.firing, .resolved, 100)], recorded: 100)
            try await history.write("out-of-order", [(.inactive, .pending, 90), (.pending, .firing, 90)], recorded: 90)
            try await history.write("out-of-order", [(.firing, .resolved, 95)], recorded: 80)
            try await history.write("gathering", [(.inactive, .pending, 70), (.pending, .firing, 70)], recorded: 70)
            try await history.write("flapping", [(.resolved, .pending, 60), (.pending, .firing, 60)], recorded: 60)
            try await history.write("gathering", [(.firing, .resolved, 40)], recorded: 40, lateDue: true)
            try await history.write("flapping", [(.firing, .resolved, 31)], recorded: 31)
            try await history.write("quiet", [(.firing, .resolved, 120)], recorded: 120)
            try await history.write("flapping", [(.resolved, .pending, 10), (.pending, .firing, 10)], recorded: 10)
            try await history.write("backlog", [(.inactive, .pending, 200), (.pending, .firing, 200)], recorded: 2)
            try await history.write("flapping", [(.firing, .resolved, 1)], recorded: 1)
            #expect(try await history.transitions().values.map(\.count).reduce(0, +) == 20)
            return try await body(history)
        }
    }

    /// What is left after a 30-day run: 10 of the 20 went.
    static let kept: [String: [String]] = [
        "flapping": ["resolved>pending@10", "pending>firing@10", "firing>resolved@1"],
        "quiet": ["firing>resolved@120"],
        "out-of-order": ["firing>resolved@95"],
        "gathering": ["pending>firing@70", "inactive>pending@70", "firing>resolved@40"].sorted(),
        "backlog": ["inactive>pending@200", "pending>firing@200"],
    ]

    @Test(
        "transitions recorded before the cut-off go, each alert's newest stays however old, newer ones stay; counted in the report, the log and the metric",
        arguments: StoreKind.allCases)
    func oldTransitionsGoAndEachAlertsNewestStays(kind: StoreKind) async throws {
        try await Self.withHistory(kind) { history in
            let store = try #require(history.store as? any RetentionStore)
            let before = try await history.transitions()
            let outboxBefore = try await history.store.alertOutbox(farmID: history.farmID)
            #expect(outboxBefore.count == 7)
            let highestBefore = try await history.highestTransitionID()

            let dry = try await store.runRetention(Self.retention, now: testNow, options: RetentionRunOptions(dryRun: true))
            #expect(dry.alertTransitionsDeleted == 10)
            #expect(dry.lines.contains("alert transitions recorded before \(Self.cutoff): would remove 10 rows (each alert's newest kept)"), "\(dry.lines)")
            #expect(try await history.transitions() == before, "a dry run removes nothing")

            // The scheduled run: the report, its log line and the metric say how many went.
            let registry = PrometheusCollectorRegistry()
            let recorder = LogRecorder()
            let service = RetentionService(
                store: store, retention: Self.retention, metrics: RetentionMetrics(registry: registry),
                logger: Logger(label: "retention-test") { _ in RecordingHandler(recorder: recorder) }, now: { testNow })
            let report = try #require(await service.runOnce())
            #expect(report.alertTransitionsDeleted == 10)
            #expect(report.alertHistoryCutoff == Timestamp(microseconds: testNow.microseconds - 30 * 86_400_000_000))
            #expect(report.lines.contains("alert transitions recorded before \(Self.cutoff): removed 10 rows (each alert's newest kept)"), "\(report.lines)")
            #expect(metric(registry, #"farmgate_ingest_retention_rows_removed_total{table="alert_transitions"}"#) == 10)
            let line = try #require(recorder.all.first { $0.hasPrefix("info retention run completed ") })
            #expect(line.contains(" retention.alert_transitions_deleted=10 ") && line.contains(" retention.alert_history_cutoff=\(Self.cutoff) "), "\(line)")

            let after = try await history.transitions()
            #expect(after.mapValues { $0.sorted() } == Self.kept.mapValues { $0.sorted() })
            // The newest is the highest id: `out-of-order` keeps the one recorded last, read before the others.
            #expect(after["out-of-order"] == ["firing>resolved@95"])
            // The outbox keeps every row, its transition ids and keys as they were.
            #expect(try await history.store.alertOutbox(farmID: history.farmID) == outboxBefore)

            // A transition written afterwards gets an id never handed out before, so its notification's key is new.
            try await history.write("quiet", [(.resolved, .pending, 0), (.pending, .firing, 0)], recorded: 0)
            #expect(try await history.highestTransitionID() > highestBefore)
            let outbox = try await history.store.alertOutbox(farmID: history.farmID)
            #expect(outbox.count == 8 && Set(outbox.map(\.idempotencyKey)).count == 8)

            // `quiet`'s old newest goes once a newer one exists; then nothing more.
            let again = try await store.runRetention(Self.retention, now: testNow, options: RetentionRunOptions())
            #expect(again.alertTransitionsDeleted == 1)
            #expect(try await history.transitions()["quiet"] == ["resolved>pending@0", "pending>firing@0"])
            #expect(try await store.runRetention(Self.retention, now: testNow, options: RetentionRunOptions()).alertTransitionsDeleted == 0)
        }
    }

    @Test("\"forever\" keeps every transition", arguments: StoreKind.allCases)
    func foreverKeepsEveryTransition(kind: StoreKind) async throws {
        try await Self.withHistory(kind) { history in
            let store = try #require(history.store as? any RetentionStore)
            let before = try await history.transitions()
            let forever = IngestConfiguration.Retention(alertHistory: nil)
            let later = Timestamp(microseconds: testNow.microseconds + 400 * 86_400_000_000)
            let report = try await store.runRetention(forever, now: later, options: RetentionRunOptions())
            #expect(report.alertHistoryCutoff == nil && report.alertTransitionsDeleted == 0)
            #expect(report.lines.contains("alert transitions: kept forever"), "\(report.lines)")
            #expect(try await history.transitions() == before)
        }
    }

    @Test("on SQLite the history goes a few rows per transaction, rows recorded at the same moment included")
    func sqliteDeletesInSmallTransactions() async throws {
        try await Self.withHistory(.sqlite) { history in
            let store = try #require(history.store as? SQLiteIngestStore)
            let progress = Mutex<[Int]>([])
            // Only the alert history: readings, rollups and the outbox kept forever.
            let retention = IngestConfiguration.Retention(
                raw: nil, rollup1m: nil, deliveredNotifications: nil, deadNotifications: nil, alertHistory: .seconds(30 * 86_400))
            let report = try await store.runRetention(
                retention, now: testNow, options: RetentionRunOptions(progress: { count in progress.withLock { $0.append(count) } }, rowsPerTransaction: 1))
            #expect(report.alertTransitionsDeleted == 10)
            #expect(progress.withLock { $0 } == Array(1...10), "one row per transaction")
            #expect(try await history.transitions().mapValues { $0.sorted() } == Self.kept.mapValues { $0.sorted() })
        }
    }
}

@Suite("[retention] alert_history")
struct AlertHistoryConfigurationTests {
    @Test("365 days by default, a period of at least a day, or \"forever\"")
    func parsed() throws {
        #expect(try IngestConfiguration.parse("", file: "ingest.toml", baseDirectory: "/").retention.alertHistory == .seconds(365 * 86_400))
        #expect(IngestConfiguration.Retention().alertHistory == .seconds(365 * 86_400))
        let week = try IngestConfiguration.parse("[retention]\nalert_history = \"7d\"\n", file: "ingest.toml", baseDirectory: "/")
        #expect(week.retention.alertHistory == .seconds(7 * 86_400))
        let forever = try IngestConfiguration.parse("[retention]\nalert_history = \"forever\"\n", file: "ingest.toml", baseDirectory: "/")
        #expect(forever.retention.alertHistory == nil)
    }

    @Test("bad values are refused with file, line and key", arguments: ["\"1h\"", "\"never\"", "\"36601d\"", "30"])
    func refused(value: String) throws {
        do {
            _ = try IngestConfiguration.parse("[retention]\n\nalert_history = \(value)\n", file: "ingest.toml", baseDirectory: "/")
            Issue.record("accepted: \(value)")
        } catch {
            #expect(error.description.hasPrefix("ingest.toml:3: retention.alert_history"), "\(error.description)")
        }
    }
}

extension AlertHistoryRetentionTests {
    @Test("the alerts list gives each alert's newest transitions only, and says when older ones exist", arguments: StoreKind.allCases)
    func alertsListTheNewestTransitions(kind: StoreKind) async throws {
        try await Self.withHistory(kind) { history in
            // The newest two by id, in time order: out-of-order's newest by id is not its latest by reading time.
            let alerts = try await history.store.alertRecords(deviceRowID: history.deviceRowID)
            let rules = Dictionary(uniqueKeysWithValues: alerts.map { ($0.id, $0.rule) })
            let two = try await history.store.alertTransitions(alertIDs: alerts.map(\.id), newestPerAlert: 2)
            let byRule = Dictionary(grouping: two) { rules[$0.alertID] ?? "?" }.mapValues { $0.map(Self.text) }
            #expect(byRule["flapping"] == ["pending>firing@10", "firing>resolved@1"])
            #expect(byRule["out-of-order"] == ["firing>resolved@95", "pending>firing@90"])
            #expect(byRule["quiet"]?.count == 2 && byRule["backlog"]?.count == 2)

            // A sensor that flapped 150 times: the list shows its newest 100 and says older ones exist.
            var moves: [(AlertState, AlertState, Int64)] = []
            for index in 0..<150 { moves.append(index % 2 == 0 ? (.inactive, .firing, 5) : (.firing, .inactive, 5)) }
            try await history.write("storm", moves, recorded: 5)
            let views = try await AlertAdmin(store: history.store).alerts(farm: "f1", recent: .seconds(400 * 86_400), now: testNow)
            let storm = try #require(views.first { $0.rule == "storm" })
            #expect(storm.transitions.count == AlertAdmin.transitionsPerAlert && storm.transitionsOmitted)
            let flapping = try #require(views.first { $0.rule == "flapping" })
            #expect(flapping.transitions.count == 9 && !flapping.transitionsOmitted)
            // The full history is still there for the late report.
            let all = try await history.store.alertTransitions(alertIDs: [storm.id])
            #expect(all.count == 150)
        }
    }
}
