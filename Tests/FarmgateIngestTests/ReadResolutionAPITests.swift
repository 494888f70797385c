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
        var truncated: Bool
        var next_from: String?
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
            #expect(raw.resolution == "raw" && raw.readings?.count == 96 && raw.buckets == nil && !raw.truncated)
            // A limit below what the span holds: the oldest `limit`, and `truncated` says there are more.
            let cut = try await get(client, fixture, day + "&resolution=raw&limit=96")
            #expect(cut.readings?.count == 96 && !cut.truncated)
            let cutShort = try await get(client, fixture, day + "&resolution=raw&limit=95")
            #expect(cutShort.readings?.count == 95 && cutShort.truncated && cutShort.readings?.first?.sequence == raw.readings?.first?.sequence)
            let hourly = try await get(client, fixture, day + "&resolution=1h&limit=23")
            #expect(hourly.buckets?.count == 23 && hourly.truncated)
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
            #expect(quarter.limit == ReadResolution.autoTargetPoints && !quarter.truncated)
            // A limit below what the span holds at a level: the level is picked for the limit, so that one answer holds
            // the span (a page after it would otherwise pick again for the shorter span left, and change level).
            let dayIn50 = try await get(client, fixture, "from=2025-12-30T00:00:00Z&to=2025-12-31T00:00:00Z&resolution=auto&limit=50")
            #expect(dayIn50.resolution == "1h" && dayIn50.buckets?.count == 24 && !dayIn50.truncated)
            // Only when even days are more than the limit is the answer cut: days, and the rest is asked as 1d.
            let quarterIn50 = try await get(client, fixture, "from=2025-10-01T00:00:00Z&to=2026-01-01T00:00:00Z&resolution=auto&limit=50")
            #expect(quarterIn50.resolution == "1d" && quarterIn50.buckets?.count == 50 && quarterIn50.truncated)
            #expect(quarterIn50.next_from == "2025-11-20T00:00:00Z")
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

    @Test("auto decides by the readings in the span itself, not the whole hours it touches: 900 across an hour boundary are raw")
    func autoAcrossAnHourBoundary() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        // tank1.ph every 2 s from 2025-12-31T10:00:00Z to 12:00, and tank2.ph 33 times a second from 11:00:00 to 11:01:10.
        let start = try #require(RFC3339.parse("2025-12-31T10:00:00Z"))
        let slow = try sensorID("tank1.ph"), fast = try sensorID("tank2.ph")
        var readings = (0..<3_600).map { Reading(sensor: slow, sequence: UInt64($0 + 1), timestamp: Timestamp(microseconds: start.microseconds + Int64($0) * 2_000_000), value: 6) }
        readings += (0..<2_310).map {
            Reading(sensor: fast, sequence: UInt64(3_601 + $0), timestamp: Timestamp(microseconds: start.microseconds + 3_600_000_000 + Int64($0) * 30_303), value: 6)
        }
        for chunk in stride(from: 0, to: readings.count, by: 1_000) {
            let batch = Batch(
                device: device.device, sensors: [SensorDescriptor(id: slow, quantity: .ph), SensorDescriptor(id: fast, quantity: .ph)],
                readings: Array(readings[chunk..<min(chunk + 1_000, readings.count)]))
            _ = try await fixture.store.store(batch, for: device, receivedAt: testNow)
        }
        try await fixture.app().test(.router) { client in
            for span in ["from=2025-12-31T10:45:00Z&to=2025-12-31T11:15:00Z", "from=2025-12-31T10:05:00Z&to=2025-12-31T10:35:00Z"] {
                let answer = try await get(client, fixture, span + "&resolution=auto")
                #expect(answer.resolution == "raw" && answer.readings?.count == 900, "\(span): \(answer.resolution) \(answer.readings?.count ?? -1)")
            }
            // Two hours: 3,600 readings, so 1-minute buckets.
            let hours = try await get(client, fixture, "from=2025-12-31T10:00:00Z&to=2025-12-31T12:00:00Z&resolution=auto")
            #expect(hours.resolution == "1m" && hours.buckets?.count == 120)
            // Ten seconds of the fast sensor: 330 readings raw, not the minute bucket of 1,980 around them.
            let response = try await client.execute(
                uri: "/v1/farms/f1/devices/d1/sensors/tank2.ph/readings?from=2025-12-31T11:00:20Z&to=2025-12-31T11:00:30Z&resolution=auto", method: .get,
                headers: bearer(fixture.readToken))
            let fast = try decode(Answer.self, response)
            #expect(fast.resolution == "raw" && fast.readings?.count == 330, "\(fast.resolution) \(fast.readings?.count ?? -1)")
            // An explicit limit below the span's 900 readings: auto picks the level that holds the span in that many
            // points (30 one-minute buckets), not a first page of raw readings whose next page would pick again.
            let limited = try await get(client, fixture, "from=2025-12-31T10:45:00Z&to=2025-12-31T11:15:00Z&resolution=auto&limit=100")
            #expect(limited.resolution == "1m" && limited.buckets?.count == 30 && limited.limit == 100 && !limited.truncated)
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
        // A run removes 1-minute rollups older than 30 days; `rollup_1m` raised back to a year brings nothing back, so
        // auto still reads hourly rollups there (not 1-minute ones, which would answer an empty day).
        let report = try await fixture.store.runRetention(retention, now: testNow, options: RetentionRunOptions())
        #expect((report.rollupRowsDeleted[.minute] ?? 0) > 0)
        #expect(try await fixture.store.appliedRollupCutoffs()[.minute] == report.rollupCutoffs[.minute])
        try await fixture.app().test(.router) { client in
            let old = try await get(client, fixture, "from=2025-10-01T00:00:00Z&to=2025-10-02T00:00:00Z&resolution=auto")
            #expect(old.resolution == "1h" && old.buckets?.count == 24, "\(old.resolution) \(old.buckets?.count ?? -1)")
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
