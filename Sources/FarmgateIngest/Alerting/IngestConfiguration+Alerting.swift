import FarmgateSupport

extension IngestConfiguration {
    /// Reads `[alerting]` into ``alerting``: the alert engine's timings.
    ///
    /// ```toml
    /// [alerting]
    /// evaluation_interval = "5s"    # default 5 s: no-data and device-offline rules, due late reports, rule reloads
    /// late_after = "5m"             # default 5 min: a reading older than this on arrival is late (a backlog)
    /// late_quiet = "30s"            # default 30 s: a backlog's one late report is written once it has been quiet this long
    /// calibration_interval = "5m"   # default 5 min: how often calibration-overdue rules ask the store
    /// queue_limit = 1000            # default 1,000 batches waiting for evaluation; past it the engine reads back from the store
    /// ```
    ///
    /// A no-data or offline alert fires up to `evaluation_interval` after its `after` has passed; a late report comes
    /// up to `evaluation_interval` after `late_quiet`.
    mutating func parseAlerting(_ table: ConfigTable) throws(ConfigurationError) {
        guard let section = try table.table("alerting") else { return }
        try section.checkKeys(["evaluation_interval", "late_after", "late_quiet", "calibration_interval", "queue_limit"])
        if let interval = try section.duration("evaluation_interval", in: Duration.milliseconds(100)...Duration.seconds(600)) { alerting.tick = interval }
        if let late = try section.duration("late_after", in: Duration.seconds(10)...Duration.seconds(86_400)) { alerting.lateAfter = late }
        if let quiet = try section.duration("late_quiet", in: Duration.seconds(1)...Duration.seconds(3600)) { alerting.lateQuiet = quiet }
        if let interval = try section.duration("calibration_interval", in: Duration.seconds(1)...Duration.seconds(86_400)) {
            alerting.calibrationInterval = interval
        }
        if let limit = try section.int("queue_limit", in: 1...1_000_000) { alerting.queueLimit = limit }
    }
}
