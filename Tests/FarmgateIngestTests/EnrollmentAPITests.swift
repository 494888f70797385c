import FarmgateTestSupport
import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import Prometheus
import Synchronization
import Testing

@testable import FarmgateIngest

/// `POST /v1/enroll` through the real router, on the fixture's SQLite store, with a clock the test moves.
@Suite("Enrollment API")
struct EnrollmentAPITests {
    /// The wall clock the application reads.
    final class Clock: Sendable {
        let now = Mutex(testNow)
        func advance(seconds: Int64) { now.withLock { $0 = Timestamp(microseconds: $0.microseconds + seconds * 1_000_000) } }
        var current: Timestamp { now.withLock { $0 } }
    }

    struct Setup {
        let fixture: Fixture
        let clock = Clock()
        let recorder = LogRecorder()
        let registry = PrometheusCollectorRegistry()

        var app: some ApplicationProtocol {
            var configuration = IngestConfiguration()
            configuration.server.port = 0
            let clock = self.clock
            let logger = Logger(label: "enroll-test") { _ in RecordingHandler(recorder: recorder) }
            return buildApplication(
                configuration: configuration, store: fixture.store, registry: registry, logger: logger, now: { clock.current },
                credentialCacheTTL: .zero)
        }

        /// The enrollment endpoint alone, limited by `settings` (the application's router uses the defaults).
        func enrollmentOnly(settings: EnrollmentController.Settings) -> some ApplicationProtocol {
            let router = Router(context: IngestRequestContext.self)
            let clock = self.clock
            let logger = Logger(label: "enroll-test") { _ in RecordingHandler(recorder: recorder) }
            EnrollmentController(store: fixture.store, settings: settings, registry: registry, now: { clock.current }, logger: logger)
                .addRoutes(to: router)
            return Application(router: router)
        }

        /// A token for `device` of `f1`, valid `ttl` seconds from the test clock.
        func token(device: String, ttl: Int64 = 3600) async throws -> APIKey {
            try await IngestAdmin(store: fixture.store).createEnrollmentToken(
                farm: "f1", device: try deviceID(device), ttl: .seconds(ttl), in: fixture.store, now: clock.current
            ).token
        }

        func devices() async throws -> [String] {
            let farm = try #require(try await fixture.store.farm(named: "f1"))
            return try await fixture.store.devices(farmID: farm.id).map(\.device.rawValue)
        }
    }

    static func enroll(_ client: some TestClientProtocol, _ token: String, device: String? = nil) async throws -> HummingbirdTesting.TestResponse {
        let body = try device.map { ByteBuffer(bytes: try JSONEncoder().encode(EnrollmentRequest(device: $0))) }
        return try await client.execute(
            uri: EnrollmentProtocol.path, method: .post, headers: [.authorization: "Bearer \(token)", .contentType: "application/json"], body: body)
    }

    static func deviceState(_ client: some TestClientProtocol, key: String) async throws -> HummingbirdTesting.TestResponse {
        try await client.execute(uri: IngestProtocol.deviceStatePath, method: .get, headers: [.authorization: "Bearer \(key)"])
    }

