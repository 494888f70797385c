import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Prometheus
import Testing

@testable import FarmgateIngest

/// Request heads HTTP/1.1 (RFC 9112) says a server must not serve as they are, methods and versions the ingest does not
/// implement (RFC 9110), and the paths, path segments and query names the router would otherwise take for others: each
/// through the real server on a raw connection.
@Suite("HTTP: request heads and paths")
struct RequestHeadTests {
    /// Sends `request` on a new connection and reads until the server closes it (at most 5 s).
    func exchange(port: Int, _ request: String) async throws -> (answer: (status: Int, head: String, body: [UInt8])?, closed: Bool) {
        try await runOffPool(name: "raw-http") { () throws -> ((status: Int, head: String, body: [UInt8])?, Bool) in
            let connection = try RawConnection(port: port)
            _ = connection.send(request)
            let answer = connection.readResponse(timeout: .seconds(5))
            return (answer, connection.readUntilClosed(timeout: .seconds(5)).closed)
        }
    }

    @Test(
        "a head RFC 9110 or 9112 refuses is answered with a JSON error of its own length, and the connection closed",
        arguments: [
            ("GET /healthz HTTP/1.1\r\n\r\n", 400, "bad_request", "needs a Host header"),
            ("GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request", "2 Host headers"),
            ("GET /healthz HTTP/1.1\r\nHost: a b/c\r\n\r\n", 400, "bad_request", "is not a host"),
            ("GET /healthz HTTP/1.1\r\nHost: a:b\r\n\r\n", 400, "bad_request", "is not a host"),
            ("GET /healthz HTTP/1.1\r\nHost: a:1:2\r\n\r\n", 400, "bad_request", "is not a host"),
            ("GET /healthz HTTP/1.1\r\nHost: [::1\r\n\r\n", 400, "bad_request", "is not a host"),
            ("GET /healthz HTTP/1.1\r\nHost: [zz]\r\n\r\n", 400, "bad_request", "is not a host"),
            ("GET /healthz HTTP/1.1\r\nHost: [::1]x\r\n\r\n", 400, "bad_request", "is not a host"),
            ("GET /healthz HTTP/1.1\r\nHost: :80\r\n\r\n", 400, "bad_request", "is not a host"),
            ("GET /healthz HTTP/1.1\r\nHost: a:123456\r\n\r\n", 400, "bad_request", "is not a host"),
            ("POST /v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\nContent-Length: 2\r\n\r\n{}", 400, "bad_request", "Transfer-Encoding is empty"),
            ("GET /healthz HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400, "bad_request", "2 Host headers"),
            (
                "POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                501, "unsupported_transfer_encoding", "Content-Encoding"
            ),
            ("POST /v1/batches HTTP/1.0\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400, "bad_request", "HTTP/1.0"),
            // Methods the parser does not know (RFC 9110 §9.1: 501), the lowercase one a method of its own.
            ("FOO /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 501, "method_not_implemented", "GET, HEAD, POST, PUT and DELETE"),
            ("GETX /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 501, "method_not_implemented", "does not implement the request's method"),
            ("get /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 501, "method_not_implemented", "case-sensitive"),
            // Another major version than 1 (RFC 9110 §15.6.6: 505), HTTP/0.9's request without a version included.
            ("GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported", "send HTTP/1.1"),
            ("GET /healthz HTTP/3.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported", "send HTTP/1.1"),
            ("GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505, "http_version_not_supported", "send HTTP/1.1"),
            ("GET /healthz\r\n\r\n", 505, "http_version_not_supported", "send HTTP/1.1"),
            // Any other parse error stays 400, bytes that do not begin with a token and a space (no method at all) included.
            ("GET /healthz HTTP/1.1\r\nHost x\r\n\r\n", 400, "bad_request", "not valid HTTP/1.1"),
            ("GET\t/healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", "not valid HTTP/1.1"),
            ("\u{16}\u{03}\u{01}\u{02}\u{00}\u{01}\u{00}", 400, "bad_request", "not valid HTTP/1.1"),
        ])
    func refused(request: String, status: Int, code: String, says: String) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.live) { client in
            let (answer, closed) = try await exchange(port: try #require(client.port), request)
            let response = try #require(answer, "no answer to \(request.debugDescription)")
            #expect(response.status == status, "\(response.head)")
            let body = try JSONDecoder().decode(APIErrorBody.self, from: Data(response.body))
            #expect(body.error.code == code)
            #expect(body.error.message.contains(says), "\(body.error.message)")
            #expect(response.head.lowercased().contains("content-length: \(response.body.count)"), "\(response.head)")
            #expect(closed, "the connection stayed open after refusing \(request.debugDescription)")
        }
    }

    @Test("CONNECT is 405 and the connection closed, not taken for a tunnel (NIO's encoder sends no body in any answer to CONNECT)")
    func connect() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.live) { client in
            let (answer, closed) = try await exchange(port: try #require(client.port), "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            let response = try #require(answer)
            #expect(response.status == 405, "\(response.head)")
            #expect(response.head.lowercased().contains("connection: close"), "\(response.head)")
            #expect(closed)
        }
    }

    @Test("what HTTP allows is served: HTTP/1.0 without Host, an empty Host, a bracketed address with a port, one trailing slash")
    func served() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.live) { client in
            let port = try #require(client.port)
            for request in [
                "GET /healthz HTTP/1.0\r\n\r\n", "GET /healthz HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
                "GET /healthz HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n", "GET /healthz/ HTTP/1.1\r\nhost: x\r\nConnection: close\r\n\r\n",
                "GET /healthz HTTP/1.1\r\nHost: a  \r\nConnection: close\r\n\r\n", "GET /healthz HTTP/1.1\r\nHost: a\t\r\nConnection: close\r\n\r\n",
                "GET /healthz HTTP/1.1\r\nHost: 192.0.2.1:8080\r\nConnection: close\r\n\r\n", "GET /healthz HTTP/1.1\r\nHost: ingest.example.com\r\nConnection: close\r\n\r\n",
                "GET /healthz HTTP/1.1\r\nHost: [2001:db8::1]\r\nConnection: close\r\n\r\n",
            ] {
                let (answer, _) = try await exchange(port: port, request)
                #expect(answer?.status == 200, "\(request.debugDescription): \(answer?.head ?? "no answer")")
            }
        }
    }

    @Test("a path with an empty segment is 404, not the path without it")
    func emptySegments() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            for path in ["//healthz", "/v1//device", "/healthz//", "/v1/farms/f1//latest"] {
                let message = try expectError(try await client.execute(uri: path, method: .get), .notFound, "not_found")
                #expect(message.contains("empty segment"), "\(path): \(message)")
            }
            #expect(try await client.execute(uri: "/healthz", method: .get).status == .ok)
        }
    }

