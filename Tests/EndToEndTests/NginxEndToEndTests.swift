import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing

/// Several instances: two real `farmgate-ingest serve` on one PostgreSQL database behind Debian's nginx running
/// `examples/nginx-farmgate.conf` (ports substituted, its own prefix in the scratch directory, nothing under /etc or
/// /var; a master process, which handles signals whatever mask the test runner's threads hand down), the real agent uploading through nginx, and PostgreSQL restarted in the middle (`pg_ctl restart`). Stored
/// sequences must be exactly 1…N, both instances must have stored batches, and every `latest` answer through nginx,
/// whichever instance gives it, must show the last reading. Fails, never skips, without the cluster or nginx.
@Suite("End to end: two ingests behind nginx on one PostgreSQL", .serialized)
struct NginxEndToEndTests {
    static let nginxBinary = "/usr/sbin/nginx"

    /// nginx on `port`, proxying to `upstreams` with the example's configuration.
    struct Nginx {
        let child: Child
        let port: Int
        var endpoint: String { "http://127.0.0.1:\(port)" }

        static func start(in dir: Scratch, port: Int, upstreams: [Int]) throws -> Nginx {
            guard FileManager.default.isExecutableFile(atPath: NginxEndToEndTests.nginxBinary) else {
                Issue.record("\(NginxEndToEndTests.nginxBinary) is missing: install nginx-light (.ci/install-deps does)")
                throw CancellationError()
            }
            let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
                .appendingPathComponent("examples/nginx-farmgate.conf")
            var site = try String(contentsOf: example, encoding: .utf8)
            #expect(site.contains("listen 80;") && site.contains("127.0.0.1:8081") && site.contains("127.0.0.1:8082"), "the example changed shape")
            site = site.replacingOccurrences(of: "listen 80;", with: "listen 127.0.0.1:\(port);")
                .replacingOccurrences(of: "listen [::]:80;", with: "")
                .replacingOccurrences(of: "127.0.0.1:8081", with: "127.0.0.1:\(upstreams[0])")
                .replacingOccurrences(of: "127.0.0.1:8082", with: "127.0.0.1:\(upstreams[1])")
            let prefix = dir.file("nginx")
            try FileManager.default.createDirectory(atPath: prefix, withIntermediateDirectories: true)
            // Run as root (CI), nginx's worker runs as `nobody`: it must reach the temporary directories nginx creates
            // for it in the prefix.
            chmod(dir.file(""), 0o755)
            chmod(prefix, 0o755)
            let sitePath = try dir.write("nginx/farmgate.conf", site)
            let main = try dir.write(
                "nginx/nginx.conf",
                """
                daemon off;
                worker_processes 1;
                pid \(prefix)/nginx.pid;
                error_log \(prefix)/error.log info;
                events { worker_connections 512; }
                http {
                    access_log \(prefix)/access.log;
                    client_body_temp_path \(prefix)/body;
                    proxy_temp_path \(prefix)/proxy;
                    fastcgi_temp_path \(prefix)/fastcgi;
                    uwsgi_temp_path \(prefix)/uwsgi;
                    scgi_temp_path \(prefix)/scgi;
                    include \(sitePath);
                }
                """)
            let child = try Child(NginxEndToEndTests.nginxBinary, ["-p", prefix, "-c", main, "-e", prefix + "/error.log"], logPath: dir.file("nginx.log"))
            return Nginx(child: child, port: port)
        }
    }

