import ArgumentParser
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `farmgate-bench postgres`: the ingest on PostgreSQL, four figures from one run on one machine.
///
/// (d) bytes on disk per reading: 1,000,000 readings of 60 sensors every 10 s stored through the store in 1000-reading
///     batches, then `VACUUM ANALYZE` and `sum(pg_total_relation_size)` over the `readings` partitions; beside it what
///     the three rollup levels of those readings take, after `VACUUM ANALYZE` of them too;
/// (a) readings/s stored by a real `farmgate-ingest serve` (this binary's sibling) with `--gateways` keep-alive
///     connections posting 1000-reading binary batches back to back;
/// (b) readings/s loaded by two `psql \copy ... (FORMAT binary)` clients with the rows (a) stored, into a table of the
///     same definition and indexes (the physical limit (a) is judged against);
/// (c) the ack latency (p50, p99) with `--gateways` connections posting at half of (a)'s rate, paced.
///
/// Starts its own throwaway cluster (initdb in a temporary directory, a Unix socket, fsync on: commits cost what they
/// cost in production), or uses `--url`. Prints, never asserts.
struct PostgresBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postgres",
        abstract: "The ingest on PostgreSQL: bytes per reading, readings/s over HTTP beside two binary COPY clients, p99 ack at half load."
    )

    /// What each run empties first (and (d) after itself): whatever an earlier run against `--url` left would change
    /// the figures.
    static let emptiedTables = "readings, stored_sequences, latest, rollups_1m, rollups_1h, rollups_1d"

    @Option(help: "An existing database to use (its readings, rollups and latest values are emptied); default: a throwaway cluster in a temporary directory.")
    var url: String?

    @Option(help: "Concurrent keep-alive gateways (devices) posting batches.")
    var gateways = 200

    @Option(help: "Seconds the throughput phase (a) lasts.")
    var seconds = 10

    @Option(help: "Seconds the latency phase (c) lasts.")
    var latencySeconds = 15

    @Option(help: "Readings stored for the size figure (d); 0 skips it.")
    var sizeReadings = 1_000_000

    @Option(help: "[storage] pool_size of the ingest.")
    var poolSize = 10

    @Option(help: "Readings per second of the latency phase (c); default: half of (a)'s rate.")
    var latencyRate: Double?

    @Flag(help: "Skip the COPY baselines (b).")
    var skipCopy = false

    @Option(name: .customLong("storage"), help: "One more [storage] key for the ingest, e.g. 'group_max_batches = 8' (repeatable).")
    var storageKeys: [String] = []

    func validate() throws {
        guard (1...2_000).contains(gateways) else { throw ValidationError("--gateways must be from 1 to 2000") }
        guard (1...600).contains(seconds), (1...600).contains(latencySeconds) else { throw ValidationError("--seconds and --latency-seconds must be from 1 to 600") }
        guard sizeReadings >= 0 else { throw ValidationError("--size-readings must not be negative") }
        guard (2...1_000).contains(poolSize) else { throw ValidationError("--pool-size must be from 2 to 1000") }
    }

    func run() async throws {
        let logger = Logger.bench
        let directory = NSTemporaryDirectory() + "farmgate-bench-pg-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        chmod(directory, 0o755)
        defer { try? FileManager.default.removeItem(atPath: directory) }

        let cluster: BenchCluster
        if let url { cluster = BenchCluster(url: url) } else { cluster = try await BenchCluster.start(in: directory + "/pg") }
        defer { cluster.stop() }
        print(Machine.describe())
        print("PostgreSQL: \(try cluster.psql(["-Atc", "SELECT version()"]).trimmingCharacters(in: .whitespacesAndNewlines))")
        print("  \(try cluster.psql(["-Atc", "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers', 'wal_level', 'max_wal_size', 'checkpoint_timeout')"]).trimmingCharacters(in: .whitespacesAndNewlines))")
        print("")

        let settings = try PostgresSettings(url: cluster.url)
        let store = try PostgresIngestStore(settings: settings, logger: logger)
        try await withRunning(store) { _ in
            try await store.migrate()
            try cluster.exec("TRUNCATE \(Self.emptiedTables)")
            let admin = IngestAdmin(store: store)
            if try await store.farm(named: "bench") == nil { _ = try await admin.createFarm(name: "bench") }

            // (d) Bytes per reading.
            if sizeReadings > 0 { try await size(store: store, admin: admin, cluster: cluster) }

            // (a) Throughput over HTTP.
            let now = Timestamp.now()
            // Enough batches for 1,500,000 readings/s, and at least six a second per gateway (a gateway that runs out
            // stops early, and the rate would be the supply's).
            let batchesPerGateway = max(seconds * 6, (seconds * 1_500 + gateways - 1) / gateways) + 2
            let site = try RealisticSite(tanks: 20, readingCount: batchesPerGateway * 1000, seed: 7)
            // Every batch must be acceptable: the readings end a minute before now (the ingest refuses the future).
            let shift = now.microseconds - 60_000_000 - (site.readings.last?.timestamp.microseconds ?? 0)
            _ = try await store.createPartitions(now: Timestamp(microseconds: (site.readings.first?.timestamp.microseconds ?? 0) + shift))
            let run = UUID().uuidString.prefix(6).lowercased()
            print("(a) \(gateways) gateways posting 1000-reading binary batches (60 sensors each) back to back, \(seconds) s, pool_size \(poolSize)\(storageKeys.isEmpty ? "" : ", " + storageKeys.joined(separator: ", "))")
            let throughputKeys = try await makeGateways("a\(run)", admin: admin, site: site, shift: shift, batches: batchesPerGateway)
            let stored = try await withIngest(cluster: cluster, directory: directory, logger: logger) { port in
                try await throughput(port: port, gateways: throughputKeys)
            }
            let storedReadings = Int(try cluster.psql(["-Atc", "SELECT coalesce(sum(cardinality(reading_values)), 0) FROM readings"]).trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
            print(String(format: "    %.0f readings/s (%d readings acknowledged in %.2f s; %d stored in the table, warm-up batches included)", stored.rate, stored.readings, stored.seconds, storedReadings))
            if stored.readings >= (batchesPerGateway - 1) * 1000 * gateways { print("    (every gateway ran out of batches: the rate is a lower bound)") }

            // (b) Two binary COPY clients, the same rows; and, for comparison with the issue's figure, the same readings
            // as one row per reading in the layout of migration 1.
            if !skipCopy { try copyBaselines(cluster: cluster, directory: directory, stored: stored, storedReadings: storedReadings) }

            // (c) p99 at half load.
            let half = latencyRate ?? stored.rate / 2
            print(String(format: "(c) %d gateways paced at %@: %.0f readings/s, %d s", gateways, latencyRate == nil ? "half of (a)" : "--latency-rate", half, latencySeconds))
            let latencyBatches = Int((half * Double(latencySeconds) / 1000 / Double(gateways)).rounded(.up)) + 2
            let latencySite = try RealisticSite(tanks: 20, readingCount: latencyBatches * 1000, seed: 8)
            let latencyShift = Timestamp.now().microseconds - 60_000_000 - (latencySite.readings.last?.timestamp.microseconds ?? 0)
            _ = try await store.createPartitions(now: Timestamp(microseconds: (latencySite.readings.first?.timestamp.microseconds ?? 0) + latencyShift))
            let latencyKeys = try await makeGateways("c\(run)", admin: admin, site: latencySite, shift: latencyShift, batches: latencyBatches)
            let checkpointsBefore = cluster.checkpoints()
            let disk = cluster.dataDirectory().flatMap { DiskStallSampler(directory: $0) }
            disk?.start()
            let latency = try await withIngest(cluster: cluster, directory: directory, logger: logger) { port in
                try await paced(port: port, gateways: latencyKeys, rate: half)
            }
            let stalls = disk?.stop() ?? []
            // A checkpoint inside (c) shows as one moment when every answer waits (see the README's deployment notes).
            if let before = checkpointsBefore, let after = cluster.checkpoints() { print("    checkpoints started during (c): \(after - before)") }
            print(
                String(
                    format: "    ack latency p50 %.1f ms, p99 %.1f ms, max %.1f ms over %d batches (%d not wholly accepted); goal p99 < 20 ms", latency.p50, latency.p99,
                    latency.max, latency.count, latency.failed))
            // When the slow answers came: at one moment (a stall of the server or the database) or spread out.
            let slowest = latency.slowest.map { String(format: "%.0f ms at +%.2f s", $0.milliseconds, $0.at) }
            print("    slowest: \(slowest.joined(separator: ", "))")
            // The disk's own stalls, to compare with those moments: writes queued and none completed.
            if let disk {
                let inside = stalls.filter { latency.startedAt.duration(to: $0.start) > .seconds(-1) }
                let listed = inside.sorted { $0.duration > $1.duration }.prefix(5).map {
                    String(format: "%.0f ms at +%.2f s", $0.duration / .milliseconds(1), latency.startedAt.duration(to: $0.start) / .seconds(1))
                }
                print("    disk \(disk.device): \(inside.count) stretch(es) of 50 ms or more with requests queued and none completed\(listed.isEmpty ? "" : ": " + listed.joined(separator: ", "))")
            } else {
                print("    disk: not sampled (the data directory's device has no statistics here)")
            }
        }
    }

    // MARK: (d)

    private func size(store: PostgresIngestStore, admin: IngestAdmin, cluster: BenchCluster) async throws {
        let site = try RealisticSite(tanks: 20, readingCount: sizeReadings, seed: 5)
        let end = Timestamp.now().microseconds - 3_600_000_000
        let shift = end - (site.readings.last?.timestamp.microseconds ?? 0)
        let first = (site.readings.first?.timestamp.microseconds ?? 0) + shift
        _ = try await store.createPartitions(now: Timestamp(microseconds: first))
        _ = try await store.createPartitions(now: Timestamp(microseconds: end))
        let name = try DeviceID("size-\(UUID().uuidString.prefix(6).lowercased())")
        _ = try await admin.createDevice(farm: "bench", device: name)
        guard let farm = try await store.farm(named: "bench"), let device = try await store.devices(farmID: farm.id).first(where: { $0.device == name }) else {
            throw ValidationError("the size device was not created")
        }
        let batches = site.batches(of: 1000).map { batch in
            Batch(device: name, sensors: batch.sensors, readings: batch.readings.map { reading in
                var shifted = reading
                shifted.timestamp = Timestamp(microseconds: reading.timestamp.microseconds + shift)
                return shifted
            })
        }
        let clock = ContinuousClock()
        let start = clock.now
        for batch in batches { _ = try await store.store(batch, for: device, receivedAt: .now()) }
        let elapsed = start.duration(to: clock.now).seconds
        try cluster.exec("VACUUM ANALYZE readings")
        // The rollups these batches made, after the vacuum that autovacuum would do: the dead row versions their
        // updates left are free room again.
        try cluster.exec("VACUUM ANALYZE rollups_1m, rollups_1h, rollups_1d")
        let rollupBytes = try cluster.psql([
            "-Atc", "SELECT pg_total_relation_size('rollups_1h') + pg_total_relation_size('rollups_1d') + sum(pg_total_relation_size(i.inhrelid)) FROM pg_inherits i WHERE i.inhparent = 'rollups_1m'::regclass",
        ]).trimmingCharacters(in: .whitespacesAndNewlines)
        let figures = try cluster.psql([
            "-Atc",
            """
            SELECT sum(pg_total_relation_size(c.oid)), sum(pg_relation_size(c.oid)), sum(pg_indexes_size(c.oid)),
                (SELECT sum(cardinality(reading_values)) FROM readings), (SELECT count(*) FROM readings)
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'readings'::regclass
            """,
        ]).trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "|").map { Double($0) ?? 0 }
        guard figures.count == 5, figures[3] > 0 else { throw ValidationError("cannot read the table sizes") }
        print(String(format: "(d) %d readings of 60 sensors every 10 s, stored through the store in 1000-reading batches (%.0f readings/s, one batch at a time)", Int(figures[3]), figures[3] / elapsed))
        print(
            String(
                format: "    %.1f bytes/reading on disk after VACUUM ANALYZE (heap %.1f, indexes %.1f, TOAST/FSM/VM %.1f); %d chunks, %.1f readings per chunk; goal ≤ 60",
                figures[0] / figures[3], figures[1] / figures[3], figures[2] / figures[3], (figures[0] - figures[1] - figures[2]) / figures[3], Int(figures[4]),
                figures[3] / figures[4]))
        print(String(format: "    rollups (1 minute, 1 hour, 1 day): %.1f bytes/reading more", (Double(rollupBytes) ?? .nan) / figures[3]))
        try cluster.exec("TRUNCATE \(Self.emptiedTables)")
    }

    // MARK: Gateways

    struct Gateway: Sendable {
        var key: String
        /// Each batch's HTTP request, ready to send.
        var requests: [[UInt8]]
        var readingsPerRequest: Int
    }

    /// Creates one device per gateway and encodes its batches (the site's readings, sequences from 1, shifted in time).
    private func makeGateways(_ prefix: String, admin: IngestAdmin, site: RealisticSite, shift: Int64, batches: Int) async throws -> [Gateway] {
        let shifted = site.readings.map { reading in
            var moved = reading
            moved.timestamp = Timestamp(microseconds: reading.timestamp.microseconds + shift)
            return moved
        }
        var made: [Gateway] = []
        for index in 0..<gateways {
            let device = try DeviceID("\(prefix)-\(index)")
            let key = try await admin.createDevice(farm: "bench", device: device)
            var requests: [[UInt8]] = []
            // The site may hold fewer readings than asked for (it leaves out one read in 200 as failed): stop where they end.
            for part in 0..<batches where part * 1000 < shifted.count {
                let slice = Array(shifted[(part * 1000)..<min(shifted.count, (part + 1) * 1000)])
                let body = try BatchCodec.encode(Batch(device: device, sensors: site.sensors, readings: slice), compressionLevel: 3)
                requests.append(
                    Array(
                        "POST \(IngestProtocol.batchesPath) HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(key.text)\r\nContent-Type: \(IngestProtocol.binaryBatchMediaType)\r\nContent-Length: \(body.count)\r\n\r\n"
                            .utf8) + body)
            }
            made.append(Gateway(key: key.text, requests: requests, readingsPerRequest: 1000))
        }
        return made
    }

    struct Throughput {
        var readings: Int
        var seconds: Double
        var rate: Double { seconds > 0 ? Double(readings) / seconds : 0 }
    }

    /// Every gateway posts its first batch (warm-up: connections, sensor registration), then all post back to back
    /// for `seconds`; the rate counts batches answered 200 between the start and the last answer.
    private func throughput(port: Int, gateways: [Gateway]) async throws -> Throughput {
        let deadline = Duration.seconds(seconds)
        let start = ContinuousClock.now + .milliseconds(500)
        let results = try await withThrowingTaskGroup(of: (Int, ContinuousClock.Instant).self) { group in
            for gateway in gateways {
                group.addTask {
                    try await runOffPool(name: "bench-gateway") { () -> (Int, ContinuousClock.Instant) in
                        var connection = try BenchConnection(port: port)
                        guard connection.request(gateway.requests[0]) == 200 else { throw ValidationError("the warm-up batch was refused") }
                        let wait = ContinuousClock.now.duration(to: start)
                        if wait > .zero { usleep(UInt32(wait / .microseconds(1))) }
                        var readings = 0
                        var last = start
                        for request in gateway.requests.dropFirst() {
                            guard start.duration(to: .now) < deadline else { break }
                            if let status = connection.request(request) {
                                if status == 200 {
                                    readings += Self.accepted(connection.lastBody)
                                    last = .now
                                }
                            } else {
                                connection = try BenchConnection(port: port)
                            }
                        }
                        return (readings, last)
                    }
                }
            }
            var all: [(Int, ContinuousClock.Instant)] = []
            for try await result in group { all.append(result) }
            return all
        }
        let readings = results.reduce(0) { $0 + $1.0 }
        let end = results.map(\.1).max() ?? start
        return Throughput(readings: readings, seconds: start.duration(to: end).seconds)
    }

    /// `accepted` of an ``IngestReceipt`` body, read without a JSON decoder (the load generator shares the CPU).
    static func accepted(_ body: ArraySlice<UInt8>) -> Int {
        let key = Array(#""accepted":"#.utf8)
        guard let range = body.firstRange(of: key) else { return 0 }
        var value = 0
        for byte in body[range.upperBound...] {
            guard (48...57).contains(byte) else { break }
            value = value * 10 + Int(byte - 48)
        }
        return value
    }

    struct Latency {
        var p50: Double
        var p99: Double
        var max: Double
        var count: Int
        var failed: Int
        /// The ten slowest answers: milliseconds, and seconds since pacing started when the batch was sent.
        var slowest: [(milliseconds: Double, at: Double)] = []
        /// When pacing started.
        var startedAt: ContinuousClock.Instant = .now
    }

    /// Every gateway posts at `rate / gateways` readings per second (open loop, phases spread evenly) for `latencySeconds`.
    private func paced(port: Int, gateways: [Gateway], rate: Double) async throws -> Latency {
        let perGateway = rate / Double(gateways.count) / 1000
        guard perGateway > 0 else { return Latency(p50: 0, p99: 0, max: 0, count: 0, failed: 0) }
        let period = Duration.seconds(1 / perGateway)
        let duration = Duration.seconds(latencySeconds)
        // Pacing starts 200 ms after the last gateway's warm-up batch was answered: the warm-up of fresh devices (their
        // sensors registered, 1000 readings each, all at once) is a backlog that paced requests must not queue behind.
        let barrier = WarmupBarrier(count: gateways.count)
        let count = gateways.count
        let results = try await withThrowingTaskGroup(of: ([(milliseconds: Double, at: Double)], Int).self) { group in
            for (index, gateway) in gateways.enumerated() {
                group.addTask {
                    try await runOffPool(name: "bench-paced") { () -> ([(milliseconds: Double, at: Double)], Int) in
                        var connection = try BenchConnection(port: port)
                        guard connection.request(gateway.requests[0]) == 200 else {
                            barrier.arrive()
                            throw ValidationError("the warm-up batch was refused")
                        }
                        let start = barrier.arriveAndWait()
                        var latencies: [(milliseconds: Double, at: Double)] = []
                        var failed = 0
                        let phase = period * (Double(index) / Double(count))
                        for (step, request) in gateway.requests.dropFirst().enumerated() {
                            let due = start + phase + period * step
                            guard start.duration(to: due) < duration else { break }
                            let wait = ContinuousClock.now.duration(to: due)
                            if wait > .zero { usleep(UInt32(wait / .microseconds(1))) }
                            let sent = ContinuousClock.now
                            let status = connection.request(request)
                            latencies.append((sent.duration(to: .now) / .milliseconds(1), start.duration(to: sent) / .seconds(1)))
                            if status != 200 || Self.accepted(connection.lastBody) != gateway.readingsPerRequest { failed += 1 }
                            if status == nil { connection = try BenchConnection(port: port) }
                        }
                        return (latencies, failed)
                    }
                }
            }
            var latencies: [(milliseconds: Double, at: Double)] = []
            var failed = 0
            for try await (some, failures) in group {
                latencies += some
                failed += failures
            }
            return (latencies.sorted { $0.milliseconds < $1.milliseconds }, failed)
        }
        let sorted = results.0.map(\.milliseconds)
        func percentile(_ p: Double) -> Double {
            guard !sorted.isEmpty else { return 0 }
            return sorted[min(sorted.count - 1, Int((Double(sorted.count - 1) * p).rounded()))]
        }
        return Latency(
            p50: percentile(0.5), p99: percentile(0.99), max: sorted.last ?? 0, count: sorted.count, failed: results.1,
            slowest: results.0.suffix(10).reversed(), startedAt: barrier.started ?? .now)
    }

    // MARK: (b)

    struct CopyFigure {
        var rows: Int
        var readings: Int
        var seconds: Double
        var rate: Double { seconds > 0 ? Double(readings) / seconds : 0 }
    }

    /// (b): the rows (a) stored, loaded by two binary COPY clients; (b'): the same readings one row each.
    private func copyBaselines(cluster: BenchCluster, directory: String, stored: Throughput, storedReadings: Int) throws {
        var copy = try copyBaseline(
            cluster: cluster, directory: directory, target: "readings_copy",
            definition: "LIKE readings INCLUDING DEFAULTS INCLUDING CONSTRAINTS", key: "first_ts", select: "SELECT * FROM readings",
            indexes: ["(device_id, first_sequence)", "(sensor_id, first_ts)"])
        copy.readings = storedReadings
        print(String(format: "(b) two psql \\copy (FORMAT binary) clients, the same %d chunk rows (%d readings) into a table of the same definition and indexes", copy.rows, copy.readings))
        print(String(format: "    %.0f readings/s (%.0f rows/s, %.2f s)", copy.rate, Double(copy.rows) / max(copy.seconds, 1e-9), copy.seconds))
        if copy.rate > 0 { print(String(format: "    (a)/(b) = %.1f %% (goal ≥ 70 %%)", 100 * stored.rate / copy.rate)) }
        var flat = try copyBaseline(
            cluster: cluster, directory: directory, target: "readings_flat_copy",
            definition: "timestamp_us bigint NOT NULL, sequence bigint NOT NULL, value double precision NOT NULL, device_id integer NOT NULL, sensor_id integer NOT NULL, flags smallint NOT NULL",
            key: "timestamp_us", select: "SELECT timestamp_us, sequence, value, device_id, sensor_id, flags FROM reading_rows",
            indexes: ["(device_id, sequence)", "USING brin (timestamp_us)"])
        flat.readings = flat.rows
        print(String(format: "(b') the same readings one row each (migration 1's layout and indexes), two psql \\copy (FORMAT binary) clients: %.0f rows/s (%.2f s)", flat.rate, flat.seconds))
        if flat.rate > 0 { print(String(format: "    (a)/(b') = %.0f %%", 100 * stored.rate / flat.rate)) }
    }

    /// Dumps what (a) stored into two binary files (`select`, split by sensor), creates `target` partitioned like
    /// `readings` (the same day partitions, `definition`'s columns and `indexes`), and loads the files with two
    /// concurrent `psql \copy` clients.
    private func copyBaseline(cluster: BenchCluster, directory: String, target: String, definition: String, key: String, select: String, indexes: [String]) throws -> CopyFigure {
        let files = [directory + "/\(target)-0.bin", directory + "/\(target)-1.bin"]
        for (index, file) in files.enumerated() {
            _ = try cluster.psql(["-c", "\\copy (\(select) WHERE sensor_id % 2 = \(index)) TO '\(file)' WITH (FORMAT binary)"])
        }
        try cluster.exec(
            """
            DROP TABLE IF EXISTS \(target);
            CREATE TABLE \(target) (\(definition)) PARTITION BY RANGE (\(key));
            CREATE TABLE \(target)_default PARTITION OF \(target) DEFAULT;
            DO $$
            DECLARE part record;
            BEGIN
                FOR part IN SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                    WHERE i.inhparent = 'readings'::regclass AND c.relname <> 'readings_default'
                LOOP
                    EXECUTE format('CREATE TABLE %I PARTITION OF \(target) %s', '\(target)_' || part.relname, part.bound);
                END LOOP;
            END $$;
            \(indexes.map { "CREATE INDEX ON \(target) \($0);" }.joined(separator: "\n"))
            CHECKPOINT;
            """)
        let clock = ContinuousClock()
        let start = clock.now
        let processes = try files.map { file in try cluster.spawnPsql(["-c", "\\copy \(target) FROM '\(file)' WITH (FORMAT binary)"]) }
        for process in processes {
            process.waitUntilExit()
            guard process.terminationStatus == 0 else { throw ValidationError("psql \\copy failed (status \(process.terminationStatus))") }
        }
        let seconds = start.duration(to: clock.now).seconds
        let rows = Int(try cluster.psql(["-Atc", "SELECT count(*) FROM \(target)"]).trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        try cluster.exec("DROP TABLE \(target)")
        return CopyFigure(rows: rows, readings: 0, seconds: seconds)
    }

    // MARK: The ingest process

    /// Runs `farmgate-ingest serve` (the binary beside this one) on the cluster while `body` uses its port.
    private func withIngest<T: Sendable>(
        cluster: BenchCluster, directory: String, logger: Logger, _ body: @Sendable (Int) async throws -> T
    ) async throws -> T {
        let port = try LocalIngest.freePort()
        let config = directory + "/ingest-\(port).toml"
        try """
        [server]
        host = "127.0.0.1"
        port = \(port)

        [storage]
        url = "\(cluster.url)"
        pool_size = \(poolSize)
        \(storageKeys.joined(separator: "\n"))

        [limits]
        requests_per_second = 1000000
        burst = 1000000

        [log]
        level = "error"
        """.write(toFile: config, atomically: true, encoding: .utf8)
        let binary = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent().appendingPathComponent("farmgate-ingest").path
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw ValidationError("\(binary) is missing: build it beside farmgate-bench (swift build -c release --product farmgate-ingest)")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["serve", "-c", config]
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: directory + "/ingest.log", isDirectory: false).creatingIfNeeded())
        try process.run()
        defer {
            if process.isRunning {
                process.terminate()
                process.waitUntilExit()
            }
        }
        try await runOffPool(name: "bench-wait") { try BenchConnection.waitForListener(port: port) }
        return try await body(port)
    }
}

