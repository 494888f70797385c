import FarmgateWire
import Testing

@testable import FarmgateIngest

/// What stateful frames rely on from a store (``WireStateStore``), on SQLite and PostgreSQL alike: declared sensor tables
/// kept per device and found by hash, and each device's newest reading per sensor by (timestamp, sequence).
@Suite struct WireStateStoreConformanceTests {
    static func wireState(_ store: any IngestStore) throws -> any WireStateStore {
        guard let state = store as? any WireStateStore else { throw IngestStoreError.notFound("a wire state store") }
        return state
    }

    /// Real tables of one pH sensor each (`tankN.ph`), the first whose hash has its top bit set (above `Int64.max`, a
    /// negative bigint in the store) and the first whose hash has it clear.
    static func tables() throws -> (high: SensorTable, low: SensorTable) {
        let candidates = try (1...64).map { n in
            try SensorTable([
                SensorDescriptor(id: try sensorID("tank\(n).ph"), quantity: .ph), SensorDescriptor(id: try sensorID("tank\(n).ec"), quantity: .electricalConductivity),
            ])
        }
        let high = try #require(candidates.first { $0.hash > UInt64(Int64.max) })
        let low = try #require(candidates.first { $0.hash <= UInt64(Int64.max) })
        return (high, low)
    }

    /// Two stores on one database, both running: two instances of the ingest (SQLite: two connections pairs on one file).
    static func withTwoStores<T: Sendable>(_ kind: StoreKind, _ body: @Sendable (any IngestStore, any IngestStore) async throws -> T) async throws -> T {
        switch kind {
        case .sqlite:
            let directory = try TemporaryDirectory()
            defer { directory.remove() }
            let first = try SQLiteIngestStore(path: directory.path + "/ingest.sqlite", logger: testLogger)
            return try await withRunning(first) { first in
                try await first.migrate()
                let second = try SQLiteIngestStore(path: directory.path + "/ingest.sqlite", logger: testLogger)
                return try await withRunning(second) { second in try await body(first, second) }
            }
        case .postgres:
            return try await withTestDatabase(migrated: true) { settings in
                let first = try PostgresIngestStore(settings: settings, logger: testLogger)
                return try await withRunning(first) { first in
                    try await first.migrate()
                    let second = try PostgresIngestStore(settings: settings, logger: testLogger)
                    return try await withRunning(second) { second in try await body(first, second) }
                }
            }
        }
    }

