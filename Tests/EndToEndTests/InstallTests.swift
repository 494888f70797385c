import FarmgateAgent
import FarmgateTestSupport
import Foundation
import Testing

/// `make install` into a staging root and `make deb` checked with dpkg-deb, with the built `farmgate` binary (the
/// Makefile's FARMGATE_BIN skips the release build).
@Suite("Installation (make install, make deb)", .serialized)
struct InstallTests {
    /// The repository: three levels above this file.
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    static func make(_ arguments: [String], environment: [String: String] = [:]) async throws -> (status: Int32, stdout: String, stderr: String) {
        try await runCommand("/usr/bin/make", ["--no-print-directory", "-C", root] + arguments, environment: environment)
    }

    @Test func makeInstallLaysOutTheFilesAndNeverOverwritesAConfiguration() async throws {
        let staging = try Scratch(prefix: "fg-install")
        let binary = builtExecutable("farmgate")
        let first = try await Self.make(["install", "DESTDIR=\(staging.path)", "FARMGATE_BIN=\(binary)"])
        #expect(first.status == 0, "\(first.stderr)")
        #expect(first.stdout.contains("skipped creating the user farmgate: DESTDIR is set"), "\(first.stdout)")
        let expected = [
            "usr/local/bin/farmgate", "usr/local/lib/systemd/system/farmgate.service", "etc/farmgate/agent.toml",
            "etc/udev/rules.d/60-farmgate-gpio.rules", "usr/local/lib/farmgate/create-user", "usr/local/share/doc/farmgate/README.md",
            "usr/local/share/doc/farmgate/examples/site-ezo.toml",
        ]
        for file in expected { #expect(FileManager.default.fileExists(atPath: staging.file(file)), "missing \(file)") }
        #expect(FileManager.default.isExecutableFile(atPath: staging.file("usr/local/bin/farmgate")))
        #expect(
            FileManager.default.contentsEqual(atPath: staging.file("usr/local/bin/farmgate"), andPath: binary), "the binary given is installed")
        let unit = try String(contentsOfFile: staging.file("usr/local/lib/systemd/system/farmgate.service"), encoding: .utf8)
        #expect(unit.contains("ExecStart=/usr/local/bin/farmgate agent --config /etc/farmgate/agent.toml"))
        #expect(unit.contains("Documentation=file:///usr/local/share/doc/farmgate/README.md"))
        #expect(FileManager.default.fileExists(atPath: staging.file("usr/local/share/doc/farmgate/README.md")))

        // The installed example is a valid start: `farmgate config check` only misses the device id and the sensors.
        let check = try await runCommand(binary, ["config", "check", "--config", staging.file("etc/farmgate/agent.toml")])
        #expect(check.status == 78)
        #expect(check.stderr.contains("[device]") || check.stderr.contains("id"), "\(check.stderr)")
        // It keeps the SD-card-friendly defaults the README measures (a 1 s commit writes about five times as much).
        let installed = try String(contentsOfFile: staging.file("etc/farmgate/agent.toml"), encoding: .utf8)
        #expect(installed.contains("commit_interval = \"10s\""), "\(installed)")

        // A second install keeps the configuration the installer edited.
        try "# mine\n".write(toFile: staging.file("etc/farmgate/agent.toml"), atomically: true, encoding: .utf8)
        let second = try await Self.make(["install", "DESTDIR=\(staging.path)", "PREFIX=/opt/fg", "FARMGATE_BIN=\(binary)"])
        #expect(second.status == 0, "\(second.stderr)")
        #expect(try String(contentsOfFile: staging.file("etc/farmgate/agent.toml"), encoding: .utf8) == "# mine\n")
        #expect(FileManager.default.fileExists(atPath: staging.file("etc/farmgate/agent.toml.example")))
        #expect(FileManager.default.fileExists(atPath: staging.file("opt/fg/bin/farmgate")), "PREFIX is honoured")
        // systemd reads no unit under /opt: the unit goes to systemd's own directory, not to $PREFIX/lib/systemd/system.
        #expect(!FileManager.default.fileExists(atPath: staging.file("opt/fg/lib/systemd/system/farmgate.service")))
        let optUnit = try String(contentsOfFile: staging.file(try await Self.systemUnitDirectory() + "/farmgate.service"), encoding: .utf8)
        #expect(optUnit.contains("ExecStart=/opt/fg/bin/farmgate agent"))
        #expect(optUnit.contains("Documentation=file:///opt/fg/share/doc/farmgate/README.md"), "the unit names the README installed with it")
        #expect(!optUnit.contains("/usr/local/bin"))

        // SYSCONFDIR moves the configuration and the unit follows it; SYSTEMD_UNIT_DIR puts the unit where it says.
        let moved = try await Self.make([
            "install", "DESTDIR=\(staging.path)", "SYSCONFDIR=/opt/etc", "SYSTEMD_UNIT_DIR=/srv/units", "FARMGATE_BIN=\(binary)",
        ])
        #expect(moved.status == 0, "\(moved.stderr)")
        #expect(FileManager.default.fileExists(atPath: staging.file("opt/etc/farmgate/agent.toml")))
        let movedUnit = try String(contentsOfFile: staging.file("srv/units/farmgate.service"), encoding: .utf8)
        // No ExecStartPre=: the agent checks its configuration itself (exit 78, not restarted; see SystemdUnitTests).
        #expect(!movedUnit.split(separator: "\n").contains { $0.hasPrefix("ExecStartPre") }, "\(movedUnit)")
        #expect(movedUnit.contains("ExecStart=/usr/local/bin/farmgate agent --config /opt/etc/farmgate/agent.toml"), "\(movedUnit)")
        #expect(!movedUnit.contains("--config /etc/farmgate"), "\(movedUnit)")

        let missing = try await Self.make(["install", "DESTDIR=\(staging.path)", "FARMGATE_BIN=\(staging.file("nothing"))"])
        #expect(missing.status != 0 && missing.stderr.contains("is not an executable"), "\(missing.stderr)")
    }

