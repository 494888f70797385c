import FarmgateSupport
import FarmgateWire
import Logging

/// Reviewing the quarantine: list it, send readings back to the queue, drop them.
///
/// The uploader moves a reading here when the ingest refused it for good (see ``PendingReadings/quarantine(_:)``). Once the
/// cause is fixed (a clock set right, a sensor declared, an ingest limit raised) an installer requeues the readings: they go
/// back into the queue with their original sequence numbers, so the ingest, idempotent on (device, sequence), stores each
/// once however often it is sent. A reading nobody will ever want is dropped, counted in
/// ``BufferStatistics/quarantineDropped`` and logged.
extension ReadingBuffer {
    /// The most readings ``quarantinePage(code:after:limit:)`` returns at once.
    public static let maximumQuarantinePage = 1_000

    /// Up to `limit` quarantined readings with a sequence number above `after`, in ascending sequence order, optionally only
    /// those whose reason has `code`. Page through the whole quarantine by passing the last sequence of one page as the
    /// `after` of the next: each page is one indexed query, so an export of any size never holds more than a page.
    public func quarantinePage(code: String? = nil, after: UInt64 = 0, limit: Int = maximumQuarantinePage) async throws
        -> [QuarantinedReading]
    {
        let limit = min(max(0, limit), Self.maximumQuarantinePage)
        return try await withStore { store in try store.quarantinePage(code: code, after: after, limit: limit) }
    }

    /// Moves the selected quarantined readings back into the queue with their original sequence numbers, in one transaction.
    ///
    /// A reading whose sensor and timestamp equal those of a pending reading stays in quarantine and is named in
    /// ``RequeueOutcome/conflicting``: the buffer holds one reading per sensor and timestamp, and neither reading is ours to
    /// delete. Once the pending one is delivered, requeue again (or drop the quarantined one).
    public func requeue(_ selection: QuarantineSelection) async throws -> RequeueOutcome {
        try await withStore { store in try store.requeue(selection) }
    }

    /// Deletes the selected quarantined readings for good, in one transaction, counting them in
    /// ``BufferStatistics/quarantineDropped`` and logging how many.
    public func dropQuarantined(_ selection: QuarantineSelection) async throws -> DropOutcome {
        try await withStore { store in try store.dropQuarantined(selection) }
    }
}

extension BufferStore {
    /// The columns ``quarantinedReading(row:)`` reads, in its order.
    static let quarantineColumns = "sequence, sensor, timestamp, steps, reason, quarantined_at, code, message, quality"

    func quarantinedReading(row: [SQLiteValue]) -> QuarantinedReading? {
        guard row.count == 9, let sequence = row[0].int64, sequence > 0, let key = row[1].int64, let timestamp = row[2].int64,
            let steps = row[3].int64
        else { return nil }
        let entry = sensorsByKey[key]
        let reason = row[4].string ?? ""
        return QuarantinedReading(
            sequence: UInt64(sequence), sensor: entry?.descriptor.id.rawValue ?? "sensor #\(key)",
            timestamp: Timestamp(microseconds: timestamp), value: entry?.descriptor.resolution.value(ofSteps: steps) ?? Double(steps),
            reason: reason, quarantinedAt: Timestamp(microseconds: row[5].int64 ?? 0), code: row[6].string, message: row[7].string,
            quality: QualityFlags(rawValue: UInt16(truncatingIfNeeded: row[8].int64 ?? 0)),
            resolution: entry?.descriptor.resolution.description)
    }

    /// Recounts ``quarantineCodeCounts`` (one scan of the `quarantine_code` index; the quarantine changes rarely).
    func recountQuarantineCodes() throws {
        var counts: [String: Int] = [:]
        for row in try connection.query("SELECT code, count(*) FROM quarantine GROUP BY code") where row.count == 2 {
            counts[row[0].string ?? QuarantineReason.unknownCode, default: 0] += Int(row[1].int64 ?? 0)
        }
        quarantineCodeCounts = counts
    }

    func quarantinePage(code: String?, after: UInt64, limit: Int) throws -> [QuarantinedReading] {
        guard limit > 0 else { return [] }
        let after = Int64(clamping: after)
        let rows: [[SQLiteValue]]
        if let code {
            rows = try connection.query(
                "SELECT \(Self.quarantineColumns) FROM quarantine WHERE code = ?1 AND sequence > ?2 ORDER BY sequence LIMIT ?3",
                [.text(code), .integer(after), .integer(Int64(limit))])
        } else {
            rows = try connection.query(
                "SELECT \(Self.quarantineColumns) FROM quarantine WHERE sequence > ?1 ORDER BY sequence LIMIT ?2",
                [.integer(after), .integer(Int64(limit))])
        }
        return rows.compactMap(quarantinedReading(row:))
    }

