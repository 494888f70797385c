import ArgumentParser
import FarmgateCLI
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import Metrics
import Prometheus
import ServiceLifecycle
import Synchronization
import UnixSignals

@main
struct FarmgateIngestCommand: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "farmgate-ingest",
        abstract: "The Farmgate ingest: receives reading batches from farm gateways, stores them exactly once, serves them back.",
        discussion: """
            `serve` runs the service. The other commands administer its store directly (they need no running service).
            Every command reads the configuration file given by --config, else $FARMGATE_INGEST_CONFIG, else \(IngestConfiguration.defaultPath).
            """,
        version: FarmgateVersion.current,
        subcommands: [
            ServeCommand.self, MigrateCommand.self, FarmCommand.self, DeviceCommand.self, TokenCommand.self, ExportCommand.self,
            EnrollTokenCommand.self,
            RetentionCommand.self,
            AlertCommand.self,
        ]
    )

    /// `help nosuch` is a usage error (64), not the root's help.
    static func main() async { await CommandLineRules.main(Self.self) }
}

/// The option every command shares.
struct ConfigOption: ParsableArguments {
    @Option(
        name: [.short, .long],
        help: ArgumentHelp(
            "The ingest's configuration file (default: $\(IngestConfiguration.pathEnvironmentVariable), else \(IngestConfiguration.defaultPath)).",
            valueName: "file"))
    var config: String?

    var path: String { IngestConfiguration.resolvePath(explicit: config) }

    /// `-c ''` names no file: a usage error, not the default path (an empty $FARMGATE_INGEST_CONFIG counts as unset).
    func validate() throws {
        if config?.isEmpty == true {
            throw ValidationError("the configuration path is empty (-c ''): give the ingest's configuration file, or leave the option out for $\(IngestConfiguration.pathEnvironmentVariable), else \(IngestConfiguration.defaultPath)")
        }
    }

    /// Loads the configuration or exits with status 78 (EX_CONFIG) and the located error on standard error.
    func load() throws -> IngestConfiguration {
        do {
            return try IngestConfiguration.load(path: path)
        } catch {
            throw failure(error.description, code: 78)
        }
    }

    /// Loads the configuration and bootstraps logging to standard error.
    func loadAndLog(label: String) throws -> (IngestConfiguration, Logger) {
        let configuration = try load()
        let level = configuration.log.level
        LoggingSystem.bootstrap { label in IngestLogHandler(label: label, level: level) }
        return (configuration, Logger(label: label))
    }

    /// Opens the store `[storage]` names (not yet running, not migrated); exits 74 when it cannot be opened. On
    /// PostgreSQL one connection is opened first, outside the pool, whose failures postgres-nio does not report (a store
    /// call would wait for `query_timeout` and say only that nothing answered): when the server refuses these settings
    /// for good (a database or role it does not have, a wrong or missing password, a certificate that does not verify
    /// or does not name the host, no TLS where it is required) the command exits 78 (EX_CONFIG) naming what to change.
    /// The same for `listen_url`'s connection.
    ///
    /// A SQLite file that does not exist is made (with its directories) only when `creating` (`serve`, `migrate` and the
    /// commands that create records on a fresh install: farm, device, token and enroll-token create, receiver add);
    /// the others exit 74 naming the path: a mistyped `[storage] path` would otherwise become a new empty store, and
    /// "no farms" or "farm does not exist" would look like lost data.
    func openStore(_ configuration: IngestConfiguration, logger: Logger, creating: Bool) async throws -> any IngestStore {
        if !creating, configuration.storage.postgres == nil, let missing = Self.missingStore(configuration.storage.path) {
            throw failure(
                "the store \(configuration.storage.path) does not exist\(missing); nothing was created. Check [storage] path in \(path) "
                    + "(a mistyped path names no store); `farmgate-ingest migrate` or `serve` creates the store", code: 74)  // EX_IOERR
        }
        if let postgres = configuration.storage.postgres {
            if let problem = await postgres.probe(logger: logger).configurationProblem {
                throw failure("cannot use PostgreSQL \(postgres.redacted): \(problem)", code: 78)  // EX_CONFIG
            }
            if let listen = postgres.listen, let problem = await postgres.forListening.probe(logger: logger).configurationProblem {
                throw failure("cannot use PostgreSQL \(listen.redacted) (listen_url): \(problem)", code: 78)  // EX_CONFIG
            }
        }
        do {
            return try await openIngestStore(configuration.storage, limits: configuration.limits, retention: configuration.retention, logger: logger)
        } catch let error as SQLiteError where error.isReadOnly {
            throw failure(readOnlyStore(configuration.storage.path, error), code: 74)  // EX_IOERR
        } catch {
            throw failure("cannot open the store \(configuration.storage.displayName): \(error)", code: 74)  // EX_IOERR
        }
    }
}