    func storedBatches(_ endpoint: String) async -> Double {
        guard let url = URL(string: endpoint + "/metrics"), let (data, _) = try? await URLSession.shared.data(from: url) else { return 0 }
        let sample = #"farmgate_ingest_batches_total{result="stored"} "#
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") where line.hasPrefix(sample) {
            return Double(line.dropFirst(sample.count)) ?? 0
        }
        return 0
    }

    /// The highest sequence among the device's sensors in `latest`, through `endpoint`.
    func latestSequence(_ endpoint: String, token: String, device: String) async throws -> UInt64? {
        guard let url = URL(string: endpoint + "/v1/farms/e2e/latest?device=\(device)") else { return nil }
        var request = URLRequest(url: url)
        request.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization")
        request.timeoutInterval = 5
        let (data, response) = try await URLSession.shared.data(for: request)
        guard (response as? HTTPURLResponse)?.statusCode == 200,
            let object = try JSONSerialization.jsonObject(with: data) as? [String: Any], let sensors = object["sensors"] as? [[String: Any]]
        else { return nil }
        return sensors.compactMap { ($0["sequence"] as? NSNumber)?.uint64Value }.max()
    }

    @Test("exactly once through nginx to two ingests on one PostgreSQL, through a database restart")
    func exactlyOnceThroughNginx() async throws {
        let cluster = try PostgresEndToEndTests.Cluster.fromEnvironment()
        let url = try await cluster.createDatabase()
        let farm = try await Farm(databaseURL: url)
        let key = try await farm.createDevice("site-ng")
        let tokenOutput = try await farm.admin(["token", "create", "--farm", "e2e", "--role", "viewer"])
        let token = try #require(tokenOutput.split(whereSeparator: { $0 == " " || $0 == "\n" }).first { $0.hasPrefix("fgr_") }.map(String.init))
        let keyFile = try farm.dir.write("site-ng.key", key + "\n")
        // As the example says to deploy: nginx is the trusted proxy whose X-Forwarded-For names the client.
        let configured = try String(contentsOfFile: farm.ingestConfig, encoding: .utf8)
            .replacingOccurrences(of: "[server]\n", with: "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n")
        #expect(configured.contains("trusted_proxies"))
        try configured.write(toFile: farm.ingestConfig, atomically: true, encoding: .utf8)
        try await farm.startIngest()
        let secondPort = try freePort()
        let second = try await farm.startOtherInstance(port: secondPort)
        let nginx = try Nginx.start(in: farm.dir, port: try freePort(), upstreams: [farm.port, secondPort])
        let proxied = await eventually(timeout: .seconds(20), every: .milliseconds(100)) { await Farm.httpStatus(url: nginx.endpoint + "/readyz") == 200 }
        #expect(proxied, "nginx did not answer: \(nginx.child.log) \((try? String(contentsOfFile: farm.dir.file("nginx/error.log"), encoding: .utf8)) ?? "")")

        let busy = try farm.agentConfig("agent.toml", device: "site-ng", keyFile: keyFile, sensors: 6, interval: "100ms", endpoint: nginx.endpoint)
        var agent = try farm.startAgent(config: busy, log: "agent-1.log")
        let flowing = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) { try await farm.storedSequences(device: "site-ng").count >= 60 }
        #expect(flowing, "no readings reached the ingests through nginx: \(agent.log)")

        // PostgreSQL restarts under both instances.
        let restartLog = farm.dir.file("pg_ctl.log")
        let restart = try await cluster.run(
            "pg_ctl", ["-D", cluster.data, "-l", cluster.data + "/../server.log", "-m", "fast", "-w", "-t", "60", "restart"], log: restartLog)
        #expect(restart == 0, "pg_ctl restart failed: \((try? String(contentsOfFile: restartLog, encoding: .utf8)) ?? "")")
        let before = try await farm.storedSequences(device: "site-ng").count
        let resumed = try await eventually(timeout: .seconds(40), every: .milliseconds(300)) {
            try await farm.storedSequences(device: "site-ng").count >= before + 60
        }
        #expect(resumed, "uploads did not resume after the restart: \(farm.ingest?.log.suffix(2000) ?? "") \(second.log.suffix(2000))")
        #expect(await agent.stop(SIGTERM) == 0, "graceful stop failed: \(agent.log)")

        // A quiet agent on the same buffer drains what is left.
        let quiet = try farm.agentConfig("agent-quiet.toml", device: "site-ng", keyFile: keyFile, sensors: 6, interval: "1h", endpoint: nginx.endpoint)
        agent = try farm.startAgent(config: quiet, log: "agent-2.log")
        // Drained, and settled: its sampler's first reads at start (the sensors of the first phase) are in, and two
        // looks half a second apart agree. A look before those reads ended took 149 for the last sequence, and the
        // agent then stored 150 and 151 (CI run 127).
        var final: AgentStatus?
        var previous: UInt64?
        let drained = try await eventually(timeout: .seconds(40), every: .milliseconds(500)) {
            guard let status = try await farm.agentStatus(config: quiet) else { return false }
            defer { previous = status.buffer.lastSequence }
            final = status
            return status.buffer.pending == 0 && status.buffer.uncommitted == 0 && status.sensors.contains { $0.lastReadAt != nil }
                && previous == status.buffer.lastSequence
        }
        #expect(drained, "backlog did not drain: \(String(describing: final?.buffer)) \(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0)
        let status = try #require(final)
        let stored = try await farm.storedSequences(device: "site-ng")
        #expect(Set(stored).count == stored.count, "duplicates stored")
        #expect(status.buffer.quarantined == 0)
        #expect(stored.sorted() == Array(1...status.buffer.lastSequence), "stored \(stored.count) of \(status.buffer.lastSequence)")
        #expect(status.buffer.lastSequence > 120)

        // Both instances took batches (nginx balanced them), and both serve the same latest values.
        let storedA = await storedBatches(farm.endpoint)
        let storedB = await storedBatches("http://127.0.0.1:\(secondPort)")
        #expect(storedA > 0 && storedB > 0, "batches stored: first instance \(storedA), second \(storedB)")
        for _ in 0..<6 {
            let seen = try await latestSequence(nginx.endpoint, token: token, device: "site-ng")
            #expect(seen == status.buffer.lastSequence, "latest through nginx showed \(String(describing: seen)), the last stored is \(status.buffer.lastSequence)")
        }
        #expect(try await latestSequence(farm.endpoint, token: token, device: "site-ng") == status.buffer.lastSequence)
        #expect(try await latestSequence("http://127.0.0.1:\(secondPort)", token: token, device: "site-ng") == status.buffer.lastSequence)

        let nginxExit = await nginx.child.stop(SIGTERM)
        #expect(nginxExit == 0, "nginx exited \(nginxExit): \(nginx.child.log) \((try? String(contentsOfFile: farm.dir.file("nginx/error.log"), encoding: .utf8))?.suffix(1500) ?? "")")
        #expect(await second.stop(SIGTERM) == 0, "the second ingest did not stop gracefully: \(second.log.suffix(2000))")
        #expect(await farm.ingest?.stop(SIGTERM) == 0, "the first ingest did not stop gracefully: \(farm.ingest?.log.suffix(2000) ?? "")")
    }
}
