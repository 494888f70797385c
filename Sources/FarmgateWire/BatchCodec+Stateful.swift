/// Format version 4: the stateful frame, for a sender that keeps talking to the same ingest (see ``WireSession``).
///
/// A live site sends a few readings per sensor per request; in a version 2 frame the sensor table and each sensor's
/// first timestamp and reference value then cost more than the readings. A version 4 frame leaves out what the ingest
/// already holds for the device: the sensor table (named by its ``SensorTable/hash``, stored by the ingest the first time
/// a frame declares it) and, per sensor, the newest reading the ingest stored (its `latest`, greatest (timestamp,
/// sequence)), from which the first timestamp (one period after it) and the reference value are predicted. Both are
/// derived from the store, so any instance of the ingest answers the same.
///
/// The sender states what it assumed and the ingest checks before decoding: a table it does not hold is answered 409
/// `unknown_sensor_table`, a context that differs from its own (by a 32-bit checksum over every context reading used)
/// 409 `stale_context`; the sender then declares the table again or sends without context. A reading is never decoded
/// against a state the sender did not assume.
///
/// ```
/// "FGB"  version=4  flags   as in version 2
/// body   events section    as in version 3 (E, then E length-prefixed JSON events)
///        state byte        bit 0: the table follows inline (declared), else its hash; bit 1: a context is used;
///                          bit 2 (with bit 1): only the sensors of the bitmap below have a context reading
///        table             the SensorTable encoding, or its hash (8 bytes, little-endian)
///        context           checksum (4 bytes, little-endian); with bit 2: bitmap length (uvarint, ⌈S/8⌉) and the bitmap
///                          (bit i of byte i/8: table sensor i)
///        header            reading count N; base sequence (with a context: signed, minus one more than the context's
///                          greatest sequence), base timestamp (signed µs; with a context, minus its greatest timestamp),
///                          timestamp unit u, layout byte, anchor lag L
///        streams           as version 2 from the flag runs on, for every sensor of the table in table order (a sensor
///                          without readings has count 0). With a context reading c (timestamp t_c, value v_c in steps),
///                          a sensor's first timestamp is predicted as (t_c − base) / u (signed, truncated) plus its
///                          period (or, with one reading, the period of the last sensor before it that has two or more),
///                          and its reference value as v_c instead of the previous sensor's
/// ```
/// The context checksum is FNV-1a 64, folded to 32 bits, of: for each table sensor i with a context reading, in table
/// order, i, t_c (µs), v_c (steps at the table's resolution) and the reading's sequence, as varints (signed zigzag).
extension BatchCodec {
    /// The format version of stateful frames.
    public static let statefulFormatVersion: UInt8 = 4

    static let stateTableInline: UInt8 = 1
    static let stateContext: UInt8 = 2
    static let stateContextBitmap: UInt8 = 4