    @Test func makeInstallIngestLaysOutTheServiceWithAConfigurationThatRuns() async throws {
        let staging = try Scratch(prefix: "fg-install-ingest")
        let binary = builtExecutable("farmgate-ingest")
        let first = try await Self.make(["install-ingest", "DESTDIR=\(staging.path)", "PREFIX=/opt/fgi", "FARMGATE_INGEST_BIN=\(binary)"])
        #expect(first.status == 0, "\(first.stderr)")
        #expect(first.stdout.contains("skipped creating the user farmgate-ingest: DESTDIR is set"), "\(first.stdout)")
        let unitFile = try await Self.systemUnitDirectory() + "/farmgate-ingest.service"
        for file in [
            "opt/fgi/bin/farmgate-ingest", unitFile, "etc/farmgate/ingest.toml",
            "opt/fgi/share/doc/farmgate-ingest/README.md", "opt/fgi/share/doc/farmgate-ingest/examples/nginx-farmgate.conf",
            "opt/fgi/share/doc/farmgate-ingest/examples/ingest-alert-rules.toml",
        ] {
            #expect(FileManager.default.fileExists(atPath: staging.file(file)), "missing \(file)")
        }
        #expect(FileManager.default.contentsEqual(atPath: staging.file("opt/fgi/bin/farmgate-ingest"), andPath: binary))
        #expect(!FileManager.default.fileExists(atPath: staging.file("opt/fgi/lib/systemd/system/farmgate-ingest.service")), "systemd reads no unit there")
        let unit = try String(contentsOfFile: staging.file(unitFile), encoding: .utf8)
        // No ExecStartPre= migrate: serve checks the configuration (exit 78, not restarted) and migrates the store itself.
        #expect(!unit.split(separator: "\n").contains { $0.hasPrefix("ExecStartPre") }, "\(unit)")
        #expect(unit.contains("ExecStart=/opt/fgi/bin/farmgate-ingest serve --config /etc/farmgate/ingest.toml"))
        #expect(unit.contains("Documentation=file:///opt/fgi/share/doc/farmgate-ingest/README.md"), "\(unit)")
        #expect(FileManager.default.fileExists(atPath: staging.file("opt/fgi/share/doc/farmgate-ingest/README.md")))
        #expect(!unit.contains("/usr/local/bin"))
        // The configuration may hold a database password: not world-readable.
        let mode = try FileManager.default.attributesOfItem(atPath: staging.file("etc/farmgate/ingest.toml"))[.posixPermissions] as? Int
        #expect(mode == 0o640)

        // The installed configuration runs as it is, its store moved into the scratch directory.
        let installed = try String(contentsOfFile: staging.file("etc/farmgate/ingest.toml"), encoding: .utf8)
        #expect(installed.contains("path = \"/var/lib/farmgate-ingest/ingest.sqlite\""))
        let local = staging.file("ingest.toml")
        try installed.replacingOccurrences(of: "/var/lib/farmgate-ingest/", with: staging.path + "/").write(toFile: local, atomically: true, encoding: .utf8)
        let migrated = try await runCommand(binary, ["migrate", "--config", local])
        #expect(migrated.status == 0, "\(migrated.stderr)")
        #expect(FileManager.default.fileExists(atPath: staging.file("ingest.sqlite")))

        // A second install keeps the configuration; SYSCONFDIR moves it and the unit follows.
        try "# mine\n".write(toFile: staging.file("etc/farmgate/ingest.toml"), atomically: true, encoding: .utf8)
        let second = try await Self.make(["install-ingest", "DESTDIR=\(staging.path)", "PREFIX=/opt/fgi", "FARMGATE_INGEST_BIN=\(binary)"])
        #expect(second.status == 0, "\(second.stderr)")
        #expect(try String(contentsOfFile: staging.file("etc/farmgate/ingest.toml"), encoding: .utf8) == "# mine\n")
        #expect(FileManager.default.fileExists(atPath: staging.file("etc/farmgate/ingest.toml.example")))
        let moved = try await Self.make(["install-ingest", "DESTDIR=\(staging.path)", "SYSCONFDIR=/srv/conf", "FARMGATE_INGEST_BIN=\(binary)"])
        #expect(moved.status == 0, "\(moved.stderr)")
        #expect(FileManager.default.fileExists(atPath: staging.file("srv/conf/farmgate/ingest.toml")))
        let movedUnit = try String(contentsOfFile: staging.file("usr/local/lib/systemd/system/farmgate-ingest.service"), encoding: .utf8)
        #expect(movedUnit.contains("serve --config /srv/conf/farmgate/ingest.toml"))

        let missing = try await Self.make(["install-ingest", "DESTDIR=\(staging.path)", "FARMGATE_INGEST_BIN=\(staging.file("nothing"))"])
        #expect(missing.status != 0 && missing.stderr.contains("is not an executable"), "\(missing.stderr)")
    }

