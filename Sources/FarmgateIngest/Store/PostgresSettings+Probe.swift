public import Logging
import PostgresNIO

/// What one connection attempt outside the pool found (``PostgresSettings/probe(logger:)``).
public enum PostgresProbe: Sendable, Hashable {
    /// The connection opened and authenticated.
    case connected
    /// The server answered and refused for good: a database that does not exist (`3D000`), a role or password it does
    /// not accept (class `28`). Waiting will not help; the settings must change.
    case refused(sqlState: String, message: String)
    /// No connection, for a reason that may pass (the server down or starting, refused connections, too many clients, a
    /// network error, no answer within `connect_timeout`): what happened, for the operator.
    case unreachable(String)

    /// Whether the server's refusal is one that waiting does not cure (see ``refused(sqlState:message:)``).
    static func isFinal(sqlState: String) -> Bool {
        sqlState == "3D000" || sqlState.hasPrefix("28")
    }
}

extension PostgresSettings {
    /// Opens one connection with these settings outside any pool, bounded by `connect_timeout`, and closes it: what the
    /// server said, when it said something.
    ///
    /// postgres-nio's pool retries a connection that fails and never reports why, so a store call made with a wrong
    /// database or user waits for `query_timeout` and then says only that nothing answered; the command-line tool asks
    /// this first, and names the server's own error (``PostgresProbe/refused(sqlState:message:)``) at once.
    public func probe(logger: Logger) async -> PostgresProbe {
        let configuration: PostgresConnection.Configuration
        do {
            configuration = try connectionConfiguration()
        } catch {
            return .unreachable("\(error)")
        }
        switch await Self.attempt(configuration: configuration, limit: connectTimeout, logger: logger, then: { _ in }) {
        case nil:
            return .unreachable("no connection within connect_timeout (\(connectTimeout))")
        case .success:
            return .connected
        case .failure(let error):
            if let (state, message) = Self.serverRefusal(error) {
                return PostgresProbe.isFinal(sqlState: state) ? .refused(sqlState: state, message: message) : .unreachable("\(state) \(message)")
            }
            return .unreachable(Self.describe(error))
        }
    }

    /// Whether the database answers, for ``PostgresAvailability``: one connection outside the pool that runs `SELECT 1`
    /// (behind PgBouncer, a connection alone proves only that PgBouncer answers), all within `connect_timeout`.
    ///
    /// - Returns: nil when it answers, or when the server said it has no room for another connection (SQLSTATE class
    ///   53: it is up, and the pool's own connections stand); else what happened, for the log.
    static func unreachability(configuration: PostgresConnection.Configuration, limit: Duration, logger: Logger) async -> String? {
        let outcome = await attempt(configuration: configuration, limit: limit, logger: logger) { connection in
            try await connection.query("SELECT 1", logger: logger)
        }
        switch outcome {
        case nil:
            return "no answer within connect_timeout (\(limit))"
        case .success:
            return nil
        case .failure(let error):
            if let (state, message) = serverRefusal(error) { return state.hasPrefix("53") ? nil : "\(state) \(message)" }
            return describe(error)
        }
    }

    /// Opens one connection with `configuration`, runs `body` on it and closes it, all bounded by `limit`: nil when the
    /// limit passed first.
    private static func attempt(
        configuration: PostgresConnection.Configuration, limit: Duration, logger: Logger,
        then body: @escaping @Sendable (PostgresConnection) async throws -> Void
    ) async -> Result<Void, any Error>? {
        await withTaskGroup(of: Result<Void, any Error>?.self) { group in
            group.addTask {
                let connection: PostgresConnection
                do {
                    connection = try await PostgresConnection.connect(configuration: configuration, id: 0, logger: logger)
                } catch {
                    return .failure(error)
                }
                // Closed whatever `body` did, and also when the deadline answered first (the task is cancelled then).
                let result: Result<Void, any Error>
                do {
                    // A statement that gets no answer ends with its connection when the deadline passes.
                    try await withTaskCancellationHandler {
                        try await body(connection)
                    } onCancel: {
                        _ = connection.close() as EventLoopFuture<Void>
                    }
                    result = .success(())
                } catch {
                    result = .failure(error)
                }
                try? await connection.close()
                return result
            }
            // connect_timeout bounds the socket's connect; this also bounds a server that accepts and then says nothing.
            group.addTask {
                try? await Task.sleep(for: limit)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
    }

    /// The server's SQLSTATE and message when `error` is the server's own answer.
    private static func serverRefusal(_ error: any Error) -> (state: String, message: String)? {
        guard let error = error as? PSQLError, let info = error.serverInfo, let state = info[.sqlState] else { return nil }
        return (state, info[.message] ?? "(no message)")
    }

    /// A connection error for an operator: postgres-nio's `PSQLError.description` hides the underlying error (it may
    /// name hosts), which is what says why a connection failed; the command-line tool shows it to the one who configured it.
    private static func describe(_ error: any Error) -> String {
        guard let error = error as? PSQLError else { return "\(error)" }
        if let underlying = error.underlying { return "\(underlying)" }
        return String(reflecting: error)
    }
}
