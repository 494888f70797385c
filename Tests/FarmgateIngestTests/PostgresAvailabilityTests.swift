import FarmgateTestSupport
import FarmgateWire
import Logging
import Foundation
import PostgresNIO
import Synchronization
import Testing

@testable import FarmgateIngest

/// What ``PostgresAvailability`` takes for a sign that the database may be gone, and that a check which finds it
/// answering changes nothing. The outage itself (the cluster stopped and started) is `PostgresOutageTests`.
@Suite struct PostgresAvailabilityTests {
    @Test func statementErrorsAndTheStoresOwnRefusalsNeverStartACheck() async throws {
        try await withTestDatabase { settings in
            try await withTestClient(settings) { client in
                try await client.query("CREATE TABLE t (id int PRIMARY KEY)")
                try await client.query("INSERT INTO t VALUES (1)")
                let violation = await #expect(throws: PSQLError.self) { try await client.query("INSERT INTO t VALUES (1)") }
                #expect(violation.map { PostgresAvailability.mayMeanUnreachable($0) } == false, "a unique violation")
                let syntax = await #expect(throws: PSQLError.self) { try await client.query("SELEC 1") }
                #expect(syntax.map { PostgresAvailability.mayMeanUnreachable($0) } == false, "a syntax error")
                // What the request's log line says of them: the server's SQLSTATE and message, not postgres-nio's
                // one generic sentence.
                #expect(violation.map { Logger.describe(storeError: $0) }?.hasPrefix("PostgreSQL 23505: duplicate key value violates unique constraint") == true)
                #expect(violation.map { "\($0)" }?.contains("Generic description") == true, "postgres-nio's own description still hides it")
                #expect(syntax.map { Logger.describe(storeError: $0) }?.hasPrefix("PostgreSQL 42601: syntax error") == true)
            }
        }
        #expect(!PostgresAvailability.mayMeanUnreachable(IngestStoreError.alreadyExists("farm 'f'")))
        #expect(!PostgresAvailability.mayMeanUnreachable(CancellationError()))
        #expect(!PostgresAvailability.mayMeanUnreachable(PostgresStoreError.unavailable("down")))
        #expect(PostgresAvailability.mayMeanUnreachable(PostgresStoreError.timedOut("no answer")))
    }

    @Test func aConnectionThatCannotBeOpenedStartsACheck() async throws {
        var settings = try PostgresSettings(url: "postgresql://farmgate@/nothing?host=/nonexistent-farmgate-socket-dir")
        settings.connectTimeout = .milliseconds(500)
        let configuration = try settings.connectionConfiguration()
        let refused = await #expect(throws: (any Error).self) {
            try await PostgresConnection.connect(configuration: configuration, id: 1, logger: testLogger)
        }
        #expect(refused.map { PostgresAvailability.mayMeanUnreachable($0) } == true, "\(String(describing: refused))")
        #expect(await settings.unreachability(configuration: configuration, logger: testLogger)?.configuration == false)
    }

    /// Every connection of the store's pool killed (`pg_terminate_backend`) while the server stays up: the calls on
    /// them fail, the check that follows finds the database answering, and the store is never taken for down.
    @Test func killedConnectionsOfARunningServerAreNotAnOutage() async throws {
        try await PostgresStoreTests.withStore { store, settings in
            #expect(await settings.unreachability(configuration: try settings.connectionConfiguration(), logger: testLogger) == nil)
            try await store.ping()
            try await withTestClient(settings) { admin in
                _ = try await admin.query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
            }
            // A call on a killed connection asks for a check; the pool may also have dropped them before any call
            // failed, so one is asked for here too. Over at least two seconds (a check takes milliseconds): no call is
            // refused as if the database were down, and calls succeed again.
            store.availability.suspect()
            var refused: [String] = []
            var answered: [Bool] = []
            let end = ContinuousClock.now + .seconds(2)
            while ContinuousClock.now < end || answered.count < 10 {
                do {
                    try await store.ping()
                    answered.append(true)
                } catch let error as PostgresStoreError {
                    if case .unavailable = error { refused.append(error.description) }
                    answered.append(false)
                } catch {
                    // A call on a killed connection (one per connection the pool held at most).
                    answered.append(false)
                }
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(refused.isEmpty, "\(refused)")
            #expect(answered.suffix(5).allSatisfy { $0 }, "\(answered)")
            #expect(!store.availability.isDown)
        }
    }

    /// A service still working while the group stops (retention after a failed start) calls the store after its run
    /// ended: postgres-nio would queue that lease on a pool that no longer runs, for ever, and hold the process's exit.
    @Test func callsAfterTheStoreStoppedFailAtOnce() async throws {
        try await withTestDatabase(migrated: true) { settings in
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            _ = try await withRunning(store) { _ in try await store.migrate() }
            let started = ContinuousClock.now
            // Bounded here so that the old behaviour fails the test instead of hanging it.
            let outcome: String? = try await withThrowingTaskGroup(of: String?.self) { group in
                group.addTask {
                    do {
                        try await store.ping()
                        return "answered"
                    } catch {
                        return "\(error)"
                    }
                }
                group.addTask {
                    try await Task.sleep(for: .seconds(10))
                    return nil
                }
                let first = try await group.next() ?? nil
                group.cancelAll()
                return first
            }
            #expect(outcome?.contains("the store has stopped") == true, "\(String(describing: outcome))")
            #expect(started.duration(to: .now) < .seconds(2))
        }
    }
}

