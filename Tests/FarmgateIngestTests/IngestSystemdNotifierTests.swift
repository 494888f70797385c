import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Prometheus
import Testing

@testable import FarmgateIngest

/// `serve`'s migration under systemd (`Type=notify`): the start is extended while it lasts, and only then.
@Suite struct IngestSystemdNotifierTests {
    @Test("while the store migrates, STATUS says so and EXTEND_TIMEOUT_USEC comes at once and every interval; none after")
    func extendsTheStartWhileMigrating() async throws {
        let dir = try Scratch(prefix: "fg-sd-ingest", in: URL(fileURLWithPath: "/tmp"))
        let listener = try NotifyListener(address: dir.file("notify.sock"))
        defer { listener.stop() }
        let notifier = IngestSystemdNotifier(
            notifier: SystemdNotifier(socketPath: listener.address), registry: PrometheusCollectorRegistry(), logger: testLogger)
        let result = try await notifier.whileMigrating(every: .milliseconds(100)) {
            try await Task.sleep(for: .milliseconds(650))
            return 42
        }
        #expect(result == 42)
        let extended = "EXTEND_TIMEOUT_USEC=\(IngestSystemdNotifier.migrationExtension.wholeMicroseconds)"
        let deadline = ContinuousClock.now + .seconds(5)
        while listener.messages(with: extended).count < 3, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(10)) }
        let during = listener.messages(with: extended).count
        // One at once and one per 100 ms of the 650 (fewer when the machine is loaded, never only the first).
        #expect(during >= 3, "\(listener.received.map(\.fields))")
        #expect(listener.statusLines.allSatisfy { $0 == "migrating the store's schema" } && !listener.statusLines.isEmpty, "\(listener.statusLines)")
        // The migration is over: nothing more extends the start.
        try await Task.sleep(for: .milliseconds(400))
        #expect(listener.messages(with: extended).count == during, "\(listener.received.map(\.fields))")
    }

    @Test("a migration that fails is rethrown, and the extensions stop")
    func aFailedMigrationStopsTheExtensions() async throws {
        let dir = try Scratch(prefix: "fg-sd-ingest", in: URL(fileURLWithPath: "/tmp"))
        let listener = try NotifyListener(address: dir.file("notify.sock"))
        defer { listener.stop() }
        let notifier = IngestSystemdNotifier(
            notifier: SystemdNotifier(socketPath: listener.address), registry: PrometheusCollectorRegistry(), logger: testLogger)
        struct Refused: Error {}
        await #expect(throws: Refused.self) {
            try await notifier.whileMigrating(every: .milliseconds(50)) { () async throws -> Int in
                try await Task.sleep(for: .milliseconds(120))
                throw Refused()
            }
        }
        try await Task.sleep(for: .milliseconds(100))
        let after = listener.messages(with: "EXTEND_TIMEOUT_USEC=").count
        #expect(after >= 1)
        try await Task.sleep(for: .milliseconds(300))
        #expect(listener.messages(with: "EXTEND_TIMEOUT_USEC=").count == after)
    }
}
