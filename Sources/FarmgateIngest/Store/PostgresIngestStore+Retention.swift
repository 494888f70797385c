import FarmgateWire
import Foundation
import Logging
import PostgresNIO

/// Retention on PostgreSQL: whole daily partitions dropped, once across instances.
extension PostgresIngestStore: RetentionStore {
    /// Removes what lies before the cut-offs in one transaction that holds the retention advisory lock
    /// (`pg_try_advisory_xact_lock`: an instance that finds it taken skips, it never waits), so that with several
    /// instances each run happens once; a scheduled run also skips when `maintenance_runs` says another instance
    /// completed one less than ``RetentionRunOptions/skipIfRanWithin`` ago.
    ///
    /// In that transaction, in this order: rollup rows before their levels' cut-offs are deleted (one statement per
    /// level, by primary key per sensor); rows of the default partition before the raw cut-off are deleted (it holds
    /// only readings that fell outside every daily partition, such as a backlog older than the first one); then every
    /// daily partition `readings_YYYYMMDD` that ends at or before the raw cut-off is dropped. A drop locks `readings`
    /// for a moment, so the drops come last, just before the commit, under a `lock_timeout` of 10 s (a run that cannot
    /// get the lock fails and the next one tries again). `stored_sequences` is never touched: a reading sent again after
    /// its partition was dropped is still a duplicate.
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
                if let window = options.skipIfRanWithin {
                    for try await finished in try await connection.query(
                        "SELECT finished_at_us FROM maintenance_runs WHERE job = 'retention'", logger: logger
                    ).decode(Int64.self) {
                        let windowMicroseconds = window.components.seconds * 1_000_000 + window.components.attoseconds / 1_000_000_000_000
                        if now.microseconds - finished < windowMicroseconds, finished <= now.microseconds {
                            return .skip(.ranRecently(Timestamp(microseconds: finished)), retention: retention, now: now, dryRun: options.dryRun)
                        }
                    }
                }
                var report = empty
                for level in RollupLevel.allCases {
                    guard let cutoff = report.rollupCutoffs[level] else { continue }
                    report.rollupRowsDeleted[level] = try await Self.purge(
                        level.table, key: "bucket_us", before: cutoff, dryRun: options.dryRun, on: connection, logger: logger)
                }
                if let cutoff = report.rawCutoff {
                    report.rawRowsDeleted = try await Self.purge(
                        "readings_default", key: "last_ts", before: cutoff, dryRun: options.dryRun, on: connection, logger: logger)
                    let partitions = try await Self.dailyPartitions(on: connection, logger: logger)
                    for partition in partitions where partition.end <= cutoff.microseconds {
                        report.partitionsDropped.append(partition.name)
                        report.rowsInDroppedPartitions += partition.estimatedRows
                        if !options.dryRun {
                            try await connection.query("DROP TABLE \(unescaped: "\"" + partition.name + "\"")", logger: logger)
                        }
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
                report.duration = ContinuousClock.now - started
                if !options.dryRun {
                    let summary = report.lines.joined(separator: "; ")
                    try await connection.query(
                        """
                        INSERT INTO maintenance_runs(job, finished_at_us, summary) VALUES ('retention', \(now.microseconds), \(summary))
                        ON CONFLICT (job) DO UPDATE SET finished_at_us = excluded.finished_at_us, summary = excluded.summary
                        """, logger: logger)
                }
                return report
            }
        } catch let error as PostgresTransactionError {
            if let inner = error.closureError ?? error.commitError ?? error.beginError { throw inner }
            throw error
        }
    }

    /// A daily partition of `readings` and the range it holds.
    struct DailyPartition {
        var name: String
        var start: Int64
        var end: Int64
        var estimatedRows: Int
    }

    /// The daily partitions of `readings` (named `readings_YYYYMMDD` by `farmgate_create_partitions`), oldest first.
    static func dailyPartitions(on connection: PostgresConnection, logger: Logger) async throws -> [DailyPartition] {
        var partitions: [DailyPartition] = []
        for try await (name, tuples) in try await connection.query(
            """
            SELECT c.relname::text, c.reltuples::float8 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'readings'::regclass AND c.relname ~ '^readings_[0-9]{8}$'
            """, logger: logger
        ).decode((String, Double).self) {
            guard let start = dayStart(of: name) else { continue }
            partitions.append(DailyPartition(name: name, start: start, end: start + RollupLevel.day.width, estimatedRows: tuples > 0 ? Int(tuples) : 0))
        }
        return partitions.sorted { $0.start < $1.start }
    }

    /// The start (UTC microseconds) of the day a partition named `readings_YYYYMMDD` holds.
    static func dayStart(of name: String) -> Int64? {
        let digits = name.dropFirst("readings_".count)
        guard digits.count == 8, let year = Int(digits.prefix(4)), let month = Int(digits.dropFirst(4).prefix(2)), let day = Int(digits.suffix(2)) else {
            return nil
        }
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

    /// Deletes (or counts) the rows of `table` before `cutoff`, by primary key per sensor where there is one.
    private static func purge(
        _ table: String, key: String, before cutoff: Timestamp, dryRun: Bool, on connection: PostgresConnection, logger: Logger
    ) async throws -> Int {
        let sql: PostgresQuery
        if table == "readings_default" {
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
