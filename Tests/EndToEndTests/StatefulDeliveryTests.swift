import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

/// The delivery contract in the stateful mode (format version 4, the default between this agent and this ingest), with
/// the real binaries: restarts of the ingest that keep its state, and restarts that lose it (the sensor tables gone from
/// the store, the newest readings changed behind its back), each answered with a stable code and the same readings sent
/// again, never a reading stored wrong or twice.
@Suite("End to end: stateful frames", .serialized)
struct StatefulDeliveryTests {
    /// Runs `sql` on the (stopped) ingest's SQLite file.
    static func alterStore(_ farm: Farm, _ sql: String) throws {
        let db = try SQLiteConnection(path: farm.dir.file("ingest/ingest.sqlite"), mode: .readWrite)
        try db.query(sql)
    }

    /// Stateful frames decoded so far, by table and context labels.
    static func frames(_ farm: Farm, table: String, context: String) async throws -> Double {
        try await farm.ingestMetric("farmgate_ingest_stateful_frames_total{table=\"\(table)\",context=\"\(context)\"}") ?? 0
    }

    @Test("Answers lost after the ingest stored the frame cost no 409: a frame sent again decodes against the context before it, a timed-out one is followed by a frame without context")
    func lostAnswersCostNoRefusal() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-l")
        let keyFile = try farm.dir.write("site-l.key", key + "\n")
        try await farm.startIngest()
        // The ingest stores every batch. Two answers are lost with the connection, from the 4th and the 12th POST on:
        // libcurl sends a request again by itself when a reused connection closes without an answer, so the agent never
        // knows. Only a reused connection gets that (on a new one the agent sees the loss, the 8th's case), and under
        // load a slow answer can time out and make the next POST open a new connection: each close waits for the first
        // POST from its number on that comes over a connection used before. The 8th answer comes after the agent's
        // request_timeout (3 s), which the agent sees.
        struct Plan {
            var posts = 0
            /// The connections that carried a request so far.
            var connections: Set<Int> = []
            /// The POSTs whose answers were lost, and their bodies.
            var closed: [(post: Int, body: [UInt8])] = []
            /// The ingest's status for each POST that carried a lost one's body again.
            var resent: [Int] = []
        }
        final class Shared: Sendable { let plan = Mutex(Plan()) }
        let shared = Shared()
        let proxy = try ForwardingProxy(to: farm.endpoint, intercept: { _ in nil }) { request, forwarded in
            shared.plan.withLock { plan -> TestResponse in
                let reused = !plan.connections.insert(request.connection).inserted
                guard request.method == "POST" else { return forwarded }
                plan.posts += 1
                if plan.closed.contains(where: { $0.body == request.body }) {
                    guard case .reply(let status, _, _) = forwarded else { return forwarded }
                    plan.resent.append(status)
                }
                if plan.posts == 8 { return .delayed(.seconds(4), forwarded) }
                if let next = [4, 12].dropFirst(plan.closed.count).first, plan.posts >= next, reused {
                    plan.closed.append((plan.posts, request.body))
                    return .close
                }
                return forwarded
            }
        }
        defer { proxy.stop() }
        // Batches of up to 2,000 readings: 3 s without an answer leaves about 270 pending, so every batch takes all
        // of them and carries each sensor's newest reading, and a lost one always moved the ingest's context. (With
        // more pending than a batch holds, the agent alternates newest and oldest batches, and a lost batch of old
        // readings leaves the context as it was: sent again, it decodes against the current one, which this test would
        // not tell from the context before the last commit.)
        let config = try farm.agentConfig(
            "agent.toml", device: "site-l", keyFile: keyFile, sensors: 9, interval: "100ms", endpoint: proxy.url, batchMaxReadings: 2000)
        let agent = try farm.startAgent(config: config, log: "agent.log")

