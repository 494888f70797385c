/// A device's sensor descriptors in one canonical order and encoding: what a version 4 frame references by ``hash``
/// instead of carrying (see ``BatchCodec`` and ``WireSession``).
///
/// The order is natural id order ("tank2" before "tank10"). The encoding (``encoded``), which the hash covers, the frame
/// carries when it declares a table and the ingest stores, is:
/// ```
/// S (uvarint), then S times: id length (uvarint), id bytes, quantity code (1 byte), resolution numerator and
/// denominator (uvarints)
/// ```
public struct SensorTable: Hashable, Sendable {
    /// The descriptors in natural id order.
    public let sensors: [SensorDescriptor]
    /// FNV-1a 64 of ``encoded``: a device's table is named by it. Not a security measure: the ingest looks tables up by
    /// (device, hash), and a context checksum guards every prediction made with the table.
    public let hash: UInt64
    /// The canonical encoding.
    public let encoded: [UInt8]
    /// Each sensor's position in ``sensors``.
    let index: [SensorID: Int]

    /// The most sensors a table holds (as many as one batch may describe).
    public static let maxSensors = BatchLimits.default.maxSensors

    /// - Throws: ``BatchEncodingError`` for a sensor id listed twice or more than ``maxSensors`` sensors.
    public init(_ sensors: [SensorDescriptor]) throws(BatchEncodingError) {
        guard sensors.count <= Self.maxSensors else {
            throw BatchEncodingError("\(sensors.count) sensors in one table, more than \(Self.maxSensors)")
        }
        let ordered = sensors.sorted { naturalOrder($0.id.rawValue, $1.id.rawValue) }
        var index: [SensorID: Int] = [:]
        index.reserveCapacity(ordered.count)
        for (position, descriptor) in ordered.enumerated() {
            guard index.updateValue(position, forKey: descriptor.id) == nil else {
                throw BatchEncodingError("sensor '\(descriptor.id)' is described more than once in the table")
            }
        }
        var writer = ByteWriter()
        writer.uvarint(ordered.count)
        for descriptor in ordered {
            let id = Array(descriptor.id.rawValue.utf8)
            writer.uvarint(id.count)
            writer.bytes(id)
            writer.byte(descriptor.quantity.code)
            writer.uvarint(UInt64(descriptor.resolution.numerator))
            writer.uvarint(UInt64(descriptor.resolution.denominator))
        }
        self.sensors = ordered
        self.index = index
        self.encoded = writer.bytes
        self.hash = fnv1a64(writer.bytes)
    }

    /// Decodes ``encoded`` (from a frame, or as a store kept it).
    /// - Throws: ``BatchDecodingError`` naming what is wrong; `.truncated` when the bytes end early.
    public init(encoded bytes: [UInt8], limits: BatchLimits = .default) throws(BatchDecodingError) {
        var reader = ByteReader(bytes)
        let table = try Self.read(&reader, limits: limits)
        guard reader.isAtEnd else { throw BatchDecodingError("\(reader.remaining) bytes follow the sensor table") }
        self = table
    }

    /// Reads one encoded table from `reader`: the table must be in canonical order, so that its hash is that of its bytes.
    static func read(_ reader: inout ByteReader, limits: BatchLimits) throws(BatchDecodingError) -> SensorTable {
        let start = reader.offset
        let count = try reader.count("sensor table size", limit: min(limits.maxSensors, Self.maxSensors))
        // Each entry takes at least five bytes (length, one id byte, quantity, numerator, denominator).
        guard count <= reader.remaining / 5 else {
            throw BatchDecodingError("the sensor table declares \(count) sensors but only \(reader.remaining) bytes remain", kind: .truncated)
        }
        var sensors: [SensorDescriptor] = []
        sensors.reserveCapacity(count)
        for i in 0..<count {
            let length = try reader.count("table sensor \(i) id length", limit: identifierMaxLength)
            let bytes = try reader.bytes(count: length, "table sensor \(i) id")
            let id: SensorID
            do { id = try SensorID(String(decoding: bytes, as: UTF8.self)) } catch {
                throw BatchDecodingError("table sensor \(i): \(error.description)")
            }
            let code = try reader.byte("sensor '\(id)' quantity")
            guard let quantity = Quantity(code: code) else {
                throw BatchDecodingError(
                    "sensor '\(id)' has quantity code \(code), which this ingest does not know; upgrade the ingest, or remove the sensor from the device")
            }
            let numerator = try reader.uvarint("sensor '\(id)' resolution numerator")
            let denominator = try reader.uvarint("sensor '\(id)' resolution denominator")
            guard numerator <= UInt64(Resolution.maxComponent), denominator <= UInt64(Resolution.maxComponent),
                let resolution = try? Resolution(numerator: UInt32(numerator), denominator: UInt32(denominator))
            else {
                throw BatchDecodingError(
                    "sensor '\(id)' has invalid resolution \(numerator)/\(denominator) (parts must be 1 to \(Resolution.maxComponent))")
            }
            sensors.append(SensorDescriptor(id: id, quantity: quantity, resolution: resolution))
        }
        let table: SensorTable
        do { table = try SensorTable(sensors) } catch { throw BatchDecodingError(error.description) }
        guard table.encoded.elementsEqual(reader.consumed(from: start)) else {
            throw BatchDecodingError("the sensor table is not in canonical order (natural id order)")
        }
        return table
    }

    /// The position of `sensor` in ``sensors``, if it is in the table.
    public func position(of sensor: SensorID) -> Int? { index[sensor] }
}

/// FNV-1a, 64 bits.
public func fnv1a64(_ bytes: some Sequence<UInt8>) -> UInt64 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in bytes {
        hash ^= UInt64(byte)
        hash = hash &* 0x0000_0100_0000_01b3
    }
    return hash
}
