import ArgumentParser
import FarmgateCLI
import FarmgateAgent
import FarmgateSupport
import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Hidden commands that Farmgate's own tests run as real child processes.
struct DebugCommand: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "debug",
        abstract: "Tools for Farmgate's own tests",
        shouldDisplay: false,
        subcommands: [BufferWriter.self]
    )
}

extension DebugCommand {
    /// Appends synthetic samples to a buffer as fast as asked, committing with the normal group-commit loop, and prints the
    /// highest committed sequence number after every commit. The crash-safety test SIGKILLs it at random moments.
    struct BufferWriter: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "buffer-writer",
            abstract: "Append synthetic samples to a buffer until killed.",
            discussion: """
                After every durable group commit, prints one line to standard output holding the highest committed sequence \
                number. Sensors are named w1 ... wN (temperature at 1/16 °C); timestamps are unique per sample and later than \
                those of any earlier run on the same file.
                """)

        @Option(help: ArgumentHelp("The buffer file.", valueName: "file"))
        var path: String

        @Option(parsing: .unconditional, help: "How many synthetic sensors to register (1 to 10000).")
        var sensors: Int = 4

        @Option(parsing: .unconditional, help: "Samples per second, over all sensors (1 to 1000000).")
        var rate: Int = 1_000

        @Option(name: .customLong("commit-interval-ms"), parsing: .unconditional, help: "The group-commit interval, in milliseconds.")
        var commitIntervalMilliseconds: Int = 50

        @Option(name: .customLong("quota-bytes"), parsing: .unconditional, help: "The buffer's disk quota, in bytes.")
        var quotaBytes: Int64 = 512 << 20

        func validate() throws {
            guard (1...10_000).contains(sensors) else { throw ValidationError("--sensors must be between 1 and 10000, not \(sensors)") }
            guard (1...1_000_000).contains(rate) else { throw ValidationError("--rate must be between 1 and 1000000, not \(rate)") }
            guard (1...60_000).contains(commitIntervalMilliseconds) else {
                throw ValidationError("--commit-interval-ms must be between 1 and 60000, not \(commitIntervalMilliseconds)")
            }
            guard quotaBytes > 0 else { throw ValidationError("--quota-bytes must be positive") }
        }

        func run() async throws {
            var logger = Logger(label: "farmgate.debug.buffer-writer") { StreamLogHandler.standardError(label: $0) }
            logger.logLevel = .warning
            // The agent's own locks: written beside a running agent, its commits took the sequences the agent was about
            // to give, and the agent then took its every new reading for a duplicate (a tester, 2026-12-07).
            let path = self.path
            let locks = try await runOffPool { try AgentRuntime.lockBuffer(path) }
            defer { withExtendedLifetime(locks) {} }
            let buffer = try ReadingBuffer(
                configuration: BufferConfiguration(
                    path: path, commitInterval: .milliseconds(commitIntervalMilliseconds), quotaBytes: quotaBytes),
                logger: logger,
                onCommit: { commit in
                    // One write(2) per line: a line is either wholly in the pipe or not at all when the process is killed.
                    let line = Array("\(commit.lastSequence)\n".utf8)
                    _ = line.withUnsafeBytes { write(STDOUT_FILENO, $0.baseAddress, $0.count) }
                })
            let ids = try (1...sensors).map { try SensorID("w\($0)") }
            try await buffer.register(ids.map { SensorDescriptor(id: $0, quantity: .temperature) })

            let rate = self.rate
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await buffer.run() }
                group.addTask {
                    let clock = ContinuousClock()
                    let started = clock.now
                    let firstTimestamp = Int64(Date().timeIntervalSince1970 * 1_000_000)
                    var produced = 0
                    while !Task.isCancelled {
                        try await Task.sleep(for: .milliseconds(5))
                        let elapsed = started.duration(to: clock.now)
                        let seconds = elapsed / .seconds(1)
                        let due = Int(seconds * Double(rate)) - produced
                        guard due > 0 else { continue }
                        var samples: [Sample] = []
                        samples.reserveCapacity(due)
                        for index in produced..<(produced + due) {
                            samples.append(
                                Sample(
                                    sensor: ids[index % ids.count], timestamp: Timestamp(microseconds: firstTimestamp + Int64(index)),
                                    value: 20 + Double(index % 97) / 16))
                        }
                        produced += due
                        try await buffer.append(samples)
                    }
                }
                try await group.next()
                group.cancelAll()
            }
        }
    }
}
