import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Prometheus
import Testing

@testable import FarmgateIngest

@Suite("Read API, health and errors")
struct ReadAPITests {
    struct Latest: Decodable {
        struct Item: Decodable, Equatable {
            var device: String
            var sensor: String
            var quantity: String
            var unit: String
            var sequence: UInt64
            var timestamp: String
            var value: Double
            var flags: [String]
        }
        var farm: String
        var sensors: [Item]
    }

    struct Readings: Decodable {
        struct Item: Decodable, Equatable {
            var sequence: UInt64
            var timestamp: String
            var value: Double
            var flags: [String]
        }
        var farm: String
        var device: String
        var sensor: String
        var quantity: String
        var unit: String
        var limit: Int
        var readings: [Item]
    }

    /// d1: tank1.ph sequences 1...30 (1 s apart from 2025-12-31T23:00:00Z), d1: tank1.temp sequence 31 flagged; d2: tank2.ph 1...2.
    func seed(_ fixture: Fixture) async throws {
        let d1 = try await fixture.identity(device: "d1")
        let d2 = try await fixture.identity(device: "d2")
        _ = try await fixture.store.store(try phBatch(sequences: 1...30), for: d1, receivedAt: testNow)
        let temp = try sensorID("tank1.temp")
        let flagged = Batch(
            device: d1.device, sensors: [SensorDescriptor(id: temp, quantity: .temperature)],
            readings: [
                Reading(
                    sensor: temp, sequence: 31, timestamp: Timestamp(microseconds: testNow.microseconds - 10_000_000), value: 21.5625,
                    quality: [.clockUnsynchronized, .sensorFault])
            ])
        _ = try await fixture.store.store(flagged, for: d1, receivedAt: testNow)
        let tank2 = try sensorID("tank2.ph")
        let other = Batch(
            device: d2.device, sensors: [SensorDescriptor(id: tank2, quantity: .ph)],
            readings: [
                Reading(sensor: tank2, sequence: 1, timestamp: Timestamp(microseconds: testNow.microseconds - 5_000_000), value: 5.9),
                Reading(sensor: tank2, sequence: 2, timestamp: Timestamp(microseconds: testNow.microseconds - 4_000_000), value: 6.0),
            ])
        _ = try await fixture.store.store(other, for: d2, receivedAt: testNow)
        // A reading in the other farm must never show up in f1.
        let e1 = try await fixture.identity(farm: "f2", device: "e1")
        _ = try await fixture.store.store(try phBatch(device: "e1", sequences: 1...3), for: e1, receivedAt: testNow)
    }