/// A restart over before any call failed (a fast `pg_ctl restart`): the check answers, but the server started again
/// since the pool connected, so every connection of the pool is dead and a call waiting on one may wait until
/// `query_timeout` (a tester saw uploads wait the whole 30 s, and with `"0s"` until a later restart).
@Suite struct PostgresRestartDetectionTests {
    @Test("a check that answers from a server started since the pool connected replaces the pool, and calls on the old one are answered 503")
    func restartedServerReplacesThePool() async throws {
        let started = Mutex("2026-12-05 17:00:00+00")
        var configuration = PostgresClient.Configuration(unixSocketPath: "/tmp/fg-no-postgres-here/.s.PGSQL.5432", username: "nobody", password: nil, database: "none")
        configuration.options.minimumConnections = 0
        let pool = configuration
        let availability = PostgresAvailability(
            makeClient: { PostgresClient(configuration: pool, backgroundLogger: testLogger) },
            check: { PostgresCheckResult(serverStart: started.withLock { $0 }) }, location: "test", logger: testLogger, restartGrace: .seconds(1))
        let running = Task { await availability.run() }
        defer { running.cancel() }
        // The baseline is read at start; a check with the same start time changes nothing.
        try await Task.sleep(for: .milliseconds(200))
        let before = availability.current
        availability.suspect()
        try await Task.sleep(for: .milliseconds(300))
        #expect(availability.outage(since: before) == nil, "the same server: the pool stays")
        // The server restarts; the next check finds it.
        started.withLock { $0 = "2026-12-05 17:05:00+00" }
        try await Task.sleep(for: .seconds(1))
        availability.suspect()
        let replaced = await eventually(timeout: .seconds(10), every: .milliseconds(20)) { availability.current !== before }
        #expect(replaced, "the pool was not replaced after the restart")
        // Calls on the old pool keep it for the grace (those on connections made after the restart are working), then
        // are answered 503.
        #expect(availability.outage(since: before) == nil, "cut at once, within the grace")
        let cut = await eventually(timeout: .seconds(5), every: .milliseconds(50)) { availability.outage(since: before) != nil }
        #expect(cut, "calls on the old pool were never cut")
        let answer = availability.outage(since: before).map { "\($0)" } ?? ""
        #expect(answer.contains("new pool"), "\(answer)")
        #expect(!availability.isDown, "the server answers: not an outage")
    }

    /// A tester, 2026-12-07: a fast restart was found only minutes later, by the check a slow but healthy call asked for
    /// (a 100,000-reading batch's duplicate check), and that call, on a connection the pool had made after the restart,
    /// was cut with a 503 "cannot reach its store".
    @Test("a call working on the old pool when a late check finds a restart finishes, and new calls go to the new pool")
    func workingCallOnTheOldPoolFinishes() async throws {
        try await withTestDatabase { settings in
            let started = Mutex("2026-12-05 17:00:00+00")
            var configuration = try settings.clientConfiguration()
            configuration.options.minimumConnections = 0
            let pool = configuration
            let availability = PostgresAvailability(
                makeClient: { PostgresClient(configuration: pool, backgroundLogger: testLogger) },
                check: { PostgresCheckResult(serverStart: started.withLock { $0 }) }, location: "test", logger: testLogger, restartGrace: .seconds(6))
            let running = Task { await availability.run() }
            defer { running.cancel() }
            let old = try await availability.runningClient()
            let before = availability.current
            let slowCall = Task {
                var answers = 0
                for try await _ in try await old.query("SELECT pg_sleep(2.5)::text", logger: testLogger).decode(String.self) { answers += 1 }
                return answers
            }
            try await Task.sleep(for: .milliseconds(700))
            started.withLock { $0 = "2026-12-05 17:05:00+00" }
            availability.suspect()
            #expect(await eventually(timeout: .seconds(5), every: .milliseconds(20)) { availability.current !== before }, "no new pool")
            #expect(availability.outage(since: before) == nil)
            #expect(try await slowCall.value == 1, "the healthy call on the old pool was cut")
            let new = try await availability.runningClient()
            var answers = 0
            for try await _ in try await new.query("SELECT 1", logger: testLogger) { answers += 1 }
            #expect(answers == 1)
        }
    }
}
