import FarmgateSupport
import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging

/// Everything `farmgate agent` reads from its TOML file, validated. Every default is documented here and in the README.
public struct AgentConfiguration: Sendable {
    /// The file this configuration was read from (relative paths inside it resolve against its directory).
    public var file: String
    /// `[device] id`: this gateway's id, unique in its farm. Required.
    public var device: DeviceID
    /// `[buffer]`: the SQLite store-and-forward buffer.
    public var buffer: BufferConfiguration
    /// `[upload]`: where batches go (keys documented on ``UploadConfiguration``). nil when the section is absent: the agent
    /// then only buffers.
    public var upload: UploadConfiguration?
    /// `[control] socket`: the Unix socket `farmgate status` talks to. Default `/run/farmgate/control.sock`.
    public var controlSocket: String
    /// Where `[control] socket` is when the configuration does not say.
    public static let defaultControlSocket = "/run/farmgate/control.sock"
    /// `[log] level`: trace, debug, info, notice, warning, error, critical. Default info.
    public var logLevel: Logger.Level
    /// `[clock] check`: whether readings are flagged `clock_unsynchronized` while the kernel says the clock is not
    /// synchronised (adjtimex). Default true.
    public var checkClock: Bool
    /// `[clock] hold_unsynchronized`: how long a reading taken while the clock is not synchronised is held back in the
    /// buffer, waiting for the clock to be set so that it goes up with its true time (`clock_corrected`) rather than a wrong
    /// one. After that it goes up flagged `clock_unsynchronized`. Default 15 min; `"0s"` sends such readings at once.
    public var holdUnsynchronized: Duration = .seconds(900)
    /// `[[sensor]]`: one table per sensor.
    public var sensors: [SensorConfiguration]
    /// `[metrics]`: the metrics file for node_exporter's textfile collector; nil (no file) when the section is absent.
    public var metrics: MetricsFileConfiguration? = nil
    /// Keys that are valid but have no effect where they are (`interval` on a GPIO switch), located: `farmgate config
    /// check` prints them and the agent logs them at start. The configuration is still used.
    public var warnings: [ConfigurationError] = []

    /// The default configuration file.
    public static let defaultPath = "/etc/farmgate/agent.toml"
}

/// One `[[sensor]]` table: the keys every sensor has, plus the driver's own options.
public struct SensorConfiguration: Sendable {
    /// `id`: unique on this device, e.g. `tank1.ph`. Required.
    public var id: SensorID
    /// `driver`: which driver reads it (`simulated`, ...). Required.
    public var driver: String
    /// `quantity` and `resolution` (default: the quantity's, e.g. 0.01 for pH).
    public var descriptor: SensorDescriptor
    /// `interval`: how often to read. Default 10 s; 100 ms to 1 day.
    public var interval: Duration
    /// `deadband`: a value closer than this to the last stored one is not stored again until `heartbeat` has passed.
    /// Default 0 (off: every reading is stored).
    public var deadband: Double
    /// `heartbeat`: with a deadband, the longest time without storing a reading. Default 15 min.
    public var heartbeat: Duration
    /// `expected_min` / `expected_max`: readings outside are flagged `out_of_range` (still stored). Default none.
    public var expectedRange: ClosedRange<Double>?
    /// The whole table, for the driver's own keys.
    public var options: ConfigTable

    /// Keys every sensor table may have; drivers declare theirs on top.
    public static let commonKeys: Set<String> = [
        "id", "driver", "quantity", "resolution", "interval", "deadband", "heartbeat", "expected_min", "expected_max",
    ]
}

extension AgentConfiguration {
    /// Reads and validates `path`. Every error names the file, the line and the key, and says what is allowed.
    public static func load(path: String, drivers: DriverRegistry = .standard) throws(ConfigurationError) -> AgentConfiguration {
        let root = try ConfigDocument.load(path: path)
        return try parse(root, drivers: drivers)
    }