extension ConfigOption {
    /// Whether the SQLite file at `path` is missing (nil: it exists, or something is there that opening will judge),
    /// with what more to say: "" when only the file is, else the first directory on its way that does not exist, or
    /// that it is a symbolic link to nothing.
    static func missingStore(_ path: String) -> String? {
        var info = stat()
        if lstat(path, &info) == 0 {
            // A symbolic link whose target is gone would be followed and created.
            if info.st_mode & S_IFMT == S_IFLNK && stat(path, &info) != 0 { return " (it is a symbolic link to a file that does not exist)" }
            // An empty file (touch) would become a store as well.
            return info.st_mode & S_IFMT == S_IFREG && info.st_size == 0 ? " (an empty file is there, not a store)" : nil
        }
        guard errno == ENOENT else { return nil }  // unreadable: opening says why
        var directory = URL(fileURLWithPath: path).deletingLastPathComponent()
        var firstMissing: String?
        while directory.path != "/", stat(directory.path, &info) != 0, errno == ENOENT {
            firstMissing = directory.path
            directory = directory.deletingLastPathComponent()
        }
        return firstMissing.map { ", nor does its directory \($0)" } ?? ""
    }
}

/// What a store error says; when PostgreSQL gave no answer in time, with what one connection opened now finds (the
/// pool does not say why its connections fail).
func explain(_ error: any Error, _ configuration: IngestConfiguration, logger: Logger) async -> String {
    guard let storeError = error as? PostgresStoreError, case .timedOut = storeError, let postgres = configuration.storage.postgres else {
        return Logger.describe(storeError: error)
    }
    let probe = await postgres.probe(logger: logger)
    switch probe {
    case .connected: return "\(error) (a connection opened now succeeds: the server was slow or the pool busy)"
    case .refused, .misconfigured: return "\(error); \(probe.configurationProblem ?? "")"
    case .unreachable(let why): return "\(error); a connection opened now fails: \(why)"
    }
}

/// What to say when the SQLite store at `path` cannot be written by this user (it belongs to the one that runs
/// `serve`): whose it is not, and the two ways out.
func readOnlyStore(_ path: String, _ error: SQLiteError) -> String {
    let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
    let user = getpwuid(geteuid()).flatMap { $0.pointee.pw_name.map { String(cString: $0) } } ?? "uid \(geteuid())"
    return "cannot write the store \(path) as user \(user) (\(error.message)): run the command as the user that runs serve "
        + "(sudo -u farmgate-ingest farmgate-ingest …), or give \(user) the store's files and directory (sudo chown \(user): \(directory) \(path)*)"
}

/// The exit status of a migration that failed: 78 (EX_CONFIG) when PostgreSQL's certificate does not fit the settings
/// (``PostgresStoreError/tls(_:)``), else 74 (EX_IOERR).
func migrationExitCode(_ error: any Error) -> Int32 {
    if let error = error as? PostgresStoreError, case .tls = error { return 78 }
    return 74
}

/// Prints `text` to standard error and returns the error that exits with `code`.
func failure(_ text: String, code: Int32 = 1) -> any Error {
    FileHandle.standardError.write(Data(("farmgate-ingest: " + text + "\n").utf8))
    return ExitCode(code)
}