    /// Encodes `batch`'s readings (every one of a sensor of `table`; `batch.sensors` is not used) as a version 4 frame.
    /// - Parameters:
    ///   - declare: carry the table inline (the ingest does not hold it yet) instead of its hash.
    ///   - context: per sensor, the newest reading the ingest is believed to hold; entries for sensors outside the table,
    ///     or whose value cannot be quantized at the table's resolution, are not used.
    /// - Returns: the frame, and whether a context was used.
    static func encodeStateful(
        _ batch: Batch, table: SensorTable, declare: Bool, context: [SensorID: ContextReading], calibrations: [CalibrationEvent],
        compressionLevel: Int32
    ) throws(BatchEncodingError) -> (bytes: [UInt8], usedContext: Bool) {
        for reading in batch.readings where table.position(of: reading.sensor) == nil {
            throw BatchEncodingError("reading \(reading.sequence) names sensor '\(reading.sensor)', which is not in the sensor table")
        }
        let used = table.sensors.map { descriptor in context[descriptor.id].flatMap { ContextEntry($0, resolution: descriptor.resolution) } }
        let usedCount = used.reduce(0) { $0 + ($1 == nil ? 0 : 1) }

        var state = ByteWriter()
        try writeEvents(calibrations, to: &state)
        var flags: UInt8 = declare ? stateTableInline : 0
        if usedCount > 0 { flags |= stateContext }
        if usedCount > 0 && usedCount < used.count { flags |= stateContextBitmap }
        state.byte(flags)
        if declare {
            state.bytes(table.encoded)
        } else {
            state.bytes(littleEndian: table.hash, count: 8)
        }
        if usedCount > 0 {
            state.bytes(littleEndian: UInt64(contextChecksum(used)), count: 4)
            if usedCount < used.count {
                let bitmap = contextBitmap(used.map { $0 != nil })
                state.uvarint(bitmap.count)
                state.bytes(bitmap)
            }
        }
        let predictions = usedCount > 0 ? statefulPredictions(used) : StatefulPredictions(context: used.map { _ in nil }, newest: nil)
        let streams = try encodeStreams(Batch(device: batch.device, sensors: table.sensors, readings: batch.readings), stateful: predictions)
        let body = compressBody(streams: [("state", state.bytes)] + streams, level: compressionLevel)
        return (magic + [statefulFormatVersion, flagZstd | (body.magicless ? flagMagicless : 0)] + body.bytes, usedCount > 0)
    }

    /// Reads the part of a version 4 frame that says what it assumes, without the table: the ingest looks the table and
    /// the context up, then calls ``decodeStateful(_:table:context:device:limits:)``.
    /// - Throws: ``BatchDecodingError`` (a frame of another version is `.unsupportedVersion`).
    public static func decodeStatefulHead(_ bytes: [UInt8], limits: BatchLimits = .default) throws(BatchDecodingError) -> StatefulFrameHead {
        let (_, body) = try self.body(of: bytes, versions: [statefulFormatVersion], limits: limits)
        var reader = ByteReader(body)
        let calibrations = try readEvents(&reader)
        let flags = try reader.byte("state byte")
        guard flags & ~(stateTableInline | stateContext | stateContextBitmap) == 0,
            flags & stateContextBitmap == 0 || flags & stateContext != 0
        else {
            throw BatchDecodingError("unknown state bits 0x\(String(flags, radix: 16))")
        }
        var declared: SensorTable?
        let hash: UInt64
        if flags & stateTableInline != 0 {
            let table = try SensorTable.read(&reader, limits: limits)
            declared = table
            hash = table.hash
        } else {
            hash = try reader.littleEndian(count: 8, "sensor table hash")
        }
        var checksum: UInt32?
        var bitmap: [UInt8]?
        if flags & stateContext != 0 {
            checksum = UInt32(truncatingIfNeeded: try reader.littleEndian(count: 4, "context checksum"))
            if flags & stateContextBitmap != 0 {
                let length = try reader.count("context bitmap length", limit: (SensorTable.maxSensors + 7) / 8)
                bitmap = Array(try reader.bytes(count: length, "context bitmap"))
            }
        }
        return StatefulFrameHead(
            calibrations: calibrations, tableHash: hash, declaredTable: declared, contextChecksum: checksum, contextBitmap: bitmap,
            rest: reader.rest)
    }