    @Test("path segments are percent-decoded: an escaped farm, device and sensor name the same ones as written plainly")
    func percentEncodedSegments() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        _ = try await fixture.store.store(try phBatch(device: "d1", sequences: 1...3), for: try await fixture.identity(device: "d1"), receivedAt: testNow)
        try await fixture.app().test(.router) { client in
            let plain = try await client.execute(uri: "/v1/farms/f1/latest?device=d1", method: .get, headers: bearer(fixture.readToken))
            #expect(plain.status == .ok)
            let escaped = try await client.execute(uri: "/v1/farms/%66%31/latest?device=d1", method: .get, headers: bearer(fixture.readToken))
            #expect(escaped.status == .ok)
            #expect(escaped.body == plain.body)
            let range = "from=2026-01-01T00:00:00Z&to=2030-01-01T00:00:00Z"
            let plainRange = try await client.execute(
                uri: "/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?\(range)", method: .get, headers: bearer(fixture.readToken))
            let escapedRange = try await client.execute(
                uri: "/v1/farms/f1/devices/%64%31/sensors/tank1%2Eph/readings?\(range)", method: .get, headers: bearer(fixture.readToken))
            #expect(plainRange.status == .ok && escapedRange.status == .ok)
            #expect(escapedRange.body == plainRange.body)
            // Not an escape: the farm is another one, as before.
            try expectError(
                try await client.execute(uri: "/v1/farms/f%zz/latest", method: .get, headers: bearer(fixture.readToken)), .forbidden, "forbidden")
        }
    }

    /// Sends `request` with `Connection: close` on a new connection and reads its answer.
    func answer(port: Int, _ request: String) async throws -> (status: Int, head: String, body: [UInt8]) {
        let (answer, _) = try await exchange(port: port, request.replacingOccurrences(of: "\r\n\r\n", with: "\r\nConnection: close\r\n\r\n"))
        return try #require(answer, "no answer to \(request.debugDescription)")
    }

    @Test("a registered method the ingest does not know is 501 on any path, and the connection stays open; a known one a path does not take stays 405")
    func unknownMethods() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.live) { client in
            let port = try #require(client.port)
            for request in ["PROPFIND /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "QUERY /v1/batches HTTP/1.1\r\nHost: x\r\n\r\n", "PURGE /nosuch HTTP/1.1\r\nHost: x\r\n\r\n"] {
                let (first, second) = try await runOffPool(name: "raw-http") { () throws -> ((status: Int, head: String, body: [UInt8])?, (status: Int, head: String, body: [UInt8])?) in
                    let connection = try RawConnection(port: port)
                    _ = connection.send(request)
                    let first = connection.readResponse(timeout: .seconds(5))
                    _ = connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return (first, connection.readResponse(timeout: .seconds(5)))
                }
                let response = try #require(first, "no answer to \(request.debugDescription)")
                #expect(response.status == 501, "\(request.debugDescription): \(response.head)")
                let body = try JSONDecoder().decode(APIErrorBody.self, from: Data(response.body))
                #expect(body.error.code == "method_not_implemented")
                #expect(body.error.message.contains("implements no method \"\(request.prefix { $0 != " " })\""), "\(body.error.message)")
                #expect(second?.status == 200, "the connection did not serve the next request after \(request.debugDescription)")
            }
            for method in ["OPTIONS", "TRACE", "PATCH"] {
                let response = try await answer(port: port, "\(method) /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(response.status == 405, "\(method): \(response.head)")
            }
        }
        // Over HTTP/2 any token reaches the router: the same answer.
        try await fixture.app().test(.router) { client in
            for name in ["FOO", "get"] {
                let method = try #require(HTTPRequest.Method(name))
                try expectError(try await client.execute(uri: "/healthz", method: method), .notImplemented, "method_not_implemented")
            }
        }
    }

    @Test("escaped unreserved characters in the path and query names are the characters (RFC 3986 §6.2.2.2); an escaped slash is no separator")
    func percentEncodedUnreserved() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.live) { client in
            let port = try #require(client.port)
            for path in ["/%68ealthz", "/%68%65%61%6c%74%68%7A", "/health%7a/"] {
                let response = try await answer(port: port, "GET \(path) HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(response.status == 200, "\(path): \(response.head)")
            }
            // The path is known once decoded: 405 naming its methods, not 404.
            let post = try await answer(port: port, "POST /%68ealthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            #expect(post.status == 405, "\(post.head)")
            // A query name is decoded: the unknown parameter is named as the router reads it.
            let query = try await answer(port: port, "GET /healthz?%76erbose=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(query.status == 400)
            #expect(String(decoding: query.body, as: UTF8.self).contains("unknown parameter 'verbose'"), "\(String(decoding: query.body, as: UTF8.self))")
            // Not decoded: an escaped slash stays inside its segment, a `%` that starts no escape leaves the target as written.
            for path in ["/v1%2Fdevice", "/v1%2fdevice", "/healthz%2F", "/%%36%38ealthz", "/%68ealthz%"] {
                let response = try await answer(port: port, "GET \(path) HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(response.status == 404, "\(path): \(response.head)")
            }
        }
    }

    @Test("a latest read with escaped unreserved characters is the plain read, on the event loop as through the router; %25 is still decoded once")
    func percentEncodedLatest() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        _ = try await fixture.store.store(try phBatch(device: "d1", sequences: 1...3), for: try await fixture.identity(device: "d1"), receivedAt: testNow)
        let registry = PrometheusCollectorRegistry()
        let token = "Authorization: Bearer \(fixture.readToken.text)\r\n"
        try await fixture.app(registry: registry, cacheTTL: .seconds(60)).test(.live) { client in
            let port = try #require(client.port)
            let paths = ["/v1/farms/f1/latest?device=d1", "/v1/farms/%66%31/latest?device=d1", "/v1/farms/f1/lat%65st?%64evice=d1", "/v%31/farms/f1/latest?device=%64%31"]
            let answers = try await runOffPool(name: "raw-http") { () throws -> [(status: Int, head: String, body: [UInt8])] in
                let connection = try RawConnection(port: port)
                var answers: [(status: Int, head: String, body: [UInt8])] = []
                for path in paths {
                    _ = connection.send("GET \(path) HTTP/1.1\r\nHost: x\r\n\(token)\r\n")
                    answers += connection.readResponses(1, timeout: .seconds(5))
                }
                return answers
            }
            try #require(answers.count == paths.count)
            #expect(answers.map(\.status) == [200, 200, 200, 200], "\(answers.map(\.head))")
            #expect(String(decoding: answers[0].body, as: UTF8.self).contains("\"d1\""))
            #expect(answers.allSatisfy { $0.body == answers[0].body })
            // The first read filled the cache through the router; the escaped ones were answered on the event loop.
            let metrics = String(decoding: registry.emitToBuffer(), as: UTF8.self)
            let onEventLoop = metrics.split(separator: "\n").first { $0.hasPrefix("farmgate_ingest_latest_event_loop_answers_total ") }
            #expect(onEventLoop.flatMap { $0.split(separator: " ").last }.flatMap { Double($0) } == 3, "\(metrics)")
            // `%2564` is an escaped `%` and `64`: the device `%641`, not d1, in the path as in the query.
            for path in ["/v1/farms/f1/devices/%2564%31/sensors/tank1.ph/readings?from=2026-01-01T00:00:00Z&to=2030-01-01T00:00:00Z", "/v1/farms/f1/latest?device=%2564%31"] {
                let response = try await answer(port: port, "GET \(path) HTTP/1.1\r\nHost: x\r\n\(token)\r\n")
                #expect(response.status == 400, "\(path): \(response.head)")
                #expect(String(decoding: response.body, as: UTF8.self).contains("%641"), "\(path): \(String(decoding: response.body, as: UTF8.self))")
            }
        }
    }

    @Test("over HTTP/2 too, escaped unreserved characters in the path and query names are the characters")
    func percentEncodedOverHTTP2() async throws {
        let tls = IngestTLSTests()
        try await tls.withTLSIngest { base, _, certificates, _ in
            let http2 = try tls.client(certificates)
            defer { http2.close() }
            let health = try await http2.get(base + "/%68ealthz", headers: [])
            #expect(health.httpVersion == .http2)
            #expect(health.status == 200)
            let query = try await http2.get(base + "/healthz?%76erbose=1", headers: [])
            #expect(query.status == 400)
            #expect(String(decoding: query.body, as: UTF8.self).contains("unknown parameter 'verbose'"), "\(String(decoding: query.body, as: UTF8.self))")
        }
    }
}
