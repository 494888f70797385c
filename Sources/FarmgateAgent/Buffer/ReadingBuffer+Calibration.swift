import FarmgateSupport
import FarmgateWire
import Logging
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Where a finished calibration goes: the site buffer (or a test's collector).
public protocol CalibrationRecorder: Sendable {
    /// Commits `event` durably; recording the same event id twice keeps one.
    func recordCalibration(_ event: CalibrationEvent) async throws
}

/// Calibration events wait in the buffer until the ingest acknowledged them, beside the readings.
///
/// A calibration exists once ``recordCalibration(_:)`` returned: it is committed in its own transaction at once (it is
/// rare and precious, not worth batching). The uploader sends the oldest ones with the readings, when the ingest says it
/// understands them (format version 3), and deletes them with ``acknowledgeCalibrations(_:)`` only after the ingest's
/// receipt counted them. The ingest is idempotent on (device, event id): a re-sent event is a duplicate.
extension ReadingBuffer: CalibrationRecorder {
    public func recordCalibration(_ event: CalibrationEvent) async throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let json = String(decoding: try encoder.encode(event), as: UTF8.self)
        let now = Timestamp.now().microseconds
        try await withStore { store in
            try store.connection.transaction {
                try store.connection.prepare(
                    "INSERT OR IGNORE INTO calibrations(id, sensor, time, event, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)"
                ).run([.text(event.id), .text(event.sensor.rawValue), .integer(event.time.microseconds), .text(json), .integer(now)])
            }
        }
    }

    /// The quarantine code of a calibration row that no longer decodes as an event.
    public static let undecodableCalibrationCode = "undecodable_event"

    /// Up to `limit` calibrations not yet acknowledged, oldest first.
    ///
    /// A row that no longer decodes (written by a newer Farmgate and downgraded, or damaged) is never sent half-read, and
    /// never left pending either: the oldest rows go first, so a handful of them would be all this ever returned and every
    /// later event would wait for good. It is quarantined in place with ``undecodableCalibrationCode`` (kept, counted in
    /// `farmgate status`, requeued after an upgrade or dropped by that code) and an error is logged.
    public func pendingCalibrations(limit: Int) async throws -> [CalibrationEvent] {
        let limit = max(0, limit)
        return try await withStore { store in
            let decoder = JSONDecoder()
            while true {
                let rows = try store.connection.query(
                    "SELECT key, id, event FROM calibrations WHERE quarantined_at IS NULL ORDER BY key LIMIT ?1", [.integer(Int64(limit))])
                var events: [CalibrationEvent] = []
                var undecodable: [(key: Int64, id: String)] = []
                for row in rows where row.count == 3 {
                    guard let key = row[0].int64 else { continue }
                    if let text = row[2].string, let event = try? decoder.decode(CalibrationEvent.self, from: Data(text.utf8)) {
                        events.append(event)
                    } else {
                        undecodable.append((key, row[1].string ?? "?"))
                    }
                }
                guard !undecodable.isEmpty else { return events }
                try Self.quarantineUndecodable(undecodable, in: store)
                // Fewer rows than asked were events: look again past the rows just set aside.
                if rows.count < limit || events.count == limit { return events }
            }
        }
    }

    /// Quarantines calibration rows that do not decode, in one transaction, and says so in the log.
    static func quarantineUndecodable(_ rows: [(key: Int64, id: String)], in store: BufferStore) throws {
        let now = Timestamp.now().microseconds
        let message = "the buffer cannot read this calibration event (written by a newer farmgate, or damaged); it is not sent"
        try store.connection.transaction {
            let statement = try store.connection.prepare(
                "UPDATE calibrations SET quarantined_at = ?2, code = ?3, message = ?4 WHERE key = ?1 AND quarantined_at IS NULL")
            for row in rows {
                try statement.run([.integer(row.key), .integer(now), .text(undecodableCalibrationCode), .text(message)])
            }
        }
        store.logger.error(
            "Buffer holds calibration events it cannot read; they are kept in quarantine and not sent, so that later events go. After upgrading farmgate, farmgate quarantine requeue --code undecodable_event sends them; farmgate quarantine drop --code undecodable_event deletes them",
            metadata: ["calibration.ids": "\(rows.map(\.id).prefix(10).joined(separator: ", "))", "calibration.count": "\(rows.count)"])
    }

    /// Deletes the calibrations the ingest acknowledged (stored or already had).
    public func acknowledgeCalibrations(_ ids: [String]) async throws {
        guard !ids.isEmpty else { return }
        try await writing(.acknowledge) { store in
            try store.connection.transaction {
                let statement = try store.connection.prepare("DELETE FROM calibrations WHERE id = ?1")
                for id in ids {
                    try statement.run([.text(id)])
                }
            }
        }
    }

    /// How many calibrations wait for the ingest (shown by `farmgate status`).
    public func pendingCalibrationCount() async throws -> Int {
        Int(try await withStore { store in try store.connection.queryInt("SELECT count(*) FROM calibrations WHERE quarantined_at IS NULL") } ?? 0)
    }

    /// Keeps calibrations the ingest refused for good aside, in one transaction: they stay in the buffer (an installer
    /// sees them in `farmgate quarantine list`) but are never sent again. `reasons` maps event ids to `code: message`.
    public func quarantineCalibrations(_ reasons: [String: String]) async throws {
        guard !reasons.isEmpty else { return }
        let now = Timestamp.now().microseconds
        try await writing(.acknowledge) { store in
            try store.connection.transaction {
                let statement = try store.connection.prepare(
                    "UPDATE calibrations SET quarantined_at = ?2, code = ?3, message = ?4 WHERE id = ?1 AND quarantined_at IS NULL")
                for (id, reason) in reasons.sorted(by: { $0.key < $1.key }) {
                    let parsed = QuarantineReason(parsing: reason)
                    try statement.run([.text(id), .integer(now), .text(parsed.code), .text(parsed.message)])
                }
            }
        }
    }

    /// Sends quarantined calibrations again (once the ingest's cause is fixed), all or those whose refusal has `code`.
    /// - Returns: how many.
    public func requeueCalibrations(code: String? = nil) async throws -> Int {
        try await withStore { store in
            try store.connection.transaction {
                try store.connection.prepare(
                    "UPDATE calibrations SET quarantined_at = NULL, code = NULL, message = NULL WHERE quarantined_at IS NOT NULL AND (?1 IS NULL OR code = ?1)"
                ).run([code.map { .text($0) } ?? .null])
                return Int(try store.connection.queryInt("SELECT changes()") ?? 0)
            }
        }
    }

    /// Deletes quarantined calibrations for good, all or those whose refusal has `code`. - Returns: how many.
    public func dropQuarantinedCalibrations(code: String? = nil) async throws -> Int {
        try await withStore { store in
            try store.connection.transaction {
                try store.connection.prepare("DELETE FROM calibrations WHERE quarantined_at IS NOT NULL AND (?1 IS NULL OR code = ?1)")
                    .run([code.map { .text($0) } ?? .null])
                return Int(try store.connection.queryInt("SELECT changes()") ?? 0)
            }
        }
    }

    /// The quarantined calibrations, oldest first (at most `limit`), optionally only those whose refusal has `code`.
    public func quarantinedCalibrations(code: String? = nil, limit: Int = 1_000) async throws -> [QuarantinedCalibration] {
        let rows = try await withStore { store in
            try store.connection.query(
                """
                SELECT event, code, message, quarantined_at FROM calibrations
                WHERE quarantined_at IS NOT NULL AND (?1 IS NULL OR code = ?1) ORDER BY key LIMIT ?2
                """, [code.map { .text($0) } ?? .null, .integer(Int64(max(0, limit)))])
        }
        let decoder = JSONDecoder()
        return rows.compactMap { row in
            guard row.count == 4, let text = row[0].string, let event = try? decoder.decode(CalibrationEvent.self, from: Data(text.utf8)) else {
                return nil
            }
            return QuarantinedCalibration(
                event: event, code: row[1].string ?? QuarantineReason.unknownCode, message: row[2].string ?? "",
                quarantinedAt: Timestamp(microseconds: row[3].int64 ?? 0))
        }
    }
}
