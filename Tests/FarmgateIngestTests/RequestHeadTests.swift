import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Testing

@testable import FarmgateIngest

/// Request heads HTTP/1.1 (RFC 9112) says a server must not serve as they are, and the paths and path segments the
/// router would otherwise take for others: each through the real server on a raw connection.
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
        "a head RFC 9112 refuses is answered with a JSON error of its own length, and the connection closed",
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
}
