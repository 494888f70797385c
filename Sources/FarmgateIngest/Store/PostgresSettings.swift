import Foundation

/// How to reach PostgreSQL: `[storage] url` (or `FARMGATE_INGEST_DATABASE_URL`) and the pool keys beside it.
///
/// The URL is libpq's: `postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=MODE&sslrootcert=FILE]`, or, for a
/// Unix socket, `postgresql://USER@/DATABASE?host=/run/postgresql` (the directory holding `.s.PGSQL.PORT`).
/// Percent-encode reserved characters in the user and password. The password never appears in logs or errors
/// (``redacted``).
public struct PostgresSettings: Sendable, Hashable {
    /// Where the server listens.
    public enum Endpoint: Sendable, Hashable {
        case tcp(host: String, port: Int)
        /// The socket file itself (`DIRECTORY/.s.PGSQL.PORT`).
        case unixSocket(path: String)
    }

    /// Whether and how TLS protects the connection (libpq's `sslmode`, of which these four).
    public enum TLSMode: String, Sendable, Hashable, CaseIterable {
        /// Plain TCP. Right for a Unix socket or loopback only.
        case disable
        /// TLS when the server offers it, without checking its certificate (libpq's default). Protects against
        /// eavesdropping, not against an impostor.
        case prefer
        /// TLS or no connection, without checking the certificate.
        case require
        /// TLS or no connection, the certificate checked against `ca_file` (or the system's CAs) and the host name.
        case verifyFull = "verify-full"
    }

    public var endpoint: Endpoint
    public var username: String
    public var password: String?
    public var database: String?
    /// `[storage] tls`, else the URL's `sslmode`. Default ``TLSMode/prefer`` over TCP, ``TLSMode/disable`` on a socket.
    public var tls: TLSMode
    /// `[storage] ca_file`, else the URL's `sslrootcert`: a PEM bundle trusted for ``TLSMode/verifyFull`` instead of the
    /// system's CAs.
    public var caFile: String?
    /// `[storage] pool_size`: the most connections this instance opens. Default 10.
    public var poolSize: Int
    /// `[storage] connect_timeout`: how long opening one connection may take. Default 10 s.
    public var connectTimeout: Duration
    /// `[storage] query_timeout`: the longest one store call may take, waiting for a pooled connection included (the
    /// call then fails and the ingest answers 503 with Retry-After). Inside write transactions and migrations the server
    /// enforces it too (`statement_timeout`, set transaction-locally with `set_config(..., true)`, so that it holds behind
    /// PgBouncer); a single read statement past it is abandoned by the caller and ends when the server finishes it.
    /// Default 30 s; `"0s"` turns it off.
    public var queryTimeout: Duration
    /// `[storage] write_transactions`: the most group-commit transactions one instance runs at once, each holding a
    /// pooled connection. Default nil: half of ``poolSize`` (at least 1, at most 8), so that reads and maintenance
    /// always find a connection.
    public var writeTransactions: Int?
    /// `[storage] group_max_batches`: the most batches (uploads) one group-commit transaction takes. Default 64; 1 commits
    /// every batch alone.
    public var groupMaxBatches: Int
    /// `[storage] group_max_readings`: the most readings one group-commit transaction takes; a group stops before a batch
    /// that would pass it, but always takes at least one batch. Default 64,000.
    public var groupMaxReadings: Int
    /// `[storage] listen_url` (or `FARMGATE_INGEST_LISTEN_URL`): where the one connection that `LISTEN`s for other
    /// instances' commits goes (``PostgresLatestListener``), when it must differ from the pool's: PostgreSQL itself (or a
    /// session-mode PgBouncer) while the pool goes through a transaction-mode PgBouncer. Default nil: the same place as
    /// the pool. ``forListening`` is what the listener connects with.
    public var listen: PostgresSettings? {
        get { listenStorage.first }
        set { listenStorage = newValue.map { [$0] } ?? [] }
    }
    /// An array only because a struct cannot hold an optional of itself; at most one element.
    private var listenStorage: [PostgresSettings] = []

    public init(
        endpoint: Endpoint, username: String, password: String? = nil, database: String? = nil, tls: TLSMode = .prefer,
        caFile: String? = nil, poolSize: Int = 10, connectTimeout: Duration = .seconds(10), queryTimeout: Duration = .seconds(30),
        writeTransactions: Int? = nil, groupMaxBatches: Int = 64, groupMaxReadings: Int = 64_000
    ) {
        self.endpoint = endpoint
        self.username = username
        self.password = password
        self.database = database
        self.tls = tls
        self.caFile = caFile
        self.poolSize = poolSize
        self.connectTimeout = connectTimeout
        self.queryTimeout = queryTimeout
        self.writeTransactions = writeTransactions
        self.groupMaxBatches = groupMaxBatches
        self.groupMaxReadings = groupMaxReadings
    }

    /// The group-commit transactions run at once: ``writeTransactions``, else half the pool (at least 1, at most 8).
    public var effectiveWriteTransactions: Int {
        writeTransactions ?? min(8, max(1, poolSize / 2))
    }

