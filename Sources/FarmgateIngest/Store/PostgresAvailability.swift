import Atomics
import FarmgateSupport
import Logging
import Metrics
import PostgresNIO

/// Whether PostgreSQL answers, and the pool ``PostgresIngestStore``'s calls use while it does.
///
/// postgres-nio's pool does not fail a call when it cannot connect: it queues it and retries with a growing backoff
/// (100 ms × 1.25ⁿ, up to 60 s) and trips its circuit breaker only after many seconds of failures. Left to itself, every
/// store call during an outage would wait its whole `query_timeout`, and the first one after the outage would wait for
/// the pool's next attempt. This type decides instead:
///
/// - A call that fails at the connection level (``mayMeanUnreachable(_:)``), or is still unanswered after
///   ``slowCall``, asks for a check (``suspect()``, coalesced, at most one check per ``checkInterval``). A check is
///   one connection outside the pool that runs `SELECT 1` within `connect_timeout`
///   (``PostgresSettings/unreachability(configuration:limit:logger:)``).
/// - When the check fails, the database is down: the pool is shut down (the calls waiting in it fail at once), every
///   store call fails at once with ``PostgresStoreError/unavailable(_:retry:)`` (503 with `Retry-After`), one error is
///   logged, and `farmgate_ingest_database_up` is 0. A check that succeeds (a single connection killed, a pool merely
///   busy) changes nothing.
/// - While down, a check runs every ``checkInterval``; the first that succeeds puts a new pool in place (no backoff
///   inherited from the old one), logs once that the database answers again, and sets the gauge back to 1.
///
/// The hot path is ``client()``: one atomic load. Only ``run()`` changes the state.
final class PostgresAvailability: Sendable {
    /// What a store call finds: the pool to use, or since when and why there is none.
    final class State: AtomicReference, Sendable {
        let client: PostgresClient?
        let downSince: ContinuousClock.Instant
        let reason: String
        /// The store stopped (``PostgresAvailability/run()`` returned): its pools no longer run, and a call leased on one
        /// would wait for ever.
        let stopped: Bool
        /// The server refuses these settings (a certificate, TLS, a password, a database) rather than being out of reach.
        let configuration: Bool
        /// Set just before ``client``'s `run()` begins (``PoolRun``).
        let running = ManagedAtomic(false)
        /// This pool replaced one whose server restarted (found by a check that answered): calls still on the old pool
        /// keep it until ``PostgresAvailability/restartGrace`` from here, since those that leased a connection made
        /// after the restart are working.
        let afterRestart: ContinuousClock.Instant?

        init(client: PostgresClient, afterRestart: ContinuousClock.Instant? = nil) {
            self.client = client
            self.downSince = .now
            self.reason = ""
            self.stopped = false
            self.configuration = false
            self.afterRestart = afterRestart
        }

        init(downSince: ContinuousClock.Instant, failure: PostgresCheckFailure) {
            self.client = nil
            self.downSince = downSince
            self.reason = failure.reason
            self.configuration = failure.configuration
            self.stopped = false
            self.afterRestart = nil
        }

        /// The store stopped: calls fail at once.
        init(stoppedAt: ContinuousClock.Instant) {
            self.client = nil
            self.downSince = stoppedAt
            self.reason = "stopped"
            self.configuration = false
            self.stopped = true
            self.afterRestart = nil
        }
    }

    /// How often the database is checked while it is down.
    static let checkInterval: Duration = .seconds(1)
    /// How long a store call may wait before it asks for a check.
    static let slowCall: Duration = .seconds(1)
    /// How long calls on a pool replaced after a restart keep it. A restart noticed late (by a check that a slow but
    /// healthy call asked for, minutes after a fast `pg_ctl restart`) cut that call with a 503, when the pool had long
    /// reconnected it; a call on a connection the restart ended still waits no longer than this past the check.
    let restartGrace: Duration
    /// How long shutdown waits for a pool's connections to close.
    static let shutdownGrace: Duration = .seconds(5)

    private let state: ManagedAtomic<State>
    private let makeClient: @Sendable () -> PostgresClient
    private let check: @Sendable () async -> PostgresCheckResult
    private let checks: AsyncStream<Void>
    private let requestCheck: AsyncStream<Void>.Continuation
    private let up = Gauge(label: "farmgate_ingest_database_up")
    private let location: String
    private let logger: Logger

    /// - Parameters:
    ///   - makeClient: a new pool (not yet running).
    ///   - check: no failure when the database answers (with when the server started: a check that finds it changed
    ///     replaces the pool), else what happened.
    ///   - location: where the database is, for logs (without the password).
    ///   - restartGrace: how long calls on a pool replaced after a restart keep it (``restartGrace``).
    init(
        makeClient: @escaping @Sendable () -> PostgresClient, check: @escaping @Sendable () async -> PostgresCheckResult, location: String,
        logger: Logger, restartGrace: Duration = .seconds(10)
    ) {
        self.restartGrace = restartGrace
        self.makeClient = makeClient
        self.check = check
        self.location = location
        self.logger = logger
        self.state = ManagedAtomic(State(client: makeClient()))
        (checks, requestCheck) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        up.record(1)
    }

