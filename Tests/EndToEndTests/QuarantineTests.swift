import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// `farmgate quarantine` with the real binaries: a reading the ingest refuses is listed, requeued once the cause is fixed,
/// and stored exactly once with its original sequence number.
@Suite("End to end: quarantine", .serialized)
struct QuarantineTests {
    @Test("A quarantined reading is listed, requeued by code after the cause is fixed, and stored once with its sequence")
    func listRequeueDeliver() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-q")
        let keyFile = try farm.dir.write("site-q.key", key + "\n")
        let config = try farm.agentConfig("agent.toml", device: "site-q", keyFile: keyFile, sensors: 3, interval: "1h")
        try await farm.startIngest()

        // A reading stamped two days ahead (a clock gone wrong) is committed to the buffer before the agent starts.
        let poison = try await commitFutureReading(bufferPath: farm.dir.file("site-q/buffer.sqlite"))
        var agent = try farm.startAgent(config: config, log: "agent-1.log")
        var status: AgentStatus?
        let quarantined = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            status = try await farm.agentStatus(config: config)
            return status?.buffer.quarantined == 1 && status?.buffer.pending == 0
        }
        #expect(quarantined, "the reading was not quarantined: \(String(describing: status?.buffer)) \(agent.log)")
        #expect(status?.buffer.quarantinedByCode == ["timestamp_in_future": 1])

        // Listed, as JSON lines and in the table; status shows the count by code.
        let list = try await runCommand(Farm.agentBinary, ["quarantine", "list", "--json", "--config", config])
        #expect(list.status == 0, "\(list.stderr)")
        let lines = list.stdout.split(separator: "\n")
        #expect(lines.count == 1, "\(list.stdout)")
        let row = try lines.first.map { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? nil
        #expect((row?["sequence"] as? NSNumber)?.uint64Value == poison)
        #expect(row?["code"] as? String == "timestamp_in_future")
        #expect(row?["sensor"] as? String == "tank1.ph")
        #expect((row?["value"] as? NSNumber)?.doubleValue == 6.08)
        let table = try await runCommand(Farm.agentBinary, ["quarantine", "list", "--config", config])
        #expect(table.status == 0 && table.stdout.hasPrefix("SEQ ") && table.stdout.hasSuffix("1 reading listed.\n"), "\(table.stdout)")
        #expect(table.stdout.contains("timestamp_in_future") && table.stdout.contains(" 6.08 "), "\(table.stdout)")
        let human = try await runCommand(Farm.agentBinary, ["status", "--config", config])
        #expect(human.stdout.contains("Quarantine 1 reading: timestamp_in_future 1"), "\(human.stdout)")

        // The cause is fixed: the ingest restarts with a tolerance that admits the reading. Requeue it by code.
        await farm.ingest?.stop(SIGTERM)
        let ingestText = try String(contentsOfFile: farm.ingestConfig, encoding: .utf8)
            .replacingOccurrences(of: "future_tolerance = \"10m\"", with: "future_tolerance = \"3d\"")
        try ingestText.write(toFile: farm.ingestConfig, atomically: true, encoding: .utf8)
        try await farm.startIngest()
        let requeue = try await runCommand(Farm.agentBinary, ["quarantine", "requeue", "--code", "timestamp_in_future", "--config", config])
        #expect(requeue.status == 0, "\(requeue.stdout) \(requeue.stderr)")
        #expect(requeue.stdout.contains("Requeued 1 reading"), "\(requeue.stdout)")

        let delivered = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            try await farm.storedSequences(device: "site-q").contains(poison)
        }
        #expect(delivered, "the requeued reading never reached the ingest: \(agent.log)")
        let drained = try await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
            status = try await farm.agentStatus(config: config)
            return status?.buffer.quarantined == 0 && status?.buffer.pending == 0
        }
        #expect(drained, "\(String(describing: status?.buffer))")
        #expect(await agent.stop(SIGTERM) == 0)

        // Stored exactly once, with its original sequence, and every other reading too.
        let stored = try await farm.storedSequences(device: "site-q")
        #expect(stored.filter { $0 == poison }.count == 1)
        #expect(Set(stored).count == stored.count, "duplicates stored")
        let last = try #require(status?.buffer.lastSequence)
        #expect(stored.sorted() == Array(1...last), "sequence numbers were not kept")

        // Requeue again (nothing left) exits 1 and says so; the agent was restarted to check the answer after a restart.
        agent = try farm.startAgent(config: config, log: "agent-2.log")
        let up = try await eventually(timeout: .seconds(20), every: .milliseconds(200)) { try await farm.agentStatus(config: config) != nil }
        #expect(up)
        let again = try await runCommand(Farm.agentBinary, ["quarantine", "requeue", "--all", "--config", config])
        #expect(again.status == 1 && again.stdout.contains("Requeued 0 readings"), "\(again.stdout) \(again.stderr)")
        let empty = try await runCommand(Farm.agentBinary, ["quarantine", "list", "--config", config])
        #expect(empty.status == 0 && empty.stdout.contains("Quarantine is empty."))
        #expect(await agent.stop(SIGTERM) == 0)
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    @Test("An export of 100,000 quarantined readings streams through the real CLI in pages, every row once, in order")
    func largeExport() async throws {
        let farm = try await Farm()
        let keyFile = try farm.dir.write("site-x.key", "fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n")
        let config = try farm.agentConfig("agent.toml", device: "site-x", keyFile: keyFile, sensors: 3, interval: "1h")
        // 100,000 readings quarantined in the stopped agent's buffer (no ingest runs: nothing is uploaded or refused).
        let count = 100_000
        let bufferPath = farm.dir.file("site-x/buffer.sqlite")
        let buffer = try await runOffPool { try ReadingBuffer(configuration: BufferConfiguration(path: bufferPath), logger: Logger(label: "test")) }
        let sensor = try SensorID("tank1.ph")
        try await buffer.register([SensorDescriptor(id: sensor, quantity: .ph)])
        let base = Timestamp.now().microseconds - Int64(count) * 1_000_000
        try await buffer.append((0..<count).map { Sample(sensor: sensor, timestamp: Timestamp(microseconds: base + Int64($0) * 1_000_000), value: 6.5) })
        let last = try await buffer.flush()
        try await buffer.quarantine(Dictionary(uniqueKeysWithValues: (1...last).map { ($0, "timestamp_in_future: ahead") }))
        try await buffer.close()

        let agent = try farm.startAgent(config: config, log: "agent.log")
        let up = try await eventually(timeout: .seconds(20), every: .milliseconds(200)) { try await farm.agentStatus(config: config) != nil }
        #expect(up, "\(agent.log)")
        let clock = ContinuousClock()
        let start = clock.now
        let export = try await runCommand(Farm.agentBinary, ["quarantine", "list", "--json", "--config", config])
        let elapsed = start.duration(to: clock.now)
        #expect(export.status == 0, "\(export.stderr)")
        var sequences: [UInt64] = []
        sequences.reserveCapacity(count)
        for line in export.stdout.split(separator: "\n") {
            guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                let sequence = (object["sequence"] as? NSNumber)?.uint64Value
            else {
                Issue.record("not a reading: \(line.prefix(200))")
                break
            }
            sequences.append(sequence)
        }
        #expect(sequences == Array(1...last), "exported \(sequences.count) of \(last)")
        let limited = try await runCommand(Farm.agentBinary, ["quarantine", "list", "--json", "--limit", "1500", "--config", config])
        #expect(limited.stdout.split(separator: "\n").count == 1_500)
        // A configuration edit that does not load (a reload refused it) does not hide the running agent: its [control]
        // socket, read leniently, is asked, and the problem said once, not once per page (before the fix: exit 78).
        let broken = try farm.dir.write("broken.toml", try String(contentsOfFile: config, encoding: .utf8) + "\n[upload\n")
        let despite = try await runCommand(Farm.agentBinary, ["quarantine", "list", "--json", "--limit", "1500", "--config", broken])
        #expect(despite.status == 0 && despite.stdout.split(separator: "\n").count == 1_500, "\(despite.stderr)")
        #expect(despite.stderr.components(separatedBy: "does not load").count == 2, "\(despite.stderr)")
        print("quarantine export of \(count) rows through farmgate quarantine list --json: \(elapsed)")

        // All of them back into the queue, in chunks between the agent's commits, with one answer at the end.
        let requeueStart = clock.now
        let requeue = try await runCommand(Farm.agentBinary, ["quarantine", "requeue", "--all", "--config", config])
        let requeueElapsed = requeueStart.duration(to: clock.now)
        #expect(requeue.status == 0 && requeue.stdout.contains("Requeued 100000 readings"), "\(requeue.stdout) \(requeue.stderr)")
        let status = try #require(try await farm.agentStatus(config: config))
        #expect(status.buffer.quarantined == 0 && status.buffer.pending >= count, "the agent's own samples come on top: \(status.buffer)")
        print("quarantine requeue --all of \(count) rows through the real CLI: \(requeueElapsed)")
        #expect(await agent.stop(SIGTERM) == 0)
    }

    // Before the fix the CLI gave up after 10 s, while the agent went on with the requeue: an installer saw an error for
    // a requeue that was working.
    @Test("requeue and drop wait for an agent that works on them longer than the usual 10 s")
    func longJobsAreWaitedFor() async throws {
        let scratch = try Scratch(prefix: "fg-q-slow", in: URL(fileURLWithPath: "/tmp"))
        let socket = scratch.file("control.sock")
        // An agent whose requeue and drop take 12 s (a large quarantine on a Raspberry Pi takes minutes).
        let server = ControlServer(path: socket, logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() }) { request in
            try? await Task.sleep(for: .seconds(12))
            let answer =
                request.command == "quarantine.drop"
                ? QuarantineAnswer(drop: DropOutcome(dropped: 7, notFound: []))
                : QuarantineAnswer(requeue: RequeueOutcome(requeued: 7, conflicting: [], notFound: []))
            return ControlServer.encode(ControlAnswer(ok: true, quarantine: answer))
        }
        let serving = Task { try await server.run() }
        defer { serving.cancel() }
        let up = await eventually(timeout: .seconds(10)) { FileManager.default.fileExists(atPath: socket) }
        #expect(up)
        async let requeue = runCommand(Farm.agentBinary, ["quarantine", "requeue", "--all", "--socket", socket])
        async let drop = runCommand(Farm.agentBinary, ["quarantine", "drop", "--code", "unknown_sensor", "--socket", socket])
        let (requeued, dropped) = try await (requeue, drop)
        #expect(requeued.status == 0 && requeued.stdout.contains("Requeued 7 readings"), "\(requeued.stdout) \(requeued.stderr)")
        #expect(dropped.status == 0 && dropped.stdout.contains("Dropped 7 readings"), "\(dropped.stdout) \(dropped.stderr)")
    }

    @Test(
        "Bad arguments exit non-zero with a message that says what to give",
        arguments: [
            (["quarantine", "requeue"], "--all, --code CODE or --sequence N"),
            (["quarantine", "drop", "--all", "--code", "x"], "only one of --all, --code and --sequence"),
            (["quarantine", "drop", "--code", "Not-A-Code"], "--code must be a reason code"),
            (["quarantine", "requeue", "--sequence", "0"], "sequence numbers start at 1"),
            (["quarantine", "requeue", "--sequence", "x"], "--sequence"),
            (["quarantine", "list", "--limit", "0"], "--limit must be at least 1"),
            // A negative number is the option's value (and refused for what it is), not a missing one.
            (["quarantine", "list", "--limit", "-1"], "--limit must be at least 1, not -1"),
            (["calibrate", "tank1.ph", "--tolerance", "-1"], "--tolerance must be a positive number"),
            (["calibrate", "tank1.ph", "--point", "mid"], "point mid needs the reference value of its solution, such as mid=7.00"),
            (["calibrate", "tank1.ph", "--window", "5m", "--timeout", "1m"], "--window 5m is longer than --timeout 1m"),
        ])
    func badArguments(arguments: [String], expected: String) async throws {
        let result = try await runCommand(Farm.agentBinary, arguments + ["--socket", "/tmp/fg-no-agent-here.sock"])
        #expect(result.status == 64, "a usage error: \(result.status)")
        #expect(result.stderr.contains(expected), "\(result.stderr)")
    }

    @Test("With no agent running, each command says so and how to start it, and exits 1")
    func noAgent() async throws {
        for arguments in [["quarantine", "list"], ["quarantine", "requeue", "--all"], ["quarantine", "drop", "--code", "x"], ["status"]] {
            let result = try await runCommand(Farm.agentBinary, arguments + ["--socket", "/tmp/fg-no-agent-here.sock"])
            #expect(result.status == 1, "\(arguments)")
            #expect(result.stderr.contains("Is `farmgate agent` running?") && result.stderr.contains("systemctl start farmgate"), "\(result.stderr)")
        }
        // A configuration that does not load, and no agent on the sockets it names: the configuration's error, 78.
        let dir = try Scratch(prefix: "fg-no-agent")
        let broken = try dir.write("agent.toml", "[control]\nsocket = \"gone.sock\"\n[upload\n")
        let result = try await runCommand(Farm.agentBinary, ["quarantine", "list", "--config", broken])
        #expect(result.status == 78 && result.stderr.contains(broken), "\(result.stderr)")
    }

    /// Opens the stopped agent's buffer and commits one pH reading of 6.075 stamped two days ahead; returns its sequence.
    func commitFutureReading(bufferPath: String) async throws -> UInt64 {
        let buffer = try await runOffPool { try ReadingBuffer(configuration: BufferConfiguration(path: bufferPath), logger: Logger(label: "test")) }
        let sensor = try SensorID("tank1.ph")
        try await buffer.register([SensorDescriptor(id: sensor, quantity: .ph)])
        let future = Timestamp(microseconds: Timestamp.now().microseconds + 2 * 86_400 * 1_000_000)
        try await buffer.append([Sample(sensor: sensor, timestamp: future, value: 6.075)])
        let sequence = try await buffer.flush()
        try await buffer.close()
        return sequence
    }
}
