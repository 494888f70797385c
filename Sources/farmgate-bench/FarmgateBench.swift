import ArgumentParser
import FarmgateIngest
import Logging

/// `farmgate-bench`: figures for the README, printed, never asserted. One subcommand per measured part.
@main
struct FarmgateBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "farmgate-bench",
        abstract: "Measure Farmgate: wire size, buffer commits, backlog drain and ingest throughput.",
        // Add a benchmark by appending its command type here (one per line, in its own file).
        subcommands: [
            CodecBenchmark.self,
            BufferBench.self,
            DrainBench.self,
            FootprintBench.self,
            IngestBench.self,
            FloodBench.self,
            LatestBench.self,
            PostgresBench.self,
            RollupBench.self,
            NotifyBench.self,
            AlertBench.self,
            WireBench.self,
            AllBenchmarks.self,
        ]
    )
}

/// `farmgate-bench all`: every benchmark with its defaults, one after another, for the README's table.
struct AllBenchmarks: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "all", abstract: "Run every benchmark with its defaults.")

    func run() async throws {
        for (title, command) in [
            ("codec: bytes per reading", ["codec"]), ("buffer: commits per second", ["buffer"]),
            ("drain: backlog to a local ingest", ["drain"]), ("ingest: readings per second on SQLite", ["ingest"]),
            ("latest: reads from the cache", ["latest"]),
        ] {
            print("\n## \(title)\n")
            var parsed = try FarmgateBench.parseAsRoot(command)
            if var asyncCommand = parsed as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try parsed.run()
            }
        }
    }
}

extension Logger {
    /// The benchmarks' logger: errors only, through the handler `farmgate-ingest` logs with, so that an ingest run
    /// inside a benchmark pays what the real one pays per request.
    static var bench: Logger {
        Logger(label: "farmgate-bench") { IngestLogHandler(label: $0, level: .error) }
    }
}
