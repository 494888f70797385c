import FarmgateTestSupport
import Foundation
import Testing

/// The unit files as systemd itself judges them, offline: `systemd-analyze verify` and `security --offline=true`.
///
/// `verify` checks that every ExecStart=/ExecStartPre= binary exists and is executable, and the units name
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
            "ExecStartPre=/usr/local/bin/farmgate config check --config /etc/farmgate/agent.toml",
        ] {
            #expect(lines.contains(line), "farmgate.service lacks \(line)")
        }
        // PrivateDevices= would hide /dev/serial/by-id and the ports themselves.
        #expect(!lines.contains("PrivateDevices=yes"))
        let ingest = try String(contentsOf: Self.unitDirectory.appendingPathComponent("farmgate-ingest.service"), encoding: .utf8)
        #expect(ingest.contains("Type=notify\n") && ingest.contains("LimitNOFILE="))
    }
}
