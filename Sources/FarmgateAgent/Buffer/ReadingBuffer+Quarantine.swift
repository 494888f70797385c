import FarmgateSupport
import FarmgateWire
import Logging
import Synchronization

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

    /// The most quarantined readings one transaction of a requeue or drop handles.
    ///
    /// A requeue or drop of a large selection (`--all` over a million readings) in one transaction held the buffer's
    /// thread for minutes on a Raspberry Pi: the group commit waited behind it until the watchdog killed the agent, and the
    /// restart rolled the whole job back, again and again. In chunks of this size each transaction takes a fraction of a
    /// second, and every chunk is a job of its own on the buffer's thread, so group commits, the uploader and
    /// `farmgate status` take their turn between two chunks.
    public static let quarantineChunkSize = 5_000

    /// Moves the selected quarantined readings back into the queue with their original sequence numbers.
    ///
    /// A reading whose sensor and timestamp equal those of a pending reading stays in quarantine and is named in
    /// ``RequeueOutcome/conflicting``: the buffer holds one reading per sensor and timestamp, and neither reading is ours to
    /// delete. Once the pending one is delivered, requeue again (or drop the quarantined one).
    ///
    /// The selection is worked through in ascending sequence order, at most ``quarantineChunkSize`` readings per
    /// transaction, each chunk a job of its own on the buffer's thread (see there why). Each chunk is atomic: a chunk that
    /// fails, or that a stop interrupts, changes nothing, and the chunks before it stay done. Once the commit loop has
    /// ended (the agent stops or reloads) no further chunk starts. A requeued reading is no
    /// longer in quarantine, so running the same requeue again finishes the rest. With `all` or `code`, the selection is
    /// what is quarantined up to the highest sequence number quarantined when the requeue began; readings the uploader
    /// quarantines meanwhile with lower numbers (a requeued reading the ingest refused again) are not taken a second time.
    ///
    /// - Throws: the failing chunk's error; when earlier chunks were done, a ``BufferError`` that says how many readings were
    ///   requeued before it (they are logged too).
    public func requeue(_ selection: QuarantineSelection) async throws -> RequeueOutcome {
        let chunkSize = Self.quarantineChunkSize
        var total = RequeueOutcome(requeued: 0, conflicting: [], notFound: [])
        do {
            var next = try await withStore { store in try store.firstQuarantineChunk(selection, limit: chunkSize) }
            while let chunk = next {
                guard !ending.withLock({ $0 }) else { throw BufferError.ending }
                let step = try await withStore { store in try store.requeue(chunk) }
                total.requeued += step.outcome.requeued
                total.conflicting += step.outcome.conflicting
                total.notFound += step.outcome.notFound
                next = step.next
            }
        } catch {
            logRequeue(total, selection, unfinished: error)
            guard total.requeued > 0 else { throw error }
            throw BufferError(
                "requeued \(total.requeued) reading(s), then stopped: \(error); the rest stay in quarantine: run the requeue again to finish")
        }
        logRequeue(total, selection, unfinished: nil)
        return total
    }

    /// Deletes the selected quarantined readings for good, counting them in ``BufferStatistics/quarantineDropped`` and
    /// logging how many.
    ///
    /// Chunked like ``requeue(_:)``, with the same guarantees: each chunk deletes and counts its readings in one
    /// transaction, and a drop run again after an interruption deletes the rest.
    ///
    /// - Throws: the failing chunk's error; when earlier chunks were done, a ``BufferError`` that says how many readings were
    ///   dropped before it (they are logged and counted too).
    public func dropQuarantined(_ selection: QuarantineSelection) async throws -> DropOutcome {
        let chunkSize = Self.quarantineChunkSize
        var total = DropOutcome(dropped: 0, notFound: [])
        do {
            var next = try await withStore { store in try store.firstQuarantineChunk(selection, limit: chunkSize) }
            while let chunk = next {
                guard !ending.withLock({ $0 }) else { throw BufferError.ending }
                let step = try await withStore { store in try store.dropQuarantined(chunk) }
                total.dropped += step.outcome.dropped
                total.notFound += step.outcome.notFound
                next = step.next
            }
        } catch {
            guard total.dropped > 0 else { throw error }
            logDrop(total, selection, unfinished: error)
            throw BufferError(
                "dropped \(total.dropped) reading(s) for good, then stopped: \(error); the rest stay in quarantine: run the drop again to finish")
        }
        logDrop(total, selection, unfinished: nil)
        return total
    }

    /// One log line for a whole requeue (not one per chunk); `unfinished` is the error that stopped it midway.
    private func logRequeue(_ outcome: RequeueOutcome, _ selection: QuarantineSelection, unfinished: (any Error)?) {
        guard outcome.requeued > 0 || !outcome.conflicting.isEmpty else { return }
        var metadata: Logger.Metadata = [
            "buffer.requeued": "\(outcome.requeued)", "buffer.conflicting": "\(outcome.conflicting.count)",
            "buffer.selection": "\(BufferStore.describe(selection))",
        ]
        if let unfinished { metadata["buffer.unfinished"] = "\(unfinished)" }
        logger.notice("Quarantined readings requeued with their original sequence numbers", metadata: metadata)
    }

    /// One log line for a whole drop: an installer deleted readings, which must be on record even when the drop stopped.
    private func logDrop(_ outcome: DropOutcome, _ selection: QuarantineSelection, unfinished: (any Error)?) {
        guard outcome.dropped > 0 else { return }
        var metadata: Logger.Metadata = [
            "buffer.dropped": "\(outcome.dropped)", "buffer.selection": "\(BufferStore.describe(selection))",
        ]
        if let unfinished { metadata["buffer.unfinished"] = "\(unfinished)" }
        logger.warning("Quarantined readings dropped for good by an installer", metadata: metadata)
    }
}

