import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Testing

/// `farmgate-ingest` as an operator runs it: what `serve` refuses, what `migrate` says, and how a wrong database in
/// `[storage] url` is reported. The real binary; PostgreSQL from `.ci/with-postgres`.
@Suite struct IngestCommandLineTests {
    /// Two `serve` processes on one SQLite file would each keep their own latest values, stale with the other's
    /// writes: the second is refused at once, the admin commands still work beside the first, and once the first has
    /// stopped a new one starts.
    @Test func aSecondServeOnOneSQLiteFileIsRefused() async throws {
        let farm = try await Farm(name: "lock")
        try await farm.startIngest()
        let otherPort = try freePort()
        let text = try String(contentsOfFile: farm.ingestConfig, encoding: .utf8).replacingOccurrences(of: "port = \(farm.port)", with: "port = \(otherPort)")
        let config = try farm.dir.write("ingest-b.toml", text)
        let second = try Child(Farm.ingestBinary, ["serve", "--config", config], logPath: farm.dir.file("ingest-b.log"))
        let exited = await eventually(timeout: .seconds(20), every: .milliseconds(100)) { !second.isRunning }
        #expect(exited, "a second serve on the same SQLite file kept running: \(second.log)")
        if exited {
            #expect(second.process.terminationStatus == 75, "\(second.log)")
            #expect(second.log.contains("another farmgate-ingest serve is running on the SQLite file") && second.log.contains("one serve per file"), "\(second.log)")
        }
        // The same file through a link is the same file.
        let link = farm.dir.file("linked.sqlite")
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: farm.dir.file("ingest/ingest.sqlite"))
        let linked = try farm.dir.write(
            "ingest-c.toml", text.replacingOccurrences(of: "path = \"ingest/ingest.sqlite\"", with: "path = \"linked.sqlite\""))
        let linkedText = try String(contentsOfFile: linked, encoding: .utf8)
        #expect(linked != config && linkedText.contains("linked.sqlite"))
        let third = try Child(Farm.ingestBinary, ["serve", "--config", linked], logPath: farm.dir.file("ingest-c.log"))
        let thirdExited = await eventually(timeout: .seconds(20), every: .milliseconds(100)) { !third.isRunning }
        #expect(thirdExited, "a serve on a link to the SQLite file kept running: \(third.log)")
        if thirdExited { #expect(third.process.terminationStatus == 75, "\(third.log)") }
        // The admin commands work while serve runs.
        _ = try await farm.createDevice("site-lock", farm: "lock")
        #expect(await farm.httpStatus("/readyz") == 200)
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
        // The lock goes with its process.
        try await farm.startIngest()
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    /// A port another process holds is 75 (it may be free later), an address this machine does not have is 78 (fix the
    /// configuration): each naming the address and the key to change, not the socket layer's text.
    @Test func listenFailuresNameTheAddress() async throws {
        let farm = try await Farm(name: "listen")
        try await farm.startIngest()
        let text = try String(contentsOfFile: farm.ingestConfig, encoding: .utf8)
            .replacingOccurrences(of: "path = \"ingest/ingest.sqlite\"", with: "path = \"other.sqlite\"")
        for (name, config, status, says) in [
            ("taken", text, Int32(75), "cannot listen on 127.0.0.1:\(farm.port): another process holds the port"),
            ("foreign", text.replacingOccurrences(of: "host = \"127.0.0.1\"", with: "host = \"192.0.2.1\""), 78, "cannot listen on 192.0.2.1:\(farm.port): this machine has no such address"),
            ("unknown", text.replacingOccurrences(of: "host = \"127.0.0.1\"", with: "host = \"nosuchhost.invalid\""), 78, "cannot listen on nosuchhost.invalid:\(farm.port): the host does not resolve"),
        ] {
            let path = try farm.dir.write("\(name).toml", config)
            #expect(config.contains("other.sqlite") && (name == "taken" || !config.contains("127.0.0.1")), "\(config)")
            let result = try await runCommand(Farm.ingestBinary, ["serve", "--config", path])
            #expect(result.status == status, "\(name): \(result.stderr)")
            #expect(result.stderr.contains(says), "\(name): \(result.stderr)")
        }
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    /// An operator sees the farms, devices and read tokens, and withdraws a leaked read token: the running ingest refuses
    /// it within seconds, other tokens keep working, and the command's mistakes exit as documented.
    @Test func readTokensAreListedAndRevoked() async throws {
        let farm = try await Farm(name: "tokens")
        try await farm.startIngest()
        _ = try await farm.createDevice("site-t1", farm: "tokens")
        #expect(try await farm.admin(["farm", "list"]) == "tokens\n")
        #expect(try await farm.admin(["device", "list", "--farm", "tokens", "--json"]).contains("\"site-t1\""))
        func create(_ role: String) async throws -> String {
            let output = try await farm.admin(["token", "create", "--farm", "tokens", "--role", role])
            return try #require(output.split(separator: "\n").first.map(String.init))
        }
        let admin = try await create("admin"), viewer = try await create("viewer")
        let adminID = String(admin.split(separator: "_")[1])
        let listed = try await farm.admin(["token", "list", "--farm", "tokens"])
        #expect(listed.contains("\(adminID)\ttokens\tadmin\t") && listed.contains("\tactive"), "\(listed)")
        #expect(!listed.contains(String(admin.split(separator: "_")[2])), "a secret was listed")
        #expect(await farm.httpStatus("/v1/farms/tokens/latest", bearer: admin) == 200)

        // Revoked by its whole text: refused within the credential cache's seconds; the other token still reads.
        #expect(try await farm.admin(["token", "revoke", admin]).contains("Revoked read token \(adminID)"))
        let refused = await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            await farm.httpStatus("/v1/farms/tokens/latest", bearer: admin) == 401
        }
        #expect(refused, "a revoked read token still reads")
        #expect(await farm.httpStatus("/v1/farms/tokens/latest", bearer: viewer) == 200)
        let json = try await farm.admin(["token", "list", "--json"])
        #expect(json.contains("\"state\" : \"revoked\"") && json.contains("\"state\" : \"active\""), "\(json)")
        #expect(try await farm.admin(["token", "revoke", adminID]).contains("was revoked already; nothing changed"))

        let unknown = try await runCommand(Farm.ingestBinary, ["token", "revoke", "aaaaaaaa", "--config", farm.ingestConfig])
        #expect(unknown.status == 1 && unknown.stderr.contains("read token 'aaaaaaaa'"), "\(unknown.stderr)")
        let deviceKey = try await farm.createDevice("site-t2", farm: "tokens")
        let wrongKind = try await runCommand(Farm.ingestBinary, ["token", "revoke", deviceKey, "--config", farm.ingestConfig])
        #expect(wrongKind.status == 64 && wrongKind.stderr.contains("device key"), "\(wrongKind.stderr)")
        #expect(!wrongKind.stderr.contains(String(deviceKey.split(separator: "_")[2])), "the key's secret was echoed")
        let noFarm = try await runCommand(Farm.ingestBinary, ["token", "list", "--farm", "nope", "--config", farm.ingestConfig])
        #expect(noFarm.status == 1, "\(noFarm.stderr)")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    /// `migrate` says what it did beyond migrations: the partitions it made ahead, and the rows it moved into them.
    @Test func migrateSaysWhichPartitionsItCreated() async throws {
        let cluster = try PostgresEndToEndTests.Cluster.fromEnvironment()
        let url = try await cluster.createDatabase()
        let scratch = try Scratch(prefix: "fg-migrate")
        let config = try scratch.write("ingest.toml", "[storage]\nurl = \"\(url)\"\n")
        let first = try await runCommand(Farm.ingestBinary, ["migrate", "--config", config])
        #expect(first.status == 0, "\(first.stderr)")
        #expect(first.stdout.contains("Applied migration 1:"), "\(first.stdout)")
        #expect(first.stdout.contains("Created 9 daily partitions of readings (readings_"), "\(first.stdout)")
        #expect(first.stdout.contains("moved 0 rows into them from readings_default."), "\(first.stdout)")
        #expect(first.stdout.contains("Created 4 monthly partitions of rollups_1m (rollups_1m_"), "\(first.stdout)")
        let again = try await runCommand(Farm.ingestBinary, ["migrate", "--config", config])
        #expect(again.status == 0 && again.stdout.contains("is up to date") && !again.stdout.contains("Created"), "\(again.stdout)")
    }

    /// With `rollup_1m` shorter than about two months, last month's partition of `rollups_1m` lies wholly before the
    /// cut-off: partition maintenance (`migrate`, serve's start, every six hours) does not make it, so a retention run
    /// has nothing to drop again. Before, every `migrate` made it and every run dropped it (0 rows), logged and counted
    /// each time. (Seen from the 3rd of a month on, when the cut-off lies past last month's end.)
    @Test func partitionMaintenanceMakesNoPartitionRetentionWouldDrop() async throws {
        let cluster = try PostgresEndToEndTests.Cluster.fromEnvironment()
        let url = try await cluster.createDatabase()
        let scratch = try Scratch(prefix: "fg-migrate")
        let config = try scratch.write("ingest.toml", "[storage]\nurl = \"\(url)\"\n\n[retention]\nraw = \"1d\"\nrollup_1m = \"2d\"\n")
        let first = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        #expect(first.status == 0, "\(first.stdout) \(first.stderr)")
        for round in 1...2 {
            let migrate = try await runCommand(Farm.ingestBinary, ["migrate", "--config", config])
            #expect(migrate.status == 0 && !migrate.stdout.contains("Created"), "round \(round): \(migrate.stdout) \(migrate.stderr)")
            let run = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
            #expect(run.status == 0, "round \(round): \(run.stderr)")
            #expect(!run.stdout.contains("partitions ("), "round \(round): a partition was dropped again: \(run.stdout)")
            #expect(run.stdout.contains("1m rollups before") && run.stdout.contains(": removed 0 rows"), "round \(round): \(run.stdout)")
        }
    }

    /// A configuration whose `[storage] url` names `database` on the test cluster, as `user`.
    static func config(_ scratch: Scratch, database: String, user: String = "farmgate") throws -> String {
        let cluster = try PostgresEndToEndTests.Cluster.fromEnvironment()
        return try scratch.write(
            "ingest.toml", "[storage]\nurl = \"postgresql://\(user)@/\(database)?host=\(cluster.socketDirectory)&port=\(cluster.port)\"\n")
    }

    /// PostgreSQL answers a wrong database or role at once; the pool would hide that and wait for `query_timeout`
    /// (30 s) before saying nothing answered. The command names the server's error within seconds and exits 78: the
    /// settings must change.
    @Test(arguments: [("nodb", "farmgate", "3D000"), ("farmgate_test", "nobody", "28000")])
    func aDatabaseOrRoleTheServerRefusesIsNamedAtOnce(database: String, user: String, sqlState: String) async throws {
        let scratch = try Scratch(prefix: "fg-pgurl")
        let config = try Self.config(scratch, database: database, user: user)
        for command in [["migrate"], ["farm", "create", "f1"]] {
            let started = ContinuousClock.now
            let result = try await runCommand(Farm.ingestBinary, command + ["--config", config])
            let took = started.duration(to: .now)
            #expect(result.status == 78, "\(command): \(result.stderr)")
            #expect(result.stderr.contains(sqlState) && result.stderr.contains("does not exist"), "\(command): \(result.stderr)")
            #expect(took < .seconds(10), "\(command) took \(took)")
        }
    }

    /// A certificate that does not verify, and under verify-full one that does not name the URL's host (though it names
    /// the address connected to): configuration errors named at once (exit 78), from `migrate`, the admin commands and
    /// `serve` at start, not an outage with BoringSSL's error stack.
    @Test func certificateProblemsAreConfigurationErrors() async throws {
        guard let url = ProcessInfo.processInfo.environment["FARMGATE_TEST_DATABASE_TLS_URL"], !url.isEmpty else {
            throw TestServerError("FARMGATE_TEST_DATABASE_TLS_URL is not set: run under .ci/with-postgres")
        }
        let scratch = try Scratch(prefix: "fg-pgtls")
        let otherCA = try await TestCertificates.make(in: scratch.path).caFile
        guard let caStart = url.range(of: "sslrootcert=") else { throw TestServerError("no sslrootcert in \(url)") }
        let wrongCA = String(url[..<caStart.upperBound]) + otherCA
        var cases = [("wrong-ca", wrongCA, "does not verify against the CA file \(otherCA)")]
        if let alias = loopbackAlias {
            cases.append(("wrong-host", url.replacingOccurrences(of: "@localhost:", with: "@\(alias):"), "does not name the host name \(alias)"))
        }
        for (name, url, expected) in cases {
            let config = try scratch.write("\(name).toml", "[server]\nport = \(try freePort())\n[storage]\nurl = \"\(url)\"\nconnect_timeout = \"3s\"\n")
            for command in [["migrate"], ["farm", "create", "f1"], ["serve"]] {
                let started = ContinuousClock.now
                // Bounded: before, `serve` ran on as if PostgreSQL were down.
                let result = try await runCommand("/usr/bin/timeout", ["20", Farm.ingestBinary] + command + ["--config", config])
                #expect(result.status == 78, "\(name) \(command): \(result.stderr)")
                #expect(result.stderr.contains(expected), "\(name) \(command): \(result.stderr)")
                #expect(!result.stderr.contains("unreachable") && !result.stderr.contains("BoringSSL"), "\(name) \(command): \(result.stderr)")
                #expect(started.duration(to: .now) < .seconds(10))
            }
        }
    }
}
