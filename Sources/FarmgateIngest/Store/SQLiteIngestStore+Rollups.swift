import FarmgateSupport
import FarmgateWire

/// Rollups on SQLite: merged in the write transaction, read by the range query at 1m, 1h or 1d.
extension SQLiteIngestStore {
    /// Merges `fresh` (the readings the transaction stored for the first time, ``StoreOutcome/fresh``) into the
    /// 1-minute, 1-hour and 1-day rollups, inside the caller's write transaction on the writer thread: the partial
    /// aggregates are computed first (one per sensor and bucket), then one cached upsert statement per level runs once
    /// per partial. Duplicates are not in `fresh`, so nothing counts twice; a late backlog merges into its old buckets.
    static func rollups(_ fresh: [CommittedReading], in db: CachedConnection) throws {
        guard !fresh.isEmpty else { return }
        for (level, partials) in zip(RollupLevel.allCases, RollupPartial.partialsByLevel(of: fresh)) {
            let upsert = try db.statement(
                """
                INSERT INTO \(level.table) (sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_sequence, last_value)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                \(RollupSQL.merge(table: level.table))
                """)
            for partial in partials {
                let valid = partial.validCount > 0
                try upsert.run([
                    .integer(partial.sensorRowID), .integer(partial.bucket), .integer(partial.count), .integer(partial.validCount), .real(partial.sum),
                    valid ? .real(partial.min) : .null, valid ? .real(partial.max) : .null, valid ? .integer(partial.lastTimestamp) : .null,
                    valid ? .integer(partial.lastSequence) : .null, valid ? .real(partial.lastValue) : .null,
                ])
            }
        }
    }

    public func rollups(sensorRowID: Int64, level: RollupLevel, from: Timestamp?, to: Timestamp?, limit: Int) async throws -> [RollupPoint] {
        let low = from.map { level.bucket(of: $0.microseconds) } ?? Int64.min
        let high = to?.microseconds ?? Int64.max
        return try await reader.withValue { db in
            try db.withStatement(
                """
                SELECT bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_value FROM \(level.table)
                WHERE sensor_id = ? AND bucket_us >= ? AND bucket_us < ? ORDER BY bucket_us LIMIT ?
                """, [.integer(sensorRowID), .integer(low), .integer(high), .integer(Int64(limit))]
            ) { statement throws -> [RollupPoint] in
                var points: [RollupPoint] = []
                while try statement.step() {
                    points.append(
                        RollupPoint(
                            start: statement.int64(0), count: statement.int64(1), validCount: statement.int64(2), sum: statement.double(3),
                            min: statement.isNull(4) ? nil : statement.double(4), max: statement.isNull(5) ? nil : statement.double(5),
                            lastTimestamp: statement.isNull(6) ? nil : statement.int64(6), last: statement.isNull(7) ? nil : statement.double(7)))
                }
                return points
            }
        }
    }

    public func storedReadingCount(sensorRowID: Int64, from: Timestamp, to: Timestamp) async throws -> Int {
        guard let (first, last) = RollupLevel.hour.wholeBuckets(from: from, to: to) else { return 0 }
        return try await reader.withValue { db in
            try db.withStatement(
                "SELECT coalesce(sum(count), 0) FROM rollups_1h WHERE sensor_id = ? AND bucket_us >= ? AND bucket_us <= ?",
                [.integer(sensorRowID), .integer(first), .integer(last)]
            ) { statement in
                try statement.step() ? Int(statement.int64(0)) : 0
            }
        }
    }

    public func appliedRawCutoff() async throws -> Timestamp? {
        try await reader.withValue { db in try Self.retentionCutoff(in: db) }
    }

    public func appliedRollupCutoffs() async throws -> [RollupLevel: Timestamp] {
        try await reader.withValue { db in
            var cutoffs: [RollupLevel: Timestamp] = [:]
            try db.withStatement("SELECT level, cutoff_us FROM rollup_cutoffs", []) { statement in
                while try statement.step() {
                    if let level = RollupLevel(rawValue: statement.text(0)) { cutoffs[level] = Timestamp(microseconds: statement.int64(1)) }
                }
            }
            return cutoffs
        }
    }
}
