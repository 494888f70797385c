/// A JSON batch as decoded: the readings that could be represented, and those that could not, one by one.
public struct DecodedJSONBatch: Hashable, Sendable {
    /// The device, its sensors and every reading that could be represented.
    public var batch: Batch
    /// Readings refused one by one (`unknown_sensor`, `invalid_reading`), with their sequence (nil when missing or invalid).
    public var rejected: [RejectedReading]
    /// The calibration events of the `calibrations` member (empty when absent).
    public var calibrations: [CalibrationEvent]

    public init(batch: Batch, rejected: [RejectedReading], calibrations: [CalibrationEvent] = []) {
        self.batch = batch
        self.rejected = rejected
        self.calibrations = calibrations
    }
}

/// The JSON form of a batch (media type ``IngestProtocol/jsonBatchMediaType``), for third-party devices and curl.
///
/// ```json
/// {"device": "greenhouse-2",
///  "sensors": [{"id": "tank1.ph", "quantity": "ph", "resolution": "0.01"}],
///  "readings": [{"sensor": "tank1.ph", "seq": 1, "ts": "2026-11-23T10:00:00.123Z", "value": 6.02,
///                "flags": ["clock_unsynchronized"]}]}
/// ```
/// - `resolution` is optional (the quantity's default) and may be `"0.01"`, `"1/16"` or a number.
/// - `ts` is an RFC 3339 string or an integer of microseconds since 1970 (UTC).
/// - `value` is a number or one of the strings `"NaN"`, `"Infinity"`, `"-Infinity"` (decoded as such, for the ingest
///   to reject that reading by itself).
/// - `flags` is optional: names from ``QualityFlags/names``.
/// - `calibrations` is optional: calibration events, each exactly the JSON that format version 3 carries in its events
///   section (``CalibrationEvent``), under the same limits (at most ``BatchCodec/maxEvents`` events of at most
///   ``BatchCodec/maxEventBytes`` bytes of JSON text each). An ingest that does not keep calibrations skips the member and
///   its receipt has no `calibrations` count, so a sender keeps the events.
public enum BatchJSON {
    /// The JSON text of `batch`: values at each sensor's resolution, timestamps as RFC 3339 with microseconds (integer
    /// microseconds for years RFC 3339 cannot write), resolutions as a decimal step or `n/d`. Flags outside
    /// ``QualityFlags/names`` have no name and are left out.
    public static func encode(_ batch: Batch) -> [UInt8] {
        encodeDocument(batch, events: [])
    }

    /// The JSON text of `batch` with a `calibrations` member holding `calibrations` (left out when there are none).
    /// - Throws: ``BatchEncodingError`` for what the binary form refuses too: more than ``BatchCodec/maxEvents`` events,
    ///   an invalid id, an event that cannot be encoded or is larger than ``BatchCodec/maxEventBytes``.
    public static func encode(_ batch: Batch, calibrations: [CalibrationEvent]) throws(BatchEncodingError) -> [UInt8] {
        encodeDocument(batch, events: try BatchCodec.encodeEvents(calibrations))
    }

    private static func encodeDocument(_ batch: Batch, events: [[UInt8]]) -> [UInt8] {
        var w = JSONWriter()
        w.raw("{\"device\":")
        w.string(batch.device.rawValue)
        w.raw(",\"sensors\":[")
        var resolutions: [SensorID: Resolution] = [:]
        for (index, sensor) in batch.sensors.enumerated() {
            resolutions[sensor.id] = resolutions[sensor.id] ?? sensor.resolution
            if index > 0 { w.raw(",") }
            w.raw("{\"id\":")
            w.string(sensor.id.rawValue)
            w.raw(",\"quantity\":")
            w.string(sensor.quantity.rawValue)
            w.raw(",\"resolution\":")
            w.string(text(of: sensor.resolution))
            w.raw("}")
        }
        w.raw("],\"readings\":[")
        for (index, reading) in batch.readings.enumerated() {
            if index > 0 { w.raw(",") }
            w.raw("{\"sensor\":")
            w.string(reading.sensor.rawValue)
            w.raw(",\"seq\":\(reading.sequence),\"ts\":")
            // RFC 3339 writes years 0001 to 9999 only (and RFC3339.format traps far outside them): integers elsewhere.
            if rfc3339Range.contains(reading.timestamp.microseconds) {
                w.timestamp(reading.timestamp)
            } else {
                w.raw(String(reading.timestamp.microseconds))
            }
            w.raw(",\"value\":")
            var value = reading.value
            if let resolution = resolutions[reading.sensor], let steps = resolution.quantize(value) {
                value = resolution.value(ofSteps: steps)
            }
            if value.isNaN {
                w.string("NaN")
            } else if value.isInfinite {
                w.string(value < 0 ? "-Infinity" : "Infinity")
            } else {
                w.raw(value.description)
            }
            let names = QualityFlags.names.filter { reading.quality.contains($0.0) }.map(\.1)
            if !names.isEmpty {
                w.raw(",\"flags\":[")
                for (k, name) in names.enumerated() {
                    if k > 0 { w.raw(",") }
                    w.string(name)
                }
                w.raw("]")
            }
            w.raw("}")
        }
        w.raw("]")
        if !events.isEmpty {
            w.raw(",\"calibrations\":[")
            for (index, event) in events.enumerated() {
                if index > 0 { w.raw(",") }
                w.bytes.append(contentsOf: event)
            }
            w.raw("]")
        }
        w.raw("}")
        return w.bytes
    }

