import FarmgateWire
import Foundation
import HummingbirdTesting
import Logging
import ServiceLifecycle
import Testing

@testable import FarmgateIngest

/// The PostgreSQL store behind a real PgBouncer in transaction mode (``TestPgBouncer``), as README's deployment text
/// describes it: the pool (`url`) through PgBouncer, the listener (`listen_url`) straight to PostgreSQL. Migrations of
/// several instances at once (transaction-level advisory locks), uploads of two instances stored exactly once, retention,
/// and the latest values of two instances consistent. Fails, never skips, without the test cluster or PgBouncer.
@Suite("PostgreSQL behind PgBouncer in transaction mode", .serialized)
struct PgBouncerTests {
    /// PgBouncer in front of a fresh test database: `direct` reaches the database itself, `through` its PgBouncer, with
    /// `listen_url` set to `direct`.
    static func withBouncedDatabase(
        _ body: @Sendable (_ bouncer: TestPgBouncer, _ direct: PostgresSettings, _ through: PostgresSettings) async throws -> Void
    ) async throws {
        try await TestPgBouncer.with { bouncer in
            let mode = try await bouncer.admin("SHOW CONFIG").first { $0.first == "pool_mode" }
            #expect(mode?.dropFirst().first == "transaction", "PgBouncer is not in transaction mode: \(String(describing: mode))")
            try await withTestDatabase { direct in
                var through = bouncer.settings(for: direct)
                through.listen = direct
                try await body(bouncer, direct, through)
            }
        }
    }

    @Test("three instances migrating at once through PgBouncer apply every migration exactly once")
    func migrationsThroughPgBouncer() async throws {
        try await Self.withBouncedDatabase { bouncer, direct, through in
            let stores = try (0..<3).map { _ in try PostgresIngestStore(settings: through, logger: testLogger) }
            let applied = try await withThrowingTaskGroup(of: [AppliedMigration].self) { group in
                for store in stores as [any Service] { group.addTask { try await store.run(); return [] } }
                defer { group.cancelAll() }
                return try await withThrowingTaskGroup(of: [AppliedMigration].self) { migrations in
                    for store in stores { migrations.addTask { try await store.migrate() } }
                    return try await migrations.reduce(into: []) { $0.append($1) }
                }
            }
            #expect(applied.map(\.count).sorted() == [0, 0, PostgresSchema.migrations.count], "each migration must be applied by one instance")
            #expect(try await PostgresStoreTests.count(direct, "SELECT count(*)::int8 FROM schema_migrations") == PostgresSchema.migrations.count)
            #expect(try await PostgresStoreTests.count(direct, "SELECT max(version)::int8 FROM schema_migrations") == PostgresSchema.currentVersion)
            let stats = try await bouncer.stats(of: direct.database ?? "")
            #expect((stats["total_xact_count"] ?? 0) >= 3, "the migrations did not go through PgBouncer: \(stats)")
        }
    }

