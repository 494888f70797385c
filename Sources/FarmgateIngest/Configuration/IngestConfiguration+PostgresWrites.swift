import FarmgateSupport
import Foundation

extension IngestConfiguration {
    /// The environment variable that sets `[storage] listen_url` (and overrides it), as
    /// ``databaseURLEnvironmentVariable`` does `url`.
    public static let listenURLEnvironmentVariable = "FARMGATE_INGEST_LISTEN_URL"

    /// The keys ``readPostgresWrites(_:into:environment:)`` reads.
    static let postgresWriteKeys = ["listen_url", "write_transactions", "group_max_batches", "group_max_readings"]

    /// The `[storage]` keys of a PostgreSQL deployment beyond the pool's: where the latest-value listener connects, and
    /// the group commit's limits.
    ///
    /// ```toml
    /// [storage]
    /// url = "postgresql://farmgate@/farmgate?host=/run/pgbouncer&port=6432"  # the pool, through PgBouncer
    /// listen_url = "postgresql://farmgate@db:5432/farmgate"  # default: url. LISTEN needs a session: PostgreSQL itself
    /// write_transactions = 5      # default pool_size / 2 (1–8): group-commit transactions at once
    /// group_max_batches = 64      # default 64: uploads per group-commit transaction (1: each commits alone)
    /// group_max_readings = 64000  # default 64,000: readings per group-commit transaction (at least one batch)
    /// ```
    ///
    /// Runs after `url`, the environment's URL and the pool keys are read: `postgres` is nil when no URL is set (then
    /// these keys, or `FARMGATE_INGEST_LISTEN_URL`, are an error). `[storage] tls` and `ca_file` apply to `listen_url`
    /// as to `url`; without them each URL's own `sslmode` and `sslrootcert` hold.
    static func readPostgresWrites(
        _ section: ConfigTable?, into postgres: inout PostgresSettings?, environment: [String: String]
    ) throws(ConfigurationError) {
        let fromEnvironment = environment[listenURLEnvironmentVariable].flatMap { $0.isEmpty ? nil : $0 }
        guard var settings = postgres else {
            if fromEnvironment != nil {
                throw ConfigurationError(
                    file: "environment", line: nil, key: listenURLEnvironmentVariable,
                    message: "applies to PostgreSQL only; set [storage] url = \"postgresql://...\" (or \(databaseURLEnvironmentVariable)) or unset it")
            }
            return
        }
        if let section {
            if let count = try section.int("write_transactions", in: 1...1_000) {
                let most = max(1, settings.poolSize - 1)
                guard count <= most else {
                    throw section.error(
                        "write_transactions",
                        "must be at most \(most) with pool_size = \(settings.poolSize): each write transaction holds a pooled connection, and reads and maintenance need one left; raise pool_size or lower this")
                }
                settings.writeTransactions = count
            }
            if let count = try section.int("group_max_batches", in: 1...10_000) { settings.groupMaxBatches = count }
            if let count = try section.int("group_max_readings", in: 1...10_000_000) { settings.groupMaxReadings = count }
        }
        var listen: PostgresSettings
        // Where a problem of the listen URL itself is reported: the environment variable, or the key.
        let refuse: (String) -> ConfigurationError
        if let url = fromEnvironment {
            refuse = { ConfigurationError(file: "environment", line: nil, key: listenURLEnvironmentVariable, message: $0) }
            do { listen = try PostgresSettings(url: url) } catch { throw refuse(error.message) }
        } else if let section, let url = try section.string("listen_url") {
            refuse = { section.error("listen_url", $0) }
            do { listen = try PostgresSettings(url: url) } catch { throw refuse(error.message) }
        } else {
            postgres = settings
            return
        }
        if let section, section.contains("tls") {
            if case .unixSocket = listen.endpoint, settings.tls != .disable {
                throw section.error(
                    "tls",
                    "applies to listen_url too, which names a Unix socket (no TLS there); put ?sslmode=... in each URL instead of setting tls, or listen over TCP")
            }
            listen.tls = settings.tls
        }
        if let section, section.contains("ca_file") { listen.caFile = settings.caFile }
        if let caFile = listen.caFile {
            guard listen.tls == .verifyFull else {
                throw refuse("a CA file (ca_file or sslrootcert) is only used with verify-full, and this connection's TLS is \"\(listen.tls.rawValue)\"; add ?sslmode=verify-full")
            }
            if let problem = caFileProblem(caFile) {
                if let section, section.contains("ca_file") { throw section.error("ca_file", problem) }
                throw refuse(problem)
            }
        }
        listen.poolSize = 1
        listen.queryTimeout = settings.queryTimeout
        settings.listen = listen
        postgres = settings
    }
}