extension ConfigOption {
    /// Opens the store, runs an administrative step on it, and closes it; store errors become a clear message and
    /// exit status 1. A SQLite file that does not exist is made only when `creatingStore` (a command that creates
    /// records, which a fresh install starts with); else it exits 74 (``openStore(_:logger:creating:)``).
    @discardableResult
    func administer<T: Sendable>(
        creatingStore: Bool = false, _ body: @escaping @Sendable (IngestAdmin) async throws -> T
    ) async throws -> T {
        let (configuration, commandLogger) = try loadAndLog(label: "farmgate-ingest")
        var logger = commandLogger
        // A one-shot command says what happened itself: only errors are logged.
        logger.logLevel = max(logger.logLevel, .error)
        let store = try await openStore(configuration, logger: logger, creating: creatingStore)
        return try await withRunning(store) { [logger] store in
            do {
                try await store.migrate()
            } catch {
                throw failure("cannot migrate the store \(configuration.storage.displayName): \(await explain(error, configuration, logger: logger))", code: migrationExitCode(error))
            }
            do {
                return try await body(IngestAdmin(store: store))
            } catch let error as IngestStoreError {
                throw failure(error.description)
            } catch let error as PostgresStoreError {
                throw failure(await explain(error, configuration, logger: logger))
            } catch where Logger.isDatabaseError(error) {
                // Refused by the server (a permission, a lock timeout): its SQLSTATE and message say what.
                throw failure(Logger.describe(storeError: error))
            } catch let error as SQLiteError where error.isReadOnly {
                throw failure(readOnlyStore(configuration.storage.path, error))
            }
        }
    }
}

/// `validateFarmName` for a command-line argument: a usage error (exit 64) that says what a name may hold.
func validateFarmArgument(_ name: String) throws {
    do { try validateFarmName(name) } catch { throw ValidationError(error.description) }
}

// MARK: serve

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the ingest service.",
        discussion: "Applies pending schema migrations first. Stops gracefully on SIGTERM or SIGINT, finishing requests in flight.")

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let (configuration, logger) = try options.loadAndLog(label: "farmgate-ingest")
        // Metrics before anything that makes them: the store creates its swift-metrics counters when it is opened
        // (partitions created, group commits), and ones made before the bootstrap stay on the no-op handler.
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        let store = try await options.openStore(configuration, logger: logger, creating: true)
        // SQLite: one serve per file (each would keep its own `latest` cache, stale with the other's commits); held
        // until the process ends. The admin commands do not take it.
        var serveLock: SQLiteServeLock?
        if configuration.storage.postgres == nil {
            do {
                serveLock = try SQLiteServeLock(databasePath: configuration.storage.path)
            } catch {
                switch error {
                case .held: throw failure("\(error)", code: 75)  // EX_TEMPFAIL
                case .unusable: throw failure("\(error)", code: 74)  // EX_IOERR
                }
            }
        }
        defer { serveLock?.release() }
        // Under systemd (Type=notify): READY=1 once listening (the store is migrated by now), STATUS= with the last
        // minute's traffic, STOPPING=1 when a graceful stop begins.
        let notifier = SystemdNotifier(environment: ProcessInfo.processInfo.environment).map {
            IngestSystemdNotifier(notifier: $0, registry: registry, logger: logger)
        }
        // Latest values from memory: on SQLite (one instance) at once, kept current by this instance's commits; on
        // PostgreSQL once the listener hears every instance's commits (LISTEN/NOTIFY).
        let latest = LatestCache(enabled: configuration.storage.postgres == nil)
        let listener = configuration.storage.postgres.map { PostgresLatestListener(settings: $0, cache: latest, logger: logger) }
        // The notification workers; the engine wakes them when it writes outbox rows (rows of other instances wait
        // for the next poll).
        let delivery = try makeNotificationDelivery(configuration, store: store, registry: registry, logger: logger, soleDeliverer: serveLock != nil)
        // The alert engine evaluates committed readings off the request path (it catches up from the store at start).
        var wakeDelivery: (@Sendable () -> Void)?
        if let delivery { wakeDelivery = { delivery.wake() } }
        let engine = (store as? any IngestStore & AlertStore).map {
            AlertEngine(store: $0, settings: configuration.alerting, logger: logger, notificationsWritten: wakeDelivery)
        }
        // The certificate is read again on SIGHUP (`systemctl reload farmgate-ingest`, certbot's deploy hook).
        let certificates: ServerCertificates?
        do {
            certificates = try configuration.server.tls.map { try ServerCertificates(tls: $0, http2: configuration.server.http2) }
        } catch {
            throw failure("[server] tls_certificate and tls_key cannot be served: \(error)", code: 78)
        }
        let app = buildApplication(
            configuration: configuration, store: store, registry: registry, logger: logger,
            commits: CommitFeed(engine.map { [$0] } ?? []), latest: latest, certificates: certificates,
            onServerRunning: { await notifier?.serverRunning() })
        logger.info(
            "farmgate-ingest starting",
            metadata: [
                "server.host": "\(configuration.server.host)", "server.port": "\(configuration.server.port)",
                "storage": "\(configuration.storage.displayName)",
            ])
        // Retention runs on a schedule beside the server (once across instances on PostgreSQL).
        let retention = (store as? any RetentionStore).map {
            RetentionService(store: $0, retention: configuration.retention, metrics: RetentionMetrics(registry: registry), logger: logger)
        }
        // The store first: it starts before the server and stops after it. The server listens only once the schema is
        // current (several instances starting at once migrate one after another, under an advisory lock).
        var services: [any Service] =
            [store] + (listener.map { [$0] } ?? []) + [
                MigrateThenServe(
                    store: store, app: app, storage: configuration.storage.displayName, logger: logger, engine: engine, systemd: notifier)
            ]
        // The notification workers after the server (they stop first, before the store), also only on a current schema.
        if let delivery {
            services.append(MigrateThenServe(store: store, app: delivery, storage: configuration.storage.displayName, logger: logger))
        }
        services += (retention.map { [$0] } ?? []) + (notifier.map { [$0] } ?? [])
        services.append(CertificateReloadOnHangup(certificates: certificates, logger: logger))
        let stop = StopLoggedService.GroupStop()
        var groupConfiguration = ServiceGroupConfiguration(
            services: services.map { StopLoggedService($0, stop: stop, logger: logger) }, gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger)
        // A graceful stop is bounded: past this, what has not stopped is cancelled (an upload in flight then gets no
        // answer and its agent sends it again, a duplicate to the store). systemd's own stop timeout is 90 s.
        groupConfiguration.maximumGracefulShutdownDuration = Self.gracefulStopLimit
        let group = ServiceGroup(configuration: groupConfiguration)
        do {
            try await group.run()
        } catch {
            if let listen = ListenFailure(error, host: configuration.server.host, port: configuration.server.port) {
                throw failure(listen.description, code: listen.exitCode)
            }
            throw failure("the service stopped: \(error)", code: error is MigrationFailed ? 74 : 1)
        }
        logger.info("farmgate-ingest stopped")
    }
}

