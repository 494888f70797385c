import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

/// Firing timer alerts across an ingest restart, and alerts whose rule was changed so that it no longer selects them.
@Suite("Alerts kept across restarts and settled when a rule no longer selects them")
struct AlertRestartSettlingTests {
    @Test("a restart keeps firing no-data and offline alerts firing with their start, and notifies nothing, until a reading arrives", arguments: StoreKind.allCases)
    func restartKeepsTimerAlertsFiring(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("offline", "device_offline") { $0.after = "60s" })
            try await h.rule(spec("silent", "no_data") { $0.sensor = "tank1.ph"; $0.after = "60s" })
            try await h.send([(0, 6.0)])
            await h.engine.tick()
            h.clock.advance(seconds: 61)
            await h.engine.tick()
            let before = try await h.alerts()
            #expect(Set(before.filter { $0.state == "firing" }.map(\.rule)) == ["offline", "silent"])
            let starts = Dictionary(uniqueKeysWithValues: before.map { ($0.rule, $0.startsAt) })
            #expect(try await h.outbox().count == 2)
            try await markOutboxDelivered(h.store, at: h.clock.now)

            // The ingest restarts (no reading arrives): the new engine knows from the store that nothing was reported.
            h.clock.advance(seconds: 30)
            let restarted = h.newEngine()
            await restarted.reload()
            await restarted.tick()
            for moment in ["at the restart", "`after` past the restart"] {
                let alerts = try await h.alerts()
                #expect(alerts.map(\.state) == ["firing", "firing"], "\(moment): \(alerts.map { "\($0.rule) \($0.state)" })")
                for alert in alerts {
                    #expect(alert.startsAt == starts[alert.rule] ?? nil, "\(moment): \(alert.rule) has a new start")
                    #expect(states(alert) == ["inactive>firing"], "\(moment): \(alert.rule) \(states(alert))")
                }
                let notifications = try await h.notifications()
                #expect(notifications.map(\.status) == [.firing, .firing], "\(moment): \(notifications.map(\.status))")
                h.clock.advance(seconds: 75)
                await restarted.tick()
            }

            // A reading arrives: both causes are gone, and both alerts resolve (told once each).
            try await h.send([(0, 6.0)], to: restarted)
            await restarted.tick()
            let after = try await h.alerts()
            #expect(after.map(\.state) == ["resolved", "resolved"], "\(after.map { "\($0.rule) \($0.state)" })")
            #expect(try await h.notifications().map(\.status) == [.firing, .firing, .resolved, .resolved])
        }
    }

    @Test("a rule replaced with a narrower sensor glob resolves the alert of the sensor it no longer selects and tells its receivers", arguments: StoreKind.allCases)
    func narrowedSensorGlobResolves(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("hot", "above") { $0.sensor = "tank*"; $0.threshold = 10 })
            try await h.send([(0, 20)], sensor: "tank1.ph")
            try await h.send([(0, 20)], sensor: "tank2.ph")
            #expect(try await h.alerts().map(\.state) == ["firing", "firing"])
            try await markOutboxDelivered(h.store, at: h.clock.now)

            h.clock.advance(seconds: 5)
            try await h.rule(spec("hot", "above") { $0.sensor = "tank1.ph"; $0.threshold = 10 })
            let alerts = Dictionary(uniqueKeysWithValues: try await h.alerts().map { ($0.sensor ?? "", $0) })
            #expect(alerts["tank1.ph"]?.state == "firing")
            #expect(alerts["tank2.ph"]?.state == "resolved", "\(alerts["tank2.ph"]?.state ?? "none")")
            #expect(alerts["tank2.ph"]?.endsAt == h.clock.now)
            let rows = try await h.outbox()
            #expect(rows.map(\.receiver) == ["grower", "grower", "grower"])
            let notifications = try await h.notifications()
            #expect(notifications.map(\.status) == [.firing, .firing, .resolved])
            #expect(notifications.last?.labels["sensor"] == "tank2.ph")
            #expect(notifications.last?.description?.contains("no longer selects this sensor") == true, "\(notifications.last?.description ?? "")")

            // Told once: another reload and readings of the sensor the rule left change nothing.
            await h.engine.reload()
            try await h.send([(10, 5)], sensor: "tank2.ph")
            try await h.send([(20, 30)], sensor: "tank2.ph")
            #expect(try await h.outbox().count == 3)
            // The sensor the rule still selects carries on as before.
            try await h.send([(30, 5)], sensor: "tank1.ph")
            #expect(try await h.alerts().map(\.state) == ["resolved", "resolved"])
            #expect(try await h.notifications().map(\.status) == [.firing, .firing, .resolved, .resolved])
        }
    }

    @Test("no-data and offline rules narrowed while the ingest was down: the next engine resolves the alerts they left, to the receivers told", arguments: StoreKind.allCases)
    func narrowedWhileDownResolves(kind: StoreKind) async throws {
        try await AlertHarness.with(kind) { h in
            try await h.rule(spec("offline", "device_offline") { $0.device = "d*"; $0.after = "60s" })
            try await h.rule(spec("silent", "no_data") { $0.sensor = "tank*"; $0.after = "60s" })
            try await h.send([(0, 6.0)])
            h.clock.advance(seconds: 61)
            await h.engine.tick()
            #expect(try await h.alerts().map(\.state) == ["firing", "firing"])
            try await markOutboxDelivered(h.store, at: h.clock.now)

            // Changed by the CLI while no engine runs.
            try await h.admin.putRule(farm: "f1", try spec("offline", "device_offline") { $0.device = "gh*"; $0.after = "60s" }.validated(), replace: true)
            try await h.admin.putRule(farm: "f1", try spec("silent", "no_data") { $0.sensor = "pump*"; $0.after = "60s" }.validated(), replace: true)
            h.clock.advance(seconds: 10)
            let restarted = h.newEngine()
            await restarted.reload()
            let alerts = try await h.alerts()
            #expect(alerts.map(\.state) == ["resolved", "resolved"], "\(alerts.map { "\($0.rule) \($0.state)" })")
            let rows = try await h.outbox()
            #expect(rows.map(\.receiver) == ["grower", "grower", "grower", "grower"])
            let notifications = try await h.notifications()
            #expect(notifications.map(\.status) == [.firing, .firing, .resolved, .resolved])
            #expect(notifications.suffix(2).allSatisfy { $0.description?.contains("no longer selects this") == true })
            // Nothing fires again for targets the rules no longer select.
            h.clock.advance(seconds: 120)
            await restarted.tick()
            #expect(try await h.alerts().map(\.state) == ["resolved", "resolved"])
            #expect(try await h.outbox().count == 4)
        }
    }
}