    @Test(arguments: StoreKind.allCases)
    func remembersTablesPerDeviceByHash(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let state = try Self.wireState(store)
            let d1 = try await StoreConformanceTests.device(in: store)
            let d2 = try await StoreConformanceTests.device(in: store, name: "d2")
            let (high, low) = try Self.tables()
            #expect(try await state.sensorTable(deviceRowID: d1.rowID, hash: high.hash) == nil)

            try await state.rememberSensorTable(deviceRowID: d1.rowID, hash: high.hash, encoded: high.encoded)
            let found = try #require(try await state.sensorTable(deviceRowID: d1.rowID, hash: high.hash))
            #expect(found == high.encoded)
            #expect(try SensorTable(encoded: found) == high)
            // Remembering it again changes nothing, and a table already held stays as it was first declared.
            try await state.rememberSensorTable(deviceRowID: d1.rowID, hash: high.hash, encoded: high.encoded)
            try await state.rememberSensorTable(deviceRowID: d1.rowID, hash: high.hash, encoded: low.encoded)
            #expect(try await state.sensorTable(deviceRowID: d1.rowID, hash: high.hash) == high.encoded)

            // Another device does not see it; an unknown hash (of a real table, and the signed twin of the stored one) is nil.
            #expect(try await state.sensorTable(deviceRowID: d2.rowID, hash: high.hash) == nil)
            #expect(try await state.sensorTable(deviceRowID: d1.rowID, hash: low.hash) == nil)
            #expect(try await state.sensorTable(deviceRowID: d1.rowID, hash: high.hash & UInt64(Int64.max)) == nil)

            // A device holds several tables (one per configuration), each under its own hash.
            try await state.rememberSensorTable(deviceRowID: d1.rowID, hash: low.hash, encoded: low.encoded)
            try await state.rememberSensorTable(deviceRowID: d2.rowID, hash: high.hash, encoded: high.encoded)
            #expect(try await state.sensorTable(deviceRowID: d1.rowID, hash: low.hash) == low.encoded)
            #expect(try await state.sensorTable(deviceRowID: d1.rowID, hash: high.hash) == high.encoded)
            #expect(try await state.sensorTable(deviceRowID: d2.rowID, hash: high.hash) == high.encoded)
            #expect(try await state.sensorTable(deviceRowID: d2.rowID, hash: low.hash) == nil)

            // A device that does not exist is refused by name.
            await #expect(throws: IngestStoreError.notFound("device #999999")) {
                try await state.rememberSensorTable(deviceRowID: 999_999, hash: low.hash, encoded: low.encoded)
            }
        }
    }

    @Test(arguments: StoreKind.allCases)
    func keepsTheNewestSixteenTablesPerDevice(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let state = try Self.wireState(store)
            let d1 = try await StoreConformanceTests.device(in: store)
            let d2 = try await StoreConformanceTests.device(in: store, name: "d2")
            let tables = try (1...18).map { n in try SensorTable([SensorDescriptor(id: try sensorID("tank\(n).ph"), quantity: .ph)]) }
            try await state.rememberSensorTable(deviceRowID: d2.rowID, hash: tables[0].hash, encoded: tables[0].encoded)
            for table in tables {
                try await state.rememberSensorTable(deviceRowID: d1.rowID, hash: table.hash, encoded: table.encoded)
                try await Task.sleep(for: .milliseconds(2))
            }
            #expect(try await state.sensorTable(deviceRowID: d1.rowID, hash: tables[0].hash) == nil)
            #expect(try await state.sensorTable(deviceRowID: d1.rowID, hash: tables[1].hash) == nil)
            for table in tables[2...] {
                #expect(try await state.sensorTable(deviceRowID: d1.rowID, hash: table.hash) == table.encoded)
            }
            // Another device's tables are not counted against it.
            #expect(try await state.sensorTable(deviceRowID: d2.rowID, hash: tables[0].hash) == tables[0].encoded)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func theCacheInFrontKeepsNoMoreTablesPerDeviceThanTheStoreLeastRecentlyUsedFirst(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let state = try Self.wireState(store)
            let d1 = try await StoreConformanceTests.device(in: store)
            let d2 = try await StoreConformanceTests.device(in: store, name: "d2")
            let cache = WireStateCache(store: state, logger: testLogger)
            let limit = type(of: state).maxSensorTablesPerDevice
            #expect(limit == 16)
            let tables = try (1...41).map { n in try SensorTable([SensorDescriptor(id: try sensorID("tank\(n).ph"), quantity: .ph)]) }
            try await cache.remember(tables[0], device: d2)
            // A device declaring 40 tables, one per frame: memory holds the 16 most recently used.
            for table in tables[..<40] { try await cache.remember(table, device: d1) }
            #expect(cache.tablesInMemory(deviceRowID: d1.rowID) == Set(tables[24..<40].map(\.hash)))
            // Using one keeps it: the next table pushes out the least recently used, not it.
            #expect(try await cache.table(device: d1, hash: tables[24].hash) == tables[24])
            try await cache.remember(tables[40], device: d1)
            #expect(cache.tablesInMemory(deviceRowID: d1.rowID) == Set(([tables[24]] + tables[26...40]).map(\.hash)))
            // One the store dropped too is unknown; another device's table is its own.
            #expect(try await cache.table(device: d1, hash: tables[0].hash) == nil)
            #expect(cache.tablesInMemory(deviceRowID: d1.rowID).count == limit)
            #expect(cache.tablesInMemory(deviceRowID: d2.rowID) == [tables[0].hash])
        }
    }

    @Test(arguments: StoreKind.allCases)
    func concurrentDeclarationsOfOneTableAllSucceedAcrossInstances(kind: StoreKind) async throws {
        try await Self.withTwoStores(kind) { first, second in
            let device = try await StoreConformanceTests.device(in: first)
            let (high, _) = try Self.tables()
            let states = [try Self.wireState(first), try Self.wireState(second)]
            try await withThrowingTaskGroup(of: Void.self) { group in
                for writer in 0..<8 {
                    let state = states[writer % 2]
                    group.addTask { try await state.rememberSensorTable(deviceRowID: device.rowID, hash: high.hash, encoded: high.encoded) }
                }
                try await group.waitForAll()
            }
            // Each instance finds it, whichever inserted it.
            for state in states {
                #expect(try await state.sensorTable(deviceRowID: device.rowID, hash: high.hash) == high.encoded)
            }
        }
    }

    /// Per sensor, the reading with the greatest (timestamp, sequence) of `readings`, as the store's `latest` must hold it.
    static func newest(_ readings: [Reading]) -> [SensorID: Reading] {
        var newest: [SensorID: Reading] = [:]
        for reading in readings {
            if let current = newest[reading.sensor], (current.timestamp, current.sequence) >= (reading.timestamp, reading.sequence) { continue }
            newest[reading.sensor] = reading
        }
        return newest
    }

    @Test(arguments: StoreKind.allCases)
    func contextIsTheNewestStoredReadingPerSensorByTimestampThenSequence(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let state = try Self.wireState(store)
            let device = try await StoreConformanceTests.device(in: store)
            let other = try await StoreConformanceTests.device(in: store, name: "d2")
            #expect(try await state.contextReadings(deviceRowID: device.rowID).isEmpty)

            let ph = SensorDescriptor(id: try sensorID("tank1.ph"), quantity: .ph, resolution: .hundredth)
            let temperature = SensorDescriptor(id: try sensorID("tank1.temp"), quantity: .temperature, resolution: .sixteenth)
            let start = testNow.microseconds - 3_600_000_000
            func reading(_ sensor: SensorDescriptor, _ sequence: UInt64, seconds: Int64, _ value: Double) -> Reading {
                Reading(sensor: sensor.id, sequence: sequence, timestamp: Timestamp(microseconds: start + seconds * 1_000_000), value: value)
            }
            // Values that are not exact in binary: the context must give back the same steps as were sent.
            var firstReadings: [Reading] = []
            for n in 1...10 {
                let step = Double(n)
                let seconds = Int64(10 * n)
                firstReadings.append(reading(ph, UInt64(2 * n - 1), seconds: seconds, 6.01 + step * 0.07))
                firstReadings.append(reading(temperature, UInt64(2 * n), seconds: seconds, 21.0 + step * 0.1875))
            }
            let first = Batch(device: device.device, sensors: [ph, temperature], readings: firstReadings)
            // Stored later: pH readings older than the first batch's newest (they must not replace it), one temperature
            // reading newer, and one at the same time as the newest temperature with a greater sequence (it wins the tie).
            let second = Batch(
                device: device.device, sensors: [ph, temperature],
                readings: [
                    reading(ph, 21, seconds: 50, 5.93), reading(ph, 22, seconds: 99, 5.97),
                    reading(temperature, 23, seconds: 95, 19.4375), reading(temperature, 24, seconds: 100, 22.3125),
                ])
            let third = Batch(device: device.device, sensors: [temperature], readings: [reading(temperature, 25, seconds: 100, 22.5)])
            // Another device's readings of the same sensor ids, newer still: not in this device's context.
            let foreign = Batch(
                device: other.device, sensors: [ph, temperature],
                readings: [reading(ph, 1, seconds: 500, 8.88), reading(temperature, 2, seconds: 500, 30.0)])
            for (batch, identity) in [(first, device), (second, device), (third, device), (foreign, other)] {
                let outcome = try await store.store(batch, for: identity, receivedAt: testNow)
                #expect(outcome.tally == Tally(accepted: batch.readings.count, duplicates: 0, rejected: 0))
            }
            // Sent again (a lost acknowledgement): duplicates change nothing.
            _ = try await store.store(second, for: device, receivedAt: testNow)

            let context = try await state.contextReadings(deviceRowID: device.rowID)
            let expected = Self.newest(first.readings + second.readings + third.readings)
            #expect(Set(context.keys) == [ph.id, temperature.id])
            #expect(expected[ph.id]?.sequence == 19)
            #expect(expected[temperature.id]?.sequence == 25)
            for descriptor in [ph, temperature] {
                let sent = try #require(expected[descriptor.id])
                let held = try #require(context[descriptor.id])
                #expect(held.sequence == sent.sequence)
                #expect(held.timestamp == sent.timestamp)
                #expect(descriptor.resolution.quantize(held.value) == descriptor.resolution.quantize(sent.value))
            }

            let foreignContext = try await state.contextReadings(deviceRowID: other.rowID)
            #expect(foreignContext[ph.id]?.sequence == 1)
            #expect(foreignContext[temperature.id]?.value == 30.0)
        }
    }
}
