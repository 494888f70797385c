import ArgumentParser
@_spi(Benchmarks) import FarmgateAgent
import FarmgateWire
import Foundation
import Logging

/// `farmgate-bench buffer`: group commits per second of the site buffer for groups of 1, 60 and 1000 samples, and what the
/// uploader pays to take and acknowledge a batch of 1000.
struct BufferBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "buffer",
        abstract: "Group commits per second of the site buffer, and the cost of pending(1000) + acknowledge(1000).",
        discussion: """
            Runs against a real file in --directory (use the disk the agent will use: an SD card is far slower than an SSD). \
            Each commit is durable (synchronous=FULL, plus the fsynced sequence sidecar). --compare-normal repeats the run with \
            synchronous=NORMAL and no sidecar fsync, which survives kill -9 but not power loss.
            """)

    @Option(help: "Where to create the scratch buffer files.")
    var directory: String = "/var/tmp"

    @Option(help: "Seconds to measure each group size.")
    var seconds: Double = 3

    @Option(parsing: .upToNextOption, help: "Samples per group commit.")
    var groups: [Int] = [1, 60, 1000]

    @Option(help: "Sensors the samples are spread over.")
    var sensors: Int = 60

    @Flag(help: "Also measure synchronous=NORMAL for comparison.")
    var compareNormal = false

    func validate() throws {
        guard seconds > 0, seconds <= 600 else { throw ValidationError("--seconds must be between 0 and 600") }
        guard !groups.isEmpty, groups.allSatisfy({ (1...100_000).contains($0) }) else {
            throw ValidationError("--groups must list sizes between 1 and 100000")
        }
        guard (1...10_000).contains(sensors) else { throw ValidationError("--sensors must be between 1 and 10000") }
    }

    func run() async throws {
        let logger = Logger(label: "farmgate.bench.buffer") { StreamLogHandler.standardError(label: $0) }
        let scratch = URL(fileURLWithPath: directory).appendingPathComponent("farmgate-bench-buffer-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: scratch) }
        let ids = try (1...sensors).map { try SensorID("bench\($0)") }
        let descriptors = ids.map { SensorDescriptor(id: $0, quantity: .temperature) }

        let modes: [ReadingBuffer.Durability] = compareNormal ? [.full, .normal] : [.full]
        print("site buffer on \(scratch.path), \(sensors) sensors, \(seconds) s per figure")
        for mode in modes {
            print("")
            print("synchronous=\(mode.rawValue.uppercased())")
            for group in groups {
                let path = scratch.appendingPathComponent("commits-\(mode.rawValue)-\(group).sqlite").path
                let buffer = try ReadingBuffer(configuration: BufferConfiguration(path: path), logger: logger, durability: mode)
                try await buffer.register(descriptors)
                let clock = ContinuousClock()
                let started = clock.now
                let budget = Duration.milliseconds(Int64(seconds * 1000))
                var commits = 0
                var samples = 0
                while started.duration(to: clock.now) < budget {
                    try await buffer.append(makeSamples(ids, count: group, first: samples))
                    try await buffer.flush()
                    commits += 1
                    samples += group
                }
                let elapsed = started.duration(to: clock.now).seconds
                try await buffer.close()
                print(
                    "  group of \(pad(group, 5)): \(pad(commits, 7)) commits in \(format(elapsed)) s = "
                        + "\(pad(Int(Double(commits) / elapsed), 6)) commits/s, \(pad(Int(Double(samples) / elapsed), 8)) samples/s")
            }

            // The uploader's loop: take the oldest 1000, acknowledge them.
            let path = scratch.appendingPathComponent("drain-\(mode.rawValue).sqlite").path
            let buffer = try ReadingBuffer(configuration: BufferConfiguration(path: path), logger: logger, durability: mode)
            try await buffer.register(descriptors)
            let rounds = 30
            for chunk in 0..<rounds {
                try await buffer.append(makeSamples(ids, count: 1_000, first: chunk * 1_000))
                try await buffer.flush()
            }
            let clock = ContinuousClock()
            var takeTotal = Duration.zero
            var ackTotal = Duration.zero
            for _ in 0..<rounds {
                let started = clock.now
                let batch = try await buffer.pending(limit: 1_000, from: .oldest)
                let taken = clock.now
                try await buffer.acknowledge(batch.map(\.sequence))
                takeTotal += started.duration(to: taken)
                ackTotal += taken.duration(to: clock.now)
            }
            try await buffer.close()
            let take = takeTotal.seconds / Double(rounds) * 1000
            let ack = ackTotal.seconds / Double(rounds) * 1000
            print(
                "  pending(limit: 1000): \(format(take)) ms, acknowledge(1000): \(format(ack)) ms, together "
                    + "\(Int(1000 / (take + ack) * 1000)) readings/s (mean of \(rounds))")
        }
    }

    private func makeSamples(_ ids: [SensorID], count: Int, first: Int) -> [Sample] {
        (first..<(first + count)).map { index in
            Sample(
                sensor: ids[index % ids.count], timestamp: Timestamp(microseconds: 1_700_000_000_000_000 + Int64(index) * 1_000),
                value: 18 + Double(index % 200) / 16)
        }
    }

    private func format(_ value: Double) -> String { String(format: "%.2f", value) }

    private func pad(_ value: Int, _ width: Int) -> String {
        let text = String(value)
        return String(repeating: " ", count: max(0, width - text.count)) + text
    }
}
