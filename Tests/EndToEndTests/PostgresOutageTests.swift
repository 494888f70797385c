import FarmgateTestSupport
import FarmgateWire
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing

/// A PostgreSQL outage under the real `farmgate-ingest serve`: the shared test cluster stopped (`pg_ctl stop -m fast`)
/// and started again. While it is down, reads and uploads are answered 503 with `Retry-After` at once rather than after
/// `query_timeout` (30 s by default, as here); once it is back, requests succeed within seconds, not after
/// postgres-nio's reconnect backoff; every reading is stored exactly once. Stops the shared cluster: runs alone
/// (`SOLO_SUITES` in the Makefile).
@Suite("PostgreSQL outage under the ingest", .serialized)
struct PostgresOutageTests {
    /// One answer of the ingest, and how long it took.
    struct Answer {
        var status: Int
        var retryAfter: String?
        var body: String
        var elapsed: Duration
    }

    /// When the readings were taken: a minute before the test started.
    let base = Timestamp(microseconds: Timestamp.now().microseconds - 60_000_000)

    @Test("During an outage reads and uploads are answered 503 at once; after it requests succeed within seconds; nothing is lost or doubled")
    func outageIsAnsweredAtOnceAndRecoveredPromptly() async throws {
        let cluster = try PostgresEndToEndTests.Cluster.fromEnvironment()
        let url = try await cluster.createDatabase()
        let farm = try await Farm(databaseURL: url)
        let key = try await farm.createDevice("site-out")
        let tokenOutput = try await farm.admin(["token", "create", "--farm", "e2e", "--role", "viewer"])
        let readToken = try #require(
            tokenOutput.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\"" }).first { $0.hasPrefix("fgr_") }.map(String.init))
        try await farm.startIngest()
        let ingestLog = { farm.ingest?.log.suffix(4000) ?? "" }

        let before = try await upload(farm, key: key, sequences: 1...5)
        #expect(before.status == 200, "upload before the outage: \(before.body)")
        #expect(try await latest(farm, token: readToken).status == 200)

        let stopped = try await cluster.run("pg_ctl", ["-D", cluster.data, "-m", "fast", "-w", "-t", "60", "stop"], log: farm.dir.file("pg_ctl.log"))
        #expect(stopped == 0, "pg_ctl stop failed")
        do {
            // The first failure: the ingest may have to find out that the database is gone.
            var first: Answer?
            let failed = try await eventually(timeout: .seconds(70), every: .milliseconds(100)) {
                first = try await latest(farm, token: readToken)
                return first?.status == 503
            }
            #expect(failed, "reads never failed while PostgreSQL was down: \(String(describing: first)) \(ingestLog())")
            print("outage: first failed read after \(first?.elapsed ?? .zero)")

            // Now every call is answered at once.
            let read = try await latest(farm, token: readToken)
            let write = try await upload(farm, key: key, sequences: 6...10)
            let ready = try await get(farm, "/readyz")
            print("outage: read \(read.status) in \(read.elapsed), upload \(write.status) in \(write.elapsed), readyz \(ready.status) in \(ready.elapsed)")
            for (what, answer) in [("read", read), ("upload", write), ("readyz", ready)] {
                #expect(answer.status == 503, "\(what) during the outage: \(answer.status) \(answer.body)")
                #expect(answer.retryAfter != nil, "\(what) during the outage has no Retry-After")
                #expect(answer.elapsed < .seconds(2), "\(what) during the outage took \(answer.elapsed)")
            }
            #expect(try await get(farm, "/healthz").status == 200, "liveness must not follow the database")
            #expect(try await farm.ingestMetric("farmgate_ingest_database_up") == 0)
        } catch {
            Issue.record("during the outage: \(error)")
        }

        // PostgreSQL back, with the options it was started with (pg_ctl start, unlike restart, does not reuse them).
        let options = try postmasterOptions(cluster)
        let started = try await cluster.run(
            "pg_ctl", ["-D", cluster.data, "-l", cluster.data + "/../server.log", "-w", "-t", "60", "-o", options, "start"],
            log: farm.dir.file("pg_ctl.log"))
        try #require(started == 0, "pg_ctl start failed: \((try? String(contentsOfFile: farm.dir.file("pg_ctl.log"), encoding: .utf8)) ?? "")")
        let back = ContinuousClock.now
        var last: Answer?
        let recovered = try await eventually(timeout: .seconds(60), every: .milliseconds(100)) {
            last = try await upload(farm, key: key, sequences: 6...10)
            return last?.status == 200
        }
        let recovery = back.duration(to: .now)
        print("outage: first success \(recovery) after PostgreSQL accepted connections again")
        #expect(recovered, "uploads never succeeded after the restart: \(String(describing: last)) \(ingestLog())")
        #expect(recovery < .seconds(5), "the first success came \(recovery) after the restart")

        let after = try await upload(farm, key: key, sequences: 11...15)
        #expect(after.status == 200, "upload after the outage: \(after.body)")
        let again = try await upload(farm, key: key, sequences: 6...10)
        let receipt = try JSONSerialization.jsonObject(with: Data(again.body.utf8)) as? [String: Any]
        #expect(again.status == 200 && (receipt?["duplicates"] as? NSNumber)?.intValue == 5, "a batch sent again is all duplicates: \(again.body)")
        #expect(try await latest(farm, token: readToken).status == 200)
        #expect(try await get(farm, "/readyz").status == 200)
        #expect(try await farm.ingestMetric("farmgate_ingest_database_up") == 1)

        let stored = try await farm.storedSequences(device: "site-out")
        #expect(stored.sorted() == Array(1...15), "stored \(stored.sorted())")
        #expect(await farm.ingest?.stop(SIGTERM) == 0, "the ingest did not stop gracefully: \(ingestLog())")
        // One line when the database went away and one when it came back, not one per request.
        let log = farm.ingest?.log ?? ""
        #expect(log.components(separatedBy: "PostgreSQL is unreachable; store calls are answered at once").count - 1 == 1, "\(log.suffix(4000))")
        #expect(log.components(separatedBy: "PostgreSQL answers again").count - 1 == 1, "\(log.suffix(4000))")
        #expect(!log.contains("store failed"), "a request's failure during a known outage is not an error line: \(log.suffix(4000))")
    }

    /// The options the cluster's server was started with, from `postmaster.opts` (its command line, the binary first).
    private func postmasterOptions(_ cluster: PostgresEndToEndTests.Cluster) throws -> String {
        let line = try String(contentsOfFile: cluster.data + "/postmaster.opts", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        guard let space = line.firstIndex(of: " ") else { return "" }
        return String(line[line.index(after: space)...])
    }

    /// A batch of readings `sequences`, each reading the same whenever it is sent (a second apart from `base`).
    private func upload(_ farm: Farm, key: String, sequences: ClosedRange<Int>) async throws -> Answer {
        let readings = sequences.map { sequence in
            "{\"sensor\":\"tank1.ph\",\"seq\":\(sequence),\"ts\":\"\(RFC3339.format(Timestamp(microseconds: base.microseconds + Int64(sequence) * 1_000_000)))\",\"value\":6.\(sequence)}"
        }
        let body = "{\"device\":\"site-out\",\"sensors\":[{\"id\":\"tank1.ph\",\"quantity\":\"ph\"}],\"readings\":[\(readings.joined(separator: ","))]}"
        return try await request(farm, IngestProtocol.batchesPath, method: "POST", bearer: key, body: Data(body.utf8))
    }

    private func latest(_ farm: Farm, token: String) async throws -> Answer {
        try await request(farm, "/v1/farms/e2e/latest", bearer: token)
    }

    private func get(_ farm: Farm, _ path: String) async throws -> Answer {
        try await request(farm, path)
    }

    /// One request, given a minute: how long the ingest takes to answer is what is measured.
    private func request(_ farm: Farm, _ path: String, method: String = "GET", bearer: String? = nil, body: Data? = nil) async throws -> Answer {
        guard let url = URL(string: farm.endpoint + path) else { throw URLError(.badURL) }
        var request = URLRequest(url: url)
        request.httpMethod = method
        request.timeoutInterval = 60
        if let bearer { request.setValue("Bearer \(bearer)", forHTTPHeaderField: "Authorization") }
        if let body {
            request.setValue("application/json", forHTTPHeaderField: "Content-Type")
            request.httpBody = body
        }
        let start = ContinuousClock.now
        let (data, response) = try await URLSession.shared.data(for: request)
        let http = response as? HTTPURLResponse
        return Answer(
            status: http?.statusCode ?? 0, retryAfter: http?.value(forHTTPHeaderField: "Retry-After"), body: String(decoding: data, as: UTF8.self),
            elapsed: start.duration(to: .now))
    }
}
