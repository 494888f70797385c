import ArgumentParser
import FarmgateAgent
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `farmgate-bench wire`: what uploads cost on a metered link, in bytes per reading on the wire (TCP payload, TLS and HTTP
/// headers included, both directions), measured by a byte-counting TCP proxy (``ByteCountingProxy``) between a client and
/// a real `farmgate-ingest` process serving TLS on loopback.
///
/// - Live: the real `farmgate agent` process with 60 simulated sensors (20 tanks × pH, EC, temperature) read every 10 s,
///   default upload settings except the endpoint, key and CA file (and whatever `--batch-max-age`, `--batch-max-readings`
///   or `--upload-settings` change), for `--seconds` of real time. Steady state: the bytes between two moments
///   (after `--warmup` and at the end) over the readings the agent saw acknowledged between them. Delay: for every stored
///   reading, the ingest's `received_at` minus the reading's timestamp (both from the ingest's SQLite store).
/// - Backlog: realistic site data (``RealisticSite``, profile agent) posted in batches of 10, 30, 250 and 1000 readings with
///   the agent's own HTTP client (libcurl, same headers as the uploader), one connection per batch size and format,
///   sequentially: the self-contained binary frame (BatchCodec, format version 2) and the stateful frame (WireSession,
///   version 4, with compact receipts) to the ingest, and the baseline, the same readings as
///   InfluxDB line protocol + gzip over HTTP/1.1 (the only protocol it offers by ALPN) to a TLS sink that answers 204 as InfluxDB's write API does
///   (``LineProtocolSink``), through a second counting proxy.
///
/// Prints, never asserts.
struct WireBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "wire",
        abstract: "Bytes per reading on the wire (TLS and headers included) for a live agent and for backlog batches, with a line protocol + gzip baseline.")

    @Option(help: "Directory holding farmgate and farmgate-ingest (default: the one holding this benchmark; build them with -c release).")
    var bin: String?

    @Option(help: "Live run: seconds of real time the agent runs.")
    var seconds = 300

    @Option(help: "Live run: seconds before the steady-state window starts (connection set up, first batches acknowledged).")
    var warmup = 30

    @Option(help: "Tanks on the site; each has a pH, an EC and a temperature sensor.")
    var tanks = 20

    @Option(help: "Live run: read interval of every sensor.")
    var interval = "10s"

    @Option(help: "Live run: the agent's [upload] batch_max_age (default: the agent's default).")
    var batchMaxAge: String?

    @Option(help: "Live run: the agent's [upload] batch_max_readings (default: the agent's default).")
    var batchMaxReadings: Int?

    @Option(help: "Live run: extra lines for the agent's [upload] section, e.g. 'format = \"json\"'.")
    var uploadSettings = ""

    @Option(help: "Backlog: readings posted per batch size and format.")
    var backlogReadings = 20_000

    @Option(help: "Backlog: batch sizes, comma-separated.")
    var batchSizes = "10,30,250,1000,5000"

    @Option(help: "Backlog: seed of the data generator.")
    var seed: UInt64 = 42

    @Flag(help: "Only the live run.")
    var liveOnly = false

    @Flag(help: "Only the backlog batches.")
    var backlogOnly = false

    @Flag(help: "Plain HTTP instead of TLS (for an ingest without [server] tls_certificate).")
    var plain = false

    @Flag(inversion: .prefixedNo, help: "Offer HTTP/2 on the ingest ([server] http2).")
    var http2 = true

    @Option(help: "Keep the working files (stores, logs, configurations) in this directory instead of a temporary one.")
    var keep: String?

    func validate() throws {
        guard seconds > 0, warmup >= 0, warmup < seconds else { throw ValidationError("--seconds must be positive and above --warmup") }
        guard tanks > 0, backlogReadings > 0 else { throw ValidationError("--tanks and --backlog-readings must be positive") }
        guard !(liveOnly && backlogOnly) else { throw ValidationError("--live-only and --backlog-only exclude each other") }
        guard !sizes.isEmpty, sizes.allSatisfy({ $0 > 0 }) else {
            throw ValidationError("--batch-sizes must be positive numbers separated by commas, such as 10,30,250,1000")
        }
    }

    var sizes: [Int] { batchSizes.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) } }

    func run() async throws {
        let logger = Logger.bench
        let binaries = bin ?? URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
        let agentBinary = binaries + "/farmgate", ingestBinary = binaries + "/farmgate-ingest"
        for binary in [agentBinary, ingestBinary] where !FileManager.default.isExecutableFile(atPath: binary) {
            throw ValidationError(
                "no \(binary); build it with `swift build -c release` (all products) or pass --bin")
        }
        let directory = keep ?? (NSTemporaryDirectory() + "farmgate-bench-wire-" + UUID().uuidString)
        try FileManager.default.createDirectory(atPath: directory + "/agent", withIntermediateDirectories: true)
        defer { if keep == nil { try? FileManager.default.removeItem(atPath: directory) } }

        let certificate = plain ? nil : try BenchCertificate.make(in: directory)
        let ingest = try await BenchIngest.start(
            binary: ingestBinary, directory: directory, certificate: certificate, http2: http2,
            devices: ["site-live"] + (liveOnly ? [] : sizes.flatMap { ["backlog-\($0)", "backlog-\($0)-stateful"] }))
        defer { ingest.stop() }
        let proxy = try ByteCountingProxy(targetPort: ingest.port)
        defer { proxy.stop() }
        let scheme = plain ? "http" : "https"
        print("farmgate-ingest \(plain ? "plain HTTP" : "TLS (self-signed ECDSA P-256)\(http2 ? ", HTTP/2 offered by ALPN" : "")") on 127.0.0.1:\(ingest.port), counted through 127.0.0.1:\(proxy.port)")
        print("bytes: TCP payload through the proxy (TLS records and HTTP headers included; TCP/IP headers not)")

        if !backlogOnly {
            print("\n## live: the agent with \(tanks * 3) simulated sensors every \(interval)\n")
            let live = LiveRun(
                agentBinary: agentBinary, directory: directory + "/agent", endpoint: "\(scheme)://127.0.0.1:\(proxy.port)",
                key: ingest.keys["site-live"] ?? "", caFile: certificate?.certificate, tanks: tanks, interval: interval,
                batchMaxAge: batchMaxAge, batchMaxReadings: batchMaxReadings, uploadSettings: uploadSettings)
            try await live.run(seconds: seconds, warmup: warmup, proxy: proxy, ingestStore: directory + "/ingest.sqlite")
        }
        if !liveOnly {
            print("\n## backlog: \(backlogReadings) readings per batch size and format, one connection each, sequential\n")
            let backlog = BacklogRun(
                tanks: tanks, readings: backlogReadings, seed: seed, sizes: sizes, scheme: scheme, caFile: certificate?.certificate,
                keys: ingest.keys, logger: logger)
            try await backlog.run(ingestProxy: proxy, certificate: certificate)
        }
    }
}

