import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Synchronization
import Testing

@testable import FarmgateIngest

/// `GET /v1/farms/{farm}/latest` with its filters and pages, and the ``LatestCache`` behind it: filled from the store,
/// kept current by this instance's commits, never serving a device marked stale.
@Suite("Latest values: filters, pages and the in-memory cache")
struct LatestReadTests {
    struct Page: Decodable {
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
        var next: String?
    }

    /// d1: tank1.ph, tank1.ec, tank2.ph, tank2.temp (sequences 1...4); d2: tank1.ph (sequence 1).
    func seed(_ fixture: Fixture) async throws {
        let d1 = try await fixture.identity(device: "d1")
        let d2 = try await fixture.identity(device: "d2")
        let sensors: [(String, Quantity)] = [("tank1.ph", .ph), ("tank1.ec", .electricalConductivity), ("tank2.ph", .ph), ("tank2.temp", .temperature)]
        let start = testNow.microseconds - 60_000_000
        let batch = Batch(
            device: d1.device, sensors: try sensors.map { SensorDescriptor(id: try sensorID($0.0), quantity: $0.1) },
            readings: try sensors.enumerated().map { index, sensor in
                Reading(sensor: try sensorID(sensor.0), sequence: UInt64(index + 1), timestamp: Timestamp(microseconds: start + Int64(index) * 1_000_000), value: 6.5)
            })
        _ = try await fixture.store.store(batch, for: d1, receivedAt: testNow)
        _ = try await fixture.store.store(try phBatch(device: "d2", sequences: 1...1), for: d2, receivedAt: testNow)
    }

    func get(_ client: some TestClientProtocol, _ fixture: Fixture, _ query: String) async throws -> TestResponse {
        try await client.execute(uri: "/v1/farms/f1/latest" + query, method: .get, headers: bearer(fixture.readToken))
    }

