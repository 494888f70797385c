import FarmgateWire
import Foundation
import Hummingbird
import HummingbirdTesting
import Prometheus
import Testing

@testable import FarmgateIngest

/// Paging through a range with `next_from`, on both stores, as a client that follows the API does: nothing missed and
/// nothing counted twice. And what both stores answer alike: `-0` stored as 0, `auto` after a raised `raw`.
@Suite("Range query: paging, retention raised, signed zero")
struct RangePagingTests {
    struct Page: Decodable {
        struct Item: Decodable {
            var sequence: UInt64
            var timestamp: String
            var value: Double
        }
        struct Bucket: Decodable {
            var start: String
            var count: Int
            var min: Double?
            var max: Double?
            var last: Double?
        }
        var resolution: String
        var readings: [Item]?
        var buckets: [Bucket]?
        var truncated: Bool
        var next_from: String?
    }

    /// A fresh store of `kind` with farm f1, device d1 and a read token, and an application on it.
    static func with(
        _ kind: StoreKind, retention: IngestConfiguration.Retention = IngestConfiguration.Retention(),
        _ body: @Sendable (any IngestStore, APIKey, APIKey, any ApplicationProtocol) async throws -> Void
    ) async throws {
        try await withFreshStore(kind) { store in
            let admin = IngestAdmin(store: store)
            _ = try await admin.createFarm(name: "f1")
            let device = try await admin.createDevice(farm: "f1", device: try deviceID("d1"))
            let reader = try await admin.createReadToken(farm: "f1", role: .viewer)
            var configuration = IngestConfiguration()
            configuration.server.port = 0
            configuration.retention = retention
            let app = buildApplication(configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: testLogger, now: { testNow })
            try await body(store, device, reader, app)
        }
    }

    static func batch(_ readings: [(sequence: UInt64, offset: Int64, value: Double)], quantity: Quantity = .ph) throws -> Batch {
        let sensor = try sensorID("tank1.ph")
        let start = testNow.microseconds - 3_600_000_000
        return Batch(
            device: try deviceID("d1"), sensors: [SensorDescriptor(id: sensor, quantity: quantity)],
            readings: readings.map { Reading(sensor: sensor, sequence: $0.sequence, timestamp: Timestamp(microseconds: start + $0.offset), value: $0.value) })
    }

    /// Every page of the range from `query`, following `next_from` until an answer is not truncated.
    static func pages(_ client: some TestClientProtocol, reader: APIKey, _ query: String, from: String) async throws -> [Page] {
        var pages: [Page] = []
        var from = from
        while pages.count < 100 {
            let encoded = from.replacingOccurrences(of: "+", with: "%2B")
            let response = try await client.execute(
                uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?\(query)&from=\(encoded)", method: .get, headers: bearer(reader))
            #expect(response.status == .ok)
            let page = try decode(Page.self, response)
            pages.append(page)
            guard page.truncated else { return pages }
            from = try #require(page.next_from, "a truncated answer says where the next one starts")
        }
        Issue.record("paging did not end")
        return pages
    }

    @Test("raw pages never split the readings of one instant: following next_from gets every reading once", arguments: StoreKind.allCases)
    func rawPagesKeepInstantsWhole(kind: StoreKind) async throws {
        try await Self.with(kind) { store, device, reader, app in
            // Three readings at one instant (different sequences), one a second later, two more a second after that,
            // then four at one instant: more than a page of two holds.
            let readings: [(sequence: UInt64, offset: Int64, value: Double)] = [
                (1, 0, 6.0), (2, 0, 6.1), (3, 0, 6.2), (4, 1_000_000, 6.3), (5, 2_000_000, 6.4), (6, 2_000_000, 6.5),
                (7, 3_000_000, 6.6), (8, 3_000_000, 6.7), (9, 3_000_000, 6.8), (10, 3_000_000, 6.9), (11, 4_000_000, 7.0),
            ]
            try await app.test(.router) { client in
                #expect(try await postJSON(client, try Self.batch(readings), key: device).status == .ok)
                let pages = try await Self.pages(client, reader: reader, "resolution=raw&limit=2", from: "2025-12-31T23:00:00Z")
                let sequences = pages.flatMap { $0.readings ?? [] }.map(\.sequence)
                #expect(sequences == Array(1...11), "pages: \(pages.map { ($0.readings ?? []).map(\.sequence) })")
                // Whole instants: the instants of 3 and 4 readings come whole in one page each, over the limit.
                #expect(pages.map { ($0.readings ?? []).map(\.sequence) } == [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11]])
                #expect(pages.first?.next_from == "2025-12-31T23:00:00.000001Z")
                #expect(pages.last?.truncated == false && pages.last?.next_from == nil)
                // When the span's last instant holds more than a page, its page is the last: not truncated, no empty page
                // after it (before the fix, a tester 2026-12-05: `truncated: true`, and the next page was empty).
                let ending = try await Self.pages(client, reader: reader, "resolution=raw&limit=2&to=2025-12-31T23:00:03.5Z", from: "2025-12-31T23:00:00Z")
                #expect(ending.map { ($0.readings ?? []).map(\.sequence) } == [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]])
                #expect(ending.map(\.truncated) == [true, true, true, false] && ending.last?.next_from == nil)
                let alone = try await Self.pages(client, reader: reader, "resolution=raw&limit=2&to=2025-12-31T23:00:00.5Z", from: "2025-12-31T23:00:00Z")
                #expect(alone.map { ($0.readings ?? []).map(\.sequence) } == [[1, 2, 3]] && alone.first?.truncated == false)
            }
        }
    }

    @Test("rollup pages end where the last bucket does: following next_from counts every reading once", arguments: StoreKind.allCases)
    func rollupPagesDoNotRepeatTheLastBucket(kind: StoreKind) async throws {
        try await Self.with(kind) { store, device, reader, app in
            // 120 readings, every 15 s for 30 minutes: 30 one-minute buckets of 4.
            let readings: [(sequence: UInt64, offset: Int64, value: Double)] = (0..<120).map { index in
                let value: Double = 6.0 + Double(index % 7) / 10
                return (UInt64(index + 1), Int64(index) * 15_000_000, value)
            }
            try await app.test(.router) { client in
                #expect(try await postJSON(client, try Self.batch(readings), key: device).status == .ok)
                let pages = try await Self.pages(client, reader: reader, "resolution=1m&limit=10", from: "2025-12-31T23:00:00Z")
                let buckets = pages.flatMap { $0.buckets ?? [] }
                #expect(pages.count == 3, "\(pages.map { $0.buckets?.count ?? 0 })")
                #expect(buckets.count == 30 && Set(buckets.map(\.start)).count == 30)
                #expect(buckets.map(\.count).reduce(0, +) == 120)
                #expect(pages.first?.next_from == "2025-12-31T23:10:00Z")
                // A start inside a bucket still answers that bucket whole (the first may start before `from`).
                let inside = try await Self.pages(client, reader: reader, "resolution=1m&limit=10", from: "2025-12-31T23:29:30Z")
                #expect(inside.flatMap { $0.buckets ?? [] }.map(\.start) == ["2025-12-31T23:29:00Z"])
            }
        }
    }

    @Test("-0 is stored as 0, so that both stores answer it alike in readings, rollups and latest", arguments: StoreKind.allCases)
    func negativeZeroIsZero(kind: StoreKind) async throws {
        try await Self.with(kind) { store, device, reader, app in
            try await app.test(.router) { client in
                // Written by hand: the agent's encoder writes values at the sensor's resolution, which has no -0.
                let body = """
                    {"device": "d1", "sensors": [{"id": "tank1.ph", "quantity": "temperature", "resolution": "0.001"}],
                     "readings": [{"sensor": "tank1.ph", "seq": 1, "ts": "2025-12-31T23:00:00Z", "value": -0.0},
                                  {"sensor": "tank1.ph", "seq": 2, "ts": "2025-12-31T23:00:01Z", "value": -0}]}
                    """
                let posted = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(device), body: ByteBuffer(string: body))
                #expect(try decode(IngestReceipt.self, posted) == IngestReceipt(accepted: 2, duplicates: 0, rejected: []))
                for query in ["resolution=raw", "resolution=1m", "resolution=1h"] {
                    let response = try await client.execute(
                        uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?\(query)", method: .get, headers: bearer(reader))
                    let text = String(buffer: response.body)
                    #expect(!text.contains("-0"), "\(query): \(text)")
                    #expect(text.contains(":0"), "\(query): \(text)")
                }
                let latest = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(reader))
                let text = String(buffer: latest.body)
                #expect(!text.contains("-0") && text.contains("\"value\":0"), "\(text)")
            }
        }
    }

