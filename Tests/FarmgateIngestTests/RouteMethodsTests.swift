import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
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
                (HTTPRequest.Method.get, "/v1/batches", "POST"), (.put, "/v1/batches", "POST"), (.post, "/v1/device", "GET"),
                (.get, "/v1/enroll", "POST"), (.post, "/healthz", "GET, HEAD"), (.delete, "/v1/farms/f1/latest", "GET"),
                (.patch, "/v1/farms/f1/alert-rules/r", "GET, PUT, DELETE"), (.get, "/v1/farms/f1/silences/3", "DELETE"),
            ] {
                let response = try await client.execute(uri: path, method: method)
                let message = try expectError(response, .methodNotAllowed, "method_not_allowed")
                #expect(response.headers[.allow] == allow, "\(method) \(path)")
                #expect(message.contains("takes \(allow), not \(method.rawValue)"), "\(message)")
            }
            for path in ["/v1/batch", "/v1/farms/f1/latest/x", "/v1/batches/"] {
                try expectError(try await client.execute(uri: path, method: .get), .notFound, "not_found")
            }
            #expect(try await client.execute(uri: "/healthz", method: .head).status == .ok)
            #expect(try await client.execute(uri: "/readyz", method: .head).status == .ok)
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
