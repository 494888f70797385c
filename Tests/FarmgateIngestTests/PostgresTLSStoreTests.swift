import FarmgateSupport
import Foundation
import Testing

@testable import FarmgateIngest

/// The PostgreSQL store over TLS, against the test cluster's TLS-only loopback port. A suite of its own, run alone by
/// `make test` (SOLO_SUITES): in the first pass, beside a hundred CPU-bound suites on two cores, its TLS handshakes took
/// more than 5 s, and once the test did not end at all; alone it takes about two seconds.
@Suite struct PostgresTLSStoreTests {
    /// The TLS modes against the test cluster's loopback port, which accepts only TLS (a certificate from a CA that
    /// `.ci/with-postgres` made for localhost).
    @Test func tlsVerifyFullTrustsOnlyTheConfiguredCA() async throws {
        guard let url = ProcessInfo.processInfo.environment["FARMGATE_TEST_DATABASE_TLS_URL"], !url.isEmpty else { throw MissingTestDatabase() }
        let verified = try PostgresSettings(url: url)
        #expect(verified.tls == .verifyFull && verified.caFile != nil)
        // The pings that must succeed are given long: the first pass runs a hundred suites on two cores, and a debug
        // build's TLS handshake then took more than 5 s. Those that must fail keep 5 s: refused, the pool retries until
        // the query timeout, and with 30 s the test once did not end at all (under investigation, README Not built yet).
        func ping(_ settings: PostgresSettings, succeeding: Bool = true) async throws {
            var settings = settings
            settings.queryTimeout = succeeding ? .seconds(30) : .seconds(5)
            settings.connectTimeout = succeeding ? .seconds(15) : .seconds(2)
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            try await withRunning(store) { store in try await store.ping() }
        }
        try await ping(verified)
        var systemCAs = verified
        systemCAs.caFile = nil
        await #expect(throws: (any Error).self, "a certificate from the test CA must not verify against the system's CAs") { try await ping(systemCAs, succeeding: false) }
        var unverified = verified
        unverified.tls = .require
        unverified.caFile = nil
        try await ping(unverified)
        var plain = verified
        plain.tls = .disable
        plain.caFile = nil
        await #expect(throws: (any Error).self, "the server accepts only TLS on TCP") { try await ping(plain, succeeding: false) }
    }
}
