import FarmgateWire
import Foundation
import PostgresNIO
import Synchronization
import Testing

@testable import FarmgateIngest

/// Group commit on PostgreSQL: batches of many devices share transactions, a batch that fails alone fails alone, and
/// nobody is answered before the commit (a connection killed during the transaction fails every batch of the group and
/// stores none of them).
@Suite struct PostgresGroupCommitTests {
    /// A fresh, migrated store running `concurrency` group transactions at once, partitions around ``testNow``, farm
    /// `f1` and `devices` devices (built from settings, as `serve` builds it).
    static func withStore<T: Sendable>(
        concurrency: Int, devices: Int, _ body: @Sendable (PostgresIngestStore, PostgresSettings, [DeviceIdentity]) async throws -> T
    ) async throws -> T {
        try await PostgresGroupCommitLimitsTests.withStore(devices: devices, configure: { $0.writeTransactions = concurrency }, body)
    }

    /// Runs `body` on one connection of its own to the test database (to hold locks, or kill the store's backends).
    static func withConnection<T: Sendable>(_ settings: PostgresSettings, _ body: @Sendable (PostgresConnection) async throws -> T) async throws -> T {
        try await withTestClient(settings) { client in
            try await client.withConnection { connection in try await body(connection) }
        }
    }

    /// Polls `condition` until it holds or `timeout` passes.
    static func waitUntil(timeout: Duration = .seconds(20), _ condition: @Sendable () async throws -> Bool) async throws -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try await condition() { return true }
            try await Task.sleep(for: .milliseconds(20))
        }
        return try await condition()
    }

    @Test func batchesOfManyDevicesAtOnceShareTransactionsAndAllArrive() async throws {
        try await Self.withStore(concurrency: 2, devices: 40) { store, _, devices in
            let outcomes = try await withThrowingTaskGroup(of: (Int, StoreOutcome).self) { group in
                for (index, device) in devices.enumerated() {
                    group.addTask {
                        let batch = try phBatch(device: device.device.rawValue, sequences: 1...UInt64(100 + index), value: 6.5)
                        return (index, try await store.store(batch, for: device, receivedAt: testNow))
                    }
                }
                var outcomes: [Int: StoreOutcome] = [:]
                for try await (index, outcome) in group { outcomes[index] = outcome }
                return outcomes
            }
            for (index, device) in devices.enumerated() {
                #expect(outcomes[index]?.tally == Tally(accepted: 100 + index, duplicates: 0, rejected: 0))
                #expect(outcomes[index]?.fresh.count == 100 + index)
                #expect(try await store.highestSequence(device: device) == UInt64(100 + index))
                let page = try await store.exportPage(device: device, afterSequence: nil, limit: 1_000)
                #expect(page.map(\.sequence) == Array(1...UInt64(100 + index)))
            }
            let groups = store.groupCommit.groupCount
            #expect(groups < devices.count, "40 concurrent batches took \(groups) transactions: nothing was grouped")
        }
    }

    @Test func aBatchThatFailsAloneDoesNotFailTheOthersOfItsGroup() async throws {
        try await Self.withStore(concurrency: 1, devices: 21) { store, settings, devices in
            // A server-side refusal of one batch's data (a trigger refusing one sensor name), and a device deleted
            // between authentication and storing.
            try await adminQuery(
                settings,
                """
                CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.name = 'poison.ph' THEN RAISE EXCEPTION 'poisoned sensor' USING ERRCODE = '22023'; END IF;
                    RETURN NEW;
                END $$
                """)
            try await adminQuery(settings, "CREATE TRIGGER refuse_poison BEFORE INSERT ON sensors FOR EACH ROW EXECUTE FUNCTION refuse_poison()")
            let blocker = devices[0]
            let gone = try await store.createDevice(farm: "f1", device: try deviceID("gone"), keyID: "kgone", secretHash: [1], createdAt: testNow)
            try await adminQuery(settings, "DELETE FROM devices WHERE name = 'gone'")
            let poison = try sensorID("poison.ph")
            let poisoned = Batch(
                device: devices[7].device, sensors: [SensorDescriptor(id: poison, quantity: .ph)],
                readings: [Reading(sensor: poison, sequence: 1, timestamp: testNow, value: 7)])

            try await Self.withConnection(settings) { locker in
                // Hold the first device's row: the first group waits on it while everything else queues behind.
                try await locker.query("BEGIN", logger: testLogger)
                try await locker.query("SELECT id FROM devices WHERE id = \(blocker.rowID) FOR UPDATE", logger: testLogger)
                let first = Task { try await store.store(try phBatch(device: blocker.device.rawValue, sequences: 1...10), for: blocker, receivedAt: testNow) }
                #expect(try await Self.waitUntil { store.groupCommit.groupCount == 1 })
                let others = Task {
                    try await withThrowingTaskGroup(of: (String, Result<StoreOutcome, any Error>).self) { group in
                        for device in devices.dropFirst() + [gone] {
                            group.addTask {
                                let batch = device.rowID == devices[7].rowID ? poisoned : try phBatch(device: device.device.rawValue, sequences: 1...10)
                                do {
                                    return (device.device.rawValue, .success(try await store.store(batch, for: device, receivedAt: testNow)))
                                } catch {
                                    return (device.device.rawValue, .failure(error))
                                }
                            }
                        }
                        var results: [String: Result<StoreOutcome, any Error>] = [:]
                        for try await (name, result) in group { results[name] = result }
                        return results
                    }
                }
                #expect(try await Self.waitUntil { store.groupCommit.queuedCount == 21 }, "the batches did not queue behind the held group")
                try await locker.query("COMMIT", logger: testLogger)
                #expect(try await first.value.accepted == 10)
                let results = try await others.value
                #expect(store.groupCommit.groupCount == 2, "the 21 queued batches should have formed one group")
                for device in devices.dropFirst() where device.rowID != devices[7].rowID {
                    let outcome = try results[device.device.rawValue]?.get()
                    #expect(outcome?.accepted == 10, "\(device.device) was failed by another batch of its group")
                }
                #expect(throws: PSQLError.self) { try results[devices[7].device.rawValue]?.get() }
                #expect(throws: IngestStoreError.notFound("device 'gone' in farm 'f1'")) { try results["gone"]?.get() }
                #expect(try await store.highestSequence(device: devices[7]) == nil)
            }
        }
    }

    @Test func nobodyIsAnsweredBeforeTheCommitAndAKilledTransactionStoresNothing() async throws {
        try await Self.withStore(concurrency: 1, devices: 6) { store, settings, devices in
            let first = devices[0]
            // Once armed, the upsert of `latest` (the group's last statement, after its readings were inserted) sleeps
            // for any device but the first: the transaction is caught between its writes and its COMMIT.
            try await adminQuery(settings, "CREATE TABLE test_sleep (armed boolean)")
            try await adminQuery(
                settings,
                """
                CREATE FUNCTION test_slow_latest() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF EXISTS (SELECT 1 FROM test_sleep) AND (SELECT device_id FROM sensors WHERE id = NEW.sensor_id) <> \(first.rowID) THEN
                        PERFORM pg_sleep(60);
                    END IF;
                    RETURN NEW;
                END $$
                """)
            try await adminQuery(settings, "CREATE TRIGGER test_slow_latest BEFORE INSERT ON latest FOR EACH ROW EXECUTE FUNCTION test_slow_latest()")
            try await adminQuery(settings, "INSERT INTO test_sleep VALUES (true)")
            let answered = AnswerCount()
            @Sendable func send(_ device: DeviceIdentity) async -> Result<StoreOutcome, any Error> {
                defer { answered.count.withLock { $0 += 1 } }
                do {
                    return .success(try await store.store(try phBatch(device: device.device.rawValue, sequences: 1...20), for: device, receivedAt: testNow))
                } catch {
                    return .failure(error)
                }
            }
            try await Self.withConnection(settings) { locker in
                // The first device's batch holds the only worker (its row is locked here) while the five others queue,
                // so that they form one group.
                try await locker.query("BEGIN", logger: testLogger)
                try await locker.query("SELECT id FROM devices WHERE id = \(first.rowID) FOR UPDATE", logger: testLogger)
                let held = Task { await send(first) }
                #expect(try await Self.waitUntil { store.groupCommit.groupCount == 1 })
                let group = Task {
                    await withTaskGroup(of: Result<StoreOutcome, any Error>.self) { tasks in
                        for device in devices.dropFirst() { tasks.addTask { await send(device) } }
                        return await tasks.reduce(into: []) { $0.append($1) }
                    }
                }
                #expect(try await Self.waitUntil { store.groupCommit.queuedCount == 5 })
                try await locker.query("COMMIT", logger: testLogger)
                #expect(try await held.value.get().accepted == 20)
                let sleeping = "SELECT count(*)::int8 FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'"
                #expect(try await Self.waitUntil { try await PostgresStoreTests.count(settings, sleeping) == 1 }, "the group never reached its last statement")
                #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM stored_sequences") == 1, "only the first device's commit is visible")
                try await Task.sleep(for: .milliseconds(300))
                #expect(answered.count.withLock { $0 } == 1, "a caller was answered while its group had not committed")
                // Disarm, then kill the connection in the middle of the transaction.
                try await adminQuery(settings, "DELETE FROM test_sleep")
                try await locker.query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'", logger: testLogger)
                let outcomes = await group.value
                #expect(outcomes.count == 5)
                #expect(outcomes.allSatisfy { (try? $0.get()) == nil }, "a batch of the killed transaction was acknowledged")
            }
            for device in devices.dropFirst() {
                #expect(try await store.exportPage(device: device, afterSequence: nil, limit: 100).isEmpty)
                #expect(try await store.highestSequence(device: device) == nil)
            }
            // The store recovers: every batch sent again is stored exactly once. The killed transaction can leave
            // postgres-nio waiting on its dead connection until `query_timeout` (see `commitGroup`), and under a loaded
            // machine a batch sent meanwhile can time out behind it: like an agent, send it again (an attempt that
            // timed out but committed makes the next one a duplicate, never a second copy).
            for device in devices {
                var again: StoreOutcome?
                for attempt in 1...3 where again == nil {
                    do {
                        again = try await store.store(try phBatch(device: device.device.rawValue, sequences: 1...20), for: device, receivedAt: testNow)
                    } catch let error as PostgresStoreError where attempt < 3 {
                        guard case .timedOut = error else { throw error }
                    }
                }
                let tally = try #require(again).tally
                #expect(tally.accepted + tally.duplicates == 20 && tally.rejected == 0, "\(tally)")
                if device == first { #expect(tally.accepted == 0, "the first device's batch was committed before the kill") }
                #expect(try await store.exportPage(device: device, afterSequence: nil, limit: 100).map(\.sequence) == Array(1...20))
            }
        }
    }

    /// A foreign-key check of another transaction (here the alert engine's watermark insert, which takes `FOR KEY SHARE`
    /// on the device row) must not hold the device's writes: under load the engine's upserts of many devices at once
    /// made every write group queue behind them (measured: most of PostgreSQL's waits, p99 above a second).
    @Test func aForeignKeyCheckOnTheDeviceDoesNotHoldItsWrites() async throws {
        try await Self.withStore(concurrency: 1, devices: 1) { store, settings, devices in
            let device = devices[0]
            try await Self.withConnection(settings) { other in
                try await other.query("BEGIN", logger: testLogger)
                try await other.query("INSERT INTO alert_watermarks(device_id, sequence) VALUES (\(device.rowID), 0)", logger: testLogger)
                let write = Task { try await store.store(try phBatch(device: device.device.rawValue, sequences: 1...10), for: device, receivedAt: testNow) }
                let done = try await Self.waitUntil(timeout: .seconds(10)) {
                    let highest = try? await store.highestSequence(device: device)
                    return highest == 10
                }
                #expect(done, "the write waited for the other transaction's key-share lock on its device")
                try await other.query("COMMIT", logger: testLogger)
                #expect(try await write.value.accepted == 10)
            }
        }
    }

    @Test func aCallerCancelledWhileQueuedLeavesTheQueue() async throws {
        try await Self.withStore(concurrency: 1, devices: 2) { store, settings, devices in
            try await Self.withConnection(settings) { locker in
                try await locker.query("BEGIN", logger: testLogger)
                try await locker.query("SELECT id FROM devices WHERE id = \(devices[0].rowID) FOR UPDATE", logger: testLogger)
                let held = Task { try await store.store(try phBatch(device: devices[0].device.rawValue, sequences: 1...5), for: devices[0], receivedAt: testNow) }
                #expect(try await Self.waitUntil { store.groupCommit.groupCount == 1 })
                let queued = Task { try await store.store(try phBatch(device: devices[1].device.rawValue, sequences: 1...5), for: devices[1], receivedAt: testNow) }
                #expect(try await Self.waitUntil { store.groupCommit.queuedCount == 1 })
                queued.cancel()
                await #expect(throws: CancellationError.self) { try await queued.value }
                #expect(store.groupCommit.queuedCount == 0)
                try await locker.query("COMMIT", logger: testLogger)
                #expect(try await held.value.accepted == 5)
                #expect(try await store.highestSequence(device: devices[1]) == nil)
            }
        }
    }
}