/// A `farmgate-ingest serve` process on a fresh SQLite store, with a farm and devices made by its own CLI.
final class BenchIngest: Sendable {
    let port: Int
    /// Device name → key.
    let keys: [String: String]
    private let process: Process

    private init(port: Int, keys: [String: String], process: Process) {
        self.port = port
        self.keys = keys
        self.process = process
    }

    static func start(binary: String, directory: String, certificate: BenchCertificate?, http2: Bool, devices: [String]) async throws -> BenchIngest {
        let port = try LocalIngest.freePort()
        var server = """
            [server]
            host = "127.0.0.1"
            port = \(port)

            """
        if let certificate {
            server += """
                tls_certificate = "\(certificate.certificate)"
                tls_key = "\(certificate.key)"
                http2 = \(http2)

                """
        }
        let config = directory + "/ingest.toml"
        try (server + """

            [storage]
            path = "\(directory)/ingest.sqlite"

            [limits]
            requests_per_second = 100000
            burst = 100000

            [log]
            level = "warning"

            """).write(toFile: config, atomically: true, encoding: .utf8)
        _ = try await runOffPool { try Self.output(of: binary, ["farm", "create", "bench", "--config", config]) }
        var keys: [String: String] = [:]
        for device in devices {
            let text = try await runOffPool { try Self.output(of: binary, ["device", "create", "--farm", "bench", "--device", device, "--config", config]) }
            guard let key = text.split(whereSeparator: \.isWhitespace).first(where: { $0.hasPrefix("fgd_") }) else {
                throw ValidationError("farmgate-ingest device create printed no key: \(text)")
            }
            keys[device] = String(key)
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["serve", "--config", config]
        let log = directory + "/ingest.log"
        guard FileManager.default.createFile(atPath: log, contents: nil) else { throw ValidationError("cannot create \(log)") }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        let ingest = BenchIngest(port: port, keys: keys, process: process)
        for _ in 0..<400 {
            guard process.isRunning else {
                throw ValidationError("farmgate-ingest stopped at start: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "see \(log)")")
            }
            if let fd = try? ByteCountingProxy.connect(port: port) {
                close(fd)
                return ingest
            }
            try await Task.sleep(for: .milliseconds(25))
        }
        ingest.stop()
        throw ValidationError("farmgate-ingest did not listen on port \(port) within 10 s; its log is \(log)")
    }

    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
    }

