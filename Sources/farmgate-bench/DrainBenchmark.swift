import ArgumentParser
import FarmgateAgent
import FarmgateWire
import Foundation
import Logging

/// `farmgate-bench drain`: how fast a backlog left by an outage reaches the ingest. The agent's real buffer (SQLite,
/// synchronous=FULL) holds the readings of a long outage; the agent's real uploader sends them over loopback HTTP to a real
/// ingest on SQLite, with the production batch size. Prints, never asserts.
struct DrainBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drain",
        abstract: "Backlog drain rate (readings/s) from the agent's buffer through its uploader to a local ingest.")

    @Option(help: "Readings in the backlog.")
    var readings = 100_000

    @Option(help: "Readings per live batch, [upload] batch_max_readings (the agent's default is 1000).")
    var batch = 1000

    @Option(help: "Readings per backlog batch, [upload] backlog_batch_readings (default: the agent's, 5000 or --batch if more).")
    var backlogBatch: Int?

    @Option(help: "Tanks on the simulated site; each has a pH, an EC and a temperature sensor.")
    var tanks = 20

    @Option(help: "Seconds between two readings of a sensor (a day of a 50-sensor site at 1 Hz: --readings 4320000 --tanks 17 --period 1).")
    var period: Double = 10

    @Option(help: "Seed of the generator.")
    var seed: UInt64 = 42

    func validate() throws {
        guard readings > 0, batch > 0, tanks > 0, period > 0 else {
            throw ValidationError("--readings, --batch, --tanks and --period must be positive")
        }
        if let backlogBatch, backlogBatch < batch { throw ValidationError("--backlog-batch must be at least --batch") }
    }

    func run() async throws {
        let logger = Logger.bench
        let directory = NSTemporaryDirectory() + "farmgate-bench-drain-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }

        let site = try RealisticSite(tanks: tanks, readingCount: readings, period: period, seed: seed)
        let buffer = try ReadingBuffer(configuration: BufferConfiguration(path: directory + "/buffer.sqlite"), logger: logger)
        try await buffer.register(site.sensors)
        let fill = try await ContinuousClock().measure {
            for chunk in stride(from: 0, to: site.readings.count, by: 5_000) {
                let slice = site.readings[chunk..<min(chunk + 5_000, site.readings.count)]
                try await buffer.append(slice.map { Sample(sensor: $0.sensor, timestamp: $0.timestamp, value: $0.value, quality: $0.quality) })
                try await buffer.flush()
            }
        }
        let backlog = try await buffer.statistics().pending
        print("backlog: \(backlog) readings from \(site.sensors.count) sensors, buffered in \(String(format: "%.2f", fill.seconds)) s")

        let latest = site.readings.map(\.timestamp).max() ?? .now()
        let device = site.device
        let batch = self.batch
        let backlogBatch = self.backlogBatch
        let result = try await LocalIngest.withRunning(directory: directory, device: device, now: latest, logger: logger) { ingest in
            let configuration = UploadConfiguration(
                endpoint: ingest.endpoint, deviceKey: ingest.deviceKey, batchMaxReadings: batch, backlogBatchMaxReadings: backlogBatch,
                batchMaxAge: .zero,
                backoffInitial: .milliseconds(50), pollInterval: .milliseconds(5), useProxyEnvironment: false)
            let uploader = try Uploader(device: device, source: buffer, configuration: configuration, logger: logger)
            let clock = ContinuousClock()
            let start = clock.now
            let task = Task { try await uploader.run() }
            var pending = backlog
            while pending > 0, clock.now - start < .seconds(600) {
                try await Task.sleep(for: .milliseconds(20))
                pending = try await buffer.statistics().pending
            }
            let elapsed = start.duration(to: clock.now)
            task.cancel()
            _ = try? await task.value
            return (elapsed, pending, uploader.status())
        }
        let (elapsed, left, status) = result
        print("batches: \(batch) live, \(UploadConfiguration(endpoint: "", deviceKey: "", batchMaxReadings: batch, backlogBatchMaxReadings: backlogBatch).backlogBatchMaxReadings) backlog")
        print("drained \(backlog - left) readings in \(String(format: "%.2f", elapsed.seconds)) s: \(String(format: "%.0f", Double(backlog - left) / elapsed.seconds)) readings/s")
        print("  \(status.requestsTotal) requests, \(status.uploadedTotal) stored, \(status.duplicatesTotal) duplicates, \(status.quarantinedTotal) quarantined; last: \(status.lastResult ?? "-")")
    }
}