    @Test("a token creates its device once; the key it returns uploads; the log says who enrolled what, never the key")
    func createsTheDevice() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "site-9")
        let issued = try await setup.app.test(.router) { client -> String in
            let response = try await Self.enroll(client, token.text, device: "site-9")
            #expect(response.status == .ok)
            let answer = try decode(EnrollmentAnswer.self, response)
            #expect(answer.farm == "f1" && answer.device == "site-9" && answer.action == .created && !answer.repeated)
            #expect(APIKey(parsing: answer.key)?.kind == .device)
            let state = try await Self.deviceState(client, key: answer.key)
            #expect(state.status == .ok)
            #expect(try decode(DeviceState.self, state).device == "site-9")
            return answer.key
        }
        #expect(try await setup.devices().contains("site-9"))
        let logs = setup.recorder.all
        let enrolled = logs.filter { $0.contains("device enrolled") }
        #expect(enrolled.count == 1)
        #expect(enrolled.first.map { $0.contains("device.farm=f1") && $0.contains("device.id=site-9") && $0.contains("enroll.token=\(token.keyID)") } == true)
        #expect(enrolled.first?.contains("client.address=") == true)
        #expect(!issued.isEmpty)
        let secret = try #require(APIKey(parsing: issued)).secret
        #expect(logs.allSatisfy { !$0.contains(secret) && !$0.contains(token.secret) }, "no key or token secret in the log")
        #expect(String(decoding: setup.registry.emitToBuffer(), as: UTF8.self).contains(#"farmgate_ingest_enrollments_total{result="created"} 1"#))
    }

    @Test("an existing device gets a new key (the answer says rotated) and its old key stops working")
    func rotatesAnExistingDevice() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "d1")
        try await setup.app.test(.router) { client in
            #expect(try await Self.deviceState(client, key: setup.fixture.deviceKey.text).status == .ok)
            let answer = try decode(EnrollmentAnswer.self, try await Self.enroll(client, token.text))
            #expect(answer.action == .rotated && answer.device == "d1")
            #expect(try await Self.deviceState(client, key: setup.fixture.deviceKey.text).status == .unauthorized)
            #expect(try await Self.deviceState(client, key: answer.key).status == .ok)
        }
        #expect(try await setup.devices().filter { $0 == "d1" }.count == 1)
    }

    @Test("the same token within the grace window gets the same key again, never a second device; after it, 410 token_used")
    func repeatsWithinTheGraceWindow() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "site-9")
        try await setup.app.test(.router) { client in
            let first = try decode(EnrollmentAnswer.self, try await Self.enroll(client, token.text))
            setup.clock.advance(seconds: 120)
            let again = try decode(EnrollmentAnswer.self, try await Self.enroll(client, token.text))
            #expect(again.key == first.key)
            #expect(again.repeated && again.action == .created)
            #expect(try await Self.deviceState(client, key: first.key).status == .ok)

            setup.clock.advance(seconds: 600)
            let late = try await Self.enroll(client, token.text)
            let message = try expectError(late, .gone, EnrollmentErrorCode.tokenUsed)
            #expect(message.contains("enroll-token create --farm f1 --device site-9"))
            #expect(try await Self.deviceState(client, key: first.key).status == .ok, "the key issued stays valid")
        }
        #expect(try await setup.devices().filter { $0 == "site-9" }.count == 1)
        let record = try #require(try await setup.fixture.store.enrollmentToken(keyID: token.keyID))
        #expect(record.sealedKey == nil, "after the window the sealed key is forgotten")
    }

    @Test("a used token is never answered again to a site naming another device, nor with a key that has since been replaced")
    func repeatsOnlyTheCurrentKeyToTheSameDevice() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "site-9")
        try await setup.app.test(.router) { client in
            let first = try decode(EnrollmentAnswer.self, try await Self.enroll(client, token.text, device: "site-9"))
            setup.clock.advance(seconds: 60)
            // Another site, configured as another device, presents the same token within the grace window.
            let other = try await Self.enroll(client, token.text, device: "site-3")
            let message = try expectError(other, .conflict, EnrollmentErrorCode.deviceMismatch)
            #expect(message.contains("'site-9'") && message.contains("site-3") && !message.contains(first.key))
            // The key is rotated by the operator: the repeat would hand out a key that is refused.
            _ = try await IngestAdmin(store: setup.fixture.store).rotateDeviceKey(farm: "f1", device: try deviceID("site-9"))
            let stale = try await Self.enroll(client, token.text, device: "site-9")
            #expect(try expectError(stale, .gone, EnrollmentErrorCode.tokenUsed).contains("enroll-token create"))
        }
    }

    @Test("an expired token is refused 410 token_expired and creates nothing")
    func expiredTokens() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "site-9", ttl: 60)
        setup.clock.advance(seconds: 61)
        try await setup.app.test(.router) { client in
            let message = try expectError(try await Self.enroll(client, token.text), .gone, EnrollmentErrorCode.tokenExpired)
            #expect(message.contains("expired at"))
        }
        #expect(try await !setup.devices().contains("site-9"))
    }

    @Test("a revoked token is refused 410 token_revoked, saying how to make a new one, and creates nothing")
    func revokedTokens() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "site-9")
        let other = try await setup.token(device: "site-8")
        setup.clock.advance(seconds: 30)
        let outcome = try await IngestAdmin(store: setup.fixture.store).revokeEnrollmentToken(
            keyID: token.keyID, in: setup.fixture.store, now: setup.clock.current)
        guard case .revoked = outcome else {
            Issue.record("an unused token was not revoked: \(outcome)")
            return
        }
        let revokedAt = RFC3339.format(setup.clock.current)
        setup.clock.advance(seconds: 30)
        try await setup.app.test(.router) { client in
            let message = try expectError(try await Self.enroll(client, token.text), .gone, EnrollmentErrorCode.tokenRevoked)
            #expect(message.contains("revoked at \(revokedAt)"), "\(message)")
            #expect(message.contains("enroll-token create --farm f1 --device site-9"), "\(message)")
            // Refused before the device check: a site naming the right device is refused the same way.
            _ = try expectError(try await Self.enroll(client, token.text, device: "site-9"), .gone, EnrollmentErrorCode.tokenRevoked)
            #expect(try await Self.enroll(client, other.text).status == .ok, "another token of the farm still works")
        }
        #expect(try await !setup.devices().contains("site-9"), "a revoked token creates nothing")
        let stored = try #require(try await setup.fixture.store.enrollmentToken(keyID: token.keyID))
        #expect(stored.usedAt == nil && stored.sealedKey == nil)
        let refused = setup.recorder.all.filter { $0.contains("enrollment refused: token revoked") }
        #expect(refused.count == 2 && refused.allSatisfy { $0.contains("enroll.token=\(token.keyID)") && $0.contains("device.id=site-9") })
        #expect(setup.recorder.all.allSatisfy { !$0.contains(token.secret) })
        #expect(String(decoding: setup.registry.emitToBuffer(), as: UTF8.self).contains(#"farmgate_ingest_enrollments_total{result="revoked"} 2"#))
    }

    @Test("revoking a token already exchanged leaves the device key working and stops the answer being repeated")
    func revokingAUsedToken() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "site-9")
        try await setup.app.test(.router) { client in
            let answer = try decode(EnrollmentAnswer.self, try await Self.enroll(client, token.text))
            setup.clock.advance(seconds: 60)
            let outcome = try await IngestAdmin(store: setup.fixture.store).revokeEnrollmentToken(
                keyID: token.keyID, in: setup.fixture.store, now: setup.clock.current)
            guard case .alreadyUsed(_, forgotSealedKey: true) = outcome else {
                Issue.record("a used token within the grace window: \(outcome)")
                return
            }
            // Within the grace window, but the sealed key is gone: the key is not handed out again.
            _ = try expectError(try await Self.enroll(client, token.text), .gone, EnrollmentErrorCode.tokenUsed)
            #expect(try await Self.deviceState(client, key: answer.key).status == .ok, "the device key it produced keeps working")
        }
        #expect(try await setup.fixture.store.enrollmentToken(keyID: token.keyID)?.revokedAt == nil)
    }

    @Test("a site that names another device is refused 409 and the token stays usable")
    func deviceMismatchKeepsTheToken() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "site-9")
        try await setup.app.test(.router) { client in
            let message = try expectError(try await Self.enroll(client, token.text, device: "site-8"), .conflict, EnrollmentErrorCode.deviceMismatch)
            #expect(message.contains("site-9") && message.contains("site-8"))
            // The device named twice is refused whole, never the first (or last) taken: the token stays usable.
            for body in [#"{"device": "site-9", "device": "x"}"#, #"{"device": "x", "device": "site-9"}"#] {
                let twice = try await client.execute(
                    uri: EnrollmentProtocol.path, method: .post, headers: [.authorization: "Bearer \(token.text)"], body: ByteBuffer(string: body))
                let refusal = try expectError(twice, .badRequest, "bad_request")
                #expect(refusal.contains("\"device\" appears more than once"), "\(refusal)")
            }
            // Bodies that name no device id say what is wrong with them, and leave the token usable too.
            for (body, status, says) in [
                (#"{"device": ""}"#, HTTPResponse.Status.badRequest, "'device' is no device id"),
                (#"{"device": 5}"#, .badRequest, "'device' must be a string"),
                (#"["site-9"]"#, .badRequest, "must be a JSON object"),
                ("{\"device\": \"" + String(repeating: "x", count: 5000) + "\"}", .contentTooLarge, "at most 4 KiB"),
            ] {
                let response = try await client.execute(
                    uri: EnrollmentProtocol.path, method: .post, headers: [.authorization: "Bearer \(token.text)"], body: ByteBuffer(string: body))
                let message = try expectError(response, status, status == .contentTooLarge ? "payload_too_large" : "bad_request")
                #expect(message.contains(says), "\(body.prefix(40)): \(message)")
            }
            let parameter = try await client.execute(
                uri: EnrollmentProtocol.path + "?dry_run=1", method: .post, headers: [.authorization: "Bearer \(token.text)"],
                body: ByteBuffer(string: #"{"device": "site-9"}"#))
            try expectError(parameter, .badRequest, "invalid_parameter")
            #expect(try await Self.enroll(client, token.text, device: "site-9").status == .ok)
        }
    }

    @Test("missing, malformed, unknown and wrong-secret tokens are 401 invalid_token; a device key is no token")
    func invalidTokens() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "site-9")
        let wrongSecret = "fge_\(token.keyID)_" + String(repeating: "0", count: 64)
        try await setup.app.test(.router) { client in
            let none = try await client.execute(uri: EnrollmentProtocol.path, method: .post)
            _ = try expectError(none, .unauthorized, EnrollmentErrorCode.invalidToken)
            for text in ["garbage", setup.fixture.deviceKey.text, "fge_zzzzzzzz_" + String(repeating: "1", count: 64), wrongSecret] {
                _ = try expectError(try await Self.enroll(client, text), .unauthorized, EnrollmentErrorCode.invalidToken)
            }
            let bad = try await client.execute(
                uri: EnrollmentProtocol.path, method: .post, headers: [.authorization: "Bearer \(token.text)"], body: ByteBuffer(string: "{not json"))
            _ = try expectError(bad, .badRequest, "bad_request")
            #expect(try await Self.enroll(client, token.text).status == .ok, "failed attempts do not use the token up")
        }
    }

    @Test("attempts are limited per address: past the burst, 429 with Retry-After before the store is asked")
    func rateLimited() async throws {
        let setup = Setup(fixture: try await Fixture())
        defer { setup.fixture.close() }
        let token = try await setup.token(device: "site-9")
        // One attempt back every 1000 s: however slowly a loaded machine runs the test, none comes back during it.
        let settings = EnrollmentController.Settings(burst: 10, perSecond: 0.001)
        try await setup.enrollmentOnly(settings: settings).test(.router) { client in
            for _ in 0..<settings.burst {
                _ = try expectError(try await Self.enroll(client, "garbage"), .unauthorized, EnrollmentErrorCode.invalidToken)
            }
            let limited = try await Self.enroll(client, token.text)
            _ = try expectError(limited, .tooManyRequests, EnrollmentErrorCode.rateLimited)
            #expect(Int(limited.headers[.retryAfter] ?? "") ?? 0 >= 1)
        }
        #expect(try await setup.fixture.store.enrollmentToken(keyID: token.keyID)?.usedAt == nil, "the limited attempt used nothing")
    }

    @Test("a sealed key opens only with the token that sealed it")
    func sealing() throws {
        let token = APIKey.generate(kind: .enrollment)
        let other = APIKey.generate(kind: .enrollment)
        let key = APIKey.generate(kind: .device).text
        let sealed = try EnrollmentSeal.seal(key, with: token)
        #expect(!String(decoding: sealed, as: UTF8.self).contains(key))
        #expect(EnrollmentSeal.open(sealed, with: token) == key)
        #expect(EnrollmentSeal.open(sealed, with: other) == nil)
        #expect(EnrollmentSeal.open(Array(sealed.dropLast()), with: token) == nil)
    }
}
