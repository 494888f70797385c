import FarmgateWire
import Foundation
import PostgresNIO
import Testing

@testable import FarmgateIngest

/// `[storage] write_transactions`, `group_max_batches` and `group_max_readings` reach the running store and bound its
/// groups: batches are made to queue behind a group held on a row lock, and the transactions that take them are counted.
/// Fails, never skips, without the test cluster (`.ci/with-postgres`).
@Suite struct PostgresGroupCommitLimitsTests {
    /// A store built as `serve` builds it (from settings alone), partitions around ``testNow``, farm `f1`, `devices`.
    static func withStore<T: Sendable>(
        devices: Int, configure: @Sendable (inout PostgresSettings) -> Void,
        _ body: @Sendable (PostgresIngestStore, PostgresSettings, [DeviceIdentity]) async throws -> T
    ) async throws -> T {
        try await withTestDatabase(migrated: true) { settings in
            var tuned = settings
            tuned.poolSize = 8
            configure(&tuned)
            let settings = tuned
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            return try await withRunning(store) { _ in
                try await store.migrate()
                try await store.createPartitions(now: testNow)
                _ = try await store.createFarm(name: "f1", createdAt: testNow)
                var identities: [DeviceIdentity] = []
                for index in 0..<devices {
                    identities.append(
                        try await store.createDevice(farm: "f1", device: try deviceID("g\(index)"), keyID: "kg\(index)", secretHash: [1], createdAt: testNow))
                }
                return try await body(store, settings, identities)
            }
        }
    }

    /// Holds `held`'s row lock while its batch's group waits on it, queues one batch of `readings` readings for each of
    /// `queued`, releases the lock and returns how many group transactions took the queued batches (each checked stored).
    static func groupsTaking(
        _ queued: [DeviceIdentity], readings: UInt64, behind held: DeviceIdentity, store: PostgresIngestStore, settings: PostgresSettings
    ) async throws -> Int {
        try await PostgresGroupCommitTests.withConnection(settings) { locker in
            try await locker.query("BEGIN", logger: testLogger)
            try await locker.query("SELECT id FROM devices WHERE id = \(held.rowID) FOR UPDATE", logger: testLogger)
            let first = Task { try await store.store(try phBatch(device: held.device.rawValue, sequences: 1...5), for: held, receivedAt: testNow) }
            #expect(try await PostgresGroupCommitTests.waitUntil { store.groupCommit.groupCount == 1 })
            let others = Task {
                try await withThrowingTaskGroup(of: Int.self) { group in
                    for device in queued {
                        group.addTask {
                            try await store.store(try phBatch(device: device.device.rawValue, sequences: 1...readings), for: device, receivedAt: testNow).accepted
                        }
                    }
                    return try await group.reduce(into: [Int]()) { $0.append($1) }
                }
            }
            #expect(try await PostgresGroupCommitTests.waitUntil { store.groupCommit.queuedCount == queued.count }, "the batches did not queue")
            try await locker.query("COMMIT", logger: testLogger)
            #expect(try await first.value.accepted == 5)
            #expect(try await others.value == Array(repeating: Int(readings), count: queued.count))
            for device in queued {
                #expect(try await store.highestSequence(device: device) == readings)
            }
            return store.groupCommit.groupCount - 1
        }
    }

    @Test("group_max_batches = 1: every queued batch commits in a transaction of its own")
    func oneBatchPerGroup() async throws {
        try await Self.withStore(devices: 13, configure: { $0.writeTransactions = 1; $0.groupMaxBatches = 1 }) { store, settings, devices in
            let groups = try await Self.groupsTaking(Array(devices.dropFirst()), readings: 10, behind: devices[0], store: store, settings: settings)
            #expect(groups == 12)
        }
    }

    @Test("group_max_batches = 5: twelve queued batches take three transactions (the default 64 takes one)")
    func fiveBatchesPerGroup() async throws {
        try await Self.withStore(devices: 13, configure: { $0.writeTransactions = 1; $0.groupMaxBatches = 5 }) { store, settings, devices in
            let groups = try await Self.groupsTaking(Array(devices.dropFirst()), readings: 10, behind: devices[0], store: store, settings: settings)
            #expect(groups == 3)
        }
        try await Self.withStore(devices: 13, configure: { $0.writeTransactions = 1 }) { store, settings, devices in
            let groups = try await Self.groupsTaking(Array(devices.dropFirst()), readings: 10, behind: devices[0], store: store, settings: settings)
            #expect(groups == 1)
        }
    }

    @Test("group_max_readings = 250: batches of 100 go two to a transaction, and one larger batch still goes alone")
    func readingsPerGroup() async throws {
        try await Self.withStore(devices: 9, configure: { $0.writeTransactions = 1; $0.groupMaxReadings = 250 }) { store, settings, devices in
            let groups = try await Self.groupsTaking(Array(devices.dropFirst()), readings: 100, behind: devices[0], store: store, settings: settings)
            #expect(groups == 4)
        }
        try await Self.withStore(devices: 4, configure: { $0.writeTransactions = 1; $0.groupMaxReadings = 250 }) { store, settings, devices in
            let groups = try await Self.groupsTaking(Array(devices.dropFirst()), readings: 400, behind: devices[0], store: store, settings: settings)
            #expect(groups == 3)
        }
    }

    @Test("write_transactions = 3: three groups run at once while the rest queue")
    func writeTransactions() async throws {
        for writers in [3, 1] {
            try await Self.withStore(devices: 8, configure: { $0.writeTransactions = writers }) { store, settings, devices in
                #expect(store.groupCommit.limits.concurrency == writers)
                try await PostgresGroupCommitTests.withConnection(settings) { locker in
                    try await locker.query("BEGIN", logger: testLogger)
                    let held = Array(devices.prefix(3))
                    try await locker.query("SELECT id FROM devices WHERE id = ANY(\(held.map(\.rowID))) FOR UPDATE", logger: testLogger)
                    var tasks: [Task<Int, any Error>] = []
                    for (index, device) in devices.enumerated() {
                        tasks.append(
                            Task { try await store.store(try phBatch(device: device.device.rawValue, sequences: 1...5), for: device, receivedAt: testNow).accepted })
                        // One at a time, each in a group of its own while workers are free.
                        if index < writers {
                            #expect(try await PostgresGroupCommitTests.waitUntil { store.groupCommit.groupCount == index + 1 })
                        }
                    }
                    #expect(try await PostgresGroupCommitTests.waitUntil { store.groupCommit.queuedCount == devices.count - writers })
                    // A group counts as started before its transaction reaches the held rows: on a loaded machine the last one
                    // may still be on its way there, so wait for it (and then make sure no more arrive).
                    let waitingOnLocks: @Sendable () async throws -> Int = {
                        try await PostgresStoreTests.count(
                            settings, "SELECT count(*)::int8 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
                    }
                    #expect(try await PostgresGroupCommitTests.waitUntil { try await waitingOnLocks() >= writers })
                    try await Task.sleep(for: .milliseconds(200))
                    #expect(try await waitingOnLocks() == writers, "transactions waiting on the held rows")
                    #expect(store.groupCommit.groupCount == writers, "more groups started than write_transactions allows")
                    try await locker.query("COMMIT", logger: testLogger)
                    for task in tasks { #expect(try await task.value == 5) }
                }
            }
        }
    }
}
