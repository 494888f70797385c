import FarmgateTestSupport
import Foundation
import Testing

/// The unit files as systemd itself judges them, offline: `systemd-analyze verify` and `security --offline=true`.
///
/// `verify` checks that every ExecStart= binary exists and is executable, and the units name
/// /usr/local/bin. So the test verifies copies with that directory rewritten to where `swift build` put the real binaries:
/// every other line is verified as shipped. (`--root=` would need a whole systemd tree, sysinit.target and the rest.)
@Suite("systemd units")
struct SystemdUnitTests {
    static let units = ["farmgate.service", "farmgate-ingest.service"]

    static var unitDirectory: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("systemd")
    }

    static func analyze(_ arguments: [String]) async throws -> (status: Int32, stdout: String, stderr: String) {
        let tool = "/usr/bin/systemd-analyze"
        guard FileManager.default.isExecutableFile(atPath: tool) else {
            Issue.record("systemd-analyze is missing: install the systemd package (.ci/install-deps does)")
            throw CancellationError()
        }
        return try await runCommand(tool, arguments)
    }

    @Test("systemd-analyze verify finds nothing to say about either unit")
    func verify() async throws {
        let scratch = try Scratch(prefix: "fg-units")
        let binaries = URL(fileURLWithPath: builtExecutable("farmgate")).deletingLastPathComponent().path
        var copies: [String] = []
        for unit in Self.units {
            let text = try String(contentsOf: Self.unitDirectory.appendingPathComponent(unit), encoding: .utf8)
            #expect(text.contains("/usr/local/bin/"))
            copies.append(try scratch.write(unit, text.replacingOccurrences(of: "/usr/local/bin/", with: binaries + "/")))
        }
        let result = try await Self.analyze(["verify", "--man=no"] + copies)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect((result.stdout + result.stderr).isEmpty, "\(result.stdout)\(result.stderr)")
    }

    @Test("Both units are exposed at most 2.0 by systemd-analyze security --offline=true", arguments: units)
    func exposure(unit: String) async throws {
        let result = try await Self.analyze(["security", "--offline=true", Self.unitDirectory.appendingPathComponent(unit).path])
        let text = result.stdout + result.stderr
        let marker = "Overall exposure level for \(unit): "
        let figure = text.components(separatedBy: "\n").first { $0.contains(marker) }
            .flatMap { $0.components(separatedBy: marker).last?.split(separator: " ").first }.flatMap { Double($0) }
        let exposure = try #require(figure, "no exposure figure in: \(text)")
        #expect(exposure <= 2.0, "\(unit): exposure \(exposure)\n\(text)")
    }

    @Test("The agent unit is a notify service with a watchdog and still reaches serial ports and GPIO chips")
    func agentEssentials() throws {
        let text = try String(contentsOf: Self.unitDirectory.appendingPathComponent("farmgate.service"), encoding: .utf8)
        let lines = Set(text.split(separator: "\n").map(String.init))
        for line in [
            "Type=notify", "NotifyAccess=main", "WatchdogSec=2min", "Restart=always", "DeviceAllow=char-ttyUSB rw", "DeviceAllow=char-ttyACM rw",
            "DeviceAllow=char-ttyAMA rw", "DeviceAllow=char-gpiochip rw", "SupplementaryGroups=dialout gpio", "ProtectSystem=strict",
            "StateDirectory=farmgate", "RuntimeDirectory=farmgate", "MemoryDenyWriteExecute=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallFilter=@system-service",
            "ExecStart=/usr/local/bin/farmgate agent --config /etc/farmgate/agent.toml",
            // `systemctl reload` waits for the agent's verdict and fails for a refused file.
            "ExecReload=/usr/local/bin/farmgate reload --config /etc/farmgate/agent.toml --pid $MAINPID",
        ] {
            #expect(lines.contains(line), "farmgate.service lacks \(line)")
        }
        // PrivateDevices= would hide /dev/serial/by-id and the ports themselves.
        #expect(!lines.contains("PrivateDevices=yes"))
        let ingest = try String(contentsOf: Self.unitDirectory.appendingPathComponent("farmgate-ingest.service"), encoding: .utf8)
        #expect(ingest.contains("Type=notify\n") && ingest.contains("LimitNOFILE="))
    }

    /// The directives of a unit file: `Key=value` lines, comments and blank lines left out.
    static func directives(_ unit: String) throws -> [(key: String, value: String)] {
        let text = try String(contentsOf: unitDirectory.appendingPathComponent(unit), encoding: .utf8)
        return text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty && !$0.hasPrefix("#") && !$0.hasPrefix(";") && !$0.hasPrefix("[") }
            .compactMap { line in
                guard let equals = line.firstIndex(of: "=") else { return nil }
                return (String(line[..<equals]).trimmingCharacters(in: .whitespaces), String(line[line.index(after: equals)...]))
            }
    }

    /// systemd applies RestartPreventExitStatus= only to the main process's exit status (systemd issue #11868): a
    /// configuration check in ExecStartPre= (or ExecStartPost=) that exits 78 fails the start with result exit-code, and
    /// Restart=always restarts it every RestartSec= until the start limit (ExecCondition= would instead skip the start
    /// silently, the unit not failed). So the units run no command before or after the main one, keep
    /// RestartPreventExitStatus=78, and their ExecStart=, given an invalid configuration, itself exits 78.
    @Test("An invalid configuration (exit 78) is not restarted: no ExecStartPre=, and ExecStart= itself exits 78", arguments: units)
    func configurationErrorIsNotRestarted(unit: String) async throws {
        let directives = try Self.directives(unit)
        let keys = directives.map(\.key)
        #expect(keys.contains("Restart"), "\(unit) restarts")
        #expect(
            directives.contains { $0.key == "RestartPreventExitStatus" && $0.value.split(separator: " ").contains("78") },
            "\(unit) lacks RestartPreventExitStatus=78")
        for key in ["ExecStartPre", "ExecCondition", "ExecStartPost"] {
            #expect(!keys.contains(key), "\(unit) has \(key)=: its exit 78 would be restarted (systemd applies RestartPreventExitStatus= to the main process only)")
        }
        let starts = directives.filter { $0.key == "ExecStart" }.map(\.value)
        let start = try #require(starts.count == 1 ? starts.first : nil, "\(unit): one ExecStart= (\(starts))")
        // The unit's own command line, run on the built binary with an invalid configuration in place of the shipped one.
        var words = start.split(separator: " ").map(String.init)
        let scratch = try Scratch(prefix: "fg-unit-78")
        let binaries = URL(fileURLWithPath: builtExecutable("farmgate")).deletingLastPathComponent().path
        let config = try #require(words.firstIndex(of: "--config").map { $0 + 1 }, "\(unit): ExecStart= names no --config: \(start)")
        #expect(words[0].hasPrefix("/usr/local/bin/") && words[config].hasPrefix("/etc/farmgate/"), "\(start)")
        words[0] = words[0].replacingOccurrences(of: "/usr/local/bin/", with: binaries + "/")
        for (name, text) in [("unknown-table.toml", "[nonsense]\nkey = 1\n"), ("not-toml.toml", "this is [[ not TOML\n")] {
            words[config] = try scratch.write(name, text)
            let result = try await runCommand(words[0], Array(words.dropFirst()))
            #expect(result.status == 78, "\(unit): \(words.joined(separator: " ")) exited \(result.status): \(result.stderr)")
        }
        words[config] = scratch.file("missing.toml")
        let missing = try await runCommand(words[0], Array(words.dropFirst()))
        #expect(missing.status == 78, "\(unit): a missing configuration exited \(missing.status): \(missing.stderr)")
    }
}