    /// Runs a command to its end and returns what it printed; throws with its output when it fails.
    static func output(of binary: String, _ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard process.terminationStatus == 0 else {
            throw ValidationError("\(binary) \(arguments.joined(separator: " ")) failed (\(process.terminationStatus)): \(text)")
        }
        return text
    }
}

/// Formats for the tables.
enum WireFormat {
    static func perReading(_ bytes: Int, _ readings: Int) -> String {
        readings > 0 ? String(format: "%.2f", Double(bytes) / Double(readings)) : "-"
    }

    static func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text : String(repeating: " ", count: width - text.count) + text
    }
}

/// The live run: the real agent, uploading through the proxy.
struct LiveRun {
    var agentBinary: String
    var directory: String
    var endpoint: String
    var key: String
    var caFile: String?
    var tanks: Int
    var interval: String
    var batchMaxAge: String?
    var batchMaxReadings: Int?
    var uploadSettings: String

    /// The agent's upload counters at one moment, with the proxy's.
    struct Snapshot {
        var bytes: ByteCountingProxy.Totals
        var acknowledged: Int64
        var requests: Int64
        var at: ContinuousClock.Instant
    }

    func run(seconds: Int, warmup: Int, proxy: ByteCountingProxy, ingestStore: String) async throws {
        let config = try writeConfiguration()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: agentBinary)
        process.arguments = ["agent", "--config", config]
        let log = directory + "/agent.log"
        guard FileManager.default.createFile(atPath: log, contents: nil) else { throw ValidationError("cannot create \(log)") }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = handle
        process.standardError = handle
        let before = proxy.totals()
        try process.run()
        let pid = process.processIdentifier
        defer {
            if process.isRunning {
                kill(pid, SIGTERM)
                process.waitUntilExit()
            }
        }
        let socket = directory + "/control.sock"
        let started = ContinuousClock.now
        try await Task.sleep(until: started + .seconds(warmup))
        guard process.isRunning else { throw ValidationError("the agent stopped; its log is \(log)") }
        let first = try await snapshot(proxy: proxy, socket: socket)
        try await Task.sleep(until: started + .seconds(seconds))
        guard process.isRunning else { throw ValidationError("the agent stopped; its log is \(log)") }
        let last = try await snapshot(proxy: proxy, socket: socket)
        // SIGTERM: the agent commits and sends what it holds, then exits; its connection closes.
        kill(pid, SIGTERM)
        _ = try await runOffPool { process.waitUntilExit() }
        for _ in 0..<100 where proxy.connections().contains(where: { !$0.closed }) { try await Task.sleep(for: .milliseconds(20)) }
        let whole = proxy.totals() - before
        let connections = Array(proxy.connections().suffix(whole.connections))