extension ServeCommand {
    static let gracefulStopLimit = Duration.seconds(10)
}

/// One of `serve`'s services, saying in the log when its graceful stop begins and when it has stopped, so that a stop
/// that does not finish names the service it waits for. Past the limit the group cancels every service still running:
/// the one it waited for and those after it (the store then closes on cancellation instead of its graceful turn).
struct StopLoggedService: Service, CustomStringConvertible {
    /// When the group's graceful stop began (the first service told to stop; the group tells them one after another).
    final class GroupStop: Sendable {
        let began = Mutex<ContinuousClock.Instant?>(nil)
    }

    let service: any Service
    let stop: GroupStop
    let logger: Logger

    init(_ service: any Service, stop: GroupStop, logger: Logger) {
        self.service = service
        self.stop = stop
        self.logger = logger
    }

    var description: String { String(describing: type(of: service)) }

    func run() async throws {
        let name = description
        let stop = self.stop
        // Cancelled during a graceful stop: the stop passed its limit (the group cancels what is still running then).
        // Cancelled without one: another service failed (and logged why), and the group cancels the rest.
        defer {
            let began = stop.began.withLock { $0 }
            if !Task.isCancelled {
                logger.info("service stopped", metadata: ["service": "\(name)"])
            } else if began != nil {
                logger.warning(
                    "service cancelled: the graceful stop passed its limit",
                    metadata: ["service": "\(name)", "limit": "\(ServeCommand.gracefulStopLimit)"])
            } else {
                logger.info("service cancelled: the service group stops", metadata: ["service": "\(name)"])
            }
        }
        try await withGracefulShutdownHandler {
            try await service.run()
        } onGracefulShutdown: {
            stop.began.withLock { $0 = $0 ?? .now }
            logger.info("service stopping", metadata: ["service": "\(name)"])
        }
    }
}

/// `serve`'s HTTP service, started only after the store's schema is current.
struct MigrateThenServe<App: Service>: Service {
    let store: any IngestStore
    let app: App
    let storage: String
    let logger: Logger
    /// Runs beside the server once the schema is current, and stops with it.
    var engine: AlertEngine?
    /// Told that the start goes on while the store migrates (the server's migration; the workers' waits on it).
    var systemd: IngestSystemdNotifier?