/// How many callers were answered, counted from their tasks.
final class AnswerCount: Sendable {
    let count = Mutex(0)

}

extension PostgresGroupCommitTests {
    @Test("a write group's first statement sets statement_timeout for the statements after it, and only for its transaction")
    func theLockStatementSetsTheTimeout() async throws {
        try await Self.withStore(concurrency: 1, devices: 1) { store, _, devices in
            #expect(store.statementTimeout == 30_000, "query_timeout's default 30 s, in milliseconds")
            for (timeout, shown) in [(Int64(1234), "1234ms"), (nil, "0")] {
                let (accepted, inside) = try await store.transaction(settingTimeout: false) { connection in
                    let sequences: ClosedRange<UInt64> = timeout == nil ? 4...6 : 1...3
                    let member = PostgresBatchWriter.Member(
                        batch: try phBatch(device: devices[0].device.rawValue, sequences: sequences), device: devices[0], receivedAt: testNow)
                    let results = try await PostgresBatchWriter(connection: connection, statementTimeout: timeout, logger: testLogger).write([member])
                    var shown: [String] = []
                    for name in ["statement_timeout", "lock_timeout"] {
                        for try await value in try await connection.query("SELECT current_setting(\(name))", logger: testLogger).decode(String.self) {
                            shown.append(value)
                        }
                    }
                    return (try results.first?.get().accepted ?? 0, shown)
                }
                #expect(accepted == 3)
                #expect(inside == [shown, shown])
            }
            let after = try await store.rows("SELECT current_setting('statement_timeout') || ' ' || current_setting('lock_timeout')") { try $0.decode(String.self) }
            #expect(after == ["0 0"], "SET LOCAL: the pooled connection goes back without them")
        }
    }

