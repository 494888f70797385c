import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import Metrics
import PostgresNIO

/// Partition maintenance on PostgreSQL: the daily partitions of `readings` and the monthly ones of `rollups_1m` made
/// ahead of the clock, and the rows that waited for them in the default partitions moved in.
extension PostgresIngestStore {
    /// How many partitions one ``createPartitions(now:)`` created, and how many rows it moved into them.
    public struct CreatedPartitions: Sendable, Hashable {
        /// Daily partitions of `readings` (`readings_YYYYMMDD`).
        public var readings: Int
        /// Monthly partitions of `rollups_1m` (`rollups_1m_YYYYMM`).
        public var minuteRollups: Int
        /// Rows (chunks of readings) moved from `readings_default` into the new daily partitions.
        public var readingRowsMoved: Int
        /// Rows moved from `rollups_1m_default` into the new monthly partitions.
        public var minuteRollupRowsMoved: Int
        /// The names of the partitions created, in the order they were.
        public var names: [String]

        public init(readings: Int, minuteRollups: Int, readingRowsMoved: Int = 0, minuteRollupRowsMoved: Int = 0, names: [String] = []) {
            self.readings = readings
            self.minuteRollups = minuteRollups
            self.readingRowsMoved = readingRowsMoved
            self.minuteRollupRowsMoved = minuteRollupRowsMoved
            self.names = names
        }
    }

    /// The `statement_timeout` of partition maintenance's transactions: its own, not `query_timeout`, because moving a
    /// day's rows out of a large default partition takes as long as it takes (as for retention).
    static let partitionStatementTimeout: Duration = .seconds(1800)
    /// The `lock_timeout` of partition maintenance's transactions: how long it may wait for a table lock (and so hold
    /// up the statements queued behind its request) before it lets go and tries again. Below PostgreSQL's default
    /// `deadlock_timeout` (1 s), so that in a lock cycle with a write it is maintenance that gives way.
    static let partitionLockTimeout: Duration = .milliseconds(500)
    /// How long one partition is retried while its tables stay locked by others; then ``createPartitions(now:)`` fails
    /// (logged) and the next maintenance (six hours later, or the next start) tries again.
    static let partitionLockRetryBudget: Duration = .seconds(120)

    /// One partition to make: `[start, end)` in UTC microseconds of `kind`'s partition key.
    struct PartitionToCreate: Sendable {
        var kind: TimePartition.Kind
        var name: String
        var start: Int64
        var end: Int64
    }

