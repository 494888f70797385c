import FarmgateSupport
import Foundation
public import Logging
import NIOSSL

/// The configuration of `farmgate-ingest`, read from a TOML file (default `/etc/farmgate/ingest.toml`, or the path in
/// `FARMGATE_INGEST_CONFIG`).
///
/// Every key is optional; an absent key takes the default documented on its property. Unknown keys are rejected with
/// the file, line and key, and the closest known key is suggested.
///
/// ```toml
/// [server]
/// host = "127.0.0.1"          # default "127.0.0.1"
/// port = 8080                 # default 8080
/// idle_timeout = "75s"        # default 75 s: a keep-alive connection with no request for this long is closed
/// header_timeout = "60s"      # default 60 s: a request head (line and headers) must arrive within this; else 408
/// body_timeout = "60s"        # default 60 s: a request body must arrive within this after its head; else 408
/// max_connections = 4096      # default 4096: past it, a new connection is answered 503 with Retry-After and closed
/// trusted_proxies = []         # default none; e.g. ["127.0.0.1"] behind nginx: X-Forwarded-For names the client
/// tls_certificate = "ingest.crt" # default none (plain HTTP): PEM certificate chain; with tls_key, serve HTTPS
/// tls_key = "ingest.key"         # default none: the PEM private key of tls_certificate (both or neither)
/// http2 = true                   # default true: with TLS, offer HTTP/2 (h2) besides HTTP/1.1 by ALPN
///
/// [storage]
/// path = "/var/lib/farmgate-ingest/ingest.sqlite"   # the embedded SQLite file; relative paths resolve
///                                                   # against the directory of the configuration file
/// url = "postgresql://farmgate@db:5432/farmgate"    # PostgreSQL instead (or FARMGATE_INGEST_DATABASE_URL)
/// pool_size = 10                      # default 10 connections per instance
/// connect_timeout = "10s"             # default 10 s
/// query_timeout = "30s"               # default 30 s (statement_timeout, and the wait for a pooled connection)
/// tls = "verify-full"                 # disable, prefer, require, verify-full (default: the URL's sslmode, else prefer)
/// ca_file = "/etc/farmgate/db-ca.pem" # the CA for verify-full (default: the system's)
/// listen_url = "postgresql://..."     # LISTEN's connection (default: url); see ``readPostgresWrites(_:into:environment:)``
/// write_transactions = 5              # group commit: transactions at once (default pool_size / 2, 1–8),
/// group_max_batches = 64              # batches (default 64) and readings (default 64,000) per transaction
///
/// [limits]
/// max_body_bytes = "8MiB"             # default 8 MiB: larger request bodies are answered 413
/// max_decompressed_bytes = "32MiB"    # default 32 MiB: larger expanded bodies are answered 413
/// max_readings_per_batch = 100000     # default 100000
/// future_tolerance = "10m"            # default 10 minutes: later timestamps are rejected one by one
/// unsynchronized_future_limit = "366d" # default 366 days: the same for readings flagged clock_unsynchronized
/// requests_per_second = 20            # default 20 batches per second and device (token bucket rate)
/// burst = 40                          # default 40 batches (token bucket size)
/// uploads_in_flight = 4               # default 4 uploads of one device at once; past it 429 (the agent sends one at a time)
/// sensors_per_device = 1000           # default 1000 sensors registered per device; readings of more: too_many_sensors
/// read_requests_per_second = 10       # default 10 read-API requests per second and read token
/// read_burst = 20                     # default 20
/// auth_failures_per_second = 1        # default 1 failed authentication per second and client address, past the burst
/// auth_failure_burst = 20             # default 20; past it the address is answered 429 before the store is asked
/// unknown_key_cache_ttl = "2s"        # default 2 s: an unknown key id is answered from memory for this long
///
/// [retention]                       # see ``Retention``
/// raw = "90d"                         # default 90 days ("forever" keeps them); rollup_1m default "365d",
/// interval = "1h"                     # rollup_1h and rollup_1d default "forever"; interval: how often serve runs it
///
/// [log]
/// level = "info"                      # trace, debug, info, notice, warning, error, critical
/// ```
public struct IngestConfiguration: Sendable, Hashable {
    /// Where the HTTP server listens.
    public struct Server: Sendable, Hashable {
        /// The address to bind. Default `"127.0.0.1"` (loopback only); use `"0.0.0.0"` to accept connections from the network.
        public var host: String
        /// The TCP port. Default `8080`; `0` picks a free port (tests).
        public var port: Int
        /// How long a keep-alive connection may wait for its next request before it is closed. Default 75 s (nginx's
        /// `keepalive_timeout`).
        public var idleTimeout: Duration
        /// How long a request's line and headers may take to arrive, from their first byte (or from the connection's
        /// opening for its first request) to the end of the head. Past it the answer is 408 `request_timeout` and the
        /// connection is closed. Default 60 s (nginx's `client_header_timeout`). It ends slowloris clients.
        public var headerTimeout: Duration
        /// How long a request's whole body may take to arrive after its head. Past it the answer is 408
        /// `request_timeout` (when no answer was started) and the connection is closed. Default 60 s. Unlike nginx's
        /// `client_body_timeout`, which only bounds the pause between two reads and so never ends a body trickling one
        /// byte a second, this bounds the whole body: at the default `max_body_bytes` of 8 MiB it asks for about
        /// 140 kB/s; an agent's batch (256 KiB by default) needs 4.4 kB/s. Raise it for large bodies over slow links.
        public var bodyTimeout: Duration
        /// The most connections open at once. Past it a new connection is answered at once with 503 `unavailable`
        /// (JSON, `Retry-After`) and closed, and past it by 64 new connections wait in the kernel's backlog. Default
        /// 4096: well above what the sites of one ingest hold (one keep-alive connection per agent), and below the
        /// file descriptors the process can have. `serve` raises its soft `RLIMIT_NOFILE` to the hard limit at start,
        /// and lowers this cap (with a warning) when the limit cannot hold it plus 128 descriptors for the store,
        /// the log and the listening socket: a process out of descriptors stops answering everyone, `/healthz` too.
        public var maxConnections: Int
        /// The exact IP addresses of reverse proxies whose `X-Forwarded-For` (its last address) names the client that
        /// per-address limits count against (``TrustedProxies``). Default none: the TCP peer is the client.
        public var trustedProxies: [String]
        /// The ingest's own TLS (`tls_certificate` and `tls_key`, both or neither), read when the configuration is
        /// loaded. Default nil: plain HTTP/1.1, for loopback or behind a reverse proxy that terminates TLS.
        public var tls: ServerTLS?
        /// With ``tls``, whether HTTP/2 (`h2`) is offered besides HTTP/1.1 by ALPN; a client that offers both gets h2,
        /// whose compressed headers (HPACK) cost a few bytes per request on a metered link. Without TLS it changes
        /// nothing (no cleartext HTTP/2). Default true.
        public var http2: Bool