    /// PREFIX and SYSCONFDIR are written into the unit's ExecStart=, which systemd splits at whitespace (and where it
    /// expands `%` and `$`): such a value is refused, before anything is built or installed. DESTDIR is never written into
    /// a unit: one with a space installs.
    @Test func makeInstallRefusesAPrefixTheUnitCannotHold() async throws {
        let staging = try Scratch(prefix: "fg install space")
        let site = builtExecutable("farmgate")
        let ingest = builtExecutable("farmgate-ingest")
        for arguments in [
            ["install", "PREFIX=/opt/my farmgate", "FARMGATE_BIN=\(site)"], ["install", "SYSCONFDIR=/etc/my conf", "FARMGATE_BIN=\(site)"],
            ["install", "PREFIX=/opt/fg%i", "FARMGATE_BIN=\(site)"], ["install-ingest", "PREFIX=/opt/my ingest", "FARMGATE_INGEST_BIN=\(ingest)"],
            ["install-ingest", "SYSCONFDIR=/etc/a\tb", "FARMGATE_INGEST_BIN=\(ingest)"],
        ] {
            let result = try await Self.make(arguments + ["DESTDIR=\(staging.path)"])
            #expect(result.status != 0, "\(arguments) was accepted: \(result.stdout)")
            let variable = arguments[1].prefix { $0 != "=" }
            #expect(result.stderr.contains("\(variable)=") && result.stderr.contains("whitespace"), "\(arguments): \(result.stderr)")
            #expect(staging.names().isEmpty, "\(arguments) installed \(staging.names())")
        }
        // The scripts refuse it too when run directly.
        let direct = try await runCommand(
            "/usr/bin/env", ["PREFIX=/opt/my farmgate", "DESTDIR=\(staging.path)", "FARMGATE_BIN=\(site)", Self.root + "/systemd/install/install-site.sh"])
        #expect(direct.status != 0 && direct.stderr.contains("PREFIX="), "\(direct.stderr)")
        #expect(staging.names().isEmpty)

        let installed = try await Self.make(["install", "DESTDIR=\(staging.path)", "FARMGATE_BIN=\(site)"])
        #expect(installed.status == 0, "\(installed.stderr)")
        let unit = try String(contentsOfFile: staging.file("usr/local/lib/systemd/system/farmgate.service"), encoding: .utf8)
        #expect(unit.contains("ExecStart=/usr/local/bin/farmgate agent --config /etc/farmgate/agent.toml\n"), "\(unit)")
    }