    func run() async throws {
        do {
            if let systemd {
                _ = try await systemd.whileMigrating { try await store.migrate() }
            } else {
                try await store.migrate()
            }
        } catch is CancellationError {
            // The group stops (another service failed, and said why): not this migration's failure.
            throw CancellationError()
        } catch {
            // `serve` exits on it: not what the running service would do about an unreachable database.
            let why = (error as? PostgresStoreError)?.outsideTheService ?? Logger.describe(storeError: error)
            logger.critical("cannot bring the store's schema up to date", metadata: ["storage": "\(storage)", "error": "\(why)"])
            throw MigrationFailed(description: "cannot migrate the store \(storage): \(why)")
        }
        guard let engine else { return try await app.run() }
        try await withThrowingDiscardingTaskGroup { group in
            group.addTask { try await engine.run() }
            group.addTask { try await app.run() }
        }
    }
}

/// The delivery workers of `[notify]`, or nil when they are turned off; exits 78 when `[notify] ca_file` is not PEM.
func makeNotificationDelivery(
    _ configuration: IngestConfiguration, store: any IngestStore, registry: PrometheusCollectorRegistry, logger: Logger, soleDeliverer: Bool
) throws -> NotificationDelivery? {
    guard configuration.notify.enabled, let outbox = store as? any NotificationOutboxStore else { return nil }
    do {
        return try NotificationDelivery(
            store: outbox, configuration: configuration.notify, metrics: NotificationMetrics(registry: registry), logger: logger,
            soleDeliverer: soleDeliverer)
    } catch {
        throw failure("\(error)", code: 78)
    }
}

struct MigrationFailed: Error, CustomStringConvertible {
    let description: String
}

// MARK: migrate

struct MigrateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate", abstract: "Bring the store's schema up to date (serve does this too).")

    @OptionGroup var options: ConfigOption

    func run() async throws {
        let configuration = try options.load()
        var logger = Logger(label: "farmgate-ingest")
        logger.logLevel = .error
        let store = try await options.openStore(configuration, logger: logger, creating: true)
        let storage = configuration.storage.displayName
        let (applied, partitions) = try await withRunning(store) { [logger] store in
            do {
                // PostgreSQL also makes the partitions ahead, moving in what waited in the default ones.
                if let postgres = store as? PostgresIngestStore {
                    let (applied, partitions) = try await postgres.migrateAndCreatePartitions()
                    return (applied, Optional(partitions))
                }
                return (try await store.migrate(), nil)
            } catch {
                throw failure("cannot migrate \(storage): \(await explain(error, configuration, logger: logger))", code: migrationExitCode(error))
            }
        }
        if applied.isEmpty {
            print("The schema of \(storage) is up to date.")
        } else {
            for migration in applied { print("Applied migration \(migration.version): \(migration.name)") }
        }
        if let partitions { Self.describe(partitions).forEach { print($0) } }
    }

    /// What `migrate` says about the partitions it made: one line per table that got any.
    static func describe(_ created: PostgresIngestStore.CreatedPartitions) -> [String] {
        func line(_ count: Int, _ kind: String, table: String, prefix: String, moved: Int) -> String? {
            guard count > 0 else { return nil }
            let names = created.names.filter { $0.hasPrefix(prefix) }
            let span = names.count > 1 ? "\(names.first ?? "") to \(names.last ?? "")" : names.first ?? ""
            return "Created \(count) \(kind) partition\(count == 1 ? "" : "s") of \(table) (\(span)); moved \(moved) row\(moved == 1 ? "" : "s") into "
                + "\(count == 1 ? "it" : "them") from \(table)_default."
        }
        return [
            line(created.readings, "daily", table: "readings", prefix: "readings_", moved: created.readingRowsMoved),
            line(created.minuteRollups, "monthly", table: "rollups_1m", prefix: "rollups_1m_", moved: created.minuteRollupRowsMoved),
        ].compactMap { $0 }
    }
}

// MARK: farm

struct FarmCommand: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(commandName: "farm", abstract: "Manage farms.", subcommands: [Create.self, FarmList.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a farm.")

        @Argument(help: "The farm's name: 1 to 64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit.")
        var name: String

        @OptionGroup var options: ConfigOption

        func validate() throws {
            try validateFarmArgument(name)
        }

        func run() async throws {
            let farm = try await options.administer(creatingStore: true) { try await $0.createFarm(name: name) }
            print("Created farm \(farm.name).")
        }
    }
}

// MARK: device

