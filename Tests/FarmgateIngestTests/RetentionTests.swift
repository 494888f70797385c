import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import PostgresNIO
import Prometheus
import Synchronization
import Testing

@testable import FarmgateIngest

/// Retention on both stores: raw readings and each rollup level go at their own cut-off, rollups outlive raw readings,
/// re-sent readings stay duplicates, and several PostgreSQL instances run it once.
@Suite struct RetentionTests {
    /// raw 30 days, 1-minute rollups 60 days, hourly and daily forever; at ``testNow`` the cut-offs are
    /// 2025-12-02T00:00:00Z and 2025-11-02T00:00:00Z.
    static let retention = IngestConfiguration.Retention(raw: .seconds(30 * 86_400), rollup1m: .seconds(60 * 86_400))
    static let rawCutoff = Timestamp(microseconds: testNow.microseconds - 30 * 86_400_000_000)
    static let minuteCutoff = Timestamp(microseconds: testNow.microseconds - 60 * 86_400_000_000)
    /// 2025-11-01T00:00:00Z: the start of the month the 1-minute cut-off falls in.
    static let minuteCutoffMonth = Timestamp(microseconds: minuteCutoff.microseconds - 86_400_000_000)

    /// A fresh store with four months of synthetic readings (and, on PostgreSQL, a daily partition for each day).
    static func withMonths<T: Sendable>(
        _ kind: StoreKind, _ body: @Sendable (any IngestStore, DeviceIdentity, SyntheticMonths) async throws -> T
    ) async throws -> T {
        try await withFreshStore(kind) { store in
            let data = SyntheticMonths(start: Timestamp(microseconds: testNow.microseconds - 120 * 86_400_000_000), days: 120)
            if let postgres = store as? PostgresIngestStore {
                var now = data.start
                while now < testNow {
                    try await postgres.createPartitions(now: now)
                    now = Timestamp(microseconds: now.microseconds + 8 * 86_400_000_000)
                }
            }
            let device = try await StoreConformanceTests.device(in: store)
            for batch in try SyntheticMonths.batches(data.readings) {
                _ = try await store.store(batch, for: device, receivedAt: testNow)
            }
            return try await body(store, device, data)
        }
    }

    /// Every stored raw reading of the device, by sequence.
    static func stored(_ store: any IngestStore, device: DeviceIdentity) async throws -> [ExportRow] {
        var rows: [ExportRow] = []
        var after: UInt64?
        while true {
            let page = try await store.exportPage(device: device, afterSequence: after, limit: 5_000)
            guard let last = page.last else { return rows }
            rows += page
            after = last.sequence
        }
    }