        /// Creates the section; every parameter defaults as documented on its property.
        public init(
            host: String = "127.0.0.1", port: Int = 8080, idleTimeout: Duration = .seconds(75), headerTimeout: Duration = .seconds(60),
            bodyTimeout: Duration = .seconds(60), maxConnections: Int = 4096, trustedProxies: [String] = [], tls: ServerTLS? = nil,
            http2: Bool = true
        ) {
            self.tls = tls
            self.http2 = http2
            self.trustedProxies = trustedProxies
            self.host = host
            self.port = port
            self.idleTimeout = idleTimeout
            self.headerTimeout = headerTimeout
            self.bodyTimeout = bodyTimeout
            self.maxConnections = maxConnections
        }
    }

    /// Where readings are stored.
    public struct Storage: Sendable, Hashable {
        /// The embedded SQLite database file. Default `"/var/lib/farmgate-ingest/ingest.sqlite"`. Its directory is created
        /// when missing. In a file, a relative path resolves against the directory of that file.
        public var path: String
        /// PostgreSQL instead of SQLite: `[storage] url` and the pool keys, or `FARMGATE_INGEST_DATABASE_URL` (which wins
        /// over the file's `url`). Default nil: the embedded SQLite file at ``path``.
        public var postgres: PostgresSettings?

