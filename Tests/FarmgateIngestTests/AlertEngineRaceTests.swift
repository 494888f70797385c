import FarmgateSupport
import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

/// Two instances (two engines on one store) evaluating one device's batches as a load balancer hands them out: each
/// batch is answered after its commit and evaluated after the answer, so the next batch, at the other instance, can be
/// evaluated before or while the previous one is (a tester's burst through nginx told 3 of 16 transitions and left
/// alerts firing). Each engine evaluates its own batches one after another, as its queue does in `serve`.
@Suite("Alert evaluation racing across instances")
struct AlertEngineRaceTests {
    /// The rule `ph-high` (pH above 6) and a second engine (another instance) on the harness's store, loaded.
    static func phHighWithSecondEngine(_ h: AlertHarness) async throws -> AlertEngine {
        try await h.rule(spec("ph-high", "above") { $0.quantity = "ph"; $0.threshold = 6 })
        let other = h.newEngine()
        await other.reload()
        return other
    }

    @Test("batches of one device alternating between two engines: every transition once, in reading order, the last state right", arguments: StoreKind.allCases)
    func alternatingBurst(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            let other = try await Self.phHighWithSecondEngine(h)
            let engines = [h.engine, other]
            let queues = engines.map { _ in AsyncStream.makeStream(of: CommittedBatch.self) }
            let sensors = (0..<4).map { "tank\($0).ph" }
            let start = h.clock.now
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (engine, queue) in zip(engines, queues) {
                    // Each engine a few milliseconds late at random, as a loaded instance is: the interleavings vary.
                    group.addTask {
                        for await batch in queue.stream {
                            try? await Task.sleep(for: .milliseconds(Int.random(in: 0...20)))
                            await engine.evaluate(batch)
                        }
                    }
                }
                var sequence: UInt64 = 1
                for index in 0..<16 {
                    let value = index % 2 == 0 ? 7.0 : 5.0
                    let at = Timestamp(microseconds: start.microseconds + Int64(index) * 1_000_000)
                    var descriptors: [SensorDescriptor] = []
                    var readings: [Reading] = []
                    for name in sensors {
                        let id = try sensorID(name)
                        descriptors.append(SensorDescriptor(id: id, quantity: .ph))
                        readings.append(Reading(sensor: id, sequence: sequence, timestamp: at, value: value, quality: []))
                        sequence += 1
                    }
                    let outcome = try await h.store.store(Batch(device: h.device.device, sensors: descriptors, readings: readings), for: h.device, receivedAt: h.clock.now)
                    // Answered, then evaluated: the next batch does not wait for this evaluation.
                    queues[index % 2].continuation.yield(CommittedBatch(device: h.device, receivedAt: h.clock.now, readings: outcome.fresh))
                }
                for queue in queues { queue.continuation.finish() }
                try await group.waitForAll()
            }
            // What `serve` does within a tick: catch-ups after conflicts, re-evaluations of readings out of order.
            for _ in 0..<2 {
                for engine in engines { await engine.tick() }
            }
            let alerts = try await h.alerts()
            #expect(alerts.count == sensors.count, "\(alerts.map { "\($0.sensor ?? "") \($0.state)" })")
            for alert in alerts {
                #expect(alert.state == "resolved", "\(alert.sensor ?? ""): \(alert.state) after its last reading 5.0")
                let firings = alert.transitions.filter { $0.to == "firing" }.map(\.at.microseconds)
                let resolutions = alert.transitions.filter { $0.to == "resolved" }.map(\.at.microseconds)
                // Fired at every even second, resolved at every odd one, each once.
                let even: [Int64] = (0..<8).map { start.microseconds + Int64($0) * 2_000_000 }
                let odd: [Int64] = even.map { $0 + 1_000_000 }
                let history = "\(alert.sensor ?? ""): \(states(alert))"
                #expect(firings == even, "\(history)")
                #expect(resolutions == odd, "\(history)")
            }
            let notified = try await h.store.alertOutbox(farmID: h.farmID)
            #expect(!notified.isEmpty)
        }
    }

    @Test("an engine's first batch of a device that another engine judged newer readings of, without writing an alert: its older readings are replayed in order", arguments: StoreKind.allCases)
    func firstEvaluationAfterAnotherEnginesSilentJudgement(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            let other = try await Self.phHighWithSecondEngine(h)
            let start = h.clock.now
            let id = try sensorID("tank1.ph")
            func batch(_ sequence: UInt64, second: Int64, _ value: Double) async throws -> CommittedBatch {
                let at = Timestamp(microseconds: start.microseconds + second * 1_000_000)
                let outcome = try await h.store.store(
                    Batch(device: h.device.device, sensors: [SensorDescriptor(id: id, quantity: .ph)], readings: [Reading(sensor: id, sequence: sequence, timestamp: at, value: value)]),
                    for: h.device, receivedAt: h.clock.now)
                return CommittedBatch(device: h.device, receivedAt: h.clock.now, readings: outcome.fresh)
            }
            let first = try await batch(1, second: 0, 7)
            let second = try await batch(2, second: 1, 5)
            // The second instance judges the newer reading first: no alert yet and 5 is not above 6, so it writes none.
            await other.evaluate(second)
            // Then this engine's first batch of the device, the older reading: told at once, without waiting for a
            // tick's catch-up (which would mend it up to 5 s later).
            await h.engine.evaluate(first)
            let alert = try #require(try await h.alerts().first)
            #expect(alert.state == "resolved", "\(states(alert))")
            #expect(alert.transitions.filter { $0.to == "firing" }.map(\.at.microseconds) == [start.microseconds], "\(states(alert))")
            #expect(alert.transitions.filter { $0.to == "resolved" }.map(\.at.microseconds) == [start.microseconds + 1_000_000], "\(states(alert))")
        }
    }

    @Test("the evaluation cursor moves only from the version read, keeps the newest time, and a refused move writes none of its changes", arguments: StoreKind.allCases)
    func cursorCompareAndSet(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            let device = h.device.rowID
            #expect(try await h.store.alertEvaluationCursor(deviceRowID: device) == AlertEvaluationCursor())
            let t1 = Timestamp(microseconds: testNow.microseconds + 1_000_000)
            let t0 = Timestamp(microseconds: testNow.microseconds)
            try await h.store.applyAlertChanges([], now: h.clock.now, durability: .immediate, advancing: AlertCursorAdvance(deviceRowID: device, expectedVersion: 0, newest: t1))
            #expect(try await h.store.alertEvaluationCursor(deviceRowID: device) == AlertEvaluationCursor(version: 1, newest: t1))
            // A second first writer (version 0 read before the first wrote) is refused.
            await #expect(throws: AlertStoreConflict.self) {
                try await h.store.applyAlertChanges([], now: h.clock.now, durability: .immediate, advancing: AlertCursorAdvance(deviceRowID: device, expectedVersion: 0, newest: t1))
            }
            // An older reading's evaluation moves the version, not the newest time.
            try await h.store.applyAlertChanges([], now: h.clock.now, durability: .withNextSyncedCommit, advancing: AlertCursorAdvance(deviceRowID: device, expectedVersion: 1, newest: t0))
            #expect(try await h.store.alertEvaluationCursor(deviceRowID: device) == AlertEvaluationCursor(version: 2, newest: t1))
            // A stale version with an alert to write: refused, and the alert not written.
            let record = AlertRecord(
                farmID: h.farmID, rule: "r", deviceRowID: device, sensorRowID: 0, device: "d1", sensor: nil, fingerprint: "f", state: .firing, updatedAt: h.clock.now)
            await #expect(throws: AlertStoreConflict.self) {
                try await h.store.applyAlertChanges(
                    [AlertChange(record: record)], now: h.clock.now, durability: .immediate, advancing: AlertCursorAdvance(deviceRowID: device, expectedVersion: 1, newest: t1))
            }
            #expect(try await h.store.alertRecords(deviceRowID: device).isEmpty)
            #expect(try await h.store.alertEvaluationCursor(deviceRowID: device).version == 2)
        }
    }
}