    @Test("device, sensor glob and quantity select what the answer holds")
    func filters() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await seed(fixture)
        try await fixture.app(cacheTTL: .seconds(60)).test(.live) { client in
            func names(_ query: String) async throws -> [String] {
                let response = try await get(client, fixture, query)
                #expect(response.status == .ok, "\(query)")
                return try decode(Page.self, response).sensors.map { "\($0.device)/\($0.sensor)" }
            }
            #expect(try await names("") == ["d1/tank1.ec", "d1/tank1.ph", "d1/tank2.ph", "d1/tank2.temp", "d2/tank1.ph"])
            #expect(try await names("?device=d1") == ["d1/tank1.ec", "d1/tank1.ph", "d1/tank2.ph", "d1/tank2.temp"])
            #expect(try await names("?device=d2") == ["d2/tank1.ph"])
            #expect(try await names("?device=nobody").isEmpty)
            #expect(try await names("?sensor=tank1.*") == ["d1/tank1.ec", "d1/tank1.ph", "d2/tank1.ph"])
            #expect(try await names("?sensor=*.ph&device=d1") == ["d1/tank1.ph", "d1/tank2.ph"])
            #expect(try await names("?sensor=tank?.t*") == ["d1/tank2.temp"])
            #expect(try await names("?quantity=ph") == ["d1/tank1.ph", "d1/tank2.ph", "d2/tank1.ph"])
            #expect(try await names("?quantity=temperature&sensor=tank2.*") == ["d1/tank2.temp"])

            let page = try decode(Page.self, try await get(client, fixture, "?device=d1&sensor=tank1.ec"))
            #expect(page.farm == "f1")
            #expect(page.next == nil)
            #expect(page.sensors == [.init(device: "d1", sensor: "tank1.ec", quantity: "ec", unit: "µS/cm", sequence: 2, timestamp: "2025-12-31T23:59:01Z", value: 6.5, flags: [])])

            try expectError(try await get(client, fixture, "?device=no%20spaces"), .badRequest, "invalid_parameter")
            try expectError(try await get(client, fixture, "?sensor=tank1/ph"), .badRequest, "invalid_parameter")
            try expectError(try await get(client, fixture, "?quantity=acidity"), .badRequest, "invalid_parameter")
            try expectError(try await get(client, fixture, "?limit=0"), .badRequest, "invalid_parameter")
            try expectError(try await get(client, fixture, "?limit=10001"), .badRequest, "invalid_parameter")
            try expectError(try await get(client, fixture, "?cursor=not-a-cursor"), .badRequest, "invalid_parameter")
            // Unknown and repeated parameters: refused, naming them, not ignored or taken first-wins.
            #expect(try expectError(try await get(client, fixture, "?devcie=d1"), .badRequest, "invalid_parameter").contains("'devcie'"))
            #expect(try expectError(try await get(client, fixture, "?limit=1&limit=2"), .badRequest, "invalid_parameter").contains("'limit'"))
            #expect(try expectError(try await get(client, fixture, "?device=d1&device=d2"), .badRequest, "invalid_parameter").contains("'device'"))
        }
    }

    @Test("pages of `limit` sensors follow `next` through the whole farm, each sensor once", arguments: [1, 2, 3, 5, 1000])
    func pages(limit: Int) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await seed(fixture)
        try await fixture.app(cacheTTL: .seconds(60)).test(.live) { client in
            var seen: [String] = []
            var cursor: String?
            var pages = 0
            repeat {
                let response = try await get(client, fixture, "?limit=\(limit)" + (cursor.map { "&cursor=\($0)" } ?? ""))
                #expect(response.status == .ok)
                let page = try decode(Page.self, response)
                #expect(page.sensors.count <= limit)
                seen += page.sensors.map { "\($0.device)/\($0.sensor)" }
                cursor = page.next
                pages += 1
            } while cursor != nil && pages < 20
            #expect(seen == ["d1/tank1.ec", "d1/tank1.ph", "d1/tank2.ph", "d1/tank2.temp", "d2/tank1.ph"])
            #expect(pages == (5 + limit - 1) / limit)
        }
    }

    @Test("an upload through this instance is in the next answer (the cache follows the commit feed)")
    func followsCommits() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await seed(fixture)
        try await fixture.app(cacheTTL: .seconds(60)).test(.live) { client in
            let before = try decode(Page.self, try await get(client, fixture, "?device=d2"))
            #expect(before.sensors.map(\.sequence) == [1])
            for round in 2...5 {
                let receipt = try decode(
                    IngestReceipt.self, try await postJSON(client, try phBatch(device: "d2", sequences: UInt64(round)...UInt64(round), value: Double(round)), key: fixture.secondDeviceKey))
                #expect(receipt.accepted == 1)
                let after = try decode(Page.self, try await get(client, fixture, "?device=d2"))
                #expect(after.sensors.map(\.sequence) == [UInt64(round)])
                #expect(after.sensors.map(\.value) == [Double(round)])
                // The farm-wide answer agrees.
                let farm = try decode(Page.self, try await get(client, fixture, "?sensor=tank1.ph"))
                #expect(farm.sensors.first { $0.device == "d2" }?.sequence == UInt64(round))
            }
            // An older backlog arriving later never moves latest backwards.
            let old = try phBatch(device: "d2", sequences: 100...101, start: Timestamp(microseconds: testNow.microseconds - 86_400_000_000))
            #expect(try decode(IngestReceipt.self, try await postJSON(client, old, key: fixture.secondDeviceKey)).accepted == 2)
            #expect(try decode(Page.self, try await get(client, fixture, "?device=d2")).sensors.map(\.sequence) == [5])
        }
    }

    // MARK: The cache alone

    static let farm = FarmRecord(id: 1, name: "f1")

    func reading(_ device: String, _ sensor: String, sequence: UInt64, seconds: Int64) throws -> LatestReading {
        LatestReading(
            device: try deviceID(device), sensor: try sensorID(sensor), quantity: .ph, sequence: sequence,
            timestamp: Timestamp(microseconds: testNow.microseconds + seconds * 1_000_000), value: Double(sequence), quality: [])
    }

    func sequences(_ body: ByteBuffer) throws -> [UInt64] {
        try JSONDecoder().decode(Page.self, from: Data(body.readableBytesView)).sensors.map(\.sequence)
    }

    @Test("a commit that lands while the farm is being filled is kept, whatever the fill read")
    func commitDuringFill() async throws {
        let cache = LatestCache()
        let gate = AsyncStream<Void>.makeStream()
        let loads = Mutex(0)
        let old = try reading("d1", "tank1.ph", sequence: 1, seconds: 0)
        let page = Task {
            try await cache.page(farm: Self.farm, selection: LatestSelection()) {
                loads.withLock { $0 += 1 }
                for await _ in gate.stream { break }
                return [old]
            }
        }
        #expect(await eventuallyTrue { loads.withLock { $0 } == 1 })
        // The fill read the store before this commit; the commit reaches the cache while the fill is in flight.
        let identity = DeviceIdentity(farmID: 1, farm: "f1", rowID: 1, device: try deviceID("d1"))
        cache.committed(
            CommittedBatch(
                device: identity, receivedAt: testNow,
                readings: [CommittedReading(sensorRowID: 7, sensor: try sensorID("tank1.ph"), quantity: .ph, sequence: 2, timestamp: Timestamp(microseconds: testNow.microseconds + 1_000_000), value: 2, quality: [])]))
        gate.continuation.yield()
        #expect(try sequences(try await page.value) == [2])
        #expect(try sequences(try await cache.page(farm: Self.farm, selection: LatestSelection()) { [] }) == [2])
        #expect(loads.withLock { $0 } == 1, "the second read must come from memory")
    }

    @Test("a device marked stale is not served from memory until it is refreshed; a reader that waits too long reloads")
    func staleDevices() async throws {
        let cache = LatestCache(staleWait: .seconds(30))
        let stored = Mutex([try reading("d1", "tank1.ph", sequence: 1, seconds: 0)])
        let load: @Sendable () async throws -> [LatestReading] = { stored.withLock { $0 } }
        #expect(try sequences(try await cache.page(farm: Self.farm, selection: LatestSelection(), load: load)) == [1])

        // Another instance commits sequence 2 and notifies.
        let newer = try reading("d1", "tank1.ph", sequence: 2, seconds: 1)
        stored.withLock { $0 = [newer] }
        let token = try #require(cache.markStale(farmID: 1, device: try deviceID("d1")))
        let waiting = Task { try await cache.page(farm: Self.farm, selection: LatestSelection(device: try deviceID("d1")), load: load) }
        try await Task.sleep(for: .milliseconds(50))
        cache.refreshed(farmID: 1, device: try deviceID("d1"), readings: [newer], token: token)
        #expect(try sequences(try await waiting.value) == [2])

        // A stale mark nobody refreshes: after staleWait the reader reads the store itself.
        let impatient = LatestCache(staleWait: .milliseconds(20))
        _ = try await impatient.page(farm: Self.farm, selection: LatestSelection(), load: load)
        let newest = try reading("d1", "tank1.ph", sequence: 3, seconds: 2)
        stored.withLock { $0 = [newest] }
        #expect(impatient.markStale(farmID: 1, device: try deviceID("d1")) != nil)
        #expect(try sequences(try await impatient.page(farm: Self.farm, selection: LatestSelection(), load: load)) == [3])
    }

    @Test("a device first heard of through another instance's notification is listed in farm-wide pages once refreshed")
    func newDeviceFromAnotherInstance() async throws {
        let cache = LatestCache(staleWait: .seconds(30))
        let load: @Sendable () async throws -> [LatestReading] = { [try reading("d1", "tank1.ph", sequence: 1, seconds: 0)] }
        // The farm-wide page is served once: the cache keeps its device order.
        #expect(try sequences(try await cache.page(farm: Self.farm, selection: LatestSelection(), load: load)) == [1])
        // Another instance commits the first readings of d2.
        let first = try reading("d2", "tank1.ph", sequence: 5, seconds: 1)
        let token = try #require(cache.markStale(farmID: 1, device: try deviceID("d2")))
        cache.refreshed(farmID: 1, device: try deviceID("d2"), readings: [first], token: token)
        #expect(try sequences(try await cache.page(farm: Self.farm, selection: LatestSelection(device: try deviceID("d2")), load: load)) == [5])
        #expect(try sequences(try await cache.page(farm: Self.farm, selection: LatestSelection(), load: load)) == [1, 5])
    }

    @Test("turned off (the listener lost its connection) every read goes to the store, and nothing is kept")
    func disabled() async throws {
        let cache = LatestCache()
        let loads = Mutex(0)
        let load: @Sendable () async throws -> [LatestReading] = {
            loads.withLock { $0 += 1 }
            return [try reading("d1", "tank1.ph", sequence: 1, seconds: 0)]
        }
        _ = try await cache.page(farm: Self.farm, selection: LatestSelection(), load: load)
        _ = try await cache.page(farm: Self.farm, selection: LatestSelection(), load: load)
        #expect(loads.withLock { $0 } == 1)
        cache.invalidateAll()
        #expect(cache.markStale(farmID: 1, device: try deviceID("d1")) == nil)
        _ = try await cache.page(farm: Self.farm, selection: LatestSelection(), load: load)
        _ = try await cache.page(farm: Self.farm, selection: LatestSelection(), load: load)
        #expect(loads.withLock { $0 } == 3)
        cache.enable()
        _ = try await cache.page(farm: Self.farm, selection: LatestSelection(), load: load)
        _ = try await cache.page(farm: Self.farm, selection: LatestSelection(), load: load)
        #expect(loads.withLock { $0 } == 4)
    }

    @Test("a failed fill is not kept: the next read tries the store again")
    func failedFill() async throws {
        struct Down: Error {}
        let cache = LatestCache()
        await #expect(throws: Down.self) { try await cache.page(farm: Self.farm, selection: LatestSelection()) { throw Down() } }
        let answer = try await cache.page(farm: Self.farm, selection: LatestSelection()) { [try reading("d1", "tank1.ph", sequence: 4, seconds: 0)] }
        #expect(try sequences(answer) == [4])
    }

    @Test("globs", arguments: [
        ("tank1.*", "tank1.ph", true), ("tank1.*", "tank2.ph", false), ("*.ph", "tank1.ph", true), ("*", "x", true),
        ("t?nk*", "tank9.ec", true), ("tank1.ph", "tank1.ph", true), ("tank1.ph", "tank1.phx", false), ("*a*b", "xaxxb", true), ("*a*b", "xaxxbc", false),
    ])
    func glob(pattern: String, text: String, expected: Bool) {
        #expect(Glob.matches(pattern, text) == expected)
    }

    @Test("a cursor survives its text form and refuses what it did not write")
    func cursor() throws {
        let cursor = LatestCursor(device: try deviceID("greenhouse-2"), sensor: try sensorID("tank1.ph"))
        #expect(LatestCursor(text: cursor.text) == cursor)
        #expect(!cursor.text.contains("="))
        #expect(LatestCursor(text: "") == nil)
        #expect(LatestCursor(text: "MiBhIGI") == nil)
        // Edited by hand: cut short, lengthened, one character changed, or the old unchecked form: refused, never read
        // as another position (a tester, 2026-12-07).
        let text = cursor.text
        for index in text.indices {
            var changed = text
            let replacement: Character = text[index] == "A" ? "B" : "A"
            changed.replaceSubrange(index...index, with: [replacement])
            #expect(LatestCursor(text: changed) == nil, "\(changed)")
        }
        for cut in 1...6 { #expect(LatestCursor(text: String(text.dropLast(cut))) == nil, "cut \(cut)") }
        #expect(LatestCursor(text: text + "A") == nil && LatestCursor(text: text + "Lg") == nil)
        let unchecked = Data("1 greenhouse-2 tank1.ph".utf8).base64EncodedString().replacingOccurrences(of: "=", with: "")
        #expect(LatestCursor(text: unchecked) == nil)
    }
}

/// Polls briefly for `condition`.
func eventuallyTrue(_ condition: @Sendable () -> Bool) async -> Bool {
    for _ in 0..<500 {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(2))
    }
    return condition()
}
