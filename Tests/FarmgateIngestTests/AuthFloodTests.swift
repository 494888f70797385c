import FarmgateSupport
import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import Testing

@testable import FarmgateIngest

/// A wrong device key whose id the store does not know.
func unknownDeviceKey(_ index: Int = 0) -> APIKey {
    var generator = SeededGenerator(seed: UInt64(index) &+ 0x9E37_79B9)
    return APIKey.generate(kind: .device, using: &generator)
}

struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Checks that `headers` carry both forms of the rate-limit headers for `policy`, and `Retry-After` when `limited`.
func expectRateLimitHeaders(
    _ headers: HTTPFields, policy: String, limit: Int, limited: Bool, sourceLocation: SourceLocation = #_sourceLocation
) {
    let name = { (text: String) in HTTPField.Name(text)! }
    #expect(headers[name("RateLimit-Policy")]?.hasPrefix("\"\(policy)\";q=\(limit);w=") == true, sourceLocation: sourceLocation)
    #expect(headers[name("RateLimit")]?.hasPrefix("\"\(policy)\";r=") == true, sourceLocation: sourceLocation)
    #expect(headers[name("RateLimit-Limit")] == String(limit), sourceLocation: sourceLocation)
    #expect(headers[name("RateLimit-Remaining")].flatMap { Int($0) } != nil, sourceLocation: sourceLocation)
    #expect(headers[name("RateLimit-Reset")].flatMap { Int($0) } != nil, sourceLocation: sourceLocation)
    if limited {
        #expect(headers[name("RateLimit-Remaining")] == "0", sourceLocation: sourceLocation)
        #expect((headers[.retryAfter].flatMap { Int($0) } ?? 0) >= 1, sourceLocation: sourceLocation)
    }
}

