public import Prometheus

/// The delivery workers' metrics, in the registry `/metrics` renders. Labels are bounded: an outcome, a receiver kind,
/// an outbox state. Never a farm, receiver or alert.
///
/// - `farmgate_ingest_notifications_total{result="delivered|retried|dead"}`: attempts by outcome at this instance
///   (`retried`: failed, another attempt is scheduled; `dead`: failed for good).
/// - `farmgate_ingest_notification_duration_seconds{kind="webhook|email"}`: time of one attempt.
/// - `farmgate_ingest_notification_outbox{state="pending|delivering|delivered|dead"}`: rows in the outbox by state,
///   across instances (read from the store every `poll_interval`, at most every 10 s). Alert on `state="dead"` > 0.
/// - `farmgate_ingest_notifications_in_flight`: deliveries running at this instance.
public final class NotificationMetrics: Sendable {
    public enum Result: String, Sendable, CaseIterable {
        case delivered, retried, dead
    }

    private let results: [Result: Counter]
    private let durations: [AlertReceiverKind: DurationHistogram]
    private let outbox: [OutboxState: Gauge]
    private let inFlight: Gauge

    public init(registry: PrometheusCollectorRegistry) {
        let resultName = MetricNameDescriptor(
            namespace: "farmgate_ingest", metricName: "notifications", unitName: "total",
            helpText: "Notification delivery attempts at this instance, by result (delivered, retried, dead).")
        var results: [Result: Counter] = [:]
        for result in Result.allCases { results[result] = registry.makeCounter(descriptor: resultName, labels: [("result", result.rawValue)]) }
        self.results = results
        let durationName = MetricNameDescriptor(
            namespace: "farmgate_ingest", metricName: "notification_duration", unitName: "seconds",
            helpText: "Time of one notification delivery attempt, by receiver kind.")
        var durations: [AlertReceiverKind: DurationHistogram] = [:]
        for kind in AlertReceiverKind.allCases {
            durations[kind] = registry.makeDurationHistogram(descriptor: durationName, labels: [("kind", kind.rawValue)], buckets: IngestMetrics.durationBuckets)
        }
        self.durations = durations
        let outboxName = MetricNameDescriptor(
            namespace: "farmgate_ingest", metricName: "notification_outbox", unitName: "",
            helpText: "Notifications in the outbox by state, across instances; dead letters wait for `farmgate-ingest alert outbox retry`.")
        var outbox: [OutboxState: Gauge] = [:]
        for state in OutboxState.allCases { outbox[state] = registry.makeGauge(descriptor: outboxName, labels: [("state", state.rawValue)]) }
        self.outbox = outbox
        inFlight = registry.makeGauge(
            descriptor: MetricNameDescriptor(
                namespace: "farmgate_ingest", metricName: "notifications_in_flight", unitName: "", helpText: "Notification deliveries running at this instance."))
    }

    func attempt(_ result: Result, kind: AlertReceiverKind, duration: Duration) {
        results[result]?.increment()
        durations[kind]?.record(duration)
    }

    func outbox(_ counts: [OutboxState: Int]) {
        for (state, count) in counts { outbox[state]?.set(Double(count)) }
    }

    func inFlight(_ count: Int) {
        inFlight.set(Double(count))
    }
}