    /// The package's prerm removes the agent's `[metrics] textfile` on removal: its value read as the agent reads it (a TOML
    /// basic or literal string, only in [metrics], a relative path from the configuration's directory). The test runs the
    /// script's own metrics_textfile function on configurations in a scratch directory.
    @Test func prermFindsTheMetricsFileAsTheAgentReadsIt() async throws {
        let scratch = try Scratch(prefix: "fg-prerm")
        let prerm = Self.root + "/systemd/install/deb/prerm"
        let config = scratch.file("agent.toml")
        func found(_ text: String) async throws -> String {
            try text.write(toFile: config, atomically: true, encoding: .utf8)
            let result = try await runCommand(
                "/bin/sh", ["-c", "eval \"$(sed -n '/^metrics_textfile()/,/^}/p' \"$1\")\"; metrics_textfile \"$2\"", "sh", prerm, config])
            #expect(result.status == 0, "\(result.stderr)")
            return result.stdout.trimmingCharacters(in: .newlines)
        }
        let cases: [(String, String)] = [
            ("[metrics]\ntextfile = \"/var/lib/node_exporter/textfile_collector/farmgate.prom\"  # the collector\n", "/var/lib/node_exporter/textfile_collector/farmgate.prom"),
            ("[device]\nid = \"a\"\n\n[metrics]\ninterval = \"15s\"\ntextfile = '/srv/prom/farmgate.prom'\n", "/srv/prom/farmgate.prom"),
            // Relative: from the configuration's directory, by the agent's own rule.
            ("[ metrics ] # node_exporter\r\n  textfile='farmgate.prom'\r\n", AgentConfiguration.resolve("farmgate.prom", against: scratch.path)),
            ("[metrics]\ntextfile = \"../prom/./farmgate.prom\"\n", scratch.url.deletingLastPathComponent().path + "/prom/farmgate.prom"),
            ("[upload]\ntextfile = \"/elsewhere.prom\"\n[metrics]\n# textfile = \"/commented.prom\"\n", ""),
            ("[metrics]\ntextfile = \"/var/lib/farmgate.txt\"\n", ""),
        ]
        for (text, expected) in cases {
            #expect(try await found(text) == expected, "\(text)")
        }
    }

