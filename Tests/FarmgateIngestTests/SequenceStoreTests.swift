import FarmgateSupport
import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

@Suite("Store: sequence conflicts, highest sequence, key rotation")
struct SequenceStoreTests {
    /// One pH reading of `tank1.ph` (or `sensor`, declared with `quantity`) at `sequence`.
    static func batch(
        _ sequence: UInt64, value: Double, at microseconds: Int64? = nil, flags: QualityFlags = [], sensor: String = "tank1.ph",
        quantity: Quantity = .ph
    ) throws -> Batch {
        let id = try sensorID(sensor)
        let time = Timestamp(microseconds: microseconds ?? testNow.microseconds - 3_600_000_000)
        return Batch(
            device: try deviceID("d1"), sensors: [SensorDescriptor(id: id, quantity: quantity)],
            readings: [Reading(sensor: id, sequence: sequence, timestamp: time, value: value, quality: flags)])
    }

    @Test("a re-sent sequence with another value is a sequence_conflict naming the values, not a duplicate; nothing is overwritten")
    func conflictingValue() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        #expect(try await fixture.store.store(try Self.batch(1, value: 6.02), for: device, receivedAt: testNow).accepted == 1)
        let second = try await fixture.store.store(try Self.batch(1, value: 7.31), for: device, receivedAt: testNow)
        #expect(second.accepted == 0)
        #expect(second.duplicates == 0)
        #expect(second.rejected.count == 1)
        let rejection = try #require(second.rejected.first)
        #expect(rejection.code == RejectionCode.sequenceConflict)
        #expect(rejection.sequence == 1)
        #expect(rejection.message.contains("value (stored 6.02, sent 7.31)"))
        #expect(!rejection.message.contains("timestamp"))
        let stored = try await fixture.store.exportPage(device: device, afterSequence: nil, limit: 10)
        #expect(stored.map(\.value) == [6.02])
    }

    @Test("values equal in whole steps of the resolution are duplicates, whatever their last bits")
    func equalAtResolution() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        _ = try await fixture.store.store(try Self.batch(1, value: 6.02), for: device, receivedAt: testNow)
        // 6.0200000001 and 6.019 are both 602 hundredths.
        for value in [6.02, 6.0200000001, 6.019] {
            let again = try await fixture.store.store(try Self.batch(1, value: value), for: device, receivedAt: testNow)
            #expect(again.tally == Tally(accepted: 0, duplicates: 1, rejected: 0), "value \(value)")
        }
        let other = try await fixture.store.store(try Self.batch(1, value: 6.03), for: device, receivedAt: testNow)
        #expect(other.rejected.map(\.code) == [RejectionCode.sequenceConflict])
    }

    @Test("a different timestamp, sensor or flags is a conflict that names each difference")
    func conflictingFields() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        let time = testNow.microseconds - 3_600_000_000
        _ = try await fixture.store.store(try Self.batch(1, value: 6.5, at: time), for: device, receivedAt: testNow)

        let later = try await fixture.store.store(try Self.batch(1, value: 6.5, at: time + 1), for: device, receivedAt: testNow)
        #expect(later.rejected.first?.message.contains("timestamp (stored") == true)
        let flagged = try await fixture.store.store(try Self.batch(1, value: 6.5, at: time, flags: .clockUnsynchronized), for: device, receivedAt: testNow)
        #expect(flagged.rejected.first?.message.contains("flags (stored none, sent clock_unsynchronized)") == true)
        let otherSensor = try await fixture.store.store(try Self.batch(1, value: 6.5, at: time, sensor: "tank2.ph"), for: device, receivedAt: testNow)
        #expect(otherSensor.rejected.first?.message.contains("sensor (stored 'tank1.ph', sent 'tank2.ph')") == true)
        let everything = try await fixture.store.store(
            try Self.batch(1, value: 20, at: time + 5, flags: .heartbeat, sensor: "tank1.temp", quantity: .temperature), for: device,
            receivedAt: testNow)
        let message = try #require(everything.rejected.first?.message)
        for field in ["sensor (", "timestamp (", "value (", "flags ("] { #expect(message.contains(field), "\(field) in \(message)") }
        for outcome in [later, flagged, otherSensor, everything] {
            #expect(outcome.duplicates == 0 && outcome.accepted == 0 && outcome.rejected.map(\.code) == [RejectionCode.sequenceConflict])
        }
    }

    @Test("a large batch re-sent mixes duplicates and conflicts correctly (the comparison runs in chunks)")
    func chunkedComparison() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        let original = try phBatch(sequences: 1...1_000, value: 6.5)
        #expect(try await fixture.store.store(original, for: device, receivedAt: testNow).accepted == 1_000)
        var resent = original
        let changed: Set<UInt64> = [1, 249, 250, 251, 500, 999, 1_000]
        for index in resent.readings.indices where changed.contains(resent.readings[index].sequence) {
            resent.readings[index].value = 7.0
        }
        // Plus new readings and the same sequence twice in one batch with different content.
        let extra = try phBatch(sequences: 1_001...1_010, value: 6.5)
        resent.readings += extra.readings
        var twin = extra.readings[0]
        twin.value = 8
        resent.readings.append(twin)
        let outcome = try await fixture.store.store(resent, for: device, receivedAt: testNow)
        #expect(outcome.accepted == 10)
        #expect(outcome.duplicates == 1_000 - changed.count)
        #expect(Set(outcome.rejected.compactMap(\.sequence)) == changed.union([1_001]))
        #expect(outcome.rejected.allSatisfy { $0.code == RejectionCode.sequenceConflict })
    }

    @Test("sequences below the highest stored one that are not stored (gaps) are stored, also twice in one batch")
    func gapsBelowHighest() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        _ = try await fixture.store.store(try phBatch(sequences: [1, 2, 3, 50, 100, 200]), for: device, receivedAt: testNow)
        var batch = try phBatch(sequences: [2, 4, 40, 50, 60, 99, 150, 201], value: 6.5)
        var twin = try #require(batch.readings.first { $0.sequence == 60 })
        batch.readings.append(twin)  // the same gap sequence twice, same content: stored once, then a duplicate
        twin.sequence = 99
        twin.value = 9
        batch.readings.append(twin)  // the same gap sequence twice, other content: stored once, then a conflict
        let outcome = try await fixture.store.store(batch, for: device, receivedAt: testNow)
        #expect(outcome.accepted == 6)
        #expect(outcome.duplicates == 3)
        #expect(outcome.rejected.map(\.sequence) == [99])
        #expect(outcome.rejected.map(\.code) == [RejectionCode.sequenceConflict])
        let stored = try await fixture.store.exportPage(device: device, afterSequence: nil, limit: 100).map(\.sequence)
        #expect(stored == [1, 2, 3, 4, 40, 50, 60, 99, 100, 150, 200, 201])
        #expect(try await fixture.store.highestSequence(device: device) == 201)
        // The newest reading of the sensor is still the latest one by time.
        #expect(try await fixture.store.latestReadings(farmID: device.farmID).map(\.sequence) == [201])
    }

    @Test("the highest stored sequence is kept per device, never lowered by conflicts, duplicates or deleted readings")
    func highestSequence() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let d1 = try await fixture.identity(device: "d1")
        let d2 = try await fixture.identity(device: "d2")
        #expect(try await fixture.store.highestSequence(device: d1) == nil)
        _ = try await fixture.store.store(try phBatch(sequences: [5, 90, 7]), for: d1, receivedAt: testNow)
        #expect(try await fixture.store.highestSequence(device: d1) == 90)
        _ = try await fixture.store.store(try phBatch(sequences: 1...10), for: d1, receivedAt: testNow)
        #expect(try await fixture.store.highestSequence(device: d1) == 90)
        // A conflict on a stored sequence changes nothing.
        _ = try await fixture.store.store(try phBatch(sequences: [90], value: 7), for: d1, receivedAt: testNow)
        #expect(try await fixture.store.highestSequence(device: d1) == 90)
        #expect(try await fixture.store.highestSequence(device: d2) == nil)

        // Retention (or anything else) deleting readings does not lower it.
        let connection = try SQLiteConnection(path: fixture.store.path, mode: .readWrite, busyTimeoutMilliseconds: 5_000)
        try connection.execute("DELETE FROM readings")
        #expect(try await fixture.store.highestSequence(device: d1) == 90)
        _ = try await fixture.store.store(try phBatch(sequences: [91]), for: d1, receivedAt: testNow)
        #expect(try await fixture.store.highestSequence(device: d1) == 91)
    }

    @Test("migration 2 fills the highest sequence of devices that already have readings")
    func migrationBackfill() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/ingest.sqlite"
        // A store at schema version 1 with readings, as an older farmgate-ingest left it.
        let connection = try SQLiteConnection(path: path, mode: .readWriteCreate, busyTimeoutMilliseconds: 5_000)
        try connection.execute(SQLiteSchema.bookkeeping)
        try connection.execute(SQLiteSchema.migrations[0].sql)
        try connection.execute("INSERT INTO schema_migrations VALUES (1, 'v1', 0)")
        try connection.execute("INSERT INTO farms VALUES (1, 'f1', 0)")
        try connection.execute("INSERT INTO devices(id, farm_id, name, key_id, secret_sha256, created_at_us) VALUES (1, 1, 'd1', 'k1', x'00', 0), (2, 1, 'd2', 'k2', x'00', 0)")
        try connection.execute("INSERT INTO sensors VALUES (1, 1, 'tank1.ph', 'ph', 1, 100, 0)")
        try connection.execute("INSERT INTO readings VALUES (1, 41, 1, 0, 6.5, 0, 0), (1, 7, 1, 0, 6.5, 0, 0)")

        let store = try SQLiteIngestStore(path: path, logger: testLogger)
        defer { store.close() }
        #expect(try await store.migrate().map(\.version) == SQLiteSchema.migrations.dropFirst().map(\.version))
        let d1 = DeviceIdentity(farmID: 1, farm: "f1", rowID: 1, device: try deviceID("d1"))
        let d2 = DeviceIdentity(farmID: 1, farm: "f1", rowID: 2, device: try deviceID("d2"))
        #expect(try await store.highestSequence(device: d1) == 41)
        #expect(try await store.highestSequence(device: d2) == nil)
    }

    @Test("rotating a key replaces it in the store and lifts a revocation; unknown devices and farms are refused")
    func rotateKey() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let admin = IngestAdmin(store: fixture.store)
        let d1 = try deviceID("d1")
        try await admin.revokeDevice(farm: "f1", device: d1)
        #expect(try await fixture.store.deviceCredential(keyID: fixture.deviceKey.keyID)?.revoked == true)

        let key = try await admin.rotateDeviceKey(farm: "f1", device: d1)
        #expect(key.kind == .device)
        #expect(key.keyID != fixture.deviceKey.keyID)
        #expect(try await fixture.store.deviceCredential(keyID: fixture.deviceKey.keyID) == nil)
        let credential = try #require(try await fixture.store.deviceCredential(keyID: key.keyID))
        #expect(!credential.revoked)
        #expect(credential.identity == (try await fixture.identity(device: "d1")))
        #expect(credential.secretHash == key.secretHash)
        // The other devices keep their keys.
        #expect(try await fixture.store.deviceCredential(keyID: fixture.secondDeviceKey.keyID) != nil)

        await #expect(throws: IngestStoreError.notFound("device 'nope' in farm 'f1'")) {
            try await admin.rotateDeviceKey(farm: "f1", device: try deviceID("nope"))
        }
        await #expect(throws: IngestStoreError.notFound("farm 'f9'")) {
            try await admin.rotateDeviceKey(farm: "f9", device: d1)
        }
        await #expect(throws: IngestStoreError.alreadyExists("API key id '\(fixture.secondDeviceKey.keyID)'")) {
            try await fixture.store.rotateDeviceKey(
                farm: "f1", device: d1, keyID: fixture.secondDeviceKey.keyID, secretHash: [1], rotatedAt: testNow)
        }
    }
}