    /// Creates the partitions that do not exist yet: of `readings` for yesterday through ``partitionDaysAhead`` days
    /// ahead, of `rollups_1m` for last month through ``rollupPartitionMonthsAhead`` months ahead (UTC), except those
    /// that end by their table's retention cut-off at `now` (``retention``: `raw` for readings, `rollup_1m` for the
    /// rollups), which retention would drop again at its next run (with `rollup_1m` shorter than about two months,
    /// last month's partition was made at every start and every six hours and dropped by every run). What was created
    /// is counted in `farmgate_ingest_partitions_created_total{table}` and logged, with the rows moved out of the
    /// default partitions.
    ///
    /// A partition cannot simply be created while its table's default partition holds rows of its range (PostgreSQL
    /// refuses `CREATE TABLE ... PARTITION OF`), and those rows can be many: readings stamped far outside the prepared
    /// days (a site clock months ahead, a backlog), waiting in `readings_default` or `rollups_1m_default`. So each
    /// partition is made in a transaction of its own (``createPartition(_:)``): a standalone table with the parent's
    /// indexes and a `CHECK` of its range, the default partition's rows of that range moved into it by one `DELETE ...
    /// RETURNING` feeding an `INSERT`, then `ATTACH PARTITION` (which trusts the `CHECK` instead of scanning the new
    /// table, and adopts its indexes instead of building them), then the `CHECK` dropped. ``migrate()`` calls this too.
    /// What that means:
    /// - Readers never miss a row nor see one twice: until the commit they see the rows in the default partition, after
    ///   it in the new one, and one statement deletes exactly what it copies. That needs one more lock when rows moved:
    ///   a query of the parent table that found its partitions before the commit (without the new one) and then waited
    ///   for `ATTACH`'s lock on the default partition would read the default partition after the commit, without the
    ///   rows that left it, and miss them (a test saw it). So when rows moved, the parent table is locked
    ///   `ACCESS EXCLUSIVE` before the attach (then the default partition, `NOWAIT`): queries wait at the parent, and
    ///   find the new partition once they get it. The move is deliberately not cut into transactions of its own: rows
    ///   moved ahead in earlier transactions would be invisible (in a table not attached yet), rows copied ahead would
    ///   still have to be deleted from the default partition in the last one, and a 1-minute rollup row copied ahead
    ///   goes stale when a write merges into it between two such transactions.
    /// - It is not bounded by `query_timeout`: the transaction has its own `statement_timeout` of 30 minutes
    ///   (``partitionStatementTimeout``), so a default partition of any size is moved, where one transaction for every
    ///   partition under `query_timeout` failed every time once the default was large and the partitions were never
    ///   made.
    /// - It never queues the ingest's statements behind it for long: every lock wait is bounded by a `lock_timeout` of
    ///   500 ms (``partitionLockTimeout``, below `deadlock_timeout`), and a transaction that could not get its locks in
    ///   time (or that a write of the same range beat to the default partition, which `ATTACH` then refuses) is rolled
    ///   back and tried again after a growing pause, for up to two minutes per partition. Writes of rows into the
    ///   default partition go on beside the move (it only takes `ROW EXCLUSIVE` there).
    /// - What remains under an `ACCESS EXCLUSIVE` lock, from `ATTACH` to the commit, is PostgreSQL's scan of the
    ///   default partition proving it holds no row of the new range: one sequential read of it (the move's `DELETE`
    ///   reads it once more before, without that lock). When no row moved (the usual case: the partition is made days
    ///   ahead) only the default partition is locked, and only statements that read it (a re-sent batch's comparison,
    ///   reads that cannot prune it) and writes into it wait for the scan; writes that go to their own day and month do
    ///   not. When rows moved, the parent table is locked as well, and every statement on that table waits for the scan.
    ///
    /// Several instances: each partition's transaction holds the advisory lock ``PostgresSchema/partitionLock``
    /// (waiting for it, not bounded by the lock timeout) and skips a partition that exists by then.
    ///
    /// - Parameter now: the day to plan from; nil (what the service and `migrate` pass) reads the database's clock, so
    ///   that instances whose clocks disagree plan the same partitions.
    @discardableResult
    public func createPartitions(now given: Timestamp? = nil) async throws -> CreatedPartitions {
        let now: Timestamp
        if let given {
            now = given
        } else {
            now = try await databaseNow()
        }
        var created = CreatedPartitions(readings: 0, minuteRollups: 0)
        var moved: [TimePartition.Kind: Int] = [:]
        for partition in Self.partitionsAhead(of: now, retention: retention) {
            guard let rows = try await createPartition(partition) else { continue }
            switch partition.kind {
            case .readings: created.readings += 1
            case .minuteRollups: created.minuteRollups += 1
            }
            created.names.append(partition.name)
            moved[partition.kind, default: 0] += rows
        }
        created.readingRowsMoved = moved[.readings] ?? 0
        created.minuteRollupRowsMoved = moved[.minuteRollups] ?? 0
        if created.readings > 0 || created.minuteRollups > 0 {
            readingPartitionsCreated.increment(by: created.readings)
            rollupPartitionsCreated.increment(by: created.minuteRollups)
            logger.info(
                "created partitions ahead",
                metadata: [
                    "store.partitions.readings_created": "\(created.readings)",
                    "store.partitions.readings_from": "\(Self.day(of: Timestamp(microseconds: now.microseconds - 86_400_000_000)))",
                    "store.partitions.readings_moved_rows": "\(moved[.readings] ?? 0)",
                    "store.partitions.rollups_1m_created": "\(created.minuteRollups)", "store.partitions.rollups_1m_from": "\(Self.month(of: now, offset: -1))",
                    "store.partitions.rollups_1m_moved_rows": "\(moved[.minuteRollups] ?? 0)",
                ])
        }
        return created
    }

