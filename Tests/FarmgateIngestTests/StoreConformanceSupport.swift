import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import PostgresNIO
import Testing

@testable import FarmgateIngest

/// The stores the conformance suite runs against.
enum StoreKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite, postgres
    var testDescription: String { rawValue }
}

/// Why a PostgreSQL test cannot run: it fails (never skips) with what to do.
struct MissingTestDatabase: Error, CustomStringConvertible {
    var description: String {
        "FARMGATE_TEST_DATABASE_URL is not set: PostgreSQL tests need a server. Run them through `make test`, or "
            + "`.ci/with-postgres swift test --filter ...` (it starts a throwaway cluster); they fail rather than skip"
    }
}

/// A fresh, migrated store of `kind`, running while `body` uses it: SQLite in a temporary file, PostgreSQL in a database
/// of its own created on the test server (dropped afterwards), so that tests run in parallel without seeing each other.
func withFreshStore<T: Sendable>(
    _ kind: StoreKind, sensorsPerDevice: Int = IngestConfiguration.Limits.defaultSensorsPerDevice,
    _ body: @Sendable (any IngestStore) async throws -> T
) async throws -> T {
    switch kind {
    case .sqlite:
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let store = try SQLiteIngestStore(path: directory.path + "/ingest.sqlite", sensorsPerDevice: sensorsPerDevice, logger: testLogger)
        return try await withRunning(store) { store in
            try await store.migrate()
            return try await body(store)
        }
    case .postgres:
        return try await withTestDatabase(migrated: true) { settings in
            let store = try PostgresIngestStore(settings: settings, sensorsPerDevice: sensorsPerDevice, logger: testLogger)
            return try await withRunning(store) { store in
                try await store.migrate()
                return try await body(store)
            }
        }
    }
}

/// The settings of a new database on the test server, dropped after `body`: empty, or with `migrated` a copy of one
/// that every migration was applied to (``MigratedTemplate``).
func withTestDatabase<T: Sendable>(migrated: Bool = false, _ body: @Sendable (PostgresSettings) async throws -> T) async throws -> T {
    guard let url = ProcessInfo.processInfo.environment["FARMGATE_TEST_DATABASE_URL"], !url.isEmpty else { throw MissingTestDatabase() }
    let base = try PostgresSettings(url: url)
    let name = "farmgate_t_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "")
    if migrated {
        try await adminQuery(base, "CREATE DATABASE \(name) TEMPLATE \(try await MigratedTemplate.shared.name(base))")
    } else {
        try await adminQuery(base, "CREATE DATABASE \(name)")
    }
    var settings = base
    settings.database = name
    settings.poolSize = 4
    do {
        let result = try await body(settings)
        try? await adminQuery(base, "DROP DATABASE IF EXISTS \(name) WITH (FORCE)")
        return result
    } catch {
        try? await adminQuery(base, "DROP DATABASE IF EXISTS \(name) WITH (FORCE)")
        throw error
    }
}

/// A database every migration was applied to, made once per test process, that ``withTestDatabase(migrated:_:)``
/// copies (`CREATE DATABASE ... TEMPLATE`, a copy of its files). Migrating each test's database itself is a hundred
/// round trips in one transaction; a hundred tests doing so at once beside the first pass's CPU-bound suites took
/// longer than the store's `query_timeout` did then (CI, 2026-12-06). The store's migration in each test still runs,
/// finds the schema current, and makes its partitions. Left in the throwaway cluster (.ci/with-postgres) at the end.
actor MigratedTemplate {
    static let shared = MigratedTemplate()
    private var made: Task<String, any Error>?

    func name(_ base: PostgresSettings) async throws -> String {
        if let made { return try await made.value }
        let making = Task { try await Self.make(base) }
        made = making
        do {
            return try await making.value
        } catch {
            // The next test tries again rather than every later one failing with this error.
            if made == making { made = nil }
            throw error
        }
    }

    private static func make(_ base: PostgresSettings) async throws -> String {
        let name = "farmgate_template_" + UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "")
        try await adminQuery(base, "CREATE DATABASE \(name)")
        var settings = base
        settings.database = name
        settings.poolSize = 2
        let store = try PostgresIngestStore(settings: settings, logger: testLogger)
        try await withRunning(store) { store in _ = try await store.migrate() }
        // No session may stay on a template while it is copied (PostgreSQL waits 5 s for them, then refuses).
        try await adminQuery(base, "ALTER DATABASE \(name) WITH ALLOW_CONNECTIONS false")
        try await adminQuery(
            base, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '\(name)' AND pid <> pg_backend_pid()")
        return name
    }
}