        let past = await eventually(timeout: .seconds(40), every: .milliseconds(200)) {
            shared.plan.withLock { $0.posts >= 24 && $0.resent.count >= 2 }
        }
        let (closed, resent) = shared.plan.withLock { ($0.closed.map(\.post), $0.resent) }
        #expect(past, "the agent did not get past the lost answers (lost at POSTs \(closed), sent again: \(resent)): \(agent.log)")
        #expect(resent == [200, 200], "each frame whose answer was lost came again once and was taken (lost at POSTs \(closed))")
        #expect(agent.log.contains("timed out"), "the 8th answer did not time out: \(agent.log)")
        #expect(try await farm.ingestMetric("farmgate_ingest_batches_total{result=\"stale_state\"}") ?? 0 == 0, "\(agent.log)")
        #expect(
            try await Self.frames(farm, table: "named", context: "previous") >= 2,
            "the frames sent again were not decoded against the context before them (lost at POSTs \(closed))")
        #expect(try await Self.frames(farm, table: "named", context: "none") >= 1, "no frame without context after the timeout")
        #expect(try await Self.frames(farm, table: "named", context: "used") >= 10)
        #expect(await agent.stop(SIGTERM) == 0)

        try await farm.expectDeliveredExactlyOnce(device: "site-l")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    @Test("Exactly once in the stateful mode through ingest restarts that lose the sensor tables and change the newest readings")
    func exactlyOnceThroughStateLoss() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-s")
        let keyFile = try farm.dir.write("site-s.key", key + "\n")
        let config = try farm.agentConfig("agent.toml", device: "site-s", keyFile: keyFile, sensors: 9, interval: "100ms")
        try await farm.startIngest()
        var agent = try farm.startAgent(config: config, log: "agent-1.log")

        // 1. Frames name the table and predict from the context once the first one declared it.
        let predicting = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            try await Self.frames(farm, table: "named", context: "used") >= 5
        }
        #expect(predicting, "no stateful frames with a named table and a context: \(agent.log)")
        #expect(try await Self.frames(farm, table: "declared", context: "none") >= 1)

        // 2. The ingest restarts (kill -9) with its state in the store: frames go on naming the table.
        await farm.ingest?.stop(SIGKILL)
        try await farm.startIngest()
        let resumed = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            try await Self.frames(farm, table: "named", context: "used") >= 5
        }
        #expect(resumed, "after a restart that kept the state, frames did not name the table: \(agent.log)")
        #expect(try await Self.frames(farm, table: "declared", context: "none") == 0, "a restart that kept the state made the agent declare again")

        // 3. The ingest restarts having lost the sensor tables: the agent is told unknown_sensor_table and declares again.
        await farm.ingest?.stop(SIGTERM)
        try Self.alterStore(farm, "DELETE FROM sensor_tables")
        try await farm.startIngest()
        let redeclared = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            let declared = try await Self.frames(farm, table: "declared", context: "used") + Self.frames(farm, table: "declared", context: "none")
            let named = try await Self.frames(farm, table: "named", context: "used")
            return declared >= 1 && named >= 3
        }
        #expect(redeclared, "the agent did not declare its table again after the ingest lost it: \(agent.log)")
        let tableRefusals = try await farm.ingestMetric("farmgate_ingest_batches_total{result=\"stale_state\"}") ?? 0
        #expect(tableRefusals >= 1)

        // 4. The ingest restarts with other newest readings than the agent predicts from (a restored backup): stale_context,
        // the agent adopts the ingest's context and goes on. The changed rows are `latest` only; the readings stay.
        await farm.ingest?.stop(SIGTERM)
        try Self.alterStore(farm, "UPDATE latest SET value = value + 1")
        try await farm.startIngest()
        let adopted = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            let refused = try await farm.ingestMetric("farmgate_ingest_batches_total{result=\"stale_state\"}") ?? 0
            let named = try await Self.frames(farm, table: "named", context: "used")
            return refused >= 1 && named >= 3
        }
        #expect(adopted, "the agent did not recover from a stale context: \(agent.log)")

        // 5. A kill -9 of the agent mid-stream, and a quiet agent drains what is left.
        await agent.stop(SIGKILL)
        let quiet = try farm.agentConfig("agent-quiet.toml", device: "site-s", keyFile: keyFile, sensors: 9, interval: "1h")
        agent = try farm.startAgent(config: quiet, log: "agent-2.log")
        var final: AgentStatus?
        let drained = try await eventually(timeout: .seconds(40), every: .milliseconds(200)) {
            guard let status = try await farm.agentStatus(config: quiet) else { return false }
            final = status
            return status.buffer.pending == 0 && status.buffer.uncommitted == 0
        }
        #expect(drained, "backlog did not drain: \(String(describing: final?.buffer)) \(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0)
        guard let status = final else { return }

        // Every sequence the agent assigned is stored exactly once, nothing quarantined, and the values are the agent's
        // (the simulated sensors stay within their ranges; a reading decoded against a wrong context would not).
        #expect(status.buffer.quarantined == 0, "\(status.recentQuarantine)")
        #expect(status.upload?.frames == "stateful (format version 4)", "\(String(describing: status.upload?.frames))")
        let stored = try await farm.storedSequences(device: "site-s")
        #expect(Set(stored).count == stored.count, "duplicates stored")
        let expected = Array(1...status.buffer.lastSequence)
        #expect(stored.sorted() == expected, "missing \(Set(expected).subtracting(stored).sorted().prefix(20))")
        let readings = try await farm.storedReadings(device: "site-s")
        var outOfRange: [String] = []
        for (sequence, fields) in readings {
            let parts = fields.split(separator: " ", omittingEmptySubsequences: false)
            guard parts.count >= 3, let value = Double(parts[2]) else { continue }
            let sensor = String(parts[0])
            let plausible =
                sensor.hasSuffix(".ph") ? (5.4...6.6).contains(value) : sensor.hasSuffix(".ec") ? (1150.0...1650.0).contains(value) : (17.5...23.5).contains(value)
            if !plausible { outOfRange.append("\(sequence): \(fields)") }
        }
        #expect(outOfRange.isEmpty, "implausible values stored: \(outOfRange.prefix(10))")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
