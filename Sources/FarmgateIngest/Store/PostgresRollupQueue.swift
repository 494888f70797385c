import FarmgateSupport
import FarmgateWire
import Logging
import Metrics
import PostgresNIO

/// Rollups on PostgreSQL are merged beside the write path, not inside it.
///
/// A group's write transaction (``PostgresBatchWriter``) stores its chunks and, in the same statement, one row of
/// `rollup_queue` naming them (first timestamp, device and first sequence of each chunk: the chunk's key, with the
/// partition key first so that the chunks are found by partition pruning). The answer to the agent waits for that
/// commit only. A job in every instance (``mergeRollupsAsQueued()``) then takes queued rows in id order, reads their
/// chunks, aggregates them per sensor and bucket at every level in PostgreSQL, merges the partials into
/// `rollups_1m`, `rollups_1h` and `rollups_1d` with ``RollupSQL/merge(table:excluded:)`` and deletes the rows it took,
/// all in one transaction: a row is merged exactly once, whatever crashes, and a group's readings reach the rollups
/// together. One run merges many groups, so an hour or a day bucket that several groups of a device touch is written
/// once per run, not once per group.
///
/// Why: merging in the write transaction cost about half of the write statement (250–300 upserts per 1000-reading
/// batch) and a fifth of the ingest's CPU per batch, all while the group held its device locks and the agent waited.
///
/// - One run at a time across instances: it holds the advisory lock ``PostgresSchema/rollupLock`` for its transaction
///   (`pg_try_advisory_xact_lock`: the background job skips when another instance runs; what that one leaves behind is
///   taken at the next wake-up, at most a second later).
/// - Reads that answer from rollups (``rollups(sensorRowID:level:from:to:limit:)``, ``storedReadingCount(sensorRowID:from:to:)``)
///   first merge what was queued before them (``settleQueuedRollups()``, waiting for a run in progress), so an
///   acknowledged reading is in every range answer after its acknowledgement, as on SQLite. When nothing is queued that
///   costs one index probe.
/// - Retention merges the queue before it drops partitions, so that no queued chunk vanishes unmerged.
extension PostgresIngestStore {
    /// How many queued rows (groups) one run merges at most: with 1000-reading batches and up to 16 batches a group,
    /// up to a few million readings; their partials are aggregated in one statement.
    static let rollupGroupsPerRun = 200

    /// How long the job lets groups gather after a wake-up before it runs: groups of one device share hour and day
    /// buckets, and merging them in one run writes each bucket once. The rollups are that much behind the raw
    /// readings for the background job; reads never are (they settle the queue first).
    static let rollupGathering: Duration = .milliseconds(200)