        /// Creates the section; every parameter defaults as documented on its property.
        public init(path: String = "/var/lib/farmgate-ingest/ingest.sqlite", postgres: PostgresSettings? = nil) {
            self.path = path
            self.postgres = postgres
        }

        /// What the log and errors call the store: the SQLite path, or the PostgreSQL URL without its password.
        public var displayName: String { postgres?.redacted ?? path }
    }

    /// What one request may cost.
    public struct Limits: Sendable, Hashable {
        /// The largest request body accepted, as sent (possibly compressed). Default 8 MiB; larger bodies get 413.
        public var maxBodyBytes: Int
        /// The largest body accepted after `Content-Encoding` is undone, and the largest binary frame after its own
        /// decompression. Default 32 MiB; larger ones get 413.
        public var maxDecompressedBytes: Int
        /// The most readings one batch may carry. Default 100 000; larger batches get 400 `malformed_batch`.
        public var maxReadingsPerBatch: Int
        /// How far past the ingest's clock a reading's timestamp may be before it is rejected as `timestamp_in_future`.
        /// Default 10 minutes.
        public var futureTolerance: Duration
        /// How far past the ingest's clock the timestamp of a reading flagged `clock_unsynchronized` may be. Such a
        /// reading was stamped before the device's clock was set (a Raspberry Pi without RTC until NTP answers); it is
        /// stored with its flag while it is plausible rather than refused for good. Default 366 days; at least
        /// `futureTolerance`.
        public var unsynchronizedFutureLimit: Duration
        /// The steady number of batches per second one device may post (token bucket refill rate). Default 20.
        public var requestsPerSecond: Double
        /// How many batches one device may post at once before it is limited (token bucket size). Default 40.
        public var burst: Int
        /// How many uploads of one device may be in flight at once (body being read, decoded or stored); past it 429.
        /// Default 4. The bucket bounds how often a device posts, this how much of the ingest's memory one key can hold
        /// (each upload up to `maxBodyBytes` plus its decompressed copies). The agent sends one batch at a time.
        public var uploadsInFlight: Int
        /// The steady number of read-API requests per second one read token may make. Default 10.
        public var readRequestsPerSecond: Double
        /// How many read-API requests one read token may make at once. Default 20.
        public var readBurst: Int
        /// Failed authentications per second one client address may make once its burst is spent. Default 1.
        public var authFailuresPerSecond: Double
        /// Failed authentications one client address may make at once; past them its requests are answered 429 before
        /// the store is asked anything. Default 20.
        public var authFailureBurst: Int
        /// How long a key id the store did not know is answered as unknown from memory. Default 2 s; a device created
        /// after a failed attempt works within this time. `"0s"` turns the cache off.
        public var unknownKeyCacheTTL: Duration
        /// How many sensors one device may register. Default 1000. A reading of a sensor past it is refused one by one
        /// as `too_many_sensors` (the agent quarantines it; `farmgate quarantine requeue --code too_many_sensors` sends
        /// it again once the limit is raised); the device's registered sensors go on. Sensors are never deleted, so
        /// without a limit one device key could fill the sensor table (4,096 new names per batch).
        public var sensorsPerDevice: Int

        /// The default of ``sensorsPerDevice``.
        public static let defaultSensorsPerDevice = 1000

        /// Creates the section; every parameter defaults as documented on its property.
        public init(
            maxBodyBytes: Int = 8 << 20,
            maxDecompressedBytes: Int = 32 << 20,
            maxReadingsPerBatch: Int = 100_000,
            futureTolerance: Duration = .seconds(600),
            unsynchronizedFutureLimit: Duration = .seconds(366 * 86_400),
            requestsPerSecond: Double = 20,
            burst: Int = 40,
            uploadsInFlight: Int = 4,
            readRequestsPerSecond: Double = 10,
            readBurst: Int = 20,
            authFailuresPerSecond: Double = 1,
            authFailureBurst: Int = 20,
            unknownKeyCacheTTL: Duration = .seconds(2),
            sensorsPerDevice: Int = Limits.defaultSensorsPerDevice
        ) {
            self.sensorsPerDevice = sensorsPerDevice
            self.readRequestsPerSecond = readRequestsPerSecond
            self.readBurst = readBurst
            self.authFailuresPerSecond = authFailuresPerSecond
            self.authFailureBurst = authFailureBurst
            self.unknownKeyCacheTTL = unknownKeyCacheTTL
            self.maxBodyBytes = maxBodyBytes
            self.maxDecompressedBytes = maxDecompressedBytes
            self.maxReadingsPerBatch = maxReadingsPerBatch
            self.futureTolerance = futureTolerance
            self.unsynchronizedFutureLimit = unsynchronizedFutureLimit
            self.requestsPerSecond = requestsPerSecond
            self.burst = burst
            self.uploadsInFlight = uploadsInFlight
        }
    }

