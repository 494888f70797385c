import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// The delivery contract of ARCHITECTURE.md, with the real binaries on loopback: every reading the agent committed is
/// stored exactly once, through an ingest outage, a `kill -9` of the ingest and a `kill -9` of the agent.
@Suite("End to end", .serialized)
struct DeliveryTests {
    @Test("Exactly once through ingest and agent kills, with a poison reading quarantined")
    func exactlyOnceThroughKills() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-1")
        let keyFile = try farm.dir.write("site-1.key", key + "\n")
        let busy = try farm.agentConfig("agent.toml", device: "site-1", keyFile: keyFile, sensors: 6, interval: "100ms")
        try await farm.startIngest()

        // 1. Readings flow.
        var agent = try farm.startAgent(config: busy, log: "agent-1.log")
        let flowing = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) { try await farm.storedSequences(device: "site-1").count >= 60 }
        #expect(flowing, "no readings reached the ingest: \(agent.log)")

        // 2. The ingest dies without warning and stays down a while; the agent keeps buffering.
        await farm.ingest?.stop(SIGKILL)
        let backlog = try await eventually(timeout: .seconds(10), every: .milliseconds(200)) { (try await farm.agentStatus(config: busy)?.buffer.pending ?? 0) >= 100 }
        #expect(backlog, "the agent did not buffer while the ingest was down")
        try await farm.startIngest()

        // 3. The agent dies without warning mid-upload, and comes back.
        try await Task.sleep(for: .milliseconds(400))
        await agent.stop(SIGKILL)
        let lastBeforeKill = try await farm.storedSequences(device: "site-1").max() ?? 0
        #expect(lastBeforeKill > 0)

        // 4. While it is down, a reading with a timestamp two days ahead (a clock gone wrong) is committed to its buffer.
        let poisonSequence = try await commitFutureReading(bufferPath: farm.dir.file("site-1/buffer.sqlite"))
        agent = try farm.startAgent(config: busy, log: "agent-2.log")
        try await Task.sleep(for: .seconds(2))
        #expect(await agent.stop(SIGTERM) == 0, "graceful stop failed: \(agent.log)")

        // 5. A quiet agent on the same buffer drains everything that is left.
        let quiet = try farm.agentConfig("agent-quiet.toml", device: "site-1", keyFile: keyFile, sensors: 6, interval: "1h")
        agent = try farm.startAgent(config: quiet, log: "agent-3.log")
        var final: AgentStatus?
        let drained = try await eventually(timeout: .seconds(40), every: .milliseconds(200)) {
            guard let status = try await farm.agentStatus(config: quiet) else { return false }
            final = status
            return status.buffer.pending == 0 && status.buffer.uncommitted == 0 && status.buffer.quarantined >= 1
        }
        #expect(drained, "backlog did not drain: \(String(describing: final?.buffer)) \(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0)
        guard let status = final else { return }

        // The poison reading is in quarantine with the ingest's reason; the queue moved on.
        #expect(status.buffer.quarantined == 1)
        let quarantined = status.recentQuarantine.first
        #expect(quarantined?.sequence == poisonSequence)
        #expect(quarantined?.reason.contains("timestamp_in_future") == true, "\(String(describing: quarantined))")

        // Every other sequence the agent ever assigned is stored exactly once.
        let stored = try await farm.storedSequences(device: "site-1")
        let lastSequence = status.buffer.lastSequence
        let expected = (1...lastSequence).filter { $0 != poisonSequence }
        #expect(Set(stored).count == stored.count, "duplicates stored")
        #expect(stored.sorted() == expected, "stored \(stored.count) of \(expected.count); missing \(Set(expected).subtracting(stored).sorted().prefix(20))")
        #expect(lastSequence > 200)
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    /// Opens the (stopped) agent's buffer and commits one reading stamped two days in the future; returns its sequence.
    func commitFutureReading(bufferPath: String) async throws -> UInt64 {
        let buffer = try await runOffPool { try ReadingBuffer(configuration: BufferConfiguration(path: bufferPath), logger: Logger(label: "test")) }
        let sensor = try SensorID("tank1.ph")
        let future = Timestamp(microseconds: Timestamp.now().microseconds + 2 * 86_400 * 1_000_000)
        try await buffer.append([Sample(sensor: sensor, timestamp: future, value: 6.1)])
        try await buffer.flush()
        let statistics = try await buffer.statistics()
        return statistics.lastSequence
    }

    @Test("A batch sent twice is stored once and the second answer counts duplicates")
    func resentBatchIsDuplicate() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-2")
        try await farm.startIngest()
        let sensor = try SensorID("tank1.ph")
        let base = Timestamp.now().microseconds - 60_000_000
        let readings = (1...40).map { i in
            Reading(sensor: sensor, sequence: UInt64(i), timestamp: Timestamp(microseconds: base + Int64(i) * 1_000_000), value: 6.0 + Double(i % 5) / 100)
        }
        let batch = Batch(device: try DeviceID("site-2"), sensors: [SensorDescriptor(id: sensor, quantity: .ph)], readings: readings)
        let body = try BatchCodec.encode(batch)

        let (firstStatus, firstBody) = try await farm.post(Data(body), key: key, contentType: IngestProtocol.binaryBatchMediaType)
        #expect(firstStatus == 200)
        let first = try JSONDecoder().decode(IngestReceipt.self, from: firstBody)
        #expect(first == IngestReceipt(accepted: 40, duplicates: 0, rejected: []))

        // The same readings again, re-cut: half old, half new, as JSON this time.
        let recut = Batch(
            device: batch.device, sensors: batch.sensors,
            readings: Array(readings[20...]) + (41...60).map { i in
                Reading(sensor: sensor, sequence: UInt64(i), timestamp: Timestamp(microseconds: base + Int64(i) * 1_000_000), value: 6.2)
            })
        let (secondStatus, secondBody) = try await farm.post(Data(BatchJSON.encode(recut)), key: key, contentType: IngestProtocol.jsonBatchMediaType)
        #expect(secondStatus == 200)
        let second = try JSONDecoder().decode(IngestReceipt.self, from: secondBody)
        #expect(second == IngestReceipt(accepted: 20, duplicates: 20, rejected: []))

        let stored = try await farm.storedSequences(device: "site-2")
        #expect(stored.sorted() == (1...60).map { UInt64($0) })
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}

