import ArgumentParser
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import ServiceLifecycle

/// `farmgate-bench alerts`: the ingest's write throughput on SQLite with N active alert rules against none. The alert
/// engine runs as in `serve`: fed by every commit, evaluating on its own task beside the writes. Prints the store's
/// readings per second while the engine runs, and how long the engine needed after the last commit to finish its queue.
struct AlertBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "alerts", abstract: "Ingest write throughput on SQLite with 1,000 active alert rules against none.")

    @Option(help: "Batches to store per run.") var batches = 300
    @Option(help: "Readings per batch.") var readings = 1000
    @Option(help: "Tanks on the simulated site; each has a pH, an EC and a temperature sensor.") var tanks = 20
    @Option(help: "Active rules in the measured run.") var rules = 1000
    @Option(help: "Rounds, each one run without rules and one with; the medians are compared.") var rounds = 7
    @Option(help: "Seed of the generator.") var seed: UInt64 = 42

    func validate() throws {
        guard batches > 0, readings > 0, tanks > 0, rules >= 0, rounds > 0 else { throw ValidationError("every count must be positive") }
    }

    func run() async throws {
        let logger = Logger.bench
        let site = try RealisticSite(tanks: tanks, readingCount: batches * readings, seed: seed)
        let batchList = site.batches(of: readings)
        let total = batchList.reduce(0) { $0 + $1.readings.count }
        let end = batchList.flatMap(\.readings).map(\.timestamp).max() ?? .now()
        print("\(batchList.count) batches of \(readings) readings from \(tanks * 3) sensors, SQLite (WAL, synchronous=FULL) in \(NSTemporaryDirectory()), \(rounds) rounds")
        var results: [Int: [(rate: Double, drain: Double, transitions: Int)]] = [:]
        for round in 0..<rounds {
            // The order alternates: a run's files are still being written back while the next one runs, which would
            // always slow the same side.
            var pair: [Int: Double] = [:]
            for count in round % 2 == 0 ? [0, rules] : [rules, 0] {
                let result = try await measure(rules: count, batchList: batchList, total: total, device: site.device, end: end, logger: logger)
                results[count, default: []].append(result)
                pair[count] = result.rate
            }
            if let none = pair[0], let some = pair[rules], none > 0 {
                print(String(format: "  round %d: %10.0f readings/s without rules, %10.0f with %d (%.1f %%)", round + 1, none, some, rules, some / none * 100))
            }
        }
        // One run's rate moves by ±15 % on a shared two-core VM (write-back of the previous run, the host): the figure
        // is the median of each side over the rounds, not one lucky run.
        var medians: [Int: Double] = [:]
        for count in [0, rules] {
            guard let runs = results[count], let best = runs.max(by: { $0.rate < $1.rate }) else { continue }
            let median = Self.median(runs.map(\.rate))
            medians[count] = median
            print(
                String(
                    format: "%5d rules: median %10.0f, best %10.0f readings/s stored; engine done %.3f s after the last commit; %d alerts changed", count, median,
                    best.rate, best.drain, best.transitions))
        }
        if let none = medians[0], let some = medians[rules], none > 0 {
            print(String(format: "with %d rules: %.1f %% of the throughput without rules (medians; goal ≥ 90 %%)", rules, some / none * 100))
        }
    }

    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        guard !sorted.isEmpty else { return 0 }
        let middle = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
    }

    /// Rules on the site's sensors: thresholds and bands mostly outside what the sensors read (most rules never fire,
    /// as on a farm), one in ten near the values, with `for`, hysteresis, rate windows and fault runs.
    static func makeRules(_ count: Int, tanks: Int, seed: UInt64) throws -> [AlertRule] {
        var random = SplitMix64(seed: seed)
        var result: [AlertRule] = []
        for index in 0..<count {
            let tank = Int(random.next() % UInt64(tanks)) + 1
            let near = random.next() % 10 == 0
            var spec = AlertRuleSpec()
            spec.name = "rule-\(index)"
            spec.sensor = index % 4 == 0 ? "tank*.*" : "tank\(tank).*"
            switch index % 6 {
            case 0, 1:
                spec.kind = "below"
                spec.quantity = "ph"
                spec.threshold = near ? 6.0 : 5.0
                spec.clear = near ? 6.05 : 5.1
                spec.for = "5m"
            case 2:
                spec.kind = "above"
                spec.quantity = "temperature"
                spec.threshold = near ? 21 : 30
                spec.for = "10m"
            case 3:
                spec.kind = "out_of_range"
                spec.quantity = "ec"
                spec.min = near ? 1400 : 500
                spec.max = near ? 1450 : 4000
            case 4:
                spec.kind = "rate_of_change"
                spec.quantity = "ph"
                spec.threshold = near ? 0.05 : 1
                spec.window = "10m"
            default:
                spec.kind = "sensor_fault"
                spec.count = 3
            }
            result.append(try spec.validated())
        }
        return result
    }

    private func measure(rules count: Int, batchList: [Batch], total: Int, device: DeviceID, end: Timestamp, logger: Logger) async throws
        -> (rate: Double, drain: Double, transitions: Int)
    {
        let directory = NSTemporaryDirectory() + "farmgate-bench-alerts-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let (store, _) = try await LocalIngest.openStore(directory: directory, device: device, logger: logger)
        defer { store.close() }
        guard let farm = try await store.farm(named: "bench"), let identity = try await store.devices(farmID: farm.id).first else {
            throw ValidationError("the bench farm was not created")
        }
        for rule in try Self.makeRules(count, tanks: tanks, seed: seed) {
            try await store.putAlertRule(farmID: farm.id, rule: rule, replace: false, at: end)
        }
        // The generated readings lie in a fixed window; the engine's clock stands at its end, so none counts as late.
        let engine = AlertEngine(store: store, settings: AlertEngine.Settings(tick: .seconds(3600)), logger: logger, now: { end })
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: [engine], logger: logger))
        return try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            // Let the engine load its rules before the first commit.
            try await Task.sleep(for: .milliseconds(200))
            let clock = ContinuousClock()
            let start = clock.now
            for batch in batchList {
                let outcome = try await store.store(batch, for: identity, receivedAt: end)
                engine.committed(CommittedBatch(device: identity, receivedAt: end, readings: outcome.fresh))
            }
            let stored = start.duration(to: clock.now)
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
            let drained = start.duration(to: clock.now)
            let transitions = try await store.alertRecords(farmID: farm.id, changedSince: Timestamp(microseconds: 0), limit: 1_000_000).count
            return (Double(total) / stored.seconds, (drained - stored).seconds, transitions)
        }
    }
}
