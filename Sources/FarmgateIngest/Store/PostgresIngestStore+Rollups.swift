import FarmgateWire
import Logging
import PostgresNIO

/// Rollups on PostgreSQL: merged in the write transaction, read by the range query at 1m, 1h or 1d.
extension PostgresIngestStore {
    /// Merges `fresh` (the readings this transaction stored for the first time, ``StoreOutcome/fresh``) into the
    /// 1-minute, 1-hour and 1-day rollups: one `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE` per level,
    /// whatever the number of readings, on `connection` inside the caller's write transaction, so that the rollups
    /// commit (or roll back) with the readings. The partial aggregates are computed here first (one row per sensor and
    /// bucket), so a batch of 1000 readings of 60 sensors over three minutes upserts about 240 + 60 + 60 rows.
    ///
    /// Duplicates never reach it (they are not in `fresh`), so nothing is counted twice; a backlog days late merges
    /// into the old buckets like any other readings. Rows are upserted in (sensor, bucket) order; a sensor belongs to
    /// one device, whose batches the write transaction serialises, so two transactions never wait on the same rows.
    func rollups(_ fresh: [CommittedReading], on connection: PostgresConnection) async throws {
        guard !fresh.isEmpty else { return }
        for level in RollupLevel.allCases {
            let partials = RollupPartial.partials(of: fresh, at: level)
            let sensors = partials.map(\.sensorRowID)
            let buckets = partials.map(\.bucket)
            let counts = partials.map(\.count)
            let valid = partials.map(\.validCount)
            let sums = partials.map(\.sum)
            let mins = partials.map(\.min)
            let maxes = partials.map(\.max)
            let lastTimes = partials.map(\.lastTimestamp)
            let lastSequences = partials.map(\.lastSequence)
            let lastValues = partials.map(\.lastValue)
            try await connection.query(
                """
                INSERT INTO \(unescaped: level.table) (sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_sequence, last_value)
                SELECT k, b, n, v, s, CASE WHEN v > 0 THEN lo END, CASE WHEN v > 0 THEN hi END, CASE WHEN v > 0 THEN lt END,
                    CASE WHEN v > 0 THEN ls END, CASE WHEN v > 0 THEN lv END
                FROM unnest(\(sensors)::int8[], \(buckets)::int8[], \(counts)::int8[], \(valid)::int8[], \(sums)::float8[], \(mins)::float8[],
                    \(maxes)::float8[], \(lastTimes)::int8[], \(lastSequences)::int8[], \(lastValues)::float8[]) AS u(k, b, n, v, s, lo, hi, lt, ls, lv)
                \(unescaped: RollupSQL.merge(table: level.table))
                """, logger: logger)
        }
    }

    public func rollups(sensorRowID: Int64, level: RollupLevel, from: Timestamp?, to: Timestamp?, limit: Int) async throws -> [RollupPoint] {
        let low = from.map { level.bucket(of: $0.microseconds) } ?? Int64.min
        return try await rows(
            """
            SELECT bucket_us, count::int8, valid_count::int8, sum_value, min_value, max_value, last_us, last_value FROM \(unescaped: level.table)
            WHERE sensor_id = \(sensorRowID) AND bucket_us >= \(low) AND bucket_us < \(to?.microseconds ?? Int64.max)
            ORDER BY bucket_us LIMIT \(limit)
            """
        ) { row in
            let (start, count, valid, sum, min, max, lastTime, last) = try row.decode((Int64, Int64, Int64, Double, Double?, Double?, Int64?, Double?).self)
            return RollupPoint(start: start, count: count, validCount: valid, sum: sum, min: min, max: max, lastTimestamp: lastTime, last: last)
        }
    }

    public func storedReadingCount(sensorRowID: Int64, from: Timestamp, to: Timestamp) async throws -> Int {
        let found = try await rows(
            """
            SELECT coalesce(sum(count), 0)::int8 FROM rollups_1h
            WHERE sensor_id = \(sensorRowID) AND bucket_us >= \(RollupLevel.hour.bucket(of: from.microseconds)) AND bucket_us < \(to.microseconds)
            """
        ) { try $0.decode(Int64.self) }
        return Int(found.first ?? 0)
    }
}
