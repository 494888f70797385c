import FarmgateWire
import FarmgateTestSupport
import Foundation
import PostgresNIO
import Testing

@testable import FarmgateIngest

/// What only the PostgreSQL store has: time partitions, idempotency that outlives a dropped partition, migrations
/// under an advisory lock.
@Suite struct PostgresStoreTests {
    static func device(in store: PostgresIngestStore) async throws -> DeviceIdentity {
        _ = try await store.createFarm(name: "f1", createdAt: testNow)
        return try await store.createDevice(farm: "f1", device: try deviceID("d1"), keyID: "kd1", secretHash: [1], createdAt: testNow)
    }

    /// Runs `body` with a fresh, migrated store (partitions created around `now`) and its database's settings.
    static func withStore<T: Sendable>(
        now: Timestamp = testNow, _ body: @Sendable (PostgresIngestStore, PostgresSettings) async throws -> T
    ) async throws -> T {
        try await withTestDatabase(migrated: true) { settings in
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            return try await withRunning(store) { _ in
                try await store.migrate()
                try await store.createPartitions(now: now)
                return try await body(store, settings)
            }
        }
    }

    static func count(_ settings: PostgresSettings, _ sql: String) async throws -> Int {
        try await withTestClient(settings) { client in
            var result = -1
            for try await value in try await client.query(PostgresQuery(unsafeSQL: sql)).decode(Int.self) { result = value }
            return result
        }
    }

    /// The text in the first column of every row `query` returns.
    static func texts(_ settings: PostgresSettings, _ query: PostgresQuery) async throws -> [String] {
        try await withTestClient(settings) { client in
            var result: [String] = []
            for try await row in try await client.query(query) { result.append(try row.decode(String.self)) }
            return result
        }
    }

    /// The partitions of `rollups_1m` (monthly ones and the default), by name.
    static func minuteRollupPartitions(_ settings: PostgresSettings) async throws -> [String] {
        try await texts(
            settings,
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'rollups_1m'::regclass ORDER BY 1")
    }

    @Test func monthlyMinuteRollupPartitionsAreMadeAheadAndTakeTheirMonthsRowsFromTheDefaultPartition() async throws {
        try await Self.withStore { store, settings in
            // withStore created them for testNow (2026-01-01): last month through two months ahead, and the default.
            let made = try await Self.minuteRollupPartitions(settings)
            for name in ["rollups_1m_202512", "rollups_1m_202601", "rollups_1m_202602", "rollups_1m_202603", "rollups_1m_default"] {
                #expect(made.contains(name), "\(made)")
            }
            #expect(!made.contains("rollups_1m_202511") && !made.contains("rollups_1m_202604"), "\(made)")
            #expect(try await store.createPartitions(now: testNow) == PostgresIngestStore.CreatedPartitions(readings: 0, minuteRollups: 0))
            // Five months ahead (2026-05-31), beyond every month made: its 1-minute rollups wait in the default partition.
            let device = try await Self.device(in: store)
            let later = Timestamp(microseconds: testNow.microseconds + 150 * 86_400_000_000)
            _ = try await store.store(try phBatch(sequences: 1...90, value: 6.2, start: later), for: device, receivedAt: testNow)
            #expect(try await Self.count(settings, "SELECT count(*)::int8 FROM rollups_1m_default") == 2)
            // Its month made: the rows move into it (and April, June and July are made too).
            let created = try await store.createPartitions(now: later)
            #expect(created.minuteRollups == 4)
            #expect(try await Self.minuteRollupPartitions(settings).filter { $0 >= "rollups_1m_202604" && $0 < "rollups_1m_202608" }
                == ["rollups_1m_202604", "rollups_1m_202605", "rollups_1m_202606", "rollups_1m_202607"])
            #expect(try await Self.count(settings, "SELECT count(*)::int8 FROM rollups_1m_default") == 0)
            #expect(try await Self.count(settings, "SELECT count(*)::int8 FROM rollups_1m_202605") == 2)
            // Merged into where they moved: readings 1-59 in the first minute, 60-100 in the second.
            _ = try await store.store(try phBatch(sequences: 91...100, value: 6.8, start: later), for: device, receivedAt: testNow)
            #expect(try await Self.count(settings, "SELECT count(*)::int8 FROM rollups_1m") == 2)
            let farm = try #require(try await store.farm(named: "f1"))
            let sensor = try #require(try await store.sensor(farmID: farm.id, device: device.device, sensor: try sensorID("tank1.ph")))
            let points = try await allRollups(store, sensor: sensor.rowID, level: .minute)
            #expect(points.map(\.count) == [59, 41])
            #expect(points.map(\.min) == [6.2, 6.2] && points.map(\.max) == [6.2, 6.8] && points.map(\.last) == [6.2, 6.8])
        }
    }