extension URL {
    /// Creates the file empty when it does not exist, for a `FileHandle(forWritingTo:)`.
    func creatingIfNeeded() -> URL {
        if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
        return self
    }
}

/// What the figures were measured on.
enum Machine {
    static func describe() -> String {
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let model = cpuinfo.split(separator: "\n").first { $0.hasPrefix("model name") }?.split(separator: ":", maxSplits: 1).last?.trimmingCharacters(in: .whitespaces)
        let memory = ((try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) ?? "").split(separator: "\n").first?.split(separator: " ").dropFirst().first
        let load = ((try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8)) ?? "").split(separator: " ").prefix(3).joined(separator: " ")
        let gib = (Double(memory.map(String.init) ?? "") ?? 0) / 1_048_576
        return String(
            format: "Machine: %@, %d cores, %.0f GiB RAM, load average %@ at start", model ?? "unknown CPU", ProcessInfo.processInfo.activeProcessorCount, gib, load)
    }
}

/// The PostgreSQL the benchmark uses: a throwaway cluster it started, or a URL it was given.
final class BenchCluster: Sendable {
    let url: String
    /// The cluster's data directory and the user it runs as, when the benchmark started it.
    private let owned: (bin: String, data: String, root: String, asUser: [String])?

    init(url: String) {
        self.url = url
        self.owned = nil
    }