    /// 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z in microseconds.
    static let rfc3339Range: ClosedRange<Int64> = -62_135_596_800_000_000...253_402_300_799_999_999

    /// A resolution as a decimal step when that parses back to the same fraction, else `n/d`.
    static func text(of resolution: Resolution) -> String {
        var denominator = resolution.denominator
        var places = 0
        while denominator % 10 == 0 {
            denominator /= 10
            places += 1
        }
        if denominator == 1 {
            let n = String(resolution.numerator)
            let decimal: String
            if places == 0 {
                decimal = n
            } else if n.count > places {
                decimal = String(n.dropLast(places)) + "." + String(n.suffix(places))
            } else {
                decimal = "0." + String(repeating: "0", count: places - n.count) + n
            }
            if let parsed = try? Resolution(parsing: decimal), parsed == resolution { return decimal }
        }
        return "\(resolution.numerator)/\(resolution.denominator)"
    }

    /// Decodes a JSON batch, in one pass over the text and without building it as a tree: members it does not know are
    /// skipped (their grammar checked, nothing of them kept), readings are counted as they are read and the decoder stops
    /// at the limit, so memory stays bounded by the readings it keeps whatever the document holds.
    ///
    /// - Throws: ``BatchDecodingError`` naming the path of a structural problem: not JSON (``BatchDecodingError/Kind/truncated``
    ///   when the text ends early), larger than `limits.maxDecompressedBytes`, not an object, a member that appears
    ///   twice in one object, a missing or invalid device, an invalid or duplicated sensor entry, more sensors or readings
    ///   than the limits allow (``BatchDecodingError/Kind/tooManyReadings``), a string or number too long to be a name,
    ///   an id, a timestamp or a value.
    /// - Returns: the batch, and the readings that cannot be represented (a sensor not declared in `sensors`:
    ///   `unknown_sensor`; a missing or invalid `seq`: `invalid_sequence`; a missing or invalid `ts`, `value` or `flags`:
    ///   `invalid_reading`), so that the rest of the batch can still be taken.
    public static func decode(_ bytes: [UInt8], limits: BatchLimits = .default) throws(BatchDecodingError) -> DecodedJSONBatch {
        guard bytes.count <= limits.maxDecompressedBytes else {
            throw BatchDecodingError(
                "the JSON document is \(bytes.count) bytes, more than the limit of \(limits.maxDecompressedBytes)", kind: .tooLarge)
        }
        var reader = JSONReader(bytes)
        let documentKind = try reader.nextKind()
        guard documentKind == .object else {
            try reader.skipValue(depth: 0)
            try reader.end()
            throw BatchDecodingError("the document is \(documentKind.name), not an object")
        }

        var deviceValue: JSONScalar?
        var sensors: [SensorDescriptor] = []
        var declared: [SensorID: Resolution]?
        var readings: [Reading] = []
        var rejected: [RejectedReading] = []
        // Readings that come before "sensors" in the document wait here until the sensors are known.
        var waiting: [(index: Int, reading: JSONReading)] = []
        var lastSensorText: String?
        var calibrations: [CalibrationEvent] = []
        // Whether the body has either member that carries data, and the first few members skipped: a misspelt
        // `"reading": […]` was skipped as unknown and the batch answered 200 with nothing stored (a tester, 2026-12-07).
        var carriesData = false
        var skipped: [String] = []

        try reader.object(depth: 0, path: "") { reader, name throws(BatchDecodingError) in
            if name == "readings" || name == "calibrations" { carriesData = true }
            switch name {
            case "device":
                deviceValue = try reader.scalar(depth: 1)
            case "sensors":
                switch try reader.nextKind() {
                case .null:
                    _ = try reader.scalar(depth: 1)
                    declared = [:]
                case .array:
                    var known: [SensorID: Resolution] = [:]
                    try reader.array(depth: 1) { reader, index throws(BatchDecodingError) in
                        guard index < limits.maxSensors else {
                            throw BatchDecodingError("sensors: more than the limit of \(limits.maxSensors) entries")
                        }
                        let descriptor = try sensor(&reader, path: "sensors[\(index)]")
                        guard known.updateValue(descriptor.resolution, forKey: descriptor.id) == nil else {
                            throw BatchDecodingError("sensors[\(index)].id: '\(descriptor.id)' is declared more than once")
                        }
                        sensors.append(descriptor)
                    }
                    declared = known
                case let other:
                    throw BatchDecodingError("sensors: expected an array, found \(other.name)")
                }
                for (index, entry) in waiting {
                    switch reading(entry, path: "readings[\(index)]", declared: declared ?? [:]) {
                    case .success(let reading): readings.append(reading)
                    case .failure(let rejection): rejected.append(rejection)
                    }
                }
                waiting = []
            case "readings":
                switch try reader.nextKind() {
                case .null:
                    _ = try reader.scalar(depth: 1)
                case .array:
                    try reader.array(depth: 1) { reader, index throws(BatchDecodingError) in
                        guard index < limits.maxReadings else {
                            throw BatchDecodingError("readings: more than the limit of \(limits.maxReadings) entries", kind: .tooManyReadings)
                        }
                        var entry = try JSONReading.read(&reader, path: "readings[\(index)]")
                        // Readings of one sensor share one copy of its name (a long one costs its bytes once).
                        if case .string(let text)? = entry.sensor {
                            if let last = lastSensorText, last == text { entry.sensor = .string(last) } else { lastSensorText = text }
                        }
                        if let declared {
                            switch reading(entry, path: "readings[\(index)]", declared: declared) {
                            case .success(let reading): readings.append(reading)
                            case .failure(let rejection): rejected.append(rejection)
                            }
                        } else {
                            waiting.append((index, entry))
                        }
                    }
                case let other:
                    throw BatchDecodingError("readings: expected an array, found \(other.name)")
                }
            case "calibrations":
                switch try reader.nextKind() {
                case .null:
                    _ = try reader.scalar(depth: 1)
                case .array:
                    try reader.array(depth: 1) { reader, index throws(BatchDecodingError) in
                        guard index < BatchCodec.maxEvents else {
                            throw BatchDecodingError("calibrations: more than the limit of \(BatchCodec.maxEvents) events")
                        }
                        // The element's text is checked by the reader (grammar, depth) and then decoded on its own: an
                        // event is small and bounded, so a tree of it costs little.
                        let kind = try reader.nextKind()
                        guard kind == .object else { throw BatchDecodingError("calibrations[\(index)]: expected an object, found \(kind.name)") }
                        let start = reader.index
                        try reader.skipValue(depth: 2)
                        let length = reader.index - start
                        guard length <= BatchCodec.maxEventBytes else {
                            throw BatchDecodingError(
                                "calibrations[\(index)]: the event is \(length) bytes of JSON, more than the limit of \(BatchCodec.maxEventBytes)")
                        }
                        calibrations.append(try BatchCodec.decodeEvent(reader.text(start..<reader.index), what: "calibrations[\(index)]"))
                    }
                case let other:
                    throw BatchDecodingError("calibrations: expected an array, found \(other.name)")
                }
            default:
                if skipped.count < 5 { skipped.append(String(name.prefix(40)).escapingControlCharacters) }
                try reader.skipValue(depth: 1)
            }
        }
        try reader.end()

        guard let deviceValue else { throw BatchDecodingError("device: missing") }
        guard case .string(let deviceText) = deviceValue else {
            throw BatchDecodingError("device: expected a string, found \(deviceValue.kind.name)")
        }
        let device: DeviceID
        do { device = try DeviceID(deviceText) } catch { throw BatchDecodingError("device: \(error.description)") }
        guard carriesData else {
            throw BatchDecodingError(
                "readings: missing; a batch carries its readings in \"readings\" (or calibration events in \"calibrations\")"
                    + (skipped.isEmpty ? "" : ", and this one has only other members besides device and sensors: \(skipped.map { "\"\($0)\"" }.joined(separator: ", "))"))
        }
        // No "sensors" member: every reading names an undeclared sensor.
        for (index, entry) in waiting {
            switch reading(entry, path: "readings[\(index)]", declared: [:]) {
            case .success(let reading): readings.append(reading)
            case .failure(let rejection): rejected.append(rejection)
            }
        }
        return DecodedJSONBatch(batch: Batch(device: device, sensors: sensors, readings: readings), rejected: rejected, calibrations: calibrations)
    }