    /// Logging.
    public struct Log: Sendable, Hashable {
        /// The lowest level logged. Default `.info`.
        public var level: Logger.Level

        /// Creates the section; every parameter defaults as documented on its property.
        public init(level: Logger.Level = .info) {
            self.level = level
        }
    }

    /// `[server]`.
    public var server: Server
    /// `[storage]`.
    public var storage: Storage
    /// `[limits]`.
    public var limits: Limits
    /// `[log]`.
    public var log: Log
    /// `[retention]`.
    public var retention: Retention
    /// `[notify]`: delivery of alert notifications (``NotifyConfiguration``).
    public var notify = NotifyConfiguration()
    /// `[alerting]`: the alert engine's timings (``AlertEngine/Settings``).
    public var alerting = AlertEngine.Settings()

    /// Creates a configuration; every section defaults as documented on its properties.
    public init(
        server: Server = Server(), storage: Storage = Storage(), limits: Limits = Limits(), log: Log = Log(), retention: Retention = Retention()
    ) {
        self.server = server
        self.storage = storage
        self.limits = limits
        self.log = log
        self.retention = retention
    }

    /// The configuration file read when none is named on the command line and `FARMGATE_INGEST_CONFIG` is unset.
    public static let defaultPath = "/etc/farmgate/ingest.toml"

    /// The environment variable that overrides ``defaultPath``.
    public static let pathEnvironmentVariable = "FARMGATE_INGEST_CONFIG"

    /// The environment variable that selects PostgreSQL (a `postgresql://` URL), overriding `[storage] url`: a
    /// deployment keeps the password out of the configuration file this way.
    public static let databaseURLEnvironmentVariable = "FARMGATE_INGEST_DATABASE_URL"

    /// Why the CA file of a PostgreSQL connection cannot be used (unreadable, or no PEM certificate in it); nil when it
    /// can.
    static func caFileProblem(_ path: String) -> String? {
        guard FileManager.default.isReadableFile(atPath: path) else { return "cannot read the CA file \(path); check the path and its permissions" }
        guard let certificates = try? NIOSSLCertificate.fromPEMFile(path), !certificates.isEmpty else {
            return "the CA file \(path) holds no PEM certificate; it must hold the CA's certificate (-----BEGIN CERTIFICATE-----)"
        }
        return nil
    }

    /// The configuration path to use: `explicit` if given, else `FARMGATE_INGEST_CONFIG` if set and not empty, else
    /// ``defaultPath``.
    public static func resolvePath(explicit: String?, environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let explicit, !explicit.isEmpty { return explicit }
        if let fromEnvironment = environment[pathEnvironmentVariable], !fromEnvironment.isEmpty { return fromEnvironment }
        return defaultPath
    }

