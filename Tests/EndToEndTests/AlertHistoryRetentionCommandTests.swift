import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

/// `farmgate-ingest retention run` and `[retention] alert_history`, the real binary on a real SQLite file.
@Suite struct AlertHistoryRetentionCommandTests {
    static let day: Int64 = 86_400_000_000

    @Test func theCommandPrintsAndRemovesOldAlertTransitionsKeepingEachAlertsNewest() async throws {
        let scratch = try Scratch(prefix: "fg-alert-history")
        let database = scratch.file("ingest.sqlite")
        let config = try scratch.write("ingest.toml", "[storage]\npath = \"ingest.sqlite\"\n\n[retention]\nalert_history = \"30d\"\n")
        #expect(try await runCommand(Farm.ingestBinary, ["farm", "create", "f1", "--config", config]).status == 0)
        // Alert 1: five transitions recorded 40 days ago and one an hour ago. Alert 2: three recorded 40 days ago.
        let now = Timestamp.now().microseconds
        let old = now - 40 * Self.day
        try await runOffPool {
            let db = try SQLiteConnection(path: database, mode: .readWrite)
            try db.transaction {
                for alert in [1, 2] {
                    try db.execute(
                        """
                        INSERT INTO alerts(id, farm_id, rule, device_id, sensor_id, fingerprint, state, updated_at_us)
                        SELECT \(alert), id, 'rule-\(alert)', 1, 0, 'fp-\(alert)', 'firing', 0 FROM farms
                        """)
                }
                for (alert, recorded) in [(1, old), (1, old), (1, old), (1, old), (1, old), (2, old), (2, old), (2, old), (1, now - 3_600_000_000)] {
                    try db.query(
                        "INSERT INTO alert_transitions(alert_id, from_state, to_state, at_us, recorded_at_us) VALUES (?, 'pending', 'firing', ?, ?)",
                        [.integer(Int64(alert)), .integer(recorded), .integer(recorded)])
                }
            }
        }
        func count(_ sql: String) async throws -> Int64 {
            try await runOffPool { try SQLiteConnection(path: database, mode: .readWrite).queryInt(sql) ?? -1 }
        }

        let dry = try await runCommand(Farm.ingestBinary, ["retention", "run", "--dry-run", "--config", config])
        #expect(dry.status == 0, "\(dry.stderr)")
        #expect(dry.stdout.contains(", alert history 30d\n"), "\(dry.stdout)")
        #expect(dry.stdout.contains(": would remove 7 rows (each alert's newest kept)"), "\(dry.stdout)")
        #expect(try await count("SELECT count(*) FROM alert_transitions") == 9)

        let run = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        #expect(run.status == 0, "\(run.stderr)")
        #expect(run.stdout.contains("alert transitions recorded before ") && run.stdout.contains(": removed 7 rows (each alert's newest kept)"), "\(run.stdout)")
        // Alert 1 keeps its recent one, alert 2 its newest (the highest id), old as it is.
        #expect(try await count("SELECT count(*) FROM alert_transitions WHERE alert_id = 1") == 1)
        #expect(try await count("SELECT recorded_at_us FROM alert_transitions WHERE alert_id = 1") == now - 3_600_000_000)
        #expect(try await count("SELECT id FROM alert_transitions WHERE alert_id = 2") == 8)
    }
}