/// One transaction's share of a requeue or drop: which quarantined readings it looks at.
struct QuarantineChunk: Sendable {
    enum Rows: Sendable {
        /// The quarantined readings numbered above `after` and at most `through`, lowest first; with `code`, only those
        /// whose reason has it. `through` is the highest number quarantined when the job began, so the job ends.
        case range(code: String?, after: Int64, through: Int64)
        /// These sequence numbers, ascending and unique; this chunk takes the first `limit`.
        case sequences([UInt64])
    }

    var rows: Rows
    /// The most readings this chunk takes.
    var limit: Int
}

/// What one chunk of a requeue or drop did, and the chunk to run next (nil when the selection is done).
struct QuarantineStep<Outcome: Sendable>: Sendable {
    var outcome: Outcome
    var next: QuarantineChunk?
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

    /// The first chunk of a requeue or drop of `selection`, or nil when it selects nothing. For `all` and `code`, the job
    /// ends at the highest sequence number quarantined now.
    func firstQuarantineChunk(_ selection: QuarantineSelection, limit: Int) throws -> QuarantineChunk? {
        let limit = max(1, limit)
        switch selection {
        case .all:
            guard let through = try connection.queryInt("SELECT max(sequence) FROM quarantine") else { return nil }
            return QuarantineChunk(rows: .range(code: nil, after: .min, through: through), limit: limit)
        case .code(let code):
            guard let through = try connection.queryInt("SELECT max(sequence) FROM quarantine WHERE code = ?", [.text(code)]) else {
                return nil
            }
            return QuarantineChunk(rows: .range(code: code, after: .min, through: through), limit: limit)
        case .sequences(let sequences):
            let sorted = Set(sequences).sorted()
            return sorted.isEmpty ? nil : QuarantineChunk(rows: .sequences(sorted), limit: limit)
        }
    }

