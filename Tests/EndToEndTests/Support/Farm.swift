import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing

/// A real `farmgate-ingest` on an embedded SQLite file and the configuration for real `farmgate` agents, in one scratch dir.
final class Farm {
    let dir: Scratch
    let port: Int
    let ingestConfig: String
    var ingest: Child?
    var ingestStarts = 0

    static let ingestBinary = builtExecutable("farmgate-ingest")
    static let agentBinary = builtExecutable("farmgate")

    /// - Parameter databaseURL: a `postgresql://` URL to store in instead of the embedded SQLite file.
    init(name: String = "e2e", rateLimit: (perSecond: Int, burst: Int) = (1000, 1000), databaseURL: String? = nil) async throws {
        // Short base path: Unix socket paths must stay under 108 bytes.
        dir = try Scratch(prefix: "fg-e2e", in: URL(fileURLWithPath: "/tmp"))
        port = try freePort()
        ingestConfig = try dir.write(
            "ingest.toml",
            """
            [server]
            host = "127.0.0.1"
            port = \(port)

            [storage]
            \(databaseURL.map { "url = \"\($0)\"" } ?? "path = \"ingest/ingest.sqlite\"")

            [limits]
            requests_per_second = \(rateLimit.perSecond)
            burst = \(rateLimit.burst)
            future_tolerance = "10m"

            [log]
            level = "info"
            """)
        try await admin(["farm", "create", name])
    }

    var endpoint: String { "http://127.0.0.1:\(port)" }

    /// Runs an admin subcommand of farmgate-ingest; fails the test if it exits non-zero.
    @discardableResult
    func admin(_ arguments: [String]) async throws -> String {
        let result = try await runCommand(Farm.ingestBinary, arguments + ["--config", ingestConfig])
        #expect(result.status == 0, "farmgate-ingest \(arguments.joined(separator: " ")) failed: \(result.stderr)")
        return result.stdout
    }

