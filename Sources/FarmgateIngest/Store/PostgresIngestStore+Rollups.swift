import FarmgateWire
import Logging
import PostgresNIO

/// Rollups on PostgreSQL: merged by the write transaction's last statement (``PostgresBatchWriter``), read by the range
/// query at 1m, 1h or 1d.
extension PostgresIngestStore {
    public func rollups(sensorRowID: Int64, level: RollupLevel, from: Timestamp?, to: Timestamp?, limit: Int) async throws -> [RollupPoint] {
        try await rows(Self.rollupQuery(sensorRowID: sensorRowID, level: level, from: from, to: to, limit: limit)) { row in
            var cells = PostgresCellReader(row)
            return RollupPoint(
                start: try cells.int64(), count: try cells.int64(), validCount: try cells.int64(), sum: try cells.double(), min: try cells.optionalDouble(),
                max: try cells.optionalDouble(), lastTimestamp: try cells.optionalInt64(), last: try cells.optionalDouble())
        }
    }

    /// The range query of ``rollups(sensorRowID:level:from:to:limit:)``: a range of the primary key `(sensor_id,
    /// bucket_us)`. On `rollups_1m`, partitioned by month, the bounds on `bucket_us` (bind parameters, which the server
    /// plans with their values) prune the scan to the months the range spans: one or two for a day.
    static func rollupQuery(sensorRowID: Int64, level: RollupLevel, from: Timestamp?, to: Timestamp?, limit: Int) -> PostgresQuery {
        let low = from.map { level.bucket(of: $0.microseconds) } ?? Int64.min
        return """
            SELECT bucket_us, count::int8, valid_count::int8, sum_value, min_value, max_value, last_us, last_value FROM \(unescaped: level.table)
            WHERE sensor_id = \(sensorRowID) AND bucket_us >= \(low) AND bucket_us < \(to?.microseconds ?? Int64.max)
            ORDER BY bucket_us LIMIT \(limit)
            """
    }

    public func storedReadingCount(sensorRowID: Int64, from: Timestamp, to: Timestamp) async throws -> Int {
        guard let (first, last) = RollupLevel.hour.wholeBuckets(from: from, to: to) else { return 0 }
        let found = try await rows(
            """
            SELECT coalesce(sum(count), 0)::int8 FROM rollups_1h
            WHERE sensor_id = \(sensorRowID) AND bucket_us >= \(first) AND bucket_us <= \(last)
            """
        ) { try $0.decode(Int64.self) }
        return Int(found.first ?? 0)
    }

    public func appliedRawCutoff() async throws -> Timestamp? {
        try await rows("SELECT raw_us FROM retention_cutoff WHERE id = 1") { Timestamp(microseconds: try $0.decode(Int64.self)) }.first
    }

    /// ``appliedRawCutoff()`` on `connection` (inside a transaction: the write path's, a retention run's).
    static func appliedRawCutoff(on connection: PostgresConnection, logger: Logger) async throws -> Timestamp? {
        var cutoff: Timestamp?
        for try await raw in try await connection.query("SELECT raw_us FROM retention_cutoff WHERE id = 1", logger: logger).decode(Int64.self) {
            cutoff = Timestamp(microseconds: raw)
        }
        return cutoff
    }

    public func appliedRollupCutoffs() async throws -> [RollupLevel: Timestamp] {
        let found = try await rows("SELECT level, cutoff_us FROM rollup_cutoffs") { row in
            let (level, cutoff) = try row.decode((String, Int64).self)
            return (RollupLevel(rawValue: level), Timestamp(microseconds: cutoff))
        }
        var cutoffs: [RollupLevel: Timestamp] = [:]
        for (level, cutoff) in found { if let level { cutoffs[level] = cutoff } }
        return cutoffs
    }
}
