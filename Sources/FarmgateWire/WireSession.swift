/// The sender's side of stateful frames (format version 4, see ``BatchCodec``): what it believes the ingest holds for
/// its device, and the frames that follow from it.
///
/// - The first frame with a table declares it inline; once a frame declaring it is acknowledged (any 2xx: the ingest
///   stores a declared table before it answers), later frames send its hash only.
/// - Each acknowledged reading (stored now or a duplicate: either way the ingest holds it) updates the context, the
///   newest reading per sensor by (timestamp, sequence), the rule of the ingest's `latest`. The next frame predicts from it.
/// - A 409 `unknown_sensor_table` (the ingest lost the table, or another deployment answers) makes the next frame declare
///   the table again; a 409 `stale_context` (the ingest holds other newest readings than this session believes:
///   readings stored by another path, a restored backup) makes it adopt the ingest's context the answer carries.
///   Either way the same readings go again at once (``refused(code:)`` says so), and no reading is ever decoded against a
///   state the sender did not assume: the ingest checks the table hash and the context checksum before decoding.
/// - An answer that never came (``answerLost(_:)``) makes the sensors of that frame go without context until the next
///   acknowledgement, so that a lost answer costs no 409.
///
/// Memory: one context reading per sensor. Nothing is persisted: after a restart the first frame declares the table and
/// uses no context.
public struct WireSession: Sendable {
    /// The hashes of tables the ingest acknowledged.
    public private(set) var knownTables: Set<UInt64> = []
    /// Per sensor, the newest reading acknowledged by the ingest.
    public private(set) var context: [SensorID: ContextReading] = [:]

    public init() {}

    /// Encodes `batch`'s readings against `table` as a version 4 frame: the table inline unless the ingest acknowledged
    /// it, the context where this session has one.
    /// - Throws: ``BatchEncodingError`` for what ``BatchCodec/encode(_:compressionLevel:)`` refuses, or a reading of a
    ///   sensor outside `table`.
    public func encode(
        _ batch: Batch, table: SensorTable, calibrations: [CalibrationEvent] = [], compressionLevel: Int32 = 19
    ) throws(BatchEncodingError) -> StatefulFrame {
        let declare = !knownTables.contains(table.hash)
        let (bytes, usedContext) = try BatchCodec.encodeStateful(
            batch, table: table, declare: declare, context: context, calibrations: calibrations, compressionLevel: compressionLevel)
        return StatefulFrame(bytes: bytes, tableHash: table.hash, declaredTable: declare, usedContext: usedContext)
    }

    /// After a 2xx answer to `frame`: the table is known, and `acknowledged` (the readings the receipt did not reject)
    /// update the context.
    public mutating func delivered(_ frame: StatefulFrame, acknowledged: some Sequence<Reading>) {
        knownTables.insert(frame.tableHash)
        for reading in acknowledged {
            let candidate = ContextReading(sequence: reading.sequence, timestamp: reading.timestamp, value: reading.value)
            if let current = context[reading.sensor], !candidate.isNewer(than: current) { continue }
            context[reading.sensor] = candidate
        }
    }

    /// After a refusal with `code`: forgets the state it names. Returns true when the code is one of the stateful codes,
    /// meaning the same readings should go again at once (with the table declared, or against the new context).
    /// - Parameter ingestContext: with `stale_context`, the ingest's newest readings (``APIErrorBody/Detail/context``):
    ///   the session adopts them, so that the next frame predicts from what the ingest holds (readings this session never
    ///   saw acknowledged, such as those of an earlier run, would otherwise keep the contexts apart). Without them, the
    ///   next frames use no context until an acknowledgement.
    public mutating func refused(code: String, ingestContext: [ContextEntryJSON]? = nil) -> Bool {
        switch code {
        case IngestErrorCode.unknownSensorTable:
            knownTables.removeAll()
            return true
        case IngestErrorCode.staleContext:
            context.removeAll()
            for entry in ingestContext ?? [] {
                if let (sensor, reading) = entry.reading { context[sensor] = reading }
            }
            return true
        default:
            return false
        }
    }

    /// After a request that may have reached the ingest but whose answer never came (a timeout or a connection lost
    /// after sending): the ingest holds either the context before `frame` or the one after it, and this session cannot
    /// tell which. Predicting from either would cost a 409 `stale_context` (and the ingest's whole context in its answer)
    /// whenever the guess was wrong, so the sensors `frame` carried readings of get no context reading until the next
    /// acknowledgement; the other sensors' newest readings did not change either way and stay. A table the frame declared
    /// is not known yet (it was never acknowledged), so the next frame declares it again.
    public mutating func answerLost(_ readings: some Sequence<Reading>) {
        for reading in readings { context[reading.sensor] = nil }
    }

    /// Forgets everything (the ingest changed, or the agent fell back to another format).
    public mutating func reset() {
        knownTables.removeAll()
        context.removeAll()
    }
}

/// One encoded stateful frame and what it assumed.
public struct StatefulFrame: Sendable, Hashable {
    public var bytes: [UInt8]
    public var tableHash: UInt64
    /// Whether the frame carries its table (else only the hash).
    public var declaredTable: Bool
    /// Whether the frame predicts from a context.
    public var usedContext: Bool
}
