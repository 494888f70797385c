import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

/// The notification outbox with the real `farmgate-ingest`: receivers added with the CLI, outbox rows written into its
/// SQLite file the way the alert engine writes them, the process killed with SIGKILL in the middle of a delivery and
/// started again, a dead letter seen and retried with the CLI. Real processes, real signals: in TIMED_SUITES.
@Suite("Notifications through a crash of the ingest", .serialized)
struct NotificationCrashTests {
    static let notify = """

        [notify]
        request_timeout = "3s"
        connect_timeout = "1s"
        claim_timeout = "4s"
        poll_interval = "100ms"
        backoff_initial = "100ms"
        backoff_max = "300ms"
        max_attempts = 2
        external_url = "https://ingest.example.net"
        """

    /// Writes one pending outbox row for `receiver`, as the engine does in its transaction.
    func enqueue(_ farm: Farm, receiver: String, alert: Int64) throws -> String {
        let connection = try SQLiteConnection(path: farm.dir.file("ingest/ingest.sqlite"), mode: .readWrite)
        let receiverID = try #require(try connection.queryInt("SELECT id FROM alert_receivers WHERE name = ?", [.text(receiver)]))
        let key = "farmgate-\(alert)-\(alert * 10)-\(receiverID)"
        let payload = """
            {"alert_id":\(alert),"farm":"e2e","fingerprint":"fp-\(alert)","labels":{"alertname":"ph-low","device":"site-1","sensor":"tank1.ph"},\
            "late":false,"rule":"ph-low","severity":"critical","starts_at":"2026-01-01T00:00:00Z","status":"firing",\
            "summary":"pH below 5.5 on site-1 tank1.ph","transition_id":\(alert * 10),"transitions":[]}
            """
        let now = Timestamp.now().microseconds
        try connection.query(
            """
            INSERT INTO alert_outbox(farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, next_attempt_at_us, created_at_us)
            SELECT farm_id, id, ?, ?, ?, ?, ?, ? FROM alert_receivers WHERE id = ?
            """, [.integer(alert), .integer(alert * 10), .text(key), .text(payload), .integer(now), .integer(now), .integer(receiverID)])
        return key
    }

