import FarmgateSupport
import FarmgateWire
import Foundation
import PostgresNIO
import Testing

@testable import FarmgateIngest

/// A store that held readings before rollups existed gets their rollups from the migration that adds them, exactly as
/// if they had been merged one commit at a time: history keeps its summaries when retention later removes raw rows.
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
            guard case .unixSocket(let socket) = settings.endpoint else { throw MissingTestDatabase() }
            let client = PostgresClient(
                configuration: .init(unixSocketPath: socket, username: settings.username, password: settings.password, database: settings.database))
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await client.run() }
                defer { group.cancelAll() }
                try await client.query(PostgresQuery(unsafeSQL: PostgresSchema.bookkeeping))
                for migration in PostgresSchema.migrations where migration.version < 4 {
                    for statement in migration.statements { try await client.query(PostgresQuery(unsafeSQL: statement)) }
                    try await client.query("INSERT INTO schema_migrations(version, name, applied_at_us) VALUES (\(migration.version), \(migration.name), 0)")
                }
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
}
