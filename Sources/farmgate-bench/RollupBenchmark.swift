import ArgumentParser
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import Prometheus
import ServiceLifecycle

/// `farmgate-bench rollups`: how long one day of one sensor at 1-minute resolution takes to read from a store whose
/// rollups stand for many readings (the issue's goal: under 20 ms with 10^8 readings stored). The rollup rows are
/// synthesised straight into the tables (storing 10^8 readings through the write path would take hours), laid out as
/// ingest lays them out: minute after minute, every sensor's row of a minute next to the others. Prints, never asserts.
struct RollupBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rollups",
        abstract: "Latency of one day of one sensor at 1-minute resolution from rollups standing for many readings.",
        discussion: """
            PostgreSQL: pass --database-url (or FARMGATE_BENCH_DATABASE_URL) naming an empty database it may fill; psql must be \
            installed (it synthesises the rows with generate_series). SQLite: a file in a temporary directory, removed afterwards.
            """)

    enum Kind: String, ExpressibleByArgument, CaseIterable {
        case sqlite, postgres
    }

    @Option(help: "The store: sqlite or postgres.")
    var store: Kind = .sqlite

    @Option(help: "The PostgreSQL database to fill (an empty one).")
    var databaseURL: String?

    @Option(help: "How many readings the rollups stand for.")
    var readings = 100_000_000

    @Option(help: "Sensors of the synthetic site.")
    var sensors = 60

    @Option(help: "Seconds between two readings of a sensor.")
    var interval = 10

    @Option(help: "Queries to time.")
    var queries = 300

    @Flag(help: "PostgreSQL: time the queries against what an earlier run (the same UTC day, the same options) left in the database, without filling it again.")
    var reuse = false

    func validate() throws {
        guard readings > 0, sensors > 0, queries > 0, (1...60).contains(interval), 60 % interval == 0 else {
            throw ValidationError("--readings, --sensors and --queries must be positive, --interval a divisor of 60")
        }
        if store == .postgres, (databaseURL ?? ProcessInfo.processInfo.environment["FARMGATE_BENCH_DATABASE_URL"]) == nil {
            throw ValidationError("--store postgres needs --database-url postgresql://... (or FARMGATE_BENCH_DATABASE_URL): an empty database it may fill")
        }
    }

    func run() async throws {
        let logger = Logger.bench
        let perMinute = 60 / interval
        let minutes = max(1, readings / (sensors * perMinute))
        let scratch = NSTemporaryDirectory() + "farmgate-bench-rollups-" + UUID().uuidString
        let url = databaseURL ?? ProcessInfo.processInfo.environment["FARMGATE_BENCH_DATABASE_URL"]
        var storage = IngestConfiguration.Storage(path: scratch + "/ingest.sqlite")
        if store == .postgres, let url { storage.postgres = try PostgresSettings(url: url) }
        defer { try? FileManager.default.removeItem(atPath: scratch) }
        let opened = try await openIngestStore(storage, logger: logger)
        let (kind, sqlitePath, sensors, queries, quiet) = (store, storage.path, sensors, queries, logger)
        let end = RollupLevel.day.bucket(of: Timestamp.now().microseconds)
        let start = end - Int64(minutes) * 60_000_000
        print(
            "\(kind.rawValue): rollups standing for \(minutes * sensors * perMinute) readings (\(sensors) sensors every \(interval) s, "
                + "\(minutes / 1440) days): \(minutes * sensors) 1-minute rows, \(minutes / 60 * sensors) hourly, \(minutes / 1440 * sensors) daily")
        try await withRunning(opened) { store in
            try await store.migrate()
            let clock = ContinuousClock()
            let rows: [Int64]
            if reuse, kind == .postgres, try await store.farm(named: "bench") != nil {
                rows = try await Self.sensorRows(store, count: sensors)
                print("reusing the rows of an earlier run")
            } else {
                rows = try await Self.registerSensors(store, count: sensors, at: Timestamp(microseconds: end - 1_000_000))
                let filled = try await clock.measure {
                    switch kind {
                    case .sqlite: try await Self.fillSQLite(path: sqlitePath, start: start, minutes: minutes, perMinute: perMinute)
                    case .postgres: try Self.fillPostgres(url: url ?? "", start: start, minutes: minutes, perMinute: perMinute)
                    }
                }
                print("synthesised in \(String(format: "%.1f", filled.seconds)) s")
            }
            if kind == .sqlite {
                // The file holds little but the rollups: its size over the 1-minute rows is their cost, all levels included.
                let bytes = ["", "-wal"].compactMap { try? FileManager.default.attributesOfItem(atPath: sqlitePath + $0)[.size] as? Int }.reduce(0, +)
                print(
                    String(
                        format: "SQLite file %.0f MB: %.1f bytes per 1-minute row (all levels), %.2f per reading", Double(bytes) / 1e6,
                        Double(bytes) / Double(minutes * sensors), Double(bytes) / Double(minutes * sensors * perMinute)))
            }
            // Warm-up, then the timed queries: a random sensor, a random whole day.
            var random = SplitMix64(seed: 7)
            let days = max(1, minutes / 1440)
            var durations: [Duration] = []
            var points = 0
            for index in 0..<(queries + 20) {
                let sensor = rows[Int(random.next() % UInt64(rows.count))]
                let day = start + Int64(random.next() % UInt64(days)) * 86_400_000_000
                let elapsed = try await clock.measure {
                    points = try await store.rollups(
                        sensorRowID: sensor, level: .minute, from: Timestamp(microseconds: day), to: Timestamp(microseconds: day + 86_400_000_000),
                        limit: 10_000
                    ).count
                }
                if index >= 20 { durations.append(elapsed) }
            }
            print(
                String(
                    format: "one day of one sensor at 1m (%d points), %d queries through the store: %@", points, queries, Self.summary(durations)))
            try await Self.timeHTTP(store: store, start: start, days: days, sensors: sensors, queries: queries, logger: quiet)
        }
    }

    /// p50, p99 and max of `durations`, in milliseconds.
    static func summary(_ durations: [Duration]) -> String {
        let sorted = durations.sorted()
        func percentile(_ p: Double) -> Double { sorted[min(sorted.count - 1, Int(Double(sorted.count - 1) * p))].seconds * 1000 }
        return String(format: "p50 %.2f ms, p99 %.2f ms, max %.2f ms", percentile(0.5), percentile(0.99), percentile(1))
    }

    /// The same question as the API asks it: `GET …/readings?resolution=1m` for a random sensor and whole day, one
    /// keep-alive connection to the ingest serving `store` on loopback, timed from the request's first byte to the
    /// answer's last (authentication, the query, the JSON body of 1,440 buckets and HTTP included).
    static func timeHTTP(store: any IngestStore, start: Int64, days: Int, sensors: Int, queries: Int, logger: Logger) async throws {
        let token = try await IngestAdmin(store: store).createReadToken(farm: "bench", role: .viewer).text
        let (configuration, port) = try LocalIngest.readerConfiguration()
        let app = buildApplication(configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: logger)
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: [app], logger: logger))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            do {
                let (durations, bytes) = try await runOffPool(name: "bench-range") {
                    try BenchConnection.waitForListener(port: port)
                    let connection = try BenchConnection(port: port)
                    var random = SplitMix64(seed: 11)
                    var durations: [Duration] = []
                    var bytes = 0
                    let clock = ContinuousClock()
                    for index in 0..<(queries + 20) {
                        let sensor = String(format: "s%04d.ph", Int(random.next() % UInt64(sensors)))
                        let from = start + Int64(random.next() % UInt64(days)) * 86_400_000_000
                        let range = "from=\(RFC3339.format(Timestamp(microseconds: from)))&to=\(RFC3339.format(Timestamp(microseconds: from + 86_400_000_000)))"
                        let request = Array(
                            "GET /v1/farms/bench/devices/bench/sensors/\(sensor)/readings?\(range)&resolution=1m&limit=10000 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(token)\r\n\r\n"
                                .utf8)
                        var status: Int?
                        let elapsed = clock.measure { status = connection.request(request) }
                        guard status == 200 else {
                            throw ValidationError("GET …/readings answered \(status.map(String.init) ?? "nothing"): \(String(decoding: connection.lastBody.prefix(300), as: UTF8.self))")
                        }
                        bytes = connection.lastBody.count
                        if index >= 20 { durations.append(elapsed) }
                    }
                    return (durations, bytes)
                }
                print("the same through HTTP (GET …/readings?resolution=1m, \(bytes) bytes of JSON), one keep-alive connection: \(summary(durations))")
                await group.triggerGracefulShutdown()
                try await tasks.waitForAll()
            } catch {
                tasks.cancelAll()
                throw error
            }
        }
    }

    /// Registers `count` pH sensors on device `bench` of farm `bench` (one reading each) and returns their row ids.
    static func registerSensors(_ store: any IngestStore, count: Int, at time: Timestamp) async throws -> [Int64] {
        let admin = IngestAdmin(store: store)
        _ = try await admin.createFarm(name: "bench")
        let deviceID = try DeviceID("bench")
        _ = try await admin.createDevice(farm: "bench", device: deviceID)
        guard let farm = try await store.farm(named: "bench"), let device = try await store.devices(farmID: farm.id).first else {
            throw ValidationError("the bench farm was not created")
        }
        let ids = try (0..<count).map { try SensorID(String(format: "s%04d.ph", $0)) }
        let batch = Batch(
            device: deviceID, sensors: ids.map { SensorDescriptor(id: $0, quantity: .ph) },
            readings: ids.enumerated().map { Reading(sensor: $1, sequence: UInt64($0 + 1), timestamp: time, value: 6.5) })
        _ = try await store.store(batch, for: device, receivedAt: time)
        return try await sensorRows(store, count: count)
    }

    /// The row ids of the `count` sensors ``registerSensors(_:count:at:)`` registered.
    static func sensorRows(_ store: any IngestStore, count: Int) async throws -> [Int64] {
        guard let farm = try await store.farm(named: "bench") else { throw ValidationError("the bench farm is missing") }
        let deviceID = try DeviceID("bench")
        let ids = try (0..<count).map { try SensorID(String(format: "s%04d.ph", $0)) }
        var rows: [Int64] = []
        for id in ids {
            guard let record = try await store.sensor(farmID: farm.id, device: deviceID, sensor: id) else { throw ValidationError("sensor \(id) missing") }
            rows.append(record.rowID)
        }
        return rows
    }

    /// The statement that fills one level from `series` (the bucket starts), minute-major like ingest writes them.
    static func fillSQL(table: String, series: String, perBucket: Int) -> String {
        """
        INSERT INTO \(table) (sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_sequence, last_value)
        SELECT s.id, b, \(perBucket), \(perBucket), \(perBucket) * 6.5, 6.4, 6.6, b + 1, 0, 6.5
        FROM \(series), sensors s WHERE true ORDER BY b, s.id
        ON CONFLICT (sensor_id, bucket_us) DO NOTHING
        """
    }

    static func fillSQLite(path: String, start: Int64, minutes: Int, perMinute: Int) async throws {
        try await runOffPool {
            let db = try SQLiteConnection(path: path, mode: .readWrite, busyTimeoutMilliseconds: 60_000)
            for level in RollupLevel.allCases {
                let count = Int64(minutes) * 60_000_000 / level.width
                let series = "(WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < \(count - 1)) SELECT \(start) + i * \(level.width) AS b FROM n)"
                try db.transaction { try db.execute(fillSQL(table: "rollups_" + level.rawValue, series: series, perBucket: perMinute * Int(level.width / 60_000_000))) }
            }
            try db.execute("ANALYZE")
        }
    }

    static func fillPostgres(url: String, start: Int64, minutes: Int, perMinute: Int) throws {
        // The monthly partitions of 1-minute rollups that ingest would have made over that time (migrate made only
        // last month's through two months ahead); without them the older months would fill the default partition.
        var statements = [
            "SELECT farmgate_create_rollup_partitions((timestamp 'epoch' + \(start / 1_000_000) * interval '1 second')::date, \(minutes / 43_200 + 2))"
        ]
        for level in RollupLevel.allCases {
            let count = Int64(minutes) * 60_000_000 / level.width
            let series = "generate_series(\(start)::int8, \(start + (count - 1) * level.width)::int8, \(level.width)::int8) AS b"
            statements.append(fillSQL(table: "rollups_" + level.rawValue, series: series, perBucket: perMinute * Int(level.width / 60_000_000)))
        }
        statements.append("VACUUM ANALYZE rollups_1m")
        for statement in statements {
            let process = Process()
            let psql = (try? FileManager.default.contentsOfDirectory(atPath: "/usr/lib/postgresql"))?.sorted().last.map { "/usr/lib/postgresql/\($0)/bin/psql" }
            process.executableURL = URL(fileURLWithPath: psql ?? "/usr/bin/psql")
            process.arguments = ["-X", "-q", "-o", "/dev/null", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", statement]
            try process.run()
            process.waitUntilExit()
            guard process.terminationStatus == 0 else { throw ValidationError("psql failed (status \(process.terminationStatus)) on: \(statement.prefix(120))") }
        }
    }
}
