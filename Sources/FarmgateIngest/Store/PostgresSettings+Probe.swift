public import Logging
import PostgresNIO
import Synchronization

/// Why ``PostgresAvailability``'s check failed: what happened, and whether the server refuses these settings (a
/// certificate, TLS, a password, a database: the settings must change) rather than being out of reach.
struct PostgresCheckFailure: Sendable, Hashable {
    let reason: String
    let configuration: Bool
}

/// What one check of the database found (``PostgresSettings/check(configuration:logger:)``): a failure, or when the
/// server that answered started (nil when it could not tell).
struct PostgresCheckResult: Sendable, Hashable {
    var failure: PostgresCheckFailure?
    var serverStart: String?

    init(failure: PostgresCheckFailure? = nil, serverStart: String? = nil) {
        self.failure = failure
        self.serverStart = serverStart
    }
}

/// What one connection attempt outside the pool found (``PostgresSettings/probe(logger:)``).
public enum PostgresProbe: Sendable, Hashable {
    /// The connection opened and authenticated.
    case connected
    /// The server answered and refused for good: a database that does not exist (`3D000`; PgBouncer's `08P01 no such
    /// database`), a role or password it does not accept (class `28`; PgBouncer's `no such user`). Waiting will not
    /// help; the settings must change.
    case refused(sqlState: String, message: String)
    /// The server answered, and these settings cannot work with it: its certificate does not verify or does not name
    /// the host (`verify-full`), it offers no TLS and the settings require it, it asks for a password the URL lacks.
    /// What to tell the operator, with the fix.
    case misconfigured(String)
    /// No connection, for a reason that may pass (the server down or starting, refused connections, too many clients, a
    /// network error, no answer within `connect_timeout`): what happened, for the operator.
    case unreachable(String)

    /// Whether the server's refusal is one that waiting does not cure (see ``refused(sqlState:message:)``).
    static func isFinal(sqlState: String, message: String = "") -> Bool {
        if sqlState == "3D000" || sqlState.hasPrefix("28") { return true }
        // PgBouncer answers every refusal with 08P01: its own (`no such database: x`, `no such user`) and the server's
        // login errors it passes on (`database "x" does not exist`, `password authentication failed ...`) are for good;
        // `pgbouncer cannot connect to server` and its timeouts are not.
        guard sqlState == "08P01" else { return false }
        return message.hasPrefix("no such database") || message.hasPrefix("no such user") || message.contains("does not exist")
            || message.contains("authentication failed")
    }

    /// For ``refused(sqlState:message:)`` and ``misconfigured(_:)``: what is wrong and what to change; nil otherwise.
    public var configurationProblem: String? {
        switch self {
        case .connected, .unreachable: return nil
        case .misconfigured(let message): return message
        case .refused(let state, let message): return "the server refused: \(state) \(message)\(Self.hint(sqlState: state, message: message))"
        }
    }

