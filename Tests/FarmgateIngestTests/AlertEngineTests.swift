import FarmgateTestSupport
import FarmgateWire
import Foundation
import Prometheus
import Testing

@testable import FarmgateIngest

@Suite("Alert engine on both stores")
struct AlertEngineTests {
    @Test("below with for and hysteresis: pending, firing only after `for`, clears only past the clear level; a short dip never fires", arguments: StoreKind.allCases)
    func thresholdForAndHysteresis(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5; $0.clear = 5.6; $0.for = "30m" })
            // A dip of 10 minutes: pending, then back to inactive; nothing notified.
            try await h.send([(0, 6.0), (60, 5.4), (600, 5.45), (660, 6.0)])
            var alert = try await h.alerts().first
            #expect(states(alert) == ["inactive>pending", "pending>inactive"])
            #expect(try await h.outbox().isEmpty)
            // A long dip: pending at 1000 s, still below the threshold at 2000 s, firing once 30 min passed. (The clear
            // level applies only to a firing alert: a pending one needs the condition itself for all of `for`.)
            try await h.send([(1_000, 5.4), (2_000, 5.45), (2_799, 5.3)])
            #expect(try await h.alerts().first?.state == "pending")
            try await h.send([(2_800, 5.3)])
            alert = try await h.alerts().first
            #expect(alert?.state == "firing")
            let fired = try await h.notifications()
            #expect(fired.map(\.status) == [.firing])
            #expect(fired.first?.summary == "d1 tank1.ph is below 5.5 (5.3)")
            #expect(fired.first?.labels["alertname"] == "ph-low")
            // 5.58 is above the threshold but below the clear level: still firing. 5.7 clears.
            try await h.send([(3_000, 5.58)])
            #expect(try await h.alerts().first?.state == "firing")
            try await h.send([(3_100, 5.7)])
            alert = try await h.alerts().first
            #expect(alert?.state == "resolved")
            #expect(states(alert) == ["inactive>pending", "pending>inactive", "inactive>pending", "pending>firing", "firing>resolved"])
            // Nothing delivers here, so the firing was still waiting when the alert resolved: one row tells both.
            let notifications = try await h.notifications()
            #expect(notifications.map(\.status) == [.resolved])
            #expect(notifications.first?.coalesced?.fired == 1 && notifications.first?.coalesced?.resolved == 1)
            #expect(notifications.first?.summary == "d1 tank1.ph is below 5.5 (5.7)")
            #expect(notifications.allSatisfy { !$0.late })
            let rows = try await h.outbox()
            #expect(rows.map(\.receiver) == ["grower"])
            #expect(rows.map(\.transitions) == [2])
            #expect(rows.allSatisfy { $0.state == "pending" })
            for (row, notification) in zip(rows, notifications) {
                #expect(row.idempotencyKey == notification.idempotencyKey(receiver: row.receiverID))
                #expect(row.transitionID == notification.transitionID && row.alertID == notification.alertID)
            }
        }
    }

    @Test("above, rate of change, sensor fault and out of range each fire and resolve", arguments: StoreKind.allCases)
    func readingRuleKinds(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("warm", "above") { $0.sensor = "*.temp"; $0.threshold = 24; $0.clear = 23.5 })
            try await h.rule(spec("ph-swing", "rate_of_change") { $0.quantity = "ph"; $0.threshold = 0.5; $0.window = "10m" })
            try await h.rule(spec("fault", "sensor_fault") { $0.count = 3; $0.sensor = "tank2.ec" })
            try await h.rule(spec("ec-band", "out_of_range") { $0.quantity = "ec"; $0.min = 1200; $0.max = 2000 })
            try await h.send([(0, 22), (10, 24.5), (20, 23.8), (30, 23.4)], sensor: "tank1.temp", quantity: .temperature)
            try await h.send([(0, 6.0), (300, 5.8), (500, 5.4), (2_000, 5.4), (2_500, 5.45)], sensor: "tank1.ph", quantity: .ph)
            try await h.send([(0, 1500), (10, 1500)], sensor: "tank2.ec", quantity: .electricalConductivity, flags: [.sensorFault])
            try await h.send([(20, 1500)], sensor: "tank2.ec", quantity: .electricalConductivity, flags: [.sensorFault])
            try await h.send([(30, 2100), (40, 1600)], sensor: "tank2.ec", quantity: .electricalConductivity)
            let byRule = Dictionary(grouping: try await h.alerts(), by: \.rule)
            #expect(states(byRule["warm"]?.first) == ["inactive>pending", "pending>firing", "firing>resolved"])
            #expect(byRule["warm"]?.first?.transitions.last?.value == 23.4)  // 23.8 was above the clear level
            #expect(states(byRule["ph-swing"]?.first) == ["inactive>pending", "pending>firing", "firing>resolved"])
            #expect(byRule["ph-swing"]?.first?.transitions[1].at == Timestamp(microseconds: testNow.microseconds + 500_000_000))
            #expect(states(byRule["fault"]?.first) == ["inactive>pending", "pending>firing", "firing>resolved"])
            #expect(states(byRule["ec-band"]?.first) == ["inactive>pending", "pending>firing", "firing>resolved"])
            #expect(byRule["ec-band"]?.first?.transitions[1].value == 2100)
            // Four alerts that each fired and resolved before anything was sent: a row each, telling both.
            #expect(try await h.outbox().map(\.transitions) == [2, 2, 2, 2])
        }
    }

    @Test("several alerts of one sensor, begun in different batches, each carry on from its own stored record and resolve once", arguments: StoreKind.allCases)
    func severalAlertsOfOneSensor(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            // Rules in an order unlike the order their alerts begin in; two that never fire sit between them.
            try await h.rule(spec("ph-high-7", "above") { $0.quantity = "ph"; $0.threshold = 7 })
            try await h.rule(spec("never-1", "above") { $0.quantity = "ph"; $0.threshold = 14 })
            try await h.rule(spec("ph-high-6", "above") { $0.quantity = "ph"; $0.threshold = 6 })
            try await h.rule(spec("never-2", "below") { $0.quantity = "ph"; $0.threshold = 0 })
            try await h.rule(spec("ph-high-6.5", "above") { $0.quantity = "ph"; $0.threshold = 6.5 })
            try await h.send([(0, 6.2), (10, 6.3)])  // ph-high-6 fires
            try await h.send([(20, 6.7), (30, 6.8)])  // ph-high-6.5 fires, ph-high-6 holds
            try await h.send([(40, 7.2), (50, 7.3)])  // ph-high-7 fires, the others hold
            try await h.send([(60, 7.4), (70, 6.9)])  // all hold, then 7 resolves
            try await h.send([(80, 5.0)])  // 6 and 6.5 resolve
            let byRule = Dictionary(grouping: try await h.alerts(), by: \.rule)
            #expect(byRule.keys.sorted() == ["ph-high-6", "ph-high-6.5", "ph-high-7"])
            for rule in ["ph-high-6", "ph-high-6.5", "ph-high-7"] {
                #expect(byRule[rule]?.count == 1, "\(rule)")
                #expect(states(byRule[rule]?.first) == ["inactive>pending", "pending>firing", "firing>resolved"], "\(rule)")
            }
            #expect(byRule["ph-high-7"]?.first?.transitions.last?.at == Timestamp(microseconds: h.clock.now.microseconds + 70_000_000))
            #expect(byRule["ph-high-6"]?.first?.transitions.last?.at == Timestamp(microseconds: h.clock.now.microseconds + 80_000_000))
            // Each alert's firing was still waiting when it resolved: one row per alert, telling both.
            let notifications = try await h.notifications()
            #expect(notifications.count == 3)
            #expect(Set(notifications.map { "\($0.labels["alertname"] ?? "")/\($0.status)" }).count == 3)
            #expect(notifications.allSatisfy { $0.status == .resolved && $0.coalesced?.fired == 1 && $0.coalesced?.resolved == 1 })
        }
    }

    @Test("no data, device offline and calibration overdue run on the timer and resolve when the cause goes", arguments: StoreKind.allCases)
    func timerRuleKinds(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("silent", "no_data") { $0.sensor = "tank1.ph"; $0.after = "15m" })
            try await h.rule(spec("offline", "device_offline") { $0.after = "10m"; $0.receivers = ["on-call"] })
            try await h.rule(spec("calibrate", "calibration_overdue") { $0.quantity = "ph"; $0.after = "30d" })
            try await h.send([(0, 6.0)])
            await h.engine.tick()
            #expect(try await h.alerts().isEmpty)
            h.clock.advance(seconds: 11 * 60)
            await h.engine.tick()
            #expect(try await h.alerts().map(\.rule) == ["offline"])
            h.clock.advance(seconds: 5 * 60)
            await h.engine.tick()
            #expect(Set(try await h.alerts().filter { $0.state == "firing" }.map(\.rule)) == ["offline", "silent"])
            try await h.send([(0, 6.1)])
            await h.engine.tick()
            #expect(try await h.alerts().filter { $0.state == "firing" }.isEmpty)
            // Each alert fired and resolved before anything was sent: one row each, telling both.
            let rows = try await h.outbox()
            #expect(rows.map(\.receiver).sorted() == ["grower", "on-call"])
            #expect(rows.map(\.transitions) == [2, 2])
            // Calibration: the sensor was first seen 16 minutes ago and never calibrated; 30 days later it is overdue
            // where the store keeps calibrations (SQLite; PostgreSQL gets them from the sensors work).
            h.clock.advance(seconds: 31 * 86_400)
            try await h.send([(0, 6.1)])
            await h.engine.tick()
            let overdue = try await h.alerts().first { $0.rule == "calibrate" }
            if h.store is any CalibrationStore {
                #expect(overdue?.state == "firing")
                // A calibration the circuit did not keep (Cal,? says 0 after a point) is no calibration: still overdue.
                let unkept = CalibrationEvent(
                    id: "cal-0", sensor: try sensorID("tank1.ph"), time: h.clock.now, circuit: "pH",
                    firmware: nil, points: [CalibrationEvent.Point(name: "mid", reference: 7, at: h.clock.now)], calibratedPoints: 0, slope: nil)
                _ = try await (h.store as? any CalibrationStore)?.storeCalibrations([unkept], for: h.device, receivedAt: h.clock.now)
                h.clock.advance(seconds: 600)
                await h.engine.tick()
                #expect(try await h.alerts().first { $0.rule == "calibrate" }?.state == "firing", "a calibration the circuit did not keep ended the overdue alert")
                let event = CalibrationEvent(
                    id: "cal-1", sensor: try sensorID("tank1.ph"), time: h.clock.now, circuit: "pH",
                    firmware: nil, points: [CalibrationEvent.Point(name: "mid", reference: 7, at: h.clock.now)], calibratedPoints: nil, slope: nil)
                _ = try await (h.store as? any CalibrationStore)?.storeCalibrations([event], for: h.device, receivedAt: h.clock.now)
                h.clock.advance(seconds: 600)
                await h.engine.tick()
                #expect(try await h.alerts().first { $0.rule == "calibrate" }?.state == "resolved")
            } else {
                #expect(overdue == nil)
            }
        }
    }

    @Test("a backlog arriving after its newest batch folds into one late notification that says what happened", arguments: StoreKind.allCases)
    func backlogFold(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5; $0.for = "10m" })
            let outage = Timestamp(microseconds: h.clock.now.microseconds - 3 * 3_600_000_000)
            // Live first: the newest readings arrive first (pH fine now)...
            try await h.send([(-10, 6.0), (0, 6.0)], start: h.clock.now)
            // ...then the backlog in three batches, oldest last: pH below 5.5 from +40 min to +100 min of the outage.
            try await h.send([(7_200, 6.0), (9_000, 6.0)], start: outage)
            try await h.send([(2_400, 5.3), (3_600, 5.2), (4_800, 5.3), (6_000, 6.0)], start: outage)
            try await h.send([(0, 6.0), (1_200, 6.0)], start: outage)
            #expect(try await h.outbox().isEmpty)
            var alert = try await h.alerts().first
            #expect(alert?.lateReportDue != nil)
            h.clock.advance(seconds: 10)
            await h.engine.tick()
            #expect(try await h.outbox().isEmpty)  // the backlog is not quiet yet
            h.clock.advance(seconds: 30)
            await h.engine.tick()
            let notifications = try await h.notifications()
            #expect(notifications.count == 1)
            let report = try #require(notifications.first)
            #expect(report.late)
            #expect(report.status == .resolved)
            #expect(report.transitions.map(\.state) == ["pending", "firing", "resolved"])
            #expect(report.description?.contains("tank1.ph below 5.5 from") == true)
            #expect(report.description?.hasSuffix("reported late") == true)
            alert = try await h.alerts().first
            #expect(alert?.state == "inactive" || alert?.state == "resolved")
            #expect(alert?.lateReportDue == nil)
            #expect(alert?.transitions.allSatisfy(\.late) == true)
            // Another tick writes nothing more.
            h.clock.advance(seconds: 60)
            await h.engine.tick()
            #expect(try await h.outbox().count == 1)
        }
    }

    @Test(
        "the newest batch of a backlog, sent first, starting in the middle of an episode: nothing live, one late report of the whole stretch in reading order",
        arguments: StoreKind.allCases)
    func newestBatchFirstMidEpisode(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5 })
            let outage = Timestamp(microseconds: h.clock.now.microseconds - 3_600_000_000)
            func at(_ seconds: Int64) -> Timestamp { Timestamp(microseconds: outage.microseconds + seconds * 1_000_000) }
            // Before the outage, live: pH fine.
            h.clock.set(outage)
            try await h.send([(0, 6.0)], sequence: 1)
            // An hour offline, a reading a minute: pH low from +600 to +1200 s and from +2880 to +3360 s.
            let points = (Int64(1)...60).map { minute -> (seconds: Int64, value: Double) in
                let seconds = minute * 60
                return (seconds, (600...1200).contains(seconds) || (2880...3360).contains(seconds) ? 5.0 : 6.0)
            }
            h.clock.set(at(3605))
            // Live first: the newest ten readings (+3060 s on, inside the second dip) arrive first, with a gap below them.
            // Judged alone they would fire at +3060 s (late) and resolve at +3420 s (185 s old: live).
            try await h.send(Array(points[50...]), start: outage, sequence: 52)
            #expect(try await h.outbox().isEmpty, "a transition of a batch above a gap was notified on its own")
            // Then the rest of the backlog, oldest first.
            try await h.send(Array(points[..<50]), start: outage, sequence: 2)
            #expect(try await h.outbox().isEmpty)
            h.clock.advance(seconds: 31)
            await h.engine.tick()
            let notifications = try await h.notifications()
            #expect(notifications.count == 1, "\(notifications.map { $0.transitions.map(\.state) })")
            let report = try #require(notifications.first)
            #expect(report.late && report.status == .resolved)
            // Both dips, as the readings in time order show them: the second fired at +2880 s, not at +3060 s.
            #expect(report.transitions.map(\.state) == ["pending", "firing", "resolved", "pending", "firing", "resolved"])
            #expect(report.transitions.map(\.at) == [at(600), at(600), at(1260), at(2880), at(2880), at(3420)])
            #expect(report.description?.hasSuffix("reported late") == true)
            h.clock.advance(seconds: 60)
            await h.engine.tick()
            #expect(try await h.notifications().count == 1)
            #expect(try await h.alerts().first?.lateReportDue == nil)
        }
    }

    @Test("a backlog in order after an outage is reported once, late; one that reaches the present folds into the live notification", arguments: StoreKind.allCases)
    func backlogInOrder(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5; $0.for = "10m" })
            let outage = Timestamp(microseconds: h.clock.now.microseconds - 2 * 3_600_000_000)
            // Two hours of readings in one batch, all late: a dip that ended, then one that still holds at the end.
            try await h.send([(0, 6.0), (600, 5.0), (1_800, 5.0), (2_400, 6.0), (4_000, 5.2), (6_000, 5.1)], start: outage)
            #expect(try await h.outbox().isEmpty)
            h.clock.advance(seconds: 31)
            await h.engine.tick()
            var notifications = try await h.notifications()
            #expect(notifications.count == 1)
            #expect(notifications.first?.late == true)
            #expect(notifications.first?.status == .firing)
            #expect(notifications.first?.transitions.map(\.state) == ["pending", "firing", "resolved", "pending", "firing"])
            #expect(notifications.first?.description?.contains(" since ") == true)
            #expect(try await h.alerts().first?.state == "firing")
            // A live reading that clears it is notified at once, not late.
            try await h.send([(0, 6.0)], start: h.clock.now)
            notifications = try await h.notifications()
            #expect(notifications.count == 2)
            #expect(notifications.last?.status == .resolved && notifications.last?.late == false)
            // Another tank: pending in the backlog, firing with a live reading of the same batch: one notification, late.
            try await h.send([(6_000, 5.0), (7_000, 5.0)], sensor: "tank2.ph", start: outage)
            notifications = try await h.notifications()
            #expect(notifications.count == 3)
            let folded = try #require(notifications.last)
            #expect(folded.late && folded.status == .firing)
            #expect(folded.transitions.map(\.state) == ["pending", "firing"])
            #expect(folded.description?.hasSuffix("reported late") == true)
            h.clock.advance(seconds: 60)
            await h.engine.tick()
            #expect(try await h.outbox().count == 3)
        }
    }

    @Test(
        "a late report written after a live notification of the same alert is its own notification, not a repeat of the live one's key",
        arguments: StoreKind.allCases)
    func lateReportAfterLiveNotification(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5; $0.clear = 5.6 })
            let outage = Timestamp(microseconds: h.clock.now.microseconds - 3_600_000_000)
            // The backlog, in order: a dip that came and went while the site was offline (recorded, not notified).
            try await h.send([(0, 6.0), (600, 5.0), (1_200, 6.0), (1_800, 6.0)], start: outage)
            #expect(try await h.outbox().isEmpty)
            // Before the backlog is quiet, a live reading fires the alert: notified at once, at the alert's newest transition.
            try await h.send([(0, 5.0)], start: h.clock.now)
            var notifications = try await h.notifications()
            #expect(notifications.count == 1)
            #expect(notifications.first?.late == false && notifications.first?.status == .firing)
            // The late report tells of the dip: a notification of its own, with a key of its own.
            h.clock.advance(seconds: 31)
            await h.engine.tick()
            notifications = try await h.notifications()
            #expect(notifications.count == 2, "the late report was lost: \(notifications.map { ($0.late, $0.status) })")
            let late = notifications.filter(\.late)
            let report = try #require(late.first)
            #expect(report.transitions.map(\.state) == ["pending", "firing", "resolved"], "\(report.transitions)")
            let keys = try await h.outbox().map(\.idempotencyKey)
            #expect(Set(keys).count == keys.count, "\(keys)")
            // Nothing more at the next tick.
            h.clock.advance(seconds: 60)
            await h.engine.tick()
            #expect(try await h.outbox().count == 2)
        }
    }

    // A tester, 2026-12-07: an alert notified firing live, whose backlog then only resolved it, was left firing at the
    // receiver: the late report was written without a notification ("nothing is notified for a backlog in which the
    // condition never fired"), though the firing had been told.
    @Test("a backlog that only resolves an alert notified firing before sends a late resolved notification", arguments: StoreKind.allCases)
    func lateResolutionOfANotifiedFiring(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5 })
            let firedAt = Timestamp(microseconds: h.clock.now.microseconds - 10_000_000)
            try await h.send([(0, 5.0)], start: firedAt)
            var notifications = try await h.notifications()
            #expect(notifications.map(\.status) == [.firing] && notifications.first?.late == false)
            // The site goes offline; what it read after the firing arrives ten minutes later: the dip ended.
            h.clock.advance(seconds: 600)
            try await h.send([(5, 6.0), (15, 6.0)], start: firedAt)
            h.clock.advance(seconds: 31)
            await h.engine.tick()
            notifications = try await h.notifications()
            #expect(notifications.count == 2, "\(notifications.map { ($0.late, $0.status) })")
            let report = try #require(notifications.last)
            #expect(report.late && report.status == .resolved, "\(report)")
            #expect(report.transitions.map(\.state) == ["resolved"], "\(report.transitions)")
            // A backlog in which the condition never fired still sends nothing.
            try await h.rule(spec("ph-high", "above") { $0.quantity = "ph"; $0.threshold = 9 })
            h.clock.advance(seconds: 600)
            try await h.send([(0, 6.1), (10, 6.2)], start: Timestamp(microseconds: h.clock.now.microseconds - 500_000_000))
            h.clock.advance(seconds: 31)
            await h.engine.tick()
            #expect(try await h.notifications().count == 2)
        }
    }

    // A tester, 2026-12-07: a float switch stores only its changes and a 15-minute heartbeat, and a `for = "10s"` alert
    // on it fired only at the heartbeat, 15 minutes late.
    @Test("a pending alert on a state sensor fires on the timer once its for has passed with no reading; once, and resolves at the next change", arguments: StoreKind.allCases)
    func heldStateFiresOnTheTimer(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("reservoir-low", "below") { $0.quantity = "state"; $0.threshold = 0.5; $0.for = "10s" })
            let changed = h.clock.now
            try await h.send([(-60, 1), (0, 0)], sensor: "tank1.float", quantity: .state, start: changed)
            #expect(states(try await h.alerts().first) == ["inactive>pending"])
            h.clock.advance(seconds: 20)  // `for` passed, but readings may still be on their way
            await h.engine.tick()
            #expect(states(try await h.alerts().first) == ["inactive>pending"])
            h.clock.advance(seconds: 30)
            await h.engine.tick()
            let alert = try #require(try await h.alerts().first)
            #expect(states(alert) == ["inactive>pending", "pending>firing"])
            #expect(alert.transitions.last?.at == Timestamp(microseconds: changed.microseconds + 10_000_000), "fires when `for` ended")
            var notifications = try await h.notifications()
            #expect(notifications.map(\.status) == [.firing] && notifications.first?.late == false)
            // Later ticks and the heartbeat (still 0) change nothing; the next change resolves it.
            h.clock.advance(seconds: 60)
            await h.engine.tick()
            try await h.send([(0, 0)], sensor: "tank1.float", quantity: .state, start: h.clock.now)
            h.clock.advance(seconds: 5)
            try await h.send([(0, 1)], sensor: "tank1.float", quantity: .state, start: h.clock.now)
            await h.engine.tick()
            #expect(states(try await h.alerts().first) == ["inactive>pending", "pending>firing", "firing>resolved"])
            // (The firing row, never sent here, takes the resolution: the outbox merges a flapping alert's changes.)
            notifications = try await h.notifications()
            #expect(notifications.last?.status == .resolved && notifications.count <= 2, "\(notifications.map(\.status))")
            // A pH sensor (read on an interval) still waits for its next reading.
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5; $0.for = "10s" })
            try await h.send([(0, 5.0)], start: h.clock.now)
            h.clock.advance(seconds: 120)
            await h.engine.tick()
            let ph = try await h.alerts().first { $0.rule == "ph-low" }
            #expect(ph?.state == "pending", "\(String(describing: ph?.state))")
        }
    }

    @Test("after a crash between commit and evaluation the next engine catches up from the watermark, once", arguments: StoreKind.allCases)
    func restartCatchUp(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5 })
            try await h.send([(0, 6.0), (10, 5.0)])
            await h.engine.saveWatermarks()
            #expect(try await h.outbox().count == 1)
            // Committed, never evaluated: the process died.
            try await h.send([(20, 6.0), (30, 5.1)], feed: false)
            let restarted = h.newEngine()
            await restarted.tick()
            #expect(states(try await h.alerts().first) == ["inactive>pending", "pending>firing", "firing>resolved", "resolved>pending", "pending>firing"])
            // Nothing was sent: the one row tells the three firings and resolutions.
            #expect(try await h.outbox().map(\.transitions) == [3])
            // A third engine finds nothing left to evaluate.
            await restarted.saveWatermarks()
            let third = h.newEngine()
            await third.tick()
            #expect(try await h.outbox().map(\.transitions) == [3])
            #expect(try await h.alerts().first?.transitions.count == 5)
        }
    }

    @Test("silenced alerts change state without notifications; acknowledging records who", arguments: StoreKind.allCases)
    func silenceAndAcknowledge(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5 })
            let silence = try await h.admin.addSilence(
                farm: "f1", matchers: ["alertname": "ph-*", "device": "d1"], until: Timestamp(microseconds: h.clock.now.microseconds + 3_600_000_000),
                comment: "probe swap", by: "tester", now: h.clock.now)
            await h.engine.reload()
            try await h.send([(0, 5.0), (10, 6.0)])
            var alert = try await h.alerts().first
            #expect(alert?.state == "resolved")
            #expect(alert?.transitions.filter { $0.to != "pending" }.allSatisfy(\.silenced) == true)
            #expect(try await h.outbox().isEmpty)
            try await h.admin.removeSilence(farm: "f1", id: silence)
            await h.engine.reload()
            try await h.send([(20, 5.0)])
            #expect(try await h.outbox().map(\.transitions) == [1])
            alert = try await h.alerts().first
            try await h.admin.acknowledge(farm: "f1", alertID: try #require(alert?.id), by: "grower-anna")
            alert = try await h.alerts().first
            #expect(alert?.acknowledgedBy == "grower-anna")
            #expect(alert?.state == "firing")
            // The engine works from the stored row, version included: the next transition still lands.
            try await h.send([(30, 6.0)])
            #expect(try await h.alerts().first?.state == "resolved")
            #expect(try await h.outbox().map(\.transitions) == [2])
            await #expect(throws: IngestStoreError.self) { try await h.admin.acknowledge(farm: "f2", alertID: try #require(alert?.id), by: "x") }
        }
    }

    @Test("an alert that fired under a silence is not told resolved once the silence is over: its receivers never heard it fire", arguments: StoreKind.allCases)
    func resolvedAfterTheSilence(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5 })
            _ = try await h.admin.addSilence(
                farm: "f1", matchers: ["alertname": "ph-low"], until: Timestamp(microseconds: h.clock.now.microseconds + 60_000_000),
                comment: "probe swap", by: "tester", now: h.clock.now)
            await h.engine.reload()
            try await h.send([(0, 5.0)])
            #expect(try await h.alerts().first?.state == "firing")
            #expect(try await h.outbox().isEmpty)
            // The silence ends; the alert resolves: recorded, marked silenced, told to nobody.
            h.clock.advance(seconds: 120)
            try await h.send([(0, 6.0)])
            var alert = try await h.alerts().first
            #expect(alert?.state == "resolved")
            #expect(alert?.transitions.last?.to == "resolved" && alert?.transitions.last?.silenced == true, "\(states(alert))")
            #expect(try await h.outbox().isEmpty)
            // The next episode, after the silence, is told whole.
            try await h.send([(10, 5.0)])
            try await h.send([(20, 6.0)])
            alert = try await h.alerts().first
            #expect(alert?.transitions.suffix(2).map(\.silenced) == [false, false], "\(states(alert))")
            #expect(try await h.outbox().map(\.transitions) == [2])
        }
    }

    @Test("one outbox row per transition and receiver, even when two engines evaluate the same batch", arguments: StoreKind.allCases)
    func outboxExactlyOnce(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            // A receiver removed (with --force) after the rule named it: skipped. The admin path refuses such a rule.
            let rule = try spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5; $0.receivers = ["grower", "on-call", "not-there"] }.validated()
            await #expect(throws: AlertRuleError.self) { try await h.admin.putRule(farm: "f1", rule, replace: true) }
            try await h.store.putAlertRule(farmID: try await h.admin.farm("f1").id, rule: rule, replace: true, at: .now())
            await h.engine.reload()
            let other = h.newEngine()
            await other.reload()
            let batch = try await h.send([(0, 6.0), (10, 5.0)], feed: false)
            async let first: Void = h.engine.evaluate(batch)
            async let second: Void = other.evaluate(batch)
            _ = await (first, second)
            #expect(states(try await h.alerts().first) == ["inactive>pending", "pending>firing"])
            let rows = try await h.outbox()
            #expect(rows.map(\.receiver).sorted() == ["grower", "on-call"])
            #expect(Set(rows.map(\.idempotencyKey)).count == 2)
            // The same batch again (a feed delivered twice): nothing new.
            await h.engine.evaluate(batch)
            #expect(try await h.outbox().count == 2)
        }
    }

    @Test("a restart in the middle of a fault run or a rate window fires at the same reading as one engine would", arguments: StoreKind.allCases)
    func memoryAcrossRestart(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("fault", "sensor_fault") { $0.count = 3; $0.sensor = "tank2.ec" })
            try await h.rule(spec("ph-swing", "rate_of_change") { $0.quantity = "ph"; $0.threshold = 0.5; $0.window = "10m" })
            // Two flagged EC readings and a pH that moved 0.2 within the window, evaluated by the first engine.
            try await h.send([(0, 1500), (10, 1500)], sensor: "tank2.ec", quantity: .electricalConductivity, flags: [.sensorFault])
            try await h.send([(0, 6.0), (300, 5.8)], sensor: "tank1.ph", quantity: .ph)
            #expect(try await h.alerts().isEmpty)
            // The process restarts: the next engine has never seen those readings.
            let restarted = h.newEngine()
            await restarted.reload()
            // The third flagged reading completes the run of 3; 5.45 is 0.55 below the 6.0 of 400 s before.
            try await h.send([(20, 1500)], sensor: "tank2.ec", quantity: .electricalConductivity, flags: [.sensorFault], to: restarted)
            try await h.send([(400, 5.45)], sensor: "tank1.ph", quantity: .ph, to: restarted)
            let byRule = Dictionary(grouping: try await h.alerts(), by: \.rule)
            #expect(states(byRule["fault"]?.first) == ["inactive>pending", "pending>firing"])
            #expect(byRule["fault"]?.first?.transitions.last?.at == Timestamp(microseconds: testNow.microseconds + 20_000_000))
            #expect(states(byRule["ph-swing"]?.first) == ["inactive>pending", "pending>firing"])
            #expect(byRule["ph-swing"]?.first?.transitions.last?.at == Timestamp(microseconds: testNow.microseconds + 400_000_000))
            // Outside the window (more than 10 minutes after 6.0 and 5.8) the swing is only 5.45 → 5.3: resolved.
            try await h.send([(1_000, 5.3)], sensor: "tank1.ph", quantity: .ph, to: restarted)
            #expect(try await h.alerts().first { $0.rule == "ph-swing" }?.state == "resolved")
        }
    }

    @Test("two instances taking turns with one device's batches share its fault run and rate window", arguments: StoreKind.allCases)
    func memoryAcrossInstances(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("fault", "sensor_fault") { $0.count = 3; $0.sensor = "tank2.ec" })
            try await h.rule(spec("ph-swing", "rate_of_change") { $0.quantity = "ph"; $0.threshold = 0.5; $0.window = "10m" })
            let other = h.newEngine()
            await other.reload()
            // A: one flagged, B: one flagged, A: one flagged → the run of 3 is complete at A's second batch.
            try await h.send([(0, 1500)], sensor: "tank2.ec", quantity: .electricalConductivity, flags: [.sensorFault])
            try await h.send([(10, 1500)], sensor: "tank2.ec", quantity: .electricalConductivity, flags: [.sensorFault], to: other)
            #expect(try await h.alerts().isEmpty)
            try await h.send([(20, 1500)], sensor: "tank2.ec", quantity: .electricalConductivity, flags: [.sensorFault])
            // A clean reading at B ends the run: a new flagged one at A starts from 1, not from A's remembered 3.
            try await h.send([(30, 1500)], sensor: "tank2.ec", quantity: .electricalConductivity, to: other)
            try await h.send([(40, 1500)], sensor: "tank2.ec", quantity: .electricalConductivity, flags: [.sensorFault])
            let fault = try await h.alerts().first { $0.rule == "fault" }
            #expect(states(fault) == ["inactive>pending", "pending>firing", "firing>resolved"])
            #expect(fault?.transitions[1].at == Timestamp(microseconds: testNow.microseconds + 20_000_000))
            // pH: 6.0 at A, 5.6 at B (0.4: nothing), 6.15 at A: 0.55 only with B's reading in A's window.
            try await h.send([(0, 6.0)], sensor: "tank1.ph", quantity: .ph)
            try await h.send([(300, 5.6)], sensor: "tank1.ph", quantity: .ph, to: other)
            #expect(try await h.alerts().first { $0.rule == "ph-swing" } == nil)
            try await h.send([(400, 6.15)], sensor: "tank1.ph", quantity: .ph)
            let swing = try await h.alerts().first { $0.rule == "ph-swing" }
            #expect(states(swing) == ["inactive>pending", "pending>firing"])
            #expect(swing?.transitions.last?.at == Timestamp(microseconds: testNow.microseconds + 400_000_000))
        }
    }

    @Test("the engine wakes this instance's delivery workers: a notification goes out long before a 30 s poll", arguments: StoreKind.allCases)
    func engineWakesDelivery(kind: StoreKind) async throws {
        let server = try TestHTTPServer { _, _ in .reply(200) }
        defer { server.stop() }
        try await AlertHarness.with(kind) { h in
            guard let outbox = h.store as? any NotificationOutboxStore else { throw IngestStoreError.notFound("an outbox role") }
            _ = try await AlertDeliveryAdmin(store: outbox).addReceiver(
                farm: "f1", AlertReceiverSpec(name: "hook", kind: .webhook, url: server.url, maxPerMinute: 100_000))
            var settings = fastNotify()
            settings.pollInterval = .seconds(30)
            let delivery = try NotificationDelivery(store: outbox, configuration: settings, logger: testLogger)
            let clock = h.clock
            let engine = AlertEngine(
                store: h.store, settings: AlertEngine.Settings(lateAfter: .seconds(300), lateQuiet: .seconds(30)), logger: testLogger, now: { clock.now },
                notificationsWritten: { delivery.wake() })
            try await h.admin.putRule(farm: "f1", try spec("ph-low", "below") { $0.threshold = 5.5; $0.receivers = ["hook"] }.validated(), replace: true)
            await engine.reload()
            try await withDelivery(delivery) {
                // The workers looked at the empty outbox when they started; their next poll is 30 s away.
                try await Task.sleep(for: .milliseconds(500))
                let written = ContinuousClock.now
                try await h.send([(0, 5.0)], to: engine)
                #expect(try await h.outbox().count == 1)
                // The poll would send it about 29.5 s after it was written; 20 s leaves a loaded CI machine room and
                // still tells the wake-up from the poll.
                let delivered = await eventually(timeout: .seconds(20)) { server.requests.count == 1 }
                #expect(delivered, "the notification waited for the poll")
                #expect(ContinuousClock.now - written < .seconds(20))
                // The delivery is recorded before these workers stop: a row left `delivering` would be sent again
                // once its claim expires, by the idle workers below.
                let recorded = try await eventually(timeout: .seconds(20)) { try await h.outbox().first?.state == "delivered" }
                #expect(recorded, "the delivery was not recorded")
            }
            // Without the wake-up the same row waits for the poll: a second engine that does not wake anyone.
            let quiet = h.newEngine()
            await quiet.reload()
            let registry = PrometheusCollectorRegistry()
            let idle = try NotificationDelivery(store: outbox, configuration: settings, metrics: NotificationMetrics(registry: registry), logger: testLogger)
            try await withDelivery(idle) {
                // The workers' first look at the outbox (a claim, then the outbox counts: the one row delivered above)
                // must come before the row is written, or it would deliver the row at once. A fixed wait was not
                // always long enough on a loaded machine; the counts in the metrics say when the look happened.
                let looked = await eventually(timeout: .seconds(60)) { metric(registry, #"farmgate_ingest_notification_outbox{state="delivered"}"#) == 1 }
                try #require(looked, "the idle workers never looked at the outbox")
                try await h.send([(10, 6.0)], to: quiet)
                try await Task.sleep(for: .seconds(2))
                #expect(server.requests.count == 1, "a row written without a wake-up is delivered at the next poll, not at once")
            }
        }
    }
}