    /// The quarantined readings `chunk` takes, with their codes; the numbers it names that are not quarantined; the chunk
    /// after it. Run inside the chunk's transaction, so what it finds is what the transaction changes.
    private func resolve(_ chunk: QuarantineChunk) throws -> (found: [(sequence: Int64, code: String)], notFound: [UInt64], next: QuarantineChunk?) {
        switch chunk.rows {
        case .range(let code, let after, let through):
            let rows: [[SQLiteValue]]
            if let code {
                rows = try connection.query(
                    "SELECT sequence, code FROM quarantine WHERE code = ?1 AND sequence > ?2 AND sequence <= ?3 ORDER BY sequence LIMIT ?4",
                    [.text(code), .integer(after), .integer(through), .integer(Int64(chunk.limit))])
            } else {
                rows = try connection.query(
                    "SELECT sequence, code FROM quarantine WHERE sequence > ?1 AND sequence <= ?2 ORDER BY sequence LIMIT ?3",
                    [.integer(after), .integer(through), .integer(Int64(chunk.limit))])
            }
            let found = rows.compactMap { row -> (sequence: Int64, code: String)? in
                guard row.count == 2, let sequence = row[0].int64 else { return nil }
                return (sequence, row[1].string ?? QuarantineReason.unknownCode)
            }
            // A full chunk may have more behind it; a short one was the last. Conflicting readings stay in quarantine, so
            // the next chunk starts after the last number looked at, not at the lowest one left.
            var next: QuarantineChunk?
            if rows.count == chunk.limit, let last = rows.last?.first?.int64, last < through {
                next = QuarantineChunk(rows: .range(code: code, after: last, through: through), limit: chunk.limit)
            }
            return (found, [], next)
        case .sequences(let sequences):
            let lookup = try connection.prepare("SELECT code FROM quarantine WHERE sequence = ?")
            var found: [(sequence: Int64, code: String)] = []
            var notFound: [UInt64] = []
            for sequence in sequences.prefix(chunk.limit) {
                guard let value = Int64(exactly: sequence) else {
                    notFound.append(sequence)
                    continue
                }
                try lookup.bind([.integer(value)])
                if try lookup.step() {
                    found.append((value, lookup.isNull(0) ? QuarantineReason.unknownCode : lookup.text(0)))
                } else {
                    notFound.append(sequence)
                }
                lookup.reset()
            }
            let rest = sequences.dropFirst(chunk.limit)
            return (found, notFound, rest.isEmpty ? nil : QuarantineChunk(rows: .sequences(Array(rest)), limit: chunk.limit))
        }
    }

    /// Takes readings that left quarantine out of ``quarantineCodeCounts``. Counted per reading rather than recounted: a
    /// recount scans the whole `quarantine_code` index, once per chunk of a large requeue.
    private func forgetQuarantined(codes: [String]) {
        for code in codes {
            guard let count = quarantineCodeCounts[code] else { continue }
            quarantineCodeCounts[code] = count > 1 ? count - 1 : nil
        }
    }

    /// Requeues the readings of one chunk, in one transaction (see ``ReadingBuffer/requeue(_:)``).
    func requeue(_ chunk: QuarantineChunk) throws -> QuarantineStep<RequeueOutcome> {
        try write {
            let (found, notFound, next) = try resolve(chunk)
            // OR IGNORE: the unique (timestamp, sensor) index refuses a reading equal to a pending one; it stays here.
            let insert = try connection.prepare(
                """
                INSERT OR IGNORE INTO readings(sequence, sensor, timestamp, steps, quality)
                SELECT sequence, sensor, timestamp, steps, quality FROM quarantine WHERE sequence = ?
                """)
            let delete = try connection.prepare("DELETE FROM quarantine WHERE sequence = ?")
            var requeued: [String] = []
            var conflicting: [UInt64] = []
            for row in found {
                try insert.run([.integer(row.sequence)])
                if connection.changes == 1 {
                    try delete.run([.integer(row.sequence)])
                    requeued.append(row.code)
                } else {
                    conflicting.append(UInt64(row.sequence))
                }
            }
            pendingCount += requeued.count
            quarantinedCount -= requeued.count
            forgetQuarantined(codes: requeued)
            return QuarantineStep(
                outcome: RequeueOutcome(requeued: requeued.count, conflicting: conflicting, notFound: notFound), next: next)
        }
    }

    /// Deletes the readings of one chunk for good and counts them, in one transaction (see
    /// ``ReadingBuffer/dropQuarantined(_:)``).
    func dropQuarantined(_ chunk: QuarantineChunk) throws -> QuarantineStep<DropOutcome> {
        try write {
            let (found, notFound, next) = try resolve(chunk)
            let delete = try connection.prepare("DELETE FROM quarantine WHERE sequence = ?")
            var dropped: [String] = []
            for row in found {
                try delete.run([.integer(row.sequence)])
                if connection.changes == 1 { dropped.append(row.code) }
            }
            if !dropped.isEmpty {
                quarantinedCount -= dropped.count
                quarantineDropped += Int64(dropped.count)
                try setCounter(BufferSchema.counterQuarantineDropped, quarantineDropped)
                forgetQuarantined(codes: dropped)
                try persistLastSequenceIfUncovered()
            }
            return QuarantineStep(outcome: DropOutcome(dropped: dropped.count, notFound: notFound), next: next)
        }
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

    static func describe(_ selection: QuarantineSelection) -> String {
        switch selection {
        case .all: "all"
        case .code(let code): "code \(code)"
        case .sequences(let sequences): "\(sequences.count) sequence number(s)"
        }
    }
}