    @Test(arguments: StoreKind.allCases)
    func removesExactlyWhatIsOlderThanEachPeriodAndRollupsOutliveRawReadings(kind: StoreKind) async throws {
        try await Self.withMonths(kind) { store, device, data in
            let retention = try #require(store as? any RetentionStore)
            let before = try await Self.stored(store, device: device)
            #expect(before.count == data.readings.count)
            let old = data.readings.filter { $0.timestamp < Self.rawCutoff }
            #expect(!old.isEmpty && old.count < data.readings.count)

            let dry = try await retention.runRetention(Self.retention, now: testNow, options: RetentionRunOptions(dryRun: true))
            #expect(dry.skipped == nil && dry.dryRun)
            #expect(dry.rawCutoff == Self.rawCutoff && dry.rollupCutoffs == [.minute: Self.minuteCutoff])
            #expect(try await Self.stored(store, device: device).count == data.readings.count)
            let sensors = try await syntheticSensorRows(store, device: device)
            let minuteBucketsBefore = try await allRollups(store, sensor: sensors.ph, level: .minute).count + allRollups(store, sensor: sensors.temp, level: .minute).count
            /// The 1-minute buckets of both sensors from `start` on.
            func minuteBuckets(from start: Timestamp) -> Int {
                [SyntheticMonths.ph, SyntheticMonths.temp].map { ExpectedBucket.of(data.readings, sensor: $0, level: .minute, from: start.microseconds).count }
                    .reduce(0, +)
            }
            let oldMinuteBuckets = minuteBucketsBefore - minuteBuckets(from: Self.minuteCutoff)
            // PostgreSQL drops the months that end by the cut-off (partitions for August to October 2025 were made
            // ahead) and deletes rows only in November before the 2nd: 96 buckets a day of each sensor.
            let straddlingBuckets = minuteBuckets(from: Self.minuteCutoffMonth) - minuteBuckets(from: Self.minuteCutoff)
            #expect(straddlingBuckets == 192)
            let oldMonths = ["rollups_1m_202508", "rollups_1m_202509", "rollups_1m_202510"]
            let minuteRowsDeleted = kind == .postgres ? straddlingBuckets : oldMinuteBuckets
            #expect(dry.rollupRowsDeleted == [.minute: minuteRowsDeleted])
            #expect(dry.minuteRollupPartitionsDropped == (kind == .postgres ? oldMonths : []))
            let postgres = store as? PostgresIngestStore
            var partitionsBefore: [String]?
            if let postgres { partitionsBefore = try await Self.minuteRollupPartitions(postgres) }
            #expect(partitionsBefore.map { Set(oldMonths + ["rollups_1m_202511", "rollups_1m_default"]).isSubset(of: $0) } ?? true)
            #expect(try await allRollups(store, sensor: sensors.ph, level: .minute).count + allRollups(store, sensor: sensors.temp, level: .minute).count
                == minuteBucketsBefore, "a dry run removes nothing")

            let report = try await retention.runRetention(Self.retention, now: testNow, options: RetentionRunOptions())
            #expect(report.skipped == nil && !report.dryRun)
            if let postgres, let partitionsBefore {
                // Whole days: every daily partition that ends by the cut-off, and nothing row by row.
                let days = Int((Self.rawCutoff.microseconds - RollupLevel.day.bucket(of: data.start.microseconds - 86_400_000_000)) / 86_400_000_000)
                #expect(report.partitionsDropped.count == days)
                #expect(report.partitionsDropped.first == "readings_20250902" && report.partitionsDropped.last == "readings_20251201")
                #expect(report.partitionsDropped == dry.partitionsDropped)
                #expect(report.rawRowsDeleted == 0)
                // Whole months of 1-minute rollups, gone from the table; the rest of the partitions untouched.
                #expect(report.minuteRollupPartitionsDropped == oldMonths)
                #expect(try await Self.minuteRollupPartitions(postgres) == partitionsBefore.filter { !oldMonths.contains($0) })
                let line = try #require(report.lines.first { $0.hasPrefix("1m rollups before 2025-11-02T00:00:00Z: ") })
                // What the dropped partitions held, counted (the tables were never analysed: PostgreSQL's estimate says 0).
                let monthRows = oldMinuteBuckets - straddlingBuckets
                #expect(monthRows > 0 && report.rowsInDroppedMinuteRollupPartitions == monthRows && dry.rowsInDroppedMinuteRollupPartitions == monthRows)
                #expect(
                    line == "1m rollups before 2025-11-02T00:00:00Z: removed 3 monthly partitions (rollups_1m_202508, rollups_1m_202509, rollups_1m_202510, \(monthRows) rows) and 192 rows",
                    "\(line)")
                #expect(report.rowsInDroppedPartitions == old.count && dry.rowsInDroppedPartitions == old.count, "the readings of the dropped days")
                // Counted by table.
                let registry = PrometheusCollectorRegistry()
                RetentionMetrics(registry: registry).record(report, endedAt: 0)
                let metrics = String(decoding: registry.emitToBuffer(), as: UTF8.self)
                #expect(metrics.contains(#"farmgate_ingest_retention_partitions_dropped_total{table="rollups_1m"} 3"#), "\(metrics)")
                #expect(metrics.contains(#"farmgate_ingest_retention_partitions_dropped_total{table="readings"} \#(days)"#), "\(metrics)")
                // November keeps its buckets from the cut-off on, and only those.
                #expect(try await Self.pgCount(postgres, "SELECT count(*)::int8 FROM rollups_1m_202511 WHERE bucket_us < \(Self.minuteCutoff.microseconds)") == 0)
                #expect(try await Self.pgCount(postgres, "SELECT count(*)::int8 FROM rollups_1m_202511") == 2 * 29 * 96)
            } else {
                #expect(report.rawRowsDeleted == old.count && dry.rawRowsDeleted == old.count)
                #expect(report.minuteRollupPartitionsDropped.isEmpty)
            }
            #expect(report.rollupRowsDeleted == [.minute: minuteRowsDeleted])

            // Raw: exactly the readings from the cut-off on.
            let after = try await Self.stored(store, device: device)
            #expect(after.map(\.sequence) == data.readings.filter { $0.timestamp >= Self.rawCutoff }.map(\.sequence).sorted())
            // 1-minute rollups from their own cut-off; hourly and daily ones untouched, back to the first day.
            for (sensor, row) in [(SyntheticMonths.ph, sensors.ph), (SyntheticMonths.temp, sensors.temp)] {
                try await expectRollups(
                    store, sensor: row, level: .minute, ExpectedBucket.of(data.readings, sensor: sensor, level: .minute, from: Self.minuteCutoff.microseconds))
                try await expectRollups(store, sensor: row, level: .hour, ExpectedBucket.of(data.readings, sensor: sensor, level: .hour))
                try await expectRollups(store, sensor: row, level: .day, ExpectedBucket.of(data.readings, sensor: sensor, level: .day))
            }

