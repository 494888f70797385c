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
    func findsStoredEventsByIdOfOneDeviceOnly(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let calibrations = try Self.calibrations(store)
            let d1 = try await StoreConformanceTests.device(in: store)
            let d2 = try await StoreConformanceTests.device(in: store, name: "d2")
            let one = try Self.event("ev-1"), two = try Self.event("ev-2", sensor: "tank1.ec")
            _ = try await calibrations.storeCalibrations([one, two], for: d1, receivedAt: testNow)
            #expect(try await calibrations.storedCalibrations(ids: ["ev-1", "ev-2", "ev-9", "ev-1"], for: d1) == ["ev-1": one, "ev-2": two])
            #expect(try await calibrations.storedCalibrations(ids: ["ev-1"], for: d2).isEmpty)
            #expect(try await calibrations.storedCalibrations(ids: [], for: d1).isEmpty)
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
        try await Self.withDeviceOne(kind) { store, key, client in
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
            let farm = try #require(try await store.farm(named: "f1"))
            let devices = try await store.devices(farmID: farm.id)
            let d1 = try #require(devices.first { $0.device.rawValue == "d1" })
            let stored = try await Self.calibrations(store).calibrations(deviceRowID: d1.rowID, sensor: try sensorID("tank1.ph"), limit: 10)
            #expect(Set(stored.map(\.id)) == ["bin-1", "json-1"])
        }
    }

    /// Runs `body` with a fresh store of `kind` holding farm f1 and its device d1, d1's key, and a client of an ingest's
    /// router on that store.
    static func withDeviceOne(
        _ kind: StoreKind, _ body: @escaping @Sendable (any IngestStore, APIKey, any TestClientProtocol) async throws -> Void
    ) async throws {
        try await withFreshStore(kind) { store in
            let admin = IngestAdmin(store: store)
            _ = try await admin.createFarm(name: "f1")
            let key = try await admin.createDevice(farm: "f1", device: try deviceID("d1"))
            var configuration = IngestConfiguration()
            configuration.server.port = 0
            let app = buildApplication(
                configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: testLogger, now: { testNow },
                credentialCacheTTL: .zero)
            try await app.test(.router) { client in try await body(store, key, client) }
        }
    }

    /// The JSON text of `event` with its `time` written as `time` (an integer of microseconds, say), not as RFC 3339.
    static func eventJSON(_ event: CalibrationEvent, time: String? = nil) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let text = String(decoding: try encoder.encode(event), as: UTF8.self)
        guard let time else { return text }
        return text.replacingOccurrences(of: #""time":"\#(RFC3339.format(event.time))""#, with: #""time":\#(time)"#)
    }

    @Test(
        "an event with a control character in a text or a time outside 2000...now + future_tolerance is refused whole (400, naming event and field) on either store, nothing stored",
        arguments: StoreKind.allCases)
    func refusesEventsWithControlCharactersOrImplausibleTimes(kind: StoreKind) async throws {
        try await Self.withDeviceOne(kind) { store, key, client in
            var nul = try Self.event("nul")
            nul.circuit = "p\u{0}H"
            var escape = try Self.event("escape")
            escape.firmware = "2.16\u{1B}[31m"
            var point = try Self.event("point")
            point.points[1].name = "low\n"
            // DEL and C1 too (before the fix, a tester 2026-12-06: taken).
            var delete = try Self.event("delete")
            delete.firmware = "2.1\u{7F}"
            var c1 = try Self.event("c1")
            c1.points[0].name = "mid\u{85}"
            let pointAhead = { () throws -> CalibrationEvent in
                var event = try Self.event("point-ahead")
                event.points[0].at = Timestamp(microseconds: 32_503_680_000_000_000)
                return event
            }
            var ahead = try Self.event("ahead")
            ahead.time = Timestamp(microseconds: testNow.microseconds + 11 * 60_000_000)
            var old = try Self.event("old")
            old.time = Timestamp(microseconds: Timestamp.earliestPlausible.microseconds - 1)
            let cases: [(json: String, problem: String)] = [
                (try Self.eventJSON(nul), "event nul: circuit contains the control character U+0000 at character 2"),
                (try Self.eventJSON(escape), "event escape: firmware contains the control character U+001B"),
                (try Self.eventJSON(point), "event point: points[1].name contains the control character U+000A"),
                (try Self.eventJSON(delete), "event delete: firmware contains the control character U+007F"),
                (try Self.eventJSON(c1), "event c1: points[0].name contains the control character U+0085"),
                (try Self.eventJSON(try Self.event("max"), time: "9223372036854775807"), "calibration event max: time 294247-"),
                (try Self.eventJSON(try Self.event("y10k"), time: "253402300800000000"), "calibration event y10k: time 10000-01-01T00:00:00Z is later than"),
                (try Self.eventJSON(try pointAhead()), "calibration event point-ahead: points[0].at 3000-01-01T00:00:00Z is later than"),
                (try Self.eventJSON(ahead), "calibration event ahead: time 2026-01-01T00:11:00Z is later than the ingest's clock"),
                (try Self.eventJSON(old), "calibration event old: time 1999-12-31T23:59:59.999999Z is before 2000-01-01"),
            ]
            for (json, problem) in cases {
                let document = #"{"device":"d1","sensors":[{"id":"tank1.ph","quantity":"ph"}],"readings":[{"sensor":"tank1.ph","seq":1,"ts":"2025-12-31T23:00:00Z","value":6.5}],"calibrations":[\#(json)]}"#
                let refused = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(key), body: buffer(Array(document.utf8)))
                let message = try expectError(refused, .badRequest, IngestErrorCode.malformedBatch)
                #expect(message.contains(problem), "\(message)")
            }
            // In a binary frame the same: a time the ingest can write and read, but far ahead.
            var future = try Self.event("future")
            future.time = Timestamp(microseconds: 32_503_680_000_000_000)
            let frame = try BatchCodec.encode(try phBatch(sequences: 1...1), calibrations: [future])
            let binary = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(key), body: buffer(frame))
            #expect(try expectError(binary, .badRequest, IngestErrorCode.malformedBatch).contains("calibration event future: time 3000-01-01T00:00:00Z"))
            // Up to future_tolerance ahead, with a tab nowhere: taken.
            var soon = try Self.event("soon")
            soon.time = Timestamp(microseconds: testNow.microseconds + 9 * 60_000_000)
            let taken = try BatchCodec.encode(try phBatch(sequences: 1...1), calibrations: [soon])
            let receipt = try decode(
                IngestReceipt.self, try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(key), body: buffer(taken)))
            #expect(receipt.accepted == 1 && receipt.calibrations == CalibrationReceipt(accepted: 1, duplicates: 0))
            let farm = try #require(try await store.farm(named: "f1"))
            let d1 = try #require(try await store.devices(farmID: farm.id).first)
            let stored = try await Self.calibrations(store).calibrations(deviceRowID: d1.rowID, sensor: try sensorID("tank1.ph"), limit: 100)
            #expect(stored.map(\.id) == ["soon"])
            #expect(try await store.highestSequence(device: d1) == 1, "the refused batches stored none of their readings")
        }
    }

    @Test("an event stored before times were checked, at year 294247, is skipped by reads rather than hiding the real ones", arguments: StoreKind.allCases)
    func readsSkipEventsThatCannotBeReadBack(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let calibrations = try Self.calibrations(store)
            let device = try await StoreConformanceTests.device(in: store)
            var far = try Self.event("far")
            far.time = Timestamp(microseconds: Int64.max)
            let real = try Self.event("real", minutesAgo: 5)
            #expect(try await calibrations.storeCalibrations([far, real], for: device, receivedAt: testNow) == CalibrationReceipt(accepted: 2, duplicates: 0))
            let ph = try sensorID("tank1.ph")
            #expect(try await calibrations.calibrations(deviceRowID: device.rowID, sensor: ph, limit: 1) == [real])
            #expect(try await calibrations.calibrations(deviceRowID: device.rowID, sensor: ph, limit: 100) == [real])
        }
    }
}