    private init(url: String, bin: String, data: String, root: String, asUser: [String]) {
        self.url = url
        self.owned = (bin, data, root, asUser)
    }

    /// Starts a cluster as `.ci/with-postgres` does (initdb in `root`, a Unix socket there, run as `postgres` when this
    /// runs as root), with fsync on, room for 300 connections, the WAL sized so that no checkpoint falls in a run, and
    /// its WAL files already made (recycled), as on a server in service.
    static func start(in root: String) async throws -> BenchCluster {
        let candidates = ((try? FileManager.default.contentsOfDirectory(atPath: "/usr/lib/postgresql")) ?? []).sorted {
            $0.compare($1, options: .numeric) == .orderedAscending
        }
        guard let version = candidates.last, FileManager.default.isExecutableFile(atPath: "/usr/lib/postgresql/\(version)/bin/initdb") else {
            throw ValidationError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run .ci/install-deps, or pass --url")
        }
        let bin = "/usr/lib/postgresql/\(version)/bin"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        var asUser: [String] = []
        if getuid() == 0 {
            asUser = ["/usr/sbin/runuser", "-u", "postgres", "--"]
            guard run(["/usr/bin/chown", "postgres", root]) == 0 else { throw ValidationError("cannot give \(root) to the postgres user") }
        }
        let port = try LocalIngest.freePort()
        guard run(asUser + ["\(bin)/initdb", "-D", "\(root)/data", "-U", "farmgate", "-A", "trust", "-E", "UTF8"], log: "\(root)/initdb.log") == 0 else {
            throw ValidationError("initdb failed: see \(root)/initdb.log")
        }
        // The WAL sized as the README's deployment notes advise: with the default max_wal_size (1 GB) (a)'s load alone
        // (about 530 MB of WAL) starts a checkpoint, which then falls inside (c) with its writes and full-page images.
        let options =
            "-k \(root) -p \(port) -c listen_addresses='' -c max_connections=300 -c shared_buffers=256MB -c max_wal_size=4GB -c min_wal_size=1GB -c checkpoint_timeout=15min"
        guard run(asUser + ["\(bin)/pg_ctl", "-D", "\(root)/data", "-l", "\(root)/server.log", "-w", "-t", "60", "-o", options, "start"], log: "\(root)/pg_ctl.log") == 0
        else { throw ValidationError("the server did not start: see \(root)/server.log") }
        let cluster = BenchCluster(url: "postgresql://farmgate@/postgres?host=\(root)&port=\(port)", bin: bin, data: "\(root)/data", root: root, asUser: asUser)
        try cluster.exec("CREATE DATABASE farmgate_bench")
        // A server that has run a while reuses its WAL files (renamed at each checkpoint, up to min_wal_size); a fresh
        // one creates each new 16 MB segment inside whichever commit needs it, zero-filling and syncing it while every
        // other commit waits (the sampled disk showed an 18 MB write every 0.9 s during (c), some taking 200 ms). So
        // 1.5 GB of segments are made and recycled first, as on a server in service.
        try cluster.exec(
            """
            CREATE TABLE wal_prewarm(x int);
            DO $$ BEGIN FOR i IN 1..96 LOOP INSERT INTO wal_prewarm VALUES (i); PERFORM pg_switch_wal(); END LOOP; END $$;
            DROP TABLE wal_prewarm;
            CHECKPOINT;
            """)
        return BenchCluster(url: "postgresql://farmgate@/farmgate_bench?host=\(root)&port=\(port)", bin: bin, data: "\(root)/data", root: root, asUser: asUser)
    }