struct DeviceCommand: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "device", abstract: "Manage devices (site gateways) and their keys.",
        subcommands: [Create.self, DeviceList.self, Revoke.self, RotateKey.self])

    struct DeviceOptions: ParsableArguments {
        @Option(help: "The farm the device belongs to.")
        var farm: String

        @Option(help: "The device id, as in the [device] id of its agent configuration.")
        var device: String

        func validate() throws {
            try validateFarmArgument(farm)
            do { _ = try DeviceID(device) } catch { throw ValidationError(error.description) }
        }

        /// The device id; `validate()` has already checked it.
        var deviceID: DeviceID {
            get throws { try DeviceID(device) }
        }
    }

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create", abstract: "Register a device and print its API key (shown only once).")

        @OptionGroup var device: DeviceOptions
        @OptionGroup var options: ConfigOption

        func run() async throws {
            let id = try device.deviceID
            let key = try await options.administer(creatingStore: true) { try await $0.createDevice(farm: device.farm, device: id) }
            print(key.text)
            print("Device \(id) in farm \(device.farm) registered. The key above is shown only once: it is not stored, only its hash.")
            print("Put it in the agent configuration: [upload] key = \"<the key>\", or save it to a file readable only by the agent and set key_file.")
        }
    }

    struct RotateKey: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rotate-key",
            abstract: "Give a device a new API key and print it (shown only once); the old key stops working.",
            discussion: """
                The old key is replaced in the store: new lookups refuse it at once, and a running ingest that has it in its \
                credential cache accepts it for at most that cache's lifetime (seconds). A revoked device becomes usable again \
                with the new key; its sensors and readings are kept.
                """)

        @OptionGroup var device: DeviceOptions
        @OptionGroup var options: ConfigOption

        func run() async throws {
            let id = try device.deviceID
            let key = try await options.administer { try await $0.rotateDeviceKey(farm: device.farm, device: id) }
            print(key.text)
            print("Device \(id) in farm \(device.farm) has a new key. The key above is shown only once: it is not stored, only its hash. The old key no longer works.")
            print("Put it in the agent configuration: [upload] key = \"<the key>\", or save it to a file readable only by the agent and set key_file.")
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "revoke", abstract: "Revoke a device's key; uploads with it are refused within seconds.")

        @OptionGroup var device: DeviceOptions
        @OptionGroup var options: ConfigOption

        func run() async throws {
            let id = try device.deviceID
            let revokedNow = try await options.administer { try await $0.revokeDevice(farm: device.farm, device: id) }
            print(
                revokedNow
                    ? "Revoked the key of device \(id) in farm \(device.farm)."
                    : "Device \(id) in farm \(device.farm) was revoked already; nothing changed. `device rotate-key` gives it a new key.")
        }
    }
}

// MARK: token

extension ReadRole: ExpressibleByArgument {}

struct TokenCommand: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "token", abstract: "Manage read tokens.", subcommands: [Create.self, ReadTokenList.self, ReadTokenRevoke.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create", abstract: "Create a read token for a farm and print it (shown only once).")

        @Option(help: "The farm the token reads.")
        var farm: String

        @Option(help: "What the token may do: \(ReadRole.allCases.map(\.rawValue).joined(separator: ", ")).")
        var role: ReadRole

        @OptionGroup var options: ConfigOption

        func validate() throws {
            try validateFarmArgument(farm)
        }

        func run() async throws {
            let key = try await options.administer(creatingStore: true) { try await $0.createReadToken(farm: farm, role: role) }
            print(key.text)
            print("Read token (\(role.rawValue)) for farm \(farm). It is shown only once. Use it as `Authorization: Bearer <token>`.")
        }
    }
}

// MARK: export

extension ExportFormat: ExpressibleByArgument {}

struct ExportCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write every stored reading of a farm to standard output, in (device, sequence) order.",
        discussion: "Columns: device, sensor, sequence, timestamp (RFC 3339, UTC), value, flags. Streams: memory use does not grow with the farm.")

    @Option(help: "The farm to export.")
    var farm: String

    @Option(help: "csv (with a header line) or jsonl (one JSON object per line).")
    var format: ExportFormat = .csv

    @OptionGroup var options: ConfigOption

    func validate() throws {
        try validateFarmArgument(farm)
    }

    func run() async throws {
        let output = FileHandle.standardOutput
        try await options.administer {
            try await $0.export(farm: farm, format: format) { text in
                try output.write(contentsOf: Data(text.utf8))
            }
        }
    }
}
