import FarmgateSupport
import FarmgateWire
import Foundation
import PostgresNIO
import Testing

@testable import FarmgateIngest

/// A store that held readings before rollups existed gets their rollups from the migration that adds them, exactly as
/// if they had been merged one commit at a time: history keeps its summaries when retention later removes raw rows.
/// PostgreSQL's migration 11 moves the 1-minute rollups into monthly partitions without changing a value.
@Suite struct RollupBackfillTests {
    /// Two weeks of synthetic readings, as rows of the `readings` table (device 1, sensors 1 and 2).
    static let data = SyntheticMonths(start: Timestamp(microseconds: testNow.microseconds - 14 * 86_400_000_000), days: 14)

    static func sensorRow(_ reading: Reading) -> Int64 { reading.sensor == SyntheticMonths.ph ? 1 : 2 }

    @Test func sqliteMigrationBuildsTheRollupsOfTheReadingsAlreadyStored() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/ingest.sqlite"
        // The schema as it was before rollups (migrations up to 4), with readings in it.
        try await runOffPool {
            let db = try sqliteIngestFile(at: path, migratedTo: 4)
            try db.transaction {
                try db.execute(
                    """
                    INSERT INTO farms(id, name, created_at_us) VALUES (1, 'f1', 0);
                    INSERT INTO devices(id, farm_id, name, key_id, secret_sha256, created_at_us) VALUES (1, 1, 'd1', 'kd1', x'00', 0);
                    INSERT INTO sensors(id, device_id, name, quantity, resolution_numerator, resolution_denominator, first_seen_us)
                        VALUES (1, 1, 'tank1.ph', 'ph', 1, 100, 0), (2, 1, 'tank1.temp', 'temperature', 1, 16, 0);
                    """)
                for reading in Self.data.readings {
                    try db.query(
                        "INSERT INTO readings(device_id, sequence, sensor_id, timestamp_us, value, flags, received_at_us) VALUES (1, ?, ?, ?, ?, ?, 0)",
                        [.integer(Int64(reading.sequence)), .integer(Self.sensorRow(reading)), .integer(reading.timestamp.microseconds), .real(reading.value),
                         .integer(Int64(reading.quality.rawValue))])
                }
            }
        }
        let store = try SQLiteIngestStore(path: path, logger: testLogger)
        defer { store.close() }
        #expect(try await store.migrate().map(\.version).contains(6))
        for level in RollupLevel.allCases {
            try await expectRollups(store, sensor: 1, level: level, ExpectedBucket.of(Self.data.readings, sensor: SyntheticMonths.ph, level: level))
            try await expectRollups(store, sensor: 2, level: level, ExpectedBucket.of(Self.data.readings, sensor: SyntheticMonths.temp, level: level))
        }
    }

    @Test func postgresMigrationBuildsTheRollupsOfTheReadingsAlreadyStored() async throws {
        try await withTestDatabase { settings in
            try await postgresSchema(migratedTo: 3, settings)
            try await withTestClient(settings) { client in
                try await client.query(
                    """
                    INSERT INTO farms(id, name, created_at_us) VALUES (1, 'f1', 0);
                    """)
                try await client.query("INSERT INTO devices(id, farm_id, name, key_id, secret_sha256, created_at_us) VALUES (1, 1, 'd1', 'kd1', '\\x00', 0)")
                try await client.query(
                    """
                    INSERT INTO sensors(id, device_id, name, quantity, resolution_numerator, resolution_denominator, first_seen_us)
                    VALUES (1, 1, 'tank1.ph', 'ph', 1, 100, 0), (2, 1, 'tank1.temp', 'temperature', 1, 16, 0)
                    """)
                let readings = Self.data.readings
                try await client.query(
                    """
                    INSERT INTO readings(timestamp_us, sequence, value, device_id, sensor_id, flags)
                    SELECT t, s, v, 1, k, f FROM unnest(\(readings.map(\.timestamp.microseconds))::int8[], \(readings.map { Int64($0.sequence) })::int8[],
                        \(readings.map(\.value))::float8[], \(readings.map(Self.sensorRow))::int8[], \(readings.map { Int16(bitPattern: $0.quality.rawValue) })::int2[]) AS u(t, s, v, k, f)
                    """)
            }
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            try await withRunning(store) { _ in
                #expect(try await store.migrate().map(\.version).contains(4))
                for level in RollupLevel.allCases {
                    try await expectRollups(store, sensor: 1, level: level, ExpectedBucket.of(Self.data.readings, sensor: SyntheticMonths.ph, level: level))
                    try await expectRollups(store, sensor: 2, level: level, ExpectedBucket.of(Self.data.readings, sensor: SyntheticMonths.temp, level: level))
                }
            }
        }
    }

    /// The 1-minute rollups as one digest of every row's every column, in key order, and the row count.
    static func minuteRollupDigest(_ settings: PostgresSettings) async throws -> (digest: String, rows: Int) {
        let digest = try await PostgresStoreTests.texts(
            settings, "SELECT coalesce(md5(string_agg(r::text, ';' ORDER BY sensor_id, bucket_us)), '') FROM rollups_1m r")
        return (digest.first ?? "", try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m"))
    }

    @Test func postgresMigrationElevenMovesTheMinuteRollupsIntoMonthlyPartitionsAndTheyStillMergeExactly() async throws {
        try await withTestDatabase { settings in
            // The schema as migration 10 left it, with daily partitions for the readings.
            try await postgresSchema(migratedTo: 10, settings)
            try await adminQuery(settings, "SELECT farmgate_create_partitions('2025-09-30', 95)")
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM pg_partitioned_table WHERE partrelid = 'rollups_1m'::regclass") == 0)
            // October to December 2025, stored (and rolled up) before the migration.
            let data = SyntheticMonths(start: RollupTests.monthsAgo, days: 92)
            // After it: a second reading 30 s into minutes already rolled up, from October 30 to November 3 (both
            // months' partitions), new sequences.
            let from = RollupTests.monthsAgo.microseconds + 29 * 86_400_000_000
            let later = data.readings.filter { $0.timestamp.microseconds >= from && $0.timestamp.microseconds < from + 5 * 86_400_000_000 }.enumerated().map {
                index, reading in
                Reading(
                    sensor: reading.sensor, sequence: 1_000_000 + UInt64(index), timestamp: Timestamp(microseconds: reading.timestamp.microseconds + 30_000_000),
                    value: reading.value + 0.5, quality: index % 7 == 3 ? [.sensorFault] : [])
            }
            #expect(later.count == 2 * 5 * 96)
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            try await withRunning(store) { _ in
                let device = try await PostgresStoreTests.device(in: store)
                for batch in try SyntheticMonths.batches(data.readings) {
                    #expect(try await store.store(batch, for: device, receivedAt: testNow).accepted == batch.readings.count)
                }
                let before = try await Self.minuteRollupDigest(settings)
                #expect(before.rows == 2 * 92 * 96)

                #expect(try await store.migrate().map(\.version) == Array(11...PostgresSchema.currentVersion))
                // Every row, every value, and nothing more.
                let after = try await Self.minuteRollupDigest(settings)
                #expect(after.rows == before.rows && after.digest == before.digest && !after.digest.isEmpty)
                #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM pg_partitioned_table WHERE partrelid = 'rollups_1m'::regclass") == 1)
                #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM pg_class WHERE relname LIKE 'rollups_1m_v4%'") == 0)
                // A partition for each month that had rows, holding that month's rows; the default one empty.
                let partitions = try await PostgresStoreTests.minuteRollupPartitions(settings)
                #expect(Set(["rollups_1m_202510", "rollups_1m_202511", "rollups_1m_202512", "rollups_1m_default"]).isSubset(of: partitions), "\(partitions)")
                #expect(!partitions.contains("rollups_1m_202509"), "\(partitions)")
                for (month, days) in [("202510", 31), ("202511", 30), ("202512", 31)] {
                    #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m_\(month)") == 2 * days * 96)
                }
                #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m_default") == 0)
                // The hourly and daily tables stay as they were.
                #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM pg_partitioned_table WHERE partrelid IN ('rollups_1h'::regclass, 'rollups_1d'::regclass)") == 0)

                // Written after it, merged into the moved rows; sent again, counted once.
                for batch in try SyntheticMonths.batches(later, size: 300) {
                    #expect(try await store.store(batch, for: device, receivedAt: testNow).accepted == batch.readings.count)
                }
                for batch in try SyntheticMonths.batches(Array(later.prefix(600)), size: 200) {
                    #expect(try await store.store(batch, for: device, receivedAt: testNow).duplicates == batch.readings.count)
                }
                #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1m") == before.rows)
                let sensors = try await syntheticSensorRows(store, device: device)
                for level in RollupLevel.allCases {
                    for (sensor, row) in [(SyntheticMonths.ph, sensors.ph), (SyntheticMonths.temp, sensors.temp)] {
                        try await expectRollups(store, sensor: row, level: level, ExpectedBucket.of(data.readings + later, sensor: sensor, level: level))
                    }
                }
            }
        }
    }
}