        let delays = try await runOffPool { try Self.delays(store: ingestStore, device: "site-live") }
        let stored = delays.count
        let window = last.bytes - first.bytes
        let windowReadings = Int(last.acknowledged - first.acknowledged)
        let windowRequests = Int(last.requests - first.requests)
        let windowSeconds = (last.at - first.at) / .seconds(1)
        print("agent: \(agentBinary), upload settings: \(describeSettings()), exit status \(process.terminationStatus)")
        print("\(seconds) s real time; steady state from \(warmup) s to the end (\(String(format: "%.0f", windowSeconds)) s)")
        print("")
        print("                         readings   requests   bytes up   bytes down   up/reading   down/reading   total/reading")
        func row(_ label: String, _ bytes: ByteCountingProxy.Totals, readings: Int, requests: Int?) {
            print(label.padding(toLength: 22, withPad: " ", startingAt: 0)
                + WireFormat.pad("\(readings)", 11) + WireFormat.pad(requests.map { "\($0)" } ?? "-", 11)
                + WireFormat.pad("\(bytes.up)", 11) + WireFormat.pad("\(bytes.down)", 13)
                + WireFormat.pad(WireFormat.perReading(bytes.up, readings), 13) + WireFormat.pad(WireFormat.perReading(bytes.down, readings), 15)
                + WireFormat.pad(WireFormat.perReading(bytes.total, readings), 16))
        }
        row("whole run (stored)", whole, readings: stored, requests: Int(last.requests))
        row("steady state", window, readings: windowReadings, requests: windowRequests)
        print("")
        print("connections: \(whole.connections) (\(connections.filter { $0.tls == true }.count) TLS); setup before the first request: \(whole.setupUp) bytes up, \(whole.setupDown) down"
            + (window.connections > 0 ? "; \(window.connections) opened during the steady-state window" : ""))
        print("readings per request (steady state): \(windowRequests > 0 ? String(format: "%.1f", Double(windowReadings) / Double(windowRequests)) : "-")")
        if !delays.isEmpty {
            let sorted = delays.sorted()
            func at(_ q: Double) -> Double { Double(sorted[min(sorted.count - 1, Int(q * Double(sorted.count)))]) / 1_000_000 }
            print(String(
                format: "delay from a reading's timestamp to its arrival at the ingest (received_at − timestamp): median %.1f s, p99 %.1f s, max %.1f s",
                at(0.5), at(0.99), Double(sorted[sorted.count - 1]) / 1_000_000))
        }
    }

    func describeSettings() -> String {
        var parts: [String] = []
        if let batchMaxAge { parts.append("batch_max_age = \(batchMaxAge)") }
        if let batchMaxReadings { parts.append("batch_max_readings = \(batchMaxReadings)") }
        let extra = uploadSettings.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        parts += extra
        return parts.isEmpty ? "defaults" : parts.joined(separator: ", ")
    }

    func snapshot(proxy: ByteCountingProxy, socket: String) async throws -> Snapshot {
        let answer = try await runOffPool { try ControlClient.send(ControlRequest(command: "status"), to: socket) }
        let bytes = proxy.totals()
        let decoded = try JSONDecoder().decode(ControlAnswer.self, from: Data(answer))
        guard let upload = decoded.status?.upload else { throw ValidationError("the agent's status: \(decoded.error ?? "no upload status")") }
        return Snapshot(bytes: bytes, acknowledged: upload.uploadedTotal, requests: upload.requestsTotal, at: .now)
    }

    /// received_at − timestamp of every reading the ingest stored for the device, in microseconds.
    static func delays(store: String, device: String) throws -> [Int64] {
        let connection = try SQLiteConnection(path: store, mode: .readOnly)
        let rows = try connection.query(
            "SELECT r.received_at_us - r.timestamp_us FROM readings r JOIN devices d ON d.id = r.device_id WHERE d.name = ?", [.text(device)])
        return rows.compactMap { row in
            if case .integer(let value) = row.first { value } else { nil }
        }
    }

    func writeConfiguration() throws -> String {
        var upload = """
            endpoint = "\(endpoint)"
            key = "\(key)"

            """
        if let caFile { upload += "ca_file = \"\(caFile)\"\n" }
        if let batchMaxAge { upload += "batch_max_age = \"\(batchMaxAge)\"\n" }
        if let batchMaxReadings { upload += "batch_max_readings = \(batchMaxReadings)\n" }
        upload += uploadSettings + "\n"
        var text = """
            [device]
            id = "site-live"

            [buffer]
            path = "buffer.sqlite"

            [upload]
            \(upload)
            [control]
            socket = "control.sock"

            [log]
            level = "warning"

            [clock]
            check = false

            """
        for tank in 1...tanks {
            for (suffix, quantity) in [("ph", "ph"), ("ec", "ec"), ("temp", "temperature")] {
                text += """

                    [[sensor]]
                    id = "tank\(tank).\(suffix)"
                    driver = "simulated"
                    quantity = "\(quantity)"
                    interval = "\(interval)"

                    """
            }
        }
        let path = directory + "/agent.toml"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }
}

