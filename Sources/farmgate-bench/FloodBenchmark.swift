import ArgumentParser
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import Prometheus
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// `farmgate-bench flood`: the read API's latency (`GET /v1/farms/{farm}/latest`, p50/p99) alone, and while a flood of
/// bad-key requests hits the same ingest on loopback, with the ingest's defenses as configured and with them off (every
/// unknown key looked up in the store: what the ingest did before the per-address limit and the negative cache).
///
/// Bounded by construction: loopback only (127.0.0.1), at most `--flood-rate × --seconds` flood requests per phase,
/// each phase `--seconds` long. Prints, never asserts.
struct FloodBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flood",
        abstract: "Read-API p99 latency alone and under a flood of bad-key requests on loopback."
    )

    @Option(help: "Seconds each phase lasts.")
    var seconds = 10

    @Option(help: "Read requests per second (one keep-alive connection, paced).")
    var readRate = 200

    @Option(help: "Bad-key requests per second in the flood (half uploads with unknown device keys, half reads with unknown read tokens).")
    var floodRate = 2_000

    @Option(help: "Connections the flood is spread over.")
    var floodConnections = 4

    @Option(help: "Tanks on the simulated farm; each has a pH, an EC and a temperature sensor (the size of the latest answer).")
    var tanks = 20

    func validate() throws {
        guard (1...600).contains(seconds) else { throw ValidationError("--seconds must be from 1 to 600") }
        guard (1...10_000).contains(readRate) else { throw ValidationError("--read-rate must be from 1 to 10000") }
        guard (1...20_000).contains(floodRate) else { throw ValidationError("--flood-rate must be from 1 to 20000 (the flood is bounded)") }
        guard (1...64).contains(floodConnections) else { throw ValidationError("--flood-connections must be from 1 to 64") }
        guard tanks > 0 else { throw ValidationError("--tanks must be positive") }
    }

    func run() async throws {
        let logger = Logger.bench
        let directory = NSTemporaryDirectory() + "farmgate-bench-flood-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }

        let site = try RealisticSite(tanks: tanks, readingCount: tanks * 3 * 10, seed: 42)
        let (store, deviceKey) = try await LocalIngest.openStore(directory: directory, device: site.device, logger: logger)
        defer { store.close() }
        guard let credential = try await store.deviceCredential(keyID: deviceKey.keyID) else {
            throw ValidationError("the bench device was not created")
        }
        for batch in site.batches(of: 1000) { _ = try await store.store(batch, for: credential.identity, receivedAt: Timestamp.now()) }
        let token = try await IngestAdmin(store: store).createReadToken(farm: "bench", role: .viewer)
        let now = site.batches(of: 1000).last?.readings.last?.timestamp ?? Timestamp.now()

        print("GET /v1/farms/bench/latest (\(tanks * 3) sensors) at \(readRate)/s for \(seconds) s per phase; flood: \(floodRate) bad-key requests/s over \(floodConnections) connections, loopback")
        print("")
        var defended = IngestConfiguration()
        // The benchmark's own reads must not be limited: they measure latency, not the read limit.
        defended.limits.readRequestsPerSecond = 1_000_000
        defended.limits.readBurst = 1_000_000
        var undefended = defended
        undefended.limits.authFailureBurst = 1_000_000
        undefended.limits.authFailuresPerSecond = 1_000_000
        undefended.limits.unknownKeyCacheTTL = .zero

        let alone = try await phase(defended, store: store, token: token.text, flood: false, now: now, logger: logger)
        report("reads alone", alone)
        let flooded = try await phase(defended, store: store, token: token.text, flood: true, now: now, logger: logger)
        report("reads + flood, default limits", flooded)
        let open = try await phase(undefended, store: store, token: token.text, flood: true, now: now, logger: logger)
        report("reads + flood, per-address limit and negative cache off", open)
        if alone.p99 > 0 {
            print(String(format: "p99 under flood / alone: %.2f× with the default limits, %.2f× with them off", flooded.p99 / alone.p99, open.p99 / alone.p99))
        }
    }

    struct Result {
        var latencies: [Double]
        var readErrors: Int
        var flood: [Int: Int]
        var floodSent: Int
        var p50: Double { percentile(0.5) }
        var p99: Double { percentile(0.99) }
        func percentile(_ p: Double) -> Double {
            let sorted = latencies.sorted()
            guard !sorted.isEmpty else { return 0 }
            return sorted[min(sorted.count - 1, Int((Double(sorted.count - 1) * p).rounded()))]
        }
    }

    private func report(_ title: String, _ result: Result) {
        print(title)
        print(
            String(
                format: "  read latency: p50 %.2f ms, p99 %.2f ms, max %.2f ms over %d reads (%d failed)", result.p50, result.p99,
                result.percentile(1), result.latencies.count, result.readErrors))
        if result.floodSent > 0 {
            let answers = result.flood.sorted { $0.key < $1.key }.map { "\($0.value) × \($0.key)" }.joined(separator: ", ")
            print(String(format: "  flood: %d requests (%.0f/s): %@", result.floodSent, Double(result.floodSent) / Double(seconds), answers))
        }
    }

    /// Runs an ingest with `configuration` on a free loopback port, measures reads (with the flood if asked), stops it.
    private func phase(
        _ base: IngestConfiguration, store: SQLiteIngestStore, token: String, flood: Bool, now: Timestamp, logger: Logger
    ) async throws -> Result {
        var configuration = base
        let port = try LocalIngest.freePort()
        configuration.server.host = "127.0.0.1"
        configuration.server.port = port
        let app = buildApplication(configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: logger, now: { now })
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: [app], logger: logger))
        let (seconds, readRate, floodRate, floodConnections) = (self.seconds, self.readRate, self.floodRate, self.floodConnections)
        return try await withThrowingTaskGroup(of: Result?.self) { tasks in
            tasks.addTask {
                try await group.run()
                return nil
            }
            do {
                try await runOffPool(name: "bench-wait") { try BenchConnection.waitForListener(port: port) }
                // Warm up: the first requests pay for connection set-up and caches.
                _ = try await runOffPool(name: "bench-warmup") {
                    let connection = try BenchConnection(port: port)
                    for _ in 0..<50 { _ = connection.request(BenchConnection.read(token: token)) }
                }
                let duration = Duration.seconds(seconds)
                async let reads = runOffPool(name: "bench-reads") { () -> ([Double], Int) in
                    try Self.paced(port: port, rate: readRate, duration: duration) { _ in BenchConnection.read(token: token) }
                }
                var floodWorkers: [Task<([Double], [Int: Int]), any Error>] = []
                if flood {
                    let perConnection = max(1, floodRate / floodConnections)
                    for worker in 0..<floodConnections {
                        floodWorkers.append(
                            Task {
                                try await runOffPool(name: "bench-flood-\(worker)") { () -> ([Double], [Int: Int]) in
                                    var statuses: [Int: Int] = [:]
                                    var generator = SystemRandomNumberGenerator()
                                    let (latencies, _) = try Self.paced(port: port, rate: perConnection, duration: duration) { index in
                                        index % 2 == 0
                                            ? BenchConnection.upload(key: APIKey.generate(kind: .device, using: &generator).text)
                                            : BenchConnection.read(token: APIKey.generate(kind: .readToken, using: &generator).text)
                                    } onStatus: { status in statuses[status, default: 0] += 1 }
                                    return (latencies, statuses)
                                }
                            })
                    }
                }
                let (latencies, errors) = try await reads
                var statuses: [Int: Int] = [:]
                var sent = 0
                for worker in floodWorkers {
                    let (floodLatencies, workerStatuses) = try await worker.value
                    sent += floodLatencies.count
                    statuses.merge(workerStatuses, uniquingKeysWith: +)
                }
                await group.triggerGracefulShutdown()
                while try await tasks.next() != nil {}
                return Result(latencies: latencies, readErrors: errors, flood: statuses, floodSent: sent)
            } catch {
                tasks.cancelAll()
                throw error
            }
        }
    }

    /// Sends `request(i)` at `rate` per second for `duration` on one keep-alive connection (reconnecting when the ingest
    /// closes it); returns each request's latency in milliseconds and how many got no 2xx/4xx answer.
    private static func paced(
        port: Int, rate: Int, duration: Duration, _ request: (Int) -> [UInt8], onStatus: (Int) -> Void = { _ in }
    ) throws -> ([Double], Int) {
        var connection = try BenchConnection(port: port)
        let period = Duration.seconds(1) / rate
        let start = ContinuousClock.now
        var latencies: [Double] = []
        latencies.reserveCapacity(rate * Int(duration / .seconds(1)) + 1)
        var failures = 0
        var index = 0
        while true {
            let due = start + period * index
            guard start.duration(to: due) < duration else { break }
            let wait = ContinuousClock.now.duration(to: due)
            if wait > .zero { usleep(UInt32(wait / .microseconds(1))) }
            let bytes = request(index)
            let sent = ContinuousClock.now
            let status = connection.request(bytes)
            latencies.append(sent.duration(to: .now) / .milliseconds(1))
            if let status {
                onStatus(status)
                if status >= 500 { failures += 1 }
            } else {
                failures += 1
                connection = try BenchConnection(port: port)
            }
            index += 1
        }
        return (latencies, failures)
    }
}

