import FarmgateAgent
import FarmgateTestSupport
import Foundation
import Testing

/// One agent per buffer file: a second agent on the same `[buffer] path` (a copied configuration with only its control
/// socket changed, or the buffer named through a link) would number readings from the same counter and deduplicate the
/// first one's samples away. It is refused at start, exit 75, and starts once the first one has stopped.
@Suite("End to end: one agent per buffer", .serialized)
struct AgentBufferLockTests {
    @Test("A second agent on the same buffer, also through a link, exits 75 naming it; the first keeps running; after it stops the second starts")
    func secondAgentRefused() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-k")
        let keyFile = try farm.dir.write("site-k.key", key + "\n")
        try await farm.startIngest()
        let config = try farm.agentConfig("agent.toml", device: "site-k", keyFile: keyFile, sensors: 3, interval: "200ms")
        let first = try farm.startAgent(config: config, log: "agent-1.log")
        #expect(try await eventually(timeout: .seconds(20)) { try await farm.agentStatus(config: config) != nil }, "\(first.log)")

        let text = try String(contentsOfFile: config, encoding: .utf8)
        try FileManager.default.createDirectory(atPath: farm.dir.file("other"), withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: farm.dir.file("linked"), withDestinationPath: farm.dir.file("site-k"))
        // A hard link names the same file under another name, whose `.lock` is another file (before the fix, a tester
        // 2026-12-05: both agents ran, each with its own -wal on one database).
        try FileManager.default.linkItem(atPath: farm.dir.file("site-k/buffer.sqlite"), toPath: farm.dir.file("other/hard.sqlite"))
        for (name, buffer) in [("copy.toml", "site-k/buffer.sqlite"), ("linked.toml", "linked/buffer.sqlite"), ("hard.toml", "other/hard.sqlite")] {
            let other = try farm.dir.write(
                name,
                text.replacingOccurrences(of: "socket = \"site-k/control.sock\"", with: "socket = \"other/\(name).sock\"")
                    .replacingOccurrences(of: "path = \"site-k/buffer.sqlite\"", with: "path = \"\(buffer)\""))
            let second = try Child(Farm.agentBinary, ["agent", "--config", other], logPath: farm.dir.file("\(name).log"))
            let exited = await eventually(timeout: .seconds(20), every: .milliseconds(100)) { !second.isRunning }
            #expect(exited, "a second agent on the buffer kept running: \(second.log)")
            if exited {
                #expect(second.process.terminationStatus == 75, "\(second.log)")
                #expect(second.log.contains("another farmgate agent is running on the buffer"), "\(second.log)")
            }
        }
        // With the `.lock` file deleted, the buffer file's own lock still holds.
        try FileManager.default.removeItem(atPath: farm.dir.file("site-k/buffer.sqlite.lock"))
        let unlocked = try Child(Farm.agentBinary, ["agent", "--config", try farm.dir.write(
            "nolock.toml", text.replacingOccurrences(of: "socket = \"site-k/control.sock\"", with: "socket = \"other/nolock.sock\""))], logPath: farm.dir.file("nolock.log"))
        let refused = await eventually(timeout: .seconds(20), every: .milliseconds(100)) { !unlocked.isRunning }
        #expect(refused && unlocked.process.terminationStatus == 75, "\(unlocked.log)")
        #expect(first.isRunning, "\(first.log)")
        #expect(try await farm.agentStatus(config: config)?.buffer.duplicatesIgnored == 0)
        #expect(await first.stop(SIGTERM) == 0)

        // The lock went with the first agent: the same configuration starts again.
        let again = try farm.startAgent(config: config, log: "agent-2.log")
        #expect(try await eventually(timeout: .seconds(20)) { try await farm.agentStatus(config: config) != nil }, "\(again.log)")
        #expect(await again.stop(SIGTERM) == 0)
        try await farm.expectDeliveredExactlyOnce(device: "site-k")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