    @Test("two instances through PgBouncer store every reading exactly once, sent by both, and retention runs")
    func exactlyOnceThroughPgBouncer() async throws {
        try await Self.withBouncedDatabase { bouncer, direct, through in
            let a = try PostgresIngestStore(settings: through, logger: testLogger)
            let b = try PostgresIngestStore(settings: through, logger: testLogger)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for store in [a, b] as [any Service] { group.addTask { try await store.run() } }
                defer { group.cancelAll() }
                try await a.migrate()
                try await a.createPartitions(now: testNow)
                _ = try await a.createFarm(name: "f1", createdAt: testNow)
                var devices: [DeviceIdentity] = []
                for index in 0..<6 {
                    devices.append(try await a.createDevice(farm: "f1", device: try deviceID("g\(index)"), keyID: "kg\(index)", secretHash: [1], createdAt: testNow))
                }
                let before = try await bouncer.stats(of: direct.database ?? "")
                // Every batch of every device is sent by both instances at once, and the second half of them again.
                let tallies = try await withThrowingTaskGroup(of: (Int, Tally).self) { senders in
                    for (index, device) in devices.enumerated() {
                        for start in stride(from: UInt64(1), through: 251, by: 50) {
                            for (store, times) in [(a, 1), (b, start > 125 ? 2 : 1)] {
                                senders.addTask {
                                    var tally = Tally(accepted: 0, duplicates: 0, rejected: 0)
                                    for _ in 0..<times {
                                        let batch = try phBatch(device: device.device.rawValue, sequences: start...(start + 49), value: 6.5)
                                        let outcome = try await store.store(batch, for: device, receivedAt: testNow)
                                        tally.accepted += outcome.tally.accepted
                                        tally.duplicates += outcome.tally.duplicates
                                        tally.rejected += outcome.tally.rejected
                                    }
                                    return (index, tally)
                                }
                            }
                        }
                    }
                    var tallies: [Int: Tally] = [:]
                    for try await (index, tally) in senders {
                        var sum = tallies[index] ?? Tally(accepted: 0, duplicates: 0, rejected: 0)
                        sum.accepted += tally.accepted
                        sum.duplicates += tally.duplicates
                        sum.rejected += tally.rejected
                        tallies[index] = sum
                    }
                    return tallies
                }
                for (index, device) in devices.enumerated() {
                    // 6 batches of 50 by A, the same by B, the 3 later ones twice by B: 300 stored, 450 duplicates.
                    #expect(tallies[index] == Tally(accepted: 300, duplicates: 450, rejected: 0), "device \(index)")
                    #expect(try await b.highestSequence(device: device) == 300)
                    #expect(try await b.exportPage(device: device, afterSequence: nil, limit: 1_000).map(\.sequence) == Array(1...300))
                }
                #expect(try await PostgresStoreTests.count(direct, "SELECT count(*)::int8 FROM reading_rows") == 1_800)
                let after = try await bouncer.stats(of: direct.database ?? "")
                #expect((after["total_xact_count"] ?? 0) > (before["total_xact_count"] ?? 0), "the uploads did not go through PgBouncer")
                // Retention through PgBouncer, 100 days on: the try-lock and the partition drops, all transaction-local.
                let later = Timestamp(microseconds: testNow.microseconds + 100 * 86_400_000_000)
                let report = try await a.runRetention(IngestConfiguration.Retention(), now: later, options: RetentionRunOptions())
                #expect(report.skipped == nil && !report.partitionsDropped.isEmpty)
                #expect(try await PostgresStoreTests.count(direct, "SELECT count(*)::int8 FROM reading_rows") == 0)
                // Gone from the table, still duplicates.
                let again = try await b.store(try phBatch(device: devices[0].device.rawValue, sequences: 1...50), for: devices[0], receivedAt: later)
                #expect(again.tally == Tally(accepted: 0, duplicates: 50, rejected: 0))
            }
        }
    }

    @Test("writes through PgBouncer, LISTEN straight to PostgreSQL: B's latest follows A's acknowledgements")
    func latestAcrossInstancesThroughPgBouncer() async throws {
        try await Self.withBouncedDatabase { bouncer, direct, through in
            try await LatestAcrossInstancesTests().withTwoInstances(on: through) { _, b, clientA, clientB, key, token, _ in
                // The listeners are PostgreSQL's own sessions: two LISTENing backends, none of them PgBouncer's.
                let listening = "SELECT count(*)::int8 FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                #expect(try await PostgresStoreTests.count(direct, listening) == 2)
                try await Self.follow(clientA, clientB, key: key, token: token)
                #expect(b.cache.isEnabled, "B's cache was turned off: its listener lost its connection")
            }
            let stats = try await bouncer.stats(of: direct.database ?? "")
            #expect((stats["total_xact_count"] ?? 0) >= 10, "the uploads did not go through PgBouncer: \(stats)")
        }
    }

    /// Posts sequences 1…10 through A; each must show in B's `latest` within the bound.
    static func follow(_ clientA: any TestClientProtocol, _ clientB: any TestClientProtocol, key: APIKey, token: APIKey) async throws {
        let before = try await LatestAcrossInstancesTests.latestSequence(clientB, token: token)
        #expect(before == nil)
        for sequence in UInt64(1)...10 {
            let accepted = try await LatestAcrossInstancesTests.post(clientA, sequence: sequence, key: key)
            #expect(accepted == 1)
            let seen = await eventuallyOn(timeout: LatestAcrossInstancesTests.bound) {
                (try? await LatestAcrossInstancesTests.latestSequence(clientB, token: token)) == sequence
            }
            #expect(seen, "B did not show sequence \(sequence) within \(LatestAcrossInstancesTests.bound) of A's acknowledgement")
        }
    }

    @Test("the listener connects to listen_url, not to url")
    func listenerUsesListenURL() async throws {
        try await withTestDatabase { direct in
            var nowhere = direct
            nowhere.endpoint = .unixSocket(path: "/nonexistent/.s.PGSQL.5432")
            nowhere.connectTimeout = .seconds(1)
            for (settings, listens) in [({ var s = nowhere; s.listen = direct; return s }(), true), ({ var s = direct; s.listen = nowhere; return s }(), false)] {
                let cache = LatestCache(enabled: false)
                let listener = PostgresLatestListener(settings: settings, cache: cache, logger: testLogger)
                let enabled = await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { try await listener.run() }
                    defer { group.cancelAll() }
                    return await eventuallyOn(timeout: .seconds(listens ? 10 : 2)) { cache.isEnabled }
                }
                #expect(enabled == listens, "listen_url \(settings.forListening.redacted): listening \(enabled)")
            }
        }
    }
}
