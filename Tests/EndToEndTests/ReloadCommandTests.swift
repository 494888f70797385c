import FarmgateAgent
import FarmgateTestSupport
import Foundation
import Testing

/// `farmgate reload`, what the agent unit's ExecReload runs: SIGHUP to the real agent, then its verdict, so that
/// `systemctl reload farmgate` fails for a file the agent refuses (with `kill -HUP` it always succeeded).
@Suite("End to end: farmgate reload", .serialized)
struct ReloadCommandTests {
    @Test("A valid file is applied (exit 0), a refused one fails with the agent's reason (78), another process's pid or no agent is 1")
    func verdicts() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-r")
        let keyFile = try farm.dir.write("site-r.key", key + "\n")
        try await farm.startIngest()
        let config = try farm.agentConfig("agent.toml", device: "site-r", keyFile: keyFile, sensors: 3, interval: "200ms")
        let agent = try farm.startAgent(config: config, log: "agent.log")
        #expect(try await eventually(timeout: .seconds(20)) { try await farm.agentStatus(config: config) != nil }, "\(agent.log)")
        let original = try String(contentsOfFile: config, encoding: .utf8)

        // A valid change: applied, and the agent runs it.
        try original.replacingOccurrences(of: "interval = \"200ms\"", with: "interval = \"300ms\"").write(toFile: config, atomically: true, encoding: .utf8)
        let applied = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--pid", "\(agent.pid)", "--timeout", "30"])
        #expect(applied.status == 0, "\(applied.stdout)\(applied.stderr)\n\(agent.log)")
        #expect(applied.stdout.contains("the agent applied \(config) (reload 1 since it started)"), "\(applied.stdout)")
        #expect(try await farm.agentStatus(config: config)?.configuration?.reloads == 1)

        // A valid move of the control socket: the verdict comes from the new socket, which the agent records.
        let moved = original.replacingOccurrences(of: "interval = \"200ms\"", with: "interval = \"300ms\"")
            .replacingOccurrences(of: "socket = \"site-r/control.sock\"", with: "socket = \"site-r/moved.sock\"")
        #expect(moved.contains("moved.sock"))
        try moved.write(toFile: config, atomically: true, encoding: .utf8)
        let movedReload = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--pid", "\(agent.pid)", "--timeout", "30"])
        #expect(movedReload.status == 0 && movedReload.stdout.contains("(reload 2 since it started)"), "\(movedReload.stdout)\(movedReload.stderr)")
        try original.replacingOccurrences(of: "interval = \"200ms\"", with: "interval = \"300ms\"").write(toFile: config, atomically: true, encoding: .utf8)
        let back = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--timeout", "30"])
        #expect(back.status == 0 && back.stdout.contains("(reload 3 since it started)"), "\(back.stdout)\(back.stderr)")

        // A file the agent refuses (a changed device id passes `config check` but not a reload): 78 with its reason.
        try original.replacingOccurrences(of: "id = \"site-r\"", with: "id = \"site-other\"").write(toFile: config, atomically: true, encoding: .utf8)
        let refused = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--timeout", "30"])
        #expect(refused.status == 78, "\(refused.stdout)\(refused.stderr)")
        #expect(refused.stderr.contains("the agent refused \(config) and keeps running the configuration it had:"), "\(refused.stderr)")
        #expect(refused.stderr.contains("site-other"), "the agent's reason: \(refused.stderr)")
        let after = try await farm.agentStatus(config: config)
        #expect(after?.configuration?.reloads == 3 && after?.configuration?.lastReloadError != nil)

        // The same refused file once more: a new verdict, not the last one taken for it (nor for an applied reload).
        let again = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--timeout", "30"])
        #expect(again.status == 78, "\(again.stdout)\(again.stderr)")

