import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Hummingbird
import HummingbirdTesting
import Prometheus
import Testing

@testable import FarmgateIngest

/// Raw sockets against a live in-process server: what the HTTP parser refuses, the connection cap, and the timeouts.
/// The same limits are tested against the real binary, with thousands of connections, in EndToEndTests.
@Suite("Connection limits and protocol errors")
struct ConnectionLimitTests {
    func app(_ fixture: Fixture, server: IngestConfiguration.Server) -> some ApplicationProtocol {
        var configuration = IngestConfiguration()
        configuration.server = server
        configuration.server.port = 0
        return buildApplication(
            configuration: configuration, store: fixture.store, registry: PrometheusCollectorRegistry(), logger: testLogger, now: { testNow })
    }

    /// Sends `request` on a new connection and returns the answer (nil when none came within 10 s).
    func exchange(port: Int, _ request: [UInt8]) async throws -> (status: Int, head: String, body: [UInt8])? {
        try await runOffPool(name: "raw-http") {
            let connection = try RawConnection(port: port)
            connection.send(request)
            return connection.readResponse(timeout: .seconds(10))
        }
    }

    func errorCode(_ body: [UInt8]) throws -> String {
        try JSONDecoder().decode(APIErrorBody.self, from: Data(body)).error.code
    }

    @Test(
        "a request head the parser refuses gets a JSON 400 body, not an empty one",
        arguments: [
            "GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", "\u{01}\u{02}garbage\r\n\r\n", "\u{16}\u{03}\u{01}\u{02}\u{00}\u{01}\u{00}",
            "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ])
    func malformedHead(request: String) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await app(fixture, server: .init()).test(.live) { client in
            let port = try #require(client.port)
            let answer = try #require(try await exchange(port: port, Array(request.utf8)))
            #expect(answer.status == 400)
            #expect(answer.head.lowercased().contains("content-type: application/json"))
            #expect(try errorCode(answer.body) == "bad_request")
        }
    }

    @Test("a header section over the parser's limit is 431 request_header_fields_too_large with a JSON body")
    func headerTooLarge() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await app(fixture, server: .init()).test(.live) { client in
            let port = try #require(client.port)
            let request = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + String(repeating: "a", count: 100_000) + "\r\n\r\n"
            let answer = try #require(try await exchange(port: port, Array(request.utf8)))
            #expect(answer.status == 431)
            #expect(try errorCode(answer.body) == "request_header_fields_too_large")
            // Many small headers adding up past the limit are the same.
            var many = "GET /healthz HTTP/1.1\r\nHost: x\r\n"
            for index in 0..<2_000 { many += "X-H\(index): " + String(repeating: "b", count: 50) + "\r\n" }
            let second = try #require(try await exchange(port: port, Array((many + "\r\n").utf8)))
            #expect(second.status == 431)
        }
    }

