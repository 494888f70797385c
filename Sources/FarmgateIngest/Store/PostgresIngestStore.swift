public import FarmgateWire
import FarmgateSupport
import Foundation
public import Logging
import Metrics
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// The store for many farms and several instances: PostgreSQL through postgres-nio's pooled `PostgresClient`.
///
/// The same contract as ``SQLiteIngestStore`` (one conformance suite checks both): idempotent on (device, sequence) with
/// `sequence_conflict` for different content, `devices.highest_sequence` raised in the write transaction, the answer
/// only after `COMMIT`. Concurrent batches share transactions (``PostgresGroupCommit``), each of a fixed number of
/// statements whatever its size (``PostgresBatchWriter``). How readings are laid out and how idempotency holds across
/// time partitions and after a partition is dropped is explained on ``PostgresSchema``.
///
/// The store is a `Service`: its ``run()`` runs the connection pool (queries wait until it runs), creates the coming
/// partitions (readings by day, 1-minute rollups by month) every six hours (``migrate()`` does at start), and ends with
/// the group's graceful shutdown, after the HTTP server.
///
/// ## When PostgreSQL is down
/// ``PostgresAvailability`` notices (a call that fails at the connection level or waits over a second makes it check
/// with a connection of its own): then every call fails at once with ``PostgresStoreError/unavailable(_:)`` (503 with
/// `Retry-After`) instead of waiting `query_timeout` in the pool, the database is checked every second, and the first
/// check that succeeds puts a new pool in place, free of postgres-nio's reconnect backoff. Nothing unanswered is
/// acknowledged: a call cut by the outage fails, and its batch is sent again and found stored or not.
///
/// ## Behind PgBouncer (transaction pooling)
/// It works there as it is, because it needs nothing of a session: every statement is either alone or inside one
/// transaction; settings are transaction-local (`set_config(..., true)`, for `statement_timeout`); locks are
/// transaction-level (`pg_advisory_xact_lock`, `SELECT ... FOR NO KEY UPDATE`); it never uses `LISTEN`, temporary tables or
/// named prepared statements: postgres-nio's `query` sends unnamed statements (Parse/Bind/Execute in one Sync), which
/// PgBouncer forwards within the transaction. Migrations too: one transaction under `pg_advisory_xact_lock`. Only the
/// latest-value listener needs a session (`LISTEN`): point `[storage] listen_url` at PostgreSQL itself
/// (``PostgresLatestListener``). `PgBouncerTests` runs all of this through a real PgBouncer in transaction mode. Size
/// `pool_size` × instances to at most PgBouncer's `default_pool_size`; PgBouncer's own `query_wait_timeout` should
/// exceed `query_timeout`.
public final class PostgresIngestStore: IngestStore {
    /// Where it connects, for logs (without the password).
    public let settings: PostgresSettings
    /// How many sensors one device may register (`[limits] sensors_per_device`); readings of more are refused.
    public let sensorsPerDevice: Int
    /// `[retention]`, for partition maintenance: no partition is made that lies wholly before its table's cut-off
    /// (retention would drop it again at its next run). Nil: every partition in ``createPartitions(now:)``'s window.
    public let retention: IngestConfiguration.Retention?
    /// Whether the database answers, and the pool to use while it does.
    let availability: PostgresAvailability
    let logger: Logger
    /// Partitions created ahead, by table: daily ones of `readings`, monthly ones of `rollups_1m`.
    let readingPartitionsCreated = Counter(label: "farmgate_ingest_partitions_created_total", dimensions: [("table", "readings")])
    let rollupPartitionsCreated = Counter(label: "farmgate_ingest_partitions_created_total", dimensions: [("table", "rollups_1m")])
    /// Gathers concurrent batches into shared transactions.
    let groupCommit: PostgresGroupCommit
    /// How many days of partitions ``run()`` keeps ahead of today.
    public static let partitionDaysAhead = 7
    /// How many months of 1-minute rollup partitions ``run()`` keeps ahead of this month.
    public static let rollupPartitionMonthsAhead = 2

    /// Builds the pool (no connection is opened before ``run()`` runs).
    ///
    /// - Throws: ``PostgresStoreError/tls(_:)`` when the CA file cannot be loaded.
    /// - Parameter sensorsPerDevice: ``IngestConfiguration/Limits/sensorsPerDevice``.
    /// - Parameter retention: `[retention]`, so that partition maintenance makes no partition that retention drops
    ///   (``retention``).
    public convenience init(
        settings: PostgresSettings, sensorsPerDevice: Int = IngestConfiguration.Limits.defaultSensorsPerDevice,
        retention: IngestConfiguration.Retention? = nil, logger: Logger
    ) throws {
        try self.init(
            settings: settings, groupCommit: Self.groupCommitLimits(settings), sensorsPerDevice: sensorsPerDevice, retention: retention, logger: logger)
    }

