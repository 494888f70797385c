import FarmgateAgent
import FarmgateTestSupport
import Foundation
import Testing

/// `farmgate scan` with the real binary beside a running agent.
@Suite("End to end: farmgate scan", .serialized)
struct ScanCommandTests {
    let farmgate = builtExecutable("farmgate")

    @Test("Finds a free EZO circuit, leaves the running agent's port alone, prints pasteable tables; bad ranges exit 64")
    func scanBesideAgent() async throws {
        let dir = try Scratch(prefix: "fg-scan", in: URL(fileURLWithPath: "/tmp"))
        let dev = dir.file("dev")
        try FileManager.default.createDirectory(atPath: dev + "/serial/by-id", withIntermediateDirectories: true)
        let owned = try EZOSimulator(.ph, path: dev + "/serial/by-id/usb-agent-ph", timeScale: 0.2, values: { _, _ in 6 })
        let free = try EZOSimulator(.rtd, path: dev + "/ttyUSB0", values: { _, _ in 21 })
        defer {
            owned.stop()
            free.stop()
        }
        let config = try dir.write(
            "agent.toml",
            """
            [device]
            id = "site"
            [buffer]
            path = "buffer.sqlite"
            [control]
            socket = "control.sock"
            [clock]
            check = false
            [[sensor]]
            id = "tank1.ph"
            driver = "ezo"
            quantity = "ph"
            port = "\(owned.path)"
            interval = "1s"

            """)
        let agent = try Child(farmgate, ["agent", "--config", config], logPath: dir.file("agent.log"))
        let up = try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            try await runCommand(farmgate, ["status", "--config", config]).status == 0 && owned.served.count >= 1
        }
        #expect(up, "\(agent.log)")
        let commandsBefore = owned.commands.count

        let arguments = ["scan", "--config", config, "--device-dir", dev, "--w1-root", dir.file("w1"), "--modbus-ids", "1-2", "--port-timeout", "10s"]
        let json = try await runCommand(farmgate, arguments + ["--json"])
        #expect(json.status == 0, "\(json.stderr)")
        let report = try JSONDecoder().decode(ScanReport.self, from: Data(json.stdout.utf8))
        #expect(report.serialPorts.first { $0.path == owned.path }?.state == .agent, "\(json.stdout)")
        #expect(report.serialPorts.first { $0.path == free.path }?.ezo?.circuit == "RTD", "\(json.stdout)")
        #expect(report.gpio.message?.contains("no GPIO chip") == true)
        // The agent's circuit got only the agent's own commands meanwhile (its reads), never the scan's `i`.
        #expect(!owned.commands.dropFirst(commandsBefore).contains { $0.lowercased().hasSuffix("i") }, "\(owned.commands)")

        let text = try await runCommand(farmgate, arguments)
        #expect(text.stdout.contains("used by the running agent (sensor tank1.ph); not probed"), "\(text.stdout)")
        #expect(text.stdout.contains("driver = \"ezo\"\nquantity = \"temperature\"\nport = \"\(free.path)\""), "\(text.stdout)")
        #expect(await agent.stop(SIGTERM) == 0, "\(agent.log)")

        // A relative --w1-root: the tables to paste name it absolute, as a configuration takes it (a tester, 2026-12-07).
        try FileManager.default.createDirectory(atPath: dir.file("w1rel/28-000000000001"), withIntermediateDirectories: true)
        _ = try dir.write("w1rel/28-000000000001/w1_slave", "50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=21437\n")
        let relative = try await runCommand(
            "/bin/sh", ["-c", "cd \"$0\" && exec \"$1\" scan --device-dir \"$2\" --w1-root ./w1rel/ --port-timeout 2s", dir.path, farmgate, dev])
        #expect(relative.stdout.contains("w1_root = \"\(dir.path)/w1rel\""), "\(relative.stdout) \(relative.stderr)")

        let bad = try await runCommand(farmgate, ["scan", "--modbus-ids", "0-300"])
        #expect(bad.status == 64)
        #expect(bad.stderr.contains("--modbus-ids must be a range"), "\(bad.stderr)")

        // Options a tester found taken without a word (2026-12-07): a timeout no probe can meet, a port that is a file
        // or a directory, an empty or missing directory to look in.
        let notes = try dir.write("notes.txt", "notes\n")
        for (options, says) in [
            (["--port-timeout", "0s"], "--port-timeout must be between 1s and 1h"), (["--port", notes], "is not a serial port (a character device) but a regular file"),
            (["--port", dir.path], "but a directory"), (["--w1-root", ""], "--w1-root is empty"),
            (["--modbus-timeout", "5ms"], "--modbus-timeout must be a duration from 20ms to 5s"),
            (["--device-dir", dir.file("nosuch")], "--device-dir \(dir.file("nosuch")) is not a directory"),
        ] {
            let refused = try await runCommand(farmgate, ["scan"] + options)
            #expect(refused.status == 64 && refused.stderr.contains(says), "\(options): \(refused.stderr)")
        }
        // A configuration that does not load is said to leave the agent's ports unknown, not silently ignored.
        let broken = try dir.write("broken.toml", "garbage = [")
        let unknown = try await runCommand(farmgate, ["scan", "--config", broken, "--device-dir", dev, "--w1-root", dir.file("w1"), "--port-timeout", "2s"])
        #expect(unknown.stderr.contains("warning: \(broken):1:") && unknown.stderr.contains("running agent's serial ports are not known"), "\(unknown.stderr)")
    }
}