    /// Reads and validates the file at `path`.
    ///
    /// - Throws: ``ConfigurationError`` naming the file, line and key of the first problem.
    public static func load(
        path: String, environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws(ConfigurationError) -> IngestConfiguration {
        let table = try ConfigDocument.load(path: path)
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
        return try IngestConfiguration(table: table, baseDirectory: directory, environment: environment)
    }

    /// Parses and validates `text`; `file` names it in errors and relative paths resolve against `baseDirectory`.
    ///
    /// - Throws: ``ConfigurationError`` naming the file, line and key of the first problem.
    public static func parse(
        _ text: String, file: String, baseDirectory: String, environment: [String: String] = [:]
    ) throws(ConfigurationError) -> IngestConfiguration {
        try IngestConfiguration(table: ConfigDocument.parse(text, file: file), baseDirectory: baseDirectory, environment: environment)
    }

    init(table: ConfigTable, baseDirectory: String, environment: [String: String]) throws(ConfigurationError) {
        self.init()
        try table.checkKeys(["server", "storage", "limits", "log", "retention", "notify", "alerting"])

        if let section = try table.table("server") {
            try section.checkKeys([
                "host", "port", "idle_timeout", "header_timeout", "body_timeout", "max_connections", "trusted_proxies", "tls_certificate", "tls_key",
                "http2",
            ])
            if let host = try section.string("host") {
                guard !host.isEmpty, !host.contains(" ") else {
                    throw section.error("host", "must be a host name or IP address such as \"127.0.0.1\" or \"0.0.0.0\"")
                }
                server.host = host
            }
            if let port = try section.int("port", in: 0...65_535) { server.port = port }
            let timeouts = Duration.milliseconds(100)...Duration.seconds(3600)
            if let timeout = try section.duration("idle_timeout", in: timeouts) { server.idleTimeout = timeout }
            if let timeout = try section.duration("header_timeout", in: timeouts) { server.headerTimeout = timeout }
            if let timeout = try section.duration("body_timeout", in: timeouts) { server.bodyTimeout = timeout }
            if let count = try section.int("max_connections", in: 1...1_000_000) { server.maxConnections = count }
            if let proxies = try section.strings("trusted_proxies") {
                do { _ = try TrustedProxies(proxies) } catch { throw section.error("trusted_proxies", error.description) }
                server.trustedProxies = proxies
            }
            let certificate = try section.string("tls_certificate")
            let key = try section.string("tls_key")
            switch (certificate, key) {
            case (nil, nil):
                break
            case (let certificate?, nil):
                throw section.error(
                    "tls_certificate",
                    "needs tls_key too: set tls_key to the PEM private key of \(certificate), or remove tls_certificate to serve plain HTTP")
            case (nil, let key?):
                throw section.error(
                    "tls_key", "needs tls_certificate too: set tls_certificate to the PEM certificate chain of \(key), or remove tls_key to serve plain HTTP")
            case (let certificate?, let key?):
                for (name, value) in [("tls_certificate", certificate), ("tls_key", key)] where value.isEmpty {
                    throw section.error(name, "must name a PEM file, e.g. \"/etc/farmgate/ingest.\(name == "tls_key" ? "key" : "crt")\"")
                }
                do {
                    server.tls = try ServerTLS.load(
                        certificateFile: Self.resolve(certificate, against: baseDirectory), keyFile: Self.resolve(key, against: baseDirectory))
                } catch {
                    throw section.error(error.key, error.message)
                }
            }
            if let http2 = try section.bool("http2") { server.http2 = http2 }
        }

        let storageSection = try table.table("storage")
        // Where a problem of the URL itself (its sslrootcert) is reported: `[storage] url`, or the environment variable
        // that overrides it.
        var refuseURL: ((String) -> ConfigurationError)?
        if let section = storageSection {
            try section.checkKeys(Set(["path", "url", "pool_size", "connect_timeout", "query_timeout", "tls", "ca_file"] + Self.postgresWriteKeys))
            if let path = try section.string("path") {
                guard !path.isEmpty else { throw section.error("path", "must name the SQLite file, e.g. \"data/ingest.sqlite\"") }
                storage.path = Self.resolve(path, against: baseDirectory)
            }
            if let url = try section.string("url") {
                do { storage.postgres = try PostgresSettings(url: url) } catch { throw section.error("url", error.message) }
                refuseURL = { section.error("url", $0) }
            }
        }
        if let url = environment[Self.databaseURLEnvironmentVariable], !url.isEmpty {
            let refuse = { (message: String) in
                ConfigurationError(file: "environment", line: nil, key: Self.databaseURLEnvironmentVariable, message: message)
            }
            do {
                storage.postgres = try PostgresSettings(url: url)
            } catch {
                throw refuse(error.message)
            }
            refuseURL = refuse
        }
        if let section = storageSection {
            let poolKeys = ["pool_size", "connect_timeout", "query_timeout", "tls", "ca_file"] + Self.postgresWriteKeys
            if var postgres = storage.postgres {
                if let size = try section.int("pool_size", in: 1...1_000) { postgres.poolSize = size }
                if let timeout = try section.duration("connect_timeout", in: Duration.milliseconds(100)...Duration.seconds(600)) {
                    postgres.connectTimeout = timeout
                }
                if let timeout = try section.duration("query_timeout", in: .zero...Duration.seconds(86_400)) {
                    if timeout > .zero, timeout < .milliseconds(100) {
                        throw section.error("query_timeout", "must be at least 100ms, or \"0s\" to turn it off")
                    }
                    postgres.queryTimeout = timeout
                }
                let modes = Dictionary(uniqueKeysWithValues: PostgresSettings.TLSMode.allCases.map { ($0.rawValue, $0) })
                if let mode = try section.choice("tls", modes) {
                    if case .unixSocket = postgres.endpoint, mode != .disable {
                        throw section.error("tls", "the URL names a Unix socket, which carries no TLS; set tls = \"disable\" or connect over TCP")
                    }
                    postgres.tls = mode
                }
                if let file = try section.string("ca_file") {
                    guard !file.isEmpty else { throw section.error("ca_file", "must name a PEM file with the CA that signed the server's certificate") }
                    postgres.caFile = Self.resolve(file, against: baseDirectory)
                }
                storage.postgres = postgres
            } else if let key = poolKeys.first(where: { section.contains($0) }) {
                throw section.error(key, "applies to PostgreSQL only; set [storage] url = \"postgresql://...\" (or \(Self.databaseURLEnvironmentVariable)) or remove it")
            }
        }
        // The SQLite store's directory is made at start; a file where a directory of its path must be stops every command.
        if storage.postgres == nil, let blocker = FileSystem.fileInTheWay(of: storage.path) {
            let message = "\(blocker) is not a directory, so the SQLite store \(storage.path) cannot be made there: give a path in a directory"
            if let section = storageSection, section.contains("path") { throw section.error("path", message) }
            throw ConfigurationError(file: table.file, line: nil, key: "[storage] path", message: message + " (this is the default; set [storage] path)")
        }
        // Another program's file (the agent's buffer, /dev/null): opening would put it in WAL mode and migrate it.
        if storage.postgres == nil, let problem = SQLiteFileCheck.foreignFileProblem(path: storage.path, ownTable: "schema_migrations") {
            let message = "\(storage.path) \(problem): not a Farmgate ingest store, and the ingest leaves it as it is; give the store a file of its own, such as \"data/ingest.sqlite\""
            if let section = storageSection, section.contains("path") { throw section.error("path", message) }
            throw ConfigurationError(file: table.file, line: nil, key: "[storage] path", message: message + " (this is the default; set [storage] path)")
        }
        if let postgres = storage.postgres, let caFile = postgres.caFile, let refuseURL {
            // Each problem is told where it was written: `ca_file` and `tls`, or the URL's sslrootcert and sslmode.
            let fromKey = storageSection?.contains("ca_file") == true
            let refuseFile = { (message: String) -> ConfigurationError in
                if fromKey, let storageSection { return storageSection.error("ca_file", message) }
                return refuseURL(message)
            }
            if postgres.tls != .verifyFull {
                let mode = postgres.tls.rawValue
                if fromKey, let storageSection {
                    throw storageSection.error(
                        "ca_file", "a CA file is only used with tls = \"verify-full\" (now \"\(mode)\"); set tls = \"verify-full\" or remove ca_file")
                } else if let storageSection, storageSection.contains("tls") {
                    throw storageSection.error(
                        "tls",
                        "the URL's sslrootcert is only used with verify-full (tls is \"\(mode)\"); set tls = \"verify-full\" or remove sslrootcert from the URL")
                }
                throw refuseURL(
                    "sslrootcert is only used with sslmode=verify-full (the URL's sslmode is \(mode)); set sslmode=verify-full or remove sslrootcert")
            }
            if let problem = Self.caFileProblem(caFile) { throw refuseFile(problem) }
        }

        try Self.readPostgresWrites(storageSection, into: &storage.postgres, environment: environment)

        if let section = try table.table("limits") {
            try section.checkKeys([
                "max_body_bytes", "max_decompressed_bytes", "max_readings_per_batch", "future_tolerance", "unsynchronized_future_limit",
                "requests_per_second", "burst", "uploads_in_flight", "read_requests_per_second", "read_burst", "auth_failures_per_second",
                "auth_failure_burst", "unknown_key_cache_ttl", "sensors_per_device",
            ])
            if let bytes = try section.byteSize("max_body_bytes", in: 1024...(1 << 30)) { limits.maxBodyBytes = Int(bytes) }
            if let bytes = try section.byteSize("max_decompressed_bytes", in: 1024...(4 << 30)) { limits.maxDecompressedBytes = Int(bytes) }
            if let count = try section.int("max_readings_per_batch", in: 1...10_000_000) { limits.maxReadingsPerBatch = count }
            if let tolerance = try section.duration("future_tolerance", in: .zero...Duration.seconds(7 * 86_400)) {
                limits.futureTolerance = tolerance
            }
            if let limit = try section.duration("unsynchronized_future_limit", in: .zero...Duration.seconds(10 * 366 * 86_400)) {
                limits.unsynchronizedFutureLimit = limit
            }
            if limits.unsynchronizedFutureLimit < limits.futureTolerance {
                throw section.error(
                    section.contains("unsynchronized_future_limit") ? "unsynchronized_future_limit" : "future_tolerance",
                    "unsynchronized_future_limit (\(ReadingValidator.days(limits.unsynchronizedFutureLimit))) must be at least future_tolerance (\(ReadingValidator.days(limits.futureTolerance))): a reading flagged clock_unsynchronized is never held to a tighter bound than one from a synchronised clock")
            }
            if let rate = try section.double("requests_per_second", in: 0.001...1_000_000) { limits.requestsPerSecond = rate }
            if let burst = try section.int("burst", in: 1...1_000_000) { limits.burst = burst }
            if let count = try section.int("uploads_in_flight", in: 1...1000) { limits.uploadsInFlight = count }
            if let count = try section.int("sensors_per_device", in: 1...1_000_000) { limits.sensorsPerDevice = count }
            if let rate = try section.double("read_requests_per_second", in: 0.001...1_000_000) { limits.readRequestsPerSecond = rate }
            if let burst = try section.int("read_burst", in: 1...1_000_000) { limits.readBurst = burst }
            if let rate = try section.double("auth_failures_per_second", in: 0.001...1_000_000) { limits.authFailuresPerSecond = rate }
            if let burst = try section.int("auth_failure_burst", in: 1...1_000_000) { limits.authFailureBurst = burst }
            if let ttl = try section.duration("unknown_key_cache_ttl", in: .zero...Duration.seconds(3600)) { limits.unknownKeyCacheTTL = ttl }
            if limits.maxDecompressedBytes < limits.maxBodyBytes {
                throw section.error(
                    "max_decompressed_bytes",
                    "must be at least max_body_bytes (\(limits.maxBodyBytes) bytes), since an uncompressed body is as large as it was sent")
            }
        }

        if let section = try table.table("retention") { retention = try Retention(section: section) }

        if let section = try table.table("log") {
            try section.checkKeys(["level"])
            let levels = Dictionary(uniqueKeysWithValues: Logger.Level.allCases.map { ($0.rawValue, $0) })
            if let level = try section.choice("level", levels) { log.level = level }
        }
        try parseNotify(table, baseDirectory: baseDirectory)
        try parseAlerting(table)
    }

    /// `path` as given when absolute, else relative to `directory` (the configuration file's).
    static func resolve(_ path: String, against directory: String) -> String {
        path.hasPrefix("/") ? path : URL(fileURLWithPath: path, relativeTo: URL(fileURLWithPath: directory, isDirectory: true)).standardizedFileURL.path
    }
}
