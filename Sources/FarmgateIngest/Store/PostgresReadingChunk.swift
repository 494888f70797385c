/// One row of the PostgreSQL `readings` table: readings of one sensor from one UTC day, stored as arrays.
///
/// ``PostgresSchema`` explains why (28 bytes of tuple header and line pointer per row, and two index entries, are paid
/// once per chunk instead of once per reading). The limits below bound what a reader must look at: a chunk's sequences
/// span at most ``maximumSequenceSpan`` and its timestamps at most ``maximumTimeSpan``, so the chunks that can hold a
/// sequence `s` all start in `[s - maximumSequenceSpan, s]`, and those that can hold a time `t` in
/// `[t - maximumTimeSpan, t]`: every lookup is a bounded range scan of one index.
struct PostgresReadingChunk: Sendable, Hashable {
    /// The most a chunk's last sequence may exceed its first (its offsets fit `int4`, and duplicate lookups scan this far back).
    static let maximumSequenceSpan: Int64 = 4_095
    /// The most a chunk's last timestamp may exceed its first, in microseconds (30 minutes; offsets fit `int4`, and a
    /// day is a whole number of such spans).
    static let maximumTimeSpan: Int64 = 1_800_000_000
    /// The most readings in one chunk (a chunk is read whole: a range query at its edge decodes this many at most).
    static let maximumCount = 1_024
    static let microsecondsPerDay: Int64 = 86_400_000_000

    /// One reading inside a chunk.
    struct Entry: Sendable, Hashable {
        var sequence: Int64
        var timestamp: Int64
        var value: Double
        var flags: Int16
    }

    var deviceRow: Int64
    var sensorRow: Int64
    /// Ordered by sequence, each sequence once.
    var entries: [Entry]

    var firstSequence: Int64 { entries.first?.sequence ?? 0 }
    var lastSequence: Int64 { entries.last?.sequence ?? 0 }
    var firstTimestamp: Int64 { entries.map(\.timestamp).min() ?? 0 }
    var lastTimestamp: Int64 { entries.map(\.timestamp).max() ?? 0 }

    /// `sequence - first_sequence` for each entry (`int4[]`).
    var sequenceOffsets: [Int32] {
        let first = firstSequence
        return entries.map { Int32(truncatingIfNeeded: $0.sequence - first) }
    }

    /// `timestamp - first_ts` for each entry (`int4[]`).
    var timeOffsets: [Int32] {
        let first = firstTimestamp
        return entries.map { Int32(truncatingIfNeeded: $0.timestamp - first) }
    }

    var values: [Double] { entries.map(\.value) }

    /// The flags, or nil when every one is zero (most readings: the column is then NULL and costs nothing).
    var flags: [Int16]? { entries.contains { $0.flags != 0 } ? entries.map(\.flags) : nil }

    /// The UTC day (days since 1970-01-01) of a timestamp in microseconds; negative times round down.
    static func day(of microseconds: Int64) -> Int64 {
        let (quotient, remainder) = microseconds.quotientAndRemainder(dividingBy: microsecondsPerDay)
        return remainder < 0 ? quotient - 1 : quotient
    }

    /// Cuts the readings of one sensor of one device into chunks: never across a UTC day (a chunk lives in one day's
    /// partition, so that retention can drop whole days), never wider than the spans above, never more than
    /// ``maximumCount`` readings. `entries` may come in any order and must not repeat a sequence.
    static func cut(deviceRow: Int64, sensorRow: Int64, entries: [Entry]) -> [PostgresReadingChunk] {
        var byDay: [Int64: [Entry]] = [:]
        for entry in entries { byDay[day(of: entry.timestamp), default: []].append(entry) }
        var chunks: [PostgresReadingChunk] = []
        for day in byDay.keys.sorted() {
            guard let sorted = byDay[day]?.sorted(by: { $0.sequence < $1.sequence }) else { continue }
            var current: [Entry] = []
            var low = Int64.max
            var high = Int64.min
            for entry in sorted {
                if let first = current.first {
                    let fits =
                        current.count < maximumCount && entry.sequence - first.sequence <= maximumSequenceSpan
                        && max(high, entry.timestamp) - min(low, entry.timestamp) <= maximumTimeSpan
                    if !fits {
                        chunks.append(PostgresReadingChunk(deviceRow: deviceRow, sensorRow: sensorRow, entries: current))
                        current = []
                        low = .max
                        high = .min
                    }
                }
                current.append(entry)
                low = min(low, entry.timestamp)
                high = max(high, entry.timestamp)
            }
            if !current.isEmpty { chunks.append(PostgresReadingChunk(deviceRow: deviceRow, sensorRow: sensorRow, entries: current)) }
        }
        return chunks
    }

    /// Rebuilds a chunk's entries from its stored columns.
    ///
    /// - Throws: ``IngestStoreError/corrupt(_:)`` when the arrays do not have one element per reading.
    static func entries(
        firstSequence: Int64, firstTimestamp: Int64, sequenceOffsets: [Int32], timeOffsets: [Int32], values: [Double], flags: [Int16]?
    ) throws -> [Entry] {
        guard sequenceOffsets.count == values.count, timeOffsets.count == values.count, flags.map({ $0.count == values.count }) ?? true else {
            throw IngestStoreError.corrupt(
                "a readings chunk starting at sequence \(firstSequence) has arrays of different lengths (\(sequenceOffsets.count), \(timeOffsets.count), \(values.count))")
        }
        return values.indices.map { index in
            Entry(
                sequence: firstSequence + Int64(sequenceOffsets[index]), timestamp: firstTimestamp + Int64(timeOffsets[index]),
                value: values[index], flags: flags?[index] ?? 0)
        }
    }
}

/// How many chunks a paged read (a range of one sensor, an export page of one device) asks for next: a few at first,
/// then as many as the readings still wanted need at the chunk size seen so far (a quarter more), so that a read of 10
/// readings over full chunks decodes tens of thousands of readings rather than a million, and one over small chunks
/// still takes two or three round trips. Never more than `max(64, limit / 8)` at once.
struct ChunkPaging: Sendable, Hashable {
    let limit: Int
    /// The chunks the next page asks for.
    private(set) var size: Int
    private var chunks = 0
    private var readings = 0

    init(limit: Int) {
        self.limit = limit
        size = min(64, max(8, limit / 8))
    }

    private var ceiling: Int { max(64, limit / 8) }

    /// After a page of `chunks` chunks holding `readings` readings, when `known` of the readings wanted are certain.
    mutating func read(chunks pageChunks: Int, readings pageReadings: Int, known: Int) {
        chunks += pageChunks
        readings += pageReadings
        let perChunk = max(1, readings / max(1, chunks))
        let wanted = (max(0, limit - known) + perChunk - 1) / perChunk
        size = min(ceiling, max(8, wanted + wanted / 4))
    }
}
