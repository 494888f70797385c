import Logging
import PostgresNIO

extension Logger {
    /// Logs a store call that failed, whose request is answered 503: at `level`, or at debug when the store refused it
    /// at once because its database is known to be down (``PostgresStoreError/unavailable(_:)``). The store logged that
    /// once, when the database went away: an outage is not an error line per request.
    func storeFailure(_ message: Logger.Message, level: Logger.Level = .error, error: any Error, metadata: Logger.Metadata = [:]) {
        var metadata = metadata
        metadata["error"] = "\(Self.describe(storeError: error))"
        if case .unavailable? = error as? PostgresStoreError {
            log(level: .debug, message, metadata: metadata)
        } else {
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
