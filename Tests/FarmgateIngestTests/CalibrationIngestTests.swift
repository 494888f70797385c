import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Testing

@testable import FarmgateIngest

@Suite("Ingest: calibration events (format version 3)")
struct CalibrationIngestTests {
    struct Listed: Decodable {
        var farm: String
        var device: String
        var sensor: String
        var calibrations: [CalibrationEvent]
    }

    static func event(_ id: String, at offset: Int64 = 0) throws -> CalibrationEvent {
        CalibrationEvent(
            id: id, sensor: try sensorID("tank1.ph"), time: Timestamp(microseconds: testNow.microseconds - 60_000_000 + offset), circuit: "pH",
            firmware: "2.16", points: [.init(name: "mid", reference: 7, at: Timestamp(microseconds: testNow.microseconds - 120_000_000), reading: 7.01)],
            calibratedPoints: 1, slope: .init(acidPercent: 99.7, basePercent: 100.3, offsetMillivolts: -0.89))
    }

    @Test("GET /v1/device lists format versions 2, 3 and 4; a v3 frame stores readings and events once, a re-send counts duplicates; the read route serves them newest first")
    func storeAndServe() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let first = try Self.event("ev-1")
        let second = try Self.event("ev-2", at: 1_000_000)
        try await fixture.app().test(.live) { client in
            let state = try decode(DeviceState.self, try await client.execute(uri: IngestProtocol.deviceStatePath, method: .get, headers: bearer(fixture.deviceKey)))
            #expect(state.acceptedVersions == [2, 3, 4])

            let frame = try BatchCodec.encode(try phBatch(sequences: 1...5), calibrations: [first, second])
            let stored = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey), body: buffer(frame))
            #expect(stored.status == .ok)
            let receipt = try decode(IngestReceipt.self, stored)
            #expect(receipt.accepted == 5 && receipt.duplicates == 0)
            #expect(receipt.calibrations == CalibrationReceipt(accepted: 2, duplicates: 0))

            // The same frame again (an acknowledgement lost on the way): nothing stored twice.
            let again = try decode(
                IngestReceipt.self,
                try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey), body: buffer(frame)))
            #expect(again.accepted == 0 && again.duplicates == 5)
            #expect(again.calibrations == CalibrationReceipt(accepted: 0, duplicates: 2))

            // A batch without events: no calibrations member at all.
            let plain = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey), body: buffer(try BatchCodec.encode(try phBatch(sequences: 6...7))))
            #expect(!String(decoding: plain.body.readableBytesView, as: UTF8.self).contains("calibrations"))

            let path = "/v1/farms/f1/devices/d1/sensors/tank1.ph/calibrations"
            let listed = try decode(Listed.self, try await client.execute(uri: path, method: .get, headers: bearer(fixture.readToken)))
            #expect(listed.calibrations == [second, first])
            let one = try decode(Listed.self, try await client.execute(uri: path + "?limit=1", method: .get, headers: bearer(fixture.readToken)))
            #expect(one.calibrations == [second])
            // Another device's sensor of the same name has none; another farm's token sees nothing of f1.
            let other = try decode(Listed.self, try await client.execute(uri: "/v1/farms/f1/devices/d2/sensors/tank1.ph/calibrations", method: .get, headers: bearer(fixture.readToken)))
            #expect(other.calibrations.isEmpty)
            let foreign = try await client.execute(uri: path, method: .get, headers: bearer(fixture.otherFarmReadToken))
            #expect(foreign.status == .forbidden || foreign.status == .notFound || foreign.status == .unauthorized)
            try expectError(try await client.execute(uri: "/v1/farms/f1/devices/d9/sensors/tank1.ph/calibrations", method: .get, headers: bearer(fixture.readToken)), .notFound, "not_found")
            try expectError(try await client.execute(uri: path + "?limit=0", method: .get, headers: bearer(fixture.readToken)), .badRequest, "invalid_parameter")
            let anonymous = try await client.execute(uri: path, method: .get)
            #expect(anonymous.status == .unauthorized)
        }
    }

    @Test("a v3 frame whose events break the rules is malformed_batch and stores nothing")
    func hostileEvent() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var event = try Self.event("ev-1")
        event.points = []
        let bad = event
        try await fixture.app().test(.router) { client in
            // The encoder checks ids only; an event without points is built by hand in a frame.
            let frame = try BatchCodec.encode(try phBatch(sequences: 1...3), calibrations: [bad])
            let response = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey), body: buffer(frame))
            let message = try expectError(response, .badRequest, IngestErrorCode.malformedBatch)
            #expect(message.contains("1 to 8 expected"))
        }
        let d1 = try await fixture.identity(device: "d1")
        #expect(try await fixture.store.highestSequence(device: d1) == nil)
        #expect(try await fixture.store.calibrations(deviceRowID: d1.rowID, sensor: try sensorID("tank1.ph"), limit: 10).isEmpty)
    }

    // Before the fix (a tester, 2026-12-05) an event sent again under a stored id with other content was counted as a
    // duplicate: the sender deleted it and its content was lost without a word.
    @Test("an event id already taken by other content, stored or earlier in the batch, is malformed_batch and stores nothing")
    func anEventIdIsOneCalibrationForGood() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let first = try Self.event("ev-1")
        var edited = first
        edited.points[0].reference = 6.86
        let changed = edited
        try await fixture.app().test(.router) { client in
            func post(_ sequences: ClosedRange<UInt64>, _ events: [CalibrationEvent]) async throws -> TestResponse {
                try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey),
                    body: buffer(try BatchCodec.encode(try phBatch(sequences: sequences), calibrations: events)))
            }
            #expect(try decode(IngestReceipt.self, try await post(1...2, [first])).calibrations == CalibrationReceipt(accepted: 1, duplicates: 0))
            let stored = try expectError(try await post(3...4, [changed]), .badRequest, IngestErrorCode.malformedBatch)
            #expect(stored.contains("calibration event 'ev-1'") && stored.contains("already stored"), "\(stored)")
            let inBatch = try expectError(try await post(3...4, [try Self.event("ev-2"), { var e = try Self.event("ev-2"); e.circuit = "EC"; return e }()]), .badRequest, IngestErrorCode.malformedBatch)
            #expect(inBatch.contains("'ev-2'") && inBatch.contains("earlier in this batch"), "\(inBatch)")
            // An event of a sensor the device never declared (not in the batch, never sent) is refused; one of a sensor
            // sent before, in a batch of other sensors, is fine.
            var stray = try Self.event("ev-3")
            stray.sensor = try sensorID("tank9.ph")
            let unknown = try expectError(try await post(3...4, [stray]), .badRequest, IngestErrorCode.malformedBatch)
            #expect(unknown.contains("names sensor tank9.ph, which device 'd1' never declared"), "\(unknown)")
            var elsewhere = try phBatch(sequences: 3...3)
            elsewhere.sensors = [SensorDescriptor(id: try sensorID("tank1.ec"), quantity: .electricalConductivity)]
            elsewhere.readings = elsewhere.readings.map { var r = $0; r.sensor = elsewhere.sensors[0].id; r.value = 1400; return r }
            let other = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey),
                body: buffer(try BatchCodec.encode(elsewhere, calibrations: [try Self.event("ev-4")])))
            #expect(try decode(IngestReceipt.self, other).calibrations == CalibrationReceipt(accepted: 1, duplicates: 0))
            // The same event again, alone or twice in one batch, is a duplicate as before.
            let again = try decode(IngestReceipt.self, try await post(4...5, [first, first]))
            #expect(again.accepted == 2 && again.calibrations == CalibrationReceipt(accepted: 0, duplicates: 2))
        }
        let d1 = try await fixture.identity(device: "d1")
        #expect(try await fixture.store.highestSequence(device: d1) == 5)
        #expect(try await fixture.store.calibrations(deviceRowID: d1.rowID, sensor: try sensorID("tank1.ph"), limit: 10).map(\.id) == ["ev-4", "ev-1"])
    }
}