@Suite("Unauthenticated floods and rate-limit headers")
struct AuthFloodTests {
    @Test("past the failed-authentication burst an address is answered 429 before the store is asked")
    func failedAuthenticationsLimitedBeforeStore() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var limits = IngestConfiguration.Limits()
        limits.authFailureBurst = 3
        limits.authFailuresPerSecond = 0.01
        let body = buffer(BatchJSON.encode(try phBatch(sequences: 1...1)))
        try await fixture.app(limits: limits).test(.router) { client in
            for index in 0..<3 {
                let response = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(unknownDeviceKey(index)), body: body)
                try expectError(response, .unauthorized, "unauthorized")
            }
            // From here on the store is gone: a request that reached it would be answered 503 store_unavailable.
            fixture.store.close()
            for index in 3..<50 {
                let upload = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(unknownDeviceKey(index)), body: body)
                try expectError(upload, .tooManyRequests, "rate_limited")
                expectRateLimitHeaders(upload.headers, policy: "auth_failures", limit: 3, limited: true)
            }
            // Reads from the same address are refused the same way, and a valid key too: it cannot be told apart
            // without asking the store.
            let read = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.readToken))
            try expectError(read, .tooManyRequests, "rate_limited")
            expectRateLimitHeaders(read.headers, policy: "auth_failures", limit: 3, limited: true)
        }
    }

    /// A tester (2026-12-06): many LTE sites share one public address through their carrier's NAT, and one client's
    /// wrong keys there held every site's uploads with 429 for as long as it kept going.
    @Test("an address over its failure limit is still served for a key that authenticated lately; a key not seen yet is refused without the store")
    func provenKeysPassTheLimit() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var limits = IngestConfiguration.Limits()
        limits.authFailureBurst = 3
        limits.authFailuresPerSecond = 0.01
        limits.readBurst = 1000
        try await fixture.app(limits: limits).test(.router) { client in
            // The site uploads once: its key is proven.
            let first = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey),
                body: buffer(BatchJSON.encode(try phBatch(sequences: 1...1))))
            #expect(first.status == .ok)
            // Another client behind the same address floods wrong keys past the burst.
            for index in 0..<10 {
                let response = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(unknownDeviceKey(index)), body: buffer(BatchJSON.encode(try phBatch(sequences: 1...1))))
                #expect(response.status == (index < 3 ? .unauthorized : .tooManyRequests))
            }
            // The site's next upload goes through.
            let next = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey),
                body: buffer(BatchJSON.encode(try phBatch(sequences: 2...2))))
            #expect(next.status == .ok)
            // The proven key's id with another secret is not proven: refused before the store.
            let forged = APIKey(kind: .device, keyID: fixture.deviceKey.keyID, secret: String(repeating: "0", count: 64))
            let refused = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(forged), body: buffer(BatchJSON.encode(try phBatch(sequences: 3...3))))
            try expectError(refused, .tooManyRequests, "rate_limited")
            // A valid read token this ingest has not seen authenticate is refused as before; the store is not asked.
            fixture.store.close()
            let read = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.readToken))
            try expectError(read, .tooManyRequests, "rate_limited")
        }
    }

    @Test("successful authentications never count against the address")
    func successesDoNotCount() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var limits = IngestConfiguration.Limits()
        limits.authFailureBurst = 2
        limits.readBurst = 1000
        try await fixture.app(limits: limits).test(.router) { client in
            for _ in 0..<20 {
                let response = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.readToken))
                #expect(response.status == .ok)
            }
        }
    }

    @Test("an unknown key id is answered from memory while the negative cache holds it")
    func negativeCache() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let authenticator = Authenticator(store: fixture.store, cacheTTL: .seconds(60), negativeCacheTTL: .seconds(60))
        let unknown = unknownDeviceKey()
        #expect(try await authenticator.authenticateDevice(unknown) == .invalid)
        let unknownReader = APIKey(kind: .readToken, keyID: "zzzzzzzz", secret: String(repeating: "0", count: 64))
        #expect(try await authenticator.authenticateReader(unknownReader) == .invalid)
        fixture.store.close()
        // The store is closed: only the cache can answer these.
        #expect(try await authenticator.authenticateDevice(unknown) == .invalid)
        #expect(try await authenticator.authenticateReader(unknownReader) == .invalid)
        await #expect(throws: (any Error).self) { try await authenticator.authenticateDevice(unknownDeviceKey(1)) }
    }

    @Test("the negative cache expires, so a device created after a failed attempt works")
    func negativeCacheExpires() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let authenticator = Authenticator(store: fixture.store, cacheTTL: .seconds(60), negativeCacheTTL: .seconds(1))
        let key = unknownDeviceKey(7)
        let failed = ContinuousClock.now
        #expect(try await authenticator.authenticateDevice(key) == .invalid)
        _ = try await fixture.store.createDevice(farm: "f1", device: try deviceID("late"), keyID: key.keyID, secretHash: key.secretHash, createdAt: testNow)
        let stillRemembered = try await authenticator.authenticateDevice(key)
        // Still answered from the negative cache within its TTL (when this machine was fast enough to ask within it).
        if failed.duration(to: .now) < .milliseconds(900) { #expect(stillRemembered == .invalid) }
        try await Task.sleep(for: .milliseconds(1_100))
        guard case .authenticated(let identity) = try await authenticator.authenticateDevice(key) else {
            Issue.record("the device must work once the negative entry has expired")
            return
        }
        #expect(identity.device.rawValue == "late")
    }

    @Test("a flood of random key ids cannot grow the negative cache or the per-address table past their bounds")
    func bounded() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let authenticator = Authenticator(store: fixture.store, cacheTTL: .seconds(60), negativeCacheTTL: .seconds(60), maxEntries: 100)
        for index in 0..<1_000 {
            _ = try await authenticator.authenticateDevice(unknownDeviceKey(index))
            #expect(authenticator.unknownCount <= 100)
        }
        let limiter = KeyedRateLimiter<ClientAddress>(rate: 1, burst: 2, maxKeys: 100)
        let now = ContinuousClock.now
        for address in 0..<10_000 {
            _ = limiter.acquire(.v4(UInt32(address)), now: now)
        }
        #expect(limiter.count <= 100)
        // The addresses past the bound share one bucket: together they get its burst, then are limited.
        #expect(limiter.acquire(.v4(99_999), now: now).isLimited)
    }

    @Test("client addresses: IPv4 as is, IPv6 by its /64, IPv4-mapped IPv6 as IPv4")
    func clientAddresses() throws {
        #expect(ClientAddress(try SocketAddress(ipAddress: "192.0.2.7", port: 1)) == .v4(0xC000_0207))
        #expect(ClientAddress(try SocketAddress(ipAddress: "::ffff:192.0.2.7", port: 1)) == .v4(0xC000_0207))
        let a = ClientAddress(try SocketAddress(ipAddress: "2001:db8:1:2:aaaa::1", port: 1))
        let b = ClientAddress(try SocketAddress(ipAddress: "2001:db8:1:2:ffff:ffff:ffff:ffff", port: 1))
        let c = ClientAddress(try SocketAddress(ipAddress: "2001:db8:1:3::1", port: 1))
        #expect(a == b)
        #expect(a != c)
        #expect(a.description == "2001:db8:1:2::/64")
        #expect(ClientAddress(nil) == .unknown)
    }

    @Test("a read token past its limit gets 429 with Retry-After and the RateLimit headers; answers before carry them too")
    func readLimit() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var limits = IngestConfiguration.Limits()
        limits.readBurst = 3
        // One token every 200 s: no refill can happen while the test runs, however loaded the machine.
        limits.readRequestsPerSecond = 0.005
        try await fixture.app(limits: limits).test(.router) { client in
            for _ in 0..<3 {
                let response = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.readToken))
                #expect(response.status == .ok)
                expectRateLimitHeaders(response.headers, policy: "read", limit: 3, limited: false)
            }
            let limited = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.readToken))
            try expectError(limited, .tooManyRequests, "rate_limited")
            expectRateLimitHeaders(limited.headers, policy: "read", limit: 3, limited: true)
            // One token comes back every 200 s; the three answers before took some of that (more on a loaded machine).
            let retryAfter = Int(limited.headers[.retryAfter] ?? "") ?? 0
            #expect((150...200).contains(retryAfter), "Retry-After \(retryAfter) s is not the rest of the 200 s refill")
            // Another farm's token has its own bucket.
            let other = try await client.execute(uri: "/v1/farms/f2/latest", method: .get, headers: bearer(fixture.otherFarmReadToken))
            #expect(other.status == .ok)
        }
    }

    @Test("a device past its upload limit gets 429 with Retry-After and the RateLimit headers")
    func writeLimitHeaders() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var limits = IngestConfiguration.Limits()
        limits.burst = 1
        // One token every 1000 s: no refill can happen while the test runs, however loaded the machine.
        limits.requestsPerSecond = 0.001
        try await fixture.app(limits: limits).test(.router) { client in
            #expect(try await postJSON(client, try phBatch(sequences: 1...1), key: fixture.deviceKey).status == .ok)
            let limited = try await postJSON(client, try phBatch(sequences: 2...2), key: fixture.deviceKey)
            try expectError(limited, .tooManyRequests, "rate_limited")
            expectRateLimitHeaders(limited.headers, policy: "device", limit: 1, limited: true)
            // One token comes back every 1000 s; the first answer took some of that (more on a loaded CI machine).
            let retryAfter = Int(limited.headers[.retryAfter] ?? "") ?? 0
            #expect((900...1000).contains(retryAfter), "Retry-After \(retryAfter) s is not the rest of the 1000 s refill")
        }
    }

    @Test("the new [limits] and [server] keys parse, default as documented and are range-checked")
    func configuration() throws {
        let defaults = IngestConfiguration()
        #expect(defaults.limits.readRequestsPerSecond == 10 && defaults.limits.readBurst == 20)
        #expect(defaults.limits.authFailuresPerSecond == 1 && defaults.limits.authFailureBurst == 20)
        #expect(defaults.limits.unknownKeyCacheTTL == .seconds(2))
        #expect(defaults.server.idleTimeout == .seconds(75) && defaults.server.headerTimeout == .seconds(60))
        #expect(defaults.server.bodyTimeout == .seconds(60) && defaults.server.maxConnections == 4096)
        let parsed = try IngestConfiguration.parse(
            """
            [server]
            idle_timeout = "5s"
            header_timeout = "2s"
            body_timeout = "3s"
            max_connections = 100
            [limits]
            read_requests_per_second = 2.5
            read_burst = 7
            auth_failures_per_second = 0.5
            auth_failure_burst = 4
            unknown_key_cache_ttl = "0s"
            """, file: "ingest.toml", baseDirectory: "/tmp")
        #expect(parsed.server.idleTimeout == .seconds(5) && parsed.server.headerTimeout == .seconds(2))
        #expect(parsed.server.bodyTimeout == .seconds(3) && parsed.server.maxConnections == 100)
        #expect(parsed.limits.readRequestsPerSecond == 2.5 && parsed.limits.readBurst == 7)
        #expect(parsed.limits.authFailuresPerSecond == 0.5 && parsed.limits.authFailureBurst == 4)
        #expect(parsed.limits.unknownKeyCacheTTL == .zero)
        for (text, key) in [
            ("[server]\nheader_timeout = \"0s\"", "header_timeout"), ("[server]\nmax_connections = 0", "max_connections"),
            ("[limits]\nread_burst = 0", "read_burst"), ("[limits]\nauth_failure_burst = -1", "auth_failure_burst"),
        ] {
            do {
                _ = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/tmp")
                Issue.record("\(key) out of range was accepted")
            } catch {
                #expect(error.description.contains("ingest.toml:2"), "\(error)")
                #expect(error.description.contains(key), "\(error)")
            }
        }
    }
}