    /// What the latest-value listener connects with: ``listen`` (with this connect timeout) when set, else these settings.
    public var forListening: PostgresSettings {
        guard var listen else { return self }
        listen.connectTimeout = connectTimeout
        return listen
    }

    /// The URL without its password, for logs and errors.
    public var redacted: String {
        let place: String
        switch endpoint {
        case .tcp(let host, let port): place = "\(host.contains(":") ? "[\(host)]" : host):\(port)"
        case .unixSocket(let path): place = "(socket \(path))"
        }
        return "postgresql://\(username)@\(place)/\(database ?? "")"
    }

    /// Parses a libpq-style URL.
    ///
    /// - Throws: ``PostgresURLError`` saying what is wrong and how the URL should look.
    public init(url text: String) throws(PostgresURLError) {
        let example = "write it like postgresql://farmgate:secret@db.example:5432/farmgate or postgresql://farmgate@/farmgate?host=/run/postgresql"
        guard text.hasPrefix("postgresql://") || text.hasPrefix("postgres://") else {
            throw PostgresURLError(message: "must start with postgresql:// (\(example))")
        }
        // URLComponents refuses an empty host with a user ("postgresql://user@/db"): give it a placeholder.
        guard let schemeEnd = text.range(of: "://")?.upperBound else { throw PostgresURLError(message: "must start with postgresql://") }
        let rest = text[schemeEnd...]
        let authorityEnd = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
        var authority = String(rest[..<authorityEnd])
        let emptyHost = authority.isEmpty || authority.hasSuffix("@")
        if emptyHost { authority += "socket.invalid" }
        guard let components = URLComponents(string: "postgresql://" + authority + rest[authorityEnd...]) else {
            throw PostgresURLError(message: "is not a valid URL (\(example); percent-encode special characters in the password)")
        }
        guard let user = components.percentEncodedUser.flatMap({ $0.removingPercentEncoding }), !user.isEmpty else {
            throw PostgresURLError(message: "names no user (\(example))")
        }
        var query: [String: String] = [:]
        for item in components.queryItems ?? [] {
            guard ["sslmode", "sslrootcert", "host", "port", "connect_timeout", "application_name"].contains(item.name) else {
                throw PostgresURLError(
                    message: "has the parameter '\(item.name)', which farmgate-ingest does not use; allowed: sslmode, sslrootcert, host, port (set the pool and timeouts with [storage] keys)")
            }
            query[item.name] = item.value ?? ""
        }
        // Foundation keeps only the low 16 bits of a port (":98751" became 33215): read it from the text.
        var port = 5432
        if let text = Self.portText(authority: authority), !text.isEmpty {
            guard text.allSatisfy(\.isASCII), text.allSatisfy(\.isNumber), let value = Int(text), (1...65_535).contains(value) else {
                throw PostgresURLError(message: "port '\(text)' is not a port number (1 to 65535)")
            }
            port = value
        }
        if let text = query["port"] {
            guard let value = Int(text), (1...65_535).contains(value) else { throw PostgresURLError(message: "port '\(text)' is not a port number") }
            port = value
        }
        let endpoint: Endpoint
        if let socketDirectory = query["host"], socketDirectory.hasPrefix("/") {
            endpoint = .unixSocket(path: socketDirectory + "/.s.PGSQL.\(port)")
        } else if emptyHost {
            throw PostgresURLError(message: "names no host; for a Unix socket add ?host=/path/to/socket/directory (\(example))")
        } else if let host = components.host, !host.isEmpty {
            endpoint = .tcp(host: host.hasPrefix("[") ? String(host.dropFirst().dropLast()) : host, port: port)
        } else {
            throw PostgresURLError(message: "names no host (\(example))")
        }
        var tls: TLSMode = { if case .unixSocket = endpoint { .disable } else { .prefer } }()
        if let mode = query["sslmode"] {
            guard let parsed = TLSMode(rawValue: mode) else {
                throw PostgresURLError(message: "sslmode '\(mode)' is not supported; use one of \(TLSMode.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            tls = parsed
        }
        let database = components.path.split(separator: "/").first.map { String($0).removingPercentEncoding ?? String($0) }
        self.init(
            endpoint: endpoint, username: user, password: components.percentEncodedPassword.flatMap { $0.removingPercentEncoding },
            database: database, tls: tls, caFile: query["sslrootcert"].flatMap { $0.isEmpty ? nil : $0 })
    }
}

extension PostgresSettings {
    /// The port as written in a URL's authority (`user:pass@host:port`, `user@[::1]:port`): nil when none is written.
    static func portText(authority: String) -> Substring? {
        let hostAndPort = authority.lastIndex(of: "@").map { authority[authority.index(after: $0)...] } ?? authority[...]
        if hostAndPort.hasPrefix("[") {
            guard let close = hostAndPort.firstIndex(of: "]") else { return nil }
            let rest = hostAndPort[hostAndPort.index(after: close)...]
            return rest.hasPrefix(":") ? rest.dropFirst() : nil
        }
        guard let colon = hostAndPort.lastIndex(of: ":") else { return nil }
        return hostAndPort[hostAndPort.index(after: colon)...]
    }
}

/// Why a PostgreSQL URL is refused.
public struct PostgresURLError: Error, Sendable, Hashable, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}
