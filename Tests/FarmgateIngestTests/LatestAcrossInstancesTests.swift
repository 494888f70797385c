import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import Prometheus
import ServiceLifecycle
import Synchronization
import Testing

@testable import FarmgateIngest

/// Two application instances on one PostgreSQL database, each with its own store pool, latest-value cache and listener,
/// as two `farmgate-ingest serve` processes would run: a batch acknowledged by A must be in B's `latest` within a bound
/// (the notification's delivery and one query), also after every connection was cut. Fails, never skips, without the
/// test cluster (`.ci/with-postgres`).
@Suite("Latest values across two instances on PostgreSQL (LISTEN/NOTIFY)", .serialized)
struct LatestAcrossInstancesTests {
    /// The most a commit acknowledged by A may take to show in B. Generous for a shared two-core machine; the delays
    /// measured are printed.
    static let bound: Duration = .seconds(2)

    struct Instance {
        let store: PostgresIngestStore
        let cache: LatestCache
        let listener: PostgresLatestListener
        let app: any ApplicationProtocol
    }

    func instance(_ settings: PostgresSettings) throws -> Instance {
        let store = try PostgresIngestStore(settings: settings, logger: testLogger)
        let cache = LatestCache(enabled: false)
        var configuration = IngestConfiguration()
        configuration.server.port = 0
        configuration.limits.readRequestsPerSecond = 100_000
        configuration.limits.readBurst = 100_000
        configuration.limits.requestsPerSecond = 100_000
        configuration.limits.burst = 100_000
        let app = buildApplication(configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: testLogger, latest: cache)
        return Instance(store: store, cache: cache, listener: PostgresLatestListener(settings: settings, cache: cache, logger: testLogger), app: app)
    }

    typealias TwoInstancesBody = @Sendable (Instance, Instance, any TestClientProtocol, any TestClientProtocol, APIKey, APIKey, PostgresSettings)
        async throws -> Void

    /// Runs both instances' stores and listeners on a fresh test database while `body` uses their apps' routers.
    func withTwoInstances(_ body: @escaping TwoInstancesBody) async throws {
        try await withTestDatabase { settings in try await withTwoInstances(on: settings, body) }
    }

    /// Runs both instances on `settings` (farm `f1`, device `d1`, a viewer token) while `body` uses their apps' routers.
    func withTwoInstances(on settings: PostgresSettings, _ body: @escaping TwoInstancesBody) async throws {
        let a = try instance(settings)
        let b = try instance(settings)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for part in [a.store, b.store] as [any Service] + [a.listener, b.listener] { group.addTask { try await part.run() } }
            defer { group.cancelAll() }
            try await a.store.migrate()
            let admin = IngestAdmin(store: a.store)
            _ = try await admin.createFarm(name: "f1")
            let key = try await admin.createDevice(farm: "f1", device: try deviceID("d1"))
            let token = try await admin.createReadToken(farm: "f1", role: .viewer)
            #expect(await eventuallyOn { a.cache.isEnabled && b.cache.isEnabled }, "the listeners never listened")
            try await a.app.test(.router) { clientA in
                try await b.app.test(.router) { clientB in
                    try await body(a, b, clientA, clientB, key, token, settings)
                }
            }
        }
    }

    static func latestSequence(_ client: any TestClientProtocol, token: APIKey) async throws -> UInt64? {
        let response = try await client.execute(uri: "/v1/farms/f1/latest?device=d1", method: .get, headers: bearer(token))
        guard response.status == .ok else { return nil }
        return try decode(LatestReadTests.Page.self, response).sensors.first?.sequence
    }

    static func post(_ client: any TestClientProtocol, sequence: UInt64, key: APIKey) async throws -> Int {
        let batch = try phBatch(sequences: sequence...sequence, value: 6.5, start: Timestamp(microseconds: Timestamp.now().microseconds - 600_000_000))
        let response = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(key), body: buffer(BatchJSON.encode(batch)))
        guard response.status == .ok else { return 0 }
        return try decode(IngestReceipt.self, response).accepted
    }

    @Test("a batch acknowledged by A is in B's latest within the bound, and B never goes back")
    func writeThroughAReadThroughB() async throws {
        try await withTwoInstances { _, _, clientA, clientB, key, token, _ in
            // B fills its cache first (nothing stored yet), so that what follows must come through the notification.
            #expect(try await Self.latestSequence(clientB, token: token) == nil)
            var delays: [Duration] = []
            var lastSeen: UInt64 = 0
            for sequence in UInt64(1)...20 {
                #expect(try await Self.post(clientA, sequence: sequence, key: key) == 1)
                let acknowledged = ContinuousClock.now
                var seen: UInt64?
                while acknowledged.duration(to: .now) < Self.bound {
                    seen = try await Self.latestSequence(clientB, token: token)
                    #expect((seen ?? 0) >= lastSeen, "B went back from \(lastSeen) to \(seen ?? 0)")
                    lastSeen = max(lastSeen, seen ?? 0)
                    if seen == sequence { break }
                    try await Task.sleep(for: .milliseconds(1))
                }
                delays.append(acknowledged.duration(to: .now))
                #expect(seen == sequence, "B still served \(String(describing: seen)) \(Self.bound) after A acknowledged \(sequence)")
            }
            let sorted = delays.sorted()
            print("latest across instances: acknowledged by A to visible in B: median \(sorted[sorted.count / 2]), max \(sorted.last ?? .zero)")
        }
    }

    @Test("after every connection to the database was cut, B reconnects its listener and stays current")
    func lostListenConnection() async throws {
        try await withTwoInstances { _, b, clientA, clientB, key, token, settings in
            #expect(try await Self.post(clientA, sequence: 1, key: key) == 1)
            #expect(await eventuallyOn { (try? await Self.latestSequence(clientB, token: token)) == 1 })
            // Every backend of the database goes: both pools and both listeners (what a restart or a network cut does).
            var admin = settings
            admin.database = "postgres"
            try await adminQuery(
                admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '\(settings.database ?? "")' AND pid <> pg_backend_pid()")
            // Until it listens again B reads the store; either way it must show what A acknowledges.
            var sequence: UInt64 = 2
            var accepted = false
            for _ in 0..<50 where !accepted {
                accepted = try await Self.post(clientA, sequence: sequence, key: key) == 1
                if !accepted { try await Task.sleep(for: .milliseconds(100)) }
            }
            #expect(accepted, "A never took a batch again")
            let acknowledged = ContinuousClock.now
            let seen = await eventuallyOn(timeout: Self.bound) { (try? await Self.latestSequence(clientB, token: token)) == sequence }
            #expect(seen, "B did not show sequence \(sequence) within \(Self.bound) of its acknowledgement")
            print("latest across instances after the cut: visible in B after \(acknowledged.duration(to: .now))")
            // The listener is back: B serves from memory again, and still follows A.
            #expect(await eventuallyOn(timeout: .seconds(10)) { b.cache.isEnabled }, "B's listener did not reconnect")
            sequence = 3
            #expect(try await Self.post(clientA, sequence: sequence, key: key) == 1)
            #expect(await eventuallyOn(timeout: Self.bound) { (try? await Self.latestSequence(clientB, token: token)) == sequence })
        }
    }
}

/// Polls `condition` every 5 ms until it holds or `timeout` passes.
func eventuallyOn(timeout: Duration = .seconds(10), _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(5))
    }
    return try await condition()
}