        // Another file that names this agent's socket: the agent is not signalled, it runs another file.
        let other = try farm.dir.write("other.toml", original)
        let wrongFile = try await runCommand(Farm.agentBinary, ["reload", "--config", other, "--timeout", "5"])
        #expect(wrongFile.status == 1 && wrongFile.stderr.contains("runs \(config), not \(other); it was not signalled"), "\(wrongFile.stderr)")
        #expect(try await farm.agentStatus(config: config)?.configuration?.reloads == 3, "signalled anyway")
        // systemd's $MAINPID must be the agent that answers on the socket.
        let wrongPid = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--pid", "\(getpid())"])
        #expect(wrongPid.status == 1 && wrongPid.stderr.contains("is process \(agent.pid), not \(getpid()); nothing was signalled"), "\(wrongPid.stderr)")
        // Not only the socket is suspected: a wrong --pid is said first (a tester, 2026-12-07).
        #expect(wrongPid.stderr.contains("Either --pid names another process"), "\(wrongPid.stderr)")
        let badTimeout = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--timeout", "0"])
        #expect(badTimeout.status == 64 && badTimeout.stderr.contains("--timeout must be between 1 and 3600"), "\(badTimeout.stderr)")

        // A file emptied under the running agent names no socket: said first (a tester, 2026-12-07: only "no such socket
        // ... is farmgate agent running?" of the default socket).
        let emptied = try farm.dir.write("emptied.toml", "")
        let unread = try await runCommand(Farm.agentBinary, ["reload", "--config", emptied, "--pid", "\(agent.pid)", "--timeout", "5"])
        #expect(unread.status == 1 && unread.stderr.contains("\(emptied) does not load ("), "\(unread.stderr)")
        #expect(unread.stderr.contains("kill -HUP \(agent.pid)"), "\(unread.stderr)")

