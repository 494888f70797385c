/// A JSON batch as decoded: the readings that could be represented, and those that could not, one by one.
public struct DecodedJSONBatch: Hashable, Sendable {
    /// The device, its sensors and every reading that could be represented.
    public var batch: Batch
    /// Readings refused one by one (`unknown_sensor`, `invalid_reading`), with their sequence (nil when missing or invalid).
    public var rejected: [RejectedReading]

    public init(batch: Batch, rejected: [RejectedReading]) {
        self.batch = batch
        self.rejected = rejected
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
public enum BatchJSON {
    /// The JSON text of `batch`: values at each sensor's resolution, timestamps as RFC 3339 with microseconds (integer
    /// microseconds for years RFC 3339 cannot write), resolutions as a decimal step or `n/d`. Flags outside
    /// ``QualityFlags/names`` have no name and are left out.
    public static func encode(_ batch: Batch) -> [UInt8] {
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
                w.string(RFC3339.format(reading.timestamp))
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
        w.raw("]}")
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

    /// Decodes a JSON batch.
    ///
    /// - Throws: ``BatchDecodingError`` naming the path of a structural problem: not JSON, larger than
    ///   `limits.maxDecompressedBytes`, not an object, a missing or invalid device, an invalid or duplicated sensor
    ///   entry, more sensors or readings than the limits allow.
    /// - Returns: the batch, and the readings that cannot be represented (a sensor not declared in `sensors`:
    ///   `unknown_sensor`; a missing or invalid `seq`, `ts`, `value` or `flags`: `invalid_reading`), so that the rest
    ///   of the batch can still be taken.
    public static func decode(_ bytes: [UInt8], limits: BatchLimits = .default) throws(BatchDecodingError) -> DecodedJSONBatch {
        guard bytes.count <= limits.maxDecompressedBytes else {
            throw BatchDecodingError("the JSON document is \(bytes.count) bytes, more than the limit of \(limits.maxDecompressedBytes)")
        }
        let document = try JSONParser.parse(bytes)
        guard case .object = document else { throw BatchDecodingError("the document is \(document.kind), not an object") }

        guard let deviceValue = document["device"] else { throw BatchDecodingError("device: missing") }
        guard case .string(let deviceText) = deviceValue else {
            throw BatchDecodingError("device: expected a string, found \(deviceValue.kind)")
        }
        let device: DeviceID
        do { device = try DeviceID(deviceText) } catch { throw BatchDecodingError("device: \(error.description)") }

        var sensors: [SensorDescriptor] = []
        var declared: [SensorID: Resolution] = [:]
        switch document["sensors"] {
        case nil, .null?:
            break
        case .array(let entries)?:
            guard entries.count <= limits.maxSensors else {
                throw BatchDecodingError("sensors: \(entries.count) entries, more than the limit of \(limits.maxSensors)")
            }
            sensors.reserveCapacity(entries.count)
            for (index, entry) in entries.enumerated() {
                let descriptor = try sensor(entry, path: "sensors[\(index)]")
                guard declared.updateValue(descriptor.resolution, forKey: descriptor.id) == nil else {
                    throw BatchDecodingError("sensors[\(index)].id: '\(descriptor.id)' is declared more than once")
                }
                sensors.append(descriptor)
            }
        case let other?:
            throw BatchDecodingError("sensors: expected an array, found \(other.kind)")
        }

        var readings: [Reading] = []
        var rejected: [RejectedReading] = []
        switch document["readings"] {
        case nil, .null?:
            break
        case .array(let entries)?:
            guard entries.count <= limits.maxReadings else {
                throw BatchDecodingError("readings: \(entries.count) entries, more than the limit of \(limits.maxReadings)")
            }
            readings.reserveCapacity(entries.count)
            for (index, entry) in entries.enumerated() {
                switch reading(entry, path: "readings[\(index)]", declared: declared) {
                case .success(let reading): readings.append(reading)
                case .failure(let rejection): rejected.append(rejection)
                }
            }
        case let other?:
            throw BatchDecodingError("readings: expected an array, found \(other.kind)")
        }
        return DecodedJSONBatch(batch: Batch(device: device, sensors: sensors, readings: readings), rejected: rejected)
    }

    private static func sensor(_ entry: JSONValue, path: String) throws(BatchDecodingError) -> SensorDescriptor {
        guard case .object = entry else { throw BatchDecodingError("\(path): expected an object, found \(entry.kind)") }
        guard case .string(let idText)? = entry["id"] else { throw BatchDecodingError("\(path).id: missing or not a string") }
        let id: SensorID
        do { id = try SensorID(idText) } catch { throw BatchDecodingError("\(path).id: \(error.description)") }
        guard case .string(let quantityText)? = entry["quantity"] else {
            throw BatchDecodingError("\(path).quantity: missing or not a string")
        }
        guard let quantity = Quantity(rawValue: quantityText) else {
            let known = Quantity.allCases.map(\.rawValue).joined(separator: ", ")
            throw BatchDecodingError("\(path).quantity: unknown quantity '\(quantityText)' (known: \(known))")
        }
        var resolution: Resolution?
        switch entry["resolution"] {
        case nil, .null?:
            break
        case .string(let text)?, .number(let text)?:
            do { resolution = try Resolution(parsing: text) } catch {
                throw BatchDecodingError("\(path).resolution: \(error.description)")
            }
        case let other?:
            throw BatchDecodingError("\(path).resolution: expected a string or a number, found \(other.kind)")
        }
        return SensorDescriptor(id: id, quantity: quantity, resolution: resolution)
    }

    private static func reading(
        _ entry: JSONValue, path: String, declared: [SensorID: Resolution]
    ) -> ReadingOutcome {
        var sequence: UInt64?
        if case .number(let text)? = entry["seq"], let value = UInt64(text) { sequence = value }
        let sensorText: String
        if case .string(let text)? = entry["sensor"] { sensorText = text } else { sensorText = "" }
        func reject(_ code: String, _ message: String) -> ReadingOutcome {
            .failure(RejectedReading(sequence: sequence, sensor: sensorText, code: code, message: message))
        }
        guard case .object = entry else { return reject("invalid_reading", "\(path): expected an object, found \(entry.kind)") }
        guard case .string? = entry["sensor"] else { return reject("invalid_reading", "\(path).sensor: missing or not a string") }
        guard let sensor = try? SensorID(sensorText), declared[sensor] != nil else {
            return reject("unknown_sensor", "\(path).sensor: '\(sensorText)' is not declared in \"sensors\"")
        }
        guard case .number(let sequenceText)? = entry["seq"], let sequenceValue = UInt64(sequenceText) else {
            return reject(RejectionCode.invalidSequence, "\(path).seq: missing or not an integer from 0 to \(UInt64.max)")
        }
        let timestamp: Timestamp
        switch entry["ts"] {
        case .string(let text)?:
            guard let parsed = RFC3339.parse(text) else {
                return reject("invalid_reading", "\(path).ts: not an RFC 3339 timestamp or integer microseconds")
            }
            timestamp = parsed
        case .number(let text)?:
            guard let micros = Int64(text) else {
                return reject("invalid_reading", "\(path).ts: not an RFC 3339 timestamp or integer microseconds")
            }
            timestamp = Timestamp(microseconds: micros)
        default:
            return reject("invalid_reading", "\(path).ts: missing; expected an RFC 3339 timestamp or integer microseconds")
        }
        let value: Double
        switch entry["value"] {
        case .number(let text)?:
            guard let parsed = Double(text) else { return reject("invalid_reading", "\(path).value: not a number") }
            value = parsed
        case .string("NaN")?: value = .nan
        case .string("Infinity")?: value = .infinity
        case .string("-Infinity")?: value = -.infinity
        default:
            return reject("invalid_reading", "\(path).value: missing; expected a number (or \"NaN\", \"Infinity\", \"-Infinity\")")
        }
        var quality: QualityFlags = []
        switch entry["flags"] {
        case nil, .null?:
            break
        case .array(let names)?:
            for (k, name) in names.enumerated() {
                guard case .string(let text) = name, let flag = QualityFlags.names.first(where: { $0.1 == text })?.0 else {
                    let known = QualityFlags.names.map(\.1).joined(separator: ", ")
                    return reject("invalid_reading", "\(path).flags[\(k)]: not a known flag (known: \(known))")
                }
                quality.insert(flag)
            }
        case let other?:
            return reject("invalid_reading", "\(path).flags: expected an array of names, found \(other.kind)")
        }
        return .success(Reading(sensor: sensor, sequence: sequenceValue, timestamp: timestamp, value: value, quality: quality))
    }
}

/// One JSON reading, taken or refused.
private enum ReadingOutcome {
    case success(Reading)
    case failure(RejectedReading)
}