    /// Decodes the readings of a version 4 frame against the device's `table` (the declared one, or the one its hash
    /// names) and the ingest's `context` (per sensor, the newest stored reading).
    /// - Throws: ``BatchDecodingError``; check ``StatefulFrameHead/contextMatches(table:context:)`` first, because a
    ///   context that differs from the sender's is `.malformed` here.
    public static func decodeStateful(
        _ head: StatefulFrameHead, table: SensorTable, context: [SensorID: ContextReading], device: DeviceID, limits: BatchLimits = .default
    ) throws(BatchDecodingError) -> BatchFrame {
        guard table.hash == head.tableHash else {
            throw BatchDecodingError("the frame names sensor table \(head.tableHash.hex) but was given table \(table.hash.hex)")
        }
        guard let predictions = head.predictions(table: table, context: context) else {
            throw BatchDecodingError("the frame was encoded against a context this ingest does not hold (stale_context)")
        }
        var reader = ByteReader(head.rest)
        let declaredTotal = try reader.uvarint("reading count")
        guard declaredTotal <= UInt64(max(limits.maxReadings, 0)) else {
            throw BatchDecodingError("reading count is \(declaredTotal), more than the limit of \(limits.maxReadings)", kind: .tooManyReadings)
        }
        let total = Int(declaredTotal)
        guard total <= reader.remaining else {
            throw BatchDecodingError("the frame declares \(total) readings but only \(reader.remaining) bytes remain", kind: .truncated)
        }
        let baseSequence: UInt64
        let baseTimestamp: Int64
        if let newest = predictions.newest {
            baseSequence = newest.sequence &+ 1 &+ UInt64(bitPattern: try reader.svarint("base sequence"))
            baseTimestamp = newest.timestamp &+ (try reader.svarint("base timestamp"))
        } else {
            baseSequence = try reader.uvarint("base sequence")
            baseTimestamp = try reader.svarint("base timestamp")
        }
        let unit = try reader.uvarint("timestamp unit")
        guard unit > 0 else { throw BatchDecodingError("the timestamp unit is 0") }
        let layout = try reader.byte("layout")
        guard layout & ~layoutSequencesExact == 0 else {
            throw BatchDecodingError("unknown layout bits 0x\(String(layout, radix: 16))")
        }
        let anchorLag = try reader.count("anchor lag", limit: table.sensors.count)
        let readings = try decodeColumns(
            &reader, descriptors: table.sensors, total: total,
            header: BodyHeader(
                baseSequence: baseSequence, baseTimestamp: baseTimestamp, unit: unit, sequencesExact: layout & layoutSequencesExact != 0,
                anchorLag: anchorLag),
            stateful: predictions, limits: limits)
        // Only the sensors that have readings: the batch a version 2 frame of the same readings would decode to.
        let present = Set(readings.map(\.sensor))
        return BatchFrame(
            version: statefulFormatVersion,
            batch: Batch(device: device, sensors: table.sensors.filter { present.contains($0.id) }.sorted { $0.id < $1.id }, readings: readings),
            calibrations: head.calibrations)
    }

    /// The checksum of the context readings used, in table order (see the format above).
    static func contextChecksum(_ used: [ContextEntry?]) -> UInt32 {
        var writer = ByteWriter()
        for (index, entry) in used.enumerated() {
            guard let entry else { continue }
            writer.uvarint(index)
            writer.svarint(entry.timestamp)
            writer.svarint(entry.steps)
            writer.uvarint(entry.sequence)
        }
        let hash = fnv1a64(writer.bytes)
        return UInt32(truncatingIfNeeded: hash ^ (hash >> 32))
    }

    static func contextBitmap(_ flags: [Bool]) -> [UInt8] {
        var bitmap = [UInt8](repeating: 0, count: (flags.count + 7) / 8)
        for (index, flag) in flags.enumerated() where flag { bitmap[index / 8] |= 1 << UInt8(index % 8) }
        return bitmap
    }

    static func statefulPredictions(_ used: [ContextEntry?]) -> StatefulPredictions {
        var newest: (sequence: UInt64, timestamp: Int64)?
        for entry in used {
            guard let entry else { continue }
            newest = (max(newest?.sequence ?? 0, entry.sequence), max(newest?.timestamp ?? Int64.min, entry.timestamp))
        }
        return StatefulPredictions(context: used.map { $0.map { ($0.timestamp, $0.steps) } }, newest: newest)
    }
}

/// The newest reading of one sensor that a sender believes the ingest stored, or that the ingest did store: what a
/// version 4 frame predicts from (see ``BatchCodec``).
public struct ContextReading: Hashable, Sendable {
    public var sequence: UInt64
    public var timestamp: Timestamp
    public var value: Double