    /// The partitions that should exist at `now`: `readings` from yesterday through ``partitionDaysAhead`` days ahead,
    /// then `rollups_1m` from last month through ``rollupPartitionMonthsAhead`` months ahead (UTC); with `retention`,
    /// none that ends at or before its table's cut-off at `now` (``IngestConfiguration/Retention/cutoff(_:now:)``, the
    /// bound by which a retention run drops a partition). What arrives for such a range waits in the default partition,
    /// where the next retention run deletes it.
    static func partitionsAhead(of now: Timestamp, retention: IngestConfiguration.Retention? = nil) -> [PartitionToCreate] {
        partitionsInWindow(of: now).filter { partition in
            let period = partition.kind == .readings ? retention?.raw : retention?.rollup1m
            guard let cutoff = IngestConfiguration.Retention.cutoff(period, now: now) else { return true }
            return partition.end > cutoff.microseconds
        }
    }

    /// Every partition of the window at `now`, whatever retention keeps.
    private static func partitionsInWindow(of now: Timestamp) -> [PartitionToCreate] {
        var partitions: [PartitionToCreate] = []
        let today = PostgresReadingChunk.day(of: now.microseconds)
        for day in (today - 1)...(today + Int64(partitionDaysAhead)) {
            let start = day * RollupLevel.day.width
            let name = "readings_" + Self.day(of: Timestamp(microseconds: start)).replacingOccurrences(of: "-", with: "")
            partitions.append(PartitionToCreate(kind: .readings, name: name, start: start, end: start + RollupLevel.day.width))
        }
        for offset in -1...rollupPartitionMonthsAhead {
            let first = Self.month(of: now, offset: offset)
            let name = "rollups_1m_" + first.prefix(7).replacingOccurrences(of: "-", with: "")
            guard let range = monthRange(of: name) else { continue }
            partitions.append(PartitionToCreate(kind: .minuteRollups, name: name, start: range.start, end: range.end))
        }
        return partitions
    }

    /// Makes `partition` (see ``createPartitions(now:)``): nil when it already existed, else the rows moved into it
    /// from the default partition. Tried again while its tables are locked by others, for up to
    /// ``partitionLockRetryBudget``.
    func createPartition(_ partition: PartitionToCreate) async throws -> Int? {
        let clock = ContinuousClock()
        let giveUp = clock.now + Self.partitionLockRetryBudget
        var attempts = 0
        while true {
            attempts += 1
            do {
                return try await attemptPartition(partition)
            } catch let error as PSQLError where Self.isPartitionContention(error) {
                // 200 ms, 400 ms, … up to 5 s, half of it random, so that two instances do not keep meeting.
                let ceiling = min(5_000, 100 << min(attempts, 6))
                let pause = Duration.milliseconds(ceiling / 2 + Int.random(in: 0...(ceiling / 2)))
                guard clock.now + pause < giveUp else {
                    throw PostgresStoreError.timedOut(
                        "partition \(partition.name) not created: its tables stayed locked by other transactions (or rows of its range kept arriving in "
                            + "\(partition.kind.defaultPartition)) through \(attempts) attempts over \(Self.partitionLockRetryBudget); the next partition "
                            + "maintenance tries again, and its rows wait in \(partition.kind.defaultPartition) meanwhile. Last error: \(String(reflecting: error))")
                }
                logger.debug(
                    "partition not created yet; trying again",
                    metadata: ["store.partitions.name": "\(partition.name)", "store.partitions.attempt": "\(attempts)", "error": "\(String(reflecting: error))"])
                try await Task.sleep(for: pause)
            }
        }
    }

    /// Another transaction held a lock too long (`lock_not_available`), a lock cycle was broken by aborting this one
    /// (`deadlock_detected`), or `ATTACH` found a row of the new range that a write put into the default partition after
    /// the move (`check_violation`): worth trying again.
    static func isPartitionContention(_ error: PSQLError) -> Bool {
        guard let state = error.serverInfo?[.sqlState] else { return false }
        return [PostgresError.Code.lockNotAvailable.raw, PostgresError.Code.deadlockDetected.raw, PostgresError.Code.checkViolation.raw].contains(state)
    }

