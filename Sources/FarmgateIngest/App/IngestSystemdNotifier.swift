public import FarmgateSupport
public import Logging
public import Prometheus
public import ServiceLifecycle
import Synchronization

/// The ingest's side of `Type=notify`: `READY=1` once the server listens (the store was opened and migrated before it
/// starts), a `STATUS=` line every ``statusInterval`` with the requests and batches of the last minute, and `STOPPING=1`
/// when a graceful stop begins. `serve` hands ``serverRunning()`` to ``buildApplication`` as its `onServerRunning`.
///
/// The counts come from the same Prometheus registry `/metrics` renders, so the status line and the metrics never disagree.
public final class IngestSystemdNotifier: Service {
    public static let statusInterval: Duration = .seconds(10)

    let notifier: SystemdNotifier
    let registry: PrometheusCollectorRegistry
    let logger: Logger
    private let window = Mutex(ActivityWindow(span: .seconds(60)))
    /// Finished once the server listens (or shutdown began first): the status loop starts then.
    private let ready = AsyncStream<Void>.makeStream()

    public init(notifier: SystemdNotifier, registry: PrometheusCollectorRegistry, logger: Logger) {
        self.notifier = notifier
        self.registry = registry
        self.logger = logger
    }

    /// How much longer each `EXTEND_TIMEOUT_USEC=` sent while the store migrates gives the start, and how often one
    /// is sent.
    public static let migrationExtension: Duration = .seconds(90)
    public static let migrationExtensionInterval: Duration = .seconds(30)

    /// Runs `migration` (`serve`'s, before the server listens) while telling systemd that the start goes on:
    /// `STATUS=migrating the store's schema` and, at once and every `interval`, `EXTEND_TIMEOUT_USEC=` of
    /// ``migrationExtension``. A migration that converts a large database, or waits for another instance's, then
    /// outlasts the unit's `TimeoutStartSec=` without being killed as a start that hangs; the store's own limit on a
    /// migration (``PostgresIngestStore/migrationTimeout``) still holds.
    public func whileMigrating<T: Sendable>(
        every interval: Duration = migrationExtensionInterval, _ migration: @Sendable () async throws -> T
    ) async throws -> T {
        let lines = ["STATUS=migrating the store's schema", "EXTEND_TIMEOUT_USEC=\(Self.migrationExtension.wholeMicroseconds)"]
        send(lines)
        let extending = Task {
            while (try? await Task.sleep(for: interval)) != nil { self.send(lines) }
        }
        let outcome: Result<T, any Error>
        do { outcome = .success(try await migration()) } catch { outcome = .failure(error) }
        // Nothing is sent once this returns: the pings end before the server can say READY=1.
        extending.cancel()
        await extending.value
        return try outcome.get()
    }

    /// Called by the server once it listens: sends `READY=1`.
    public func serverRunning() async {
        send(["READY=1", "STATUS=" + statusLine()])
        ready.continuation.finish()
    }

    public func run() async throws {
        await withGracefulShutdownHandler {
            for await _ in self.ready.stream {}
            while !Task.isShuttingDownGracefully && !Task.isCancelled {
                do { try await cancelWhenGracefulShutdown { try await Task.sleep(for: Self.statusInterval) } } catch { return }
                self.send(["STATUS=" + self.statusLine()])
            }
        } onGracefulShutdown: {
            self.send(["STOPPING=1", "STATUS=stopping: finishing requests in flight"])
            self.ready.continuation.finish()
        }
    }

    /// `serving; last minute: 120 requests, 60 batches (58 stored)`.
    func statusLine() -> String {
        let totals = IngestActivity.totals(fromPrometheusText: String(decoding: registry.emitToBuffer(), as: UTF8.self))
        let delta = window.withLock { $0.record(totals, at: .now) }
        return "serving; last minute: \(delta.requests) requests, \(delta.batches) batches (\(delta.storedBatches) stored)"
    }

    private func send(_ lines: [String]) {
        do {
            try notifier.send(lines)
        } catch {
            logger.warning("Cannot notify systemd", metadata: ["error": "\(error)"])
        }
    }
}

/// Request and batch counts read back from the ingest's Prometheus text.
public struct IngestActivity: Sendable, Equatable {
    public var requests: Int64 = 0
    public var batches: Int64 = 0
    public var storedBatches: Int64 = 0

    public init(requests: Int64 = 0, batches: Int64 = 0, storedBatches: Int64 = 0) {
        self.requests = requests
        self.batches = batches
        self.storedBatches = storedBatches
    }

    /// Sums `farmgate_ingest_http_request_duration_seconds_count` (every request, by route and status) and
    /// `farmgate_ingest_batches_total` (by result; `result="stored"` separately).
    public static func totals(fromPrometheusText text: String) -> IngestActivity {
        var totals = IngestActivity()
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            let series = line[..<space]
            let name = series.prefix { $0 != "{" }
            if name == "farmgate_ingest_http_request_duration_seconds_count" {
                totals.requests += Int64(value)
            } else if name == "farmgate_ingest_batches_total" {
                totals.batches += Int64(value)
                if series.contains("result=\"stored\"") { totals.storedBatches += Int64(value) }
            }
        }
        return totals
    }
}

/// Totals seen over time; answers how much they grew over the last `span` (or since the first sample, if younger).
struct ActivityWindow {
    let span: Duration
    private var samples: [(at: ContinuousClock.Instant, totals: IngestActivity)] = []

    init(span: Duration) {
        self.span = span
    }

    mutating func record(_ totals: IngestActivity, at now: ContinuousClock.Instant) -> IngestActivity {
        samples.append((now, totals))
        // Keep the newest sample at least `span` old as the baseline.
        while samples.count > 1, now - samples[1].at >= span { samples.removeFirst() }
        let base = samples.count > 1 ? samples[0].totals : IngestActivity()
        return IngestActivity(
            requests: totals.requests - base.requests, batches: totals.batches - base.batches,
            storedBatches: totals.storedBatches - base.storedBatches)
    }
}
