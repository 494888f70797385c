import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

/// The real agent against an ingest that refuses every batch for a while (as an older ingest refuses a newer codec), then
/// accepts: a systematic refusal holds the queue, shows in `farmgate status`, and quarantines nothing.
@Suite("End to end: a systematic refusal holds the queue", .serialized)
struct SystematicRefusalTests {
    static let refusal = #"{"error":{"code":"malformed_batch","message":"unsupported format version 3 (this build reads version 2)"}}"#

    @Test("Every batch refused for a while, then accepted: nothing quarantined, every reading stored once, the hold shown")
    func refusedThenAccepted() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-5")
        let keyFile = try farm.dir.write("site-5.key", key + "\n")
        try await farm.startIngest()
        let refusing = Atomic<Bool>(true)
        let proxy = try ForwardingProxy(to: farm.endpoint) { request in
            request.method == "POST" && refusing.load(ordering: .sequentiallyConsistent) ? .json(400, SystematicRefusalTests.refusal) : nil
        }
        defer { proxy.stop() }
        let config = try farm.agentConfig("agent.toml", device: "site-5", keyFile: keyFile, sensors: 3, interval: "100ms", endpoint: proxy.url)
        let agent = try farm.startAgent(config: config, log: "agent.log")

        // While refused: held, with the code and message, in `farmgate status --json` and in the human status.
        var during: AgentStatus?
        let held = try await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
            guard let status = try await farm.agentStatus(config: config), (status.upload?.held?.refusals ?? 0) >= 2 else { return false }
            during = status
            return true
        }
        #expect(held, "the agent never showed a hold: \(agent.log)")
        #expect(during?.upload?.held?.httpStatus == 400)
        #expect(during?.upload?.held?.code == "malformed_batch")
        #expect(during?.upload?.held?.message == "unsupported format version 3 (this build reads version 2)")
        #expect(during?.buffer.quarantined == 0)
        let human = try await runCommand(Farm.agentBinary, ["status", "--config", config])
        #expect(human.stdout.contains("HELD") && human.stdout.contains("malformed_batch"), "\(human.stdout)")

        // The refusal lasts: the backlog grows, and still nothing goes to quarantine.
        let grew = try await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
            (try await farm.agentStatus(config: config)?.buffer.pending ?? 0) >= 150
        }
        #expect(grew)
        let late = try await farm.agentStatus(config: config)
        #expect(late?.buffer.quarantined == 0)
        #expect(late?.upload?.quarantinedTotal == 0)
        #expect(late?.upload?.held != nil)
        #expect(agent.log.contains("Upload held"), "the hold is logged")

        // The ingest accepts again: the hold clears and the backlog drains.
        refusing.store(false, ordering: .sequentiallyConsistent)
        var after: AgentStatus?
        let drained = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            after = try await farm.agentStatus(config: config)
            return after?.upload?.held == nil && (after?.upload?.uploadedTotal ?? 0) >= 150 && (after?.buffer.pending ?? 999) < 30
        }
        #expect(drained, "\(String(describing: after?.upload)) \(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0)

        // Every sequence the agent assigned is stored exactly once; the buffer holds nothing, quarantine included.
        let statistics = try await farm.expectDeliveredExactlyOnce(device: "site-5")
        #expect(statistics.lastSequence >= 150)
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