    @Test("auto never picks raw readings a run removed under a shorter `raw`, now raised", arguments: StoreKind.allCases)
    func autoAfterRawRetentionRaised(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let admin = IngestAdmin(store: store)
            _ = try await admin.createFarm(name: "f1")
            let device = try await admin.createDevice(farm: "f1", device: try deviceID("d1"))
            let reader = try await admin.createReadToken(farm: "f1", role: .viewer)
            let sensor = try sensorID("tank1.ph")
            // Three days before the clock, a reading every minute for six hours.
            let start = testNow.microseconds - 3 * 86_400_000_000
            let batch = Batch(
                device: try deviceID("d1"), sensors: [SensorDescriptor(id: sensor, quantity: .ph)],
                readings: (0..<360).map { Reading(sensor: sensor, sequence: UInt64($0 + 1), timestamp: Timestamp(microseconds: start + Int64($0) * 60_000_000), value: 6.5) })
            let farm = try #require(try await store.farm(named: "f1"))
            let identity = try #require(try await store.devices(farmID: farm.id).first)
            _ = try await store.store(batch, for: identity, receivedAt: testNow)
            // A run under raw = 1 day removes them; then raw is raised to 90 days.
            let retention = try #require(store as? any RetentionStore)
            _ = try await retention.runRetention(IngestConfiguration.Retention(raw: .seconds(86_400)), now: testNow, options: RetentionRunOptions())
            #expect(try await store.appliedRawCutoff() == IngestConfiguration.Retention.cutoff(.seconds(86_400), now: testNow))
            var configuration = IngestConfiguration()
            configuration.server.port = 0
            configuration.retention = IngestConfiguration.Retention(raw: .seconds(90 * 86_400))
            let app = buildApplication(configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: testLogger, now: { testNow })
            try await app.test(.router) { client in
                let from = RFC3339.format(Timestamp(microseconds: start))
                let to = RFC3339.format(Timestamp(microseconds: start + 6 * 3_600_000_000))
                let response = try await client.execute(
                    uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?resolution=auto&from=\(from)&to=\(to)", method: .get, headers: bearer(reader))
                let page = try decode(Page.self, response)
                #expect(page.resolution == "1m")
                #expect(page.buckets?.map(\.count).reduce(0, +) == 360)
            }
            _ = device
        }
    }
}