    private static func sensor(_ reader: inout JSONReader, path: String) throws(BatchDecodingError) -> SensorDescriptor {
        let kind = try reader.nextKind()
        guard kind == .object else { throw BatchDecodingError("\(path): expected an object, found \(kind.name)") }
        var idValue: JSONScalar?
        var quantityValue: JSONScalar?
        var resolutionValue: JSONScalar?
        try reader.object(depth: 2, path: path) { reader, name throws(BatchDecodingError) in
            switch name {
            case "id": idValue = try reader.scalar(depth: 3)
            case "quantity": quantityValue = try reader.scalar(depth: 3)
            case "resolution": resolutionValue = try reader.scalar(depth: 3)
            default: try reader.skipValue(depth: 3)
            }
        }
        guard case .string(let idText)? = idValue else { throw BatchDecodingError("\(path).id: missing or not a string") }
        let id: SensorID
        do { id = try SensorID(idText) } catch { throw BatchDecodingError("\(path).id: \(error.description)") }
        guard case .string(let quantityText)? = quantityValue else {
            throw BatchDecodingError("\(path).quantity: missing or not a string")
        }
        guard let quantity = Quantity(rawValue: quantityText) else {
            let known = Quantity.allCases.map(\.rawValue).joined(separator: ", ")
            throw BatchDecodingError("\(path).quantity: unknown quantity '\(quantityText)' (known: \(known))")
        }
        var resolution: Resolution?
        switch resolutionValue {
        case nil, .null?:
            break
        case .string(let text)?, .number(let text)?:
            do { resolution = try Resolution(parsing: text) } catch {
                throw BatchDecodingError("\(path).resolution: \(error.description)")
            }
        case let other?:
            throw BatchDecodingError("\(path).resolution: expected a string or a number, found \(other.kind.name)")
        }
        return SensorDescriptor(id: id, quantity: quantity, resolution: resolution)
    }