/// The real binaries under the system call filter and MemoryDenyWriteExecute= their units ship with, installed by
/// `Tests/tools/run-under-unit-filter.py` (libseccomp, the way systemd installs them; no running systemd needed): a call the
/// filter forbids fails with EPERM, as under systemd, and a W+X mapping is refused.
@Suite("systemd units: the binaries under their system call filter", .serialized)
struct SystemdSandboxTests {
    static let wrapper = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("tools/run-under-unit-filter.py").path

    @Test("The agent and the ingest start, notify READY=1 and deliver readings under their units' filters")
    func bothUnderFilters() async throws {
        let seccomp = try await runCommand("/usr/bin/python3", ["-c", "import seccomp"])
        #expect(seccomp.status == 0, "python3-seccomp is missing (.ci/install-deps installs it): \(seccomp.stderr)")
        guard seccomp.status == 0 else { return }
        // The clock check's adjtimex (glibc: clock_adjtime) with no mode set must pass the agent's filter; on this machine the
        // agent could not tell a refused call from an unsynchronised clock, so ask directly.
        let probe = try await runCommand(
            Self.wrapper,
            [
                SystemdUnitTests.unitDirectory.appendingPathComponent("farmgate.service").path, "/usr/bin/python3", "-c",
                "import ctypes; libc = ctypes.CDLL(None, use_errno=True); buf = ctypes.create_string_buffer(512); "
                    + "r = libc.adjtimex(buf); print(r, ctypes.get_errno())",
            ])
        #expect(probe.status == 0 && !probe.stdout.hasPrefix("-1"), "adjtimex under farmgate.service's filter: \(probe.stdout)\(probe.stderr)")
        let farm = try await Farm()
        let key = try await farm.createDevice("sandboxed")
        let keyFile = try farm.dir.write("sandboxed.key", key + "\n")
        let ingestListener = try NotifyListener(address: farm.dir.file("ingest-notify.sock"))
        defer { ingestListener.stop() }
        let ingest = try Child(
            Self.wrapper, [SystemdUnitTests.unitDirectory.appendingPathComponent("farmgate-ingest.service").path, Farm.ingestBinary,
            "serve", "--config", farm.ingestConfig],
            logPath: farm.dir.file("ingest.log"), environment: ["NOTIFY_SOCKET": ingestListener.address])
        #expect(await eventually(timeout: .seconds(30)) { !ingestListener.messages(with: "READY=1").isEmpty }, "\(ingest.log)")
        #expect(await farm.httpStatus("/readyz") == 200)

        let config = try farm.agentConfig("agent.toml", device: "sandboxed", keyFile: keyFile, sensors: 3, interval: "200ms")
        // The clock check's adjtimex must pass the filter too.
        try (String(contentsOfFile: config, encoding: .utf8).replacingOccurrences(of: "check = false", with: "check = true\nhold_unsynchronized = \"0s\""))
            .write(toFile: config, atomically: true, encoding: .utf8)
        let agentListener = try NotifyListener(address: farm.dir.file("agent-notify.sock"))
        defer { agentListener.stop() }
        let agent = try Child(
            Self.wrapper, [SystemdUnitTests.unitDirectory.appendingPathComponent("farmgate.service").path, Farm.agentBinary,
            "agent", "--config", config],
            logPath: farm.dir.file("agent.log"), environment: ["NOTIFY_SOCKET": agentListener.address, "WATCHDOG_USEC": "1000000"])
        #expect(await eventually(timeout: .seconds(30)) { !agentListener.messages(with: "READY=1").isEmpty }, "\(agent.log)")
        // Readings get stored by the ingest (the clock may be unsynchronised here: they are held, then sent flagged).
        let status = try await farm.agentStatus(config: config)
        #expect(status != nil)
        #expect(await eventually(timeout: .seconds(10)) { agentListener.messages(with: "WATCHDOG=1").count >= 5 })
        #expect(!agent.log.contains("Operation not permitted"), "\(agent.log)")
        #expect(
            try await eventually(timeout: .seconds(20), every: .milliseconds(250)) {
                try await farm.storedSequences(device: "sandboxed").count >= 10
            }, "\(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0, "\(agent.log)")
        #expect(await ingest.stop(SIGTERM) == 0, "\(ingest.log)")
        #expect(!agentListener.messages(with: "STOPPING=1").isEmpty)
    }
}
