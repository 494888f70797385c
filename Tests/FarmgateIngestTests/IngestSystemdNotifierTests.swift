import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Prometheus
import Testing

@testable import FarmgateIngest

/// `serve`'s migration under systemd (`Type=notify`): the start is extended while it lasts, and only then.
@Suite struct IngestSystemdNotifierTests {
    /// A notifier speaking to a listener that plays systemd.
    static func withNotifier(_ body: (IngestSystemdNotifier, NotifyListener) async throws -> Void) async throws {
        let dir = try Scratch(prefix: "fg-sd-ingest", in: URL(fileURLWithPath: "/tmp"))
        let listener = try NotifyListener(address: dir.file("notify.sock"))
        defer { listener.stop() }
        let notifier = IngestSystemdNotifier(
            notifier: SystemdNotifier(socketPath: listener.address), registry: PrometheusCollectorRegistry(), logger: testLogger)
        try await body(notifier, listener)
    }

    @Test("while the store migrates, STATUS says so and EXTEND_TIMEOUT_USEC comes at once and every interval; none after")
    func extendsTheStartWhileMigrating() async throws {
        try await Self.withNotifier { notifier, listener in
            let extended = "EXTEND_TIMEOUT_USEC=\(IngestSystemdNotifier.migrationExtension.wholeMicroseconds)"
            // The migration lasts until three extensions arrived (one at once, then one per interval), or 30 s: a
            // loaded machine delays the pings, not their number.
            let result = try await notifier.whileMigrating(every: .milliseconds(100)) {
                let deadline = ContinuousClock.now + .seconds(30)
                while listener.messages(with: extended).count < 3, ContinuousClock.now < deadline {
                    try await Task.sleep(for: .milliseconds(10))
                }
                return 42
            }
            #expect(result == 42)
            // What was sent before the return has been received (the listener's own thread) after a moment.
            try await Task.sleep(for: .milliseconds(300))
            let during = listener.messages(with: extended).count
            #expect(during >= 3, "\(listener.received.map(\.fields))")
            #expect(
                listener.statusLines.allSatisfy { $0 == "migrating the store's schema" } && !listener.statusLines.isEmpty,
                "\(listener.statusLines)")
            // The migration is over: nothing more extends the start.
            try await Task.sleep(for: .milliseconds(400))
            #expect(listener.messages(with: extended).count == during, "\(listener.received.map(\.fields))")
        }
    }

    @Test("a migration that fails is rethrown, and the extensions stop")
    func aFailedMigrationStopsTheExtensions() async throws {
        try await Self.withNotifier { notifier, listener in
            struct Refused: Error {}
            await #expect(throws: Refused.self) {
                try await notifier.whileMigrating(every: .milliseconds(50)) { () async throws -> Int in
                    try await Task.sleep(for: .milliseconds(120))
                    throw Refused()
                }
            }
            try await Task.sleep(for: .milliseconds(300))
            let after = listener.messages(with: "EXTEND_TIMEOUT_USEC=").count
            #expect(after >= 1)
            try await Task.sleep(for: .milliseconds(300))
            #expect(listener.messages(with: "EXTEND_TIMEOUT_USEC=").count == after)
        }
    }
}
