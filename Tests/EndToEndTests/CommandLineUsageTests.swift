import Foundation
import Testing

/// What both programs answer to a command line that names no command: a usage error (64) that says what is missing,
/// never help with exit 0, which a script would take for success.
@Suite struct CommandLineUsageTests {
    @Test(arguments: [
        // (program, arguments, exit status, what standard error must say)
        ("farmgate-ingest", [String](), Int32(64), "farmgate-ingest needs a subcommand: one of serve, migrate"),
        ("farmgate-ingest", ["token"], 64, "farmgate-ingest token needs a subcommand: one of create, list, revoke"),
        ("farmgate-ingest", ["alert", "rule"], 64, "farmgate-ingest alert rule needs a subcommand: one of add, list"),
        ("farmgate-ingest", ["help", "nosuch"], 64, "'nosuch' is not a command of farmgate-ingest"),
        ("farmgate-ingest", ["help", "token", "nosuch"], 64, "'nosuch' is not a command of farmgate-ingest token; it has create, list, revoke"),
        ("farmgate-ingest", ["help", "export", "x"], 64, "farmgate-ingest export has no subcommands"),
        ("farmgate-ingest", ["token", "list", "-c", ""], 64, "the configuration path is empty"),
        ("farmgate", [], 64, "farmgate needs a subcommand: one of agent, status"),
        ("farmgate", ["sensor"], 64, "farmgate sensor needs a subcommand: one of drivers, read"),
        ("farmgate", ["help", "nosuch"], 64, "'nosuch' is not a command of farmgate"),
        ("farmgate", ["help", "sensor", "nosuch"], 64, "'nosuch' is not a command of farmgate sensor"),
        // The same asked with --help: ArgumentParser printed the nearest command's help and exited 0 (a tester, 2026-12-06).
        ("farmgate", ["nope", "--help"], 64, "'nope' is not a command of farmgate"),
        ("farmgate", ["sensor", "nope", "-h"], 64, "'nope' is not a command of farmgate sensor"),
        ("farmgate-ingest", ["nope", "--help"], 64, "'nope' is not a command of farmgate-ingest"),
        ("farmgate", ["config", "check", "-c", ""], 64, "the configuration path is empty"),
        // An empty or overlong --socket, and a sensor id no configuration can hold (before the fix, a tester
        // 2026-12-06: exit 1, or `sensor read` read beside the agent).
        ("farmgate", ["status", "--socket", ""], 64, "--socket is empty"),
        ("farmgate", ["quarantine", "list", "--socket", ""], 64, "--socket is empty"),
        ("farmgate", ["reload", "--socket", String(repeating: "s", count: 200)], 64, "--socket is 200 bytes"),
        ("farmgate", ["calibrate", "tank1.ph", "--abort", "--socket", ""], 64, "--socket is empty"),
        ("farmgate", ["sensor", "read", "tank1.ph", "--socket", ""], 64, "--socket is empty"),
        ("farmgate", ["sensor", "read", ""], 64, "invalid sensor id ''"),
        // An option of one value given twice: ArgumentParser kept the last (`device create` made `b`). The usage line
        // is the subcommand's (before: the root's).
        ("farmgate-ingest", ["device", "create", "--farm", "f", "--device", "a", "--device=b"], 64,
         "--device takes one value but was given 2 times (--device, --device=b); give it once\nUsage: farmgate-ingest device create --farm"),
        ("farmgate", ["sensor", "read", "tank1.ph", "-c", "a.toml", "--config", "b.toml"], 64,
         "--config takes one value but was given 2 times (-c, --config)"),
        // A flag given twice was accepted (a tester, 2026-12-06): refused like an option of one value, however spelt.
        ("farmgate", ["status", "--json", "--json"], 64,
         "--json is a flag but was given 2 times (--json, --json); give it once\nUsage: farmgate status"),
        ("farmgate", ["calibrate", "tank1.ph", "-y", "--yes"], 64, "--yes is a flag but was given 2 times (-y, --yes)"),
        ("farmgate", ["status", "-c", "a.toml", "-c", "b.toml"], 64, "--config takes one value but was given 2 times (-c, -c)"),
        // A group given an option but no subcommand said "Unknown option '-c'" (a tester, 2026-12-06).
        ("farmgate", ["sensor", "-c", "F"], 64, "farmgate sensor needs a subcommand before -c: one of drivers, read, add, remove"),
        ("farmgate", ["-c", "F"], 64, "farmgate needs a subcommand before -c: one of agent, status"),
        ("farmgate", ["quarantine", "--json", "list"], 64, "farmgate quarantine needs a subcommand before --json: one of list, requeue, drop"),
        // A word that names no subcommand was hidden behind "Unknown option '-c'" or "2 unexpected arguments" (testers,
        // 2026-12-07).
        ("farmgate-ingest", ["farm", "lst", "-c", "x.toml"], 64, "'lst' is not a subcommand of farmgate-ingest farm: one of create, list"),
        ("farmgate-ingest", ["nosuch", "-c", "x.toml"], 64, "'nosuch' is not a subcommand of farmgate-ingest: one of serve, migrate"),
        ("farmgate-ingest", ["farm", "delete", "good-farm"], 64, "'delete' is not a subcommand of farmgate-ingest farm"),
        ("farmgate", ["sensor", "list", "-c", "F"], 64, "'list' is not a subcommand of farmgate sensor: one of drivers, read, add, remove"),
        // One glob per label: the second --match of a label replaced the first (a tester, 2026-12-06).
        ("farmgate-ingest", ["alert", "silence", "add", "--farm", "f", "--match", "sensor=x", "--match", "sensor=y", "--for", "1h", "-c", "/nonexistent.toml"], 64,
         "--match gives sensor twice (sensor=x and sensor=y)"),
        // A negative number for an option that takes none was called a missing value (a tester, 2026-12-06).
        ("farmgate", ["quarantine", "requeue", "--sequence", "-5"], 64, "--sequence takes no negative value (got -5)\nUsage: farmgate quarantine requeue"),
        ("farmgate", ["reload", "--pid", "-1", "-c", "x.toml"], 64, "--pid takes no negative value (got -1)"),
        // A usage error found by a subcommand's run() is shown with that subcommand's usage line (before: the root's,
        // `Usage: farmgate-ingest <subcommand>`).
        ("farmgate-ingest", ["alert", "list", "--farm", "f", "--recent", "abc"], 64,
         "--recent 'abc' must be a duration such as 1h, 24h or 7d\nUsage: farmgate-ingest alert list --farm <farm>"),
    ])
    func missingCommandsAreUsageErrors(program: String, arguments: [String], status: Int32, says: String) async throws {
        let binary = program == "farmgate" ? Farm.agentBinary : Farm.ingestBinary
        let result = try await runCommand(binary, arguments)
        #expect(result.status == status, "\(program) \(arguments): \(result.stderr)")
        #expect(result.stderr.contains(says), "\(program) \(arguments): \(result.stderr)")
        #expect(!result.stdout.contains("OVERVIEW"), "\(program) \(arguments) printed help on standard output")
    }