    private static func reading(_ entry: JSONReading, path: String, declared: [SensorID: Resolution]) -> ReadingOutcome {
        var sequence: UInt64?
        if case .number(let text)? = entry.seq, let value = UInt64(text) { sequence = value }
        let sensorText: String
        if case .string(let text)? = entry.sensor { sensorText = text } else { sensorText = "" }
        func reject(_ code: String, _ message: String) -> ReadingOutcome {
            .failure(RejectedReading(sequence: sequence, sensor: sensorText, code: code, message: message))
        }
        if let kind = entry.notAnObject { return reject(RejectionCode.invalidReading, "\(path): expected an object, found \(kind.name)") }
        guard case .string? = entry.sensor else { return reject(RejectionCode.invalidReading, "\(path).sensor: missing or not a string") }
        guard let sensor = try? SensorID(sensorText), declared[sensor] != nil else {
            return reject(RejectionCode.unknownSensor, "\(path).sensor: '\(sensorText)' is not declared in \"sensors\"")
        }
        guard let sequenceValue = sequence else {
            // Sequences are stored as signed 64-bit integers: the range said here is the one the ingest takes.
            let range = "a whole number from 0 to \(Int64.max)"
            switch entry.seq {
            case nil: return reject(RejectionCode.invalidSequence, "\(path).seq: missing; expected \(range)")
            case .number(let text)?:
                return reject(RejectionCode.invalidSequence, "\(path).seq: \(text.prefix(40)) is not \(range)")
            case .string(let text)?:
                return reject(RejectionCode.invalidSequence, "\(path).seq: a string (\"\(text.prefix(40))\"); send the number itself, \(range)")
            case let other?:
                return reject(RejectionCode.invalidSequence, "\(path).seq: found \(other.kind.name); expected \(range)")
            }
        }
        let timestamp: Timestamp
        switch entry.ts {
        case .string(let text)?:
            guard let parsed = RFC3339.parse(text) else {
                return reject(RejectionCode.invalidReading, "\(path).ts: not an RFC 3339 timestamp or integer microseconds")
            }
            timestamp = parsed
        case .number(let text)?:
            guard let micros = Int64(text) else {
                return reject(RejectionCode.invalidReading, "\(path).ts: not an RFC 3339 timestamp or integer microseconds")
            }
            timestamp = Timestamp(microseconds: micros)
        default:
            return reject(RejectionCode.invalidReading, "\(path).ts: missing; expected an RFC 3339 timestamp or integer microseconds")
        }
        let value: Double
        var written: String?
        switch entry.value {
        case .number(let text)?:
            guard let parsed = Double(text) else { return reject(RejectionCode.invalidReading, "\(path).value: not a number") }
            value = parsed
            written = text
        case .string("NaN")?: value = .nan
        case .string("Infinity")?: value = .infinity
        case .string("-Infinity")?: value = -.infinity
        case nil:
            return reject(
                RejectionCode.invalidReading, "\(path).value: missing; expected a number (or \"NaN\", \"Infinity\", \"-Infinity\")")
        case .string(let text)?:
            return reject(
                RejectionCode.invalidReading,
                "\(path).value: a string (\"\(text.prefix(40))\"); send the number itself, or \"NaN\", \"Infinity\" or \"-Infinity\"")
        case let other?:
            return reject(
                RejectionCode.invalidReading, "\(path).value: found \(other.kind.name); expected a number (or \"NaN\", \"Infinity\", \"-Infinity\")")
        }
        var quality: QualityFlags = []
        switch entry.flags {
        case .absent:
            break
        case .notAnArray(let kind):
            return reject(RejectionCode.invalidReading, "\(path).flags: expected an array of names, found \(kind.name)")
        case .names(let names, let more):
            for (k, name) in names.enumerated() {
                guard case .string(let text) = name, let flag = QualityFlags.names.first(where: { $0.1 == text })?.0 else {
                    let known = QualityFlags.names.map(\.1).joined(separator: ", ")
                    return reject(RejectionCode.invalidReading, "\(path).flags[\(k)]: not a known flag (known: \(known))")
                }
                quality.insert(flag)
            }
            if more {
                return reject(
                    RejectionCode.invalidReading, "\(path).flags: more than \(JSONReading.maxFlags) entries; each flag is named once")
            }
        }
        // Values are exact at the declared resolution, as in a binary batch: one written with more decimals than the sensor
        // declares (6.004 at 0.01) is taken on the resolution's grid (6.0), so that what is stored, answered and compared
        // with a re-sent reading is in whole steps. Kept as sent, 6.004 made a re-sent 6.01 a duplicate of it, and the
        // other reading was acknowledged and lost. The number is rounded as written (1.005 is 1.01), not as its double.
        var stepped = value
        if let resolution = declared[sensor], let steps = written.flatMap({ resolution.quantize(decimal: $0) }) ?? resolution.quantize(value) {
            stepped = resolution.value(ofSteps: steps)
        }
        return .success(Reading(sensor: sensor, sequence: sequenceValue, timestamp: timestamp, value: stepped, quality: quality))
    }
}