    private static func hint(sqlState: String, message: String) -> String {
        switch sqlState {
        case "3D000": return "; create the database, or correct the database name in the URL"
        case "28P01": return "; correct the password in the URL (percent-encode its special characters)"
        case "28000": return "; create the role, correct the user in the URL, or allow it in pg_hba.conf"
        case "08P01" where message.contains("database"): return "; create the database or add it to PgBouncer's [databases], or correct the URL"
        case "08P01": return "; check the user and password in the URL against PgBouncer's auth_file and the server"
        default: return ""
        }
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
            return .misconfigured("\(error)")
        }
        // verify-full: the certificate's names checked against the host by libpq's rules first (postgres-nio's check
        // accepts an IP address of the certificate that equals the connected address, whatever the URL names).
        switch await checkServerCertificate() {
        case .wrongHost(let message)?, .refused(let message)?: return .misconfigured(message)
        case .verified?, .noAnswer?, nil: break
        }
        switch await Self.attempt(configuration: configuration, limit: connectTimeout, logger: logger, then: { _ in }) {
        case nil:
            return .unreachable("no connection within connect_timeout (\(connectTimeout))")
        case .success:
            return .connected
        case .failure(let error):
            return classify(error)
        }
    }

    /// A failed connection attempt as ``PostgresProbe``: the server's refusals for good, settings that cannot work with
    /// this server, or something that may pass; in words, without library dumps.
    func classify(_ error: any Error) -> PostgresProbe {
        if let (state, message) = Self.serverRefusal(error) {
            return PostgresProbe.isFinal(sqlState: state, message: message) ? .refused(sqlState: state, message: message) : .unreachable("\(state) \(message)")
        }
        if let error = error as? PSQLError {
            switch error.code {
            case .sslUnsupported:
                return .misconfigured(tlsNotOffered)
            case .authMechanismRequiresPassword:
                return .misconfigured(
                    "the server asks user \(username) for a password and the URL has none; put it in the URL "
                        + "(postgresql://\(username):PASSWORD@..., best in \(IngestConfiguration.databaseURLEnvironmentVariable), percent-encoded)")
            case .unsupportedAuthMechanism:
                return .misconfigured(
                    "the server asks for an authentication method farmgate-ingest does not support (\(Self.describe(error))); use scram-sha-256, md5 or "
                        + "password for this user in pg_hba.conf")
            default:
                break
            }
            if let underlying = error.underlying, Self.isHandshakeFailure(underlying) { return .misconfigured(describeTLSFailure(underlying)) }
        }
        if Self.isHandshakeFailure(error) { return .misconfigured(describeTLSFailure(error)) }
        return .unreachable(Self.describe(error))
    }

    /// Whether the database answers, for ``PostgresAvailability``: for `verify-full`, the certificate's names checked
    /// (``checkServerCertificate()``), then one connection outside the pool that runs a statement (behind PgBouncer, a
    /// connection alone proves only that PgBouncer answers), all within `connect_timeout`. The statement reads when the
    /// server (the postmaster) started: a pool made before that holds only connections a restart ended.
    ///
    /// - Returns: no failure when it answers, or when the server said it has no room for another connection (SQLSTATE
    ///   class 53: it is up, and the pool's own connections stand); else what happened, for the log, and whether it is
    ///   a refusal of these settings (``PostgresProbe/configurationProblem``) rather than an outage. With the start
    ///   time when the statement answered.
    func check(configuration: PostgresConnection.Configuration, logger: Logger) async -> PostgresCheckResult {
        switch await checkServerCertificate() {
        case .wrongHost(let message)?, .refused(let message)?: return PostgresCheckResult(failure: PostgresCheckFailure(reason: message, configuration: true))
        case .verified?, .noAnswer?, nil: break
        }
        let limit = connectTimeout
        let started = Mutex<String?>(nil)
        let outcome = await Self.attempt(configuration: configuration, limit: limit, logger: logger) { connection in
            for try await value in try await connection.query("SELECT pg_postmaster_start_time()::text", logger: logger).decode(String.self) {
                started.withLock { $0 = value }
            }
        }
        switch outcome {
        case nil:
            return PostgresCheckResult(failure: PostgresCheckFailure(reason: "no answer within connect_timeout (\(limit))", configuration: false))
        case .success:
            return PostgresCheckResult(serverStart: started.withLock { $0 })
        case .failure(let error):
            if let (state, _) = Self.serverRefusal(error), state.hasPrefix("53") { return PostgresCheckResult() }
            let probe = classify(error)
            switch probe {
            case .unreachable(let reason): return PostgresCheckResult(failure: PostgresCheckFailure(reason: reason, configuration: false))
            default: return PostgresCheckResult(failure: PostgresCheckFailure(reason: probe.configurationProblem ?? "\(error)", configuration: true))
            }
        }
    }

    /// ``check(configuration:logger:)``'s failure: nil when the database answers.
    func unreachability(configuration: PostgresConnection.Configuration, logger: Logger) async -> PostgresCheckFailure? {
        await check(configuration: configuration, logger: logger).failure
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