    public init(sequence: UInt64, timestamp: Timestamp, value: Double) {
        self.sequence = sequence
        self.timestamp = timestamp
        self.value = value
    }

    /// Whether this reading is newer than `other` by the stores' rule for `latest`: greater (timestamp, sequence).
    public func isNewer(than other: ContextReading) -> Bool {
        (timestamp.microseconds, sequence) > (other.timestamp.microseconds, other.sequence)
    }
}

/// A context reading as the codec predicts with it: the value in steps of the table's resolution.
struct ContextEntry {
    var sequence: UInt64
    var timestamp: Int64
    var steps: Int64

    init?(_ reading: ContextReading, resolution: Resolution) {
        guard let steps = resolution.quantize(reading.value) else { return nil }
        self.sequence = reading.sequence
        self.timestamp = reading.timestamp.microseconds
        self.steps = steps
    }
}

/// What a version 4 frame assumes, read before its table and context are looked up (``BatchCodec/decodeStatefulHead(_:limits:)``).
public struct StatefulFrameHead: Sendable {
    /// The calibration events the frame carries.
    public let calibrations: [CalibrationEvent]
    /// The sensor table the frame is encoded against.
    public let tableHash: UInt64
    /// The table, when the frame declares it (the ingest stores it for later frames); nil when only its hash is sent.
    public let declaredTable: SensorTable?
    /// The checksum of the context readings the sender used; nil when it used none.
    public let contextChecksum: UInt32?
    /// Which table sensors have a context reading; nil: all of them (or none, without a checksum).
    let contextBitmap: [UInt8]?
    /// The header and streams.
    let rest: [UInt8]

    /// Whether the frame uses a context at all (the ingest then needs the device's newest readings).
    public var usesContext: Bool { contextChecksum != nil }

    /// Whether `context` (the ingest's newest reading per sensor of the device) is the one the sender assumed.
    public func contextMatches(table: SensorTable, context: [SensorID: ContextReading]) -> Bool {
        predictions(table: table, context: context) != nil
    }

    /// The predictions the frame was encoded with, from `context`; nil when `context` does not give the same ones.
    func predictions(table: SensorTable, context: [SensorID: ContextReading]) -> StatefulPredictions? {
        guard let checksum = contextChecksum else {
            return StatefulPredictions(context: table.sensors.map { _ in nil }, newest: nil)
        }
        if let contextBitmap, contextBitmap.count != (table.sensors.count + 7) / 8 { return nil }
        var used: [ContextEntry?] = []
        used.reserveCapacity(table.sensors.count)
        for (index, descriptor) in table.sensors.enumerated() {
            let wanted = contextBitmap.map { $0[index / 8] & (1 << UInt8(index % 8)) != 0 } ?? true
            guard wanted else {
                used.append(nil)
                continue
            }
            guard let reading = context[descriptor.id], let entry = ContextEntry(reading, resolution: descriptor.resolution) else { return nil }
            used.append(entry)
        }
        guard used.contains(where: { $0 != nil }), BatchCodec.contextChecksum(used) == checksum else { return nil }
        return BatchCodec.statefulPredictions(used)
    }
}

extension ByteWriter {
    /// `count` bytes of `value`, least significant first.
    mutating func bytes(littleEndian value: UInt64, count: Int) {
        for shift in 0..<count { byte(UInt8(truncatingIfNeeded: value >> UInt64(8 * shift))) }
    }
}

extension ByteReader {
    /// `count` (≤ 8) bytes as a little-endian number.
    mutating func littleEndian(count: Int, _ what: @autoclosure () -> String) throws(BatchDecodingError) -> UInt64 {
        let bytes = try self.bytes(count: count, what())
        var value: UInt64 = 0
        for (shift, byte) in bytes.enumerated() { value |= UInt64(byte) << UInt64(8 * shift) }
        return value
    }
}

extension UInt64 {
    /// 16 hexadecimal digits.
    var hex: String {
        let digits = String(self, radix: 16)
        return String(repeating: "0", count: Swift.max(0, 16 - digits.count)) + digits
    }
}
