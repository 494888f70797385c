import FarmgateWire
import Foundation
import PostgresNIO
import Synchronization
import Testing

@testable import FarmgateIngest

/// Partition maintenance on PostgreSQL with a large default partition: it is not bounded by `query_timeout`, readers
/// see every row exactly once throughout, and it lets go of locks it cannot get at once instead of queueing the
/// ingest's statements behind it.
@Suite struct PartitionMaintenanceTests {
    static let day: Int64 = 86_400_000_000
    /// 2026-03-02: the days made around it (2026-03-01 through 03-09) and April and May 2026 are not made around testNow.
    static let later = Timestamp(microseconds: testNow.microseconds + 60 * day)
    /// 2026-03-05, one of those days; 2026-04-01, one of those months.
    static let movedDay = testNow.microseconds + 63 * day
    static let april = testNow.microseconds + 90 * day
    /// 200 days ahead of testNow: beyond every partition made in these tests.
    static let farAhead = testNow.microseconds + 200 * day

    /// Fills the default partitions straight through SQL (through the store it would take minutes): `moved` one-reading
    /// chunks of 2026-03-05 and `kept` chunks 200 days ahead in `readings_default`; `moved / 3` 1-minute buckets of
    /// April 2026 and `kept / 3` 200 days ahead in `rollups_1m_default`.
    static func fillDefaultPartitions(_ settings: PostgresSettings, moved: Int, kept: Int) async throws {
        func chunks(_ count: Int, from start: Int64, firstSequence: Int) -> String {
            """
            INSERT INTO readings_default (first_ts, last_ts, first_sequence, last_sequence, device_id, sensor_id, sequence_offsets, time_offsets, reading_values)
            SELECT \(start) + i * 1000000, \(start) + i * 1000000, \(firstSequence) + i, \(firstSequence) + i, 1, 1 + i % 60, '{0}', '{0}', ARRAY[6.5::float8]
            FROM generate_series(0::int8, \(count - 1)) AS i
            """
        }
        func buckets(_ count: Int, from start: Int64) -> String {
            """
            INSERT INTO rollups_1m_default (sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_sequence, last_value)
            SELECT 1 + i % 60, \(start) + (i / 60) * 60000000, 6, 6, 39, 6.5, 6.5, \(start) + (i / 60) * 60000000, i, 6.5
            FROM generate_series(0::int8, \(count - 1)) AS i
            """
        }
        try await adminQuery(settings, chunks(moved, from: movedDay, firstSequence: 1))
        try await adminQuery(settings, chunks(kept, from: farAhead, firstSequence: 10_000_000))
        try await adminQuery(settings, buckets(moved / 3, from: april))
        try await adminQuery(settings, buckets(kept / 3, from: farAhead))
        try await adminQuery(settings, "ANALYZE readings_default")
        try await adminQuery(settings, "ANALYZE rollups_1m_default")
    }

    /// The readings `readings` holds (all partitions), and the rows of `rollups_1m`, as one session sees them.
    static func totals(_ client: PostgresClient) async throws -> (readings: Int, rollups: Int) {
        var totals = (readings: -1, rollups: -1)
        for try await (readings, rollups) in try await client.query(
            "SELECT (SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM readings), (SELECT count(*)::int8 FROM rollups_1m)"
        ).decode((Int, Int).self) { totals = (readings, rollups) }
        return totals
    }

