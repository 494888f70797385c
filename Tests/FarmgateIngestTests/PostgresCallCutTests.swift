import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Synchronization
import Testing

@testable import FarmgateIngest

/// A store call whose connection goes silent under it (a database restart that left postgres-nio waiting on a dead
/// socket; a tester saw uploads in flight during `pg_ctl restart` answered only after the 30 s `query_timeout`, and
/// never with `query_timeout = "0s"`, each holding its device's upload slot). Once the store finds the outage, or puts a
/// new pool in place after it, the call is answered as unavailable.
@Suite("A PostgreSQL store call cut by an outage")
struct PostgresCallCutTests {
    @Test("a call waiting on a silent connection is answered unavailable once the outage is found, even without a query_timeout")
    func silentConnectionWithoutQueryTimeout() async throws {
        // Migrated beforehand, and a connect_timeout that a loaded first pass keeps: with 2 s, the check that a slow
        // migration started (a hundred databases being made at once) once found PostgreSQL "unreachable".
        try await withTestDatabase(migrated: true) { settings in
            guard case .unixSocket(let socket) = settings.endpoint else { throw MissingTestDatabase() }
            let scratch = try Scratch(prefix: "fg-cut", in: URL(fileURLWithPath: "/tmp"))
            let proxy = try await FreezableProxy(listeningAt: scratch.file(".s.PGSQL.5432"), forwardingTo: socket)
            var proxied = settings
            proxied.endpoint = .unixSocket(path: proxy.path)
            proxied.queryTimeout = .zero
            proxied.connectTimeout = .seconds(5)
            let store = try PostgresIngestStore(settings: proxied, logger: testLogger)
            try await withRunning(store) { (_: any IngestStore) async throws -> Void in
                try await store.migrate()
                #expect(try await store.farm(named: "nowhere") == nil)
                await proxy.freeze()
                let asked = ContinuousClock.now
                // Bounded here without waiting for the call: without the fix it never returns.
                let answer = Mutex<String?>(nil)
                let call = Task {
                    let text: String
                    do {
                        _ = try await store.farm(named: "nowhere")
                        text = "answered"
                    } catch {
                        text = "\(error)"
                    }
                    answer.withLock { $0 = text }
                }
                var outcome: String?
                while outcome == nil, asked.duration(to: .now) < .seconds(30) {
                    try await Task.sleep(for: .milliseconds(100))
                    outcome = answer.withLock { $0 }
                }
                call.cancel()
                let took = asked.duration(to: .now)
                #expect(outcome?.contains("PostgreSQL is unreachable") == true, "\(outcome ?? "no answer within 30 s")")
                // The call's check after 1 s, its connect_timeout of 5 s, and a quarter-second look.
                #expect(took < .seconds(20), "\(took)")
                await proxy.thaw()
            }
        }
    }
}