    /// The quarantined sequence numbers `selection` names, and the named ones that are not quarantined.
    private func resolve(_ selection: QuarantineSelection) throws -> (found: [Int64], notFound: [UInt64]) {
        switch selection {
        case .all:
            return (try connection.query("SELECT sequence FROM quarantine ORDER BY sequence").compactMap { $0.first?.int64 }, [])
        case .code(let code):
            return (
                try connection.query("SELECT sequence FROM quarantine WHERE code = ? ORDER BY sequence", [.text(code)])
                    .compactMap { $0.first?.int64 }, []
            )
        case .sequences(let sequences):
            let exists = try connection.prepare("SELECT 1 FROM quarantine WHERE sequence = ?")
            var found: [Int64] = []
            var notFound: [UInt64] = []
            for sequence in Set(sequences).sorted() {
                guard let value = Int64(exactly: sequence) else {
                    notFound.append(sequence)
                    continue
                }
                try exists.bind([.integer(value)])
                let present = try exists.step()
                exists.reset()
                if present { found.append(value) } else { notFound.append(sequence) }
            }
            return (found, notFound)
        }
    }

    func requeue(_ selection: QuarantineSelection) throws -> RequeueOutcome {
        let outcome = try write {
            let (found, notFound) = try resolve(selection)
            // OR IGNORE: the unique (sensor, timestamp) index refuses a reading equal to a pending one; it stays here.
            let insert = try connection.prepare(
                """
                INSERT OR IGNORE INTO readings(sequence, sensor, timestamp, steps, quality)
                SELECT sequence, sensor, timestamp, steps, quality FROM quarantine WHERE sequence = ?
                """)
            let delete = try connection.prepare("DELETE FROM quarantine WHERE sequence = ?")
            var requeued = 0
            var conflicting: [UInt64] = []
            for sequence in found {
                try insert.run([.integer(sequence)])
                if connection.changes == 1 {
                    try delete.run([.integer(sequence)])
                    requeued += 1
                } else {
                    conflicting.append(UInt64(sequence))
                }
            }
            pendingCount += requeued
            quarantinedCount -= requeued
            if requeued > 0 { try recountQuarantineCodes() }
            return RequeueOutcome(requeued: requeued, conflicting: conflicting, notFound: notFound)
        }
        if outcome.requeued > 0 || !outcome.conflicting.isEmpty {
            logger.notice(
                "Quarantined readings requeued with their original sequence numbers",
                metadata: [
                    "buffer.requeued": "\(outcome.requeued)", "buffer.conflicting": "\(outcome.conflicting.count)",
                    "buffer.selection": "\(Self.describe(selection))",
                ])
        }
        return outcome
    }

    func dropQuarantined(_ selection: QuarantineSelection) throws -> DropOutcome {
        let outcome = try write {
            let (found, notFound) = try resolve(selection)
            let delete = try connection.prepare("DELETE FROM quarantine WHERE sequence = ?")
            var dropped = 0
            for sequence in found {
                try delete.run([.integer(sequence)])
                dropped += connection.changes
            }
            if dropped > 0 {
                quarantinedCount -= dropped
                quarantineDropped += Int64(dropped)
                try setCounter(BufferSchema.counterQuarantineDropped, quarantineDropped)
                try recountQuarantineCodes()
                try persistLastSequenceIfUncovered()
            }
            return DropOutcome(dropped: dropped, notFound: notFound)
        }
        if outcome.dropped > 0 {
            logger.warning(
                "Quarantined readings dropped for good by an installer",
                metadata: ["buffer.dropped": "\(outcome.dropped)", "buffer.selection": "\(Self.describe(selection))"])
        }
        return outcome
    }

    /// Deletes the oldest quarantined readings (lowest sequence first) in chunks until the used bytes are at most `target`,
    /// and counts them in `quarantine_trimmed`. Called by the `drop_oldest` quota policy after every pending reading is gone:
    /// quarantine is trimmed last. Runs inside the commit's transaction. Returns how many it deleted.
    func trimQuarantine(downTo target: Int64) throws -> Int {
        guard pendingCount == 0 else { return 0 }
        var deleted = 0
        while quarantinedCount > 0, try usedBytes() > target {
            let chunk = max(64, min(quarantinedCount / 20, 10_000))
            try connection.query(
                "DELETE FROM quarantine WHERE sequence IN (SELECT sequence FROM quarantine ORDER BY sequence LIMIT ?)",
                [.integer(Int64(chunk))])
            let removed = connection.changes
            guard removed > 0 else { break }
            deleted += removed
            quarantinedCount -= removed
        }
        if deleted > 0 {
            quarantineTrimmed += Int64(deleted)
            try setCounter(BufferSchema.counterQuarantineTrimmed, quarantineTrimmed)
            try recountQuarantineCodes()
        }
        return deleted
    }

    private static func describe(_ selection: QuarantineSelection) -> String {
        switch selection {
        case .all: "all"
        case .code(let code): "code \(code)"
        case .sequences(let sequences): "\(sequences.count) sequence number(s)"
        }
    }
}