            // Sent again after their raw rows went: duplicates, neither stored nor rolled up again.
            let highest = try await store.highestSequence(device: device)
            for batch in try SyntheticMonths.batches(Array(old.suffix(3_000)), size: 1_000) {
                #expect(try await store.store(batch, for: device, receivedAt: testNow).tally == Tally(accepted: 0, duplicates: 1_000, rejected: 0))
            }
            #expect(try await Self.stored(store, device: device).count == after.count)
            try await expectRollups(store, sensor: sensors.ph, level: .day, ExpectedBucket.of(data.readings, sensor: SyntheticMonths.ph, level: .day))
            #expect(try await store.highestSequence(device: device) == highest)

            // Nothing left to remove.
            let again = try await retention.runRetention(Self.retention, now: testNow, options: RetentionRunOptions())
            #expect(again.partitionsDropped.isEmpty && again.rawRowsDeleted == 0 && again.rollupRowsTotal == 0)
            #expect(again.minuteRollupPartitionsDropped.isEmpty)
        }
    }

    @Test("a reading at sequence Int64.max older than raw retention is removed without a crash, and it stays a duplicate", arguments: StoreKind.allCases)
    func removesTheLastPossibleSequence(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let retention = try #require(store as? any RetentionStore)
            let device = try await StoreConformanceTests.device(in: store)
            let sensor = try sensorID("tank1.ph")
            // A day before the raw cut-off, a second apart.
            let old = Self.rawCutoff.microseconds - 86_400_000_000
            func batch(_ sequences: [UInt64]) throws -> Batch {
                Batch(
                    device: try deviceID("d1"), sensors: [SensorDescriptor(id: sensor, quantity: .ph)],
                    readings: sequences.map { sequence in
                        Reading(sensor: sensor, sequence: sequence, timestamp: Timestamp(microseconds: old + Int64(sequence % 1_000) * 1_000_000), value: 6.5)
                    })
            }
            let top = UInt64(Int64.max)
            #expect(try await store.store(try batch([7, top]), for: device, receivedAt: testNow).tally == Tally(accepted: 2, duplicates: 0, rejected: 0))
            let report = try await retention.runRetention(Self.retention, now: testNow, options: RetentionRunOptions())
            #expect(report.skipped == nil)
            if kind == .sqlite { #expect(report.rawRowsDeleted == 2) }
            #expect(try await Self.stored(store, device: device).isEmpty)
            // Sent again after retention removed them: duplicates, never stored again (the delivery contract).
            #expect(try await store.store(try batch([7, top]), for: device, receivedAt: testNow).tally == Tally(accepted: 0, duplicates: 2, rejected: 0))
            // The sequence just below, stored and removed by a later run, joins the range that ends at Int64.max.
            #expect(try await store.store(try batch([top - 1]), for: device, receivedAt: testNow).tally == Tally(accepted: 1, duplicates: 0, rejected: 0))
            _ = try await retention.runRetention(Self.retention, now: testNow, options: RetentionRunOptions())
            #expect(try await Self.stored(store, device: device).isEmpty)
            #expect(try await store.store(try batch([7, top - 1, top]), for: device, receivedAt: testNow).tally == Tally(accepted: 0, duplicates: 3, rejected: 0))
            #expect(try await store.highestSequence(device: device) == top)
        }
    }

    /// The delivery contract after retention: a sequence whose reading retention removed cannot be compared, so a
    /// reading sent again under it is a duplicate only when it is older than the raw cut-off that removed it (it may be
    /// that reading); a newer one is another reading numbered alike (a site buffer replaced after retention numbers from
    /// 1 again) and is refused `sequence_conflict`, which the site answers by renumbering it above the ingest's highest
    /// sequence. Acknowledged as a duplicate, the site would delete it unstored.
    @Test("a sequence retention removed, sent again by a reading newer than the cut-off, is a sequence_conflict; an older one a duplicate", arguments: StoreKind.allCases)
    func reusedRetiredSequenceNewerThanTheCutoffIsAConflict(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let retention = try #require(store as? any RetentionStore)
            // A day before the raw cut-off, in a daily partition of its own on PostgreSQL (retention drops it whole).
            let old = Timestamp(microseconds: Self.rawCutoff.microseconds - 86_400_000_000)
            if let postgres = store as? PostgresIngestStore { try await postgres.createPartitions(now: old) }
            let device = try await StoreConformanceTests.device(in: store)
            let ph = try sensorID("tank1.ph")
            let ec = try sensorID("tank2.ec")
            func batch(_ readings: [(SensorID, UInt64, Timestamp, Double)]) throws -> Batch {
                Batch(
                    device: try deviceID("d1"), sensors: [SensorDescriptor(id: ph, quantity: .ph), SensorDescriptor(id: ec, quantity: .electricalConductivity)],
                    readings: readings.map { Reading(sensor: $0.0, sequence: $0.1, timestamp: $0.2, value: $0.3) })
            }
            let stored = try batch([(ph, 7, old, 6.5), (ph, 8, Timestamp(microseconds: old.microseconds + 1_000_000), 6.6)])
            #expect(try await store.store(stored, for: device, receivedAt: testNow).tally == Tally(accepted: 2, duplicates: 0, rejected: 0))
            let report = try await retention.runRetention(Self.retention, now: testNow, options: RetentionRunOptions())
            #expect(report.skipped == nil)
            if kind == .postgres { #expect(!report.partitionsDropped.isEmpty) }
            #expect(try await Self.stored(store, device: device).isEmpty)

            // Newer than the cut-off: from the same sensor, and from another one.
            let recent = Timestamp(microseconds: testNow.microseconds - 3_600_000_000)
            for reused in [try batch([(ph, 7, recent, 7.0)]), try batch([(ec, 7, testNow, 1.2)])] {
                let outcome = try await store.store(reused, for: device, receivedAt: testNow)
                #expect(outcome.tally == Tally(accepted: 0, duplicates: 0, rejected: 1))
                #expect(outcome.rejected.first?.code == RejectionCode.sequenceConflict)
                #expect(outcome.rejected.first?.message.contains("retention removed") == true, "\(outcome.rejected)")
                #expect(outcome.rejected.first?.sequence == 7)
            }
            // The same reading sent again (older than the cut-off): a duplicate, neither stored nor rolled up again.
            #expect(try await store.store(stored, for: device, receivedAt: testNow).tally == Tally(accepted: 0, duplicates: 2, rejected: 0))
            #expect(try await Self.stored(store, device: device).isEmpty)
            #expect(try await store.highestSequence(device: device) == 8)
            // Renumbered above the highest sequence, as the site does: stored.
            #expect(try await store.store(try batch([(ph, 9, recent, 7.0)]), for: device, receivedAt: testNow).tally == Tally(accepted: 1, duplicates: 0, rejected: 0))
        }
    }

    /// A SQLite store from before `retention_cutoff` (migration 13) whose retention already removed sequences 1–10:
    /// their runs' cut-offs were not recorded, so the migration takes its own time for one. A reading sent again that is
    /// older is a duplicate, as before; one newer than the migration cannot be a removed reading.
    @Test func sqliteSequencesRetiredBeforeTheUpgradeAreJudgedByTheMigrationsTime() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/ingest.sqlite"
        try await runOffPool {
            let db = try sqliteIngestFile(at: path, migratedTo: 12)
            try db.execute(
                """
                INSERT INTO farms(id, name, created_at_us) VALUES (1, 'f1', 0);
                INSERT INTO devices(id, farm_id, name, key_id, secret_sha256, created_at_us, highest_sequence) VALUES (1, 1, 'd1', 'kd1', x'07', 0, 10);
                INSERT INTO retired_sequences(device_id, first_sequence, last_sequence) VALUES (1, 1, 10);
                """)
        }
        let store = try SQLiteIngestStore(path: path, logger: testLogger)
        defer { store.close() }
        let before = Timestamp.now()
        #expect(try await store.migrate().map(\.version) == Array(13...SQLiteSchema.currentVersion))
        let device = DeviceIdentity(farmID: 1, farm: "f1", rowID: 1, device: try deviceID("d1"))
        let sensor = try sensorID("tank1.ph")
        func batch(_ sequence: UInt64, at timestamp: Timestamp) throws -> Batch {
            Batch(
                device: try deviceID("d1"), sensors: [SensorDescriptor(id: sensor, quantity: .ph)],
                readings: [Reading(sensor: sensor, sequence: sequence, timestamp: timestamp, value: 6.5)])
        }
        #expect(try await store.store(try batch(5, at: testNow), for: device, receivedAt: testNow).tally == Tally(accepted: 0, duplicates: 1, rejected: 0))
        let later = Timestamp(microseconds: before.microseconds + 3_600_000_000)
        let outcome = try await store.store(try batch(6, at: later), for: device, receivedAt: later)
        #expect(outcome.tally == Tally(accepted: 0, duplicates: 0, rejected: 1) && outcome.rejected.first?.code == RejectionCode.sequenceConflict)
        // A new sequence is stored as ever.
        #expect(try await store.store(try batch(11, at: testNow), for: device, receivedAt: testNow).tally == Tally(accepted: 1, duplicates: 0, rejected: 0))
    }

    /// A batch sent again across several removed ranges and the gaps between them (a backlog arriving below the device's
    /// highest sequence): each reading is judged by the range that holds it, if any, and one ending just below the batch
    /// or starting just above it holds none of it.
    @Test func sqliteABatchAcrossSeveralRetiredRangesIsJudgedReadingByReading() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/ingest.sqlite"
        try await runOffPool {
            let db = try sqliteIngestFile(at: path, migratedTo: SQLiteSchema.currentVersion)
            try db.execute(
                """
                INSERT INTO farms(id, name, created_at_us) VALUES (1, 'f1', 0);
                INSERT INTO devices(id, farm_id, name, key_id, secret_sha256, created_at_us, highest_sequence) VALUES (1, 1, 'd1', 'kd1', x'07', 0, 100);
                INSERT INTO devices(id, farm_id, name, key_id, secret_sha256, created_at_us, highest_sequence) VALUES (2, 1, 'd2', 'kd2', x'08', 0, 100);
                INSERT INTO retired_sequences(device_id, first_sequence, last_sequence) VALUES
                    (1, 1, 3), (1, 10, 20), (1, 25, 25), (1, 30, 40), (1, 60, 70), (2, 4, 9);
                INSERT OR REPLACE INTO retention_cutoff(id, raw_us) VALUES (1, \(testNow.microseconds + 1));
                """)
        }
        let store = try SQLiteIngestStore(path: path, logger: testLogger)
        defer { store.close() }
        _ = try await store.migrate()
        let device = DeviceIdentity(farmID: 1, farm: "f1", rowID: 1, device: try deviceID("d1"))
        let sensor = try sensorID("tank1.ph")
        // 4 is removed for device 2 only; 3, 10, 20, 25, 30 and 40 are ends of device 1's ranges; 60–70 lies above the batch.
        let retired: Set<UInt64> = [3, 10, 15, 20, 25, 30, 35, 40]
        let sequences: [UInt64] = [4, 3, 9, 10, 15, 20, 21, 24, 25, 26, 29, 30, 35, 40, 41, 55]
        let batch = Batch(
            device: try deviceID("d1"), sensors: [SensorDescriptor(id: sensor, quantity: .ph)],
            readings: sequences.map { Reading(sensor: sensor, sequence: $0, timestamp: Timestamp(microseconds: testNow.microseconds - Int64($0) * 1_000_000), value: 6.5) })
        let outcome = try await store.store(batch, for: device, receivedAt: testNow)
        #expect(outcome.tally == Tally(accepted: sequences.count - retired.count, duplicates: retired.count, rejected: 0))
        let stored = Set(try await Self.stored(store, device: device).map(\.sequence))
        #expect(stored == Set(sequences).subtracting(retired))
    }

    /// The partitions of `rollups_1m` (monthly ones and the default), by name.
    static func minuteRollupPartitions(_ store: PostgresIngestStore) async throws -> [String] {
        try await store.rows(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'rollups_1m'::regclass ORDER BY 1"
        ) { try $0.decode(String.self) }
    }

    /// The one integer `sql` answers, through the store's pool.
    static func pgCount(_ store: PostgresIngestStore, _ sql: String) async throws -> Int {
        try await store.rows(PostgresQuery(unsafeSQL: sql)) { try $0.decode(Int.self) }.first ?? -1
    }

    @Test func postgresDeletesTheDefaultPartitionsOldRowsAndSkipsWhileAnotherRunHoldsTheLock() async throws {
        try await PostgresStoreTests.withStore { store, settings in
            let device = try await PostgresStoreTests.device(in: store)
            // Far before every daily partition: in the default partition.
            let ancient = Timestamp(microseconds: testNow.microseconds - 400 * 86_400_000_000)
            _ = try await store.store(try phBatch(sequences: 1...20, start: ancient), for: device, receivedAt: testNow)
            _ = try await store.store(try phBatch(sequences: 21...30), for: device, receivedAt: testNow)
            // 200 days ahead, beyond every partition made: in the default partitions too, but after every cut-off.
            let ahead = Timestamp(microseconds: testNow.microseconds + 200 * 86_400_000_000)
            _ = try await store.store(try phBatch(sequences: 31...31, start: ahead), for: device, receivedAt: testNow)
            #expect(try await PostgresChunkLayoutTests.readingCount(settings, "readings_default") == 21)
            // One 1-minute bucket each: the ancient and the one ahead in the default partition, the recent one in December's.
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m_default") == 2)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m_202512") == 1)

            // Another session holds the retention lock: a run skips, it never waits.
            let held = try await Self.holdingRetentionLock(settings) {
                try await store.runRetention(Self.retention, now: testNow, options: RetentionRunOptions())
            }
            #expect(held.skipped == .runningElsewhere)
            #expect(try await PostgresChunkLayoutTests.readingCount(settings, "readings_default") == 21)

            let report = try await store.runRetention(Self.retention, now: testNow, options: RetentionRunOptions())
            #expect(report.rawRowsDeleted == 20)
            #expect(try await store.appliedRollupCutoffs() == report.rollupCutoffs)
            #expect(try await PostgresChunkLayoutTests.readingCount(settings, "readings") == 11)
            // The default partition's 1-minute rollups before the cut-off go row by row; the one ahead stays.
            #expect(report.rollupRowsDeleted == [.minute: 1] && report.minuteRollupPartitionsDropped.isEmpty)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m_default") == 1)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m_default WHERE bucket_us > \(testNow.microseconds)") == 1)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m") == 2)
            // A scheduled run right after this one finds it done, completed at the database's time (not the `now` it
            // was given, which is almost a year behind it).
            let scheduled = try await store.runRetention(Self.retention, now: testNow, options: RetentionRunOptions(skipIfRanWithin: .seconds(1800)))
            guard case .ranRecently(let finished)? = scheduled.skipped else {
                Issue.record("not skipped as run recently: \(String(describing: scheduled.skipped))")
                return
            }
            #expect(abs(finished.microseconds - Timestamp.now().microseconds) < 600_000_000, "\(RFC3339.format(finished))")
            // An instance started with a shorter `raw` runs at once all the same: the recent run applied a cut-off
            // earlier than its own; then its next scheduled run finds its own cut-off applied.
            var shorter = Self.retention
            shorter.raw = .seconds(10 * 86_400)
            let moved = try await store.runRetention(shorter, now: testNow, options: RetentionRunOptions(skipIfRanWithin: .seconds(1800)))
            #expect(moved.skipped == nil, "\(String(describing: moved.skipped))")
            #expect(try await store.appliedRawCutoff() == moved.rawCutoff)
            let again = try await store.runRetention(shorter, now: testNow, options: RetentionRunOptions(skipIfRanWithin: .seconds(1800)))
            #expect(again.skipped != nil)
            // Re-sent: a duplicate, though its row went with the default partition's old rows.
            #expect(try await store.store(try phBatch(sequences: 1...20, start: ancient), for: device, receivedAt: testNow).duplicates == 20)
        }
    }

    @Test func severalPostgresInstancesRunningRetentionAtOnceRunItOnce() async throws {
        try await withTestDatabase(migrated: true) { settings in
            let first = try PostgresIngestStore(settings: settings, logger: testLogger)
            try await withRunning(first) { _ in
                try await first.migrate()
                var now = Timestamp(microseconds: testNow.microseconds - 50 * 86_400_000_000)
                while now < testNow {
                    try await first.createPartitions(now: now)
                    now = Timestamp(microseconds: now.microseconds + 8 * 86_400_000_000)
                }
                let device = try await PostgresStoreTests.device(in: first)
                let data = SyntheticMonths(start: Timestamp(microseconds: testNow.microseconds - 45 * 86_400_000_000), days: 45)
                for batch in try SyntheticMonths.batches(data.readings) { _ = try await first.store(batch, for: device, receivedAt: testNow) }
                let partitionsBefore = try await PostgresStoreTests.count(
                    settings, "SELECT count(*)::int8 FROM pg_inherits WHERE inhparent = 'readings'::regclass")

                // Four instances (their own pools) start their scheduled run at the same moment.
                let reports = try await withThrowingTaskGroup(of: RetentionReport.self) { group in
                    for _ in 0..<4 {
                        group.addTask {
                            let instance = try PostgresIngestStore(settings: settings, logger: testLogger)
                            return try await withRunning(instance) { _ in
                                try await instance.runRetention(Self.retention, now: testNow, options: RetentionRunOptions(skipIfRanWithin: .seconds(1800)))
                            }
                        }
                    }
                    var reports: [RetentionReport] = []
                    for try await report in group { reports.append(report) }
                    return reports
                }
                let completed = reports.filter { $0.skipped == nil }
                #expect(completed.count == 1)
                #expect(reports.filter { $0.skipped != nil }.count == 3)
                let dropped = try #require(completed.first).partitionsDropped.count
                #expect(dropped > 0)
                #expect(
                    try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM pg_inherits WHERE inhparent = 'readings'::regclass")
                        == partitionsBefore - dropped)
            }
        }
    }

    /// Instances whose clocks disagree by minutes decide alike whether a scheduled run is due: by the database's clock.
    /// With each instance's own clock, one running behind saw the run another had just completed as one from its
    /// future and ran again, and one running ahead by more than the window saw it as long past.
    @Test func instancesWhoseClocksDisagreeRunScheduledRetentionOnce() async throws {
        try await withTestDatabase(migrated: true) { settings in
            let first = try PostgresIngestStore(settings: settings, logger: testLogger)
            _ = try await withRunning(first) { _ in try await first.migrate() }
            let minute: Int64 = 60_000_000
            /// A scheduled run (interval one hour: skipped within half of it) of an instance whose clock reads `offset`
            /// minutes from testNow, through a pool of its own.
            func scheduledRun(clockOffsetMinutes offset: Int64) async throws -> RetentionReport {
                let instance = try PostgresIngestStore(settings: settings, logger: testLogger)
                return try await withRunning(instance) { _ in
                    try await instance.runRetention(
                        Self.retention, now: Timestamp(microseconds: testNow.microseconds + offset * minute),
                        options: RetentionRunOptions(skipIfRanWithin: .seconds(1800)))
                }
            }
            // One after another: the first runs; one five minutes behind it, one forty minutes ahead (past the
            // half-hour window by its own clock) and one a day behind all find it done.
            #expect(try await scheduledRun(clockOffsetMinutes: 0).skipped == nil)
            for offset: Int64 in [-5, 40, -1440] {
                let report = try await scheduledRun(clockOffsetMinutes: offset)
                guard case .ranRecently? = report.skipped else {
                    Issue.record("the instance \(offset) minutes off ran retention again: \(report.lines)")
                    continue
                }
            }
            // Due again (the last run was an hour ago by the database's clock): four instances minutes apart ask at the
            // same moment, and exactly one runs.
            try await adminQuery(settings, "UPDATE maintenance_runs SET finished_at_us = finished_at_us - 3600000000 WHERE job = 'retention'")
            let reports = try await withThrowingTaskGroup(of: RetentionReport.self) { group in
                for offset: Int64 in [-7, -2, 3, 9] { group.addTask { try await scheduledRun(clockOffsetMinutes: offset) } }
                var reports: [RetentionReport] = []
                for try await report in group { reports.append(report) }
                return reports
            }
            #expect(reports.filter { $0.skipped == nil }.count == 1, "\(reports.map(\.lines))")
            // A completion recorded in the database's future (an older version, on an instance whose clock ran ahead)
            // does not hold the job off.
            try await adminQuery(settings, "UPDATE maintenance_runs SET finished_at_us = finished_at_us + 86400000000 WHERE job = 'retention'")
            #expect(try await scheduledRun(clockOffsetMinutes: 0).skipped == nil)
        }
    }

    @Test func theScheduleRunsInTheServiceAndCountsWhatWent() async throws {
        try await withFreshStore(.sqlite) { store in
            let device = try await StoreConformanceTests.device(in: store)
            let ancient = Timestamp(microseconds: testNow.microseconds - 200 * 86_400_000_000)
            _ = try await store.store(try phBatch(sequences: 1...40, start: ancient), for: device, receivedAt: testNow)
            let registry = PrometheusCollectorRegistry()
            let service = RetentionService(
                store: try #require(store as? any RetentionStore), retention: IngestConfiguration.Retention(), metrics: RetentionMetrics(registry: registry),
                logger: testLogger, now: { testNow })
            let report = try #require(await service.runOnce())
            #expect(report.rawRowsDeleted == 40)
            #expect(try await Self.stored(store, device: device).isEmpty)
            let text = String(decoding: registry.emitToBuffer(), as: UTF8.self)
            #expect(text.contains(#"farmgate_ingest_retention_rows_removed_total{table="readings"} 40"#))
            #expect(text.contains(#"farmgate_ingest_retention_runs_total{outcome="completed"} 1"#))
            #expect(text.contains("farmgate_ingest_retention_last_run_time_seconds "))
            #expect(!text.contains("farmgate_ingest_retention_last_run_time_seconds 0"))
        }
    }

    /// Runs `body` while another session holds the retention advisory lock.
    static func holdingRetentionLock<T: Sendable>(_ settings: PostgresSettings, _ body: @Sendable () async throws -> T) async throws -> T {
        try await withTestClient(settings) { client in
            try await client.withConnection { connection in
                try await connection.query("SELECT pg_advisory_lock(\(PostgresSchema.retentionLock))", logger: testLogger)
                let result = try await body()
                try await connection.query("SELECT pg_advisory_unlock(\(PostgresSchema.retentionLock))", logger: testLogger)
                return result
            }
        }
    }
}

