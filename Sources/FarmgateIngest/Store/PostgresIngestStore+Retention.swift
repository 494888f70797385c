import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import PostgresNIO

/// Retention on PostgreSQL: whole daily partitions of readings and whole monthly partitions of 1-minute rollups
/// dropped, once across instances.
extension PostgresIngestStore: RetentionStore {
    /// Retention's row in `maintenance_runs`.
    static let retentionJob = "retention"

    /// Removes what lies before the cut-offs in one transaction that holds the retention advisory lock
    /// (`pg_try_advisory_xact_lock`: an instance that finds it taken skips, it never waits), so that with several
    /// instances each run happens once; a scheduled run also skips when `maintenance_runs` says another instance
    /// completed one less than ``RetentionRunOptions/skipIfRanWithin`` ago. That is decided by the database's clock
    /// (``recentMaintenanceRun(_:within:on:logger:)``), under the lock, and the run is recorded by the same clock, so
    /// instances whose clocks disagree decide alike; `now` only sets the cut-offs.
    ///
    /// In that transaction, in this order:
    /// - 1-minute rollups (partitioned by month, see ``PostgresSchema/partitionedMinuteRollups``): every monthly
    ///   partition `rollups_1m_YYYYMM` that ends at or before the cut-off is listed to be dropped; rows before the
    ///   cut-off are deleted by primary key per sensor only in the partition the cut-off falls in (at most a month) and
    ///   in the default partition (buckets outside every month made), so the row deletes stay bounded however long the
    ///   table's history. Hourly and daily rollups are deleted by primary key per sensor, one statement per level.
    /// - Raw readings: rows of the default partition before the raw cut-off are deleted (it holds only readings that
    ///   fell outside every daily partition, such as a backlog older than the first one); every daily partition
    ///   `readings_YYYYMMDD` that ends at or before the cut-off is listed to be dropped.
    /// - The notification outbox's old rows are deleted, then the alert transitions recorded before the
    ///   `alert_history` cut-off except each alert's newest (``purgeAlertHistory(before:dryRun:on:logger:)``), and the
    ///   run is recorded in `maintenance_runs` (at the database's `clock_timestamp()`).
    /// - Last, just before the commit, the listed partitions are dropped (readings first, then rollups: the order in
    ///   which the write transaction takes its locks). A drop locks its parent table for a moment, so they come last,
    ///   under a `lock_timeout` of 10 s (a run that cannot get a lock fails, whole, and the next one tries again).
    ///
    /// A dry run lists and counts the same and drops and deletes nothing. `stored_sequences` is never touched: a
    /// reading sent again after its partition was dropped is still a duplicate when it is older than the raw cut-off,
    /// which the run records in `retention_cutoff` (kept at its highest), and a `sequence_conflict` when newer.
    ///
    /// The run is a transaction of its own, without `query_timeout` (a first run on a large store may take minutes);
    /// its statements are bounded by a `statement_timeout` of 30 minutes.
    public func runRetention(_ retention: IngestConfiguration.Retention, now: Timestamp, options: RetentionRunOptions) async throws -> RetentionReport {
        let started = ContinuousClock.now
        let logger = self.logger
        let empty = RetentionReport.empty(retention, now: now, dryRun: options.dryRun)
        do {
            return try await client.withTransaction(logger: logger) { connection in
                try await connection.query("SELECT set_config('statement_timeout', '1800000', true), set_config('lock_timeout', '10000', true)", logger: logger)
                var locked = false
                for try await got in try await connection.query("SELECT pg_try_advisory_xact_lock(\(PostgresSchema.retentionLock))", logger: logger).decode(Bool.self) {
                    locked = got
                }
                guard locked else { return .skip(.runningElsewhere, retention: retention, now: now, dryRun: options.dryRun) }
                // Due or not by the database's clock, never `now` (this instance's): see recentMaintenanceRun.
                // ... unless this run's raw cut-off is later than the one applied: the recent run had a longer `raw`
                // (this instance started with a shorter one), and what the new one removes must not wait for the next.
                if let window = options.skipIfRanWithin,
                    let finished = try await Self.recentMaintenanceRun(Self.retentionJob, within: window, on: connection, logger: logger)
                {
                    let applied = try await Self.appliedRawCutoff(on: connection, logger: logger)
                    let moved = empty.rawCutoff.map { cutoff in applied.map { cutoff > $0 } ?? true } ?? false
                    if !moved { return .skip(.ranRecently(finished), retention: retention, now: now, dryRun: options.dryRun) }
                }
                var report = empty
                for level in RollupLevel.allCases {
                    guard let cutoff = report.rollupCutoffs[level] else { continue }
                    guard level == .minute else {
                        report.rollupRowsDeleted[level] = try await Self.purge(
                            level.table, key: "bucket_us", before: cutoff, dryRun: options.dryRun, on: connection, logger: logger)
                        continue
                    }
                    let months = try await Self.partitions(of: .minuteRollups, on: connection, logger: logger)
                    var deleted = 0
                    for month in months where month.end <= cutoff.microseconds {
                        report.minuteRollupPartitionsDropped.append(month.name)
                        report.rowsInDroppedMinuteRollupPartitions += try await Self.rows(in: month, of: .minuteRollups, on: connection, logger: logger)
                    }
                    for month in months where month.start < cutoff.microseconds && cutoff.microseconds < month.end {
                        deleted += try await Self.purge(month.name, key: "bucket_us", before: cutoff, dryRun: options.dryRun, on: connection, logger: logger)
                    }
                    deleted += try await Self.purge(
                        TimePartition.Kind.minuteRollups.defaultPartition, key: "bucket_us", before: cutoff, dryRun: options.dryRun, on: connection,
                        logger: logger)
                    report.rollupRowsDeleted[level] = deleted
                }
                if let cutoff = report.rawCutoff {
                    report.rawRowsDeleted = try await Self.purge(
                        TimePartition.Kind.readings.defaultPartition, key: "last_ts", before: cutoff, dryRun: options.dryRun, on: connection, logger: logger)
                    for day in try await Self.partitions(of: .readings, on: connection, logger: logger) where day.end <= cutoff.microseconds {
                        report.partitionsDropped.append(day.name)
                        report.rowsInDroppedPartitions += try await Self.rows(in: day, of: .readings, on: connection, logger: logger)
                    }
                }
                // Outbox rows: delivered ones by their delivery, dead letters by their last attempt (`alert_outbox_by_state`).
                if let cutoff = report.deliveredNotificationCutoff {
                    report.deliveredNotificationsDeleted = try await Self.purgeOutbox(
                        "state = 'delivered' AND delivered_at_us < ", before: cutoff, dryRun: options.dryRun, on: connection, logger: logger)
                }
                if let cutoff = report.deadNotificationCutoff {
                    report.deadNotificationsDeleted = try await Self.purgeOutbox(
                        "state = 'dead' AND coalesce(last_attempt_at_us, created_at_us) < ", before: cutoff, dryRun: options.dryRun, on: connection,
                        logger: logger)
                }
                if let cutoff = report.alertHistoryCutoff {
                    report.alertTransitionsDeleted = try await Self.purgeAlertHistory(before: cutoff, dryRun: options.dryRun, on: connection, logger: logger)
                }
                guard !options.dryRun else {
                    report.duration = ContinuousClock.now - started
                    return report
                }
                try await Self.recordMaintenanceRun(Self.retentionJob, summary: report.lines.joined(separator: "; "), on: connection, logger: logger)
                if let cutoff = report.rawCutoff {
                    // What a retired sequence sent again is judged by (a duplicate only when older), committed with the
                    // drops and deletes it covers. Kept at its highest: a longer `[retention] raw` moves the cut-off
                    // back, but what went, went.
                    try await connection.query(
                        """
                        INSERT INTO retention_cutoff(id, raw_us) VALUES (1, \(cutoff.microseconds))
                        ON CONFLICT (id) DO UPDATE SET raw_us = greatest(retention_cutoff.raw_us, excluded.raw_us)
                        """, logger: logger)
                }
                for (level, cutoff) in report.rollupCutoffs {
                    // What `resolution=auto` judges a level by: kept at its highest, as the raw cut-off is.
                    try await connection.query(
                        """
                        INSERT INTO rollup_cutoffs(level, cutoff_us) VALUES (\(level.rawValue), \(cutoff.microseconds))
                        ON CONFLICT (level) DO UPDATE SET cutoff_us = greatest(rollup_cutoffs.cutoff_us, excluded.cutoff_us)
                        """, logger: logger)
                }
                // The drops, last: each holds an exclusive lock on its parent until the commit.
                for name in report.partitionsDropped + report.minuteRollupPartitionsDropped {
                    try await connection.query("DROP TABLE \(unescaped: "\"" + name + "\"")", logger: logger)
                }
                report.duration = ContinuousClock.now - started
                return report
            }
        } catch let error as PostgresTransactionError {
            if let inner = error.closureError ?? error.commitError ?? error.beginError { throw inner }
            throw error
        }
    }

