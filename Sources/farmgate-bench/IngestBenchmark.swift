import ArgumentParser
import FarmgateAgent
import FarmgateIngest
import FarmgateWire
import Foundation
import Logging
import Prometheus
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// `farmgate-bench ingest`: readings per second that the ingest stores on embedded SQLite, in process and end to end
/// over loopback HTTP (binary batches posted by the agent's libcurl client to a running ingest). Prints, never asserts.
struct IngestBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ingest",
        abstract: "Readings per second stored by the ingest on SQLite: in process, and over HTTP from the agent's client."
    )

    @Option(help: "Batches to store.")
    var batches = 100

    @Option(help: "Readings per batch.")
    var readings = 1000

    @Option(help: "Tanks on the simulated site; each has a pH, an EC and a temperature sensor.")
    var tanks = 20

    @Option(help: "Seed of the generator.")
    var seed: UInt64 = 42

    @Flag(help: "Skip the end-to-end HTTP measurement.")
    var skipHTTP = false

    func validate() throws {
        guard batches > 0, readings > 0, tanks > 0 else { throw ValidationError("--batches, --readings and --tanks must be positive") }
    }

    func run() async throws {
        let logger = Logger.bench
        let directory = NSTemporaryDirectory() + "farmgate-bench-ingest-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }

        let site = try RealisticSite(tanks: tanks, readingCount: batches * readings, seed: seed)
        let batchList = site.batches(of: readings)
        let total = batchList.reduce(0) { $0 + $1.readings.count }
        print("\(batchList.count) batches of \(readings) readings from \(tanks * 3) sensors; SQLite in \(directory) (WAL, synchronous=FULL)")
        print("")

        // In process: the store alone.
        let (store, _) = try await LocalIngest.openStore(directory: directory, device: site.device, logger: logger)
        defer { store.close() }
        guard let farm = try await store.farm(named: "bench"), let device = try await store.devices(farmID: farm.id).first else {
            throw ValidationError("the bench farm was not created")
        }
        // The same batches twice: first every reading is new, then every one is a duplicate.
        for title in ["store, new readings", "store, all duplicates"] {
            let clock = ContinuousClock()
            var perBatch: [Duration] = []
            let time = try await clock.measure {
                for batch in batchList {
                    let start = clock.now
                    _ = try await store.store(batch, for: device, receivedAt: .now())
                    perBatch.append(start.duration(to: clock.now))
                }
            }
            report(title, readings: total, time: time, perBatch: perBatch)
        }

        guard !skipHTTP else { return }
        try await http(batchList: batchList, total: total, directory: directory, logger: logger)
    }

    /// End to end: a real ingest on a loopback port, binary batches posted one after another as the uploader does.
    private func http(batchList: [Batch], total: Int, directory: String, logger: Logger) async throws {
        guard let device = batchList.first?.device else { return }
        // The generated readings lie in a fixed window; judge them by a clock at its end.
        let latest = batchList.flatMap(\.readings).map(\.timestamp).max() ?? .now()
        let frames = try batchList.map { try BatchCodec.encode($0) }
        let bytes = frames.reduce(0) { $0 + $1.count }
        try await LocalIngest.withRunning(directory: directory + "/http", device: device, now: latest, logger: logger) { ingest in
            let client = try HTTPClient(configuration: .init(useProxyEnvironment: false), logger: logger)
            defer { client.close() }
            let url = ingest.endpoint + IngestProtocol.batchesPath
            let headers = [
                HTTPHeader("Authorization", "Bearer \(ingest.deviceKey)"), HTTPHeader("Content-Type", IngestProtocol.binaryBatchMediaType),
            ]
            let clock = ContinuousClock()
            var perBatch: [Duration] = []
            var accepted = 0
            let time = try await clock.measure {
                for frame in frames {
                    let start = clock.now
                    let response = try await client.post(url, headers: headers, body: frame)
                    perBatch.append(start.duration(to: clock.now))
                    guard response.status == 200 else {
                        throw ValidationError("the ingest answered \(response.status): \(String(decoding: response.body, as: UTF8.self))")
                    }
                    if let receipt = try? JSONDecoder().decode(IngestReceipt.self, from: Data(response.body)) { accepted += receipt.accepted }
                }
            }
            self.report("HTTP binary batches, libcurl keep-alive", readings: total, time: time, perBatch: perBatch)
            print(String(format: "  %.2f bytes/reading on the wire; %d of %d readings accepted", Double(bytes) / Double(total), accepted, total))
        }
    }

    private func report(_ title: String, readings: Int, time: Duration, perBatch: [Duration]) {
        let seconds = time.seconds
        let sorted = perBatch.sorted()
        func percentile(_ p: Double) -> Double {
            guard !sorted.isEmpty else { return 0 }
            return sorted[min(sorted.count - 1, Int(Double(sorted.count - 1) * p))].seconds * 1000
        }
        print(title)
        print(
            String(
                format: "  %10.0f readings/s   %.3f s total   per batch: p50 %.2f ms, p99 %.2f ms, max %.2f ms", Double(readings) / seconds,
                seconds, percentile(0.5), percentile(0.99), percentile(1)))
    }
}