/// A retention run on SQLite that deletes millions of rows never holds the writer for long: batches are stored and
/// answered between its small transactions, while it still has most of its work ahead of it.
/// The outbox under retention: delivered rows and dead letters go after their own periods, pending rows never.
@Suite struct OutboxRetentionTests {
    @Test("delivered notifications go after 30 days, dead letters after 90, pending ones never; counted, and kept forever when told", arguments: StoreKind.allCases)
    func outboxRowsArePruned(kind: StoreKind) async throws {
        try await withOutboxStore(kind) { store in
            guard let retentionStore = store as? any RetentionStore else { throw IngestStoreError.notFound("a retention role") }
            let receiver = try await addWebhook(store, name: "hook", url: "http://127.0.0.1:9/hook")
            func daysAgo(_ days: Int64) -> Timestamp { Timestamp(microseconds: testNow.microseconds - days * 86_400_000_000) }
            /// Alert `alert`'s notification, due `days` ago, claimed then and delivered or dead then.
            func settle(_ alert: Int64, daysAgo days: Int64, delivered: Bool) async throws {
                _ = try await store.enqueueNotification(testNotification(alert), receiverID: receiver.id, dueAt: daysAgo(days))
                let claimed = try await store.claimNotifications(
                    OutboxClaimRequest(claimant: "test", now: daysAgo(days), claimDuration: .seconds(60), lookahead: .zero, limit: 1, perReceiver: 1, maxAttempts: 12))
                let claim = try #require(claimed.first)
                #expect(claim.entry.alertID == alert)
                let outcome: OutboxCompletion = delivered ? .delivered(at: daysAgo(days)) : .dead(at: daysAgo(days), error: "refused")
                #expect(try await store.completeNotification(id: claim.entry.id, claim: claim.claim, outcome: outcome))
            }
            try await settle(1, daysAgo: 100, delivered: false)  // dead 100 days: goes
            try await settle(2, daysAgo: 50, delivered: false)  // dead 50 days: kept (dead letters stay 90)
            try await settle(3, daysAgo: 40, delivered: true)  // delivered 40 days ago: goes
            try await settle(4, daysAgo: 5, delivered: true)  // kept
            _ = try await store.enqueueNotification(testNotification(5), receiverID: receiver.id, dueAt: daysAgo(200))  // pending: never goes
            let defaults = IngestConfiguration.Retention()
            let dry = try await retentionStore.runRetention(defaults, now: testNow, options: RetentionRunOptions(dryRun: true))
            #expect(dry.deliveredNotificationsDeleted == 1 && dry.deadNotificationsDeleted == 1)
            #expect(try await rows(store).count == 5)
            // The scheduled run: counted in the retention metric, named in the report.
            let registry = PrometheusCollectorRegistry()
            let service = RetentionService(store: retentionStore, retention: defaults, metrics: RetentionMetrics(registry: registry), logger: testLogger, now: { testNow })
            let report = try #require(await service.runOnce())
            #expect(report.deliveredNotificationsDeleted == 1 && report.deadNotificationsDeleted == 1)
            #expect(report.lines.contains("delivered notifications before 2025-12-02T00:00:00Z: removed 1 outbox rows"), "\(report.lines)")
            #expect(report.lines.contains("dead notifications before 2025-10-03T00:00:00Z: removed 1 outbox rows"), "\(report.lines)")
            let left = try await rows(store)
            #expect(left.map(\.alertID).sorted() == [2, 4, 5])
            #expect(metric(registry, "farmgate_ingest_retention_rows_removed_total{table=\"alert_outbox\"}") == 2)
            // "forever" keeps them all.
            let forever = IngestConfiguration.Retention(deliveredNotifications: nil, deadNotifications: nil)
            let kept = try await retentionStore.runRetention(forever, now: Timestamp(microseconds: testNow.microseconds + 400 * 86_400_000_000), options: RetentionRunOptions())
            #expect(kept.deliveredNotificationsDeleted == 0 && kept.deadNotificationsDeleted == 0)
            #expect(kept.lines.contains("delivered notifications: kept forever"))
            #expect(try await rows(store).count == 3)
        }
    }
}

