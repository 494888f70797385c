import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

/// What happens to alerts when their rule is removed, added again or given other receivers, and to offline rules when
/// the ingest itself was down.
@Suite("Alerts across rule changes and ingest restarts")
struct AlertRuleChangeTests {
    @Test("removing a rule ends its firing alert with a resolve to its receivers; the rule added again starts a new episode", arguments: StoreKind.allCases)
    func removedRuleEndsItsAlerts(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("hot", "above") { $0.threshold = 10 })
            try await h.send([(0, 20)])
            #expect(try await h.alerts().first?.state == "firing")
            try await markOutboxDelivered(h.store, at: h.clock.now)
            try await h.admin.removeRule(farm: "f1", name: "hot")
            h.clock.advance(seconds: 5)
            await h.engine.reload()
            var alert = try #require(try await h.alerts().first)
            #expect(alert.state == "resolved", "\(alert.state)")
            #expect(alert.endsAt == h.clock.now)
            var notifications = try await h.notifications()
            #expect(notifications.map(\.status) == [.firing, .resolved])
            #expect(notifications.last?.description?.contains("rule hot was removed") == true)
            #expect(try await h.outbox().map(\.receiver) == ["grower", "grower"])
            // Nothing more at the next reload; readings without the rule change nothing.
            await h.engine.reload()
            try await h.send([(10, 5)])
            #expect(try await h.outbox().count == 2)
            // Added again: a new episode, notified as one.
            try await markOutboxDelivered(h.store, at: h.clock.now)
            try await h.rule(spec("hot", "above") { $0.threshold = 10 })
            try await h.send([(20, 30)])
            alert = try #require(try await h.alerts().first)
            #expect(alert.state == "firing")
            notifications = try await h.notifications()
            #expect(notifications.map(\.status) == [.firing, .resolved, .firing])
        }
    }

    @Test("a rule's receivers changed while its alert fires: the dropped one is told it ends for it, the added one that it fires", arguments: StoreKind.allCases)
    func receiverChangeHandsOver(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("hot", "above") { $0.threshold = 10 })
            try await h.send([(0, 20)])
            try await markOutboxDelivered(h.store, at: h.clock.now)
            // Another instance that knew the rule before the change.
            let other = h.newEngine()
            await other.reload()
            try await h.rule(spec("hot", "above") { $0.threshold = 10; $0.receivers = ["on-call"] })
            h.clock.advance(seconds: 3)
            await other.reload()
            var rows = try await h.outbox()
            // Told once, although both instances saw the change.
            #expect(rows.map(\.receiver) == ["grower", "grower", "on-call"])
            var notifications = try await h.notifications()
            #expect(notifications.map(\.status) == [.firing, .resolved, .firing])
            #expect(Set(rows.map(\.idempotencyKey)).count == 3)
            try await markOutboxDelivered(h.store, at: h.clock.now)
            // The alert resolves: told to on-call, which saw it fire, and not to grower again.
            try await h.send([(10, 5)])
            rows = try await h.outbox()
            notifications = try await h.notifications()
            #expect(rows.map(\.receiver) == ["grower", "grower", "on-call", "on-call"])
            #expect(notifications.last?.status == .resolved)
            #expect(try await h.alerts().first?.state == "resolved")
        }
    }

    @Test("a rule or silence written before a batch is stored applies to it, without waiting for the engine's next tick", arguments: StoreKind.allCases)
    func newRulesAndSilencesApplyAtOnce(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            await h.engine.tick()
            // Written by the CLI or the API (the engine is not told): the next batch is judged with it.
            try await h.admin.putRule(farm: "f1", try spec("hot", "above") { $0.threshold = 10 }.validated(), replace: false)
            try await h.send([(0, 20)])
            #expect(try await h.alerts().first?.state == "firing")
            #expect(try await h.outbox().count == 1)
            try await markOutboxDelivered(h.store, at: h.clock.now)
            _ = try await h.admin.addSilence(
                farm: "f1", matchers: ["alertname": "hot"], until: Timestamp(microseconds: h.clock.now.microseconds + 3_600_000_000), comment: "maintenance",
                by: "test", now: h.clock.now)
            try await h.send([(10, 5)])
            try await h.send([(20, 30)])
            #expect(try await h.alerts().first?.state == "firing")
            #expect(try await h.outbox().count == 1, "notified despite a silence added before the readings")
            // Removed: the next batch is judged without it.
            try await h.admin.removeRule(farm: "f1", name: "hot")
            try await h.send([(30, 5)])
            #expect(try await h.alerts().first?.transitions.last?.value != 5)
        }
    }

    @Test("the configuration stamp moves at every change of a rule or silence, a rule removed and added again in the same instant too", arguments: StoreKind.allCases)
    func stampMovesAtEveryChange(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            var seen = [try await h.store.alertConfigurationStamp()]
            func expectMoved(_ what: String) async throws {
                let stamp = try await h.store.alertConfigurationStamp()
                #expect(!seen.contains(stamp), "the stamp did not move at \(what): \(stamp), seen \(seen)")
                seen.append(stamp)
            }
            let hot = try spec("hot", "above") { $0.threshold = 10 }.validated()
            try await h.store.putAlertRule(farmID: h.farmID, rule: hot, replace: false, at: h.clock.now)
            try await expectMoved("a rule added")
            // Removed and added again with the same definition, the clock standing still: SQLite gives the new row the
            // old one's id, so counts, id sums and update times alone are all as before.
            try await h.admin.removeRule(farm: "f1", name: "hot")
            try await expectMoved("the rule removed")
            try await h.store.putAlertRule(farmID: h.farmID, rule: hot, replace: false, at: h.clock.now)
            try await expectMoved("the rule added again")
            try await h.admin.putRule(farm: "f1", try spec("hot", "above") { $0.threshold = 12 }.validated(), replace: true)
            try await expectMoved("the rule replaced")
            let until = Timestamp(microseconds: h.clock.now.microseconds + 3_600_000_000)
            let id = try await h.admin.addSilence(farm: "f1", matchers: ["alertname": "hot"], until: until, comment: "", by: "test", now: h.clock.now)
            try await expectMoved("a silence added")
            try await h.admin.removeSilence(farm: "f1", id: id)
            try await expectMoved("the silence removed")
            // Nothing changed: the same stamp.
            #expect(try await h.store.alertConfigurationStamp() == seen.last)
        }
    }

    @Test("the ingest down longer than `after`: no device is offline until `after` has passed since the engine started", arguments: StoreKind.allCases)
    func offlineAfterIngestRestart(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("offline", "device_offline") { $0.after = "60s" })
            try await h.rule(spec("silent", "no_data") { $0.after = "60s" })
            try await h.send([(0, 6.0)])
            await h.engine.tick()
            // The ingest is stopped for 75 s; the site buffers. A new engine starts.
            h.clock.advance(seconds: 75)
            let engine = h.newEngine()
            await engine.reload()
            await engine.tick()
            #expect(try await h.alerts().isEmpty, "offline judged on the ingest's own downtime")
            // The backlog arrives 20 s later: no gap in the readings, nothing to page.
            h.clock.advance(seconds: 20)
            try await h.send((Int64(1)...9).map { step -> (seconds: Int64, value: Double) in (step * 10, 6.0) }, start: Timestamp(microseconds: h.clock.now.microseconds - 95_000_000), to: engine)
            await engine.tick()
            #expect(try await h.alerts().isEmpty)
            #expect(try await h.outbox().isEmpty)
            // A device that then stays silent past `after` is offline.
            h.clock.advance(seconds: 61)
            await engine.tick()
            #expect(Set(try await h.alerts().filter { $0.state == "firing" }.map(\.rule)) == ["offline", "silent"])
        }
    }
}