    @Test("batches of one device in one group see what the earlier ones stored: repeats are duplicates, changed values conflicts")
    func batchesOfOneDeviceInOneGroupCompareWithEachOther() async throws {
        try await Self.withStore(concurrency: 1, devices: 2) { store, _, devices in
            let results = try await store.transaction(settingTimeout: false) { connection in
                func member(_ device: DeviceIdentity, _ sequences: ClosedRange<UInt64>, value: Double) throws -> PostgresBatchWriter.Member {
                    PostgresBatchWriter.Member(
                        batch: try phBatch(device: device.device.rawValue, sequences: sequences, value: value), device: device, receivedAt: testNow)
                }
                // The first device's batches are first, fourth and last; the other device's between them.
                let group = [
                    try member(devices[0], 1...10, value: 6.5), try member(devices[1], 1...10, value: 6.5), try member(devices[1], 5...12, value: 6.5),
                    try member(devices[0], 8...12, value: 6.5), try member(devices[0], 1...3, value: 7.1),
                ]
                return try await PostgresBatchWriter(connection: connection, statementTimeout: nil, logger: testLogger).write(group).map {
                    try $0.get()
                }
            }
            #expect(results.map(\.tally) == [
                Tally(accepted: 10, duplicates: 0, rejected: 0), Tally(accepted: 10, duplicates: 0, rejected: 0),
                Tally(accepted: 2, duplicates: 6, rejected: 0), Tally(accepted: 2, duplicates: 3, rejected: 0),
                Tally(accepted: 0, duplicates: 0, rejected: 3),
            ])
            #expect(results.last?.rejected.allSatisfy { $0.code == RejectionCode.sequenceConflict && $0.message.contains("stored 6.5, sent 7.1") } == true)
            #expect(try await store.highestSequence(device: devices[0]) == 12)
            #expect(try await store.highestSequence(device: devices[1]) == 12)
        }
    }

    @Test("a group waiting for a device another transaction holds gives up after the timeout (lock_timeout, 55P03)")
    func aHeldDeviceLockTimesOut() async throws {
        try await PostgresGroupCommitTests.withStore(concurrency: 1, devices: 1) { store, settings, devices in
            try await PostgresGroupCommitTests.withConnection(settings) { locker in
                try await locker.query("BEGIN", logger: testLogger)
                try await locker.query("SELECT id FROM devices WHERE id = \(devices[0].rowID) FOR UPDATE", logger: testLogger)
                let member = PostgresBatchWriter.Member(
                    batch: try phBatch(device: devices[0].device.rawValue, sequences: 1...3), device: devices[0], receivedAt: testNow)
                let started = ContinuousClock.now
                let error = await #expect(throws: PSQLError.self) {
                    try await store.transaction(settingTimeout: false) { connection in
                        _ = try await PostgresBatchWriter(connection: connection, statementTimeout: 500, logger: testLogger).write([member])
                    }
                }
                #expect(error?.serverInfo?[.sqlState] == "55P03", "lock_not_available")
                #expect(ContinuousClock.now - started < .seconds(15), "bounded by the 500 ms lock_timeout, not by the 30 s deadline")
                try await locker.query("ROLLBACK", logger: testLogger)
            }
            #expect(try await store.store(try phBatch(device: devices[0].device.rawValue, sequences: 1...3), for: devices[0], receivedAt: testNow).accepted == 3)
        }
    }
}
