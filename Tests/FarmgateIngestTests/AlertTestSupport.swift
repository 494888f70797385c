import FarmgateSupport
import FarmgateWire
import Foundation
import PostgresNIO
import Synchronization
import Testing

@testable import FarmgateIngest

/// A clock the test moves by hand.
final class TestClock: Sendable {
    private let current: Mutex<Timestamp>
    init(_ start: Timestamp) { current = Mutex(start) }
    var now: Timestamp { current.withLock { $0 } }
    func set(_ time: Timestamp) { current.withLock { $0 = time } }
    func advance(seconds: Int64) { current.withLock { $0 = Timestamp(microseconds: $0.microseconds + seconds * 1_000_000) } }
}

/// A store of `kind` with farm `f1` (device `d1`, receivers `grower` and `on-call`) and farm `f2` (device `e1`), the engine
/// on a test clock (5 min late threshold, 30 s quiet), and helpers to store and feed readings.
struct AlertHarness: Sendable {
    let store: any IngestStore & AlertStore
    let clock: TestClock
    let engine: AlertEngine
    let device: DeviceIdentity
    let farmID: Int64
    let admin: AlertAdmin

    static func with<T: Sendable>(_ kind: StoreKind, start: Timestamp = testNow, _ body: @Sendable (AlertHarness) async throws -> T) async throws -> T {
        try await withFreshStore(kind) { base in
            guard let store = base as? any IngestStore & AlertStore else { throw IngestStoreError.notFound("alerting") }
            let ingestAdmin = IngestAdmin(store: store)
            let farm = try await ingestAdmin.createFarm(name: "f1")
            _ = try await ingestAdmin.createFarm(name: "f2")
            _ = try await ingestAdmin.createDevice(farm: "f1", device: try deviceID("d1"))
            _ = try await ingestAdmin.createDevice(farm: "f2", device: try deviceID("e1"))
            guard let device = try await store.devices(farmID: farm.id).first else { throw IngestStoreError.notFound("d1") }
            try await addReceiver(store, farmID: farm.id, name: "grower")
            try await addReceiver(store, farmID: farm.id, name: "on-call")
            let clock = TestClock(start)
            let engine = AlertEngine(store: store, settings: AlertEngine.Settings(lateAfter: .seconds(300), lateQuiet: .seconds(30)), logger: testLogger, now: { clock.now })
            return try await body(AlertHarness(store: store, clock: clock, engine: engine, device: device, farmID: farm.id, admin: AlertAdmin(store: store)))
        }
    }

    /// A second engine on the same store and clock (another instance, or the same one after a restart).
    func newEngine() -> AlertEngine {
        let clock = self.clock
        return AlertEngine(store: store, settings: AlertEngine.Settings(lateAfter: .seconds(300), lateQuiet: .seconds(30)), logger: testLogger, now: { clock.now })
    }

    /// Adds a rule from TOML-like fields and reloads the engine.
    func rule(_ spec: AlertRuleSpec) async throws {
        try await admin.putRule(farm: "f1", try spec.validated(), replace: true)
        await engine.reload()
    }

    /// Stores readings of `sensor` (values at the given seconds after `start`) as one batch received at the clock's now,
    /// and hands what was stored to `engine` (unless `feed` is false: the process "died" before evaluating). The
    /// readings are numbered from `sequence` (default: after the device's highest stored one).
    @discardableResult
    func send(
        _ points: [(seconds: Int64, value: Double)], sensor: String = "tank1.ph", quantity: Quantity = .ph, start: Timestamp? = nil,
        flags: QualityFlags = [], feed: Bool = true, to engine: AlertEngine? = nil, sequence: UInt64? = nil
    ) async throws -> CommittedBatch {
        let id = try sensorID(sensor)
        let origin = start ?? clock.now
        var first = (try await store.highestSequence(device: device) ?? 0) + 1
        if let sequence { first = sequence }
        let readings = points.enumerated().map { offset, point in
            Reading(sensor: id, sequence: first + UInt64(offset), timestamp: Timestamp(microseconds: origin.microseconds + point.seconds * 1_000_000), value: point.value, quality: flags)
        }
        let outcome = try await store.store(Batch(device: device.device, sensors: [SensorDescriptor(id: id, quantity: quantity)], readings: readings), for: device, receivedAt: clock.now)
        let batch = CommittedBatch(device: device, receivedAt: clock.now, readings: outcome.fresh)
        if feed { await (engine ?? self.engine).evaluate(batch) }
        return batch
    }

    func alerts() async throws -> [AlertView] { try await admin.alerts(farm: "f1", recent: .seconds(366 * 86_400), now: clock.now) }

    func outbox() async throws -> [AlertOutboxRow] { try await store.alertOutbox(farmID: farmID) }

    func notifications() async throws -> [AlertNotification] {
        try await outbox().map { try JSONDecoder().decode(AlertNotification.self, from: Data($0.payload.utf8)) }
    }
}

func spec(_ name: String, _ kind: String, configure: (inout AlertRuleSpec) -> Void = { _ in }) -> AlertRuleSpec {
    var spec = AlertRuleSpec()
    spec.name = name
    spec.kind = kind
    spec.receivers = ["grower"]
    configure(&spec)
    return spec
}

/// Inserts a receiver row directly (receiver management is the delivery side's command).
func addReceiver(_ store: any IngestStore, farmID: Int64, name: String) async throws {
    switch store {
    case let sqlite as SQLiteIngestStore:
        _ = try await sqlite.writer.withValue { db in
            try db.connection.query(
                "INSERT INTO alert_receivers(farm_id, name, kind, url, created_at_us) VALUES (?, ?, 'webhook', 'http://127.0.0.1:9/hook', 0)",
                [.integer(farmID), .text(name)])
        }
    case let postgres as PostgresIngestStore:
        _ = try await postgres.rows(
            "INSERT INTO alert_receivers(farm_id, name, kind, url, created_at_us) VALUES (\(farmID), \(name), 'webhook', 'http://127.0.0.1:9/hook', 0) RETURNING id"
        ) { try $0.decode(Int64.self) }
    default:
        throw IngestStoreError.notFound("a store that keeps receivers")
    }
}

/// Marks every pending outbox row delivered at `at` (after one attempt), as a receiver that kept up would have taken
/// them: the next notification of their alerts is then a row of its own, not merged into them.
func markOutboxDelivered(_ store: any IngestStore, at: Timestamp) async throws {
    switch store {
    case let sqlite as SQLiteIngestStore:
        _ = try await sqlite.writer.withValue { db in
            try db.connection.query(
                """
                UPDATE alert_outbox SET state = 'delivered', attempts = 1, claimed_by = 'test', last_attempt_at_us = ?, delivered_at_us = ?
                WHERE state = 'pending'
                """, [.integer(at.microseconds), .integer(at.microseconds)])
        }
    case let postgres as PostgresIngestStore:
        _ = try await postgres.rows(
            """
            UPDATE alert_outbox SET state = 'delivered', attempts = 1, claimed_by = 'test', last_attempt_at_us = \(at.microseconds),
                delivered_at_us = \(at.microseconds) WHERE state = 'pending' RETURNING id
            """
        ) { try $0.decode(Int64.self) }
    default:
        throw IngestStoreError.notFound("a store that keeps an outbox")
    }
}

func states(_ alert: AlertView?) -> [String] { alert?.transitions.map { "\($0.from)>\($0.to)" } ?? [] }