    /// A time partition (a day of `readings`, a month of `rollups_1m`) and the range it holds.
    struct TimePartition {
        /// The partitioned tables retention drops partitions of, and how their partitions are named.
        enum Kind {
            /// `readings_YYYYMMDD`, by `farmgate_create_partitions`.
            case readings
            /// `rollups_1m_YYYYMM`, by `farmgate_create_rollup_partitions`.
            case minuteRollups

            var parent: String {
                switch self {
                case .readings: "readings"
                case .minuteRollups: RollupLevel.minute.table
                }
            }

            var defaultPartition: String { parent + "_default" }

            /// The partition key: the first timestamp of a chunk, the start of a 1-minute bucket.
            var key: String {
                switch self {
                case .readings: "first_ts"
                case .minuteRollups: "bucket_us"
                }
            }

            /// The storage parameters of a new partition (see ``PostgresSchema/updateRoom``).
            var storage: String {
                switch self {
                case .readings: ""
                case .minuteRollups: " WITH (fillfactor = \(PostgresSchema.minuteRollupFillFactor))"
                }
            }

            /// The partition names' pattern (a constant of this code, never input).
            var pattern: String {
                switch self {
                case .readings: "^readings_[0-9]{8}$"
                case .minuteRollups: "^rollups_1m_[0-9]{6}$"
                }
            }

