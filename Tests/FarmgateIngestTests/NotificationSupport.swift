import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Prometheus
import Testing

@testable import FarmgateIngest

/// Delivery settings for tests: short timeouts and backoff, a fast poll.
func fastNotify(
    maxAttempts: Int = 12, requestTimeout: Duration = .seconds(1), claimTimeout: Duration = .seconds(4), perReceiver: Int = 4, caFile: String? = nil
) -> NotifyConfiguration {
    NotifyConfiguration(
        externalURL: "https://ingest.example.net", maxAttempts: maxAttempts, backoffInitial: .milliseconds(50), backoffMax: .milliseconds(200),
        requestTimeout: requestTimeout, connectTimeout: .seconds(1), claimTimeout: claimTimeout, perReceiver: perReceiver, maxInFlight: 32,
        pollInterval: .milliseconds(50), caFile: caFile)
}

/// A notification of alert `alert` (transition `alert * 10`), a pH alert of farm `farm`.
func testNotification(_ alert: Int64, farm: String = "f1", status: AlertNotification.Status = .firing, late: Bool = false) -> AlertNotification {
    AlertNotification(
        farm: farm, rule: "ph-low", alertID: alert, transitionID: alert * 10, fingerprint: "fp-\(alert)", status: status, severity: "critical",
        labels: ["alertname": "ph-low", "farm": farm, "severity": "critical", "device": "site-1", "sensor": "tank\(alert).ph"],
        summary: "pH below 5.5 on site-1 tank\(alert).ph", description: nil,
        startsAt: Timestamp(microseconds: testNow.microseconds - 2 * 3_600_000_000), endsAt: status == .resolved ? testNow : nil, late: late,
        transitions: late
            ? [
                .init(state: "firing", at: Timestamp(microseconds: testNow.microseconds - 2 * 3_600_000_000)),
                .init(state: "resolved", at: testNow),
            ] : [], value: 5.31)
}

/// Runs `delivery` while `body` runs, then cancels it.
func withDelivery<T: Sendable>(_ delivery: NotificationDelivery, _ body: @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await delivery.run() }
        defer { group.cancelAll() }
        return try await body()
    }
}

/// A migrated store of `kind` with farm `f1`.
func withOutboxStore<T: Sendable>(_ kind: StoreKind, _ body: @Sendable (any IngestStore & NotificationOutboxStore) async throws -> T) async throws -> T {
    try await withFreshStore(kind) { store in
        _ = try await store.createFarm(name: "f1", createdAt: testNow)
        guard let outbox = store as? any IngestStore & NotificationOutboxStore else { throw IngestStoreError.notFound("an outbox role") }
        return try await body(outbox)
    }
}

/// Adds a webhook receiver of `f1` posting to `url`.
func addWebhook(_ store: any NotificationOutboxStore, name: String, url: String, secret: String? = "s3cret", maxPerMinute: Int = 100_000) async throws
    -> AlertReceiver
{
    try await AlertDeliveryAdmin(store: store).addReceiver(
        farm: "f1", AlertReceiverSpec(name: name, kind: .webhook, url: url, secret: secret, maxPerMinute: maxPerMinute))
}

/// The outbox rows of `f1` in `state`.
func rows(_ store: any NotificationOutboxStore, _ state: OutboxState? = nil) async throws -> [OutboxEntry] {
    try await store.outboxEntries(farm: nil, state: state, limit: 10_000)
}

/// The `Idempotency-Key` of a recorded request.
extension RecordedRequest {
    var idempotencyKey: String { headers["idempotency-key"] ?? "" }

    var webhook: AlertmanagerWebhook? { try? JSONDecoder().decode(AlertmanagerWebhook.self, from: Data(body)) }
}

/// The value of `sample` (`name{labels}` as rendered) in the registry, or nil.
func metric(_ registry: PrometheusCollectorRegistry, _ sample: String) -> Double? {
    let text = String(decoding: registry.emitToBuffer(), as: UTF8.self)
    for line in text.split(separator: "\n") where line.hasPrefix(sample + " ") {
        return Double(line.dropFirst(sample.count + 1).trimmingCharacters(in: .whitespaces))
    }
    return nil
}
