import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Prometheus
import Testing

@testable import FarmgateIngest

/// Retention on SQLite run by another process than `serve` (`farmgate-ingest retention run`): two stores on one file,
/// each with connections of its own, share only SQLite's file locks, as two processes do.
@Suite struct SQLiteRetentionBesideServeTests {
    /// `count` readings of `tank1.ph` 200 days old, written straight into the file (through the store it would take
    /// minutes), beside ten recent ones stored through it; returns the device.
    static func fill(_ store: SQLiteIngestStore, old count: Int) async throws -> DeviceIdentity {
        let device = try await StoreConformanceTests.device(in: store)
        _ = try await store.store(try phBatch(sequences: 1...10), for: device, receivedAt: testNow)
        let sensor = try #require(try await store.sensor(farmID: device.farmID, device: device.device, sensor: try sensorID("tank1.ph"))).rowID
        let start = testNow.microseconds - 200 * 86_400_000_000
        let path = store.path
        try await runOffPool {
            let connection = try SQLiteConnection(path: path, mode: .readWrite, busyTimeoutMilliseconds: 30_000)
            try connection.transaction {
                try connection.query(
                    """
                    WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
                    INSERT INTO readings(device_id, sequence, sensor_id, timestamp_us, value, flags, received_at_us)
                    SELECT ?, 1000 + i, ?, ? + i * 1000000, 6.5, 0, ? FROM n
                    """, [.integer(Int64(count - 1)), .integer(device.rowID), .integer(sensor), .integer(start), .integer(testNow.microseconds)])
                try connection.query("UPDATE devices SET highest_sequence = ? WHERE id = ?", [.integer(Int64(1000 + count)), .integer(device.rowID)])
            }
        }
        return device
    }

    /// The command's run beside serve's uploads: serve's writer waits for about one delete transaction, never for the
    /// run. Before, the run began its next transaction right after each commit, while serve's writer slept in SQLite's
    /// busy handler (up to 100 ms a time), so serve found the lock taken again time after time: uploads waited 1.9 to
    /// 3.3 s beside a 4 s run (an upload past the 5 s busy timeout fails).
    @Test func serveWaitsForAboutOneDeleteTransactionOfARunInAnotherProcessNotForTheRun() async throws {
        try await withFreshStore(.sqlite) { store in
            let serve = try #require(store as? SQLiteIngestStore)
            let old = 400_000
            let device = try await Self.fill(serve, old: old)
            let command = try SQLiteIngestStore(path: serve.path, logger: testLogger)
            defer { command.close() }
            let removed = RemovedRows()
            let run = Task {
                try await command.runRetention(IngestConfiguration.Retention(), now: testNow, options: RetentionRunOptions(progress: { removed.set($0) }))
            }
            #expect(await eventually(timeout: .seconds(120)) { removed.value > 0 })
            // One-reading uploads, one after another, for as long as the run deletes (as the tester's script did).
            let clock = ContinuousClock()
            var waits: [Duration] = []
            var next: UInt64 = 10_000_000
            while removed.value < old {
                let started = clock.now
                let outcome = try await serve.store(try phBatch(sequences: next...next), for: device, receivedAt: testNow)
                waits.append(clock.now - started)
                #expect(outcome.accepted == 1)
                next += 1
            }
            let report = try await run.value
            #expect(report.rawRowsDeleted == old)
            let longest = waits.max() ?? .zero
            // A delete transaction of 5,000 rows takes tens of milliseconds (more on a loaded machine); the bound leaves
            // room for that and stays far below the seconds the run takes.
            #expect(waits.count >= 10, "uploads stored while the run deleted")
            #expect(longest < .seconds(1), "the longest upload waited \(longest) beside a run of \(report.duration) (\(waits.count) uploads)")
        }
    }

    /// Two runs on one file at once: the second finds the first's lock (`<path>.retention.lock`) and does nothing, as
    /// on PostgreSQL. Before, both ran, each deleting part of the rows. serve's scheduled run skips the same way, and
    /// says so in its log and metrics. The lock goes with the run.
    @Test func aSecondRunOnTheSameFileSkipsWhileTheFirstHoldsTheLock() async throws {
        try await withFreshStore(.sqlite) { store in
            let serve = try #require(store as? SQLiteIngestStore)
            let old = 100_000
            _ = try await Self.fill(serve, old: old)
            let command = try SQLiteIngestStore(path: serve.path, logger: testLogger)
            defer { command.close() }
            let removed = RemovedRows()
            let run = Task {
                try await command.runRetention(
                    IngestConfiguration.Retention(), now: testNow, options: RetentionRunOptions(progress: { removed.set($0) }, rowsPerTransaction: 2_000))
            }
            #expect(await eventually(timeout: .seconds(120)) { removed.value > 0 })
            let second = try await serve.runRetention(IngestConfiguration.Retention(), now: testNow, options: RetentionRunOptions())
            #expect(second.skipped == .runningElsewhere)
            #expect(second.rawRowsDeleted == 0)
            #expect(second.lines == ["Skipped: another farmgate-ingest is running retention on this database now; nothing was removed."])
            let dry = try await serve.runRetention(IngestConfiguration.Retention(), now: testNow, options: RetentionRunOptions(dryRun: true))
            #expect(dry.skipped == .runningElsewhere)
            // serve's schedule: skipped, logged at info, counted.
            let log = RecordedLog()
            let registry = PrometheusCollectorRegistry()
            let service = RetentionService(
                store: serve, retention: IngestConfiguration.Retention(), metrics: RetentionMetrics(registry: registry), logger: log.logger(),
                now: { testNow })
            let scheduled = try #require(await service.runOnce())
            #expect(scheduled.skipped == .runningElsewhere)
            #expect(log.entries.contains { $0.level == .info && $0.message == "retention run skipped" }, "\(log.entries.map(\.message))")
            #expect(String(decoding: registry.emitToBuffer(), as: UTF8.self).contains(#"farmgate_ingest_retention_runs_total{outcome="skipped"} 1"#))
            #expect(removed.value < old, "the first run was still deleting")

            let report = try await run.value
            #expect(report.skipped == nil && report.rawRowsDeleted == old)
            let after = try await serve.runRetention(IngestConfiguration.Retention(), now: testNow, options: RetentionRunOptions())
            #expect(after.skipped == nil && after.rawRowsDeleted == 0)
        }
    }
}