    @Test func aLargeDefaultPartitionMovesIntoNewPartitionsWhateverQueryTimeoutSaysAndReadersSeeEveryRowOnce() async throws {
        try await withTestDatabase { settings in
            let setup = try PostgresIngestStore(settings: settings, logger: testLogger)
            try await withRunning(setup) { _ in
                try await setup.migrate()
                try await setup.createPartitions(now: testNow)
            }
            let moved = 60_000
            let kept = 300_000
            try await Self.fillDefaultPartitions(settings, moved: moved, kept: kept)
            let expected = (readings: moved + kept, rollups: (moved + kept) / 3)

            // An instance whose statements must answer within 250 ms: moving these rows (and proving the default
            // partitions hold none of the new ranges) takes longer than that.
            var short = settings
            short.queryTimeout = .milliseconds(250)
            let store = try PostgresIngestStore(settings: short, logger: testLogger)
            let (created, seen) = try await withRunning(store) { _ in
                try await withTestClient(settings) { client in
                    // A reader counting everything, over and over, while the partitions are made.
                    let done = DoneFlag()
                    let reader = Task {
                        var seen: [String] = []
                        while !done.isSet {
                            let totals = try await Self.totals(client)
                            seen.append("\(totals.readings)/\(totals.rollups)")
                        }
                        return seen
                    }
                    let created: PostgresIngestStore.CreatedPartitions
                    do {
                        created = try await store.createPartitions(now: Self.later)
                    } catch {
                        done.set()
                        _ = try? await reader.value
                        throw error
                    }
                    done.set()
                    return (created, try await reader.value)
                }
            }
            #expect(created.readings == 9 && created.minuteRollups == 2, "\(created)")
            #expect(!seen.isEmpty)
            #expect(Set(seen) == ["\(expected.readings)/\(expected.rollups)"], "a reader saw rows missing or twice: \(Set(seen))")
            // Every row of the new ranges moved, the rest stayed.
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM readings_20260305") == moved)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM readings_default") == kept)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m_202604") == moved / 3)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m_default") == kept / 3)
            // The new partitions are like the others: their indexes belong to the parent's, no CHECK of their range is left.
            #expect(
                try await PostgresStoreTests.count(
                    settings,
                    """
                    SELECT count(*)::int8 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                    WHERE c.relkind = 'i' AND c.relname IN (SELECT indexname FROM pg_indexes WHERE tablename IN ('readings_20260305', 'rollups_1m_202604'))
                    """) == 3)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM pg_constraint WHERE conname LIKE '%\\_range'") == 0)
            // Done: a second run finds nothing to make.
            let again = try PostgresIngestStore(settings: short, logger: testLogger)
            #expect(try await withRunning(again) { _ in try await again.createPartitions(now: Self.later) } == .init(readings: 0, minuteRollups: 0))
        }
    }

    /// A session holds the default partition for six seconds. Partition maintenance needs it exclusively for a moment;
    /// waiting for it, its request would queue every statement that reads the default partition behind it for those
    /// seconds. It waits at most half a second at a time instead, lets others through between attempts, and gets there
    /// once the session is done.
    @Test func partitionMaintenanceLetsGoOfALockItCannotGetAtOnce() async throws {
        try await PostgresStoreTests.withStore { store, settings in
            let device = try await PostgresStoreTests.device(in: store)
            // A reading in a day not made yet: in the default partition, to move.
            _ = try await store.store(try phBatch(sequences: 1...5, start: Timestamp(microseconds: Self.movedDay)), for: device, receivedAt: testNow)
            try await withTestClient(settings) { holder in
                try await withTestClient(settings) { reader in
                    let held = Task {
                        for try await _ in try await holder.query("SELECT (SELECT count(*) FROM readings_default), pg_sleep(6)") {}
                    }
                    // The session holds its lock once it shows in pg_locks.
                    #expect(
                        try await eventuallyOn {
                            try await PostgresStoreTests.count(
                                settings,
                                """
                                SELECT count(*)::int8 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                                WHERE c.relname = 'readings_default' AND l.granted AND l.pid <> pg_backend_pid()
                                """) > 0
                        })
                    let maintenance = Task { try await store.createPartitions(now: Self.later) }
                    try await Task.sleep(for: .milliseconds(800))
                    // A read of the default partition meanwhile waits at most for one of maintenance's attempts, and
                    // sees the five readings (wherever they are by then).
                    let started = ContinuousClock.now
                    let total = try await Self.totals(reader).readings
                    let waited = ContinuousClock.now - started
                    #expect(total == 5, "a read saw \(total) of the 5 readings")
                    #expect(waited < .seconds(3), "a read waited \(waited) behind partition maintenance")
                    try await held.value
                    let created = try await maintenance.value
                    #expect(created.readings == 9)
                    #expect(try await PostgresStoreTests.count(settings, "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM readings_20260305") == 5)
                }
            }
        }
    }

    /// With `[retention] rollup_1m` shorter than about two months, last month's partition of `rollups_1m` ends before
    /// the cut-off. Partition maintenance made it anyway (at every start and every six hours) and every retention run
    /// dropped it again, logged and counted each time. Now maintenance makes no partition that ends by its table's
    /// cut-off (`raw` for the readings' days, `rollup_1m` for the months): one left from before is dropped once, and
    /// after that a run finds nothing to drop.
    @Test func maintenanceMakesNoPartitionThatRetentionWouldDrop() async throws {
        let retention = IngestConfiguration.Retention(raw: .seconds(86_400), rollup1m: .seconds(2 * 86_400))
        // 2026-01-11: the 1-minute cut-off is 2026-01-09, past the end of December; the raw one 2026-01-10.
        let now = Timestamp(microseconds: testNow.microseconds + 10 * Self.day)
        let planned = PostgresIngestStore.partitionsAhead(of: now, retention: retention).map(\.name)
        #expect(!planned.contains("rollups_1m_202512") && planned.contains("rollups_1m_202601") && planned.contains("rollups_1m_202603"))
        #expect(planned.contains("readings_20260110"), "yesterday ends after the raw cut-off: made")
        #expect(PostgresIngestStore.partitionsAhead(of: now).map(\.name).contains("rollups_1m_202512"), "without retention, the whole window")
        // The shortest raw period, a day, cuts at yesterday's start: all nine days (yesterday through a week ahead) are made.
        #expect(PostgresIngestStore.partitionsAhead(of: now, retention: retention).filter { $0.name.hasPrefix("readings_") }.count == 9)
        try await withTestDatabase { settings in
            // December made as before this change, by a store that does not know the retention settings.
            let before = try PostgresIngestStore(settings: settings, logger: testLogger)
            try await withRunning(before) { _ in
                try await before.migrate()
                #expect(try await before.createPartitions(now: now).names.contains("rollups_1m_202512"))
            }
            let store = try PostgresIngestStore(settings: settings, retention: retention, logger: testLogger)
            try await withRunning(store) { _ in
                let first = try await store.runRetention(retention, now: now, options: RetentionRunOptions())
                #expect(first.minuteRollupPartitionsDropped == ["rollups_1m_202512"])
                for round in 1...2 {
                    let created = try await store.createPartitions(now: now)
                    #expect(created.names.isEmpty, "round \(round): \(created.names)")
                    let run = try await store.runRetention(retention, now: now, options: RetentionRunOptions())
                    #expect(run.minuteRollupPartitionsDropped.isEmpty && run.partitionsDropped.isEmpty, "round \(round): \(run.lines)")
                }
                #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM pg_class WHERE relname = 'rollups_1m_202512'") == 0)
            }
        }
    }
}

/// Set once, read from other tasks.
final class DoneFlag: Sendable {
    private let done = Mutex(false)
    var isSet: Bool { done.withLock { $0 } }
    func set() { done.withLock { $0 = true } }
}