    /// Validates an already parsed document.
    public static func parse(_ root: ConfigTable, drivers: DriverRegistry = .standard) throws(ConfigurationError) -> AgentConfiguration {
        try root.checkKeys(["device", "buffer", "upload", "control", "log", "clock", "sensor", "metrics"])
        let base = URL(fileURLWithPath: root.file).deletingLastPathComponent().path

        guard let deviceTable = try root.table("device") else {
            throw root.error(nil, "missing [device] section; add:\n[device]\nid = \"greenhouse-1\"")
        }
        try deviceTable.checkKeys(["id"])
        let deviceText = try deviceTable.requiredString("id")
        let device: DeviceID
        do { device = try DeviceID(deviceText) } catch { throw deviceTable.error("id", error.description) }

        var buffer = BufferConfiguration()
        if let table = try root.table("buffer") {
            try table.checkKeys(["path", "commit_interval", "quota", "when_full"])
            if let path = try table.string("path") {
                guard !path.trimmingWhitespace().isEmpty else {
                    throw table.error(
                        "path",
                        "must not be empty: give the buffer's SQLite file, such as \"/var/lib/farmgate/buffer.sqlite\" "
                            + "(or remove the key for that default)")
                }
                if path.hasSuffix("/") {
                    throw table.error("path", "\(path) ends in /, which names a directory; give the buffer's SQLite file, such as \"/var/lib/farmgate/buffer.sqlite\"")
                }
                if let long = path.split(separator: "/").first(where: { $0.utf8.count > 255 }) {
                    throw table.error("path", "a name in it is \(long.utf8.count) bytes long, longer than the 255 a file name may have; give a shorter path")
                }
                buffer.path = resolve(path, against: base)
                if let blocker = FileSystem.fileInTheWay(of: buffer.path) {
                    throw table.error("path", "\(blocker) is not a directory, so the agent cannot make the buffer \(buffer.path) there: give a path in a directory")
                }
                // The buffer is a regular file (made by the agent when missing): not a directory, a device or a FIFO.
                var info = stat()
                if stat(buffer.path, &info) == 0, info.st_mode & S_IFMT != S_IFREG {
                    let kind = info.st_mode & S_IFMT == S_IFDIR ? "a directory" : "not a regular file (a device, FIFO or socket)"
                    throw table.error("path", "\(buffer.path) is \(kind); give the buffer's SQLite file, such as \"/var/lib/farmgate/buffer.sqlite\"")
                }
            }
            if let interval = try table.duration("commit_interval", in: .milliseconds(10)...(.seconds(60))) {
                buffer.commitInterval = interval
            }
            if let quota = try table.byteSize("quota", in: (1 << 20)...(Int64(1) << 50)) { buffer.quotaBytes = quota }
            if let policy = try table.choice("when_full", ["drop_oldest": BufferFullPolicy.dropOldest, "drop_newest": .dropNewest]) {
                buffer.whenFull = policy
            }
        }

        let upload = try root.table("upload").map { table throws(ConfigurationError) in try parseUpload(table, base: base) }

        var controlSocket = Self.defaultControlSocket
        if let table = try root.table("control") {
            try table.checkKeys(["socket"])
            if let socket = try table.string("socket") {
                guard !socket.trimmingWhitespace().isEmpty else {
                    throw table.error("socket", "must not be empty: give the control socket's path, such as \"\(Self.defaultControlSocket)\" (or remove the key for that default)")
                }
                controlSocket = resolve(socket, against: base)
            }
        }
        // sockaddr_un's sun_path is 108 bytes on Linux, its NUL included (the same bound as `--socket`'s).
        guard controlSocket.utf8.count <= 107 else {
            let message = "\(controlSocket) is \(controlSocket.utf8.count) bytes, longer than a Unix socket path may be (107); give a shorter path, such as \"\(Self.defaultControlSocket)\""
            if let table = try root.table("control"), table.contains("socket") { throw table.error("socket", message) }
            throw root.error("control", message)
        }
        if let blocker = FileSystem.fileInTheWay(of: controlSocket), let table = try root.table("control") {
            throw table.error("socket", "\(blocker) is not a directory, so the agent cannot make its control socket \(controlSocket) there: give a path in a directory")
        }

        var logLevel = Logger.Level.info
        if let table = try root.table("log") {
            try table.checkKeys(["level"])
            let levels = Dictionary(uniqueKeysWithValues: Logger.Level.allCases.map { ($0.rawValue, $0) })
            if let level = try table.choice("level", levels) { logLevel = level }
        }

        var checkClock = true
        var holdUnsynchronized = Duration.seconds(900)
        if let table = try root.table("clock") {
            try table.checkKeys(["check", "hold_unsynchronized"])
            if let check = try table.bool("check") { checkClock = check }
            if let hold = try table.duration("hold_unsynchronized", in: .zero...(.seconds(7 * 86_400))) { holdUnsynchronized = hold }
        }

        var sensors: [SensorConfiguration] = []
        var seen: [SensorID: Int] = [:]
        let sensorTables = try root.tables("sensor")
        // Stateful frames carry every configured sensor in one table, which holds at most this many: past it every batch
        // would be unencodable and every reading would go to quarantine.
        if sensorTables.count > SensorTable.maxSensors {
            throw sensorTables[SensorTable.maxSensors].named("sensor #\(SensorTable.maxSensors + 1)").error(
                nil,
                "\(sensorTables.count) sensors configured, more than the \(SensorTable.maxSensors) one device can send (the "
                    + "sensor table of a batch holds at most \(SensorTable.maxSensors)); remove sensors, or split them across two "
                    + "devices with a [device] id and an agent each")
        }
        for (offset, raw) in sensorTables.enumerated() {
            let named = raw.named("sensor #\(offset + 1)")
            let idText = try named.requiredString("id")
            let id: SensorID
            do { id = try SensorID(idText) } catch { throw named.error("id", error.description) }
            let table = raw.named("sensor \"\(idText)\"")
            if let first = seen[id] {
                throw table.error("id", "sensor id \"\(idText)\" is already used by sensor #\(first); ids must be unique on a device")
            }
            seen[id] = offset + 1
            sensors.append(try parseSensor(table, id: id, drivers: drivers))
        }
        if sensors.isEmpty {
            throw root.error(nil, "no sensors configured; add at least one [[sensor]] table (see examples/agent.toml)")
        }
        try checkClaims(of: sensors, drivers: drivers)
        // Rules across sensors (a port claimed twice with different settings, a compensation source that does not exist).
        for description in drivers.descriptions where sensors.contains(where: { $0.driver == description.kind }) {
            try description.validateSite(sensors)
        }

        var configuration = AgentConfiguration(
            file: root.file, device: device, buffer: buffer, upload: upload, controlSocket: controlSocket, logLevel: logLevel,
            checkClock: checkClock, holdUnsynchronized: holdUnsynchronized, sensors: sensors)
        let metricsTable = try root.table("metrics")
        configuration.metrics = try metricsTable.map { table throws(ConfigurationError) in try parseMetrics(table, base: base) }
        try checkOwnFiles(configuration, root: root)
        // Another program's file where the buffer goes: the agent would put it in WAL mode, convert its pages, or move it
        // aside as damaged (after checkOwnFiles, which names the agent's own file that is there).
        if let problem = BufferStore.foreignFileProblem(path: buffer.path) {
            let message = "\(buffer.path) \(problem): not a Farmgate buffer, and the agent leaves it as it is; give the buffer a file of its own, such as \"/var/lib/farmgate/buffer.sqlite\""
            if let table = try root.table("buffer"), table.contains("path") { throw table.error("path", message) }
            throw ConfigurationError(file: root.file, line: nil, key: "[buffer] path", message: message + " (this is the default; set [buffer] path)")
        }
        configuration.warnings = ignoredKeyWarnings(sensors, drivers: drivers)
        // Not an error: node_exporter may be installed later. Until its directory exists the agent writes no metrics.
        if let metrics = configuration.metrics, let table = metricsTable {
            let directory = URL(fileURLWithPath: metrics.path).deletingLastPathComponent().path
            if !FileSystem.isDirectory(directory) {
                configuration.warnings.append(
                    table.error(
                        "textfile",
                        "the directory \(directory) does not exist: the agent writes no metrics until it does (install node_exporter's textfile collector there, or give a path in a directory that exists)"))
            }
        }
        return configuration
    }

