import FarmgateSupport
import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import Prometheus
import Testing

@testable import FarmgateIngest

/// `[server] trusted_proxies`: behind nginx the per-address limit of failed authentications counts the client nginx
/// names in `X-Forwarded-For`, never nginx itself; from any other peer the header is ignored.
@Suite("Client addresses behind a trusted proxy")
struct TrustedProxyTests {
    func app(_ fixture: Fixture, trusted: [String]) -> some ApplicationProtocol {
        var configuration = IngestConfiguration()
        configuration.server.port = 0
        configuration.server.trustedProxies = trusted
        configuration.limits.authFailureBurst = 2
        configuration.limits.authFailuresPerSecond = 0.01
        return buildApplication(configuration: configuration, store: fixture.store, registry: PrometheusCollectorRegistry(), logger: testLogger)
    }

    /// A read with an unknown token from `forwardedFor`; returns the status.
    func badRead(_ client: some TestClientProtocol, from forwardedFor: String) async throws -> HTTPResponse.Status {
        let token = APIKey(kind: .readToken, keyID: "zzzzzzzz", secret: String(repeating: "0", count: 64))
        var headers = bearer(token)
        headers[HTTPField.Name("X-Forwarded-For") ?? .via] = forwardedFor
        return try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: headers).status
    }

    @Test("from a trusted proxy each forwarded client has its own failure budget")
    func trustedProxyCountsEachClient() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await app(fixture, trusted: ["127.0.0.1", "::1"]).test(.live) { client in
            // The live client connects from 127.0.0.1: the trusted proxy.
            for _ in 0..<2 { #expect(try await badRead(client, from: "203.0.113.7") == .unauthorized) }
            #expect(try await badRead(client, from: "203.0.113.7") == .tooManyRequests)
            // Another client behind the same proxy is not affected, nor is the last address of a longer header.
            #expect(try await badRead(client, from: "198.51.100.9") == .unauthorized)
            #expect(try await badRead(client, from: "203.0.113.7, 198.51.100.10") == .unauthorized)
            // A client of the same /64 shares its budget, like direct IPv6 clients do.
            for _ in 0..<2 { _ = try await badRead(client, from: "2001:db8::1") }
            #expect(try await badRead(client, from: "2001:db8::2") == .tooManyRequests)
            // The valid token from yet another client still reads.
            var headers = bearer(fixture.readToken)
            headers[HTTPField.Name("X-Forwarded-For") ?? .via] = "192.0.2.44"
            #expect(try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: headers).status == .ok)
        }
    }

    @Test("from a peer that is not trusted the header is ignored: every request counts against the peer")
    func untrustedPeerIsTheClient() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await app(fixture, trusted: ["192.0.2.1"]).test(.live) { client in
            var statuses: [HTTPResponse.Status] = []
            for from in ["203.0.113.7", "203.0.113.7", "198.51.100.9"] { statuses.append(try await badRead(client, from: from)) }
            #expect(statuses == [.unauthorized, .unauthorized, .tooManyRequests])
        }
    }

    @Test("the client a request counts against", arguments: [
        ("127.0.0.1", "203.0.113.7", "203.0.113.7"), ("127.0.0.1", "10.0.0.1, 203.0.113.7", "203.0.113.7"),
        ("127.0.0.1", "not-an-address", "127.0.0.1"), ("127.0.0.1", "", "127.0.0.1"), ("127.0.0.2", "203.0.113.7", "127.0.0.2"),
        ("127.0.0.1", "[2001:db8:1:2::5]:4711", "2001:db8:1:2::/64"), ("127.0.0.1", "::ffff:203.0.113.9", "203.0.113.9"),
        // With a port, or quoted (before the fix, a tester 2026-12-05: both counted against the proxy itself).
        ("127.0.0.1", "10.0.0.1, 203.0.113.7:51234", "203.0.113.7"), ("127.0.0.1", "\"203.0.113.8\"", "203.0.113.8"),
        ("127.0.0.1", "\"[2001:db8:1:3::5]:80\"", "2001:db8:1:3::/64"), ("127.0.0.1", "203.0.113.7:99999", "127.0.0.1"),
        ("127.0.0.1", "2001:db8:1:4::5", "2001:db8:1:4::/64"),
    ])
    func forwardedClient(peer: String, header: String, expected: String) throws {
        let proxies = try TrustedProxies(["127.0.0.1", "::1"])
        let address = try SocketAddress(ipAddress: peer, port: 40000)
        #expect(proxies.client(peer: address, forwardedFor: header).description == expected)
        #expect(try TrustedProxies(["::1"]).trusts(try SocketAddress(ipAddress: "::1", port: 1)))
    }

    @Test("trusted_proxies is parsed, and an entry that is not an address is refused with its location")
    func configuration() throws {
        let parsed = try IngestConfiguration.parse("[server]\ntrusted_proxies = [\"127.0.0.1\", \"::1\"]\n", file: "ingest.toml", baseDirectory: "/tmp")
        #expect(parsed.server.trustedProxies == ["127.0.0.1", "::1"])
        #expect(IngestConfiguration().server.trustedProxies.isEmpty)
        do {
            _ = try IngestConfiguration.parse("[server]\ntrusted_proxies = [\"nginx.local\"]\n", file: "ingest.toml", baseDirectory: "/tmp")
            Issue.record("a host name was accepted")
        } catch {
            let message = String(describing: error)
            #expect(message.contains("ingest.toml:2"))
            #expect(message.contains("trusted_proxies"))
            #expect(message.contains("not an IP address"))
        }
    }
}