/// The backlog batches: realistic data posted with the agent's HTTP client, sequentially, one connection per batch size and
/// format.
struct BacklogRun {
    var tanks: Int
    var readings: Int
    var seed: UInt64
    var sizes: [Int]
    var scheme: String
    var caFile: String?
    var keys: [String: String]
    var logger: Logger

    struct Row {
        var size: Int
        var format: String
        var version: String
        var requests: Int
        var readings: Int
        var bytes: ByteCountingProxy.Totals
    }

    func run(ingestProxy: ByteCountingProxy, certificate: BenchCertificate?) async throws {
        var site = try RealisticSite(tanks: tanks, readingCount: readings, seed: seed)
        // The generator's data lie in November 2026; moved by whole seconds so that the newest reading is a minute old
        // (the ingest judges timestamps by its own clock), their spacing untouched.
        let newest = site.readings.map(\.timestamp.microseconds).max() ?? 0
        let shift = (Timestamp.now().microseconds - 60_000_000 - newest) / 1_000_000 * 1_000_000
        for index in site.readings.indices {
            site.readings[index].timestamp = Timestamp(microseconds: site.readings[index].timestamp.microseconds + shift)
        }
        let data = site
        // The agent's table: every configured sensor.
        let table = try SensorTable(site.sensors)
        print("data: RealisticSite profile agent, \(data.sensors.count) sensors every 10 s, seed \(seed)")
        print("binary v2: BatchCodec frames (zstd 19) posted to \(IngestProtocol.batchesPath), Content-Type \(IngestProtocol.binaryBatchMediaType), Accept application/json (the agent before issue 10)")
        print("stateful v4: WireSession frames (table once, then its hash; predicted from the acknowledged readings), key in \(IngestProtocol.deviceKeyHeader), Accept \(IngestProtocol.compactReceiptMediaType), application/json (the agent now)")
        print("line protocol: `reading,device=…,sensor=… value=… <ns>` + gzip (level 6) posted to /api/v2/write over HTTP/1.1, answered 204")
        print("v2 and line protocol: Authorization Bearer <device key>; all: User-Agent farmgate, the agent's libcurl client (one connection, keep-alive)")
        print("")
        print("batch   format                 HTTP       requests   up B/reading   down B/reading   total B/reading   without setup   setup bytes (up+down)")
        try await LineProtocolSink.withRunning(certificate: certificate, logger: logger) { sinkPort, sink in
            let sinkProxy = try ByteCountingProxy(targetPort: sinkPort)
            defer { sinkProxy.stop() }
            var rows: [Row] = []
            for size in sizes {
                let device = try DeviceID("backlog-\(size)")
                let key = keys["backlog-\(size)"] ?? ""
                let batches = data.batches(of: size).map { Batch(device: device, sensors: $0.sensors, readings: $0.readings) }
                let count = batches.reduce(0) { $0 + $1.readings.count }

                let binary = try await connection(ingestProxy) { client in
                    let url = "\(scheme)://127.0.0.1:\(ingestProxy.port)\(IngestProtocol.batchesPath)"
                    let headers = [
                        HTTPHeader("Authorization", "Bearer \(key)"), HTTPHeader("Content-Type", IngestProtocol.binaryBatchMediaType),
                        HTTPHeader("Accept", "application/json"),
                    ]
                    var version: HTTPVersion?
                    for batch in batches {
                        let response = try await client.post(url, headers: headers, body: try BatchCodec.encode(batch))
                        try Self.checkReceipt(response, readings: batch.readings.count, url: url)
                        version = response.httpVersion
                    }
                    return (batches.count, version)
                }
                rows.append(Row(size: size, format: "farmgate binary v2", version: binary.version, requests: binary.requests, readings: count, bytes: binary.bytes))
                Self.printRow(rows[rows.count - 1])

                let statefulKey = keys["backlog-\(size)-stateful"] ?? ""
                let statefulDevice = try DeviceID("backlog-\(size)-stateful")
                let stateful = try await connection(ingestProxy) { client in
                    try await Self.postStateful(
                        batches.map { Batch(device: statefulDevice, sensors: $0.sensors, readings: $0.readings) }, table: table, client: client,
                        url: "\(scheme)://127.0.0.1:\(ingestProxy.port)\(IngestProtocol.batchesPath)", key: statefulKey)
                }
                rows.append(Row(size: size, format: "farmgate stateful v4", version: stateful.version, requests: stateful.requests, readings: count, bytes: stateful.bytes))
                Self.printRow(rows[rows.count - 1])

                let bodies = batches.map { Gzip.compress(CodecBenchmark.lineProtocol($0)) }
                let linesBefore = sink.lines.load(ordering: .relaxed)
                let line = try await connection(sinkProxy) { client in
                    let url = "\(scheme)://127.0.0.1:\(sinkProxy.port)/api/v2/write?org=farm&bucket=site&precision=ns"
                    let headers = [
                        HTTPHeader("Authorization", "Bearer \(key)"), HTTPHeader("Content-Type", "text/plain; charset=utf-8"),
                        HTTPHeader("Content-Encoding", "gzip"), HTTPHeader("Accept", "application/json"),
                    ]
                    var version: HTTPVersion?
                    for body in bodies {
                        let response = try await client.post(url, headers: headers, body: body)
                        guard response.status == 204 else { throw ValidationError("\(url) answered \(response.status)") }
                        version = response.httpVersion
                    }
                    return (bodies.count, version)
                }
                let received = sink.lines.load(ordering: .relaxed) - linesBefore
                guard received == count else { throw ValidationError("the line protocol sink received \(received) lines of \(count)") }
                rows.append(Row(size: size, format: "line protocol + gzip", version: line.version, requests: line.requests, readings: count, bytes: line.bytes))
                Self.printRow(rows[rows.count - 1])
            }
        }
        print("")
        print("setup: the TLS handshake, every byte before the first request (see ByteCountingProxy); \"without setup\" leaves it out")
    }