    /// Why `path` cannot be the CA file the uploads trust (`[upload] ca_file`, `farmgate enroll --ca-file`), or nil. A
    /// key, the configuration itself or a DER file would fail every TLS handshake, blaming the ingest: said before.
    static func caFileProblem(_ path: String) -> String? {
        guard !path.isEmpty else { return "the CA file's path is empty; give a PEM file of CA certificates" }
        guard FileSystem.isFile(path), FileManager.default.isReadableFile(atPath: path) else {
            return "cannot read the CA file \(path); give a PEM file of CA certificates"
        }
        let bytes = try? FileSystem.bytes(path, limit: 4 << 20)
        if !(bytes.map { String(decoding: $0, as: UTF8.self).contains("-----BEGIN CERTIFICATE-----") } ?? false) {
            return "\(path) holds no PEM certificate (no -----BEGIN CERTIFICATE----- line); give the CA's certificate in PEM, not a key or a DER file"
        }
        return nil
    }

    /// Refuses two of the agent's own files at one path: the configuration, the buffer and its sidecars, the device key
    /// file, the metrics file and the control socket. The agent would overwrite one with the other (the metrics text
    /// replacing a buffer full of unsent readings, or the key), or could not start. Compared by path (`.`, `..` and
    /// repeated slashes resolved), before anything exists on disk; located at the key set later in this list (the
    /// socket, the metrics file, the key file, the buffer), or at the other file's key when that one is not set.
    ///
    /// Also refuses a control socket path where something other than a socket exists: the agent replaces only a stale
    /// socket, so it would refuse to start (and under systemd be restarted until its start limit).
    static func checkOwnFiles(_ configuration: AgentConfiguration, root: ConfigTable) throws(ConfigurationError) {
        struct OwnFile {
            var path: String
            var what: String
            var table: ConfigTable?
            var key: String?
            var isSet: Bool { table.map { table in key.map { table.contains($0) } ?? false } ?? false }
        }
        let control = try root.table("control")
        let buffer = try root.table("buffer")
        let upload = try root.table("upload")
        let metrics = try root.table("metrics")
        let bufferPath = configuration.buffer.path
        var files: [OwnFile] = [
            OwnFile(path: root.file, what: "the configuration file itself"),
            OwnFile(path: bufferPath, what: "the buffer ([buffer] path)", table: buffer, key: "path"),
            OwnFile(path: bufferPath + "-wal", what: "the buffer's -wal file", table: buffer, key: "path"),
            OwnFile(path: bufferPath + "-shm", what: "the buffer's -shm file", table: buffer, key: "path"),
            OwnFile(path: bufferPath + ".seq", what: "the buffer's .seq sidecar", table: buffer, key: "path"),
            OwnFile(path: bufferPath + ".lock", what: "the buffer's .lock file", table: buffer, key: "path"),
            OwnFile(path: bufferPath + ".control", what: "the buffer's .control file (where the agent's socket is)", table: buffer, key: "path"),
            OwnFile(path: bufferPath + ".reserve", what: "the buffer's .reserve file (disk space kept for a full disk)", table: buffer, key: "path"),
        ]
        if let upload, let keyFile = try upload.string("key_file") {
            files.append(OwnFile(path: resolve(keyFile, against: URL(fileURLWithPath: root.file).deletingLastPathComponent().path),
                what: "the device key file ([upload] key_file)", table: upload, key: "key_file"))
        }
        if let metricsFile = configuration.metrics?.path {
            files.append(OwnFile(path: metricsFile, what: "the metrics file ([metrics] textfile)", table: metrics, key: "textfile"))
        }
        files.append(OwnFile(path: configuration.controlSocket, what: "the control socket ([control] socket)", table: control, key: "socket"))
        var seen: [String: OwnFile] = [:]
        for file in files {
            let path = lexicalPath(file.path)
            guard let earlier = seen[path] else {
                seen[path] = file
                continue
            }
            let message =
                "\(file.what) is \(earlier.what) (\(file.path)); the agent would overwrite one with the other. Give each "
                + "its own path"
            for located in [file, earlier] where located.isSet {
                if let table = located.table, let key = located.key { throw table.error(key, message) }
            }
            throw root.error(nil, message)
        }
        var status = stat()
        if lstat(configuration.controlSocket, &status) == 0, status.st_mode & S_IFMT != S_IFSOCK {
            let message =
                "\(configuration.controlSocket) exists and is not a socket; the agent creates its control socket there and "
                + "replaces only a stale socket. Remove that file, or give the socket another path, such as \"/run/farmgate/control.sock\""
            if let control, control.contains("socket") { throw control.error("socket", message) }
            throw root.error(nil, message)
        }
    }

