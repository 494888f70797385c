public import Prometheus
import NIOSSL
import Synchronization

/// The ingest's metrics, registered once in the registry that `main` owns and `/metrics` exposes.
///
/// Labels are bounded: a batch result, a reading outcome, a route template and a status class. Never a device or farm.
public final class IngestMetrics: Sendable {
    /// Why a batch ended as it did (`farmgate_ingest_batches_total{result=...}`).
    public enum BatchResult: String, Sendable, CaseIterable {
        case stored
        case unauthorized
        case forbidden
        case unsupported
        case tooLarge = "too_large"
        case malformed
        case rateLimited = "rate_limited"
        case unavailable
        /// 409: a stateful frame against a table or context the ingest does not hold; the agent sends it again.
        case staleState = "stale_state"
    }

    /// Why a connection was answered and closed before the application saw a request
    /// (`farmgate_ingest_connections_refused_total{reason=...}`).
    public enum ConnectionRefusal: String, Sendable, CaseIterable {
        /// Past `[server] max_connections`: 503.
        case tooManyConnections = "too_many_connections"
        /// A request head the HTTP parser refused: 400 or 431.
        case malformed
    }

    /// The registry `/metrics` renders.
    public let registry: PrometheusCollectorRegistry
    private let batches: [BatchResult: Counter]
    private let accepted: Counter
    private let duplicates: Counter
    private let rejected: Counter
    private let durations = Mutex<[String: DurationHistogram]>([:])
    private let refusals: [ConnectionRefusal: Counter]
    private let timeouts: [String: Counter]
    /// Keyed by "declared|named" and "used|none|previous".
    private let statefulFrames: [String: Counter]
    private let latestOnEventLoop: Counter
    private let certificateExpiry = Mutex<Gauge?>(nil)

    static let durationBuckets: [Duration] = [
        .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2), .seconds(5), .seconds(10),
    ]

    /// Registers the ingest's metrics in `registry`.
    public init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
        let batchesName = MetricNameDescriptor(
            namespace: "farmgate_ingest", metricName: "batches", unitName: "total", helpText: "Batches posted, by result.")
        var batches: [BatchResult: Counter] = [:]
        for result in BatchResult.allCases {
            batches[result] = registry.makeCounter(descriptor: batchesName, labels: [("result", result.rawValue)])
        }
        self.batches = batches
        let readingsName = MetricNameDescriptor(
            namespace: "farmgate_ingest", metricName: "readings", unitName: "total",
            helpText: "Readings received in batches, by outcome (accepted, duplicate, rejected).")
        accepted = registry.makeCounter(descriptor: readingsName, labels: [("outcome", "accepted")])
        duplicates = registry.makeCounter(descriptor: readingsName, labels: [("outcome", "duplicate")])
        rejected = registry.makeCounter(descriptor: readingsName, labels: [("outcome", "rejected")])
        let refusalsName = MetricNameDescriptor(
            namespace: "farmgate_ingest", metricName: "connections_refused", unitName: "total",
            helpText: "Connections answered and closed before a request reached the application, by reason.")
        var refusals: [ConnectionRefusal: Counter] = [:]
        for reason in ConnectionRefusal.allCases {
            refusals[reason] = registry.makeCounter(descriptor: refusalsName, labels: [("reason", reason.rawValue)])
        }
        self.refusals = refusals
        let timeoutsName = MetricNameDescriptor(
            namespace: "farmgate_ingest", metricName: "connection_timeouts", unitName: "total",
            helpText: "Connections closed by a timeout, by phase (idle, header, body).")
        var timeouts: [String: Counter] = [:]
        for phase in ["idle", "header", "body"] {
            timeouts[phase] = registry.makeCounter(descriptor: timeoutsName, labels: [("phase", phase)])
        }
        self.timeouts = timeouts
        let statefulName = MetricNameDescriptor(
            namespace: "farmgate_ingest", metricName: "stateful_frames", unitName: "total",
            helpText: "Stateful frames (format version 4) decoded, by whether the table came inline or by hash and which context was used (previous: a frame sent again after its answer was lost).")
        var statefulFrames: [String: Counter] = [:]
        for table in ["declared", "named"] {
            for context in ["used", "none", "previous"] {
                statefulFrames[table + " " + context] = registry.makeCounter(descriptor: statefulName, labels: [("table", table), ("context", context)])
            }
        }
        self.statefulFrames = statefulFrames
        latestOnEventLoop = registry.makeCounter(
            descriptor: MetricNameDescriptor(
                namespace: "farmgate_ingest", metricName: "latest_event_loop_answers", unitName: "total",
                helpText: "latest reads answered from memory on the connection's event loop, without the router (also counted in http_request_duration)."))
    }

    func latestAnsweredOnEventLoop() {
        latestOnEventLoop.increment()
    }

    /// `farmgate_ingest_tls_certificate_expiry_timestamp_seconds`: when the first certificate of the served chain to
    /// expire does (Unix seconds), as blackbox_exporter's `probe_ssl_earliest_cert_expiry`. Registered with the first
    /// certificate, so that an ingest without TLS exports no zero to alert on.
    func tlsCertificate(_ tls: ServerTLS) {
        guard let earliest = tls.certificateChain.map({ Int64($0.notValidAfter) }).min() else { return }
        let registry = self.registry
        certificateExpiry.withLock { gauge in
            let current = gauge ?? registry.makeGauge(
                descriptor: MetricNameDescriptor(
                    namespace: "farmgate_ingest", metricName: "tls_certificate_expiry_timestamp", unitName: "seconds",
                    helpText: "When the served TLS certificate chain's first certificate to expire does, in Unix seconds."))
            current.set(Double(earliest))
            gauge = current
        }
    }

    /// Which context a stateful frame was decoded against.
    enum FrameContext: String {
        /// The device's newest readings.
        case used
        /// None (self-contained values).
        case none
        /// The device's newest readings before this instance's last commit of it: a frame sent again after a lost answer.
        case previous
    }

    func statefulFrame(declared: Bool, context: FrameContext) {
        statefulFrames[(declared ? "declared" : "named") + " " + context.rawValue]?.increment()
    }

    func connectionRefused(_ reason: ConnectionRefusal) {
        refusals[reason]?.increment()
    }

    func connectionTimedOut(_ phase: ConnectionTimeoutHandler.Phase) {
        timeouts[phase.rawValue]?.increment()
    }

    func batch(_ result: BatchResult) {
        batches[result]?.increment()
    }

    func readings(accepted: Int, duplicates: Int, rejected: Int) {
        self.accepted.increment(by: Int64(accepted))
        self.duplicates.increment(by: Int64(duplicates))
        self.rejected.increment(by: Int64(rejected))
    }

    /// Records one request's duration under its route template and status class (`2xx`, `4xx`, ...).
    func request(route: String, status: Int, duration: Duration) {
        let statusClass = "\(min(max(status / 100, 1), 5))xx"
        let key = route + " " + statusClass
        let registry = self.registry
        let histogram = durations.withLock { histograms in
            if let existing = histograms[key] { return existing }
            let created = registry.makeDurationHistogram(
                descriptor: MetricNameDescriptor(
                    namespace: "farmgate_ingest", metricName: "http_request_duration", unitName: "seconds",
                    helpText: "Time to answer an HTTP request, by route template and status class."),
                labels: [("route", route), ("status", statusClass)], buckets: IngestMetrics.durationBuckets)
            histograms[key] = created
            return created
        }
        histogram.record(duration)
    }
}
