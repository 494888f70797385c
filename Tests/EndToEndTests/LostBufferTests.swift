import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

/// A site whose buffer and sequence sidecar were both lost (SD card replaced, box re-imaged with the same key) starts again
/// at sequence 1: the real agent learns the ingest's highest sequence, numbers above it, and renumbers what the ingest
/// refuses as `sequence_conflict`. Needs an ingest with `GET /v1/device` and `sequence_conflict` (the delivery contract).
@Suite("End to end: a lost buffer and sidecar", .serialized)
struct LostBufferTests {
    /// With `answersAtStart` the second life learns the ingest's highest sequence before its first batch; without, its
    /// first question goes unanswered (503), so its first batches meet `sequence_conflict` and are renumbered.
    @Test("Buffer and sidecar deleted between two runs: every reading of both stored once, no duplicates, no gap", arguments: [true, false])
    func lostBufferAndSidecar(answersAtStart: Bool) async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-6")
        let keyFile = try farm.dir.write("site-6.key", key + "\n")
        try await farm.startIngest()
        let secondLife = Atomic<Bool>(false)
        let unanswered = Atomic<Int>(0)
        let proxy = try ForwardingProxy(to: farm.endpoint) { request in
            guard !answersAtStart, secondLife.load(ordering: .sequentiallyConsistent), request.path == IngestProtocol.deviceStatePath,
                unanswered.add(1, ordering: .sequentiallyConsistent).oldValue == 0
            else { return nil }
            return .json(503, #"{"error":{"code":"unavailable","message":"not now"}}"#)
        }
        defer { proxy.stop() }
        let config = try farm.agentConfig("agent.toml", device: "site-6", keyFile: keyFile, sensors: 3, interval: "100ms", endpoint: proxy.url)

        // First life.
        var agent = try farm.startAgent(config: config, log: "agent-1.log")
        let flowing = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            try await farm.storedSequences(device: "site-6").count >= 60
        }
        #expect(flowing, "\(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0)
        let firstLife = try await farm.storedReadings(device: "site-6")
        let firstLast = try #require(firstLife.keys.max())
        #expect(firstLife.keys.sorted() == Array(1...firstLast), "the first life is stored whole (graceful stop flushes)")

        // The SD card is replaced: the buffer, its WAL and the sidecar are gone.
        let bufferPath = farm.dir.file("site-6/buffer.sqlite")
        for suffix in ["", "-wal", "-shm", ".seq"] where FileManager.default.fileExists(atPath: bufferPath + suffix) {
            try FileManager.default.removeItem(atPath: bufferPath + suffix)
        }

        // Second life, numbering from 1 again until it hears from the ingest.
        secondLife.store(true, ordering: .sequentiallyConsistent)
        agent = try farm.startAgent(config: config, log: "agent-2.log")
        var status: AgentStatus?
        let caughtUp = try await eventually(timeout: .seconds(40), every: .milliseconds(200)) {
            status = try await farm.agentStatus(config: config)
            guard let upload = status?.upload, upload.ingestHighestSequence ?? 0 >= firstLast else { return false }
            return try await farm.storedSequences(device: "site-6").count >= Int(firstLast) + 60
        }
        #expect(caughtUp, "\(String(describing: status?.upload)) \(agent.log)")
        let lastStatus = try await farm.agentStatus(config: config) ?? status
        #expect(await agent.stop(SIGTERM) == 0)
        #expect(lastStatus?.upload?.duplicatesTotal == 0, "nothing of the second life was taken for a duplicate")
        #expect(lastStatus?.buffer.quarantined == 0)
        #expect(agent.log.contains("The ingest holds sequence numbers above this buffer's last one"), "the jump is logged loudly")
        if !answersAtStart {
            #expect((lastStatus?.upload?.renumberedTotal ?? 0) > 0, "the first batches met sequence_conflict")
            #expect(agent.log.contains("Renumbered readings the ingest refused as sequence_conflict"), "renumbering is logged loudly")
        }

        // Both lives stored once, contiguous; the first life untouched by the second.
        let stored = try await farm.storedReadings(device: "site-6")
        let last = try #require(stored.keys.max())
        #expect(stored.keys.sorted() == Array(1...last), "a gap or a missing reading")
        for (sequence, reading) in firstLife { #expect(stored[sequence] == reading, "first-life reading \(sequence) changed") }
        let buffer = try await runOffPool {
            try ReadingBuffer(configuration: BufferConfiguration(path: bufferPath), logger: Logger(label: "test"))
        }
        let statistics = try await buffer.statistics()
        try await buffer.close()
        #expect(statistics.pending == 0 && statistics.quarantined == 0)
        #expect(statistics.lastSequence == last, "every number the second life assigned is stored")
        #expect(try await farm.ingestMetric(#"farmgate_ingest_readings_total{outcome="duplicate"}"#) == 0)
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