    /// The outbox rows as `alert outbox list --json` prints them, by idempotency key.
    func outbox(_ farm: Farm, state: String? = nil) async throws -> [String: [String: Any]] {
        let output = try await farm.admin(["alert", "outbox", "list", "--json"] + (state.map { ["--state", $0] } ?? []))
        let objects = try #require(try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [[String: Any]], "not a JSON array: \(output)")
        var rows: [String: [String: Any]] = [:]
        for object in objects {
            rows[try #require(object["idempotency_key"] as? String)] = object
        }
        return rows
    }

    /// The restarted `serve` holds the SQLite file alone, so the claim the killed one left is taken over at once: with an
    /// hour's `claim_timeout` the row (and every newer notification of its alert) had waited that hour.
    @Test("Killed with SIGKILL in the middle of a delivery, the ingest delivers it at once after a restart with the same idempotency key")
    func killedMidDelivery() async throws {
        // The first request hangs: the ingest is inside the delivery when it is killed. Later ones are answered.
        let server = try TestHTTPServer { _, index in index == 0 ? .hang : .reply(200) }
        defer { server.stop() }
        let farm = try await Farm()
        let notify = Self.notify.replacingOccurrences(of: #"claim_timeout = "4s""#, with: #"claim_timeout = "1h""#)
        #expect(notify != Self.notify)
        try (try String(contentsOfFile: farm.ingestConfig, encoding: .utf8) + notify).write(toFile: farm.ingestConfig, atomically: true, encoding: .utf8)
        let added = try await farm.admin(["alert", "receiver", "add", "--farm", "e2e", "--name", "hook", "--webhook", server.url + "/hook/token123", "--secret", "s3cret"])
        #expect(added.contains("Added receiver hook"))
        #expect(!added.contains("token123") && !added.contains("s3cret"), "a secret was printed: \(added)")
        let listed = try await farm.admin(["alert", "receiver", "list", "--farm", "e2e"])
        #expect(listed.contains("hook\twebhook\thttp://127.0.0.1:\(server.port)/…\tsigned\t60/min"), "\(listed)")
        #expect(!listed.contains("token123") && !listed.contains("s3cret"))
        let key = try enqueue(farm, receiver: "hook", alert: 1)

        try await farm.startIngest()
        let inFlight = await server.waitForRequests(1, timeout: .seconds(20))
        #expect(inFlight, "the ingest never started delivering: \(farm.ingest?.log ?? "")")
        await farm.ingest?.stop(SIGKILL)
        let claimed = try await outbox(farm)[key]
        #expect(claimed?["state"] as? String == "delivering")
        #expect(claimed?["attempts"] as? Int == 1)

        try await farm.startIngest()
        let redelivered = await server.waitForRequests(2, timeout: .seconds(15))
        #expect(redelivered, "not delivered after the restart: \(farm.ingest?.log ?? "")")
        #expect(farm.ingest?.log.contains("notifications a stopped process was delivering are sent again now") == true, "\(farm.ingest?.log ?? "")")
        #expect(server.requests.map(\.headers).map { $0["idempotency-key"] } == [key, key])
        let delivered = try await eventually(timeout: .seconds(10)) { try await outbox(farm, state: "delivered")[key] != nil }
        #expect(delivered)
        #expect(try await outbox(farm)[key]?["attempts"] as? Int == 2)
        #expect(server.requests.count == 2, "delivered more than once after the restart")
        #expect(server.requests.allSatisfy { $0.headers["x-farmgate-signature"]?.hasPrefix("sha256=") == true })
        // A graceful stop with the delivery workers in the group ends cleanly.
        let status = await farm.ingest?.stop(SIGTERM)
        #expect(status == 0, "\(farm.ingest?.log ?? "")")
    }

    @Test("A receiver that keeps failing leaves a dead letter the CLI and /metrics show; `alert outbox retry` delivers it once the receiver is back")
    func deadLetterFromTheCLI() async throws {
        let healthy = Atomic<Bool>(false)
        let server = try TestHTTPServer { _, _ in healthy.load(ordering: .relaxed) ? .reply(200) : .reply(503) }
        defer { server.stop() }
        let farm = try await Farm()
        try (try String(contentsOfFile: farm.ingestConfig, encoding: .utf8) + Self.notify).write(toFile: farm.ingestConfig, atomically: true, encoding: .utf8)
        try await farm.admin(["alert", "receiver", "add", "--farm", "e2e", "--name", "down", "--webhook", server.url])
        let key = try enqueue(farm, receiver: "down", alert: 2)
        try await farm.startIngest()

        let dead = try await eventually(timeout: .seconds(20), every: .milliseconds(200)) { try await outbox(farm, state: "dead")[key] != nil }
        #expect(dead, "\(farm.ingest?.log ?? "")")
        let letter = try await outbox(farm)[key]
        #expect(letter?["attempts"] as? Int == 2)
        #expect((letter?["last_error"] as? String)?.contains("HTTP 503") == true)
        let table = try await farm.admin(["alert", "outbox", "list", "--state", "dead"])
        #expect(table.contains("\tdead\t2\te2e/down\t\(key)\t"), "\(table)")
        let counted = try await eventually(timeout: .seconds(20), every: .milliseconds(500)) {
            try await farm.ingestMetric(#"farmgate_ingest_notification_outbox{state="dead"}"#) == 1
        }
        #expect(counted)

        // The receiver is back; its test notification goes through and the dead letter is retried.
        healthy.store(true, ordering: .relaxed)
        let test = try await farm.admin(["alert", "receiver", "test", "--farm", "e2e", "--name", "down"])
        #expect(test.contains("HTTP 200"), "\(test)")
        let id = try #require(letter?["id"] as? Int)
        let retried = try await farm.admin(["alert", "outbox", "retry", String(id)])
        #expect(retried.contains("pending again"))
        let delivered = try await eventually(timeout: .seconds(10), every: .milliseconds(200)) { try await outbox(farm, state: "delivered")[key] != nil }
        #expect(delivered)
        #expect(server.requests.filter { $0.headers["idempotency-key"] == key }.count == 3)
        // Retrying a delivered notification is refused with a reason and a non-zero exit.
        let again = try await runCommand(Farm.ingestBinary, ["alert", "outbox", "retry", String(id), "--config", farm.ingestConfig])
        #expect(again.status == 1)
        #expect(again.stderr.contains("was delivered"))
        await farm.ingest?.stop()
    }
}
