public import Logging
import FarmgateSupport
import ServiceLifecycle
import Foundation

/// Opens the store `[storage]` names: PostgreSQL when a URL is configured (`[storage] url` or
/// `FARMGATE_INGEST_DATABASE_URL`), else the embedded SQLite file. Does not migrate and opens no PostgreSQL connection
/// yet: run the store (``withRunning(_:_:)`` or a `ServiceGroup`) and call ``StoreMaintenance/migrate()``.
///
/// - Throws: what the store's initialiser throws (an unreadable SQLite file or directory, an unusable CA file).
/// `limits` gives the store its `sensors_per_device`; `retention` tells PostgreSQL's partition maintenance which
/// partitions retention would drop (it does not make them; nil: it makes its whole window).
public func openIngestStore(
    _ storage: IngestConfiguration.Storage, limits: IngestConfiguration.Limits = IngestConfiguration.Limits(),
    retention: IngestConfiguration.Retention? = nil, logger: Logger
) async throws -> any IngestStore {
    let sensorsPerDevice = limits.sensorsPerDevice
    if let postgres = storage.postgres {
        return try PostgresIngestStore(settings: postgres, sensorsPerDevice: sensorsPerDevice, retention: retention, logger: logger)
    }
    let path = storage.path
    return try await runOffPool { try SQLiteIngestStore(path: path, sensorsPerDevice: sensorsPerDevice, logger: logger) }
}

/// Runs `store` (its `run()`, as a `ServiceGroup` would) while `body` uses it, then stops it: for the admin commands and
/// tests, which use a store outside the service.
///
/// The stop waits for `run()` at most ``storeStopLimit``, then leaves it behind, saying so on standard error: a
/// PostgreSQL store's `run()`, cancelled, has been seen not to return in a loaded test process (the test then never
/// ended; its connections were all closed), and a command must end.
public func withRunning<T: Sendable>(_ store: any IngestStore, _ body: @Sendable (any IngestStore) async throws -> T) async throws -> T {
    let running = Task { try await store.run() }
    let result: Result<T, any Error>
    do {
        result = .success(try await body(store))
    } catch {
        result = .failure(error)
    }
    running.cancel()
    if await FarmgateSupport.withDeadline(storeStopLimit, { _ = await running.result }) == nil {
        FileHandle.standardError.write(
            Data("farmgate-ingest: the store did not stop within \(storeStopLimit) of being asked to; going on without it\n".utf8))
    }
    return try result.get()
}

/// How long ``withRunning(_:_:)`` waits for the store's `run()` to end once cancelled.
let storeStopLimit: Duration = .seconds(15)
