import FarmgateWire
import Testing

@testable import FarmgateIngest

/// What the ingest relies on from a store, checked on SQLite and PostgreSQL alike.
@Suite struct StoreConformanceTests {
    /// A farm `f1` with device `d1`, returning the device's identity.
    static func device(in store: any IngestStore, name: String = "d1") async throws -> DeviceIdentity {
        if try await store.farm(named: "f1") == nil { _ = try await store.createFarm(name: "f1", createdAt: testNow) }
        return try await store.createDevice(
            farm: "f1", device: try deviceID(name), keyID: "k" + name, secretHash: Array(repeating: 7, count: 32), createdAt: testNow)
    }

    @Test(arguments: StoreKind.allCases)
    func storesEachSequenceOnceAndCountsDuplicates(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await Self.device(in: store)
            let first = try await store.store(try phBatch(sequences: 1...100), for: device, receivedAt: testNow)
            #expect(first.tally == Tally(accepted: 100, duplicates: 0, rejected: 0))
            // Re-cut differently: half old, half new, one sequence twice in the batch.
            let again = try await store.store(try phBatch(sequences: Array(51...150) + [150]), for: device, receivedAt: testNow)
            #expect(again.accepted == 50)
            #expect(again.duplicates == 51)
            #expect(again.rejected.isEmpty)
            #expect(try await store.highestSequence(device: device) == 150)
            var exported: [UInt64] = []
            var after: UInt64?
            while true {
                let page = try await store.exportPage(device: device, afterSequence: after, limit: 40)
                guard let last = page.last else { break }
                exported += page.map(\.sequence)
                after = last.sequence
            }
            #expect(exported == Array(1...150))
        }
    }

    @Test(arguments: StoreKind.allCases)
    func returnsExactlyTheReadingsItStoredForTheFirstTime(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await Self.device(in: store)
            let first = try await store.store(try phBatch(sequences: 1...5, value: 6.25), for: device, receivedAt: testNow)
            #expect(first.fresh.map(\.sequence) == [1, 2, 3, 4, 5])
            #expect(first.fresh.allSatisfy { $0.value == 6.25 && $0.quantity == .ph && $0.sensor.rawValue == "tank1.ph" })
            #expect(Set(first.fresh.map(\.sensorRowID)).count == 1)
            // Duplicates, a conflict and two new ones: only the new ones come back.
            let mixed = try await store.store(try phBatch(sequences: 4...7, value: 6.25), for: device, receivedAt: testNow)
            #expect(mixed.fresh.map(\.sequence) == [6, 7])
            let conflicting = try await store.store(try phBatch(sequences: 7...8, value: 7.5), for: device, receivedAt: testNow)
            #expect(conflicting.rejected.map(\.sequence) == [7])
            #expect(conflicting.fresh.map(\.sequence) == [8])
            #expect(conflicting.fresh.first?.sensorRowID == first.fresh.first?.sensorRowID)
        }
    }

    @Test(
        "a reading re-sent after the site changed its sensor's resolution is a duplicate, also at a tie (1.005 → 1.01) and after two changes (1.045 → 1.05 → 1.1)",
        arguments: StoreKind.allCases)
    func resentAfterAResolutionChangeIsADuplicate(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await Self.device(in: store)
            let id = try sensorID("tank1.ph")
            let time = Timestamp(microseconds: testNow.microseconds - 3_600_000_000)
            // Stored at 0.001; the site's answer was lost, then tank1.ph went to 0.01 and the buffer converted its pending
            // readings, rounding half away from zero (SQLite's round over whole steps), before sending them again.
            let stored: [Double] = [1.005, 1.015, 0.145, 6.123, 6.125, 7.0, 1.045]
            let converted: [Double] = [1.01, 1.02, 0.15, 6.12, 6.13, 7.0, 1.05]
            func batch(_ values: [Double], _ resolution: Resolution) -> Batch {
                Batch(
                    device: device.device, sensors: [SensorDescriptor(id: id, quantity: .ph, resolution: resolution)],
                    readings: values.enumerated().map { index, value in
                        Reading(sensor: id, sequence: UInt64(index + 1), timestamp: Timestamp(microseconds: time.microseconds + Int64(index) * 1_000_000), value: value)
                    })
            }
            let thousandths = try Resolution(numerator: 1, denominator: 1000)
            let hundredths = try Resolution(numerator: 1, denominator: 100)
            #expect(try await store.store(batch(stored, thousandths), for: device, receivedAt: testNow).accepted == stored.count)
            let again = try await store.store(batch(converted, hundredths), for: device, receivedAt: testNow)
            #expect(again.tally == Tally(accepted: 0, duplicates: stored.count, rejected: 0), "\(again.rejected.map(\.message))")
            // A value a whole step away is still another reading.
            let other = try await store.store(batch([1.02], hundredths), for: device, receivedAt: testNow)
            #expect(other.rejected.map(\.code) == [RejectionCode.sequenceConflict])
            // Converted a second time (0.01 → 0.1) before they went again: 0.145 → 0.15 → 0.2, 1.045 → 1.05 → 1.1, while
            // the stored values round to 0.1 and 1.0 at 0.1.
            let tenths = try Resolution(numerator: 1, denominator: 10)
            let twice: [Double] = [1.0, 1.0, 0.2, 6.1, 6.1, 7.0, 1.1]
            let againTwice = try await store.store(batch(twice, tenths), for: device, receivedAt: testNow)
            #expect(againTwice.tally == Tally(accepted: 0, duplicates: twice.count, rejected: 0), "\(againTwice.rejected.map(\.message))")
            // 7.0 was stored on a step of 0.1, so the resolution cannot explain 7.1: another reading.
            let onStep = try await store.store(batch([1.0, 1.0, 0.2, 6.1, 6.1, 7.1], tenths), for: device, receivedAt: testNow)
            #expect(onStep.duplicates == 5)
            #expect(onStep.rejected.map(\.sequence) == [6])
        }
    }

    @Test(arguments: StoreKind.allCases)
    func differentContentIsASequenceConflictNeverADuplicate(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await Self.device(in: store)
            _ = try await store.store(try phBatch(sequences: 1...10, value: 6.5), for: device, receivedAt: testNow)
            // The same value in another binary form (6.5 + a rounding error below the resolution) is a duplicate.
            let same = try await store.store(try phBatch(sequences: 1...2, value: 6.5000000001), for: device, receivedAt: testNow)
            #expect(same.tally == Tally(accepted: 0, duplicates: 2, rejected: 0))
            let other = try await store.store(try phBatch(sequences: 5...12, value: 7.1), for: device, receivedAt: testNow)
            #expect(other.accepted == 2)
            #expect(other.duplicates == 0)
            #expect(other.rejected.map(\.sequence) == [5, 6, 7, 8, 9, 10])
            #expect(other.rejected.allSatisfy { $0.code == RejectionCode.sequenceConflict && $0.message.contains("value (stored 6.5, sent 7.1)") })
            let rows = try await store.exportPage(device: device, afterSequence: 4, limit: 2)
            #expect(rows.map(\.value) == [6.5, 6.5])
            #expect(other.rejected.allSatisfy { $0.message.contains("is already stored for this device") }, "\(other.rejected)")
            // A new sequence twice in one batch with different content: the second is refused, and the message does
            // not call the first "already stored" as if an earlier upload had it (a tester, 2026-12-07).
            var twice = try phBatch(sequences: 20...20, value: 6.0)
            var twin = twice.readings[0]
            twin.value = 6.8
            twice.readings.append(twin)
            let repeated = try await store.store(twice, for: device, receivedAt: testNow)
            #expect(repeated.accepted == 1 && repeated.rejected.map(\.sequence) == [20], "\(repeated)")
            #expect(repeated.rejected.first?.message.contains("earlier in this batch") == true, "\(repeated.rejected)")
        }
    }

    @Test(arguments: StoreKind.allCases)
    func sensorRegisteredWithAnotherQuantityIsRejected(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await Self.device(in: store)
            _ = try await store.store(try phBatch(sequences: 1...3), for: device, receivedAt: testNow)
            let sensor = try sensorID("tank1.ph")
            let batch = Batch(
                device: try deviceID("d1"), sensors: [SensorDescriptor(id: sensor, quantity: .temperature)],
                readings: [Reading(sensor: sensor, sequence: 4, timestamp: testNow, value: 20)])
            let outcome = try await store.store(batch, for: device, receivedAt: testNow)
            #expect(outcome.accepted == 0)
            #expect(outcome.rejected.map(\.code) == [RejectionCode.sensorConflict])
            let undeclared = Batch(
                device: try deviceID("d1"), sensors: [], readings: [Reading(sensor: sensor, sequence: 5, timestamp: testNow, value: 6)])
            #expect(try await store.store(undeclared, for: device, receivedAt: testNow).rejected.map(\.code) == [RejectionCode.unknownSensor])
            #expect(try await store.highestSequence(device: device) == 3)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func concurrentWritersRegisterOneSensorOnce(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await Self.device(in: store)
            try await withThrowingTaskGroup(of: StoreOutcome.self) { group in
                for part in 0..<8 {
                    let start = UInt64(part * 50 + 1)
                    let batch = try phBatch(sequences: start...(start + 49))
                    group.addTask { try await store.store(batch, for: device, receivedAt: testNow) }
                }
                var accepted = 0
                for try await outcome in group { accepted += outcome.accepted }
                #expect(accepted == 400)
            }
            let farm = try #require(try await store.farm(named: "f1"))
            let record = try #require(try await store.sensor(farmID: farm.id, device: device.device, sensor: try sensorID("tank1.ph")))
            #expect(record.quantity == .ph)
            #expect(try await store.highestSequence(device: device) == 400)
        }
    }

    /// A batch of one reading per sensor named, sequences from `first` on, in the order given.
    static func sensorsBatch(_ names: [String], first: UInt64, device: String = "d1") throws -> Batch {
        let sensors = try names.map { SensorDescriptor(id: try sensorID($0), quantity: .temperature) }
        let readings = sensors.enumerated().map { index, sensor in
            Reading(sensor: sensor.id, sequence: first + UInt64(index), timestamp: Timestamp(microseconds: testNow.microseconds - Int64(index) * 1_000_000), value: 21)
        }
        return Batch(device: try deviceID(device), sensors: sensors, readings: readings)
    }

    @Test("[limits] sensors_per_device: a new sensor past the limit is refused reading by reading, the registered ones go on", arguments: StoreKind.allCases)
    func sensorsPastTheLimitAreRefused(kind: StoreKind) async throws {
        try await withFreshStore(kind, sensorsPerDevice: 3) { store in
            let device = try await Self.device(in: store)
            let first = try await store.store(try Self.sensorsBatch(["a", "b"], first: 1), for: device, receivedAt: testNow)
            #expect(first.tally == Tally(accepted: 2, duplicates: 0, rejected: 0))
            // One registered sensor and three new ones: room for one.
            let batch = try Self.sensorsBatch(["a", "c", "d", "e"], first: 3)
            let second = try await store.store(batch, for: device, receivedAt: testNow)
            #expect(second.accepted == 2)
            #expect(second.rejected.map(\.sequence) == [5, 6])
            #expect(second.rejected.map(\.sensor) == ["d", "e"])
            #expect(second.rejected.allSatisfy { $0.code == RejectionCode.tooManySensors && $0.message.contains("already has 3 sensors") })
            // Sent again: what was stored is a duplicate, the rest is still refused; nothing was registered for them.
            let again = try await store.store(batch, for: device, receivedAt: testNow)
            #expect(again.tally == Tally(accepted: 0, duplicates: 2, rejected: 2))
            let farm = try #require(try await store.farm(named: "f1"))
            #expect(try await store.sensor(farmID: farm.id, device: device.device, sensor: try sensorID("c")) != nil)
            #expect(try await store.sensor(farmID: farm.id, device: device.device, sensor: try sensorID("d")) == nil)
            // The registered sensors go on, and the limit is per device.
            let later = try await store.store(try Self.sensorsBatch(["c", "b", "a"], first: 7), for: device, receivedAt: testNow)
            #expect(later.tally == Tally(accepted: 3, duplicates: 0, rejected: 0))
            let other = try await Self.device(in: store, name: "d2")
            let fresh = try await store.store(try Self.sensorsBatch(["x", "y", "z"], first: 1, device: "d2"), for: other, receivedAt: testNow)
            #expect(fresh.tally == Tally(accepted: 3, duplicates: 0, rejected: 0))
            #expect(try await store.exportPage(device: device, afterSequence: nil, limit: 100).map(\.sequence) == [1, 2, 3, 4, 7, 8, 9])
            // Which new sensors get the room: the first the batch declares, on both stores (a tester, 2026-12-07:
            // PostgreSQL took them in name order, s1, s10, s100, and SQLite s9, s10, s2).
            let third = try await Self.device(in: store, name: "d3")
            let ordered = try await store.store(try Self.sensorsBatch(["s9", "s10", "s2", "s1", "s100"], first: 1, device: "d3"), for: third, receivedAt: testNow)
            #expect(ordered.rejected.map(\.sensor) == ["s1", "s100"], "\(ordered.rejected)")
            #expect(try await store.exportPage(device: third, afterSequence: nil, limit: 100).map(\.sequence) == [1, 2, 3])
        }
    }

    @Test("[limits] sensors_per_device holds for batches of one device written at once", arguments: StoreKind.allCases)
    func sensorLimitHoldsForConcurrentBatches(kind: StoreKind) async throws {
        try await withFreshStore(kind, sensorsPerDevice: 5) { store in
            let device = try await Self.device(in: store)
            let outcomes = try await withThrowingTaskGroup(of: StoreOutcome.self) { group in
                for part in 0..<12 {
                    let batch = try Self.sensorsBatch(["s\(part)"], first: UInt64(part + 1))
                    group.addTask { try await store.store(batch, for: device, receivedAt: testNow) }
                }
                return try await group.reduce(into: [StoreOutcome]()) { $0.append($1) }
            }
            #expect(outcomes.map(\.accepted).reduce(0, +) == 5)
            #expect(outcomes.flatMap(\.rejected).map(\.code) == Array(repeating: RejectionCode.tooManySensors, count: 7))
            let farm = try #require(try await store.farm(named: "f1"))
            var registered = 0
            for part in 0..<12 where try await store.sensor(farmID: farm.id, device: device.device, sensor: try sensorID("s\(part)")) != nil {
                registered += 1
            }
            #expect(registered == 5)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func queriesReturnLatestAndRanges(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await Self.device(in: store)
            let other = try await Self.device(in: store, name: "c0")
            _ = try await store.store(try phBatch(sequences: 1...20), for: device, receivedAt: testNow)
            _ = try await store.store(try phBatch(device: "c0", sequences: 1...5, value: 5.5), for: other, receivedAt: testNow)
            let farm = try #require(try await store.farm(named: "f1"))
            let latest = try await store.latestReadings(farmID: farm.id)
            #expect(latest.map(\.device.rawValue) == ["c0", "d1"])
            #expect(latest.map(\.sequence) == [5, 20])
            let sensor = try #require(try await store.sensor(farmID: farm.id, device: device.device, sensor: try sensorID("tank1.ph")))
            let start = testNow.microseconds - 3_600_000_000
            let range = try await store.readings(
                sensorRowID: sensor.rowID, from: Timestamp(microseconds: start + 5_000_000), to: Timestamp(microseconds: start + 10_000_000), limit: 3)
            #expect(range.map(\.sequence) == [5, 6, 7])
            #expect(try await store.sensor(farmID: farm.id, device: device.device, sensor: try sensorID("tank9.ph")) == nil)
            #expect(try await store.devices(farmID: farm.id).map(\.device.rawValue) == ["c0", "d1"])
        }
    }

    @Test(arguments: StoreKind.allCases)
    func credentialsAdministrationAndKeyRotation(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await Self.device(in: store)
            await #expect(throws: IngestStoreError.alreadyExists("farm 'f1'")) { _ = try await store.createFarm(name: "f1", createdAt: testNow) }
            await #expect(throws: IngestStoreError.self) { _ = try await Self.device(in: store) }
            await #expect(throws: IngestStoreError.notFound("farm 'nope'")) {
                _ = try await store.createDevice(farm: "nope", device: try deviceID("x"), keyID: "kx", secretHash: [1], createdAt: testNow)
            }
            let credential = try #require(try await store.deviceCredential(keyID: "kd1"))
            #expect(credential.identity == device)
            #expect(!credential.revoked)
            #expect(try await store.revokeDevice(farm: "f1", device: device.device, revokedAt: testNow))
            #expect(try await store.deviceCredential(keyID: "kd1")?.revoked == true)
            #expect(try await store.revokeDevice(farm: "f1", device: device.device, revokedAt: testNow) == false, "revoked already")
            try await store.rotateDeviceKey(farm: "f1", device: device.device, keyID: "kd1-new", secretHash: [9, 9], rotatedAt: testNow)
            #expect(try await store.deviceCredential(keyID: "kd1") == nil)
            let rotated = try #require(try await store.deviceCredential(keyID: "kd1-new"))
            #expect(rotated.secretHash == [9, 9])
            #expect(!rotated.revoked)
            await #expect(throws: IngestStoreError.notFound("device 'zz' in farm 'f1'")) {
                try await store.revokeDevice(farm: "f1", device: try deviceID("zz"), revokedAt: testNow)
            }
            try await store.createReadToken(farm: "f1", role: .viewer, keyID: "r1", secretHash: [3], createdAt: testNow)
            await #expect(throws: IngestStoreError.alreadyExists("token id 'r1'")) {
                try await store.createReadToken(farm: "f1", role: .viewer, keyID: "r1", secretHash: [3], createdAt: testNow)
            }
            let token = try #require(try await store.readTokenCredential(keyID: "r1"))
            #expect(token.farm.name == "f1")
            #expect(token.role == .viewer)
            #expect(try await store.readTokenCredential(keyID: "r2") == nil)
            // Listing (newest first, by farm) and revocation, which the authenticator then sees.
            _ = try await store.createFarm(name: "f0", createdAt: testNow)
            try await store.createReadToken(
                farm: "f0", role: .admin, keyID: "r0", secretHash: [4], createdAt: Timestamp(microseconds: testNow.microseconds + 1))
            #expect(try await store.farms().map(\.name) == ["f0", "f1"])
            #expect(try await store.readTokens(farm: nil).map(\.keyID) == ["r0", "r1"])
            #expect(
                try await store.readTokens(farm: "f1") == [ReadTokenRecord(keyID: "r1", farm: "f1", role: .viewer, createdAt: testNow, revoked: false)])
            #expect(try await store.readTokens(farm: "nope").isEmpty)
            #expect(try await store.revokeReadToken(keyID: "r1"))
            #expect(try await store.readTokenCredential(keyID: "r1")?.revoked == true)
            #expect(try await store.revokeReadToken(keyID: "r1") == false, "revoked already")
            #expect(try await store.readTokens(farm: "f1").map(\.revoked) == [true])
            #expect(try await store.readTokenCredential(keyID: "r0")?.revoked == false, "only that token")
            await #expect(throws: IngestStoreError.notFound("read token 'r9'")) { _ = try await store.revokeReadToken(keyID: "r9") }
            try await store.ping()
            #expect(try await store.migrate().isEmpty)
        }
    }
}