    /// The group commit's limits from `[storage] write_transactions`, `group_max_batches` and `group_max_readings`. By
    /// default at most half the pool (at least one, at most eight) runs group transactions, so that reads and maintenance
    /// always find a connection.
    static func groupCommitLimits(_ settings: PostgresSettings) -> PostgresGroupCommit.Limits {
        PostgresGroupCommit.Limits(
            maximumBatches: settings.groupMaxBatches, maximumReadings: settings.groupMaxReadings, concurrency: settings.effectiveWriteTransactions)
    }

    init(
        settings: PostgresSettings, groupCommit limits: PostgresGroupCommit.Limits,
        sensorsPerDevice: Int = IngestConfiguration.Limits.defaultSensorsPerDevice, retention: IngestConfiguration.Retention? = nil, logger: Logger
    ) throws {
        self.settings = settings
        self.sensorsPerDevice = sensorsPerDevice
        self.retention = retention
        self.logger = logger
        self.groupCommit = PostgresGroupCommit(limits: limits)
        var configuration = try settings.clientConfiguration()
        configuration.options.maximumConnections = settings.poolSize
        configuration.options.connectTimeout = settings.connectTimeout
        configuration.options.minimumConnections = 0
        let pool = configuration
        let probe = try settings.connectionConfiguration()
        self.availability = PostgresAvailability(
            makeClient: { PostgresClient(configuration: pool, backgroundLogger: logger) },
            check: { await settings.check(configuration: probe, logger: logger) },
            location: settings.redacted, logger: logger)
    }

    /// The pool to run a call on.
    ///
    /// - Throws: ``PostgresStoreError/unavailable(_:)`` at once while the database is known to be down.
    var client: PostgresClient {
        get async throws { try await availability.runningClient() }
    }

    // MARK: Lifecycle