        #expect(await agent.stop(SIGTERM) == 0)
        try original.write(toFile: config, atomically: true, encoding: .utf8)
        let gone = try await runCommand(Farm.agentBinary, ["reload", "--config", config])
        #expect(gone.status == 1, "\(gone.stdout)\(gone.stderr)")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    // Before the fix (a tester, 2026-12-07) an agent started with a relative path was signalled whatever -c named, and
    // its verdict on its own file was printed as if it were about that one.
    @Test("An agent started with a relative configuration path is compared through its working directory")
    func relativeAgentPath() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-q")
        let keyFile = try farm.dir.write("site-q.key", key + "\n")
        try await farm.startIngest()
        let config = try farm.agentConfig("agent.toml", device: "site-q", keyFile: keyFile, sensors: 1, interval: "1s")
        let directory = URL(fileURLWithPath: config).deletingLastPathComponent().path
        let agent = try Child(
            "/bin/sh", ["-c", "cd \"$0\" && exec \"$1\" agent --config agent.toml", directory, Farm.agentBinary],
            logPath: farm.dir.file("agent.log"))
        #expect(try await eventually(timeout: .seconds(20)) { try await farm.agentStatus(config: config) != nil }, "\(agent.log)")
        #expect(try await farm.agentStatus(config: config)?.configuration?.file == "agent.toml")
        let other = try farm.dir.write("other.toml", try String(contentsOfFile: config, encoding: .utf8))
        let wrongFile = try await runCommand(Farm.agentBinary, ["reload", "--config", other, "--timeout", "5"])
        #expect(wrongFile.status == 1 && wrongFile.stderr.contains("runs agent.toml, not \(other); it was not signalled"), "\(wrongFile.stderr)")
        #expect(try await farm.agentStatus(config: config)?.configuration?.reloads == 0, "signalled anyway")
        let own = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--timeout", "30"])
        #expect(own.status == 0 && own.stdout.contains("(reload 1 since it started)"), "\(own.stdout)\(own.stderr)")
        #expect(await agent.stop(SIGTERM) == 0)
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    // Before the fix (a tester, 2026-12-06) a sensor id reused with another quantity relabelled the readings of it still
    // buffered: pH readings went up as temperatures.
    @Test("A reload that changes a sensor's quantity while the buffer holds readings of it is refused, and the agent keeps running")
    func quantityChangeUnderBufferedReadings() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-q")
        let keyFile = try farm.dir.write("site-q.key", key + "\n")
        // No ingest: every reading stays in the buffer.
        let config = try farm.agentConfig("agent.toml", device: "site-q", keyFile: keyFile, sensors: 1, interval: "200ms")
        let agent = try farm.startAgent(config: config, log: "agent.log")
        #expect(try await eventually(timeout: .seconds(20)) { (try await farm.agentStatus(config: config)?.buffer.pending ?? 0) > 0 }, "\(agent.log)")
        let original = try String(contentsOfFile: config, encoding: .utf8)
        try original.replacingOccurrences(of: "quantity = \"ph\"", with: "quantity = \"orp\"").write(toFile: config, atomically: true, encoding: .utf8)
        let refused = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--timeout", "30"])
        #expect(refused.status == 78, "\(refused.stdout)\(refused.stderr)\n\(agent.log)")
        #expect(refused.stderr.contains("sensor \"tank1.ph\": quantity changed from ph to orp, but the buffer still holds"), "\(refused.stderr)")
        #expect(try await farm.agentStatus(config: config)?.configuration?.lastReloadError != nil)
        #expect(agent.isRunning, "\(agent.log)")
        // Started with the changed file: the agent runs (it must, to send those readings), and keeps the sensor back,
        // unsampled, instead of relabelling its readings.
        #expect(await agent.stop() == 0, "\(agent.log)")
        let restarted = try farm.startAgent(config: config, log: "agent-2.log")
        #expect(try await eventually(timeout: .seconds(20)) { try await farm.agentStatus(config: config) != nil }, "\(restarted.log)")
        #expect(restarted.log.contains("Sensor not sampled: its quantity changed"), "\(restarted.log)")
        #expect(restarted.isRunning)
        #expect(await restarted.stop() == 0, "\(restarted.log)")
    }

    @Test("After a reload refused for a new control socket, status finds the agent where it still answers, with RELOAD REFUSED")
    func statusAfterRefusedSocketMove() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-m")
        let keyFile = try farm.dir.write("site-m.key", key + "\n")
        try await farm.startIngest()
        let config = try farm.agentConfig("agent.toml", device: "site-m", keyFile: keyFile, sensors: 3, interval: "200ms")
        let agent = try farm.startAgent(config: config, log: "agent.log")
        #expect(try await eventually(timeout: .seconds(20)) { try await farm.agentStatus(config: config) != nil }, "\(agent.log)")
        // A socket under a regular file: its directory cannot be made, so the reload is refused and the old socket stays.
        // The file no longer loads (`config check` refuses such a path): `reload` and `status` find the agent through
        // the socket it recorded beside its buffer.
        _ = try farm.dir.write("plain-file", "x")
        let original = try String(contentsOfFile: config, encoding: .utf8)
        try original.replacingOccurrences(of: "socket = \"site-m/control.sock\"", with: "socket = \"plain-file/control.sock\"")
            .write(toFile: config, atomically: true, encoding: .utf8)
        let refused = try await runCommand(Farm.agentBinary, ["reload", "--config", config, "--pid", "\(agent.pid)", "--timeout", "30"])
        #expect(refused.status == 78, "\(refused.stdout)\(refused.stderr)")
        let status = try await runCommand(Farm.agentBinary, ["status", "--config", config])
        #expect(status.status == 0, "\(status.stderr)")
        #expect(status.stdout.contains("RELOAD REFUSED"), "\(status.stdout)")
        #expect(status.stderr.contains("does not load") && status.stderr.contains("the agent on \(farm.dir.file("site-m/control.sock"))"), "\(status.stderr)")
        #expect(await agent.stop(SIGTERM) == 0)
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
