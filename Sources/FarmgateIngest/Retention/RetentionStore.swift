public import FarmgateWire

/// A store that removes what `[retention]` no longer keeps: raw readings and each rollup level past their periods,
/// delivered and dead outbox rows, and alert transitions (each alert's newest always stays).
///
/// ``SQLiteIngestStore`` deletes in small transactions (a few thousand rows each) and hands the writer back between
/// them (leaving the write lock free as long as each took, for a `serve` in another process), so that a batch waits
/// for at most about one of them, and runs under a lock file, so that one run at a time deletes; ``PostgresIngestStore`` drops whole daily partitions of raw
/// readings (never a row `DELETE`, except in the default partition, which holds only what fell outside every daily
/// partition) and whole monthly partitions of 1-minute rollups (deleting rows only in the month the cut-off falls in
/// and in the default partition), and runs under an advisory try-lock, so that with several instances each run
/// happens once.
///
/// Neither touches what makes re-sent readings duplicates (`stored_sequences`, `devices.highest_sequence`): a reading
/// sent again after its raw row went is still counted as a duplicate and not stored again.
public protocol RetentionStore: StoreMaintenance {
    /// Removes what lies before the cut-offs of `retention` at `now` (``IngestConfiguration/Retention/cutoff(_:now:)``),
    /// or with ``RetentionRunOptions/dryRun`` only counts it.
    func runRetention(_ retention: IngestConfiguration.Retention, now: Timestamp, options: RetentionRunOptions) async throws -> RetentionReport
}

/// How one retention run goes.
public struct RetentionRunOptions: Sendable {
    /// Count what would go and remove nothing.
    public var dryRun: Bool
    /// For the schedule: skip the run when another instance completed one less than this long ago (PostgreSQL keeps
    /// the last run in `maintenance_runs` and measures this by its own clock, not the `now` a run is given, so that
    /// instances whose clocks disagree decide alike). Nil (a run asked for by hand) always runs.
    public var skipIfRanWithin: Duration?
    /// Told how many rows have gone so far, after each transaction that removed some (SQLite); for tests and progress.
    public var progress: (@Sendable (Int) -> Void)?
    /// Rows deleted per transaction on SQLite.
    public var rowsPerTransaction: Int

    /// The default size of one SQLite delete transaction: a few milliseconds of the writer.
    public static let defaultRowsPerTransaction = 5_000

    public init(
        dryRun: Bool = false, skipIfRanWithin: Duration? = nil, progress: (@Sendable (Int) -> Void)? = nil,
        rowsPerTransaction: Int = RetentionRunOptions.defaultRowsPerTransaction
    ) {
        self.dryRun = dryRun
        self.skipIfRanWithin = skipIfRanWithin
        self.progress = progress
        self.rowsPerTransaction = max(1, rowsPerTransaction)
    }
}

/// What one retention run removed (or, dry, would remove).
public struct RetentionReport: Sendable, Hashable {
    /// Why a run did nothing.
    public enum Skip: Sendable, Hashable {
        /// Another run holds the retention lock: it is running now (another instance's on PostgreSQL; on SQLite another
        /// process's, `<path>.retention.lock`).
        case runningElsewhere
        /// Another instance completed a run at this time (the database's clock), less than
        /// ``RetentionRunOptions/skipIfRanWithin`` ago.
        case ranRecently(Timestamp)
    }

    public var skipped: Skip?
    public var dryRun: Bool
    /// Raw readings before this went (nil: kept forever).
    public var rawCutoff: Timestamp?
    /// Each rollup level's cut-off (absent: kept forever).
    public var rollupCutoffs: [RollupLevel: Timestamp]
    /// The daily partitions dropped (PostgreSQL), oldest first.
    public var partitionsDropped: [String]
    /// The readings those partitions held.
    public var rowsInDroppedPartitions: Int
    /// Raw readings deleted row by row (SQLite; PostgreSQL's default partition).
    public var rawRowsDeleted: Int
    /// Rollup rows deleted row by row, per level (on PostgreSQL at 1 minute: in the month the cut-off falls in and in
    /// the default partition; the dropped months are counted apart).
    public var rollupRowsDeleted: [RollupLevel: Int]
    /// The monthly partitions of 1-minute rollups dropped (PostgreSQL), oldest first.
    public var minuteRollupPartitionsDropped: [String] = []
    /// The rollup rows those partitions held.
    public var rowsInDroppedMinuteRollupPartitions: Int = 0
    /// Outbox rows delivered before this went (nil: kept forever), and dead letters whose last attempt was before this.
    public var deliveredNotificationCutoff: Timestamp?
    public var deadNotificationCutoff: Timestamp?
    /// Outbox rows deleted: delivered ones, and dead letters.
    public var deliveredNotificationsDeleted: Int = 0
    public var deadNotificationsDeleted: Int = 0
    /// Alert transitions recorded before this went (nil: kept forever), except each alert's newest.
    public var alertHistoryCutoff: Timestamp?
    /// Alert transitions deleted.
    public var alertTransitionsDeleted: Int = 0
    /// How long the run took.
    public var duration: Duration

