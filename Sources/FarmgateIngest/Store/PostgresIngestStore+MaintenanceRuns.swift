import FarmgateSupport
import FarmgateWire
import Logging
import PostgresNIO

/// `maintenance_runs` (migration 4): when each background job that runs once across instances last completed, by the
/// database's clock.
///
/// Whether a job is due is decided by the database alone: the run's time is `clock_timestamp()` when it is recorded, and
/// the question "did one complete less than this long ago" compares it with `clock_timestamp()` in one statement. So
/// every instance gets the same answer whatever its own clock says: with instances minutes apart, an instance running
/// behind would otherwise see a run that just completed as one from its future and run again, and one running ahead
/// would see it as older than it is. The caller asks inside the transaction that holds the job's advisory lock and
/// records its run in that same transaction, so a run that fails records nothing and "once" cannot race.
extension PostgresIngestStore {
    /// The database's clock in UTC microseconds, in SQL: `clock_timestamp()`, the time when it is evaluated (not the
    /// transaction's start, which a run that waited for a lock may have passed long ago).
    static let databaseClockMicroseconds = "(extract(epoch FROM clock_timestamp()) * 1000000)::int8"

    /// The database's clock (``databaseClockMicroseconds``) now.
    func databaseNow() async throws -> Timestamp {
        let read = try await rows("SELECT \(unescaped: Self.databaseClockMicroseconds)") { try $0.decode(Int64.self) }
        guard let microseconds = read.first else { throw IngestStoreError.corrupt("clock_timestamp() returned no row") }
        return Timestamp(microseconds: microseconds)
    }

    /// When `job` last completed (the database's clock), if that was less than `window` ago by the database's clock;
    /// nil when the job is due. A completion recorded in the database's future (by a version that recorded the
    /// instance's own clock, one running ahead) does not count, so that it cannot hold the job off for as long as that
    /// clock was ahead.
    static func recentMaintenanceRun(
        _ job: String, within window: Duration, on connection: PostgresConnection, logger: Logger
    ) async throws -> Timestamp? {
        var found: Timestamp?
        for try await finished in try await connection.query(
            """
            SELECT m.finished_at_us FROM maintenance_runs m, (SELECT \(unescaped: databaseClockMicroseconds) AS now_us) c
            WHERE m.job = \(job) AND m.finished_at_us <= c.now_us AND m.finished_at_us > c.now_us - \(window.wholeMicroseconds)
            """, logger: logger
        ).decode(Int64.self) {
            found = Timestamp(microseconds: finished)
        }
        return found
    }

    /// Records that `job` completed now (the database's clock), with a summary for people reading the table.
    static func recordMaintenanceRun(_ job: String, summary: String, on connection: PostgresConnection, logger: Logger) async throws {
        try await connection.query(
            """
            INSERT INTO maintenance_runs(job, finished_at_us, summary) VALUES (\(job), \(unescaped: databaseClockMicroseconds), \(summary))
            ON CONFLICT (job) DO UPDATE SET finished_at_us = excluded.finished_at_us, summary = excluded.summary
            """, logger: logger)
    }
}