            /// The range `[start, end)` (UTC microseconds) a partition of this kind named `name` holds.
            func range(of name: String) -> (start: Int64, end: Int64)? {
                switch self {
                case .readings:
                    guard let start = PostgresIngestStore.dayStart(of: name) else { return nil }
                    return (start, start + RollupLevel.day.width)
                case .minuteRollups:
                    return PostgresIngestStore.monthRange(of: name)
                }
            }
        }

        var name: String
        var start: Int64
        var end: Int64
    }

    /// What `partition` holds, counted (not PostgreSQL's estimate, `reltuples`, which stays 0 until the table was first
    /// analysed): readings for a daily partition of readings (the chunks' readings), rows for a month of 1-minute
    /// rollups. A scan of a partition about to go, which nothing writes any more; it takes no lock that a write waits for.
    static func rows(in partition: TimePartition, of kind: TimePartition.Kind, on connection: PostgresConnection, logger: Logger) async throws -> Int {
        let counted: PostgresQuery
        switch kind {
        case .readings: counted = "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM \(unescaped: partition.name)"
        case .minuteRollups: counted = "SELECT count(*)::int8 FROM \(unescaped: partition.name)"
        }
        var count = 0
        for try await value in try await connection.query(counted, logger: logger).decode(Int64.self) { count = Int(value) }
        return count
    }

    /// The partitions of `kind` (by their names), oldest first; the default partition is not among them.
    static func partitions(of kind: TimePartition.Kind, on connection: PostgresConnection, logger: Logger) async throws -> [TimePartition] {
        var partitions: [TimePartition] = []
        for try await name in try await connection.query(
            """
            SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = \(kind.parent)::regclass AND c.relname ~ \(kind.pattern)
            """, logger: logger
        ).decode(String.self) {
            guard let range = kind.range(of: name) else { continue }
            partitions.append(TimePartition(name: name, start: range.start, end: range.end))
        }
        return partitions.sorted { $0.start < $1.start }
    }

    /// The start (UTC microseconds) of the day a partition named `readings_YYYYMMDD` holds.
    static func dayStart(of name: String) -> Int64? {
        let digits = name.dropFirst("readings_".count)
        guard digits.count == 8, let year = Int(digits.prefix(4)), let month = Int(digits.dropFirst(4).prefix(2)), let day = Int(digits.suffix(2)) else {
            return nil
        }
        return utcStart(year: year, month: month, day: day)
    }

    /// The range (UTC microseconds) of the month a partition named `rollups_1m_YYYYMM` holds: its first day's start to
    /// the next month's.
    static func monthRange(of name: String) -> (start: Int64, end: Int64)? {
        let digits = name.dropFirst("rollups_1m_".count)
        guard digits.count == 6, let year = Int(digits.prefix(4)), let month = Int(digits.suffix(2)), (1...12).contains(month),
            let start = utcStart(year: year, month: month, day: 1),
            let end = utcStart(year: month == 12 ? year + 1 : year, month: month == 12 ? 1 : month + 1, day: 1)
        else { return nil }
        return (start, end)
    }

    /// The start (UTC microseconds) of a calendar day.
    private static func utcStart(year: Int, month: Int, day: Int) -> Int64? {
        var calendar = Calendar(identifier: .gregorian)
        guard let utc = TimeZone(identifier: "UTC") else { return nil }
        calendar.timeZone = utc
        guard let date = calendar.date(from: DateComponents(year: year, month: month, day: day)) else { return nil }
        return Int64(date.timeIntervalSince1970) * 1_000_000
    }

