import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Hummingbird
import HummingbirdTesting
import Prometheus
import Testing

@testable import FarmgateIngest

/// `latest` reads answered on the event loop (``LatestFastPath``): the same answers as the router's, in request order,
/// and every case that is not a plain cached read left to the router.
@Suite("Latest reads answered on the event loop")
struct LatestFastPathTests {
    typealias Answer = (status: Int, head: String, body: [UInt8])

    /// f1 with d1 (sequences 1...3) and d2 (1...2), a server with the credential cache on.
    func withServer(
        limits: IngestConfiguration.Limits = IngestConfiguration.Limits(),
        _ body: @escaping @Sendable (_ port: Int, _ fixture: Fixture, _ metrics: @escaping @Sendable () -> String) async throws -> Void
    ) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        _ = try await fixture.store.store(try phBatch(device: "d1", sequences: 1...3), for: try await fixture.identity(device: "d1"), receivedAt: testNow)
        _ = try await fixture.store.store(try phBatch(device: "d2", sequences: 1...2), for: try await fixture.identity(device: "d2"), receivedAt: testNow)
        let registry = PrometheusCollectorRegistry()
        try await fixture.app(limits: limits, registry: registry, cacheTTL: .seconds(60)).test(.live) { client in
            let port = try #require(client.port)
            try await body(port, fixture, { String(decoding: registry.emitToBuffer(), as: UTF8.self) })
        }
    }

    func request(_ path: String, _ key: APIKey, extra: String = "") -> String {
        "GET \(path) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(key.text)\r\n\(extra)\r\n"
    }

    /// The value of the first line of `text` that starts with `name` and contains every one of `labels`.
    func metric(_ text: String, _ name: String, _ labels: [String] = []) -> [Double] {
        text.split(separator: "\n").filter { line in
            line.hasPrefix(name) && labels.allSatisfy { line.contains($0) }
        }.compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }
    }

    func header(_ answer: Answer, _ name: String) -> String? {
        answer.head.split(separator: "\r\n").dropFirst().first { $0.lowercased().hasPrefix(name + ":") }
            .map { String($0.dropFirst(name.count + 1)).trimmingCharacters(in: .whitespaces) }
    }

    func headerNames(_ answer: Answer) -> [String] {
        answer.head.split(separator: "\r\n").dropFirst().compactMap { $0.split(separator: ":").first?.lowercased() }.sorted()
    }

    @Test("the event loop's answer equals the router's: body, headers, rate-limit count, request metric")
    func sameAnswer() async throws {
        // No refill during the test: each answer takes exactly one token, whatever the machine's speed.
        var limits = IngestConfiguration.Limits()
        limits.readRequestsPerSecond = 0.001
        try await withServer(limits: limits) { port, fixture, metrics in
            let key = fixture.readToken
            let answers = try await runOffPool(name: "raw-http") { () throws -> [Answer] in
                let connection = try RawConnection(port: port)
                var answers: [Answer] = []
                for _ in 0..<3 {
                    connection.send(request("/v1/farms/f1/latest?device=d1", key))
                    answers += connection.readResponses(1, timeout: .seconds(5))
                }
                return answers
            }
            try #require(answers.count == 3)
            // The first read fills the cache through the router; the next two are answered on the event loop.
            #expect(answers.map(\.status) == [200, 200, 200])
            #expect(answers[1].body == answers[0].body && answers[2].body == answers[0].body)
            #expect(String(decoding: answers[0].body, as: UTF8.self).contains("\"d1\""))
            #expect(headerNames(answers[1]) == headerNames(answers[0]), "\(answers[0].head)\n---\n\(answers[1].head)")
            #expect(header(answers[1], "content-type") == header(answers[0], "content-type"))
            #expect(header(answers[1], "content-length") == String(answers[0].body.count))
            let remaining = answers.compactMap { header($0, "ratelimit-remaining").flatMap { Int($0) } }
            #expect(remaining.count == 3 && remaining[1] == remaining[0] - 1 && remaining[2] == remaining[0] - 2, "\(remaining)")
            let text = metrics()
            #expect(metric(text, "farmgate_ingest_latest_event_loop_answers_total") == [2])
            // One series for the route, whichever path answered.
            #expect(
                metric(text, "farmgate_ingest_http_request_duration_seconds_count", ["route=\"/v1/farms/{farm}/latest\"", "status=\"2xx\""]) == [3],
                "\(text)")
        }
    }

    @Test("pipelined requests are answered in order, the router's between the event loop's")
    func pipelinedOrder() async throws {
        try await withServer { port, fixture, metrics in
            let key = fixture.readToken
            let answers = try await runOffPool(name: "raw-http") { () throws -> [Answer] in
                let connection = try RawConnection(port: port)
                connection.send(request("/v1/farms/f1/latest", key))
                _ = connection.readResponses(1, timeout: .seconds(5))
                // In one write: cached (event loop), the router's health check, then two cached ones behind it.
                connection.send(
                    request("/v1/farms/f1/latest?device=d1", key) + request("/healthz", key) + request("/v1/farms/f1/latest?device=d2", key)
                        + request("/v1/farms/f1/latest?device=d1&limit=1", key))
                return connection.readResponses(4, timeout: .seconds(5))
            }
            try #require(answers.count == 4)
            let bodies = answers.map { String(decoding: $0.body, as: UTF8.self) }
            #expect(answers.map(\.status) == [200, 200, 200, 200])
            #expect(bodies[0].contains("\"d1\"") && !bodies[0].contains("\"d2\""))
            #expect(bodies[1].contains("\"ok\""))
            #expect(bodies[2].contains("\"d2\"") && !bodies[2].contains("\"d1\""))
            #expect(bodies[3].contains("\"d1\"") && bodies[3].contains("\"next\""))
            #expect((metric(metrics(), "farmgate_ingest_latest_event_loop_answers_total").first ?? 0) >= 1)
        }
    }

    @Test("errors, Connection: close and the rate limit are the router's, with the cache warm")
    func routerCases() async throws {
        var limits = IngestConfiguration.Limits()
        limits.readBurst = 5
        limits.readRequestsPerSecond = 0.001
        try await withServer(limits: limits) { port, fixture, metrics in
            let key = fixture.readToken
            // The same key id with the secret's last digit changed.
            let wrongSecret = try #require(APIKey(parsing: String(key.text.dropLast()) + (key.text.hasSuffix("0") ? "1" : "0")))
            let other = fixture.otherFarmReadToken
            let (answers, closed) = try await runOffPool(name: "raw-http") { () throws -> ([Answer], Bool) in
                let connection = try RawConnection(port: port)
                var answers: [Answer] = []
                for text in [
                    // Tokens of the read limit (burst 5) are taken after authentication, before the query is read.
                    request("/v1/farms/f1/latest", key),  // 200, router (fills the cache): token 1
                    request("/v1/farms/f1/latest", key),  // 200, event loop: token 2
                    request("/v1/farms/f1/latest", wrongSecret),  // 401
                    request("/v1/farms/f1/latest", other),  // 403: another farm's token
                    request("/v1/farms/f1/latest?limit=0", key),  // 400: token 3
                    request("/v1/farms/f1/latest", key),  // 200, event loop: token 4
                    request("/v1/farms/f1/latest", key),  // 200, event loop: token 5
                    request("/v1/farms/f1/latest", key),  // 429 from the router
                ] {
                    connection.send(text)
                    answers += connection.readResponses(1, timeout: .seconds(5))
                }
                let closing = try RawConnection(port: port)
                closing.send(request("/v1/farms/f2/latest", other, extra: "Connection: close\r\n"))
                answers += closing.readResponses(1, timeout: .seconds(5))
                let end = closing.readUntilClosed(timeout: .seconds(5))
                return (answers, end.closed && end.bytes.isEmpty)
            }
            #expect(answers.map(\.status) == [200, 200, 401, 403, 400, 200, 200, 429, 200], "\(answers.map(\.status))")
            #expect(String(decoding: answers[2].body, as: UTF8.self).contains("\"unauthorized\""))
            #expect(answers.count == 9 && header(answers[7], "retry-after") != nil)
            #expect(closed)
            #expect(metric(metrics(), "farmgate_ingest_latest_event_loop_answers_total") == [3])
        }
    }

    @Test(
        "a request that does not keep its connection alive is answered, then the connection closed; one that does stays open (HTTP/1.0 told so)",
        arguments: [
            ("HTTP/1.0", "", false), ("HTTP/1.1", "Connection: Close\r\n", false), ("HTTP/1.1", "Connection: keep-alive, close\r\n", false),
            ("HTTP/1.0", "Connection: keep-alive\r\n", true), ("HTTP/1.1", "", true),
        ])
    func keepAlive(version: String, header: String, staysOpen: Bool) async throws {
        try await withServer { port, fixture, metrics in
            let key = fixture.readToken
            let (answers, closed) = try await runOffPool(name: "raw-http") { () throws -> ([Answer], Bool) in
                // The cache warm, so that a read the connection may keep would be answered on the event loop.
                let warm = try RawConnection(port: port)
                warm.send(request("/v1/farms/f1/latest", key))
                var answers = warm.readResponses(1, timeout: .seconds(5))
                let connection = try RawConnection(port: port)
                for path in ["/v1/farms/f1/latest", "/healthz"] {
                    connection.send("GET \(path) \(version)\r\nHost: x\r\nAuthorization: Bearer \(key.text)\r\n\(header)\r\n")
                    answers += connection.readResponses(1, timeout: .seconds(5))
                    guard staysOpen else { break }
                }
                let end = connection.readUntilClosed(timeout: .seconds(staysOpen ? 1 : 5))
                return (answers, end.closed)
            }
            #expect(answers.map(\.status) == (staysOpen ? [200, 200, 200] : [200, 200]), "\(answers.map(\.status))")
            #expect(answers.count >= 2 && answers[1].body == answers[0].body)
            #expect(closed == !staysOpen, staysOpen ? "the connection was closed" : "the connection stayed open after its answer")
            // An HTTP/1.0 client keeps the connection only when the answer says so (RFC 9112 §C.2.2).
            for answer in answers.dropFirst() where version == "HTTP/1.0" && staysOpen {
                #expect(answer.head.lowercased().contains("connection: keep-alive"), "\(answer.head)")
            }
            // And an answer after which the connection closes says so (RFC 9112 §9.6; a tester, 2026-12-07).
            for answer in answers.dropFirst() where !staysOpen {
                #expect(answer.head.lowercased().contains("connection: close"), "\(answer.head)")
            }
            for answer in answers.dropFirst() where staysOpen {
                #expect(!answer.head.lowercased().contains("connection: close"), "\(answer.head)")
            }
            // Only a read on a connection that stays open is the event loop's.
            #expect(metric(metrics(), "farmgate_ingest_latest_event_loop_answers_total") == [staysOpen ? 1 : 0])
        }
    }

    @Test("a client that pipelines reads without reading the answers does not have them all written into memory")
    func backpressure() async throws {
        var limits = IngestConfiguration.Limits()
        limits.readBurst = 100_000
        try await withServer(limits: limits) { port, fixture, metrics in
            // 500 more sensors on d2: an answer of about 80 kB.
            let identity = try await fixture.identity(device: "d2")
            let sensors = try (0..<500).map { SensorDescriptor(id: try sensorID("tank.s\($0)"), quantity: .ph) }
            let batch = Batch(
                device: identity.device, sensors: sensors,
                readings: sensors.enumerated().map { index, sensor in
                    Reading(sensor: sensor.id, sequence: UInt64(10 + index), timestamp: Timestamp(microseconds: testNow.microseconds - 1_000_000), value: 6.5)
                })
            _ = try await fixture.store.store(batch, for: identity, receivedAt: testNow)
            let key = fixture.readToken
            let count = 2_000
            let (answeredWhileBlocked, answers, shortRead) = try await runOffPool(name: "raw-http") { () throws -> (Double, [Answer], String) in
                let connection = try RawConnection(port: port)
                connection.send(request("/v1/farms/f1/latest?device=d2", key))
                _ = connection.readResponses(1, timeout: .seconds(5))
                // 2,000 reads of about 80 kB each (160 MB of answers) sent at once, none read for a second.
                connection.send(String(repeating: request("/v1/farms/f1/latest?device=d2", key), count: count))
                Thread.sleep(forTimeInterval: 1)
                let answered = metric(metrics(), "farmgate_ingest_latest_event_loop_answers_total").first ?? 0
                // 160 MB of answers made by a debug build take a minute in the first pass. Twice only 1,865 came: a read
                // of the server's that began inside a head (`Bearer KEY`) was taken for an HTTP/0.9 request line,
                // answered 505, and the close lost what was on its way (`RefusalMessageTests.cutPipelinedHead`).
                let answers = connection.readResponses(count, timeout: .seconds(180))
                return (answered, answers, connection.shortReadReason)
            }
            // What the sockets hold (a few MB) and a high-water mark's worth, not all 2,000.
            #expect(answeredWhileBlocked < 500, "\(answeredWhileBlocked) answers written while the client read nothing")
            // Then every answer arrives, complete and in order, from either path.
            #expect(answers.count == count, "\(shortRead); \(metrics().split(separator: "\n").filter { $0.contains("connection") && !$0.hasPrefix("#") })")
            #expect(answers.allSatisfy { $0.status == 200 && $0.body.count > 50_000 })
        }
    }

    @Test("only the route itself is a candidate", arguments: [
        ("/v1/farms/f1/latest", true), ("/v1/farms/f1/latest?device=d1&sensor=*.ph", true), ("/v1/farms/f1/latest/", false),
        ("/v1/farms//latest", false), ("/v1/farms/f%31/latest", false), ("/v1/farms/a/b/latest", false), ("/v1/farms/f1/latestx", false),
        ("/v1/farms/f1/devices/d1/sensors/s/readings", false),
    ])
    func candidates(path: String, candidate: Bool) {
        #expect((LatestFastPath.farmSegment(of: path) != nil) == candidate)
    }
}