/// What the decoder keeps of one element of `readings`: the members it knows, as scalars; everything else was skipped.
private struct JSONReading {
    /// The most `flags` entries kept: there are fewer flag names than this, so more can only repeat or be unknown.
    static let maxFlags = 32

    enum Flags {
        case absent
        case notAnArray(JSONKind)
        /// The first ``maxFlags`` entries, and whether more followed.
        case names([JSONScalar], more: Bool)
    }

    /// Set when the element is not an object (then nothing else is).
    var notAnObject: JSONKind?
    var sensor: JSONScalar?
    var seq: JSONScalar?
    var ts: JSONScalar?
    var value: JSONScalar?
    var flags: Flags = .absent

    static func read(_ reader: inout JSONReader, path: @autoclosure () -> String) throws(BatchDecodingError) -> JSONReading {
        var entry = JSONReading()
        let kind = try reader.nextKind()
        guard kind == .object else {
            try reader.skipValue(depth: 2)
            entry.notAnObject = kind
            return entry
        }
        try reader.object(depth: 2, path: path()) { reader, name throws(BatchDecodingError) in
            switch name {
            case "sensor": entry.sensor = try reader.scalar(depth: 3)
            case "seq": entry.seq = try reader.scalar(depth: 3)
            case "ts": entry.ts = try reader.scalar(depth: 3)
            case "value": entry.value = try reader.scalar(depth: 3)
            case "flags":
                switch try reader.nextKind() {
                case .null:
                    _ = try reader.scalar(depth: 3)
                case .array:
                    var names: [JSONScalar] = []
                    var more = false
                    try reader.array(depth: 3) { reader, index throws(BatchDecodingError) in
                        if index < maxFlags { names.append(try reader.scalar(depth: 4)) } else {
                            more = true
                            try reader.skipValue(depth: 4)
                        }
                    }
                    entry.flags = .names(names, more: more)
                case let other:
                    try reader.skipValue(depth: 3)
                    entry.flags = .notAnArray(other)
                }
            default:
                try reader.skipValue(depth: 3)
            }
        }
        return entry
    }
}

/// One JSON reading, taken or refused.
private enum ReadingOutcome {
    case success(Reading)
    case failure(RejectedReading)
}
