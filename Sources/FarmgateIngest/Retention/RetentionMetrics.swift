public import Prometheus

/// Retention's metrics, in the registry `/metrics` renders. Labels are bounded: an outcome and a table name.
public final class RetentionMetrics: Sendable {
    private let completed: Counter
    private let skipped: Counter
    private let failed: Counter
    private let partitions: [String: Counter]
    private let rows: [String: Counter]
    private let lastRun: Gauge
    private let lastDuration: Gauge

    /// Registers `farmgate_ingest_retention_*` in `registry`.
    public init(registry: PrometheusCollectorRegistry) {
        let runs = MetricNameDescriptor(
            namespace: "farmgate_ingest", subsystem: "retention", metricName: "runs", unitName: "total",
            helpText: "Retention runs, by outcome (completed; skipped: another run was in progress, or another instance completed one recently; failed).")
        completed = registry.makeCounter(descriptor: runs, labels: [("outcome", "completed")])
        skipped = registry.makeCounter(descriptor: runs, labels: [("outcome", "skipped")])
        failed = registry.makeCounter(descriptor: runs, labels: [("outcome", "failed")])
        let partitionsName = MetricNameDescriptor(
            namespace: "farmgate_ingest", subsystem: "retention", metricName: "partitions_dropped", unitName: "total",
            helpText: "Partitions dropped (PostgreSQL), by table: daily ones of raw readings, monthly ones of 1-minute rollups.")
        partitions = Dictionary(
            uniqueKeysWithValues: ["readings", RollupLevel.minute.table].map { ($0, registry.makeCounter(descriptor: partitionsName, labels: [("table", $0)])) })
        let rowsName = MetricNameDescriptor(
            namespace: "farmgate_ingest", subsystem: "retention", metricName: "rows_removed", unitName: "total",
            helpText: "Rows removed by retention, by table (readings and rollups_1m: deleted rows plus the estimated rows of dropped partitions).")
        var rows: [String: Counter] = [:]
        for table in ["readings", "alert_outbox", "alert_transitions"] + RollupLevel.allCases.map(\.table) {
            rows[table] = registry.makeCounter(descriptor: rowsName, labels: [("table", table)])
        }
        self.rows = rows
        lastRun = registry.makeGauge(
            descriptor: MetricNameDescriptor(
                namespace: "farmgate_ingest", subsystem: "retention", metricName: "last_run_time", unitName: "seconds",
                helpText: "When the last completed retention run of this instance ended (Unix time)."))
        lastDuration = registry.makeGauge(
            descriptor: MetricNameDescriptor(
                namespace: "farmgate_ingest", subsystem: "retention", metricName: "last_run_duration", unitName: "seconds",
                helpText: "How long the last completed retention run of this instance took."))
    }

    func record(_ report: RetentionReport, endedAt unixSeconds: Double) {
        if report.skipped != nil {
            skipped.increment()
            return
        }
        guard !report.dryRun else { return }
        completed.increment()
        partitions["readings"]?.increment(by: Int64(report.partitionsDropped.count))
        partitions[RollupLevel.minute.table]?.increment(by: Int64(report.minuteRollupPartitionsDropped.count))
        rows["readings"]?.increment(by: Int64(report.rawRowsDeleted + report.rowsInDroppedPartitions))
        for (level, count) in report.rollupRowsDeleted { rows[level.table]?.increment(by: Int64(count)) }
        rows[RollupLevel.minute.table]?.increment(by: Int64(report.rowsInDroppedMinuteRollupPartitions))
        rows["alert_outbox"]?.increment(by: Int64(report.deliveredNotificationsDeleted + report.deadNotificationsDeleted))
        rows["alert_transitions"]?.increment(by: Int64(report.alertTransitionsDeleted))
        lastRun.set(unixSeconds)
        let parts = report.duration.components
        lastDuration.set(Double(parts.seconds) + Double(parts.attoseconds) / 1e18)
    }

    func recordFailure() {
        failed.increment()
    }
}