    static func printRow(_ row: Row) {
        let withoutSetup = row.bytes.total - row.bytes.setupUp - row.bytes.setupDown
        Swift.print(
            WireFormat.pad("\(row.size)", 5) + "   " + row.format.padding(toLength: 22, withPad: " ", startingAt: 0)
                + " " + row.version.padding(toLength: 8, withPad: " ", startingAt: 0) + WireFormat.pad("\(row.requests)", 11)
                + WireFormat.pad(WireFormat.perReading(row.bytes.up, row.readings), 15)
                + WireFormat.pad(WireFormat.perReading(row.bytes.down, row.readings), 17)
                + WireFormat.pad(WireFormat.perReading(row.bytes.total, row.readings), 18)
                + WireFormat.pad(WireFormat.perReading(withoutSetup, row.readings), 16)
                + WireFormat.pad("\(row.bytes.setupUp)+\(row.bytes.setupDown)", 22))
    }

    /// Runs `body` with a new client of the agent's kind (libcurl, one connection kept alive) through `proxy`, closes it,
    /// and returns the requests `body` made and the bytes the proxy counted for that connection, its closing included.
    func connection(
        _ proxy: ByteCountingProxy, _ body: @Sendable (HTTPClient) async throws -> (Int, HTTPVersion?)
    ) async throws -> (requests: Int, version: String, bytes: ByteCountingProxy.Totals) {
        let configuration = UploadConfiguration(endpoint: "https://127.0.0.1", deviceKey: "", caFile: caFile, useProxyEnvironment: false)
        let client = try HTTPClient(configuration: configuration.httpClientConfiguration, logger: logger)
        let before = proxy.totals()
        let requests: Int, version: HTTPVersion?
        do {
            (requests, version) = try await body(client)
        } catch {
            client.close()
            throw error
        }
        client.close()
        for _ in 0..<100 where proxy.connections().contains(where: { !$0.closed }) { try await Task.sleep(for: .milliseconds(20)) }
        return (requests, version?.rawValue ?? "-", proxy.totals() - before)
    }

