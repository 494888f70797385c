import FarmgateSupport
import FarmgateWire

/// Retention on SQLite: deletes in small transactions that never stall ingest.
extension SQLiteIngestStore: RetentionStore {
    /// Deletes raw readings and rollup rows before their cut-offs, sensor by sensor, at most
    /// ``RetentionRunOptions/rowsPerTransaction`` rows per transaction. Each transaction is one job on the writer
    /// thread, so a batch that arrives meanwhile runs right after the transaction in progress (a few milliseconds)
    /// instead of after the whole run. The deletes walk `readings_by_sensor_time` and the rollups' primary keys, so a
    /// run costs in proportion to what it removes. Cancelled (graceful shutdown), a run stops between transactions.
    ///
    /// The file does not shrink: the freed pages are reused by new readings (run `VACUUM` by hand to give them back).
    public func runRetention(_ retention: IngestConfiguration.Retention, now: Timestamp, options: RetentionRunOptions) async throws -> RetentionReport {
        let started = ContinuousClock.now
        var report = RetentionReport.empty(retention, now: now, dryRun: options.dryRun)
        let sensors = try await reader.withValue { db in
            try db.withStatement("SELECT id FROM sensors ORDER BY id") { statement throws -> [Int64] in
                var ids: [Int64] = []
                while try statement.step() { ids.append(statement.int64(0)) }
                return ids
            }
        }
        var removed = 0
        /// Deletes (or counts) the rows of `table` before `cutoff`; `key` is the time column, `rowKey` the primary key.
        func purge(_ table: String, key: String, rowKey: String, before cutoff: Timestamp) async throws -> Int {
            var total = 0
            for sensor in sensors {
                if options.dryRun {
                    total += try await reader.withValue { db in
                        try db.withStatement("SELECT count(*) FROM \(table) WHERE sensor_id = ? AND \(key) < ?", [.integer(sensor), .integer(cutoff.microseconds)]) {
                            statement in try statement.step() ? Int(statement.int64(0)) : 0
                        }
                    }
                    continue
                }
                while true {
                    try Task.checkCancellation()
                    let limit = Int64(options.rowsPerTransaction)
                    let deleted = try await writer.withValue { db in
                        try db.connection.transaction { () throws -> Int in
                            try db.statement(
                                """
                                DELETE FROM \(table) WHERE (\(rowKey)) IN (
                                    SELECT \(rowKey) FROM \(table) WHERE sensor_id = ? AND \(key) < ? ORDER BY \(key) LIMIT ?)
                                """
                            ).run([.integer(sensor), .integer(cutoff.microseconds), .integer(limit)])
                            return db.connection.changes
                        }
                    }
                    total += deleted
                    if deleted > 0 {
                        removed += deleted
                        options.progress?(removed)
                    }
                    if deleted < options.rowsPerTransaction { break }
                }
            }
            return total
        }
        if let cutoff = report.rawCutoff {
            report.rawRowsDeleted = try await purge("readings", key: "timestamp_us", rowKey: "device_id, sequence", before: cutoff)
        }
        for level in RollupLevel.allCases {
            guard let cutoff = report.rollupCutoffs[level] else { continue }
            report.rollupRowsDeleted[level] = try await purge(level.table, key: "bucket_us", rowKey: "sensor_id, bucket_us", before: cutoff)
        }
        report.duration = ContinuousClock.now - started
        return report
    }
}