    /// One transaction that makes `partition`, or finds that it exists.
    private func attemptPartition(_ partition: PartitionToCreate) async throws -> Int? {
        let logger = self.logger
        return try await transaction(longRunning: (Self.partitionStatementTimeout, "partition maintenance's statement timeout")) { connection in
            try await connection.query("SELECT pg_advisory_xact_lock(\(PostgresSchema.partitionLock))", logger: logger)
            var exists = true
            for try await (_, present) in try await connection.query(
                "SELECT set_config('lock_timeout', \(String(Self.partitionLockTimeout.wholeMilliseconds)), true), to_regclass(\(partition.name)) IS NOT NULL",
                logger: logger
            ).decode((String, Bool).self) { exists = present }
            guard !exists else { return nil }
            // Names and bounds are this code's (digits), never input; DDL takes no bind parameters.
            let table = "\"\(partition.name)\""
            let check = "\"\(partition.name)_range\""
            let key = partition.kind.key
            let parent = partition.kind.parent
            try await connection.query(
                """
                CREATE TABLE \(unescaped: table) (
                    LIKE \(unescaped: parent) INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES,
                    CONSTRAINT \(unescaped: check) CHECK (\(unescaped: key) >= \(unescaped: String(partition.start)) AND \(unescaped: key) < \(unescaped: String(partition.end)))
                )\(unescaped: partition.kind.storage)
                """, logger: logger)
            var moved = 0
            for try await count in try await connection.query(
                """
                WITH moved AS (
                    DELETE FROM \(unescaped: partition.kind.defaultPartition) WHERE \(unescaped: key) >= \(partition.start) AND \(unescaped: key) < \(partition.end)
                    RETURNING *
                ), copied AS (INSERT INTO \(unescaped: table) SELECT * FROM moved RETURNING 1)
                SELECT count(*)::int8 FROM copied
                """, logger: logger
            ).decode(Int64.self) { moved = Int(count) }
            if moved > 0 {
                // See createPartitions: no reader may plan before the commit and read after it. Taken before
                // the default partition's lock, which must then be free at once: the parent is never held
                // while waiting for another transaction to finish with the default partition.
                try await connection.query("LOCK TABLE \(unescaped: parent) IN ACCESS EXCLUSIVE MODE", logger: logger)
                try await connection.query("LOCK TABLE \(unescaped: partition.kind.defaultPartition) IN ACCESS EXCLUSIVE MODE NOWAIT", logger: logger)
            }
            try await connection.query(
                """
                ALTER TABLE \(unescaped: parent) ATTACH PARTITION \(unescaped: table)
                FOR VALUES FROM (\(unescaped: String(partition.start))) TO (\(unescaped: String(partition.end)))
                """, logger: logger)
            // The partition's bound says the same from now on.
            try await connection.query("ALTER TABLE \(unescaped: table) DROP CONSTRAINT \(unescaped: check)", logger: logger)
            return moved
        }
    }

    static func day(of timestamp: Timestamp) -> String {
        let parts = utcParts(of: timestamp)
        return String(format: "%04d-%02d-%02d", parts.year ?? 1970, parts.month ?? 1, parts.day ?? 1)
    }

    /// The first day (`YYYY-MM-01`) of the UTC month `offset` months from the one holding `timestamp`.
    static func month(of timestamp: Timestamp, offset: Int) -> String {
        let parts = utcParts(of: timestamp)
        let index = (parts.year ?? 1970) * 12 + (parts.month ?? 1) - 1 + offset
        let year = index >= 0 ? index / 12 : (index - 11) / 12
        return String(format: "%04d-%02d-01", year, index - year * 12 + 1)
    }

    private static func utcParts(of timestamp: Timestamp) -> DateComponents {
        let date = Date(timeIntervalSince1970: Double(timestamp.microseconds / 1_000_000))
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(identifier: "UTC") ?? calendar.timeZone
        return calendar.dateComponents([.year, .month, .day], from: date)
    }
}