    /// The server's data directory, when this machine can see it (a local cluster), else nil.
    func dataDirectory() -> String? {
        if let owned { return owned.data }
        guard let text = try? psql(["-Atc", "SHOW data_directory"]) else { return nil }
        let path = text.trimmingCharacters(in: .whitespacesAndNewlines)
        return FileManager.default.fileExists(atPath: path) ? path : nil
    }

    /// How many checkpoints the server has started (PostgreSQL 17 and later count them in pg_stat_checkpointer, 15 and
    /// 16 in pg_stat_bgwriter); nil when neither answers.
    func checkpoints() -> Int? {
        for query in ["SELECT num_timed + num_requested FROM pg_stat_checkpointer", "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"] {
            if let text = try? psql(["-Atc", query]), let count = Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) { return count }
        }
        return nil
    }

    /// Stops the cluster the benchmark started (nothing for a URL).
    func stop() {
        guard let owned else { return }
        _ = Self.run(owned.asUser + ["\(owned.bin)/pg_ctl", "-D", owned.data, "-m", "fast", "-w", "stop"])
    }

    private var psqlPath: String {
        if let owned { return owned.bin + "/psql" }
        return "/usr/bin/psql"
    }

    /// Runs psql with `arguments` on the database and returns its output; throws with its errors when it fails.
    func psql(_ arguments: [String]) throws -> String {
        let process = try spawnPsql(arguments, output: true)
        let output = (process.standardOutput as? Pipe)?.fileHandleForReading.readDataToEndOfFile() ?? Data()
        let errors = (process.standardError as? Pipe)?.fileHandleForReading.readDataToEndOfFile() ?? Data()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw ValidationError("psql \(arguments.joined(separator: " ")) failed: \(String(decoding: errors, as: UTF8.self))")
        }
        return String(decoding: output, as: UTF8.self)
    }

    func exec(_ sql: String) throws {
        _ = try psql(["-q", "-c", sql])
    }

    func spawnPsql(_ arguments: [String], output: Bool = false) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: psqlPath)
        process.arguments = ["-X", "-v", "ON_ERROR_STOP=1", "-d", url] + arguments
        process.standardOutput = output ? Pipe() : FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = Pipe()
        try process.run()
        return process
    }

    /// Runs a command to its end with posix_spawn and waitpid (a server that pg_ctl starts outlives it), its output
    /// appended to `log`; returns its exit status.
    @discardableResult
    static func run(_ command: [String], log: String = "/dev/null") -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let argv: [UnsafeMutablePointer<CChar>?] = command.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, command[0], &actions, nil, argv, environ) == 0 else { return -1 }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) == -1, errno == EINTR {}
        return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}

/// Lets paced gateways start together once every one has finished its warm-up: ``arriveAndWait()`` returns the common
/// start, 200 ms after the last arrival. Used from dedicated threads (it sleeps while it waits).
final class WarmupBarrier: Sendable {
    private let state: Mutex<(arrived: Int, start: ContinuousClock.Instant?)>
    private let count: Int

    init(count: Int) {
        self.count = count
        state = Mutex((0, nil))
    }

    /// Counts this gateway in without waiting (one that failed).
    func arrive() {
        state.withLock { state in
            state.arrived += 1
            if state.arrived >= count, state.start == nil { state.start = .now + .milliseconds(200) }
        }
    }

    /// When pacing started, once every gateway arrived.
    var started: ContinuousClock.Instant? { state.withLock { $0.start } }

    func arriveAndWait() -> ContinuousClock.Instant {
        arrive()
        let deadline = ContinuousClock.now + .seconds(120)
        while true {
            if let start = state.withLock({ $0.start }) { return start }
            if ContinuousClock.now > deadline { return .now }
            usleep(1_000)
        }
    }
}
