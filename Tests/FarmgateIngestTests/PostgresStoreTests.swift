import FarmgateWire
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
        try await withTestDatabase { settings in
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            return try await withRunning(store) { _ in
                try await store.migrate()
                try await store.createPartitions(now: now)
                return try await body(store, settings)
            }
        }
    }

    static func count(_ settings: PostgresSettings, _ sql: String) async throws -> Int {
        guard case .unixSocket(let path) = settings.endpoint else { throw MissingTestDatabase() }
        let client = PostgresClient(
            configuration: .init(unixSocketPath: path, username: settings.username, password: settings.password, database: settings.database))
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await client.run() }
            defer { group.cancelAll() }
            var result = -1
            for try await value in try await client.query(PostgresQuery(unsafeSQL: sql)).decode(Int.self) { result = value }
            return result
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

    /// The TLS modes against the test cluster's loopback port, which accepts only TLS (a certificate from a CA that
    /// `.ci/with-postgres` made for localhost).
    @Test func tlsVerifyFullTrustsOnlyTheConfiguredCA() async throws {
        guard let url = ProcessInfo.processInfo.environment["FARMGATE_TEST_DATABASE_TLS_URL"], !url.isEmpty else { throw MissingTestDatabase() }
        let verified = try PostgresSettings(url: url)
        #expect(verified.tls == .verifyFull && verified.caFile != nil)
        func ping(_ settings: PostgresSettings) async throws {
            var settings = settings
            settings.queryTimeout = .seconds(5)
            settings.connectTimeout = .seconds(2)
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            try await withRunning(store) { store in try await store.ping() }
        }
        try await ping(verified)
        var systemCAs = verified
        systemCAs.caFile = nil
        await #expect(throws: (any Error).self, "a certificate from the test CA must not verify against the system's CAs") { try await ping(systemCAs) }
        var unverified = verified
        unverified.tls = .require
        unverified.caFile = nil
        try await ping(unverified)
        var plain = verified
        plain.tls = .disable
        plain.caFile = nil
        await #expect(throws: (any Error).self, "the server accepts only TLS on TCP") { try await ping(plain) }
    }
}
