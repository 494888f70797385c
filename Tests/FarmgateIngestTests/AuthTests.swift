import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Testing

@testable import FarmgateIngest

@Suite("Authentication")
struct AuthTests {
    @Test("generated keys have the documented form and parse back")
    func keyFormat() throws {
        for kind in [APIKey.Kind.device, .readToken] {
            let key = APIKey.generate(kind: kind)
            #expect(key.text.hasPrefix(kind == .device ? "fgd_" : "fgr_"))
            #expect(key.keyID.count == 8)
            #expect(key.secret.count == 64)
            #expect(APIKey(parsing: key.text) == key)
        }
        #expect(APIKey.generate(kind: .device) != APIKey.generate(kind: .device))
    }

    @Test(
        "malformed keys do not parse",
        arguments: [
            "", "fgd_", "fgx_abcdefgh_" + String(repeating: "0", count: 64), "fgd_abcdefg_" + String(repeating: "0", count: 65),
            "fgd_ABCDEFGH_" + String(repeating: "0", count: 64), "fgd_abcdefgh_" + String(repeating: "g", count: 64),
            "fgd_abcdefgh-" + String(repeating: "0", count: 64), "fgd_abcdefgh_" + String(repeating: "0", count: 63),
        ])
    func malformedKeys(text: String) {
        #expect(APIKey(parsing: text) == nil)
    }

    @Test("constant-time comparison agrees with ==")
    func constantTime() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let length = Int.random(in: 0...40, using: &generator)
            let a = (0..<length).map { _ in UInt8.random(in: 0...3, using: &generator) }
            let b = Bool.random() ? a : (0..<Int.random(in: 0...40, using: &generator)).map { _ in UInt8.random(in: 0...3, using: &generator) }
            #expect(constantTimeEquals(a, b) == (a == b))
        }
        #expect(constantTimeEquals([UInt8](), [UInt8]()))
        #expect(!constantTimeEquals([1, 2, 3], [1, 2]))
        #expect(!constantTimeEquals([1, 2, 3], [1, 2, 4]))
        #expect(!constantTimeEquals([0, 2, 3], [1, 2, 3]))
    }

    @Test("HTTP's optional whitespace around a key is ignored, whitespace inside it is not")
    func trimmedKeys() {
        #expect("  \tfgd_abc \t ".trimmingSpaces == "fgd_abc")
        #expect("fgd_abc".trimmingSpaces == "fgd_abc")
        #expect(" \t ".trimmingSpaces == "")
        #expect("".trimmingSpaces == "")
        #expect(" a b ".trimmingSpaces == "a b")
        #expect("\nfgd\n".trimmingSpaces == "\nfgd\n")
        #expect(" ünï ".trimmingSpaces == "ünï")
    }

    @Test("a read token is accepted with the scheme in any case and whitespace around the token, and refused under another scheme")
    func bearerForms() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            for header in ["Bearer \(fixture.readToken.text)", "bearer \(fixture.readToken.text)", "BEARER   \(fixture.readToken.text) \t"] {
                let response = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: [.authorization: header])
                #expect(response.status == .ok, "\(header)")
            }
            for header in ["Bearers \(fixture.readToken.text)", "Bearer", "\(fixture.readToken.text)", "Bearer \(fixture.readToken.text)x"] {
                let response = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: [.authorization: header])
                try expectError(response, .unauthorized, "unauthorized")
            }
        }
    }

    @Test("uploads without a key, with a wrong key, or with a read token are answered 401")
    func uploadAuth() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let body = buffer(BatchJSON.encode(try phBatch(sequences: 1...1)))
        let wrongSecret = APIKey(kind: .device, keyID: fixture.deviceKey.keyID, secret: String(repeating: "0", count: 64))
        let unknownID = APIKey(kind: .device, keyID: "aaaaaaaa", secret: fixture.deviceKey.secret)
        try await fixture.app().test(.router) { client in
            let none = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: [.contentType: "application/json"], body: body)
            try expectError(none, .unauthorized, "unauthorized")
            #expect(none.headers[.wwwAuthenticate] == "Bearer")

            for headers: HTTPFields in [
                [.authorization: "Basic Zm9vOmJhcg==", .contentType: "application/json"],
                [.authorization: "Bearer nonsense", .contentType: "application/json"],
                jsonHeaders(wrongSecret), jsonHeaders(unknownID), jsonHeaders(fixture.readToken),
            ] {
                let response = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: body)
                try expectError(response, .unauthorized, "unauthorized")
            }
            // The right key works.
            #expect(try await postJSON(client, try phBatch(sequences: 1...1), key: fixture.deviceKey).status == .ok)
        }
    }

    @Test("a revoked device is answered 401 revoked, within the credential cache time")
    func revocation() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app(cacheTTL: .milliseconds(300)).test(.router) { client in
            #expect(try await postJSON(client, try phBatch(sequences: 1...1), key: fixture.deviceKey).status == .ok)
            try await IngestAdmin(store: fixture.store).revokeDevice(farm: "f1", device: try deviceID("d1"))
            try await Task.sleep(for: .milliseconds(400))
            let response = try await postJSON(client, try phBatch(sequences: 2...2), key: fixture.deviceKey)
            try expectError(response, .unauthorized, "revoked")
            // Other devices are unaffected.
            #expect(try await postJSON(client, try phBatch(device: "d2", sequences: 1...1), key: fixture.secondDeviceKey).status == .ok)
        }
    }

    @Test("read tokens are scoped to their farm")
    func readTokenScope() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            let own = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.readToken))
            #expect(own.status == .ok)
            let other = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.otherFarmReadToken))
            try expectError(other, .forbidden, "forbidden")
            let unknownFarm = try await client.execute(uri: "/v1/farms/nope/latest", method: .get, headers: bearer(fixture.readToken))
            try expectError(unknownFarm, .forbidden, "forbidden")
            let none = try await client.execute(uri: "/v1/farms/f1/latest", method: .get)
            try expectError(none, .unauthorized, "unauthorized")
            let deviceKey = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(fixture.deviceKey))
            try expectError(deviceKey, .unauthorized, "unauthorized")
            let forged = APIKey(kind: .readToken, keyID: fixture.readToken.keyID, secret: String(repeating: "a", count: 64))
            try expectError(try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: bearer(forged)), .unauthorized, "unauthorized")
        }
    }

    @Test("the authenticator caches found credentials but never unknown ones")
    func cache() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let authenticator = Authenticator(store: fixture.store, cacheTTL: .seconds(60))
        let key = APIKey.generate(kind: .device)
        #expect(try await authenticator.authenticateDevice(key) == .invalid)
        _ = try await fixture.store.createDevice(farm: "f1", device: try deviceID("late"), keyID: key.keyID, secretHash: key.secretHash, createdAt: testNow)
        guard case .authenticated(let identity) = try await authenticator.authenticateDevice(key) else {
            Issue.record("a device registered after a failed lookup must work at once")
            return
        }
        #expect(identity.device.rawValue == "late")
    }
}
