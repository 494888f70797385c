import ArgumentParser

/// `farmgate-bench`: figures for the README, printed, never asserted. One subcommand per measured part.
@main
struct FarmgateBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "farmgate-bench",
        abstract: "Measure Farmgate: wire size, buffer commits, backlog drain and ingest throughput.",
        // Add a benchmark by appending its command type here (one per line, in its own file).
        subcommands: [
            CodecBenchmark.self,
        ]
    )
}
