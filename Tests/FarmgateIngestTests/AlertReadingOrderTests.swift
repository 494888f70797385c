import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

/// Readings that arrive out of time order (the newest batch of a backlog first, or a batch a few seconds behind a newer
/// one), a flapping backlog, and `for` with a `clear` level: what the engine records and notifies.
@Suite("Alert evaluation of readings out of order, flapping backlogs and for with a clear level")
struct AlertReadingOrderTests {
    @Test(
        "a backlog sent after its newest batch: the late report ends the episode where the readings ended it, not when it was written",
        arguments: StoreKind.allCases)
    func lateReportNewestBatchFirst(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-high", "above") { $0.quantity = "ph"; $0.threshold = 6.5; $0.clear = 6.4 })
            let now = h.clock.now
            func at(_ seconds: Int64) -> Timestamp { Timestamp(microseconds: now.microseconds + seconds * 1_000_000) }
            // The newest batch first (pH fine), then the two-hour-old backlog under it: above 6.5 from -7000 s to -4000 s.
            try await h.send([(-2, 6.0), (-1, 6.0)], start: now, sequence: 11)
            try await h.send([(-7200, 6.0), (-7000, 6.9), (-6000, 6.9), (-5000, 6.9), (-4000, 6.0)], start: now, sequence: 1)
            #expect(try await h.outbox().isEmpty)
            h.clock.advance(seconds: 31)
            await h.engine.tick()
            let notifications = try await h.notifications()
            #expect(notifications.count == 1)
            let report = try #require(notifications.first)
            #expect(report.late && report.status == .resolved)
            #expect(report.startsAt == at(-7000))
            #expect(report.endsAt == at(-4000), "endsAt \(report.endsAt.map(RFC3339.format) ?? "nil")")
            #expect(report.transitions.map(\.state) == ["pending", "firing", "resolved"])
            let situation = NotificationText.situation(report, now: h.clock.now)
            #expect(situation == "Resolved at \(RFC3339.format(at(-4000))); it fired from \(RFC3339.format(at(-7000))) for 50m.", "\(situation)")
            #expect(report.description?.contains(" since ") == false)
            let alert = try #require(try await h.alerts().first)
            #expect(alert.state == "resolved")
            #expect(alert.startsAt == at(-7000) && alert.endsAt == at(-4000))
            #expect(alert.lateReportDue == nil)
            // Nothing more at the next tick; a live reading above the threshold starts a new episode, notified live.
            h.clock.advance(seconds: 60)
            await h.engine.tick()
            #expect(try await h.outbox().count == 1)
            try await h.send([(0, 7.0)], start: h.clock.now)
            let live = try await h.notifications()
            #expect(live.count == 2 && live.last?.status == .firing && live.last?.late == false)
        }
    }

    /// The harness's rule `ph-high` (above 6.5, clear 6.4) and an engine whose queue holds one batch, its rules loaded.
    static func queueOfOne(_ h: AlertHarness) async throws -> AlertEngine {
        try await h.rule(spec("ph-high", "above") { $0.quantity = "ph"; $0.threshold = 6.5; $0.clear = 6.4 })
        let clock = h.clock
        let engine = AlertEngine(
            store: h.store, settings: AlertEngine.Settings(lateAfter: .seconds(300), lateQuiet: .seconds(30), queueLimit: 1), logger: testLogger,
            now: { clock.now })
        await engine.reload()
        return engine
    }

    /// Past `queue_limit` a dropped batch is read back at the next tick; the device's later batches wait for it (see
    /// ``everyEarlierTransitionDropped(kind:)``).
    @Test(
        "batches the full queue dropped, judged after the device's later ones, leave a history in time order",
        arguments: StoreKind.allCases)
    func droppedBatchKeepsTheOrder(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            let engine = try await Self.queueOfOne(h)
            let now = h.clock.now
            func at(_ seconds: Int64) -> Timestamp { Timestamp(microseconds: now.microseconds + seconds * 1_000_000) }
            // Episodes: above the threshold at -70, -50, -30 and -10, below it in between.
            try await h.send([(-80, 6.0)], start: now, to: engine)
            try await h.send([(-70, 7.0)], start: now, to: engine)
            // Committed while the queue is full (its one place taken): dropped, read back at the next tick.
            for (seconds, value) in [(-60, 6.0), (-50, 7.0), (-40, 6.0)] as [(Int64, Double)] {
                let batch = try await h.send([(seconds, value)], start: now, feed: false)
                engine.committed(batch)
                engine.committed(batch)
            }
            // Later batches, taken from the queue before the catch-up.
            for (seconds, value) in [(-30, 7.0), (-20, 6.0), (-10, 7.0)] as [(Int64, Double)] {
                try await h.send([(seconds, value)], start: now, to: engine)
            }
            await engine.tick()
            h.clock.advance(seconds: 31)
            await engine.tick()
            let alert = try #require(try await h.alerts().first)
            #expect(alert.state == "firing")
            #expect(alert.startsAt == at(-10))
            let transitions = alert.transitions.sorted { $0.at < $1.at }
            // In time order, each transition starts where the one before ended.
            for (before, after) in zip(transitions, transitions.dropFirst()) {
                #expect(before.to == after.from, "\(transitions.map { "\($0.from)→\($0.to)@\($0.at.microseconds - now.microseconds)" })")
            }
            #expect(transitions.last?.to == "firing")
        }
    }

    /// A tester (2026-12-07) with ten devices and `queue_limit` exceeded: when every batch before a device's next one was
    /// dropped, that batch was judged from the queue as the alert's first ("inactive → pending" after the dropped
    /// episode's "resolved"), and the catch-up's replay could not take it back. Later batches of a device with dropped
    /// ones now wait for the catch-up, which judges them all in sequence order.
    @Test("a batch after batches the full queue dropped waits for the catch-up: the history is one chain, as in time order", arguments: StoreKind.allCases)
    func everyEarlierTransitionDropped(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            let engine = try await Self.queueOfOne(h)
            let now = h.clock.now
            func at(_ seconds: Int64) -> Timestamp { Timestamp(microseconds: now.microseconds + seconds * 1_000_000) }
            // Four batches committed while the queue's one place is taken: all dropped.
            for (seconds, value) in [(-40, 7.0), (-30, 6.0), (-20, 6.0), (-10, 6.0)] as [(Int64, Double)] {
                let batch = try await h.send([(seconds, value)], start: now, feed: false)
                engine.committed(batch)
                engine.committed(batch)
            }
            // The next batch comes through the queue before the tick's catch-up.
            try await h.send([(0, 7.0)], start: now, to: engine)
            await engine.tick()
            let alert = try #require(try await h.alerts().first)
            #expect(states(alert) == ["inactive>pending", "pending>firing", "firing>resolved", "resolved>pending", "pending>firing"])
            #expect(alert.transitions.map(\.at) == [at(-40), at(-40), at(-30), at(0), at(0)])
            #expect(alert.state == "firing" && alert.startsAt == at(0))
        }
    }

    /// A tester (2026-12-06): after a restart the device's newest judged reading (another sensor's) was taken as every
    /// sensor's, so the in-order readings of a sensor new to the engine went through the out-of-order replay, and one
    /// run split its report into two notifications, the newest first.
    @Test(
        "after a restart, in-order readings of a sensor with nothing stored before them are judged live, not replayed as out of order",
        arguments: StoreKind.allCases)
    func newSensorAfterRestartIsInOrder(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-high", "above") { $0.quantity = "ph"; $0.threshold = 6.5; $0.clear = 6.4 })
            let now = h.clock.now
            func at(_ seconds: Int64) -> Timestamp { Timestamp(microseconds: now.microseconds + seconds * 1_000_000) }
            // Another sensor of the device, judged up to +100 s by the first engine.
            try await h.send([(0, 6.0), (100, 6.0)], sensor: "tank1.ph", start: now)
            h.clock.advance(seconds: 101)
            let restarted = h.newEngine()
            await restarted.reload()
            // A sensor new to the rule, in time order, all of it before +100 s.
            try await h.send([(10, 6.9), (20, 6.0), (30, 6.9), (40, 6.0)], sensor: "tank3.ph", start: now, to: restarted)
            let alert = try #require(try await h.alerts().first { $0.sensor == "tank3.ph" })
            #expect(states(alert) == ["inactive>pending", "pending>firing", "firing>resolved", "resolved>pending", "pending>firing", "firing>resolved"])
            #expect(alert.transitions.map(\.at) == [at(10), at(10), at(20), at(30), at(30), at(40)])
            #expect(alert.transitions.allSatisfy { !$0.late })
            #expect(alert.lateReportDue == nil)
            let notifications = try await h.notifications()
            #expect(notifications.count == 1, "\(notifications.map { ($0.status, $0.transitions.count) })")
            #expect(notifications.allSatisfy { !$0.late })
            #expect(try await h.outbox().allSatisfy { !$0.idempotencyKey.contains("-late-") })
            // Nothing later either.
            h.clock.advance(seconds: 60)
            await restarted.tick()
            #expect(try await h.outbox().count == notifications.count)
        }
    }

    @Test(
        "a reading 20 s out of order (not late) is judged in time order at once: the episode it opens resolves at the newer reading, nothing late",
        arguments: StoreKind.allCases)
    func outOfOrderNotLate(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-high", "above") { $0.quantity = "ph"; $0.threshold = 6.5; $0.clear = 6.4 })
            let now = h.clock.now
            func at(_ seconds: Int64) -> Timestamp { Timestamp(microseconds: now.microseconds + seconds * 1_000_000) }
            try await h.send([(-1, 6.0)], start: now)
            h.clock.advance(seconds: 1)
            // The next sequence, taken 19 s before the newest reading: above the threshold from -20 s until -1 s.
            try await h.send([(-20, 6.9)], start: now)
            let alert = try #require(try await h.alerts().first)
            #expect(alert.state == "resolved", "\(alert.state)")
            #expect(states(alert) == ["inactive>pending", "pending>firing", "firing>resolved"])
            #expect(alert.transitions.map(\.at) == [at(-20), at(-20), at(-1)])
            #expect(alert.transitions.allSatisfy { !$0.late })
            #expect(alert.startsAt == at(-20) && alert.endsAt == at(-1))
            #expect(alert.lateReportDue == nil)
            let notifications = try await h.notifications()
            #expect(notifications.count == 1)
            let told = try #require(notifications.first)
            #expect(!told.late && told.status == .resolved)
            #expect(told.startsAt == at(-20) && told.endsAt == at(-1))
            #expect(told.description?.contains("reported late") == false)
            // Nothing more later.
            h.clock.advance(seconds: 60)
            await h.engine.tick()
            #expect(try await h.outbox().count == 1)
            #expect(try await h.alerts().first?.state == "resolved")
        }
    }

    @Test(
        "a reading out of order below the clear level under a firing alert resolves it where the readings say, and a newer one fires it again",
        arguments: StoreKind.allCases)
    func outOfOrderResolvesFiring(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-high", "above") { $0.quantity = "ph"; $0.threshold = 6.5; $0.clear = 6.4 })
            let now = h.clock.now
            func at(_ seconds: Int64) -> Timestamp { Timestamp(microseconds: now.microseconds + seconds * 1_000_000) }
            try await h.send([(-40, 7.0), (-1, 7.0)], start: now)
            #expect(try await h.alerts().first?.state == "firing")
            try await h.send([(-20, 6.0)], start: now)
            let alert = try #require(try await h.alerts().first)
            // In time order: firing at -40 s, resolved at -20 s, firing again at -1 s.
            #expect(alert.state == "firing")
            #expect(alert.startsAt == at(-1))
            #expect(alert.transitions.filter { $0.to == "resolved" }.map(\.at) == [at(-20)])
            #expect(alert.transitions.allSatisfy { !$0.late })
            let notifications = try await h.notifications()
            #expect(notifications.allSatisfy { !$0.late })
            #expect(notifications.last?.status == .firing)
        }
    }

    @Test("a late report of a probe flapping through a backlog is bounded: the newest transitions, counts and the span", arguments: StoreKind.allCases)
    func lateReportOfFlappingBacklogIsBounded(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-high", "above") { $0.quantity = "ph"; $0.threshold = 6.5; $0.clear = 6.4 })
            let now = h.clock.now
            // 600 readings two hours old, a second apart, above and below the threshold in turn: 300 episodes.
            let points = (Int64(0)..<600).map { index -> (seconds: Int64, value: Double) in (index - 7200, index % 2 == 0 ? 7.0 : 6.0) }
            try await h.send(points, start: now)
            h.clock.advance(seconds: 31)
            await h.engine.tick()
            let notifications = try await h.notifications()
            #expect(notifications.count == 1)
            let report = try #require(notifications.first)
            #expect(report.late && report.status == .resolved)
            #expect(report.transitions.count == AlertNotification.mergedTransitionsKept)
            let description = report.description ?? ""
            #expect(description.contains("300 episodes"), "\(description.prefix(300))")
            #expect(description.contains("fired 300 times, resolved 300 times"))
            #expect(description.count < 400, "\(description.count) characters")
            let body = try AlertmanagerWebhook(report, receiver: "grower", idempotencyKey: "k", externalURL: "", now: h.clock.now).encoded()
            #expect(body.count < 8_192, "\(body.count) bytes")
            // Every transition is still in the history.
            #expect(try await h.store.alertTransitions(alertIDs: [report.alertID]).count == 900)
        }
    }

    @Test("`for` with a clear level: pending needs the condition itself for all of `for`; the clear level only ends firing", arguments: StoreKind.allCases)
    func forWithClearLevel(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("hot", "above") { $0.threshold = 10; $0.clear = 8; $0.for = "10s" })
            // One reading above 10, then 9 (under the threshold, above the clear level) every 10 s: never fires.
            try await h.send([(0, 20)] + (Int64(1)...8).map { step -> (seconds: Int64, value: Double) in (step * 10, 9.0) })
            var alert = try await h.alerts().first
            #expect(states(alert) == ["inactive>pending", "pending>inactive"])
            #expect(try await h.outbox().isEmpty)
            // Above 10 for 10 s fires; 9 then keeps it firing (above the clear level); 7.5 resolves it.
            try await h.send([(100, 11), (110, 12), (120, 9), (130, 7.5)])
            alert = try await h.alerts().first
            #expect(
                states(alert) == ["inactive>pending", "pending>inactive", "inactive>pending", "pending>firing", "firing>resolved"])
            #expect(alert?.transitions.last?.value == 7.5)
        }
    }
}
