import FarmgateAgent
import FarmgateTestSupport
import Foundation
import Testing

/// `farmgate sensor read` with the real binary, with and without a running agent, and an agent that starts while an
/// EZO circuit's port is missing.
@Suite("End to end: sensor read and devices missing at start", .serialized)
struct SensorReadTests {
    let farmgate = builtExecutable("farmgate")

    func config(_ dir: Scratch, port: String) throws -> String {
        try dir.write(
            "agent.toml",
            """
            [device]
            id = "site"

            [buffer]
            path = "buffer.sqlite"
            commit_interval = "100ms"

            [control]
            socket = "control.sock"

            [clock]
            check = false

            [[sensor]]
            id = "tank1.ph"
            driver = "ezo"
            quantity = "ph"
            port = "\(port)"
            interval = "1s"

            [[sensor]]
            id = "tank1.temp"
            driver = "simulated"
            quantity = "temperature"
            interval = "200ms"
            fault_rate = 0
            latency = "0ms"

            """)
    }

    func decode(_ text: String) throws -> SensorReadAnswer {
        try JSONDecoder().decode(SensorReadAnswer.self, from: Data(text.utf8))
    }

    @Test("Reads directly without an agent and through the agent when one runs; unknown sensor 64, bad configuration 78")
    func readDirectlyAndThroughAgent() async throws {
        let dir = try Scratch(prefix: "fg-read", in: URL(fileURLWithPath: "/tmp"))
        let ph = try EZOSimulator(.ph, path: dir.file("by-id-ph"), timeScale: 0.2, values: { index, _ in 6 + Double(index) / 100 })
        defer { ph.stop() }
        let config = try config(dir, port: ph.path)

        let direct = try await runCommand(farmgate, ["sensor", "read", "tank1.ph", "--config", config])
        #expect(direct.status == 0, "\(direct.stderr)")
        #expect(direct.stdout.hasPrefix("tank1.ph: 6.000 pH (read directly (no agent running)"), "\(direct.stdout)")
        // The circuit has no temperature_sensor: what applies is the circuit's own setting, not "without the agent".
        #expect(direct.stdout.contains("no temperature_sensor set"), "\(direct.stdout)")
        #expect(!direct.stdout.contains("without the agent"), "\(direct.stdout)")
        let json = try await runCommand(farmgate, ["sensor", "read", "tank1.ph", "--json", "--config", config])
        #expect(json.status == 0, "\(json.stderr)")
        let answer = try decode(json.stdout)
        #expect(answer.ok && answer.reading?.via == "direct" && answer.reading?.value == 6.01, "\(json.stdout)")
        #expect(ph.served.map(\.line) == ["6.000", "6.010"])

        let unknown = try await runCommand(farmgate, ["sensor", "read", "tank9.ph", "--config", config])
        #expect(unknown.status == 64)
        #expect(unknown.stderr.contains("no sensor \"tank9.ph\"") && unknown.stderr.contains("tank1.ph, tank1.temp"), "\(unknown.stderr)")
        let bad = try dir.write("bad.toml", "[device]\nid = \"site\"\n[[sensor]]\nid = \"x.ph\"\ndriver = \"ezo\"\nquantity = \"ph\"\n")
        let badRun = try await runCommand(farmgate, ["sensor", "read", "x.ph", "--config", bad])
        #expect(badRun.status == 78)
        #expect(badRun.stderr.contains("port"), "\(badRun.stderr)")

        // With the agent running, the agent reads (it holds the port; a direct read would find it busy).
        let agent = try Child(farmgate, ["agent", "--config", config], logPath: dir.file("agent.log"))
        let up = try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            try await runCommand(farmgate, ["status", "--config", config]).status == 0 && ph.served.count >= 3
        }
        #expect(up, "\(agent.log)")
        let viaAgent = try await runCommand(farmgate, ["sensor", "read", "tank1.ph", "--json", "--config", config])
        #expect(viaAgent.status == 0, "\(viaAgent.stderr)")
        let agentAnswer = try decode(viaAgent.stdout)
        #expect(agentAnswer.reading?.via == "agent")
        #expect(agentAnswer.reading?.value.map { value in ph.served.contains { Double($0.line) == value } } == true)
        let unknownViaAgent = try await runCommand(farmgate, ["sensor", "read", "nope.ph", "--config", config])
        #expect(unknownViaAgent.status == 64, "\(unknownViaAgent.stderr)")
        // Said as what it is: the running agent's sensors, not the file's (a sensor added since is not one yet).
        #expect(unknownViaAgent.stderr.contains("the running agent has no sensor \"nope.ph\"; it runs: tank1.ph"), "\(unknownViaAgent.stderr)")
        // A sensor added to the file but not reloaded: the file has it, the agent does not, and the message says to reload.
        let text = try String(contentsOfFile: config, encoding: .utf8)
        try (text + "\n[[sensor]]\nid = \"added.ph\"\ndriver = \"simulated\"\nquantity = \"ph\"\n").write(toFile: config, atomically: true, encoding: .utf8)
        let notReloaded = try await runCommand(farmgate, ["sensor", "read", "added.ph", "--config", config])
        #expect(notReloaded.status == 1 && notReloaded.stderr.contains("but the running agent does not: reload it"), "\(notReloaded.stderr)")
        // The socket moved in the file, not reloaded: the agent still answers on the one it recorded beside its buffer
        // (a tester, 2026-12-07: the read went direct and found the agent's port busy, where status found the agent).
        let edited = try String(contentsOfFile: config, encoding: .utf8).replacingOccurrences(of: "socket = \"control.sock\"", with: "socket = \"moved.sock\"")
        try edited.write(toFile: config, atomically: true, encoding: .utf8)
        let movedSocket = try await runCommand(farmgate, ["sensor", "read", "tank1.ph", "--json", "--config", config])
        #expect(movedSocket.status == 0, "\(movedSocket.stderr)")
        #expect((try? decode(movedSocket.stdout))?.reading?.via == "agent", "\(movedSocket.stdout) \(movedSocket.stderr)")
        #expect(await agent.stop(SIGTERM) == 0, "\(agent.log)")
    }

    @Test("An EZO port missing at start: the agent runs the sensor in error, shows it in status, and reads it once it appears")
    func missingPortAtStart() async throws {
        let dir = try Scratch(prefix: "fg-miss", in: URL(fileURLWithPath: "/tmp"))
        let port = dir.file("by-id-ph")
        let config = try config(dir, port: port)

        let direct = try await runCommand(farmgate, ["sensor", "read", "tank1.ph", "--config", config])
        #expect(direct.status == 1)
        #expect(direct.stderr.contains("does not exist: is the USB adapter plugged in?"), "\(direct.stderr)")

        let agent = try Child(farmgate, ["agent", "--config", config], logPath: dir.file("agent.log"))
        let inError = try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            let result = try await runCommand(farmgate, ["status", "--json", "--config", config])
            guard result.status == 0, let status = try? JSONDecoder().decode(AgentStatus.self, from: Data(result.stdout.utf8)) else {
                return false
            }
            let ph = status.sensors.first { $0.id == "tank1.ph" }
            let temp = status.sensors.first { $0.id == "tank1.temp" }
            return ph?.lastError?.hasPrefix("disconnected") == true && (temp?.readsOK ?? 0) >= 3
        }
        #expect(inError, "status never showed the missing port: \(agent.log)")
        #expect(agent.isRunning)
        let human = try await runCommand(farmgate, ["status", "--config", config])
        #expect(human.stdout.contains("does not exist"), "\(human.stdout)")
        let viaAgent = try await runCommand(farmgate, ["sensor", "read", "tank1.ph", "--config", config])
        #expect(viaAgent.status == 1)
        #expect(viaAgent.stderr.contains("is the USB adapter plugged in?") && viaAgent.stderr.contains("running agent"), "\(viaAgent.stderr)")

        // The adapter is plugged in: the same agent picks the circuit up.
        let ph = try EZOSimulator(.ph, path: port, timeScale: 0.2, values: { index, _ in 7 + Double(index) / 100 })
        defer { ph.stop() }
        let reading = try await eventually(timeout: .seconds(60), every: .milliseconds(300)) {
            let result = try await runCommand(farmgate, ["status", "--json", "--config", config])
            guard let status = try? JSONDecoder().decode(AgentStatus.self, from: Data(result.stdout.utf8)) else { return false }
            return (status.sensors.first { $0.id == "tank1.ph" }?.readsOK ?? 0) >= 2
        }
        #expect(reading, "the circuit was not read after it appeared: \(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0, "\(agent.log)")
    }
}