/// Runs `body` with a client of its own on the database `settings` names: a session apart from a store's pool.
func withTestClient<T: Sendable>(_ settings: PostgresSettings, _ body: @Sendable (PostgresClient) async throws -> T) async throws -> T {
    guard case .unixSocket(let path) = settings.endpoint else { throw MissingTestDatabase() }
    let client = PostgresClient(
        configuration: .init(unixSocketPath: path, username: settings.username, password: settings.password, database: settings.database))
    let run = Task { await client.run() }
    do {
        let result = try await body(client)
        await stop(run)
        return result
    } catch {
        await stop(run)
        throw error
    }
}

/// Cancels a client's `run()` and waits for it at most 10 s. A cancelled `run()` has been seen not to return: `make
/// test`'s first pass then hung with every statement of the test done (its database made, or dropped, and no
/// connection open), until CI's time limit. The store's own pools are left behind the same way after
/// `PostgresAvailability.shutdownGrace`.
private func stop(_ run: Task<Void, Never>) async {
    run.cancel()
    if await FarmgateSupport.withDeadline(.seconds(10), { await run.value }) == nil {
        // Said where the pass's log shows it: how often this happens is worth knowing.
        FileHandle.standardError.write(Data("PostgreSQL test client: run() did not return within 10 s of its cancellation; left behind\n".utf8))
    }
}

/// A statement on the test server's maintenance database that takes longer than this fails the test instead of
/// holding it (CREATE and DROP DATABASE take well under a second).
private let adminQueryTimeout: Duration = .seconds(120)

struct AdminQueryTimedOut: Error, CustomStringConvertible {
    let sql: String
    var description: String { "no answer from the test server within \(adminQueryTimeout) to: \(sql)" }
}

/// The PostgreSQL schema as migrations 1 through `version` left it, in the database `settings` names, each recorded in
/// `schema_migrations`: the starting point of an upgrade test.
func postgresSchema(migratedTo version: Int, _ settings: PostgresSettings) async throws {
    try await adminQuery(settings, PostgresSchema.bookkeeping)
    for migration in PostgresSchema.migrations where migration.version <= version {
        for statement in migration.statements { try await adminQuery(settings, statement) }
        try await adminQuery(settings, "INSERT INTO schema_migrations VALUES (\(migration.version), '\(migration.name.replacingOccurrences(of: "'", with: "''"))', 0)")
    }
}

/// Runs one statement on the test server's maintenance database.
func adminQuery(_ settings: PostgresSettings, _ sql: String) async throws {
    guard case .unixSocket(let path) = settings.endpoint else { throw MissingTestDatabase() }
    let configuration = PostgresClient.Configuration(unixSocketPath: path, username: settings.username, password: settings.password, database: settings.database)
    let client = PostgresClient(configuration: configuration)
    let run = Task { await client.run() }
    let outcome: Result<Void, any Error>? = await FarmgateSupport.withDeadline(adminQueryTimeout) {
        do {
            try await client.query(PostgresQuery(unsafeSQL: sql))
            return .success(())
        } catch {
            return .failure(error)
        }
    }
    await stop(run)
    guard let outcome else { throw AdminQueryTimedOut(sql: sql) }
    try outcome.get()
}

/// What a store counted for a batch, without the readings it returns (``StoreOutcome/fresh``).
struct Tally: Hashable {
    var accepted: Int
    var duplicates: Int
    var rejected: Int
}

extension StoreOutcome {
    var tally: Tally { Tally(accepted: accepted, duplicates: duplicates, rejected: rejected.count) }
}

/// Opens a new SQLite ingest file at `path` with the schema as it was after migration `version` (for tests of the
/// migrations after it); call it off the concurrency pool.
func sqliteIngestFile(at path: String, migratedTo version: Int) throws -> SQLiteConnection {
    let db = try SQLiteConnection(path: path)
    try db.execute(SQLiteSchema.bookkeeping)
    for migration in SQLiteSchema.migrations where migration.version <= version {
        try db.execute(migration.sql)
        try db.query("INSERT INTO schema_migrations(version, name, applied_at_us) VALUES (?, ?, 0)", [.integer(Int64(migration.version)), .text(migration.name)])
    }
    return db
}
