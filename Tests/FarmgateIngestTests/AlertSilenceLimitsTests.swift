import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Prometheus
import Testing

@testable import FarmgateIngest

/// A silence lasts at most 366 days, and its matchers are label names and `*`/`?` globs of bounded length.
@Suite("Silence lengths and matchers are checked")
struct AlertSilenceLimitsTests {
    @Test("the API refuses a silence longer than 366 days and a malformed matcher with 400 invalid_silence naming it, on either store", arguments: StoreKind.allCases)
    func apiRefusesLongSilencesAndBadMatchers(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let alertStore = try #require(store as? any IngestStore & AlertStore)
            let admin = IngestAdmin(store: store)
            _ = try await admin.createFarm(name: "f1")
            let token = try await admin.createReadToken(farm: "f1", role: .admin)
            var configuration = IngestConfiguration()
            configuration.server.port = 0
            let app = buildApplication(
                configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: testLogger, now: { testNow },
                credentialCacheTTL: .zero)
            let farAway = RFC3339.format(Timestamp(microseconds: testNow.microseconds + 367 * 86_400_000_000))
            let long = String(repeating: "a", count: 257)
            try await app.test(.router) { client in
                for (body, phrase) in [
                    (#"{"matchers": {"alertname": "zzz"}, "duration": "3000000d"}"#, "duration: '3000000d' must be longer than 0s and at most 366d"),
                    (#"{"matchers": {"alertname": "zzz"}, "duration": "367d"}"#, "duration: '367d' must be longer than 0s and at most 366d"),
                    (#"{"matchers": {"alertname": "zzz"}, "ends_at": "\#(farAway)"}"#, "ends_at: must be at most 366 days"),
                    (#"{"matchers": {"": "x"}, "duration": "2h"}"#, "matchers: label name ''"),
                    (#"{"matchers": {"alert name": "x"}, "duration": "2h"}"#, "matchers: label name 'alert name'"),
                    (#"{"matchers": {"sensor": "[a-"}, "duration": "2h"}"#, "matchers: the glob of 'sensor' ('[a-') is not valid"),
                    (#"{"matchers": {"sensor": "\#(long)"}, "duration": "2h"}"#, "matchers: the glob of 'sensor' is longer than 256"),
                ] {
                    let response = try await client.execute(uri: "/v1/farms/f1/silences", method: .post, headers: jsonHeaders(token), body: ByteBuffer(string: body))
                    let message = try expectError(response, .badRequest, "invalid_silence")
                    #expect(message.hasPrefix(phrase), "\(body.prefix(80)): \(message)")
                }
                // At the limits: taken.
                for body in [
                    #"{"matchers": {"alertname": "ph-*", "sensor": "\#(String(repeating: "b", count: 256))"}, "duration": "366d"}"#,
                    #"{"matchers": {"_team": "?x*"}, "duration": "2h"}"#,
                ] {
                    let response = try await client.execute(uri: "/v1/farms/f1/silences", method: .post, headers: jsonHeaders(token), body: ByteBuffer(string: body))
                    #expect(response.status == .created, "\(body.prefix(80)): \(String(buffer: response.body))")
                }
            }
            // Nothing refused was stored.
            let silences = try await AlertAdmin(store: alertStore).silences(farm: "f1", now: testNow)
            #expect(silences.count == 2)
            #expect(silences.allSatisfy { $0.endsAt.microseconds - testNow.microseconds <= 366 * 86_400_000_000 })
        }
    }

    @Test("the admin (and so the CLI) refuses a silence past 366 days and a matcher with an empty name or a bracket")
    func adminRefuses() async throws {
        try await AlertHarness.with(.sqlite) { h in
            let now = h.clock.now
            func add(_ matchers: [String: String], days: Int64 = 1) async throws {
                _ = try await h.admin.addSilence(
                    farm: "f1", matchers: matchers, until: Timestamp(microseconds: now.microseconds + days * 86_400_000_000), comment: "", by: "t", now: now)
            }
            for (matchers, days, field) in [
                (["alertname": "x"], Int64(999_999), "ends_at"), (["alertname": "x"], Int64(367), "ends_at"), (["": "x"], Int64(1), "matchers"),
                (["device": "gh[12]"], Int64(1), "matchers"), (["9lives": "x"], Int64(1), "matchers"),
            ] {
                let error = await #expect(throws: AlertRuleError.self, "\(matchers) \(days)d") { try await add(matchers, days: days) }
                #expect(error?.field == field, "\(matchers) \(days)d: \(error?.description ?? "")")
            }
            // The end can be the largest timestamp there is without an overflow.
            let error = await #expect(throws: AlertRuleError.self) {
                _ = try await h.admin.addSilence(farm: "f1", matchers: ["alertname": "x"], until: Timestamp(microseconds: .max), comment: "", by: "t", now: now)
            }
            #expect(error?.field == "ends_at")
            try await add(["alertname": "x"], days: 366)
            #expect(try await h.admin.silences(farm: "f1", now: now).count == 1)
        }
    }
}
