import Logging

extension Logger {
    /// Logs a store call that failed, whose request is answered 503: at `level`, or at debug when the store refused it
    /// at once because its database is known to be down (``PostgresStoreError/unavailable(_:)``). The store logged that
    /// once, when the database went away: an outage is not an error line per request.
    func storeFailure(_ message: Logger.Message, level: Logger.Level = .error, error: any Error, metadata: Logger.Metadata = [:]) {
        var metadata = metadata
        metadata["error"] = "\(error)"
        if case .unavailable? = error as? PostgresStoreError {
            log(level: .debug, message, metadata: metadata)
        } else {
            log(level: level, message, metadata: metadata)
        }
    }
}
