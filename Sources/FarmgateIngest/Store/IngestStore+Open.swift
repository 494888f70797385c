public import Logging
import FarmgateSupport
import ServiceLifecycle

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
public func withRunning<T: Sendable>(_ store: any IngestStore, _ body: @Sendable (any IngestStore) async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await store.run() }
        defer { group.cancelAll() }
        return try await body(store)
    }
}