@Suite struct RetentionUnderLoadTests {
    @Test func batchesAreAnsweredWhileAMultiMillionRowDeleteRuns() async throws {
        try await withFreshStore(.sqlite) { store in
            let sqlite = try #require(store as? SQLiteIngestStore)
            // Two million readings 200 days old, beside ten recent ones.
            let old = 2_000_000
            let device = try await SQLiteRetentionBesideServeTests.fill(sqlite, old: old)
            let removed = RemovedRows()
            let retention = Task {
                try await sqlite.runRetention(IngestConfiguration.Retention(), now: testNow, options: RetentionRunOptions(progress: { removed.set($0) }))
            }
            #expect(await eventually(timeout: .seconds(120)) { removed.value > 0 })
            // Twenty batches, one after another, while the delete runs: each is answered after at most one of its
            // transactions, so all of them are done long before the delete is.
            var next: UInt64 = 10_000_000
            var answeredWhileDeleting = 0
            for _ in 0..<20 {
                let outcome = try await store.store(try phBatch(sequences: next..<next + 500), for: device, receivedAt: testNow)
                #expect(outcome.accepted == 500)
                next += 500
                let progress = removed.value
                if progress > 0, progress < old { answeredWhileDeleting += 1 }
            }
            #expect(answeredWhileDeleting == 20, "batches answered while the delete still had rows to remove")
            let report = try await retention.value
            #expect(report.rawRowsDeleted == old)
            #expect(try await store.exportPage(device: device, afterSequence: nil, limit: 20).first?.sequence == 1)
        }
    }
}

/// The rows a retention run reports removed so far.
final class RemovedRows: Sendable {
    private let count = Mutex(0)
    var value: Int { count.withLock { $0 } }
    func set(_ value: Int) { count.withLock { $0 = value } }
}
