import ArgumentParser
import FarmgateCLI
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Logging

// MARK: retention

struct RetentionCommand: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "retention", abstract: "Remove readings and rollups older than [retention] keeps.", subcommands: [Run.self])

    struct Run: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "run",
            abstract: "Run retention once now and print what went (serve runs it every [retention] interval).",
            discussion: """
                Raw readings before the start of the UTC day `raw` ago go (PostgreSQL: whole daily partitions dropped; \
                SQLite: deleted a few thousand rows per transaction, each followed by a pause as long as it took, so a running \
                serve keeps taking batches), and each rollup level's rows before its own cut-off; delivered and dead \
                notifications, and alert transitions recorded more than `alert_history` ago (each alert's newest stays). Re-sent \
                readings stay duplicates afterwards. One run at a time: a run that finds another in progress (another `retention \
                run`, serve's scheduled run; on PostgreSQL any instance's) does nothing and exits with status 75 (try again later).
                """)

        @Flag(help: "Print what would go and remove nothing.")
        var dryRun = false

        @OptionGroup var options: ConfigOption

        func run() async throws {
            let (configuration, commandLogger) = try options.loadAndLog(label: "farmgate-ingest")
            var logger = commandLogger
            logger.logLevel = max(logger.logLevel, .error)
            let store = try await options.openStore(configuration, logger: logger, creating: false)
            guard let retentionStore = store as? any RetentionStore else {
                throw failure("the store \(configuration.storage.displayName) has no retention")
            }
            let storage = configuration.storage.displayName
            let retention = configuration.retention
            let dryRun = self.dryRun
            let report = try await withRunning(store) { _ in
                do {
                    try await retentionStore.migrate()
                } catch {
                    throw failure("cannot migrate \(storage): \(Logger.describe(storeError: error))", code: migrationExitCode(error))
                }
                let started = ContinuousClock.now
                do {
                    var report = try await retentionStore.runRetention(retention, now: Timestamp.now(), options: RetentionRunOptions(dryRun: dryRun))
                    report.duration = ContinuousClock.now - started
                    return report
                } catch {
                    throw failure("retention on \(storage) failed: \(Logger.describe(storeError: error))")
                }
            }
            print(
                "Retention on \(storage)\(dryRun ? " (dry run: nothing removed)" : ""): raw \(IngestConfiguration.Retention.describe(retention.raw)), "
                    + RollupLevel.allCases.map { "\($0.rawValue) rollups \(IngestConfiguration.Retention.describe(retention.period(of: $0)))" }
                    .joined(separator: ", ") + ", alert history \(IngestConfiguration.Retention.describe(retention.alertHistory))")
            for line in report.lines { print(line) }
            if report.skipped != nil { throw ExitCode(75) }  // EX_TEMPFAIL
            print("Took \(report.duration.wholeMilliseconds) ms.")
        }
    }
}