    /// `path` made absolute (against the working directory) with `.`, `..` and repeated slashes resolved, without touching
    /// the file system: two spellings of one path compare equal.
    static func lexicalPath(_ path: String) -> String {
        let absolute = path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
        var components: [Substring] = []
        for component in absolute.split(separator: "/", omittingEmptySubsequences: true) {
            switch component {
            case ".": continue
            case "..": _ = components.popLast()
            default: components.append(component)
            }
        }
        return "/" + components.joined(separator: "/")
    }

    /// One located warning per key a sensor's driver ignores for it (``DriverDescription/ignoredKeys``).
    static func ignoredKeyWarnings(_ sensors: [SensorConfiguration], drivers: DriverRegistry) -> [ConfigurationError] {
        var warnings: [ConfigurationError] = []
        for sensor in sensors {
            guard let driver = drivers.driver(named: sensor.driver) else { continue }
            for (key, why) in driver.ignoredKeys(sensor).sorted(by: { $0.key < $1.key }) where sensor.options.contains(key) {
                warnings.append(sensor.options.error(key, "has no effect here and is ignored: \(why); remove it"))
            }
        }
        return warnings
    }

    /// `[metrics] textfile` (required in the section) and `interval`.
    static func parseMetrics(_ table: ConfigTable, base: String) throws(ConfigurationError) -> MetricsFileConfiguration {
        try table.checkKeys(["textfile", "interval"])
        guard let path = try table.string("textfile"), !path.isEmpty else {
            throw table.error(
                "textfile",
                "is required in [metrics]: the file node_exporter's textfile collector reads, such as "
                    + "\"/var/lib/node_exporter/textfile_collector/farmgate.prom\" (or remove the [metrics] section)")
        }
        guard path.hasSuffix(".prom") else {
            throw table.error("textfile", "must end in .prom, or node_exporter's textfile collector ignores it (got \"\(path)\")")
        }
        var metrics = MetricsFileConfiguration(path: resolve(path, against: base))
        // The file is written beside and renamed over: a directory there could never be replaced (a tester's agent
        // logged "cannot rename ...: Is a directory" at every interval and wrote no metrics).
        var info = stat()
        if lstat(metrics.path, &info) == 0, info.st_mode & S_IFMT != S_IFREG, info.st_mode & S_IFMT != S_IFLNK {
            let kind = info.st_mode & S_IFMT == S_IFDIR ? "a directory" : "not a regular file"
            throw table.error("textfile", "\(metrics.path) is \(kind); the metrics file is replaced as a whole at each write: give a file path, such as \(metrics.path.hasSuffix("/") ? metrics.path : metrics.path + "/")farmgate.prom")
        }
        if let interval = try table.duration("interval", in: .seconds(1)...(.seconds(3600))) { metrics.interval = interval }
        return metrics
    }

