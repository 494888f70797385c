import FarmgateSupport
import FarmgateWire
import Testing

@testable import FarmgateIngest

/// The engine's writes for batches run at `synchronous=NORMAL` on SQLite (``AlertWriteDurability``); every other
/// write, the batches first, must still be synced. These tests read the writer connection's setting after such writes.
@Suite("Alert writes synced with the next commit on SQLite")
struct AlertWriteDurabilityTests {
    static func synchronous(_ store: SQLiteIngestStore) async throws -> Int64? {
        try await store.writer.withValue { db in try db.connection.queryInt("PRAGMA synchronous") }
    }

    @Test("after the engine's writes, and after a refused one, the writer is back at synchronous=FULL and the alert is stored")
    func writerBackToFull() async throws {
        try await AlertHarness.with(.sqlite) { h in
            let store = try #require(h.store as? SQLiteIngestStore)
            #expect(try await Self.synchronous(store) == 2)
            try await h.rule(spec("ph-low", "below") { $0.quantity = "ph"; $0.threshold = 5.5 })
            try await h.send([(0, 6.0), (60, 5.4)])
            // The engine wrote the firing alert (pending and firing at the same reading, no `for`) with its outbox row.
            #expect(try await h.alerts().first?.state == "firing")
            #expect(try await h.outbox().map(\.receiver) == ["grower"])
            #expect(try await Self.synchronous(store) == 2)
            // A write refused by the version check (an alert that is not there) leaves the setting restored too.
            let ghost = AlertRecord(
                id: 999_999, farmID: h.farmID, rule: "ph-low", deviceRowID: h.device.rowID, sensorRowID: 1, device: "d1", sensor: "tank1.ph",
                fingerprint: "0", version: 3, updatedAt: h.clock.now)
            await #expect(throws: AlertStoreConflict.self) {
                try await store.applyAlertChanges([AlertChange(record: ghost)], now: h.clock.now, durability: .withNextSyncedCommit)
            }
            #expect(try await Self.synchronous(store) == 2)
            // And a batch stored afterwards is committed as before.
            try await h.send([(120, 6.2)])
            #expect(try await h.alerts().first?.state == "resolved")
        }
    }
}