    @Test func makeDebBuildsAPackageDpkgDebAccepts() async throws {
        let out = try Scratch(prefix: "fg-deb")
        // A debug build links the Swift runtime dynamically; `make deb` itself builds with --static-swift-stdlib.
        let built = try await Self.make(
            ["deb", "FARMGATE_BIN=\(builtExecutable("farmgate"))", "DEB_OUT=\(out.path)", "DEB_VERSION=9.8.7"], environment: ["ALLOW_UNPACKAGED_LIBS": "1", "DEB_COMPRESS": "gzip"])
        #expect(built.status == 0, "\(built.stderr)")
        #expect(built.stderr.contains("libswiftCore.so"), "the unpackaged Swift runtime is named: \(built.stderr)")
        let deb = try #require(out.names().first { $0.hasSuffix(".deb") }.map { out.file($0) })
        #expect(deb.hasSuffix("farmgate_9.8.7_\(try await Self.dpkgArchitecture()).deb"))

        let info = try await runCommand("/usr/bin/dpkg-deb", ["--info", deb])
        #expect(info.status == 0, "\(info.stderr)")
        for line in ["Package: farmgate", "Version: 9.8.7", "postinst", "prerm", "postrm", "conffiles"] {
            #expect(info.stdout.contains(line), "dpkg-deb --info lacks \(line): \(info.stdout)")
        }
        let depends = try await runCommand("/usr/bin/dpkg-deb", ["--field", deb, "Depends"])
        for package in ["libcurl4", "libsqlite3-0", "libzstd1", "libmodbus5", "libgpiod2", "passwd"] {
            #expect(depends.stdout.contains(package), "Depends lacks \(package): \(depends.stdout)")
        }
        // libc6 at the newest glibc symbol version the binary needs (a debug build needs 2.34 for its pthread symbols).
        #expect(depends.stdout.contains("libc6 (>= 2.3"), "Depends lacks libc6's version: \(depends.stdout)")
        let contents = try await runCommand("/usr/bin/dpkg-deb", ["--contents", deb])
        for path in [
            "./usr/bin/farmgate", "./usr/lib/systemd/system/farmgate.service", "./etc/farmgate/agent.toml", "./usr/lib/farmgate/create-user",
            "./usr/lib/udev/rules.d/60-farmgate-gpio.rules", "./usr/share/doc/farmgate/README.md", "./usr/share/doc/farmgate/copyright",
        ] {
            #expect(contents.stdout.contains(path), "dpkg-deb --contents lacks \(path)")
        }
        #expect(contents.stdout.contains("root/root"), "files belong to root")

        let unpacked = try Scratch(prefix: "fg-deb-x")
        let extract = try await runCommand("/usr/bin/dpkg-deb", ["--raw-extract", deb, unpacked.path])
        #expect(extract.status == 0, "\(extract.stderr)")
        let unit = try String(contentsOfFile: unpacked.file("usr/lib/systemd/system/farmgate.service"), encoding: .utf8)
        #expect(unit.contains("ExecStart=/usr/bin/farmgate agent --config /etc/farmgate/agent.toml"))
        #expect(unit.contains("Documentation=file:///usr/share/doc/farmgate/README.md"))
        #expect(try String(contentsOfFile: unpacked.file("DEBIAN/conffiles"), encoding: .utf8) == "/etc/farmgate/agent.toml\n")
        for script in ["postinst", "prerm", "postrm"] {
            #expect(FileManager.default.isExecutableFile(atPath: unpacked.file("DEBIAN/\(script)")))
            let syntax = try await runCommand("/bin/sh", ["-n", unpacked.file("DEBIAN/\(script)")])
            #expect(syntax.status == 0, "\(script): \(syntax.stderr)")
        }
        let postinst = try String(contentsOfFile: unpacked.file("DEBIAN/postinst"), encoding: .utf8)
        #expect(postinst.contains("/usr/lib/farmgate/create-user"))
        // Enabled on the first install even where systemd does not run (an image built in a chroot): the enable is not
        // inside the running-systemd branch.
        #expect(postinst.contains("if [ -z \"$2\" ] && command -v systemctl"), "\(postinst)")
        let copyright = try String(contentsOfFile: unpacked.file("usr/share/doc/farmgate/copyright"), encoding: .utf8)
        #expect(copyright.hasPrefix("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"))
        let createUser = try String(contentsOfFile: unpacked.file("usr/lib/farmgate/create-user"), encoding: .utf8)
        #expect(createUser.contains("--groups dialout,gpio") && createUser.contains("useradd --system"))

        // Without the escape hatch, a binary that needs the toolchain's Swift runtime is refused.
        let refused = try await Self.make(["deb", "FARMGATE_BIN=\(builtExecutable("farmgate"))", "DEB_OUT=\(out.path)"])
        #expect(refused.status != 0 && refused.stderr.contains("--static-swift-stdlib"), "\(refused.stderr)")
    }

    /// Where systemd's own units are (the directory an install under another prefix than /usr and /usr/local uses).
    static func systemUnitDirectory() async throws -> String {
        let found = try? await runCommand("/usr/bin/pkg-config", ["--variable=systemdsystemunitdir", "systemd"])
        let directory = found?.stdout.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
        return found?.status == 0 && !directory.isEmpty ? directory : "/usr/lib/systemd/system"
    }

    static func dpkgArchitecture() async throws -> String {
        try await runCommand("/usr/bin/dpkg", ["--print-architecture"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