    static func parseUpload(_ table: ConfigTable, base: String) throws(ConfigurationError) -> UploadConfiguration {
        try table.checkKeys([
            "endpoint", "key", "key_file", "ca_file", "format", "batch_max_readings", "backlog_batch_readings", "batch_max_bytes",
            "batch_max_age",
            "connect_timeout", "request_timeout", "stall_timeout", "backoff_initial", "backoff_max", "retry_after_max",
            "shutdown_flush_timeout", "device_check_interval", "stateful",
        ])
        let endpoint = try table.requiredString("endpoint")
        if let problem = endpointProblem(endpoint) { throw table.error("endpoint", problem) }
        let key: String
        switch (try table.string("key"), try table.string("key_file")) {
        case (.some, .some):
            throw table.error("key_file", "give either key or key_file, not both")
        case (.some(let inline), .none):
            key = inline
        case (.none, .some(let file)):
            let path = resolve(file, against: base)
            do {
                // A byte order mark (Windows editors add one) is not part of the key.
                key = String(try FileSystem.text(path, limit: 64 << 10).trimmingWhitespace().drop { $0 == "\u{FEFF}" })
            } catch {
                throw table.error("key_file", "cannot read \(path): \(error.reason)")
            }
        case (.none, .none):
            throw table.error(nil, "needs key or key_file: the device key printed by `farmgate-ingest device create`")
        }
        if let problem = KeyFormat.deviceKeyProblem(key) {
            // The key itself is never shown: only its form.
            let keyName = table.contains("key") ? "key" : "key_file"
            throw table.error(keyName, keyName == "key" ? problem : "\(resolve(try table.requiredString("key_file"), against: base)) " + problem)
        }
        let caFile = try table.string("ca_file").map { resolve($0, against: base) }
        if let caFile, let problem = caFileProblem(caFile) {
            throw table.error("ca_file", problem + (FileSystem.isFile(caFile) ? "" : ", or remove the key to use the system CAs"))
        }
        let defaults = UploadConfiguration(endpoint: endpoint, deviceKey: key)
        let batchMaxReadings = try table.int("batch_max_readings", in: 1...100_000) ?? defaults.batchMaxReadings
        let backlogBatchReadings = try table.int("backlog_batch_readings", in: 1...100_000)
        if let backlogBatchReadings, backlogBatchReadings < batchMaxReadings {
            throw table.error(
                "backlog_batch_readings",
                "must be at least batch_max_readings (\(batchMaxReadings)): backlog batches are the large ones (got \(backlogBatchReadings))")
        }
        let backoffInitial = try table.duration("backoff_initial", in: .milliseconds(10)...(.seconds(3600))) ?? defaults.backoffInitial
        let backoffMax = try table.duration("backoff_max", in: .milliseconds(10)...(.seconds(86_400))) ?? defaults.backoffMax
        if backoffMax < backoffInitial {
            throw table.error(
                table.contains("backoff_max") ? "backoff_max" : "backoff_initial",
                "backoff_max (\(ConfigTable.format(backoffMax))) is shorter than backoff_initial (\(ConfigTable.format(backoffInitial))): the waits grow from the first to the longest; give a backoff_max of at least backoff_initial")
        }
        return UploadConfiguration(
            endpoint: endpoint, deviceKey: key, caFile: caFile,
            format: try table.choice("format", ["binary": .binary, "json": .json]) ?? defaults.format,
            batchMaxReadings: batchMaxReadings,
            backlogBatchMaxReadings: backlogBatchReadings,
            batchMaxBytes: Int(try table.byteSize("batch_max_bytes", in: 1024...(64 << 20)) ?? Int64(defaults.batchMaxBytes)),
            batchMaxAge: try table.duration("batch_max_age", in: .zero...(.seconds(3600))) ?? defaults.batchMaxAge,
            connectTimeout: try table.duration("connect_timeout", in: .milliseconds(100)...(.seconds(300))) ?? defaults.connectTimeout,
            requestTimeout: try table.duration("request_timeout", in: .milliseconds(100)...(.seconds(3600))) ?? defaults.requestTimeout,
            stallTimeout: try table.duration("stall_timeout", in: .seconds(1)...(.seconds(3600))) ?? defaults.stallTimeout,
            backoffInitial: backoffInitial,
            backoffMax: backoffMax,
            retryAfterMax: try table.duration("retry_after_max", in: .seconds(1)...(.seconds(86_400))) ?? defaults.retryAfterMax,
            shutdownFlushTimeout: try table.duration("shutdown_flush_timeout", in: .zero...(.seconds(600)))
                ?? defaults.shutdownFlushTimeout,
            deviceCheckInterval: try table.duration("device_check_interval", in: .seconds(1)...(.seconds(86_400)))
                ?? defaults.deviceCheckInterval,
            stateful: try table.bool("stateful") ?? defaults.stateful)
    }

