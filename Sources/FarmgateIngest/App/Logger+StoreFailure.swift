import Logging
import PostgresNIO

extension Logger {
    /// Logs a store call that failed, whose request is answered 503: at `level`, or at debug when the store refused it
    /// at once because its database is known to be down (``PostgresStoreError/unavailable(_:)``) or its SQLite file gone
    /// (``SQLiteIngestStoreError/fileReplaced(path:problem:)``), or when `/readyz` reports the last upload's full disk
    /// (``SQLiteIngestStoreError/diskFull(path:)``). The store logged that once, or the failed commit did: an outage is
    /// not an error line per request or per probe.
    func storeFailure(_ message: Logger.Message, level: Logger.Level = .error, error: any Error, metadata: Logger.Metadata = [:]) {
        var metadata = metadata
        metadata["error"] = "\(Self.describe(storeError: error))"
        switch error {
        case PostgresStoreError.unavailable, SQLiteIngestStoreError.fileReplaced, SQLiteIngestStoreError.diskFull:
            log(level: .debug, message, metadata: metadata)
        default:
            log(level: level, message, metadata: metadata)
        }
    }

    /// What an operator needs of a store error: for PostgreSQL's errors, whose description is one generic sentence
    /// ("Generic description to prevent accidental leakage of sensitive data"), the server's SQLSTATE and message, or
    /// the connection error under it; any other error as it describes itself.
    public static func describe(storeError error: any Error) -> String {
        guard let error = error as? PSQLError else { return "\(error)" }
        if let info = error.serverInfo {
            return "PostgreSQL \(info[.sqlState] ?? "?????"): \(info[.message] ?? "(no message)")" + (info[.detail].map { " (\($0))" } ?? "")
                + (info[.hint].map { "; hint: \($0)" } ?? "")
        }
        if let underlying = error.underlying { return "PostgreSQL connection: \(underlying)" }
        return "PostgreSQL: \(error.code)"
    }

    /// Whether `error` is PostgreSQL's (whose own description says nothing: describe it with ``describe(storeError:)``).
    public static func isDatabaseError(_ error: any Error) -> Bool { error is PSQLError }
}