    /// Creates a device and returns its key (printed once by the CLI).
    func createDevice(_ device: String, farm: String = "e2e") async throws -> String {
        let output = try await admin(["device", "create", "--farm", farm, "--device", device])
        let key = output.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\"" || $0 == "=" })
            .first { $0.hasPrefix("fgd_") }
        guard let key else {
            Issue.record("no fgd_ key in the output of device create: \(output)")
            throw CancellationError()
        }
        return String(key)
    }

    func startIngest() async throws {
        ingestStarts += 1
        let child = try Child(Farm.ingestBinary, ["serve", "--config", ingestConfig], logPath: dir.file("ingest-\(ingestStarts).log"))
        ingest = child
        let ready = await eventually(timeout: .seconds(20), every: .milliseconds(200)) { await self.httpStatus("/readyz") == 200 }
        #expect(ready, "ingest did not become ready: \(child.log)")
    }

    /// Another instance of the ingest on the same storage: the farm's configuration (as it is now) on `port`, its log
    /// in `ingest-NAME.log`. Returns once it answers `/readyz`.
    func startOtherInstance(port: Int, name: String = "b") async throws -> Child {
        let text = try String(contentsOfFile: ingestConfig, encoding: .utf8).replacingOccurrences(of: "port = \(self.port)", with: "port = \(port)")
        let config = try dir.write("ingest-\(name).toml", text)
        let child = try Child(Farm.ingestBinary, ["serve", "--config", config], logPath: dir.file("ingest-\(name).log"))
        let ready = await eventually(timeout: .seconds(20), every: .milliseconds(200)) { await Farm.httpStatus(url: "http://127.0.0.1:\(port)/readyz") == 200 }
        #expect(ready, "the ingest on port \(port) did not become ready: \(child.log)")
        return child
    }

    /// GET `path` on the ingest; nil when it does not answer.
    func httpStatus(_ path: String, bearer: String? = nil) async -> Int? {
        await Farm.httpStatus(url: endpoint + path, bearer: bearer)
    }

    /// GET `url`; nil when nothing answers.
    static func httpStatus(url text: String, bearer: String? = nil) async -> Int? {
        guard let url = URL(string: text) else { return nil }
        var request = URLRequest(url: url)
        request.timeoutInterval = 2
        if let bearer { request.setValue("Bearer \(bearer)", forHTTPHeaderField: "Authorization") }
        guard let (_, response) = try? await URLSession.shared.data(for: request) else { return nil }
        return (response as? HTTPURLResponse)?.statusCode
    }

    /// POSTs `body` as a batch with `key`; returns the status and the body.
    func post(_ body: Data, key: String, contentType: String) async throws -> (Int, Data) {
        guard let url = URL(string: endpoint + IngestProtocol.batchesPath) else { throw URLError(.badURL) }
        var request = URLRequest(url: url)
        request.httpMethod = "POST"
        request.setValue("Bearer \(key)", forHTTPHeaderField: "Authorization")
        request.setValue(contentType, forHTTPHeaderField: "Content-Type")
        request.httpBody = body
        request.timeoutInterval = 10
        let (data, response) = try await URLSession.shared.data(for: request)
        return ((response as? HTTPURLResponse)?.statusCode ?? 0, data)
    }

    /// Every stored sequence number of `device`, from the real `export` command.
    func storedSequences(device: String, farm: String = "e2e") async throws -> [UInt64] {
        let output = try await admin(["export", "--farm", farm, "--format", "jsonl"])
        var sequences: [UInt64] = []
        for line in output.split(separator: "\n") where !line.isEmpty {
            guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                object["device"] as? String == device
            else { continue }
            if let number = object["sequence"] as? NSNumber { sequences.append(number.uint64Value) }
        }
        return sequences
    }

    /// The statistics of `device`'s buffer (the agent stopped), after checking the delivery contract against the ingest:
    /// nothing quarantined or pending, and every sequence the agent assigned stored exactly once.
    @discardableResult
    func expectDeliveredExactlyOnce(device: String, sourceLocation: SourceLocation = #_sourceLocation) async throws -> BufferStatistics {
        let path = dir.file("\(device)/buffer.sqlite")
        let buffer = try await runOffPool { try ReadingBuffer(configuration: BufferConfiguration(path: path), logger: Logger(label: "test")) }
        let statistics = try await buffer.statistics()
        try await buffer.close()
        #expect(statistics.quarantined == 0, sourceLocation: sourceLocation)
        #expect(statistics.pending == 0, "the final flush sent the rest", sourceLocation: sourceLocation)
        let stored = try await storedSequences(device: device)
        #expect(Set(stored).count == stored.count, "duplicates stored", sourceLocation: sourceLocation)
        #expect(stored.sorted() == Array(1...max(statistics.lastSequence, 1)), sourceLocation: sourceLocation)
        return statistics
    }

    /// What the ingest holds for `device`, by sequence: `sensor timestamp value flags` from the real export command.
    func storedReadings(device: String, farm: String = "e2e") async throws -> [UInt64: String] {
        let output = try await admin(["export", "--farm", farm, "--format", "jsonl"])
        var readings: [UInt64: String] = [:]
        for line in output.split(separator: "\n") where !line.isEmpty {
            guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                object["device"] as? String == device, let number = object["sequence"] as? NSNumber
            else { continue }
            let fields = ["sensor", "timestamp", "value", "flags", "quality"].map { object[$0].map { "\($0)" } ?? "-" }
            readings[number.uint64Value] = fields.joined(separator: " ")
        }
        return readings
    }

    /// The value of one sample on the ingest's `/metrics` (`name{labels}` exactly as rendered); nil when absent.
    func ingestMetric(_ sample: String) async throws -> Double? {
        guard let url = URL(string: endpoint + "/metrics") else { return nil }
        let (data, _) = try await URLSession.shared.data(from: url)
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") where line.hasPrefix(sample + " ") {
            return Double(line.dropFirst(sample.count + 1).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }

    /// The newest timestamp the ingest holds for `device`, through the real export command.
    func latestTimestamp(device: String, farm: String = "e2e") async throws -> Timestamp? {
        let output = try await admin(["export", "--farm", farm, "--format", "jsonl"])
        var latest: Timestamp?
        for line in output.split(separator: "\n") where !line.isEmpty {
            guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                object["device"] as? String == device, let text = object["timestamp"] as? String, let time = RFC3339.parse(text)
            else { continue }
            if latest.map({ time > $0 }) ?? true { latest = time }
        }
        return latest
    }

    /// Writes an agent configuration with `sensors` simulated sensors read every `interval`.
    func agentConfig(
        _ name: String, device: String, keyFile: String, sensors: Int, interval: String, upload: String = "",
        endpoint: String? = nil, batchMaxReadings: Int = 50
    ) throws -> String {
        var text = """
            [device]
            id = "\(device)"

            [buffer]
            path = "\(device)/buffer.sqlite"
            commit_interval = "100ms"

            [upload]
            endpoint = "\(endpoint ?? self.endpoint)"
            key_file = "\(keyFile)"
            batch_max_readings = \(batchMaxReadings)
            batch_max_age = "200ms"
            backoff_initial = "100ms"
            backoff_max = "1s"
            connect_timeout = "1s"
            request_timeout = "3s"
            \(upload)

            [control]
            socket = "\(device)/control.sock"

            [clock]
            check = false

            """
        let quantities = ["ph", "ec", "temperature"]
        for index in 0..<sensors {
            text += """

                [[sensor]]
                id = "tank\(index / 3 + 1).\(quantities[index % 3])"
                driver = "simulated"
                quantity = "\(quantities[index % 3])"
                interval = "\(interval)"
                fault_rate = 0
                latency = "0ms"

                """
        }
        return try dir.write(name, text)
    }

    func startAgent(config: String, log: String) throws -> Child {
        try Child(Farm.agentBinary, ["agent", "--config", config], logPath: dir.file(log))
    }

    /// The agent's status through the real `farmgate status --json`; nil while it cannot be reached.
    func agentStatus(config: String) async throws -> AgentStatus? {
        let result = try await runCommand(Farm.agentBinary, ["status", "--json", "--config", config])
        guard result.status == 0 else { return nil }
        return try JSONDecoder().decode(AgentStatus.self, from: Data(result.stdout.utf8))
    }
}