    /// `endpoint` with what stands between `://` (or the start) and an `@` before the first `/` replaced by `…`, so that
    /// a password in it is never shown.
    static func redactingUserInfo(_ endpoint: String) -> String {
        let start: String.Index = endpoint.firstRange(of: "://")?.upperBound ?? endpoint.startIndex
        let authority = endpoint[start...].prefix { $0 != "/" && $0 != "?" && $0 != "#" }
        guard let at = authority.lastIndex(of: "@") else { return endpoint }
        return String(endpoint[endpoint.startIndex..<start]) + "…" + String(endpoint[at...])
    }

    /// Why `endpoint` cannot be the ingest's base URL, or nil when it can: an `http://` or `https://` URL whose host is a
    /// name or an address (no spaces or other characters a host cannot have), whose port, if given, is 1–65535, without a
    /// query or a fragment. libcurl would refuse the others at every upload.
    public static func endpointProblem(_ endpoint: String) -> String? {
        // Whatever else is wrong, a user name or password before @ is never echoed: the messages show the URL without it.
        let endpoint = redactingUserInfo(endpoint)
        let example = "such as \"https://ingest.example.net\" or \"http://192.0.2.10:8080\""
        let lowered = endpoint.lowercased()
        let afterScheme: String.Index
        if lowered.hasPrefix("http://") {
            afterScheme = endpoint.utf8.index(endpoint.startIndex, offsetBy: 7)
        } else if lowered.hasPrefix("https://") {
            afterScheme = endpoint.utf8.index(endpoint.startIndex, offsetBy: 8)
        } else {
            return "must be an http:// or https:// URL \(example) (got \"\(endpoint)\")"
        }
        let authority = endpoint[afterScheme...].prefix { $0 != "/" && $0 != "?" && $0 != "#" }
        if authority.contains("@") {
            // Never echoed: what stands before @ may be a password. It would be printed by `config check`, `status` and
            // the log, and the ingest authenticates the device by its key alone.
            return "has a user name or password before @ in its address; remove it (the ingest knows the device by its key, [upload] key_file), such as \"https://ingest.example.net\""
        }
        // A credential anywhere in it (a key pasted into the path): the endpoint is printed by `config check`, `status`
        // and the log, which would show the key in full (the message here is redacted with every configuration error).
        if endpoint.redactingCredentials() != endpoint {
            return "holds a key (\(endpoint.redactingCredentials())); remove it: the ingest's URL is printed by `config check`, `status` and the log, and the device key goes in [upload] key_file (or key) alone, \(example)"
        }
        var host = authority
        var port: Substring?
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { return "has an IPv6 address without its closing ]: \"\(endpoint)\"" }
            host = authority[authority.index(after: authority.startIndex)..<close]
            let rest = authority[authority.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":") else { return "has \"\(rest)\" after the IPv6 address where only :port may be (got \"\(endpoint)\")" }
                port = rest.dropFirst()
            }
            // An IPv6 address, with a zone after %25 (`[fe80::1%25eth0]`), which libcurl takes.
            let zone = host.firstRange(of: "%25")
            let address = zone.map { host[..<$0.lowerBound] } ?? host
            let zoneName = zone.map { host[$0.upperBound...] } ?? ""
            guard !address.isEmpty, address.unicodeScalars.allSatisfy({ $0.properties.isASCIIHexDigit || $0 == ":" || $0 == "." }),
                zone == nil || (!zoneName.isEmpty && zoneName.unicodeScalars.allSatisfy(Self.isHostScalar))
            else {
                return "has \"[\(host)]\", which is not an IPv6 address (got \"\(endpoint)\")"
            }
        } else {
            if let colon = authority.lastIndex(of: ":") {
                host = authority[..<colon]
                port = authority[authority.index(after: colon)...]
            }
            guard !host.isEmpty else { return "has no host: give the ingest's name or address, \(example) (got \"\(endpoint)\")" }
            let allowed = host.unicodeScalars.allSatisfy(Self.isHostScalar)
            guard allowed else {
                return "has the host \"\(host)\", which is not a host name or address (letters, digits, - and . only; "
                    + "no spaces), \(example) (got \"\(endpoint)\")"
            }
            if let problem = hostNameProblem(host) { return "has the host \"\(host)\", \(problem), \(example) (got \"\(endpoint)\")" }
        }
        // An empty port (`host:/`) is the scheme's default.
        if let port, !port.isEmpty {
            guard port.unicodeScalars.allSatisfy({ ("0"..."9").contains($0) }), let number = Int(port), (1...65535).contains(number) else {
                return "has the port \"\(port)\": a port is a number from 1 to 65535 (got \"\(endpoint)\")"
            }
        }
        if let problem = endpointQueryOrFragment(endpoint) { return problem }
        guard URL(string: endpoint) != nil else { return "is not a URL \(example) (got \"\(endpoint)\")" }
        return nil
    }

    /// Why `host` (of allowed characters) is neither an IPv4 address nor a host name, as libcurl finds only when it
    /// connects: a dotted number with a part above 255 or not four parts, an empty label, a label that starts or ends
    /// with `-` or is longer than 63 characters.
    static func hostNameProblem(_ host: Substring) -> String? {
        let name = host.hasSuffix(".") ? host.dropLast() : host
        let labels = name.split(separator: ".", omittingEmptySubsequences: false)
        if name.unicodeScalars.allSatisfy({ ("0"..."9").contains($0) || $0 == "." }) {
            guard labels.count == 4, labels.allSatisfy({ !$0.isEmpty && $0.count <= 3 && (Int($0) ?? 256) <= 255 }) else {
                return "which is not an IPv4 address (four numbers from 0 to 255)"
            }
            return nil
        }
        if labels.contains(where: \.isEmpty) { return "which has an empty label (two dots in a row, or a leading dot)" }
        if let bad = labels.first(where: { $0.hasPrefix("-") || $0.hasSuffix("-") }) {
            return "whose label \"\(bad)\" starts or ends with -, which no host name does"
        }
        if let long = labels.first(where: { $0.utf8.count > 63 }) { return "whose label \"\(long.prefix(20))…\" is longer than 63 characters" }
        return nil
    }

    /// A letter, digit, `-`, `.` or `_`, or any non-ASCII scalar (an internationalised name, which libcurl converts).
    static func isHostScalar(_ scalar: Unicode.Scalar) -> Bool {
        if scalar.value > 0x7F { return true }
        switch scalar {
        case "a"..."z", "A"..."Z", "0"..."9", "-", ".", "_": return true
        default: return false
        }
    }

    /// Why `endpoint` cannot be the ingest's base URL because it has a query (`?…`) or a fragment (`#…`): the agent appends
    /// its paths (`/v1/batches`) to the base URL, so they would end up inside the query. nil when it has neither.
    /// A serial sensor's `port`, resolved against the configuration file's directory: a device path, refused empty, with
    /// a quote, a control character (a line break, a CR) or whitespace at either end, which no device path has: a value
    /// pasted with its own quotes and a comment (`port="/dev/ttyC" # note`) was taken, passed `config check`, and
    /// failed only when the port was opened, with the raw line break in the message.
    static func serialPort(_ table: ConfigTable, example: String) throws(ConfigurationError) -> String {
        let written = try table.requiredString("port")
        guard !written.trimmingWhitespace().isEmpty else { throw table.error("port", "must name the serial device, such as \(example)") }
        if written.contains("\"") || written.controlCharacterProblem() != nil || written.trimmingWhitespace() != written {
            throw table.error(
                "port",
                "is \"\(written.prefix(200).escapingControlCharacters)\", which is no device path (a quote, a line break or another control "
                    + "character, or spaces at an end): write the path alone in quotes, such as \(example)")
        }
        return resolve(written, against: URL(fileURLWithPath: table.file).deletingLastPathComponent().path)
    }

    public static func endpointQueryOrFragment(_ endpoint: String) -> String? {
        guard let mark = endpoint.firstIndex(where: { $0 == "?" || $0 == "#" }) else { return nil }
        let part = endpoint[mark] == "?" ? "a query" : "a fragment"
        return "must be the ingest's base URL without \(part): remove \"\(endpoint[mark...])\" (got \"\(endpoint)\"); the agent "
            + "appends the paths it posts to, such as \(IngestProtocol.batchesPath)"
    }

    static func parseSensor(_ table: ConfigTable, id: SensorID, drivers: DriverRegistry) throws(ConfigurationError) -> SensorConfiguration {
        let driverName = try table.requiredString("driver")
        guard let driver = drivers.driver(named: driverName) else {
            throw table.error("driver", "unknown driver \"\(driverName)\"; available: \(drivers.names.joined(separator: ", "))")
        }
        try table.checkKeys(SensorConfiguration.commonKeys.union(driver.optionKeys))
        let quantityText = try table.requiredString("quantity")
        guard let quantity = Quantity(rawValue: quantityText.lowercased()) else {
            throw table.error("quantity", "unknown quantity \"\(quantityText)\"; one of: \(Quantity.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        var resolution = driver.nativeResolution(quantity, table) ?? quantity.defaultResolution
        if let value = table.value("resolution") {
            let text: String
            switch value {
            case .string(let s): text = s
            case .double(let d): text = "\(d)"
            case .integer(let i): text = "\(i)"
            default: throw table.error("resolution", "must be a decimal step such as \"0.01\" or a fraction such as \"1/16\"")
            }
            do { resolution = try Resolution(parsing: text) } catch { throw table.error("resolution", error.description) }
            if let problem = quantity.coarseResolutionProblem(resolution) { throw table.error("resolution", problem) }
        }
        let interval = try table.duration("interval", in: .milliseconds(100)...(.seconds(86_400))) ?? .seconds(10)
        let deadband = try table.double("deadband", in: 0...1_000_000) ?? 0
        let heartbeat = try table.duration("heartbeat", in: .seconds(1)...(.seconds(7 * 86_400))) ?? .seconds(900)
        if deadband > 0, heartbeat < interval {
            throw table.error("heartbeat", "must not be shorter than interval (\(ConfigTable.format(interval)))")
        }
        let low = try table.double("expected_min")
        let high = try table.double("expected_max")
        var expected: ClosedRange<Double>?
        switch (low, high) {
        case (.some(let l), .some(let h)):
            guard l <= h else { throw table.error("expected_max", "must not be below expected_min (\(l))") }
            expected = l...h
        case (.some(let l), .none): expected = l...Double.greatestFiniteMagnitude
        case (.none, .some(let h)): expected = -Double.greatestFiniteMagnitude...h
        case (.none, .none): expected = nil
        }
        let configuration = SensorConfiguration(
            id: id, driver: driver.kind, descriptor: SensorDescriptor(id: id, quantity: quantity, resolution: resolution),
            interval: interval, deadband: deadband, heartbeat: heartbeat, expectedRange: expected, options: table)
        try driver.validate(configuration)
        return configuration
    }

    /// Refuses two sensors that claim one port or line with different settings, or one that cannot be shared.
    static func checkClaims(of sensors: [SensorConfiguration], drivers: DriverRegistry) throws(ConfigurationError) {
        var first: [String: (claim: ResourceClaim, sensor: SensorConfiguration)] = [:]
        for sensor in sensors {
            guard let driver = drivers.driver(named: sensor.driver) else { continue }
            for claim in try driver.claims(sensor) {
                // One device written two ways (a by-id link and its target) is one resource.
                let identity = claim.identity ?? claim.resource
                guard let earlier = first[identity] else {
                    first[identity] = (claim, sensor)
                    continue
                }
                let earlierLine = earlier.sensor.options.error(earlier.claim.key, "").line.map { " (line \($0))" } ?? ""
                let spelling = earlier.claim.resource == claim.resource ? "" : " (the same device, written \(earlier.claim.resource) there)"
                let other = "sensor \"\(earlier.sensor.id)\"\(earlierLine)\(spelling)"
                if !claim.shareable || !earlier.claim.shareable {
                    throw sensor.options.error(
                        claim.key, "\(claim.resource) is already used by \(other); only one sensor may use it")
                }
                if claim.settings != earlier.claim.settings {
                    throw sensor.options.error(
                        claim.key,
                        "\(claim.resource) is also used by \(other) with \(earlier.claim.settings); every sensor on it must use the "
                            + "same settings (this one has \(claim.settings))")
                }
            }
        }
    }

    public static func resolve(_ path: String, against base: String) -> String {
        if path.hasPrefix("/") { return path }
        return URL(fileURLWithPath: base).appendingPathComponent(path).standardizedFileURL.path
    }
}