    /// The storage parameters (`reloptions`, comma-separated; empty for none) of the tables a batch updates, of
    /// `readings_default`, and of each partition of `rollups_1m`, by table name.
    static func storageOptions(_ settings: PostgresSettings) async throws -> [String: String] {
        try await withTestClient(settings) { client in
            var options: [String: String] = [:]
            for try await (name, text) in try await client.query(
                """
                SELECT relname::text, coalesce(array_to_string(reloptions, ','), '') FROM pg_class
                WHERE relname IN ('latest', 'rollups_1h', 'rollups_1d', 'stored_sequences', 'devices', 'alert_watermarks', 'alert_cursors', 'readings_default')
                    OR oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'rollups_1m'::regclass)
                """
            ).decode((String, String).self) { options[name] = text }
            return options
        }
    }

    @Test("the rows every batch updates have room on their pages: migration 19, and 1-minute rollup partitions made later")
    func updatedTablesLeaveRoomOnTheirPages() async throws {
        try await Self.withStore { store, settings in
            let expected = [
                "latest": "fillfactor=50", "rollups_1d": "fillfactor=50", "rollups_1h": "fillfactor=70", "stored_sequences": "fillfactor=50",
                "devices": "fillfactor=50", "alert_watermarks": "fillfactor=50", "alert_cursors": "fillfactor=50",
                // Insert-only: packed full.
                "readings_default": "",
            ]
            func check(_ options: [String: String], months: [String]) {
                for (table, option) in expected { #expect(options[table] == option, "\(table): \(options[table] ?? "missing")") }
                for month in months + ["rollups_1m_default"] { #expect(options[month] == "fillfactor=70", "\(month): \(options[month] ?? "missing")") }
            }
            check(try await Self.storageOptions(settings), months: ["rollups_1m_202512", "rollups_1m_202601", "rollups_1m_202603"])

            // A month made later.
            let created = try await store.createPartitions(now: Timestamp(microseconds: testNow.microseconds + 150 * 86_400_000_000))
            #expect(created.names.contains("rollups_1m_202607"), "\(created.names)")
            check(try await Self.storageOptions(settings), months: ["rollups_1m_202604", "rollups_1m_202607"])

            // Partitions that exist when migration 19 runs (made by an older ingest): the migration sets theirs too.
            try await adminQuery(settings, "ALTER TABLE rollups_1m_202605 RESET (fillfactor)")
            try await adminQuery(settings, "ALTER TABLE latest RESET (fillfactor)")
            // (The migrations after 19 run again with it; each of them can.)
            try await adminQuery(settings, "DELETE FROM schema_migrations WHERE version >= 19")
            #expect(try await Self.storageOptions(settings)["rollups_1m_202605"] == "")
            let applied = try await store.migrate()
            #expect(applied.map(\.version) == Array(19...PostgresSchema.currentVersion))
            check(try await Self.storageOptions(settings), months: ["rollups_1m_202605"])
        }
    }

    @Test func aDayAtOneMinuteResolutionReadsOnlyTheMonthsItSpans() async throws {
        try await Self.withStore { store, settings in
            let device = try await Self.device(in: store)
            _ = try await store.store(try phBatch(sequences: 1...100), for: device, receivedAt: testNow)
            /// The partitions of `rollups_1m` in the plan of the store's own range query (its bind parameters included).
            func scanned(from: Int64, hours: Int64) async throws -> [String] {
                let query = PostgresIngestStore.rollupQuery(
                    sensorRowID: 1, level: .minute, from: Timestamp(microseconds: from), to: Timestamp(microseconds: from + hours * 3_600_000_000), limit: 10_000)
                let plan = try await Self.texts(settings, PostgresQuery(unsafeSQL: "EXPLAIN " + query.sql, binds: query.binds)).joined(separator: "\n")
                // Partition names only (not their indexes, nor the plan's aliases such as rollups_1m_1).
                let words = plan.split { !($0.isLetter || $0.isNumber || $0 == "_") }.map(String.init)
                return Set(words.filter { $0 == "rollups_1m_default" || ($0.hasPrefix("rollups_1m_") && $0.count == 17 && $0.suffix(6).allSatisfy(\.isNumber)) })
                    .sorted()
            }
            let day: Int64 = 86_400_000_000
            // 2025-12-31: December only; noon to noon across the new year: December and January; never the default.
            let lastDay = try await scanned(from: testNow.microseconds - day, hours: 24)
            let acrossTheNewYear = try await scanned(from: testNow.microseconds - day / 2, hours: 24)
            let january = try await scanned(from: testNow.microseconds + 14 * day, hours: 24)
            #expect(lastDay == ["rollups_1m_202512"], "\(lastDay)")
            #expect(acrossTheNewYear == ["rollups_1m_202512", "rollups_1m_202601"], "\(acrossTheNewYear)")
            #expect(january == ["rollups_1m_202601"], "\(january)")
        }
    }

    @Test func aReadingSentAgainAfterItsPartitionWasDroppedIsADuplicate() async throws {
        try await Self.withStore { store, settings in
            let device = try await Self.device(in: store)
            // An hour before testNow: in the partition of 2025-12-31.
            let first = try await store.store(try phBatch(sequences: 1...50), for: device, receivedAt: testNow)
            #expect(first.accepted == 50)
            #expect(try await Self.count(settings, "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM readings_20251231") == 50)
            try await adminQuery(settings, "DROP TABLE readings_20251231")
            #expect(try await Self.count(settings, "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM readings") == 0)
            // Sent again, re-cut, with ten new ones: the old ones are duplicates, not stored again.
            let again = try await store.store(try phBatch(sequences: 41...60), for: device, receivedAt: testNow)
            #expect(again.tally == Tally(accepted: 10, duplicates: 10, rejected: 0))
            #expect(try await Self.count(settings, "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM readings") == 10)
            #expect(try await store.highestSequence(device: device) == 60)
            #expect(try await Self.count(settings, "SELECT count(*)::int8 FROM stored_sequences") == 1)
        }
    }

    @Test func sequenceGapsAreFilledAndRangesMerge() async throws {
        try await Self.withStore { store, settings in
            let device = try await Self.device(in: store)
            _ = try await store.store(try phBatch(sequences: [1, 2, 3, 10, 11, 20]), for: device, receivedAt: testNow)
            #expect(try await Self.count(settings, "SELECT count(*)::int8 FROM stored_sequences") == 3)
            let filled = try await store.store(try phBatch(sequences: 1...20), for: device, receivedAt: testNow)
            #expect(filled.tally == Tally(accepted: 14, duplicates: 6, rejected: 0))
            #expect(try await Self.count(settings, "SELECT count(*)::int8 FROM stored_sequences") == 1)
            #expect(try await Self.count(settings, "SELECT last_sequence FROM stored_sequences") == 20)
        }
    }

    @Test func readingsOutsideThePartitionsMoveIntoOneCreatedLater() async throws {
        try await Self.withStore { store, settings in
            let device = try await Self.device(in: store)
            // Thirty days after testNow: beyond the partitions made ahead, so in the default partition.
            let later = Timestamp(microseconds: testNow.microseconds + 30 * 86_400_000_000)
            _ = try await store.store(try phBatch(sequences: 1...5, start: later), for: device, receivedAt: testNow)
            #expect(try await Self.count(settings, "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM readings_default") == 5)
            let created = try await store.createPartitions(now: later)
            #expect(created.readings > 0)
            #expect(try await Self.count(settings, "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM readings_default") == 0)
            #expect(try await Self.count(settings, "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM readings_20260131") == 5)
            // Still one reading per sequence, and duplicates are still recognised.
            let again = try await store.store(try phBatch(sequences: 1...5, start: later), for: device, receivedAt: testNow)
            #expect(again.tally == Tally(accepted: 0, duplicates: 5, rejected: 0))
        }
    }

    @Test func severalInstancesMigratingAtOnceApplyEachMigrationOnce() async throws {
        try await withTestDatabase { settings in
            let applied = try await withThrowingTaskGroup(of: Int.self) { group in
                for _ in 0..<4 {
                    group.addTask {
                        let store = try PostgresIngestStore(settings: settings, logger: testLogger)
                        return try await withRunning(store) { _ in try await store.migrate().count }
                    }
                }
                var counts: [Int] = []
                for try await count in group { counts.append(count) }
                return counts.sorted()
            }
            #expect(applied == [0, 0, 0, PostgresSchema.migrations.count])
            #expect(try await Self.count(settings, "SELECT count(*)::int8 FROM schema_migrations") == PostgresSchema.migrations.count)
        }
    }

    /// An instance that starts while another migrates a large database waits for it: the migration is not bounded by
    /// `query_timeout` (here 1 s while another session holds the migration lock for 3 s, as a long conversion would).
    @Test func aMigrationWaitsPastTheQueryTimeoutForAnotherInstancesMigration() async throws {
        try await withTestDatabase { settings in
            var short = settings
            short.queryTimeout = .seconds(1)
            let holding = Task {
                try await withTestClient(settings) { client in
                    try await client.withTransaction(logger: testLogger) { connection in
                        try await connection.query("SELECT pg_advisory_xact_lock(\(PostgresSchema.migrationLock))", logger: testLogger)
                        try await Task.sleep(for: .seconds(3))
                    }
                }
            }
            // The holder has the lock before the store asks for it.
            try await Task.sleep(for: .milliseconds(500))
            let store = try PostgresIngestStore(settings: short, logger: testLogger)
            let start = ContinuousClock.now
            let applied = try await withRunning(store) { _ in try await store.migrate().count }
            try await holding.value
            #expect(applied == PostgresSchema.migrations.count)
            #expect(ContinuousClock.now - start > .seconds(1), "the migration did not wait for the lock: the test proves nothing")
            #expect(try await Self.count(settings, "SELECT count(*)::int8 FROM schema_migrations") == PostgresSchema.migrations.count)
        }
    }

    @Test func anUnreachableDatabaseFailsWithinTheQueryTimeout() async throws {
        var settings = try PostgresSettings(url: "postgresql://farmgate@/nothing?host=/nonexistent-farmgate-socket-dir")
        settings.queryTimeout = .milliseconds(500)
        settings.connectTimeout = .milliseconds(200)
        let store = try PostgresIngestStore(settings: settings, logger: testLogger)
        let start = ContinuousClock.now
        await #expect(throws: (any Error).self) {
            try await withRunning(store) { store in try await store.ping() }
        }
        // It must fail, not hang: an unbounded wait would never return. The bound leaves room for a loaded CI machine
        // (17.8 s was seen there while the first pass ran 340 tests on two cores).
        #expect(ContinuousClock.now - start < .seconds(45))
    }

    @Test("the store's first calls, made as it starts running, wait for its pool to run: postgres-nio logs no lease before run()")
    func noLeaseBeforeTheRun() async throws {
        let recorder = LogRecorder()
        try await withTestDatabase { settings in
            let store = try PostgresIngestStore(settings: settings, logger: recorder.logger())
            // As `serve` and the admin commands do: the store's run() starts, and calls follow at once.
            try await withRunning(store) { _ in
                try await store.migrate()
                _ = try await store.farm(named: "nobody")
            }
        }
        let early = recorder.all.filter { $0.contains("hasn't been called yet") }
        #expect(early.isEmpty, "\(early)")
        #expect(!recorder.all.isEmpty, "nothing was logged at all: the recorder is not the store's logger")
    }
}