    /// Deletes (or counts) the outbox rows that match `condition` (a constant text that ends with the comparison the
    /// cut-off completes, as a bind parameter).
    private static func purgeOutbox(
        _ condition: String, before cutoff: Timestamp, dryRun: Bool, on connection: PostgresConnection, logger: Logger
    ) async throws -> Int {
        let sql: PostgresQuery = dryRun
            ? "SELECT count(*)::int8 FROM alert_outbox WHERE \(unescaped: condition)\(cutoff.microseconds)"
            : "WITH gone AS (DELETE FROM alert_outbox WHERE \(unescaped: condition)\(cutoff.microseconds) RETURNING 1) SELECT count(*)::int8 FROM gone"
        var count = 0
        for try await value in try await connection.query(sql, logger: logger).decode(Int64.self) { count = Int(value) }
        return count
    }

    /// Deletes (or counts) the alert transitions recorded before `cutoff`, in one statement of the run's transaction:
    /// every one but its alert's newest (a newer one of the same alert exists in the statement's snapshot, so the
    /// newest stays even when a transition is written meanwhile), and none of an alert whose late report is due (it is
    /// gathering a backlog, and the report reads the alert's history; see ``AlertEngine``).
    ///
    /// The engine takes an alert's newest transition as its latest change (`max(id)` for a late report's notification).
    /// Ids come from an identity sequence and are never handed out again, so an idempotency key
    /// `farmgate-<alert>-<transition>-<receiver>` never names two transitions. Outbox rows keep their transition's id as
    /// a number (no foreign key) and their payload whole: a notification still pending or delivered is not changed
    /// when its transition goes. The rows are found by `alert_transitions_by_recorded`, each one's newer one by
    /// `alert_transitions_newest` (migration 12). The engine only inserts transitions and marks an alert's unnotified
    /// ones (a late report's, excluded here), so it never waits for this statement's row locks.
    private static func purgeAlertHistory(before cutoff: Timestamp, dryRun: Bool, on connection: PostgresConnection, logger: Logger) async throws -> Int {
        // A constant of this code; the cut-off is a bind parameter.
        let deletable = """
            AND t.alert_id NOT IN (SELECT id FROM alerts WHERE late_due_us IS NOT NULL)
            AND EXISTS (SELECT 1 FROM alert_transitions n WHERE n.alert_id = t.alert_id AND n.id > t.id)
            """
        let sql: PostgresQuery = dryRun
            ? "SELECT count(*)::int8 FROM alert_transitions t WHERE t.recorded_at_us < \(cutoff.microseconds) \(unescaped: deletable)"
            : """
            WITH gone AS (DELETE FROM alert_transitions t WHERE t.recorded_at_us < \(cutoff.microseconds) \(unescaped: deletable) RETURNING 1)
            SELECT count(*)::int8 FROM gone
            """
        var count = 0
        for try await value in try await connection.query(sql, logger: logger).decode(Int64.self) { count = Int(value) }
        return count
    }

    /// Deletes (or counts) the rows of `table` before `cutoff`, by primary key per sensor where there is one. `table` is
    /// a name of this code or of a partition it listed (never input).
    private static func purge(
        _ table: String, key: String, before cutoff: Timestamp, dryRun: Bool, on connection: PostgresConnection, logger: Logger
    ) async throws -> Int {
        let sql: PostgresQuery
        if table == TimePartition.Kind.readings.defaultPartition {
            // Readings are chunks (``PostgresReadingChunk``) that never cross a UTC day, and the cutoff is the start of
            // a day: a chunk whose last reading is before it is old as a whole. Counted in readings, not chunks.
            sql = dryRun
                ? "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM readings_default WHERE last_ts < \(cutoff.microseconds)"
                : "WITH gone AS (DELETE FROM readings_default WHERE last_ts < \(cutoff.microseconds) RETURNING cardinality(reading_values) AS n) SELECT coalesce(sum(n), 0)::int8 FROM gone"
        } else {
            // The primary key (sensor_id, bucket_us): one index range per sensor instead of a scan of the table.
            let rows = "SELECT r.sensor_id, r.bucket_us FROM sensors s JOIN \(table) r ON r.sensor_id = s.id AND r.bucket_us < \(cutoff.microseconds)"
            sql = dryRun
                ? "SELECT count(*)::int8 FROM (\(unescaped: rows)) AS old"
                : "WITH gone AS (DELETE FROM \(unescaped: table) WHERE (sensor_id, bucket_us) IN (\(unescaped: rows)) RETURNING 1) SELECT count(*)::int8 FROM gone"
        }
        var count = 0
        for try await value in try await connection.query(sql, logger: logger).decode(Int64.self) { count = Int(value) }
        return count
    }
}
