import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import FarmgateSupport
import FarmgateTestSupport
import Testing

@testable import FarmgateIngest

/// A known path asked with a method it does not take is 405 with `Allow`, not 404 "no such resource"; HEAD probes work.
@Suite("HTTP: methods of known paths")
struct RouteMethodsTests {
    @Test("wrong methods on known paths are 405 naming the ones they take; unknown paths stay 404; HEAD /healthz and /readyz answer")
    func methodNotAllowed() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            for (method, path, allow) in [
                (HTTPRequest.Method.get, "/v1/batches", "POST"), (.put, "/v1/batches", "POST"), (.post, "/v1/device", "GET, HEAD"),
                (.get, "/v1/enroll", "POST"), (.post, "/healthz", "GET, HEAD"), (.delete, "/v1/farms/f1/latest", "GET, HEAD"),
                (.patch, "/v1/farms/f1/alert-rules/r", "GET, HEAD, PUT, DELETE"), (.get, "/v1/farms/f1/silences/3", "DELETE"),
                // One trailing slash, as the router takes it (`POST /v1/batches/` is an upload).
                (.get, "/v1/batches/", "POST"), (.post, "/v1/farms/f1/latest/", "GET, HEAD"),
            ] {
                let response = try await client.execute(uri: path, method: method)
                let message = try expectError(response, .methodNotAllowed, "method_not_allowed")
                #expect(response.headers[.allow] == allow, "\(method) \(path)")
                #expect(message.contains("takes \(allow), not \(method.rawValue)"), "\(message)")
            }
            for path in ["/v1/batch", "/v1/farms/f1/latest/x", "/v1/batches//", "//v1/batches"] {
                try expectError(try await client.execute(uri: path, method: .get), .notFound, "not_found")
            }
            #expect(try await client.execute(uri: "/healthz", method: .head).status == .ok)
            #expect(try await client.execute(uri: "/readyz", method: .head).status == .ok)
        }
    }

    @Test("HEAD on any GET route answers GET's status and Content-Length, errors included, and sends no body")
    func headLikeGet() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        _ = try await fixture.store.store(try phBatch(device: "d1", sequences: 1...3), for: try await fixture.identity(device: "d1"), receivedAt: testNow)
        let token = "Authorization: Bearer \(fixture.readToken.text)\r\n"
        try await fixture.app(cacheTTL: .seconds(60)).test(.live) { client in
            let port = try #require(client.port)
            for (path, auth, status) in [
                ("/healthz", "", 200), ("/readyz", "", 200), ("/v1/farms/f1/latest?device=d1", token, 200),
                ("/v1/farms/f1/devices/d1/sensors/tank1.ph/readings?from=2026-01-01T00:00:00Z&to=2030-01-01T00:00:00Z", token, 200),
                ("/v1/farms/f1/latest", "", 401), ("/v1/farms/f1/latest?nosuch=1", token, 400), ("/v1/farms/f1/latest/x", token, 404),
            ] {
                let (get, head) = try await runOffPool(name: "raw-http") { () throws -> ((status: Int, head: String, body: [UInt8])?, [UInt8]) in
                    let connection = try RawConnection(port: port)
                    _ = connection.send("GET \(path) HTTP/1.1\r\nHost: x\r\n\(auth)\r\n")
                    let get = connection.readResponse(timeout: .seconds(5))
                    _ = connection.send("HEAD \(path) HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\(auth)\r\n")
                    return (get, connection.readUntilClosed(timeout: .seconds(5)).bytes)
                }
                let answer = try #require(get, "GET \(path)")
                #expect(answer.status == status, "GET \(path): \(answer.head)")
                #expect(!answer.body.isEmpty, "GET \(path)")
                let text = String(decoding: head, as: UTF8.self)
                let parts = text.components(separatedBy: "\r\n\r\n")
                #expect(parts.count == 2 && parts[1].isEmpty, "HEAD \(path) sent a body: \(text)")
                #expect(parts[0].hasPrefix("HTTP/1.1 \(status) "), "HEAD \(path): \(parts[0])")
                #expect(parts[0].lowercased().contains("content-length: \(answer.body.count)\r\n") || parts[0].lowercased().hasSuffix("content-length: \(answer.body.count)"),
                    "HEAD \(path): \(parts[0]) (GET's body has \(answer.body.count) bytes)")
            }
        }
    }

    @Test("every method the table lists reaches a route (never 404 or 405)")
    func tableMatchesTheRouter() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            for route in RouteMethods.table {
                // Unauthenticated: a 401 (or 400) means the route matched, since group middleware runs only then.
                let path = "/" + route.pattern.map { $0 == "*" ? "x" : String($0) }.joined(separator: "/")
                    .replacingOccurrences(of: "farms/x", with: "farms/f1")
                for method in route.methods {
                    let status = try await client.execute(uri: path, method: method).status
                    #expect(status != .notFound && status != .methodNotAllowed, "\(method) \(path): \(status)")
                }
            }
        }
    }
}
