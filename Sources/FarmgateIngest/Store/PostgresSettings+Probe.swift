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
        let limit = connectTimeout
        let outcome: Result<PostgresConnection, any Error>? = await withTaskGroup(of: Result<PostgresConnection, any Error>?.self) { group in
            group.addTask {
                do {
                    return .success(try await PostgresConnection.connect(configuration: configuration, id: 0, logger: logger))
                } catch {
                    return .failure(error)
                }
            }
            // connect_timeout bounds the socket's connect; this also bounds a server that accepts and then says nothing.
            group.addTask {
                try? await Task.sleep(for: limit)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            // A connection that opened after the deadline answered is closed here.
            for await late in group {
                if case .success(let connection)? = late { try? await connection.close() }
            }
            return first
        }
        switch outcome {
        case nil:
            return .unreachable("no connection within connect_timeout (\(limit))")
        case .success(let connection)?:
            try? await connection.close()
            return .connected
        case .failure(let error)?:
            if let error = error as? PSQLError, let info = error.serverInfo, let state = info[.sqlState] {
                let message = info[.message] ?? "(no message)"
                return PostgresProbe.isFinal(sqlState: state) ? .refused(sqlState: state, message: message) : .unreachable("\(state) \(message)")
            }
            return .unreachable(Self.describe(error))
        }
    }

    /// A connection error for an operator: postgres-nio's `PSQLError.description` hides the underlying error (it may
    /// name hosts), which is what says why a connection failed; the command-line tool shows it to the one who configured it.
    private static func describe(_ error: any Error) -> String {
        guard let error = error as? PSQLError else { return "\(error)" }
        if let underlying = error.underlying { return "\(underlying)" }
        return String(reflecting: error)
    }
}