    /// Runs the pool (and replaces it after an outage, ``PostgresAvailability``) until the group shuts down, and creates
    /// partitions ahead every six hours (``migrate()`` does at start).
    ///
    /// On shutdown the pool is given ``PostgresAvailability/shutdownGrace`` to close its connections: a query caught by
    /// a database restart can hang on its dead socket until `query_timeout`, and must not hold the process's exit
    /// (systemd, or an operator, would kill it). The server answered everything it acknowledged before this point;
    /// nothing is lost.
    public func run() async throws {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.availability.run() }
            await self.createPartitionsEverySixHours()
            group.cancelAll()
        }
    }

    /// Every six hours (migrate() created them at start): partitions stay days ahead of the clock.
    private func createPartitionsEverySixHours() async {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do {
                    try await Task.sleep(for: .seconds(6 * 3600))
                    try await self.createPartitions()
                } catch is CancellationError {
                    return
                } catch {
                    self.logger.error(
                        "cannot create the coming partitions; readings and 1-minute rollups go to their default partitions meanwhile",
                        metadata: ["error": "\(String(reflecting: error))"])
                }
            }
        }
    }

    // MARK: Plumbing

    /// Runs `body` in one transaction with `query_timeout` as the server's `statement_timeout` for it, and bounds the
    /// wait for a pooled connection by the same timeout.
    ///
    /// - Parameter settingTimeout: false when `body`'s first statement sets ``statementTimeout`` itself (one round trip
    ///   fewer on the write path).
    /// - Parameter asynchronousCommit: commit without waiting for the WAL flush (`synchronous_commit = off` for this
    ///   transaction only): for writes that can be derived again and that a later synchronous commit makes durable
    ///   with it, since the WAL is flushed in order (``AlertWriteDurability/withNextSyncedCommit``).
    /// - Parameter longRunning: a limit of its own instead of `query_timeout`, for work that takes as long as the data
    ///   it rewrites (a migration, partition maintenance): the server's `statement_timeout`, and the deadline a minute
    ///   after it (which answers the caller even if the server vanished); `limit` names it in the error.
    func transaction<T: Sendable>(
        settingTimeout: Bool = true, asynchronousCommit: Bool = false, longRunning: (timeout: Duration, limit: String)? = nil,
        _ body: @escaping @Sendable (PostgresConnection) async throws -> T
    ) async throws -> T {
        let timeout = longRunning.map { $0.timeout + .seconds(60) } ?? settings.queryTimeout
        let logger = self.logger
        let statementTimeout = settingTimeout ? (longRunning.map { $0.timeout.wholeMilliseconds } ?? self.statementTimeout) : nil
        return try await withDeadline(timeout, limit: longRunning?.limit ?? "query_timeout") {
            do {
                return try await self.client.withTransaction(logger: logger) { connection in
                    switch (statementTimeout, asynchronousCommit) {
                    case (let statementTimeout?, false):
                        try await connection.query("SELECT set_config('statement_timeout', \(String(statementTimeout)), true)", logger: logger)
                    case (let statementTimeout?, true):
                        try await connection.query(
                            "SELECT set_config('statement_timeout', \(String(statementTimeout)), true), set_config('synchronous_commit', 'off', true)", logger: logger)
                    case (nil, true):
                        try await connection.query("SELECT set_config('synchronous_commit', 'off', true)", logger: logger)
                    case (nil, false):
                        break
                    }
                    return try await body(connection)
                }
            } catch let error as PostgresTransactionError {
                // What failed, not the wrapper: callers match IngestStoreError and unique violations.
                if let inner = error.closureError ?? error.commitError ?? error.beginError { throw inner }
                throw error
            }
        }
    }

    /// `query_timeout` in milliseconds, as a transaction sets it for its statements (`SET LOCAL statement_timeout`);
    /// nil when there is none.
    var statementTimeout: Int64? {
        let timeout = settings.queryTimeout
        guard timeout > .zero else { return nil }
        return timeout.wholeMilliseconds
    }

    /// Runs one read-only statement outside a transaction and collects its rows.
    func rows<Row: Sendable>(_ query: PostgresQuery, _ decode: @escaping @Sendable (PostgresRow) throws -> Row) async throws -> [Row] {
        let logger = self.logger
        return try await withDeadline(settings.queryTimeout) {
            var result: [Row] = []
            for try await row in try await self.client.query(query, logger: logger) { result.append(try decode(row)) }
            return result
        }
    }

    /// Like ``withDeadline(_:_:)``, but at the deadline returns at once, leaving `body` cancelled and running on its own
    /// rather than waiting for it to notice.
    ///
    /// - Parameter limit: what `timeout` is, for the error (``PostgresStoreError/timedOut(_:)``).
    private func abandoning<T: Sendable>(
        after timeout: Duration, limit: String = "query_timeout", _ body: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        // The first answer wins (the work's, the deadline's, an outage's, or the caller's cancellation); then the work
        // is cancelled and the deadline forgotten.
        let answer = OnceContinuation<T>()
        let startedOn = availability.current
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
                answer.install(continuation)
                let availability = self.availability
                let work = Task {
                    do {
                        answer.resume(with: .success(try await body()))
                    } catch {
                        answer.resume(with: .failure(availability.failed(error)))
                    }
                }
                // A sleeping task, not the shared timer: it is scheduled like the work, so an ingest whose threads are
                // all busy (or a test process full of CPU-bound tests) does not time out work that is merely waiting
                // for a thread. Work still unanswered after a second has the database checked (it may wait in the
                // pool for a database that is down).
                //
                // From then on, every quarter of a second, it looks whether the pool it started on is gone (an outage
                // found, or a new pool after one): a query caught by a database restart can wait on its dead socket
                // until `query_timeout`, or for ever without one, holding its upload (and the device's slot) long after
                // the ingest serves again. It is answered as unavailable then (503: the agent sends it again).
                let timer = Task {
                    let slow = timeout > .zero ? min(timeout, PostgresAvailability.slowCall) : PostgresAvailability.slowCall
                    guard (try? await Task.sleep(for: slow)) != nil else { return }
                    availability.suspect()
                    let deadline = timeout > .zero ? ContinuousClock.now + (timeout - slow) : nil
                    while true {
                        if let outage = availability.outage(since: startedOn) {
                            answer.resume(with: .failure(outage))
                            return
                        }
                        let now = ContinuousClock.now
                        if let deadline, now >= deadline { break }
                        let pause = deadline.map { min(PostgresAvailability.outagePoll, now.duration(to: $0)) } ?? PostgresAvailability.outagePoll
                        guard (try? await Task.sleep(for: pause)) != nil else { return }
                    }
                    answer.resume(
                        with: .failure(
                            PostgresStoreError.timedOut(
                                "no answer from PostgreSQL within \(limit) (\(timeout)); check that the database is up and the pool is not exhausted")))
                }
                answer.onResume {
                    work.cancel()
                    timer.cancel()
                }
            }
        } onCancel: {
            // The caller gave up: answer it now and cancel the work (which may finish on its own if it does not notice).
            answer.resume(with: .failure(CancellationError()))
        }
    }

    /// Fails with ``PostgresStoreError/timedOut(_:)`` when `body` takes longer than `timeout` (zero: no limit), and with
    /// ``PostgresStoreError/unavailable(_:)`` once the pool it started on is gone (an outage found, or a new pool after
    /// one; see ``abandoning(after:limit:_:)``), with or without a limit. Waiting
    /// for a pooled connection is cancelled then; a statement already running is ended by the server's
    /// `statement_timeout`. The caller is answered at the deadline even when `body` does not notice its cancellation
    /// (a connection whose server was restarted under it can leave postgres-nio waiting): a store call never hangs,
    /// whether it writes a batch, runs retention or answers a read.
    func withDeadline<T: Sendable>(
        _ timeout: Duration, limit: String = "query_timeout", _ body: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        try await abandoning(after: timeout, limit: limit, body)
    }

    // MARK: Schema

    /// How long the migrations' transaction may take, on the server (`statement_timeout`) and here: not
    /// `query_timeout`, because a migration that converts stored rows (11: readings into chunks) takes as long as the
    /// data is large, and an instance that starts beside one waits for it (`pg_advisory_xact_lock`). Under
    /// `query_timeout` (30 s) an upgrade of a large database failed every time, and so did the migrations of a hundred
    /// test databases made at once on two cores.
    static let migrationTimeout: Duration = .seconds(6 * 3600)

    @discardableResult
    public func migrate() async throws -> [AppliedMigration] {
        try await migrateAndCreatePartitions().applied
    }

    /// ``migrate()``, saying also which partitions it created ahead and how many rows it moved into them (what
    /// `farmgate-ingest migrate` prints).
    ///
    /// With `verify-full` over TCP, first checks that the server's certificate names the URL's host by libpq's rules
    /// (``PostgresSettings/checkServerCertificate()``; the pool's own check also accepts the connected address).
    ///
    /// - Throws: ``PostgresStoreError/tls(_:)`` when the certificate does not verify or names another host.
    public func migrateAndCreatePartitions() async throws -> (applied: [AppliedMigration], partitions: CreatedPartitions) {
        switch await settings.checkServerCertificate() {
        case .wrongHost(let message)?, .refused(let message)?: throw PostgresStoreError.tls(message)
        case .verified?, .noAnswer?, nil: break
        }
        let logger = self.logger
        let applied = try await transaction(longRunning: (Self.migrationTimeout, "the migration's time limit")) { connection in
            try await connection.query("SELECT pg_advisory_xact_lock(\(PostgresSchema.migrationLock))", logger: logger)
            try await connection.query(PostgresQuery(unsafeSQL: PostgresSchema.bookkeeping), logger: logger)
            var current = 0
            for try await version in try await connection.query("SELECT coalesce(max(version), 0) FROM schema_migrations", logger: logger).decode(Int.self) {
                current = version
            }
            guard current <= PostgresSchema.currentVersion else {
                throw PostgresStoreError.schemaTooNew(found: current, known: PostgresSchema.currentVersion)
            }
            var applied: [AppliedMigration] = []
            for migration in PostgresSchema.migrations where migration.version > current {
                for statement in migration.statements {
                    try await connection.query(PostgresQuery(unsafeSQL: statement), logger: logger)
                }
                try await connection.query(
                    "INSERT INTO schema_migrations(version, name, applied_at_us) VALUES (\(migration.version), \(migration.name), \(Timestamp.now().microseconds))",
                    logger: logger)
                applied.append(AppliedMigration(version: migration.version, name: migration.name))
            }
            return applied
        }
        for migration in applied {
            logger.info("applied schema migration", metadata: ["store.migration.version": "\(migration.version)", "store.migration.name": "\(migration.name)"])
        }
        let partitions = try await createPartitions()
        return (applied, partitions)
    }

    public func ping() async throws {
        _ = try await rows("SELECT 1") { try $0.decode(Int.self) }
    }

    // MARK: Ingest

    /// Stores `batch` in a group transaction with the batches of other requests that arrive meanwhile
    /// (``PostgresGroupCommit``), and returns after that transaction committed. Waiting in the queue counts against
    /// `query_timeout`.
    public func store(_ batch: Batch, for device: DeviceIdentity, receivedAt: Timestamp) async throws -> StoreOutcome {
        let member = PostgresBatchWriter.Member(batch: batch, device: device, receivedAt: receivedAt)
        return try await withDeadline(settings.queryTimeout) {
            try await self.groupCommit.submit(member) { members in try await self.commitGroup(members) }
        }
    }

    /// One group's transaction: the batches with their rollups (``PostgresBatchWriter``), then `COMMIT`.
    ///
    /// Bounded by `query_timeout` without waiting for a transaction that ignores cancellation (a connection killed
    /// under it has been seen to hang postgres-nio's transaction): the worker then moves on to the next group.
    private func commitGroup(_ members: [PostgresBatchWriter.Member]) async throws -> [Result<StoreOutcome, any Error>] {
        let logger = self.logger
        return try await abandoning(after: settings.queryTimeout) {
            try await self.writeGroup(members, logger: logger)
        }
    }

    private func writeGroup(_ members: [PostgresBatchWriter.Member], logger: Logger) async throws -> [Result<StoreOutcome, any Error>] {
        let statementTimeout = self.statementTimeout
        let sensorLimit = sensorsPerDevice
        return try await transaction(settingTimeout: false) { connection in
            try await PostgresBatchWriter(connection: connection, statementTimeout: statementTimeout, sensorLimit: sensorLimit, logger: logger)
                .write(members)
        }
    }

    public func highestSequence(device: DeviceIdentity) async throws -> UInt64? {
        let found = try await rows("SELECT highest_sequence FROM devices WHERE id = \(device.rowID)") { try $0.decode(Int64?.self) }
        guard let row = found.first else { throw IngestStoreError.notFound("device '\(device.device)' in farm '\(device.farm)'") }
        return row.map { UInt64(clamping: $0) }
    }

    // MARK: Credentials

    public func deviceCredential(keyID: String) async throws -> DeviceCredential? {
        try await rows(
            """
            SELECT f.id, f.name, d.id::int8, d.name, d.secret_sha256, d.revoked
            FROM devices d JOIN farms f ON f.id = d.farm_id WHERE d.key_id = \(keyID)
            """
        ) { row in
            let (farmID, farm, rowID, name, hash, revoked) = try row.decode((Int64, String, Int64, String, ByteBuffer, Bool).self)
            return DeviceCredential(
                identity: DeviceIdentity(farmID: farmID, farm: farm, rowID: rowID, device: try pgDeviceID(name)),
                secretHash: Array(hash.readableBytesView), revoked: revoked)
        }.first
    }

    public func readTokenCredential(keyID: String) async throws -> ReadTokenCredential? {
        try await rows(
            "SELECT f.id, f.name, t.role, t.secret_sha256, t.revoked FROM read_tokens t JOIN farms f ON f.id = t.farm_id WHERE t.key_id = \(keyID)"
        ) { row in
            let (farmID, farm, roleText, hash, revoked) = try row.decode((Int64, String, String, ByteBuffer, Bool).self)
            guard let role = ReadRole(rawValue: roleText) else { throw IngestStoreError.corrupt("read token role '\(roleText)'") }
            return ReadTokenCredential(farm: FarmRecord(id: farmID, name: farm), role: role, secretHash: Array(hash.readableBytesView), revoked: revoked)
        }.first
    }

    // MARK: Administration

    public func createFarm(name: String, createdAt: Timestamp) async throws -> FarmRecord {
        do {
            let ids = try await transaction { connection in
                var ids: [Int64] = []
                for try await id in try await connection.query(
                    "INSERT INTO farms(name, created_at_us) VALUES (\(name), \(createdAt.microseconds)) RETURNING id", logger: self.logger
                ).decode(Int64.self) { ids.append(id) }
                return ids
            }
            guard let id = ids.first else { throw IngestStoreError.corrupt("creating farm '\(name)' returned no id") }
            return FarmRecord(id: id, name: name)
        } catch let error as PSQLError where error.isUniqueViolation {
            throw IngestStoreError.alreadyExists("farm '\(name)'")
        }
    }

    public func farm(named name: String) async throws -> FarmRecord? {
        try await rows("SELECT id, name FROM farms WHERE name = \(name)") { row in
            let (id, name) = try row.decode((Int64, String).self)
            return FarmRecord(id: id, name: name)
        }.first
    }

    public func createDevice(farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], createdAt: Timestamp) async throws
        -> DeviceIdentity
    {
        let hash = ByteBuffer(bytes: secretHash)
        do {
            return try await transaction { connection in
                var farmID: Int64?
                for try await id in try await connection.query("SELECT id FROM farms WHERE name = \(farm)", logger: self.logger).decode(Int64.self) {
                    farmID = id
                }
                guard let farmID else { throw IngestStoreError.notFound("farm '\(farm)'") }
                var rowID: Int64?
                for try await id in try await connection.query(
                    """
                    INSERT INTO devices(farm_id, name, key_id, secret_sha256, created_at_us)
                    VALUES (\(farmID), \(device.rawValue), \(keyID), \(hash), \(createdAt.microseconds))
                    ON CONFLICT (farm_id, name) DO NOTHING RETURNING id::int8
                    """, logger: self.logger
                ).decode(Int64.self) { rowID = id }
                guard let rowID else { throw IngestStoreError.alreadyExists("device '\(device)' in farm '\(farm)'") }
                return DeviceIdentity(farmID: farmID, farm: farm, rowID: rowID, device: device)
            }
        } catch let error as PSQLError where error.isUniqueViolation {
            throw IngestStoreError.alreadyExists("API key id '\(keyID)'")
        }
    }

    @discardableResult
    public func revokeDevice(farm: String, device: DeviceID, revokedAt: Timestamp) async throws -> Bool {
        // The row locked before the update, so that of two revocations at once exactly one reports that it revoked.
        let before = try await rows(
            """
            WITH old AS (
                SELECT id, revoked FROM devices
                WHERE name = \(device.rawValue) AND farm_id = (SELECT id FROM farms WHERE name = \(farm)) FOR UPDATE
            )
            UPDATE devices SET revoked = true, revoked_at_us = coalesce(devices.revoked_at_us, \(revokedAt.microseconds))
            FROM old WHERE devices.id = old.id RETURNING old.revoked
            """
        ) { try $0.decode(Bool.self) }
        guard let wasRevoked = before.first, before.count == 1 else { throw IngestStoreError.notFound("device '\(device)' in farm '\(farm)'") }
        return !wasRevoked
    }

    public func rotateDeviceKey(farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], rotatedAt: Timestamp) async throws {
        let hash = ByteBuffer(bytes: secretHash)
        let changed: [Int64]
        do {
            changed = try await rows(
                """
                UPDATE devices SET key_id = \(keyID), secret_sha256 = \(hash), revoked = false, revoked_at_us = NULL
                WHERE name = \(device.rawValue) AND farm_id = (SELECT id FROM farms WHERE name = \(farm)) RETURNING id::int8
                """
            ) { try $0.decode(Int64.self) }
        } catch let error as PSQLError where error.isUniqueViolation {
            throw IngestStoreError.alreadyExists("API key id '\(keyID)'")
        }
        guard changed.count == 1 else { throw IngestStoreError.notFound("device '\(device)' in farm '\(farm)'") }
    }

    public func createReadToken(farm: String, role: ReadRole, keyID: String, secretHash: [UInt8], createdAt: Timestamp) async throws {
        let hash = ByteBuffer(bytes: secretHash)
        let inserted: [Int64]
        do {
            inserted = try await rows(
                """
                INSERT INTO read_tokens(farm_id, role, key_id, secret_sha256, created_at_us)
                SELECT id, \(role.rawValue), \(keyID), \(hash), \(createdAt.microseconds) FROM farms WHERE name = \(farm) RETURNING id
                """
            ) { try $0.decode(Int64.self) }
        } catch let error as PSQLError where error.isUniqueViolation {
            throw IngestStoreError.alreadyExists("token id '\(keyID)'")
        }
        guard inserted.count == 1 else { throw IngestStoreError.notFound("farm '\(farm)'") }
    }

    public func farms() async throws -> [FarmRecord] {
        try await rows("SELECT id::int8, name FROM farms ORDER BY name COLLATE \"C\"") { row in
            let (id, name) = try row.decode((Int64, String).self)
            return FarmRecord(id: id, name: name)
        }
    }

    public func readTokens(farm: String?) async throws -> [ReadTokenRecord] {
        try await rows(
            """
            SELECT t.key_id, f.name, t.role, t.created_at_us, t.revoked FROM read_tokens t JOIN farms f ON f.id = t.farm_id
            WHERE \(farm)::text IS NULL OR f.name = \(farm) ORDER BY t.created_at_us DESC, t.id DESC
            """
        ) { row in
            let (keyID, farmName, roleText, created, revoked) = try row.decode((String, String, String, Int64, Bool).self)
            guard let role = ReadRole(rawValue: roleText) else { throw IngestStoreError.corrupt("read token role '\(roleText)'") }
            return ReadTokenRecord(keyID: keyID, farm: farmName, role: role, createdAt: Timestamp(microseconds: created), revoked: revoked)
        }
    }

    public func revokeReadToken(keyID: String) async throws -> Bool {
        // One statement: the row as it was (`old.revoked`) and whether this statement changed it.
        let found = try await rows(
            """
            WITH old AS (SELECT id, revoked FROM read_tokens WHERE key_id = \(keyID) FOR UPDATE)
            UPDATE read_tokens t SET revoked = true FROM old WHERE t.id = old.id RETURNING NOT old.revoked
            """
        ) { try $0.decode(Bool.self) }
        guard let changed = found.first else { throw IngestStoreError.notFound("read token '\(keyID)'") }
        return changed
    }

    public func devices(farmID: Int64) async throws -> [DeviceIdentity] {
        try await rows(
            "SELECT f.name, d.id::int8, d.name FROM devices d JOIN farms f ON f.id = d.farm_id WHERE d.farm_id = \(farmID) ORDER BY d.name COLLATE \"C\""
        ) { row in
            let (farm, rowID, name) = try row.decode((String, Int64, String).self)
            return DeviceIdentity(farmID: farmID, farm: farm, rowID: rowID, device: try pgDeviceID(name))
        }
    }

    /// Reads the device's chunks in `first_sequence` order, a page of chunks at a time, until `limit` readings above
    /// `afterSequence` are known to be the lowest: chunks interleave (one per sensor), but none holds a sequence below
    /// its own first, so once the chunks starting up to `f` are read, every stored sequence up to `f` is known.
    public func exportPage(device: DeviceIdentity, afterSequence: UInt64?, limit: Int) async throws -> [ExportRow] {
        let after = afterSequence.map { Int64(clamping: $0) } ?? -1
        guard limit > 0 else { return [] }
        var paging = ChunkPaging(limit: limit)
        var cursor = after - PostgresReadingChunk.maximumSequenceSpan - 1
        var found: [(entry: PostgresReadingChunk.Entry, sensor: String)] = []
        while true {
            let chunksPerPage = paging.size
            let page = try await rows(
                """
                SELECT s.name, r.first_sequence, r.first_ts, r.sequence_offsets, r.time_offsets, r.reading_values, r.flags
                FROM readings r JOIN sensors s ON s.id = r.sensor_id
                WHERE r.device_id = \(device.rowID) AND r.first_sequence > \(cursor) AND r.last_sequence > \(after)
                ORDER BY r.first_sequence LIMIT \(chunksPerPage)
                """
            ) { row in
                let (sensor, first, firstTimestamp, sequenceOffsets, timeOffsets, values, flags) = try row.decode(
                    (String, Int64, Int64, [Int32], [Int32], [Double], [Int16]?).self)
                let entries = try PostgresReadingChunk.entries(
                    firstSequence: first, firstTimestamp: firstTimestamp, sequenceOffsets: sequenceOffsets, timeOffsets: timeOffsets, values: values,
                    flags: flags)
                return (first, entries.map { (entry: $0, sensor: sensor) })
            }
            for (_, entries) in page { found += entries.filter { $0.entry.sequence > after } }
            guard let last = page.last?.0, page.count == chunksPerPage else { break }
            cursor = last
            // Every sequence up to `last` is known now.
            let known = found.lazy.filter({ $0.entry.sequence <= last }).count
            if known >= limit { break }
            paging.read(chunks: page.count, readings: page.reduce(0) { $0 + $1.1.count }, known: known)
        }
        found.sort { $0.entry.sequence < $1.entry.sequence }
        return try found.prefix(limit).map { item in
            ExportRow(
                device: device.device, sensor: try pgSensorID(item.sensor), sequence: UInt64(clamping: item.entry.sequence),
                timestamp: Timestamp(microseconds: item.entry.timestamp), value: item.entry.value,
                quality: QualityFlags(rawValue: UInt16(bitPattern: item.entry.flags)))
        }
    }

    // MARK: Reading

    public func latestReadings(farmID: Int64) async throws -> [LatestReading] {
        try await rows(
            """
            SELECT d.name, s.quantity, s.name, l.sequence, l.timestamp_us, l.value, l.flags
            FROM latest l JOIN sensors s ON s.id = l.sensor_id JOIN devices d ON d.id = s.device_id
            WHERE d.farm_id = \(farmID) ORDER BY d.name COLLATE "C", s.name COLLATE "C"
            """
        ) { row in
            let (device, quantity, sensor, sequence, timestamp, value, flags) = try row.decode((String, String, String, Int64, Int64, Double, Int16).self)
            return try Self.latestRow(sensor, sequence, timestamp, value, flags).latestReading(device: try pgDeviceID(device), quantity: try pgQuantity(quantity))
        }
    }

    /// A `latest` row from its columns `s.name, l.sequence, l.timestamp_us, l.value, l.flags` as decoded.
    static func latestRow(_ sensor: String, _ sequence: Int64, _ timestamp: Int64, _ value: Double, _ flags: Int16) -> LatestRow {
        LatestRow(sensor: sensor, sequence: sequence, timestamp: timestamp, value: value, flags: Int64(flags))
    }

    public func sensor(farmID: Int64, device: DeviceID, sensor: SensorID) async throws -> SensorRecord? {
        try await rows(
            """
            SELECT s.id::int8, s.quantity FROM sensors s JOIN devices d ON d.id = s.device_id
            WHERE d.farm_id = \(farmID) AND d.name = \(device.rawValue) AND s.name = \(sensor.rawValue)
            """
        ) { row in
            let (rowID, quantity) = try row.decode((Int64, String).self)
            return SensorRecord(rowID: rowID, device: device, sensor: sensor, quantity: try pgQuantity(quantity))
        }.first
    }

    /// Reads the sensor's chunks in `first_ts` order, a page of chunks at a time, until `limit` readings are known to
    /// be the earliest in the range (no chunk holds a time before its own first, nor spans more than
    /// ``PostgresReadingChunk/maximumTimeSpan``, which bounds the scan's start).
    public func readings(sensorRowID: Int64, from: Timestamp?, to: Timestamp?, limit: Int) async throws -> [StoredReading] {
        let low = from?.microseconds ?? Int64.min
        let high = to?.microseconds ?? Int64.max
        guard limit > 0, low < high else { return [] }
        var paging = ChunkPaging(limit: limit)
        var cursor = (timestamp: low < Int64.min + PostgresReadingChunk.maximumTimeSpan ? Int64.min : low - PostgresReadingChunk.maximumTimeSpan, sequence: Int64.min)
        var found: [PostgresReadingChunk.Entry] = []
        while true {
            let chunksPerPage = paging.size
            let page = try await rows(
                """
                SELECT first_sequence, first_ts, sequence_offsets, time_offsets, reading_values, flags FROM readings
                WHERE sensor_id = \(sensorRowID) AND first_ts >= \(cursor.timestamp) AND (first_ts, first_sequence) > (\(cursor.timestamp), \(cursor.sequence))
                    AND first_ts < \(high) AND last_ts >= \(low)
                ORDER BY first_ts, first_sequence LIMIT \(chunksPerPage)
                """
            ) { row in
                let (first, firstTimestamp, sequenceOffsets, timeOffsets, values, flags) = try row.decode(
                    (Int64, Int64, [Int32], [Int32], [Double], [Int16]?).self)
                let entries = try PostgresReadingChunk.entries(
                    firstSequence: first, firstTimestamp: firstTimestamp, sequenceOffsets: sequenceOffsets, timeOffsets: timeOffsets, values: values,
                    flags: flags)
                return (firstTimestamp, first, entries)
            }
            for (_, _, entries) in page { found += entries.filter { $0.timestamp >= low && $0.timestamp < high } }
            guard let last = page.last, page.count == chunksPerPage else { break }
            cursor = (last.0, last.1)
            // Every reading before `last`'s first time is known now.
            let known = found.lazy.filter({ $0.timestamp < last.0 }).count
            if known >= limit { break }
            paging.read(chunks: page.count, readings: page.reduce(0) { $0 + $1.2.count }, known: known)
        }
        found.sort { ($0.timestamp, $0.sequence) < ($1.timestamp, $1.sequence) }
        return found.prefix(limit).map { entry in
            StoredReading(
                sequence: UInt64(clamping: entry.sequence), timestamp: Timestamp(microseconds: entry.timestamp), value: entry.value,
                quality: QualityFlags(rawValue: UInt16(bitPattern: entry.flags)))
        }
    }
}

