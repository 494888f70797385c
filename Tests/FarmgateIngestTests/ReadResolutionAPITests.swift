import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Testing

@testable import FarmgateIngest

/// `resolution=raw|1m|1h|1d|auto` on the range query, over the real router and SQLite store.
@Suite("Read API: resolution")
struct ReadResolutionAPITests {
    struct Answer: Decodable {
        struct Bucket: Decodable {
            var start: String
            var count: Int
            var faults: Int
            var min: Double?
            var max: Double?
            var mean: Double?
            var last: Double?
            var last_timestamp: String?
        }
        struct Item: Decodable {
            var sequence: UInt64
        }
        var resolution: String
        var from: String?
        var to: String?
        var limit: Int
        var readings: [Item]?
        var buckets: [Bucket]?
    }

    /// Three months of `tank1.ph` and `tank1.temp` every 15 minutes, up to ``testNow``.
    func seeded() async throws -> Fixture {
        let fixture = try await Fixture()
        let device = try await fixture.identity(device: "d1")
        let data = SyntheticMonths(start: RollupTests.monthsAgo, days: 92)
        for batch in try SyntheticMonths.batches(data.readings) { _ = try await fixture.store.store(batch, for: device, receivedAt: testNow) }
        return fixture
    }

    func get(_ client: some TestClientProtocol, _ fixture: Fixture, _ query: String) async throws -> Answer {
        let response = try await client.execute(
            uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?" + query, method: .get, headers: bearer(fixture.readToken))
        #expect(response.status == .ok)
        return try decode(Answer.self, response)
    }

    @Test("each level answers its buckets and says which resolution it used")
    func explicitLevels() async throws {
        let fixture = try await seeded()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            let day = "from=2025-12-30T00:00:00Z&to=2025-12-31T00:00:00Z"
            let raw = try await get(client, fixture, day + "&resolution=raw")
            #expect(raw.resolution == "raw" && raw.readings?.count == 96 && raw.buckets == nil)
            let minute = try await get(client, fixture, day + "&resolution=1m")
            #expect(minute.resolution == "1m" && minute.readings == nil)
            #expect(minute.buckets?.count == 96 && minute.limit == ReadController.maxLimit)
            #expect(minute.buckets?.first?.start == "2025-12-30T00:00:00Z" && minute.buckets?.first?.count == 1)
            let hour = try await get(client, fixture, day + "&resolution=1h")
            #expect(hour.buckets?.count == 24 && hour.buckets?.allSatisfy { $0.count == 4 } == true)
            let daily = try await get(client, fixture, "from=2025-10-01T12:00:00Z&to=2026-01-01T00:00:00Z&resolution=1d")
            // The first bucket starts before `from`: buckets that overlap the span.
            #expect(daily.buckets?.count == 92 && daily.buckets?.first?.start == "2025-10-01T00:00:00Z")
            let withFaults = try #require(daily.buckets?.first { $0.faults > 0 })
            #expect(withFaults.count == 96 && (withFaults.max ?? 99) < 99)
            // No resolution: raw readings, as before.
            let plain = try await get(client, fixture, day)
            #expect(plain.resolution == "raw" && plain.readings?.count == 96)
        }
    }

    @Test("auto keeps an answer under about 2,000 points and never picks raw readings retention has removed")
    func auto() async throws {
        let fixture = try await seeded()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            // A day: 96 readings, raw.
            let day = try await get(client, fixture, "from=2025-12-30T00:00:00Z&to=2025-12-31T00:00:00Z&resolution=auto")
            #expect(day.resolution == "raw" && day.readings?.count == 96)
            // No bounds: the day before now.
            let recent = try await get(client, fixture, "resolution=auto")
            #expect(recent.resolution == "raw" && recent.from == "2025-12-31T00:00:00Z" && recent.to == "2026-01-01T00:00:00Z")
            // A month: 2,880 readings, 43,200 minutes, 720 hours.
            let month = try await get(client, fixture, "from=2025-12-01T00:00:00Z&to=2025-12-31T00:00:00Z&resolution=auto")
            #expect(month.resolution == "1h" && month.buckets?.count == 720)
            // Three months: 2,208 hours, so days.
            let quarter = try await get(client, fixture, "from=2025-10-01T00:00:00Z&to=2026-01-01T00:00:00Z&resolution=auto")
            #expect(quarter.resolution == "1d" && quarter.buckets?.count == 92)
            // A day before raw retention's cut-off (90 days before now: 2025-10-03): rollups, though it is only 96 readings.
            let old = try await get(client, fixture, "from=2025-10-01T00:00:00Z&to=2025-10-02T00:00:00Z&resolution=auto")
            #expect(old.resolution == "1m" && old.buckets?.count == 96)
            // A span that starts in the future of `to` (now, when absent) is refused like from >= to.
            let response = try await client.execute(
                uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?from=2030-01-01T00:00:00Z&resolution=auto", method: .get,
                headers: bearer(fixture.readToken))
            #expect(try expectError(response, .badRequest, "invalid_parameter").contains("must be earlier than to"))
        }
    }

    @Test("auto never picks a rollup level retention has removed from the span: the next coarser one still kept")
    func autoFollowsRollupRetention() async throws {
        let fixture = try await seeded()
        defer { fixture.close() }
        var retention = IngestConfiguration.Retention()
        retention.rollup1m = .seconds(30 * 86_400)
        try await fixture.app(retention: retention).test(.router) { client in
            // 92 days ago: raw readings and 1-minute rollups are past their retention, hourly ones are kept.
            let old = try await get(client, fixture, "from=2025-10-01T00:00:00Z&to=2025-10-02T00:00:00Z&resolution=auto")
            #expect(old.resolution == "1h" && old.buckets?.count == 24)
            // A recent day still reads raw readings.
            let day = try await get(client, fixture, "from=2025-12-30T00:00:00Z&to=2025-12-31T00:00:00Z&resolution=auto")
            #expect(day.resolution == "raw")
        }
    }

    @Test("an unknown resolution is a 400 that names the accepted ones")
    func invalid() async throws {
        let fixture = try await seeded()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            let response = try await client.execute(
                uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?resolution=5m", method: .get, headers: bearer(fixture.readToken))
            let message = try expectError(response, .badRequest, "invalid_parameter")
            #expect(message.contains("'5m'") && message.contains("raw, 1m, 1h, 1d, auto"))
        }
    }
}