    /// A 2xx answer whose receipt (JSON or compact) accounts for every reading as stored or duplicate.
    static func checkReceipt(_ response: HTTPResponse, readings: Int, url: String) throws {
        guard (200...299).contains(response.status) else {
            throw ValidationError("\(url) answered \(response.status): \(String(decoding: response.body.prefix(500), as: UTF8.self))")
        }
        let compact = response.header("Content-Type")?.hasPrefix(IngestProtocol.compactReceiptMediaType) ?? false
        let receipt = compact ? IngestReceipt(compact: response.body) : try? JSONDecoder().decode(IngestReceipt.self, from: Data(response.body))
        guard let receipt, receipt.accepted + receipt.duplicates == readings else {
            throw ValidationError("\(url) answered \(response.status) without a receipt for all \(readings) readings")
        }
    }

    /// Posts the batches as stateful frames through a ``WireSession``, as the agent does: the table declared in the first
    /// frame, then named by its hash; each frame predicted from the readings acknowledged before; compact receipts; a 409
    /// about the state answered by sending the same readings again. Returns the requests made.
    static func postStateful(_ batches: [Batch], table: SensorTable, client: HTTPClient, url: String, key: String) async throws -> (Int, HTTPVersion?) {
        // As the agent sends to an ingest that reads version 4: the key in Farmgate-Key, which HPACK indexes.
        let headers = [
            HTTPHeader(IngestProtocol.deviceKeyHeader, key), HTTPHeader("Content-Type", IngestProtocol.binaryBatchMediaType),
            HTTPHeader("Accept", "\(IngestProtocol.compactReceiptMediaType), application/json"),
        ]
        var session = WireSession()
        var requests = 0
        var version: HTTPVersion?
        for batch in batches {
            var refusals = 0
            while true {
                let frame = try session.encode(batch, table: table)
                let response = try await client.post(url, headers: headers, body: frame.bytes)
                requests += 1
                version = response.httpVersion
                if response.status == 409, refusals < 3, let refusal = try? JSONDecoder().decode(APIErrorBody.self, from: Data(response.body)),
                    session.refused(code: refusal.error.code, ingestContext: refusal.error.context)
                {
                    refusals += 1
                    continue
                }
                try checkReceipt(response, readings: batch.readings.count, url: url)
                session.delivered(frame, acknowledged: batch.readings)
                break
            }
        }
        return (requests, version)
    }
}