    /// The pool to run a store call on.
    ///
    /// - Throws: ``PostgresStoreError/unavailable(_:retry:)`` at once while the database is down.
    func client() throws -> PostgresClient {
        let current = state.load(ordering: .acquiring)
        if let client = current.client { return client }
        throw Self.unavailable(current)
    }

    /// ``client()``, once that pool's `run()` has begun, a few milliseconds after the store starts at most: postgres-nio
    /// takes a call before then (it waits for the pool) but logs a warning for each, two or three on every start of
    /// `serve`, which an operator would take for a problem. The hot path is still one atomic load more.
    ///
    /// - Throws: ``PostgresStoreError/unavailable(_:retry:)`` at once while the database is down; `CancellationError`.
    func runningClient() async throws -> PostgresClient {
        while true {
            let current = state.load(ordering: .acquiring)
            guard let client = current.client else { throw Self.unavailable(current) }
            if current.running.load(ordering: .acquiring) { return client }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    /// What a call that failed at the connection level answers: ``PostgresStoreError/unavailable(_:retry:)`` when the database
    /// is known to be down by now (the call was cut by the outage), else `error` itself; and a check is asked for.
    func failed(_ error: any Error) -> any Error {
        guard Self.mayMeanUnreachable(error) else { return error }
        let current = state.load(ordering: .acquiring)
        guard current.client == nil else {
            requestCheck.yield()
            return error
        }
        return Self.unavailable(current)
    }

    private static func unavailable(_ down: State) -> PostgresStoreError {
        if down.stopped { return PostgresStoreError.unavailable("the store has stopped: the ingest is shutting down") }
        let seconds = down.downSince.duration(to: .now).components.seconds
        if down.configuration {
            return PostgresStoreError.unavailable(
                "PostgreSQL refuses the ingest's settings (for \(seconds) s): \(down.reason)",
                retry: "the ingest checks every second and serves again once this is fixed")
        }
        return PostgresStoreError.unavailable(
            "PostgreSQL is unreachable (for \(seconds) s: \(down.reason))", retry: "the ingest checks every second and serves again as soon as it answers")
    }

    /// Whether store calls fail at once.
    var isDown: Bool { state.load(ordering: .acquiring).client == nil }

    /// How often a slow store call looks whether its pool is gone (``outage(since:)``).
    static let outagePoll: Duration = .milliseconds(250)

    /// The state a store call starts on, for ``outage(since:)``.
    var current: State { state.load(ordering: .acquiring) }

    /// What a call that started on `state` answers when that pool is gone since (the database found down, or a new pool
    /// in place after an outage); nil while it is still the pool calls use.
    func outage(since state: State) -> PostgresStoreError? {
        let now = self.state.load(ordering: .acquiring)
        guard now !== state else { return nil }
        if now.client == nil { return Self.unavailable(now) }
        if let replaced = now.afterRestart, replaced.duration(to: .now) < restartGrace { return nil }
        return PostgresStoreError.unavailable(
            "the call was cut by a PostgreSQL outage (the server answers again, on a new pool); send it again")
    }

    /// Asks for a check of the database: a call failed at the connection level or waits long. Coalesced; nothing while
    /// the database is already known to be down.
    func suspect() {
        guard !isDown else { return }
        requestCheck.yield()
    }

    /// Whether `error`, from a store call, may mean that the database cannot be reached (then it is worth a check):
    /// anything but an answer of the server to a statement (a unique violation, a statement timeout), the store's own
    /// refusals and cancellation. Server errors of class 08 (connection exception) and `57P01`–`57P03` (shutdown,
    /// crash, not accepting connections) count.
    static func mayMeanUnreachable(_ error: any Error) -> Bool {
        switch error {
        case is CancellationError, is IngestStoreError, is PostgresDecodingError:
            return false
        case let error as PostgresStoreError:
            if case .timedOut = error { return true }
            return false
        case let error as PSQLError:
            if let state = error.serverInfo?[.sqlState] { return state.hasPrefix("08") || state.hasPrefix("57P") }
            return [.serverClosedConnection, .clientClosedConnection, .connectionError, .uncleanShutdown, .poolClosed].contains(error.code)
        default:
            // The pool's own errors (shut down, circuit breaker), socket and TLS errors.
            return true
        }
    }

    /// Runs the current pool, checks the database when asked, and replaces the pool after an outage; until cancelled
    /// (the store's graceful shutdown), then gives the pools ``shutdownGrace`` to close their connections.
    func run() async {
        var pools: [PoolRun] = []
        let initial = state.load(ordering: .acquiring)
        if let client = initial.client { pools.append(PoolRun(client, running: initial.running)) }
        var lastCheck: ContinuousClock.Instant?
        // When the server the current pool connected to started: a check that answers with another time found a
        // restart that was over before anything noticed it (a fast `pg_ctl restart`). The pool's connections from
        // before it are all dead, and a call waiting on one may wait until `query_timeout`, or for ever without one.
        var knownStart = await check().serverStart
        for await _ in checks {
            if let lastCheck {
                let wait = Self.checkInterval - lastCheck.duration(to: .now)
                if wait > .zero, (try? await Task.sleep(for: wait)) == nil { break }
            }
            lastCheck = .now
            let result = await check()
            guard let failure = result.failure, !Task.isCancelled else {
                guard !Task.isCancelled, let started = result.serverStart else { continue }
                defer { knownStart = started }
                guard let known = knownStart, known != started else { continue }
                // A new pool for new calls. The old one's calls that are still waiting after the grace are answered
                // 503 (`outage(since:)`) and the old pool stops then: those that leased a connection the pool made after
                // the restart finish meanwhile.
                let client = makeClient()
                let next = State(client: client, afterRestart: .now)
                if let old = pools.last?.task {
                    let grace = restartGrace
                    Task {
                        try? await Task.sleep(for: grace)
                        old.cancel()
                    }
                }
                pools.removeAll { $0.finished.load(ordering: .acquiring) }
                pools.append(PoolRun(client, running: next.running))
                state.store(next, ordering: .releasing)
                logger.notice(
                    "PostgreSQL restarted since the pool connected; new store calls go to a new pool, calls still waiting on the old one after \(restartGrace) are answered 503",
                    metadata: ["store.url": "\(location)", "store.server_started": "\(started)", "store.server_started_before": "\(known)"])
                continue
            }
            let since = ContinuousClock.now
            state.store(State(downSince: since, failure: failure), ordering: .releasing)
            up.record(0)
            logger.error(
                failure.configuration
                    ? "PostgreSQL refuses the ingest's settings; store calls are answered at once with 503 until a check succeeds"
                    : "PostgreSQL is unreachable; store calls are answered at once with 503 until it answers again",
                metadata: ["store.url": "\(location)", "error": "\(failure.reason)", "check_every": "\(Self.checkInterval)"])
            // Its waiting calls fail now rather than at their deadline; its backoff goes with it.
            pools.last?.task.cancel()
            var stillDown = true
            var last = failure
            while stillDown {
                guard (try? await Task.sleep(for: Self.checkInterval)) != nil else { break }
                let result = await check()
                guard let failure = result.failure else {
                    knownStart = result.serverStart
                    stillDown = false
                    break
                }
                // A server that comes back refusing these settings (its certificate replaced, a password changed)
                // keeps the ingest down, and says why once.
                if failure.configuration != last.configuration || (failure.configuration && failure.reason != last.reason) {
                    state.store(State(downSince: since, failure: failure), ordering: .releasing)
                    logger.error(
                        failure.configuration
                            ? "PostgreSQL answers but refuses the ingest's settings; store calls are answered with 503 until a check succeeds"
                            : "PostgreSQL is unreachable; store calls are answered at once with 503 until it answers again",
                        metadata: ["store.url": "\(location)", "error": "\(failure.reason)"])
                }
                last = failure
            }
            if stillDown { break }
            let client = makeClient()
            let next = State(client: client)
            pools.removeAll { $0.finished.load(ordering: .acquiring) }
            pools.append(PoolRun(client, running: next.running))
            state.store(next, ordering: .releasing)
            up.record(1)
            lastCheck = .now
            logger.notice(
                "PostgreSQL answers again; store calls resume on a new pool",
                metadata: ["store.url": "\(location)", "store.down_for": "\(since.duration(to: .now))"])
        }
        // From now on calls fail at once: postgres-nio queues a lease on a pool that no longer runs, for ever (a service
        // still working while the group stops, such as one whose start failed, would hold the process's exit).
        state.store(State(stoppedAt: .now), ordering: .releasing)
        let running = pools.map(\.task)
        for pool in running { pool.cancel() }
        let closed: Bool? = await FarmgateSupport.withDeadline(Self.shutdownGrace, graceOnCancel: Self.shutdownGrace) {
            for pool in running { await pool.value }
            return true
        }
        if closed == nil {
            logger.warning(
                "the PostgreSQL pool did not close its connections in time; stopping without waiting for them", metadata: ["grace": "\(Self.shutdownGrace)"])
        }
    }

    /// One pool's `run()`, in a task of its own: cancelled when the pool is replaced or the store stops, and not waited
    /// for past ``shutdownGrace`` (a query caught by a database restart can hang on its dead socket until
    /// `query_timeout`; it must not hold the process's exit).
    private struct PoolRun {
        let task: Task<Void, Never>
        let finished: ManagedAtomic<Bool>

        /// - Parameter running: set as the task begins `client.run()` (nothing suspends between the two).
        init(_ client: PostgresClient, running: ManagedAtomic<Bool>) {
            let finished = ManagedAtomic(false)
            self.finished = finished
            task = Task {
                running.store(true, ordering: .releasing)
                await client.run()
                finished.store(true, ordering: .releasing)
            }
        }
    }
}