/// A blocking HTTP/1.1 keep-alive connection to 127.0.0.1 for the flood benchmark (runs on its own thread).
final class BenchConnection {
    let fd: Int32
    var pending: [UInt8] = []
    /// The body of the last response ``request(_:)`` read.
    private(set) var lastBody: ArraySlice<UInt8> = []

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ValidationError("cannot create a socket") }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard connected else {
            close(fd)
            throw ValidationError("cannot connect to 127.0.0.1:\(port)")
        }
    }

    deinit { close(fd) }

    static func waitForListener(port: Int) throws {
        for _ in 0..<400 {
            if (try? BenchConnection(port: port)) != nil { return }
            usleep(25_000)
        }
        throw ValidationError("the ingest did not start on port \(port)")
    }

    static func read(token: String) -> [UInt8] {
        Array("GET /v1/farms/bench/latest HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(token)\r\n\r\n".utf8)
    }

    static let emptyBatch = Array(#"{"device":"bench","sensors":[],"readings":[]}"#.utf8)

    static func upload(key: String) -> [UInt8] {
        Array(
            "POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\nContent-Length: \(emptyBatch.count)\r\n\r\n"
                .utf8) + emptyBatch
    }

    /// Sends `bytes` and reads one response; returns its status, or nil when the connection failed or was closed.
    func request(_ bytes: [UInt8]) -> Int? {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if sent <= 0 { return nil }
            offset += sent
        }
        var buffer = [UInt8](repeating: 0, count: 65_536)
        let separator = Array("\r\n\r\n".utf8)
        while true {
            if let end = pending.firstRange(of: separator) {
                let head = String(decoding: pending[..<end.lowerBound], as: UTF8.self)
                var length = 0
                for line in head.split(separator: "\r\n") {
                    let parts = line.split(separator: ":", maxSplits: 1)
                    if parts.count == 2, parts[0].lowercased() == "content-length" { length = Int(parts[1].trimmingCharacters(in: .whitespaces)) ?? 0 }
                }
                if pending.count - end.upperBound >= length {
                    let status = head.split(separator: " ").dropFirst().first.flatMap { Int($0) }
                    lastBody = pending[end.upperBound..<(end.upperBound + length)]
                    pending.removeFirst(end.upperBound + length)
                    return status
                }
            }
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { return nil }
            pending += buffer[0..<count]
        }
    }
}
