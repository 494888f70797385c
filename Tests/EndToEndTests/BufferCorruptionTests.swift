import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

/// A buffer file that turns corrupt under the running agent (a bad SD card block): the real agent stops with an error that
/// names the file, exits non-zero so that systemd restarts it, and the restarted agent runs on a fresh buffer whose sequence
/// numbers are above everything the damaged one handed out.
@Suite("End to end: a buffer damaged while the agent runs", .serialized)
struct BufferCorruptionTests {
    /// Checkpoints the WAL into the file (which also makes the agent's connection drop its page cache at its next
    /// transaction) and overwrites the root pages of the readings table and its indexes with bytes no b-tree page has.
    /// Fails harmlessly when the agent has moved the file away already.
    static func damage(_ path: String) throws {
        let pageSize: Int64
        let roots: [Int64]
        do {
            let connection = try SQLiteConnection(path: path, mode: .readWrite, busyTimeoutMilliseconds: 2_000)
            pageSize = try connection.queryInt("PRAGMA page_size") ?? 1024
            roots = try connection.query("SELECT rootpage FROM sqlite_master WHERE tbl_name = 'readings' AND rootpage > 1")
                .compactMap { $0.first?.int64 }
            try connection.query("PRAGMA wal_checkpoint(TRUNCATE)")
        }
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        for root in roots {
            try handle.seek(toOffset: UInt64((root - 1) * pageSize))
            try handle.write(contentsOf: [UInt8](repeating: 0xFF, count: Int(pageSize)))
        }
        try handle.synchronize()
    }

    // Before the fix the agent logged failing commits for ever and kept beating the watchdog: systemd never restarted it.
    @Test("The agent exits non-zero naming the damaged file; started again it numbers above the old buffer")
    func damagedWhileRunning() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-c")
        let keyFile = try farm.dir.write("site-c.key", key + "\n")
        try await farm.startIngest()
        let config = try farm.agentConfig("agent.toml", device: "site-c", keyFile: keyFile, sensors: 3, interval: "100ms")
        let bufferPath = farm.dir.file("site-c/buffer.sqlite")

        var agent = try farm.startAgent(config: config, log: "agent-1.log")
        let flowing = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            try await farm.storedSequences(device: "site-c").count >= 30
        }
        #expect(flowing, "\(agent.log)")

        // The damage, again until the agent meets it (its next commit or read normally does, within a commit interval).
        var exited = false
        for _ in 0..<30 where !exited {
            try? Self.damage(bufferPath)
            exited = await eventually(timeout: .seconds(1), every: .milliseconds(50)) { !agent.isRunning }
        }
        #expect(exited, "the agent went on over a damaged buffer: \(agent.log)")
        let status = await agent.stop(SIGTERM)
        #expect(status == 1, "exit status \(status): \(agent.log)")
        let log = agent.log
        #expect(log.contains("Buffer file is corrupt") && log.contains(bufferPath), "\(log)")
        #expect(log.components(separatedBy: "Buffer file is corrupt").count == 2, "said once: \(log)")
        #expect(log.contains("restarts"), "says that a restart recovers it: \(log)")
        let names = try FileManager.default.contentsOfDirectory(atPath: farm.dir.file("site-c"))
        #expect(names.contains { $0.hasPrefix("buffer.sqlite.corrupt-") }, "moved aside: \(names)")
        let sidecar = try #require(UInt64(try String(contentsOfFile: bufferPath + ".seq", encoding: .utf8).trimmingWhitespace()))
        let firstLife = try await farm.storedSequences(device: "site-c")
        #expect(firstLife.allSatisfy { $0 <= sidecar }, "the sidecar covers every number the damaged buffer handed out")

        // What systemd does next (Restart=always): start it again. A fresh buffer, numbered above the old one.
        agent = try farm.startAgent(config: config, log: "agent-2.log")
        let gap = UInt64(ReadingBuffer.recoverySequenceGap)
        let delivered = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            try await farm.storedSequences(device: "site-c").contains { $0 > sidecar + gap }
        }
        #expect(delivered, "\(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0)
        let stored = try await farm.storedSequences(device: "site-c")
        #expect(Set(stored).count == stored.count, "a sequence number stored twice")
        #expect(stored.filter { $0 > sidecar }.allSatisfy { $0 > sidecar + gap }, "the second life starts above the gap")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
