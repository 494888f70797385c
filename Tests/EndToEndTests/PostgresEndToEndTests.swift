import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing

/// The delivery contract on PostgreSQL with the real binaries: `farmgate-ingest serve` on a database of the test
/// cluster, the real agent uploading, and PostgreSQL itself restarted in the middle (`pg_ctl restart`). Fails, never
/// skips, without the cluster that `make test` starts (`.ci/with-postgres`).
@Suite("End to end on PostgreSQL", .serialized)
struct PostgresEndToEndTests {
    struct Cluster {
        let url: String
        let socketDirectory: String
        let bin: String
        let data: String
        let user: String
        let port: String

        static func fromEnvironment() throws -> Cluster {
            let environment = ProcessInfo.processInfo.environment
            guard let url = environment["FARMGATE_TEST_DATABASE_URL"], let bin = environment["FARMGATE_TEST_PGBIN"],
                let data = environment["FARMGATE_TEST_PGDATA"], let user = environment["FARMGATE_TEST_PGUSER"],
                let query = URLComponents(string: url.replacingOccurrences(of: "@/", with: "@x/"))?.queryItems,
                let host = query.first(where: { $0.name == "host" })?.value
            else {
                Issue.record(
                    "FARMGATE_TEST_DATABASE_URL, FARMGATE_TEST_PGBIN, FARMGATE_TEST_PGDATA and FARMGATE_TEST_PGUSER are not all set: run through `make test` or `.ci/with-postgres swift test --filter PostgresEndToEndTests`")
                throw CancellationError()
            }
            let port = query.first(where: { $0.name == "port" })?.value ?? "5432"
            return Cluster(url: url, socketDirectory: host, bin: bin, data: data, user: user, port: port)
        }

        /// Runs a PostgreSQL program as the cluster's owner (through runuser when the tests run as root), its output
        /// appended to `log`. Spawned and reaped here with posix_spawn and waitpid, on a thread of its own: a server
        /// that `pg_ctl` starts outlives the command, and Foundation's Process never saw runuser's exit (left a zombie).
        func run(_ program: String, _ arguments: [String], log: String) async throws -> Int32 {
            let command = getuid() == 0 && user != "root" ? ["/usr/sbin/runuser", "-u", user, "--", bin + "/" + program] + arguments : [bin + "/" + program] + arguments
            return try await runOffPool(name: "test-pg-command") {
                var actions = posix_spawn_file_actions_t()
                posix_spawn_file_actions_init(&actions)
                defer { posix_spawn_file_actions_destroy(&actions) }
                posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
                posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
                posix_spawn_file_actions_adddup2(&actions, 1, 2)
                let argv: [UnsafeMutablePointer<CChar>?] = command.map { strdup($0) } + [nil]
                defer { argv.forEach { free($0) } }
                var pid: pid_t = 0
                let spawned = posix_spawn(&pid, command[0], &actions, nil, argv, environ)
                guard spawned == 0 else { throw POSIXError(POSIXErrorCode(rawValue: spawned) ?? .EIO) }
                var status: Int32 = 0
                while waitpid(pid, &status, 0) == -1, errno == EINTR {}
                return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
            }
        }

        /// A new database's URL.
        func createDatabase() async throws -> String {
            let name = "farmgate_e2e_\(UUID().uuidString.prefix(8).lowercased())"
            let status = try await run("createdb", ["-h", socketDirectory, "-p", port, "-U", "farmgate", name], log: "/dev/null")
            #expect(status == 0, "createdb \(name) failed")
            return "postgresql://farmgate@/\(name)?host=\(socketDirectory)&port=\(port)"
        }
    }

    @Test("Exactly once on PostgreSQL through a database restart under the ingest")
    func exactlyOnceThroughADatabaseRestart() async throws {
        let cluster = try Cluster.fromEnvironment()
        let url = try await cluster.createDatabase()
        let farm = try await Farm(databaseURL: url)
        let key = try await farm.createDevice("site-pg")
        let keyFile = try farm.dir.write("site-pg.key", key + "\n")
        let busy = try farm.agentConfig("agent.toml", device: "site-pg", keyFile: keyFile, sensors: 6, interval: "100ms")
        try await farm.startIngest()

        var agent = try farm.startAgent(config: busy, log: "agent-1.log")
        let flowing = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) { try await farm.storedSequences(device: "site-pg").count >= 60 }
        #expect(flowing, "no readings reached the ingest: \(agent.log) \(farm.ingest?.log ?? "")")