/// After an outage the newest readings go first, while the backlog drains behind them.
@Suite("End to end: after an outage", .serialized)
struct LiveFirstTests {
    @Test("Fresh readings reach the ingest within seconds while the backlog is still draining")
    func freshReadingsFirst() async throws {
        // A slow ingest (5 requests/s, 100 readings a batch: 500 readings/s) against a site making 300 readings/s, so a
        // backlog takes a while to drain and "fresh first" is observable.
        let farm = try await Farm(rateLimit: (perSecond: 5, burst: 5))
        let key = try await farm.createDevice("site-3")
        let keyFile = try farm.dir.write("site-3.key", key + "\n")
        let config = try farm.agentConfig(
            "agent.toml", device: "site-3", keyFile: keyFile, sensors: 30, interval: "100ms",
            upload: "", endpoint: nil)
        let configText = try String(contentsOfFile: config, encoding: .utf8)
            // Backlog batches as small as live ones: the ingest's 5 requests/s then carry 500 readings/s either way.
            .replacingOccurrences(of: "batch_max_readings = 50", with: "batch_max_readings = 100\nbacklog_batch_readings = 100")
        try configText.write(toFile: config, atomically: true, encoding: .utf8)

        // The ingest is down from the start: a backlog of at least 1500 readings builds up.
        let agent = try farm.startAgent(config: config, log: "agent.log")
        let built = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) { (try await farm.agentStatus(config: config)?.buffer.pending ?? 0) >= 1500 }
        #expect(built, "\(agent.log)")

        let restart = Timestamp.now()
        try await farm.startIngest()
        var freshAfter: Duration?
        var pendingThen = 0
        let clock = ContinuousClock()
        let start = clock.now
        let fresh = try await eventually(timeout: .seconds(10), every: .milliseconds(100)) {
            let latest = try await farm.latestTimestamp(device: "site-3")
            guard let latest, latest > restart else { return false }
            freshAfter = start.duration(to: clock.now)
            pendingThen = try await farm.agentStatus(config: config)?.buffer.pending ?? 0
            return true
        }
        #expect(fresh, "no reading taken after the restart reached the ingest: \(agent.log)")
        // Normally 1-2 s (the agent backs off at most 1 s); the bound leaves room for a loaded machine (5.34 s was seen
        // once in a full end-to-end pass). The check after it is the one that says "first": the backlog still drains.
        #expect((freshAfter ?? .seconds(99)) < .seconds(8), "fresh readings took \(String(describing: freshAfter))")
        #expect(pendingThen >= 500, "the backlog should still be draining when fresh readings arrive (pending \(pendingThen))")

        // And the backlog does drain completely, exactly once.
        await agent.stop(SIGTERM)
        let quiet = try farm.agentConfig("quiet.toml", device: "site-3", keyFile: keyFile, sensors: 30, interval: "1h")
        let drainer = try farm.startAgent(config: quiet, log: "drain.log")
        var last: AgentStatus?
        let drained = try await eventually(timeout: .seconds(60), every: .milliseconds(200)) {
            last = try await farm.agentStatus(config: quiet)
            return last?.buffer.pending == 0 && last?.buffer.uncommitted == 0
        }
        #expect(drained, "\(drainer.log)")
        await drainer.stop(SIGTERM)
        let stored = try await farm.storedSequences(device: "site-3")
        let lastSequence = try #require(last?.buffer.lastSequence)
        #expect(Set(stored).count == stored.count)
        #expect(stored.sorted() == Array(1...lastSequence))
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
