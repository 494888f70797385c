import FarmgateWire
import Foundation
import PostgresNIO
import Testing

@testable import FarmgateIngest

/// PostgreSQL's rollups merged beside the write transaction: queued by the commit, merged exactly once by one run at a
/// time, settled before any read that answers from them, and merged by the service's job without a read.
@Suite struct PostgresRollupQueueTests {
    /// A fresh, migrated store whose pool runs but whose service (and so its rollup job) does not: the queue stays
    /// as the writes left it until the test merges it.
    static func withStoreWithoutJob<T: Sendable>(_ body: @Sendable (PostgresIngestStore, PostgresSettings) async throws -> T) async throws -> T {
        try await withTestDatabase { settings in
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            return try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await store.client.run() }
                defer { group.cancelAll() }
                try await store.migrate()
                try await store.createPartitions(now: testNow)
                return try await body(store, settings)
            }
        }
    }

    /// Two sensors every 15 minutes for two days, stored in four batches of 96 (one group each: written one at a time).
    static func storeTwoDays(_ store: PostgresIngestStore) async throws -> (data: SyntheticMonths, device: DeviceIdentity, batches: Int) {
        let device = try await PostgresStoreTests.device(in: store)
        let data = SyntheticMonths(start: Timestamp(microseconds: testNow.microseconds - 2 * 86_400_000_000), days: 2)
        let batches = try SyntheticMonths.batches(data.readings, size: 96)
        for batch in batches {
            #expect(try await store.store(batch, for: device, receivedAt: testNow).accepted == batch.readings.count)
        }
        return (data, device, batches.count)
    }

    static func expectAllLevels(_ store: PostgresIngestStore, _ readings: [Reading], device: DeviceIdentity) async throws {
        let sensors = try await syntheticSensorRows(store, device: device)
        for level in RollupLevel.allCases {
            for (sensor, row) in [(SyntheticMonths.ph, sensors.ph), (SyntheticMonths.temp, sensors.temp)] {
                try await expectRollups(store, sensor: row, level: level, ExpectedBucket.of(readings, sensor: sensor, level: level))
            }
        }
    }

    @Test func aCommitQueuesItsChunksAndOneRunMergesThemExactlyOnce() async throws {
        try await Self.withStoreWithoutJob { store, settings in
            let (data, device, batches) = try await Self.storeTwoDays(store)
            // Nothing merged yet; one queue row per group, naming every chunk.
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollup_queue") == batches)
            #expect(try await PostgresStoreTests.count(settings, "SELECT (SELECT count(*) FROM rollups_1m) + (SELECT count(*) FROM rollups_1d)") == 0)
            #expect(
                try await PostgresStoreTests.count(settings, "SELECT sum(cardinality(device_ids))::int8 FROM rollup_queue")
                    == PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM readings"))
            // Duplicates queue nothing.
            let again = try SyntheticMonths.batches(Array(data.readings[0..<150]), size: 150)[0]
            #expect(try await store.store(again, for: device, receivedAt: testNow).duplicates == 150)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollup_queue") == batches)

            #expect(try await store.mergeQueuedRollups(wait: false) == batches)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollup_queue") == 0)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollups_1d") == 2 * 2)
            // A second run finds nothing: nothing counts twice.
            #expect(try await store.mergeQueuedRollups(wait: false) == 0)
            try await Self.expectAllLevels(store, data.readings, device: device)
        }
    }

    @Test func aReadOfRollupsMergesWhatWasQueuedBeforeIt() async throws {
        try await Self.withStoreWithoutJob { store, settings in
            let (data, device, _) = try await Self.storeTwoDays(store)
            let sensors = try await syntheticSensorRows(store, device: device)
            // The count behind `resolution=auto` settles the queue too.
            let from = data.start
            let to = Timestamp(microseconds: data.start.microseconds + 2 * 86_400_000_000)
            #expect(try await store.storedReadingCount(sensorRowID: sensors.ph, from: from, to: to) == data.readings.count / 2)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollup_queue") == 0)
            // A later write is in the next read, without any job running.
            let later = Timestamp(microseconds: testNow.microseconds - 60_000_000)
            let batch = Batch(
                device: try deviceID("d1"), sensors: SyntheticMonths.descriptors,
                readings: [Reading(sensor: SyntheticMonths.ph, sequence: 100_000, timestamp: later, value: 6.25)])
            #expect(try await store.store(batch, for: device, receivedAt: testNow).accepted == 1)
            let minute = try await store.rollups(sensorRowID: sensors.ph, level: .minute, from: later, to: nil, limit: 10)
            #expect(minute.count == 1 && minute.first?.count == 1 && minute.first?.last == 6.25)
            try await Self.expectAllLevels(store, data.readings + batch.readings, device: device)
        }
    }

    @Test func aRunSkipsWhileAnotherHoldsTheLockAndConcurrentRunsMergeEachGroupOnce() async throws {
        try await Self.withStoreWithoutJob { store, settings in
            let (data, device, batches) = try await Self.storeTwoDays(store)
            guard case .unixSocket(let path) = settings.endpoint else { throw MissingTestDatabase() }
            let other = PostgresClient(
                configuration: .init(unixSocketPath: path, username: settings.username, password: settings.password, database: settings.database))
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await other.run() }
                defer { group.cancelAll() }
                // Another instance's run in progress: the background job skips and leaves the queue as it is.
                try await other.withConnection { connection in
                    _ = try await connection.query("SELECT pg_advisory_lock(\(PostgresSchema.rollupLock))", logger: testLogger)
                    #expect(try await store.mergeQueuedRollups(wait: false) == nil)
                    #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollup_queue") == batches)
                    _ = try await connection.query("SELECT pg_advisory_unlock(\(PostgresSchema.rollupLock))", logger: testLogger)
                }
            }
            // Readers and background runs at once: each group is merged by exactly one of them.
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<6 {
                    group.addTask {
                        if index % 2 == 0 {
                            try await store.settleQueuedRollups()
                        } else {
                            while try await store.mergeQueuedRollups(wait: false) != 0 {}
                        }
                    }
                }
                try await group.waitForAll()
            }
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollup_queue") == 0)
            try await Self.expectAllLevels(store, data.readings, device: device)
        }
    }

    @Test func theServiceMergesTheQueueWithoutARead() async throws {
        try await PostgresStoreTests.withStore { store, settings in
            let device = try await PostgresStoreTests.device(in: store)
            let batch = try phBatch(sequences: 1...50)
            #expect(try await store.store(batch, for: device, receivedAt: testNow).accepted == 50)
            // The job runs within its gathering time after the commit; poll the tables, not the read path (which settles).
            let deadline = ContinuousClock.now + .seconds(10)
            var merged = -1
            while ContinuousClock.now < deadline {
                merged = try await PostgresStoreTests.count(settings, "SELECT coalesce(sum(count), 0)::int8 FROM rollups_1d")
                if merged == 50 { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(merged == 50)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM rollup_queue") == 0)
        }
    }
}