/// Problems specific to the PostgreSQL store.
public enum PostgresStoreError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The database was migrated by a newer `farmgate-ingest`.
    case schemaTooNew(found: Int, known: Int)
    /// The TLS settings cannot be used.
    case tls(String)
    /// A call took longer than `query_timeout`.
    case timedOut(String)
    /// The database is known to be unreachable: the call was refused at once (``PostgresAvailability``). `retry` says
    /// what the running service does about it, which is not true of a command that exits on it.
    case unavailable(String, retry: String? = nil)

    public var description: String {
        switch self {
        case .unavailable(let message, let retry?): "\(message); \(retry)"
        default: outsideTheService
        }
    }

    /// The description without what the running service does about it (``unavailable(_:retry:)``): for `serve`
    /// exiting on it.
    public var outsideTheService: String {
        switch self {
        case .schemaTooNew(let found, let known):
            "the database schema is at version \(found), newer than this farmgate-ingest knows (\(known)); run a newer farmgate-ingest"
        case .tls(let message), .timedOut(let message), .unavailable(let message, _): message
        }
    }
}

extension PSQLError {
    var isUniqueViolation: Bool { serverInfo?[.sqlState] == PostgresError.Code.uniqueViolation.raw }
}

func pgDeviceID(_ text: String) throws -> DeviceID {
    do { return try DeviceID(text) } catch { throw IngestStoreError.corrupt(error.description) }
}

func pgSensorID(_ text: String) throws -> SensorID {
    do { return try SensorID(text) } catch { throw IngestStoreError.corrupt(error.description) }
}

func pgQuantity(_ text: String) throws -> Quantity {
    guard let quantity = Quantity(rawValue: text) else { throw IngestStoreError.corrupt("quantity '\(text)'") }
    return quantity
}