        // PostgreSQL restarts under the running ingest: every pooled connection breaks at once.
        // With -l, as .ci/with-postgres started it: the server must not inherit this test's output pipe.
        let restartLog = farm.dir.file("pg_ctl.log")
        let restart = try await cluster.run(
            "pg_ctl", ["-D", cluster.data, "-l", cluster.data + "/../server.log", "-m", "fast", "-w", "-t", "60", "restart"], log: restartLog)
        #expect(restart == 0, "pg_ctl restart failed: \((try? String(contentsOfFile: restartLog, encoding: .utf8)) ?? "")")
        let before = try await farm.storedSequences(device: "site-pg").count
        let resumed = try await eventually(timeout: .seconds(40), every: .milliseconds(300)) {
            try await farm.storedSequences(device: "site-pg").count >= before + 60
        }
        #expect(resumed, "uploads did not resume after the restart: \(farm.ingest?.log.suffix(3000) ?? "")")
        #expect(await farm.httpStatus("/readyz") == 200)
        #expect(await agent.stop(SIGTERM) == 0, "graceful stop failed: \(agent.log)")

        // A quiet agent on the same buffer drains what is left.
        let quiet = try farm.agentConfig("agent-quiet.toml", device: "site-pg", keyFile: keyFile, sensors: 6, interval: "1h")
        agent = try farm.startAgent(config: quiet, log: "agent-2.log")
        var final: AgentStatus?
        let drained = try await eventually(timeout: .seconds(40), every: .milliseconds(200)) {
            guard let status = try await farm.agentStatus(config: quiet) else { return false }
            final = status
            return status.buffer.pending == 0 && status.buffer.uncommitted == 0
        }
        #expect(drained, "backlog did not drain: \(String(describing: final?.buffer)) \(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0)
        guard let status = final else { return }
        let stored = try await farm.storedSequences(device: "site-pg")
        #expect(Set(stored).count == stored.count, "duplicates stored")
        #expect(status.buffer.quarantined == 0)
        #expect(stored.sorted() == Array(1...status.buffer.lastSequence), "stored \(stored.count) of \(status.buffer.lastSequence)")
        #expect(status.buffer.lastSequence > 120)
        #expect(await farm.ingest?.stop(SIGTERM) == 0, "the ingest did not stop gracefully: \(farm.ingest?.log.suffix(3000) ?? "")")
    }

    /// The store's own metrics are created when `serve` opens it: they must be made on the Prometheus registry
    /// `/metrics` renders, not on the no-op handler that was in place before the metrics system was bootstrapped.
    @Test("serve on PostgreSQL shows the store's metrics on /metrics: partitions created, group commits")
    func storeMetricsAreServed() async throws {
        let cluster = try Cluster.fromEnvironment()
        let url = try await cluster.createDatabase()
        let farm = try await Farm(databaseURL: url)
        let key = try await farm.createDevice("site-m")
        try await farm.startIngest()
        let body = """
            {"device":"site-m","sensors":[{"id":"tank1.ph","quantity":"ph"}],
             "readings":[{"sensor":"tank1.ph","seq":1,"ts":"\(RFC3339.format(Timestamp.now()))","value":6.5}]}
            """
        let (status, answer) = try await farm.post(Data(body.utf8), key: key, contentType: "application/json")
        #expect(status == 200, "\(String(decoding: answer, as: UTF8.self))")
        guard let metricsURL = URL(string: farm.endpoint + "/metrics") else { return }
        let (data, _) = try await URLSession.shared.data(from: metricsURL)
        let text = String(decoding: data, as: UTF8.self)
        for name in [
            "farmgate_ingest_partitions_created_total{table=\"readings\"}", "farmgate_ingest_partitions_created_total{table=\"rollups_1m\"}",
            "farmgate_ingest_group_commits_total", "farmgate_ingest_group_commit_batches",
        ] {
            #expect(text.contains(name), "\(name) is not on /metrics")
        }
        #expect(try await farm.ingestMetric("farmgate_ingest_group_commits_total").map { $0 >= 1 } == true)
        #expect(await farm.ingest?.stop(SIGTERM) == 0, "the ingest did not stop gracefully: \(farm.ingest?.log.suffix(3000) ?? "")")
    }
}