    /// The background job: runs after each commit that queued rollups (gathering for ``rollupGathering``) and every
    /// second (for what another instance queued while this one's run was skipped), merging until the queue holds less
    /// than a run's worth. Ends when the task is cancelled.
    func mergeRollupsAsQueued() async {
        let groupsMerged = Counter(label: "farmgate_ingest_rollup_groups_merged_total")
        let queued = Gauge(label: "farmgate_ingest_rollup_queue_groups")
        let failures = Counter(label: "farmgate_ingest_rollup_merge_failures_total")
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                while !Task.isCancelled {
                    do { try await Task.sleep(for: .seconds(1)) } catch { return }
                    self.rollupWakeups.continuation.yield()
                }
            }
            for await _ in rollupWakeups.stream {
                do {
                    try await Task.sleep(for: Self.rollupGathering)
                    while let merged = try await mergeQueuedRollups(wait: false) {
                        groupsMerged.increment(by: merged)
                        if merged < Self.rollupGroupsPerRun { break }
                    }
                    queued.record(try await rows("SELECT count(*)::int8 FROM rollup_queue") { try $0.decode(Int64.self) }.first ?? 0)
                } catch is CancellationError {
                    break
                } catch {
                    if Task.isCancelled { break }
                    failures.increment()
                    logger.warning(
                        "cannot merge the queued rollups; they stay queued and are merged at the next attempt",
                        metadata: ["error": "\(String(reflecting: error))"])
                }
            }
            group.cancelAll()
        }
    }

    /// Wakes the background job: a commit queued rollups.
    func rollupsQueued() { rollupWakeups.continuation.yield() }

    /// Merges everything queued before this call, waiting for a run another caller or instance has in progress.
    func settleQueuedRollups() async throws {
        // One index probe when nothing is queued: the common case of a read.
        guard let newest = try await rows("SELECT max(id) FROM rollup_queue") { try $0.decode(Int64?.self) }.first ?? nil else { return }
        while let merged = try await mergeQueuedRollups(upTo: newest, wait: true), merged == Self.rollupGroupsPerRun {}
    }

    /// One run: takes up to ``rollupGroupsPerRun`` queued rows (those with an id up to `newest`, when given), merges
    /// their chunks' readings into every rollup level and deletes the rows, in one transaction.
    ///
    /// - Parameter wait: whether to wait for a run in progress elsewhere (`pg_advisory_xact_lock`) or to skip
    ///   (`pg_try_advisory_xact_lock`).
    /// - Returns: how many rows were merged; nil when skipped because another run holds the lock.
    func mergeQueuedRollups(upTo newest: Int64? = nil, wait: Bool) async throws -> Int? {
        let logger = self.logger
        return try await transaction { connection in
            if wait {
                try await connection.query("SELECT pg_advisory_xact_lock(\(PostgresSchema.rollupLock))", logger: logger)
            } else {
                var locked = false
                for try await got in try await connection.query("SELECT pg_try_advisory_xact_lock(\(PostgresSchema.rollupLock))", logger: logger).decode(Bool.self) {
                    locked = got
                }
                guard locked else { return nil }
            }
            var times: [Int64] = [], devices: [Int64] = [], firsts: [Int64] = []
            var claimed = 0
            for try await (t, d, s) in try await connection.query(
                """
                WITH claimed AS (
                    DELETE FROM rollup_queue WHERE id IN (
                        SELECT id FROM rollup_queue WHERE id <= \(newest ?? Int64.max) ORDER BY id LIMIT \(Self.rollupGroupsPerRun)
                    )
                    RETURNING first_ts, device_ids, first_sequences
                )
                SELECT first_ts, device_ids::int8[], first_sequences FROM claimed
                """, logger: logger
            ).decode(([Int64], [Int64], [Int64]).self) {
                guard t.count == d.count, t.count == s.count else {
                    throw IngestStoreError.corrupt("a rollup_queue row whose arrays differ in length (\(t.count), \(d.count), \(s.count))")
                }
                times += t
                devices += d
                firsts += s
                claimed += 1
            }
            guard claimed > 0 else { return 0 }
            try await connection.query(
                """
                WITH queued AS (SELECT * FROM unnest(\(times)::int8[], \(devices)::int8[], \(firsts)::int8[]) AS q(t, d, s)),
                r AS MATERIALIZED (
                    SELECT c.sensor_id AS k, c.first_ts + o.t AS ts, c.first_sequence + o.s AS seq, o.v,
                        coalesce(c.flags[o.p], 0) & \(Int16(bitPattern: QualityFlags.sensorFault.rawValue)) = 0 AS ok
                    FROM readings c
                    JOIN queued ON c.first_ts = queued.t AND c.device_id = queued.d AND c.first_sequence = queued.s
                    CROSS JOIN LATERAL unnest(c.time_offsets, c.sequence_offsets, c.reading_values) WITH ORDINALITY AS o(t, s, v, p)
                    WHERE c.first_ts = ANY(\(times)::int8[])
                ), partials AS (
                    SELECT l.level, r.k, r.ts - ((r.ts % l.w) + l.w) % l.w AS b, count(*) AS n, count(*) FILTER (WHERE r.ok) AS v,
                        coalesce(sum(r.v) FILTER (WHERE r.ok), 0) AS s, min(r.v) FILTER (WHERE r.ok) AS lo, max(r.v) FILTER (WHERE r.ok) AS hi,
                        (array_agg(r.ts ORDER BY r.ts DESC, r.seq DESC) FILTER (WHERE r.ok))[1] AS lt,
                        (array_agg(r.seq ORDER BY r.ts DESC, r.seq DESC) FILTER (WHERE r.ok))[1] AS ls,
                        (array_agg(r.v ORDER BY r.ts DESC, r.seq DESC) FILTER (WHERE r.ok))[1] AS lv
                    FROM r CROSS JOIN (VALUES \(unescaped: Self.rollupLevelValues)) AS l(level, w)
                    GROUP BY 1, 2, 3
                ), \(unescaped: Self.rollupInserts)
                SELECT 1
                """, logger: logger)
            return claimed
        }
    }

    /// `(index, width)` of every level, for the merge statement's `VALUES` list.
    private static let rollupLevelValues = RollupLevel.allCases.enumerated().map { "(\($0.offset)::int2, \($0.element.width)::int8)" }.joined(separator: ", ")

    /// One CTE per level: `INSERT INTO rollups_<level> ... SELECT FROM partials WHERE level = <index> ON CONFLICT ...`
    /// (statistics only from valid readings, NULL when none was). Rows go in (sensor, bucket) order.
    private static let rollupInserts = RollupLevel.allCases.enumerated().map { index, level in
        """
        rollup_\(index) AS (
            INSERT INTO \(level.table) (sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_sequence, last_value)
            SELECT k, b, n, v, s, CASE WHEN v > 0 THEN lo END, CASE WHEN v > 0 THEN hi END, CASE WHEN v > 0 THEN lt END,
                CASE WHEN v > 0 THEN ls END, CASE WHEN v > 0 THEN lv END
            FROM partials WHERE level = \(index) ORDER BY k, b
            \(RollupSQL.merge(table: level.table))
        )
        """
    }.joined(separator: ", ")
}