    public init(
        skipped: Skip? = nil, dryRun: Bool, rawCutoff: Timestamp?, rollupCutoffs: [RollupLevel: Timestamp], partitionsDropped: [String] = [],
        rowsInDroppedPartitions: Int = 0, rawRowsDeleted: Int = 0, rollupRowsDeleted: [RollupLevel: Int] = [:], duration: Duration = .zero
    ) {
        self.skipped = skipped
        self.dryRun = dryRun
        self.rawCutoff = rawCutoff
        self.rollupCutoffs = rollupCutoffs
        self.partitionsDropped = partitionsDropped
        self.rowsInDroppedPartitions = rowsInDroppedPartitions
        self.rawRowsDeleted = rawRowsDeleted
        self.rollupRowsDeleted = rollupRowsDeleted
        self.duration = duration
    }

    /// A report of a run that did nothing because of `skip`.
    static func skip(_ skip: Skip, retention: IngestConfiguration.Retention, now: Timestamp, dryRun: Bool) -> RetentionReport {
        var report = RetentionReport.empty(retention, now: now, dryRun: dryRun)
        report.skipped = skip
        return report
    }

    /// A report with the cut-offs of `retention` at `now` and nothing removed yet.
    static func empty(_ retention: IngestConfiguration.Retention, now: Timestamp, dryRun: Bool) -> RetentionReport {
        var cutoffs: [RollupLevel: Timestamp] = [:]
        for level in RollupLevel.allCases {
            if let cutoff = IngestConfiguration.Retention.cutoff(retention.period(of: level), now: now) { cutoffs[level] = cutoff }
        }
        var report = RetentionReport(dryRun: dryRun, rawCutoff: IngestConfiguration.Retention.cutoff(retention.raw, now: now), rollupCutoffs: cutoffs)
        report.deliveredNotificationCutoff = IngestConfiguration.Retention.cutoff(retention.deliveredNotifications, now: now)
        report.deadNotificationCutoff = IngestConfiguration.Retention.cutoff(retention.deadNotifications, now: now)
        report.alertHistoryCutoff = IngestConfiguration.Retention.cutoff(retention.alertHistory, now: now)
        return report
    }

    /// Every rollup row deleted, all levels.
    public var rollupRowsTotal: Int { rollupRowsDeleted.values.reduce(0, +) }

    /// What the run did, one line per kind of data, for `farmgate-ingest retention run` and the log.
    public var lines: [String] {
        switch skipped {
        case .runningElsewhere?:
            return ["Skipped: another farmgate-ingest is running retention on this database now; nothing was removed."]
        case .ranRecently(let time)?:
            return ["Skipped: another farmgate-ingest completed retention at \(RFC3339.format(time)); nothing was removed."]
        case nil:
            break
        }
        let verb = dryRun ? "would remove" : "removed"
        var lines: [String] = []
        /// "3 daily partitions (a, b, c, 1200 rows) and 5 rows"; only the rows when no partition went.
        func removed(partitions: [String], kind: String, partitionRows: Int, rows: Int) -> String {
            var parts: [String] = []
            if !partitions.isEmpty {
                let names = partitions.count <= 4 ? partitions.joined(separator: ", ") : "\(partitions[0]) … \(partitions[partitions.count - 1])"
                parts.append("\(partitions.count) \(kind) partitions (\(names), \(partitionRows) rows)")
            }
            if rows > 0 || partitions.isEmpty { parts.append("\(rows) rows") }
            return parts.joined(separator: " and ")
        }
        if let cutoff = rawCutoff {
            let what = removed(partitions: partitionsDropped, kind: "daily", partitionRows: rowsInDroppedPartitions, rows: rawRowsDeleted)
            lines.append("raw readings before \(RFC3339.format(cutoff)): \(verb) \(what)")
        } else {
            lines.append("raw readings: kept forever")
        }
        for level in RollupLevel.allCases {
            let name = "\(level.rawValue) rollups"
            if let cutoff = rollupCutoffs[level] {
                let what = level == .minute
                    ? removed(
                        partitions: minuteRollupPartitionsDropped, kind: "monthly", partitionRows: rowsInDroppedMinuteRollupPartitions,
                        rows: rollupRowsDeleted[level] ?? 0)
                    : "\(rollupRowsDeleted[level] ?? 0) rows"
                lines.append("\(name) before \(RFC3339.format(cutoff)): \(verb) \(what)")
            } else {
                lines.append("\(name): kept forever")
            }
        }
        for (name, cutoff, count) in [
            ("delivered notifications", deliveredNotificationCutoff, deliveredNotificationsDeleted),
            ("dead notifications", deadNotificationCutoff, deadNotificationsDeleted),
        ] {
            lines.append(cutoff.map { "\(name) before \(RFC3339.format($0)): \(verb) \(count) outbox rows" } ?? "\(name): kept forever")
        }
        lines.append(
            alertHistoryCutoff.map {
                "alert transitions recorded before \(RFC3339.format($0)): \(verb) \(alertTransitionsDeleted) rows (each alert's newest kept)"
            } ?? "alert transitions: kept forever")
        return lines
    }
}