    @Test("past max_connections a new connection is answered 503 JSON with Retry-After, and served again once one closes")
    func connectionCap() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var server = IngestConfiguration.Server()
        server.maxConnections = 5
        try await app(fixture, server: server).test(.live) { client in
            let port = try #require(client.port)
            // Open connections one at a time, each confirmed by an answered request (connections are set up on several
            // event loops, so only confirmed ones are counted in order). The test client may hold one more.
            #expect(try await client.execute(uri: "/healthz", method: .get).status == .ok)
            var (held, refused) = try await runOffPool(name: "raw-http") { () throws -> ([RawConnection], (status: Int, head: String, body: [UInt8])?) in
                var held: [RawConnection] = []
                for _ in 0..<6 {
                    let connection = try RawConnection(port: port)
                    connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    guard let answer = connection.readResponse(timeout: .seconds(10)) else { return (held, nil) }
                    if answer.status != 200 { return (held, answer) }
                    held.append(connection)
                }
                return (held, nil)
            }
            let answer = try #require(refused, "6 connections beyond the test client's were all served with max_connections = 5")
            #expect((4...5).contains(held.count), "the first refusal came after \(held.count) served connections")
            #expect(answer.status == 503)
            #expect(answer.head.lowercased().contains("retry-after: 5"))
            #expect(try errorCode(answer.body) == "unavailable")
            // Close one held connection: the next one is served.
            held.removeLast()
            refused = nil
            let served = await eventually(timeout: .seconds(10), every: .milliseconds(100)) {
                (try? await exchange(port: port, Array("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".utf8)))??.status == 200
            }
            #expect(served)
            withExtendedLifetime(held) {}
        }
    }

    /// Header, body and idle timeouts of one second each.
    static var oneSecondTimeouts: IngestConfiguration.Server {
        var server = IngestConfiguration.Server()
        server.headerTimeout = .seconds(1)
        server.bodyTimeout = .seconds(1)
        server.idleTimeout = .seconds(1)
        return server
    }

    @Test("a head sent a byte at a time is answered 408 after header_timeout; a trickling body after body_timeout")
    func slowClients() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await app(fixture, server: Self.oneSecondTimeouts).test(.live) { client in
            let port = try #require(client.port)
            let deviceKey = fixture.deviceKey.text
            let (headerAnswer, headerSeconds, bodyAnswer, idleClosed) = try await runOffPool(name: "raw-http") {
                // Slowloris: one byte every 200 ms, never finishing the head.
                let slow = try RawConnection(port: port)
                let start = ContinuousClock.now
                var closed = false
                for byte in Array("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ".utf8) + Array(repeating: UInt8(ascii: "a"), count: 40) {
                    if !slow.send([byte]) || slow.checkClosed() {
                        closed = true
                        break
                    }
                    Thread.sleep(forTimeInterval: 0.2)
                }
                let headerSeconds = start.duration(to: .now) / .seconds(1)
                _ = closed
                let headerAnswer = String(decoding: slow.drained + slow.readUntilClosed(timeout: .seconds(5)).bytes, as: UTF8.self)

                // A body promised at 100 bytes, sent at one byte every 200 ms, with a valid key.
                let trickle = try RawConnection(port: port)
                trickle.send(
                    "POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(deviceKey)\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
                for _ in 0..<40 {
                    if !trickle.send(" ") || trickle.checkClosed() { break }
                    Thread.sleep(forTimeInterval: 0.2)
                }
                let bodyAnswer = String(decoding: trickle.drained + trickle.readUntilClosed(timeout: .seconds(5)).bytes, as: UTF8.self)

                // An idle keep-alive connection after one answered request is closed after idle_timeout, without an answer.
                let idle = try RawConnection(port: port)
                idle.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                _ = idle.readResponse(timeout: .seconds(5))
                let idleResult = idle.readUntilClosed(timeout: .seconds(5))
                return (headerAnswer, headerSeconds, bodyAnswer, idleResult.closed && idleResult.bytes.isEmpty)
            }
            #expect(headerAnswer.hasPrefix("HTTP/1.1 408"), "\(headerAnswer)")
            #expect(headerAnswer.contains("\"request_timeout\""))
            #expect(headerSeconds >= 0.9 && headerSeconds < 6, "closed after \(headerSeconds) s")
            #expect(bodyAnswer.hasPrefix("HTTP/1.1 408"), "\(bodyAnswer)")
            #expect(bodyAnswer.contains("\"request_timeout\""))
            #expect(idleClosed)
        }
    }

    @Test("each timeout runs from its own phase: a connection busier than idle_timeout stays open, a late head still gets 408")
    func timeoutsFollowEachRequest() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await app(fixture, server: Self.oneSecondTimeouts).test(.live) { client in
            let port = try #require(client.port)
            let (statuses, headerSeconds, headerAnswer, idleSeconds, idleClosed) = try await runOffPool(name: "raw-http") {
                let connection = try RawConnection(port: port)
                // Eight requests 300 ms apart: 2.4 s on one connection, never 1 s without one.
                var statuses: [Int] = []
                for _ in 0..<8 {
                    connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    statuses.append(connection.readResponse(timeout: .seconds(5))?.status ?? 0)
                    Thread.sleep(forTimeInterval: 0.3)
                }
                // Then half a head: 408 one header_timeout after it began, not after the connection opened.
                let start = ContinuousClock.now
                connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n")
                let answer = connection.readUntilClosed(timeout: .seconds(5))
                let headerSeconds = start.duration(to: .now) / .seconds(1)

                // A second connection, idle after its answer, is closed one idle_timeout later.
                let idle = try RawConnection(port: port)
                idle.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                _ = idle.readResponse(timeout: .seconds(5))
                let idleStart = ContinuousClock.now
                let idleResult = idle.readUntilClosed(timeout: .seconds(5))
                return (
                    statuses, headerSeconds, String(decoding: answer.bytes, as: UTF8.self), idleStart.duration(to: .now) / .seconds(1),
                    idleResult.closed && idleResult.bytes.isEmpty
                )
            }
            #expect(statuses == Array(repeating: 200, count: 8))
            #expect(headerAnswer.hasPrefix("HTTP/1.1 408"), "\(headerAnswer)")
            #expect(headerSeconds >= 0.9 && headerSeconds < 1.8, "answered 408 after \(headerSeconds) s")
            #expect(idleClosed)
            #expect(idleSeconds >= 0.9 && idleSeconds < 1.8, "closed after \(idleSeconds) s idle")
        }
    }
}
