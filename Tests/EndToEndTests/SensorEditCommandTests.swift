import FarmgateTestSupport
import Foundation
import Testing

/// `farmgate sensor add`, `sensor test` (the alias of `read`) and `sensor remove` on a real file, as an installer runs them.
@Suite struct SensorEditCommandTests {
    @Test func addTestAndRemoveASensor() async throws {
        let scratch = try Scratch(prefix: "fg-sensor-edit")
        let config = try scratch.write("agent.toml", "# a new site\n[device]\nid = \"site-1\"\n[buffer]\npath = \"\(scratch.file("buffer.sqlite"))\"\n")
        #expect(chmod(config, 0o640) == 0)
        // The first sensor of a file that has none yet.
        let added = try await runCommand(Farm.agentBinary, ["sensor", "add", "tank1.ph", "driver=simulated", "quantity=ph", "interval=5s", "-c", config])
        #expect(added.status == 0, "\(added.stderr)")
        #expect(added.stdout.contains("id = \"tank1.ph\"\ndriver = \"simulated\"\nquantity = \"ph\"\ninterval = \"5s\""), "\(added.stdout)")
        let text = try String(contentsOfFile: config, encoding: .utf8)
        #expect(text.hasPrefix("# a new site\n[device]\n"), "\(text)")
        var info = stat()
        #expect(stat(config, &info) == 0 && info.st_mode & 0o777 == 0o640, "the file's mode was not kept")
        let check = try await runCommand(Farm.agentBinary, ["config", "check", "-c", config])
        #expect(check.status == 0 && check.stdout.contains("tank1.ph"), "\(check.stdout)\(check.stderr)")
        // `sensor test` reads it (no agent runs: directly).
        let test = try await runCommand(Farm.agentBinary, ["sensor", "test", "tank1.ph", "-c", config])
        #expect(test.status == 0 && test.stdout.contains("tank1.ph: ") && test.stdout.contains("pH"), "\(test.stdout)\(test.stderr)")
        // A bad setting changes nothing.
        let bad = try await runCommand(Farm.agentBinary, ["sensor", "add", "tank1.ec", "driver=simulated", "quantity=ec", "interval=ten", "-c", config])
        #expect(bad.status == 64 && bad.stderr.contains("interval") && bad.stderr.contains("nothing was written"), "\(bad.stderr)")
        #expect(try String(contentsOfFile: config, encoding: .utf8) == text)
        // The only sensor cannot go (the agent would not load); with a second one it can.
        let only = try await runCommand(Farm.agentBinary, ["sensor", "remove", "tank1.ph", "-c", config])
        #expect(only.status == 64 && only.stderr.contains("no sensors configured"), "\(only.stderr)")
        #expect(try await runCommand(Farm.agentBinary, ["sensor", "add", "tank1.ec", "driver=simulated", "quantity=ec", "-c", config]).status == 0)
        let removed = try await runCommand(Farm.agentBinary, ["sensor", "remove", "tank1.ph", "-c", config])
        #expect(removed.status == 0, "\(removed.stderr)")
        let after = try String(contentsOfFile: config, encoding: .utf8)
        #expect(!after.contains("tank1.ph") && after.contains("tank1.ec"), "\(after)")
        let unknown = try await runCommand(Farm.agentBinary, ["sensor", "remove", "tank1.ph", "-c", config])
        #expect(unknown.status == 64 && unknown.stderr.contains("has no sensor \"tank1.ph\"; it has tank1.ec"), "\(unknown.stderr)")
        // A file its owner made read-only is not replaced.
        #expect(chmod(config, 0o444) == 0)
        let readOnly = try await runCommand(Farm.agentBinary, ["sensor", "add", "t.ro", "driver=simulated", "quantity=ph", "-c", config])
        #expect(readOnly.status == 73 && readOnly.stderr.contains("is read-only (mode 444)"), "\(readOnly.stderr)")
        #expect(chmod(config, 0o640) == 0)
        // A -c whose directory does not exist names the file asked for, not only the directory.
        let missing = try await runCommand(Farm.agentBinary, ["sensor", "add", "t.m", "driver=simulated", "quantity=ph", "-c", "/nonexistent-fg/agent.toml"])
        #expect(missing.status == 78 && missing.stderr.contains("cannot open /nonexistent-fg/agent.toml: its directory /nonexistent-fg cannot be opened"), "\(missing.stderr)")
    }

    // Before the fix (a tester, 2026-12-06) parallel adds replaced each other's edits, all saying "Added".
    @Test func parallelAddsAllLand() async throws {
        let scratch = try Scratch(prefix: "fg-sensor-edit")
        let config = try scratch.write(
            "agent.toml", "[device]\nid = \"site-1\"\n[[sensor]]\nid = \"first\"\ndriver = \"simulated\"\nquantity = \"ph\"\n")
        let results = try await withThrowingTaskGroup(of: Int32.self) { group in
            for index in 0..<8 {
                group.addTask {
                    try await runCommand(Farm.agentBinary, ["sensor", "add", "p.\(index)", "driver=simulated", "quantity=ph", "-c", config]).status
                }
            }
            return try await group.reduce(into: [Int32]()) { $0.append($1) }
        }
        #expect(results == Array(repeating: 0, count: 8))
        let text = try String(contentsOfFile: config, encoding: .utf8)
        for index in 0..<8 { #expect(text.contains("id = \"p.\(index)\""), "p.\(index) lost:\n\(text)") }
    }
}
