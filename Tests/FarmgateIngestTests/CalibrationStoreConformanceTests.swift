import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import Prometheus
import Testing

@testable import FarmgateIngest

/// What the ingest relies on from a calibration store, on SQLite and PostgreSQL alike: once per (device, event id), read
/// back per sensor newest first, and format version 3 advertised by an ingest on either store.
@Suite struct CalibrationStoreConformanceTests {
    static func event(_ id: String, sensor: String = "tank1.ph", minutesAgo: Int64 = 1) throws -> CalibrationEvent {
        CalibrationEvent(
            id: id, sensor: try sensorID(sensor), time: Timestamp(microseconds: testNow.microseconds - minutesAgo * 60_000_000), circuit: "pH",
            firmware: "2.16",
            points: [
                .init(name: "mid", reference: 7, at: Timestamp(microseconds: testNow.microseconds - 600_000_000), reading: 7.01),
                .init(name: "low", reference: 4, at: Timestamp(microseconds: testNow.microseconds - 300_000_000), reading: nil),
            ],
            calibratedPoints: 2, slope: .init(acidPercent: 99.7, basePercent: 100.3, offsetMillivolts: -0.89))
    }

    static func calibrations(_ store: any IngestStore) throws -> any CalibrationStore {
        guard let calibrations = store as? any CalibrationStore else { throw IngestStoreError.notFound("a calibration store") }
        return calibrations
    }

    @Test(arguments: StoreKind.allCases)
    func storesEachEventOncePerDeviceAndCountsDuplicates(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let calibrations = try Self.calibrations(store)
            let d1 = try await StoreConformanceTests.device(in: store)
            let d2 = try await StoreConformanceTests.device(in: store, name: "d2")
            let first = try await calibrations.storeCalibrations([try Self.event("ev-1"), try Self.event("ev-2")], for: d1, receivedAt: testNow)
            #expect(first == CalibrationReceipt(accepted: 2, duplicates: 0))
            // Re-sent after a lost acknowledgement, with a new one, and one id twice in the batch.
            let again = try await calibrations.storeCalibrations(
                [try Self.event("ev-2"), try Self.event("ev-3"), try Self.event("ev-3")], for: d1, receivedAt: testNow)
            #expect(again == CalibrationReceipt(accepted: 1, duplicates: 2))
            // Another device may use the same id: ids are unique per device only.
            let other = try await calibrations.storeCalibrations([try Self.event("ev-1")], for: d2, receivedAt: testNow)
            #expect(other == CalibrationReceipt(accepted: 1, duplicates: 0))
            #expect(try await calibrations.storeCalibrations([], for: d1, receivedAt: testNow) == CalibrationReceipt(accepted: 0, duplicates: 0))
            #expect(try await calibrations.calibrations(deviceRowID: d1.rowID, sensor: try sensorID("tank1.ph"), limit: 100).count == 3)
            #expect(try await calibrations.calibrations(deviceRowID: d2.rowID, sensor: try sensorID("tank1.ph"), limit: 100).map(\.id) == ["ev-1"])
        }
    }

    @Test(arguments: StoreKind.allCases)
    func readsOneSensorsEventsNewestFirstAsTheyWereSent(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let calibrations = try Self.calibrations(store)
            let device = try await StoreConformanceTests.device(in: store)
            let old = try Self.event("old", minutesAgo: 60)
            let new = try Self.event("new", minutesAgo: 2)
            var bare = try Self.event("bare", minutesAgo: 30)
            (bare.firmware, bare.slope, bare.calibratedPoints) = (nil, nil, nil)
            let elsewhere = try Self.event("ec", sensor: "tank1.ec", minutesAgo: 1)
            _ = try await calibrations.storeCalibrations([old, new, bare, elsewhere], for: device, receivedAt: testNow)
            let ph = try sensorID("tank1.ph")
            #expect(try await calibrations.calibrations(deviceRowID: device.rowID, sensor: ph, limit: 100) == [new, bare, old])
            #expect(try await calibrations.calibrations(deviceRowID: device.rowID, sensor: ph, limit: 1) == [new])
            #expect(try await calibrations.calibrations(deviceRowID: device.rowID, sensor: try sensorID("tank1.ec"), limit: 100) == [elsewhere])
            #expect(try await calibrations.calibrations(deviceRowID: device.rowID, sensor: try sensorID("tank9.ph"), limit: 100).isEmpty)
        }
    }

    @Test(arguments: StoreKind.allCases)
    func anIngestOnEitherStoreReadsVersion3AndTheJSONCalibrationsMember(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let admin = IngestAdmin(store: store)
            _ = try await admin.createFarm(name: "f1")
            let key = try await admin.createDevice(farm: "f1", device: try deviceID("d1"))
            var configuration = IngestConfiguration()
            configuration.server.port = 0
            let app = buildApplication(
                configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: testLogger, now: { testNow },
                credentialCacheTTL: .zero)
            try await app.test(.router) { client in
                let state = try decode(DeviceState.self, try await client.execute(uri: IngestProtocol.deviceStatePath, method: .get, headers: bearer(key)))
                #expect(state.acceptedVersions == [2, 3, 4])
                let frame = try BatchCodec.encode(try phBatch(sequences: 1...3), calibrations: [try Self.event("bin-1")])
                let binary = try decode(
                    IngestReceipt.self,
                    try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(key), body: buffer(frame)))
                #expect(binary.accepted == 3)
                #expect(binary.calibrations == CalibrationReceipt(accepted: 1, duplicates: 0))
                let json = try BatchJSON.encode(try phBatch(sequences: 4...5), calibrations: [try Self.event("json-1"), try Self.event("bin-1")])
                let viaJSON = try decode(
                    IngestReceipt.self,
                    try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(key), body: buffer(json)))
                #expect(viaJSON.accepted == 2)
                #expect(viaJSON.calibrations == CalibrationReceipt(accepted: 1, duplicates: 1))
                // A JSON event that breaks the rules refuses the batch as binary does, and stores none of it.
                var bad = try Self.event("bad-1")
                bad.points = []
                let badText = String(decoding: try JSONEncoder().encode(bad), as: UTF8.self)
                let document = #"{"device":"d1","sensors":[{"id":"tank1.ph","quantity":"ph"}],"readings":[],"calibrations":[\#(badText)]}"#
                let refused = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(key), body: buffer(Array(document.utf8)))
                let message = try expectError(refused, .badRequest, IngestErrorCode.malformedBatch)
                #expect(message.contains("calibrations[0]"))
            }
            let farm = try #require(try await store.farm(named: "f1"))
            let devices = try await store.devices(farmID: farm.id)
            let d1 = try #require(devices.first { $0.device.rawValue == "d1" })
            let stored = try await Self.calibrations(store).calibrations(deviceRowID: d1.rowID, sensor: try sensorID("tank1.ph"), limit: 10)
            #expect(Set(stored.map(\.id)) == ["bin-1", "json-1"])
        }
    }
}