    /// Help of real commands still answers, with a command's own arguments after it.
    @Test func helpOfRealCommands() async throws {
        for (binary, arguments) in [
            (Farm.agentBinary, ["--help"]), (Farm.agentBinary, ["sensor", "--help"]), (Farm.agentBinary, ["sensor", "read", "tank1.ph", "--help"]),
            (Farm.agentBinary, ["help", "sensor", "read"]), (Farm.ingestBinary, ["alert", "rule", "add", "-h"]),
            // Help of a command line that names a flag too, or a group's help: still help.
            (Farm.agentBinary, ["status", "--json", "--help"]), (Farm.agentBinary, ["quarantine", "-h"]),
        ] {
            let result = try await runCommand(binary, arguments)
            #expect(result.status == 0 && result.stdout.contains("USAGE"), "\(arguments): \(result.stderr)")
        }
    }

    /// Options declared to repeat still may (`quarantine requeue --sequence 1 --sequence 2`); a repeated option is refused
    /// before the configuration is read, and one given once goes on to it.
    @Test func repeatableOptionsStillRepeat() async throws {
        let requeue = try await runCommand(Farm.agentBinary, ["quarantine", "requeue", "--sequence", "1", "--sequence", "2", "-c", "/nonexistent.toml"])
        #expect(requeue.status != 64 && !requeue.stderr.contains("takes one value"), "\(requeue.stderr)")
        let once = try await runCommand(Farm.ingestBinary, ["device", "create", "--farm", "f", "--device", "a", "-c", "/nonexistent.toml"])
        #expect(once.status == 78 && once.stderr.contains("/nonexistent.toml"), "\(once.stderr)")
    }

    /// Help of a real command still works and exits 0.
    @Test(arguments: [("farmgate-ingest", ["help", "token", "list"], "List read tokens"), ("farmgate", ["help", "sensor", "read"], "Read one sensor once")])
    func helpOfARealCommand(program: String, arguments: [String], says: String) async throws {
        let result = try await runCommand(program == "farmgate" ? Farm.agentBinary : Farm.ingestBinary, arguments)
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains(says), "\(result.stdout)")
    }
}
