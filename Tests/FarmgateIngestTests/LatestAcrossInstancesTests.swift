import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import Metrics
import Prometheus
import ServiceLifecycle
import Synchronization
import FarmgateTestSupport
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

    /// - Parameters:
    ///   - listenerLogger: where the listener logs (and its connection's pool).
    ///   - metrics: where the listener's counters go.
    func instance(
        _ settings: PostgresSettings, listenerLogger: Logger = testLogger, metrics: any MetricsFactory = MetricsSystem.factory
    ) throws -> Instance {
        let store = try PostgresIngestStore(settings: settings, logger: testLogger)
        let cache = LatestCache(enabled: false)
        var configuration = IngestConfiguration()
        configuration.server.port = 0
        configuration.limits.readRequestsPerSecond = 100_000
        configuration.limits.readBurst = 100_000
        configuration.limits.requestsPerSecond = 100_000
        configuration.limits.burst = 100_000
        let app = buildApplication(configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: testLogger, latest: cache)
        let listener = PostgresLatestListener(settings: settings, cache: cache, logger: listenerLogger, metrics: metrics)
        return Instance(store: store, cache: cache, listener: listener, app: app)
    }

    typealias TwoInstancesBody = @Sendable (Instance, Instance, any TestClientProtocol, any TestClientProtocol, APIKey, APIKey, PostgresSettings)
        async throws -> Void

    /// Runs both instances' stores and listeners on a fresh test database while `body` uses their apps' routers.
    func withTwoInstances(_ body: @escaping TwoInstancesBody) async throws {
        try await withTestDatabase { settings in try await withTwoInstances(on: settings, body) }
    }

    /// Runs both instances on `settings` (farm `f1`, device `d1`, a viewer token) while `body` uses their apps' routers.
    /// `b`, when given, is the second instance (made with ``instance(_:listenerLogger:metrics:)``), else one on `settings`.
    func withTwoInstances(on settings: PostgresSettings, b: Instance? = nil, _ body: @escaping TwoInstancesBody) async throws {
        let a = try instance(settings)
        let b = try b ?? instance(settings)
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

extension LatestAcrossInstancesTests {
    /// The most a silent LISTEN connection may leave B serving a value A has replaced: the listener's liveness probe
    /// (``PostgresLatestListener/Liveness/standard``, 5 s + 5 s) plus room for a loaded two-core machine.
    static let silentBound: Duration = .seconds(20)

    /// A `listen_url` that can never connect (a wrong password or database there) used to wait inside postgres-nio's pool
    /// without a word: nothing logged, nothing counted, `latest` read from the store for ever unnoticed.
    @Test("a listen_url that cannot connect is logged as a warning with the server's reason and counted at every attempt")
    func listenURLThatCannotConnect() async throws {
        try await withTestDatabase { settings in
            var wrong = settings
            wrong.database = "no_such_database_here"
            var listening = settings
            listening.listen = wrong
            let registry = PrometheusCollectorRegistry()
            let log = RecordedLog()
            let cache = LatestCache(enabled: false)
            let listener = PostgresLatestListener(
                settings: listening, cache: cache, logger: log.logger(label: "listener"), metrics: PrometheusMetricsFactory(registry: registry))
            let task = Task { try await listener.run() }
            defer { task.cancel() }
            let reconnects = "farmgate_ingest_latest_listener_reconnects_total"
            #expect(await eventuallyOn { (metric(registry, reconnects) ?? 0) >= 3 }, "attempts were not counted")
            let warnings = log.entries.filter { $0.level == .warning && $0.message.contains("cannot open the connection that hears") }
            #expect(warnings.count == 1, "one warning for the failures in a row: \(log.entries.map(\.message))")
            #expect(warnings.first.map { "\($0.metadata["error"] ?? "")" }?.contains("3D000") == true, "\(String(describing: warnings.first?.metadata))")
            #expect(!cache.isEnabled)
        }
    }

    @Test("B's LISTEN connection goes silent without closing: within the bound B stops serving from memory, counts it once, and listens again once it is back")
    func silentListenConnection() async throws {
        try await withTestDatabase { settings in
            guard case .unixSocket(let socket) = settings.endpoint else { throw MissingTestDatabase() }
            // B's listener reaches PostgreSQL through a proxy the test freezes; everything else goes straight to it.
            let scratch = try Scratch(prefix: "fg-listen", in: URL(fileURLWithPath: "/tmp"))
            let proxy = try await FreezableProxy(listeningAt: scratch.file(".s.PGSQL.5432"), forwardingTo: socket)
            var proxied = settings
            proxied.endpoint = .unixSocket(path: proxy.path)
            var settingsB = settings
            settingsB.listen = proxied
            let registry = PrometheusCollectorRegistry()
            let log = RecordedLog()
            var listenerLogger = log.logger(label: "listener-b")
            listenerLogger.logLevel = .info
            let b = try instance(settingsB, listenerLogger: listenerLogger, metrics: PrometheusMetricsFactory(registry: registry))
            let reconnects = "farmgate_ingest_latest_listener_reconnects_total"
            let probeTimeouts = "farmgate_ingest_latest_listener_probe_timeouts_total"
            let lost = "lost the connection that hears other instances' commits"
            do {
                try await withTwoInstances(on: settings, b: b) { _, b, clientA, clientB, key, token, _ in
                    #expect(proxy.accepted >= 1, "B's listener did not connect through the proxy")
                    #expect(try await Self.post(clientA, sequence: 1, key: key) == 1)
                    #expect(await eventuallyOn { (try? await Self.latestSequence(clientB, token: token)) == 1 })
                    #expect(b.cache.isEnabled)
                    // Let a probe or two pass first: the ones answered must not count.
                    try await Task.sleep(for: .seconds(6))
                    #expect((metric(registry, reconnects) ?? 0) == 0 && (metric(registry, probeTimeouts) ?? 0) == 0)

                    await proxy.freeze()
                    let frozen = ContinuousClock.now
                    #expect(try await Self.post(clientA, sequence: 2, key: key) == 1)
                    // The notification cannot pass: B still answers 1 from memory, the freeze holds.
                    #expect(try await Self.latestSequence(clientB, token: token) == 1, "the frozen proxy let the notification through")
                    var seen: UInt64?
                    while frozen.duration(to: .now) < Self.silentBound {
                        seen = try await Self.latestSequence(clientB, token: token)
                        if seen == 2 { break }
                        try await Task.sleep(for: .milliseconds(20))
                    }
                    let stale = frozen.duration(to: .now)
                    #expect(seen == 2, "B still served sequence \(String(describing: seen)) \(Self.silentBound) after its LISTEN connection went silent")
                    print("silent LISTEN connection: B served A's new value \(stale) after the freeze")
                    // Not current while the listener cannot hear: B reads the store, and says why once.
                    #expect(!b.cache.isEnabled, "B's cache is on while its listener's connection is silent")
                    // Counted and logged as the listener gives the connection up, right after it turned the cache off.
                    #expect(await eventuallyOn(timeout: .seconds(5)) { (metric(registry, reconnects) ?? 0) >= 1 }, "the reconnect was not counted")
                    #expect(metric(registry, probeTimeouts) == 1)
                    let silent = {
                        log.entries.filter { $0.level == .warning && $0.message.hasPrefix(lost) && "\($0.metadata["error"] ?? "")".contains("liveness probe") }
                    }
                    #expect(await eventuallyOn(timeout: .seconds(5)) { !silent().isEmpty })
                    #expect(silent().count == 1, "\(log.entries.filter { $0.level >= .warning }.map { "\($0.message) \($0.metadata)" })")

                    // The path comes back: B listens again (a new connection) and follows A from memory.
                    let accepted = proxy.accepted
                    await proxy.thaw()
                    #expect(await eventuallyOn(timeout: .seconds(30)) { b.cache.isEnabled }, "B's listener did not listen again after the thaw")
                    #expect(proxy.accepted > accepted)
                    #expect(try await Self.post(clientA, sequence: 3, key: key) == 1)
                    #expect(await eventuallyOn(timeout: Self.bound) { (try? await Self.latestSequence(clientB, token: token)) == 3 })
                    #expect(b.cache.isEnabled)
                }
            } catch {
                await proxy.thaw()
                await proxy.stop()
                throw error
            }
            await proxy.stop()
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