    @Test("latest lists every sensor of the farm with unit, RFC 3339 timestamp and flag names")
    func latest() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await seed(fixture)
        try await fixture.app().test(.router) { client in
            let response = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.readToken))
            #expect(response.status == .ok)
            let latest = try decode(Latest.self, response)
            #expect(latest.farm == "f1")
            #expect(
                latest.sensors == [
                    .init(device: "d1", sensor: "tank1.ph", quantity: "ph", unit: "pH", sequence: 30, timestamp: "2025-12-31T23:00:30Z", value: 6.5, flags: []),
                    .init(
                        device: "d1", sensor: "tank1.temp", quantity: "temperature", unit: "°C", sequence: 31, timestamp: "2025-12-31T23:59:50Z",
                        value: 21.5625, flags: ["clock_unsynchronized", "sensor_fault"]),
                    .init(device: "d2", sensor: "tank2.ph", quantity: "ph", unit: "pH", sequence: 2, timestamp: "2025-12-31T23:59:56Z", value: 6.0, flags: []),
                ])
        }
    }

    @Test("readings of one sensor in a range, in time order, with a limit")
    func readings() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await seed(fixture)
        try await fixture.app().test(.router) { client in
            let uri = "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?from=2025-12-31T23:00:10Z&to=2025-12-31T23:00:20Z&limit=4"
            let response = try await client.execute(uri: uri, method: .get, headers: bearer(fixture.readToken))
            #expect(response.status == .ok)
            let answer = try decode(Readings.self, response)
            #expect(answer.readings.map(\.sequence) == [10, 11, 12, 13])
            #expect(answer.readings.first?.timestamp == "2025-12-31T23:00:10Z")
            #expect(answer.limit == 4 && answer.unit == "pH" && answer.quantity == "ph")

            let all = try decode(
                Readings.self,
                try await client.execute(uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings", method: .get, headers: bearer(fixture.readToken)))
            #expect(all.readings.count == 30)
            #expect(all.limit == 1000)
            // An offset other than Z is understood (percent-encoded '+').
            let offset = try decode(
                Readings.self,
                try await client.execute(
                    uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?from=2026-01-01T00:00:25%2B01:00", method: .get,
                    headers: bearer(fixture.readToken)))
            #expect(offset.readings.map(\.sequence) == Array(25...30))
            // Bounds finer than a microsecond (Go's RFC3339Nano): from stays inclusive and to exclusive as written.
            for (query, sequences) in [
                ("from=2025-12-31T23:00:10.0000001Z&to=2025-12-31T23:00:12Z", [UInt64(11)]),
                ("from=2025-12-31T23:00:10Z&to=2025-12-31T23:00:11.000000001Z", [10, 11]),
                ("from=2025-12-31T23:00:10Z&to=2025-12-31T23:00:10.0000001Z", [10]),
            ] {
                let fine = try decode(
                    Readings.self,
                    try await client.execute(uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?" + query, method: .get, headers: bearer(fixture.readToken)))
                #expect(fine.readings.map(\.sequence) == sequences, "\(query)")
            }
        }
    }

    @Test(
        "bad parameters are answered 400 invalid_parameter naming the parameter",
        arguments: [
            ("from=yesterday", "from"), ("to=2026-13-01T00:00:00Z", "to"), ("limit=0", "limit"), ("limit=10001", "limit"),
            ("limit=ten", "limit"), ("from=2026-01-01T00:00:00Z&to=2025-01-01T00:00:00Z", "from"),
            // Unknown (misspelt, or another endpoint's) and repeated parameters are refused, never ignored or first-wins.
            ("resolutoin=1h", "'resolutoin'"), ("cursor=zzz", "'cursor'"), ("resolution=raw&resolution=1m", "'resolution'"),
            ("limit=1&limit=2", "'limit'"),
            // Instants outside the years 0001-9999 UTC, which an offset can reach from a valid text: said so, not "not an
            // RFC 3339 timestamp" (a tester, 2026-12-07).
            ("from=0000-01-01T00:00:00%2B23:59", "from '0000-01-01T00:00:00+23:59' is outside the years 0001-9999 UTC"),
            ("to=9999-12-31T23:59:59.999999-23:59", "to '9999-12-31T23:59:59.999999-23:59' is outside the years 0001-9999 UTC"),
            ("to=9999-12-31T23:59:59-01:00", "to '9999-12-31T23:59:59-01:00' is outside the years 0001-9999 UTC"),
            ("from=0000-06-01T00:00:00Z", "from '0000-06-01T00:00:00Z' is before the years 0001-9999 UTC"),
        ])
    func badParameters(query: String, parameter: String) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            let response = try await client.execute(
                uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?" + query, method: .get, headers: bearer(fixture.readToken))
            let message = try expectError(response, .badRequest, "invalid_parameter")
            #expect(message.contains(parameter))
        }
    }

    @Test("an unknown parameter's error lists the ones the endpoint takes")
    func unknownParameterListsTheKnownOnes() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            let response = try await client.execute(
                uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?resolutoin=1h", method: .get, headers: bearer(fixture.readToken))
            let message = try expectError(response, .badRequest, "invalid_parameter")
            #expect(message.contains("from, to, limit, resolution"), "\(message)")
            // A trailing '&' names nothing and is no error.
            let trailing = try await client.execute(
                uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?limit=5&", method: .get, headers: bearer(fixture.readToken))
            #expect(trailing.status != .badRequest)
        }
    }

    @Test("an unknown sensor or device is 404, and a sensor of another farm is invisible")
    func unknownSensor() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await seed(fixture)
        try await fixture.app().test(.router) { client in
            for uri in ["/v1/farms/f1/devices/d1/sensors/nope/readings", "/v1/farms/f1/devices/e1/sensors/tank1.ph/readings"] {
                let response = try await client.execute(uri: uri, method: .get, headers: bearer(fixture.readToken))
                try expectError(response, .notFound, "not_found")
            }
        }
    }

    @Test("health, readiness and unknown routes")
    func healthAndNotFound() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            #expect(try await client.execute(uri: "/healthz", method: .get).status == .ok)
            #expect(try await client.execute(uri: "/readyz", method: .get).status == .ok)
            let missing = try await client.execute(uri: "/v2/nothing", method: .get)
            try expectError(missing, .notFound, "not_found")
            #expect(missing.headers[.contentType]?.hasPrefix("application/json") == true)
        }
    }

    @Test("readiness fails with 503 when the store does not answer")
    func notReady() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let store = try SQLiteIngestStore(path: directory.path + "/ingest.sqlite", logger: testLogger)
        defer { store.close() }
        // Never migrated: the readiness query has no table to read.
        var configuration = IngestConfiguration()
        configuration.server.port = 0
        let app = buildApplication(configuration: configuration, store: store, registry: .init(), logger: testLogger)
        try await app.test(.router) { client in
            let response = try await client.execute(uri: "/readyz", method: .get)
            try expectError(response, .serviceUnavailable, "not_ready")
            #expect(try await client.execute(uri: "/healthz", method: .get).status == .ok)
        }
    }

    @Test("the whole upload and read path over a real socket")
    func live() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.live) { client in
            let receipt = try decode(IngestReceipt.self, try await postJSON(client, try phBatch(sequences: 1...500), key: fixture.deviceKey))
            #expect(receipt.accepted == 500)
            let latest = try decode(Latest.self, try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.readToken)))
            #expect(latest.sensors.first?.sequence == 500)
        }
    }
}
