#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// A point in time, UTC, in whole microseconds since 1970-01-01T00:00:00Z.
public struct Timestamp: Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    public var microseconds: Int64

    public init(microseconds: Int64) { self.microseconds = microseconds }

    /// Decodes an RFC 3339 string or an integer of microseconds.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let microseconds = try? container.decode(Int64.self) {
            self.microseconds = microseconds
            return
        }
        let text = try container.decode(String.self)
        guard let parsed = RFC3339.parse(text) else {
            throw DecodingError.dataCorruptedError(
                in: container, debugDescription: "not an RFC 3339 timestamp such as 2026-11-23T10:15:30.123Z: \(text)")
        }
        self = parsed
    }

    /// Encodes as an RFC 3339 string with microseconds, which people and `jq` can read.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(RFC3339.format(self))
    }

    /// Now, from the system's real-time clock.
    public static func now() -> Timestamp {
        Timestamp(microseconds: Int64((Date().timeIntervalSince1970 * 1_000_000).rounded()))
    }

    public static func < (lhs: Timestamp, rhs: Timestamp) -> Bool { lhs.microseconds < rhs.microseconds }

    public var description: String { RFC3339.format(self) }
}

/// Facts about how a reading was taken, carried beside its value.
public struct QualityFlags: OptionSet, Hashable, Sendable, Codable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// The site's clock was not yet synchronised (no NTP, no RTC) when the reading was taken: its timestamp may be wrong.
    public static let clockUnsynchronized = QualityFlags(rawValue: 1 << 0)
    /// The driver reported a fault but still produced a value (for example a failed CRC on a retry that then succeeded).
    public static let sensorFault = QualityFlags(rawValue: 1 << 1)
    /// The value is outside the sensor's configured expected range.
    public static let outOfRange = QualityFlags(rawValue: 1 << 2)
    /// The probe was being calibrated.
    public static let calibrating = QualityFlags(rawValue: 1 << 3)
    /// A heartbeat repeat of an unchanged value (deadband on).
    public static let heartbeat = QualityFlags(rawValue: 1 << 4)
    /// The value was temperature-compensated by the sensor.
    public static let compensated = QualityFlags(rawValue: 1 << 5)
    /// The reading was taken before the site's clock was set and its timestamp was repaired afterwards from the
    /// monotonic boot clock, once the clock was synchronised in the same boot.
    public static let clockCorrected = QualityFlags(rawValue: 1 << 6)

    /// Names for the flags, in bit order, as used in JSON and CSV.
    public static let names: [(QualityFlags, String)] = [
        (.clockUnsynchronized, "clock_unsynchronized"), (.sensorFault, "sensor_fault"), (.outOfRange, "out_of_range"),
        (.calibrating, "calibrating"), (.heartbeat, "heartbeat"), (.compensated, "compensated"),
        (.clockCorrected, "clock_corrected"),
    ]

    /// Every flag the wire format defines; another bit set is refused by the ingest (`invalid_reading`).
    public static let known = QualityFlags(names.map(\.0))
}

/// One measurement of one sensor on one device.
public struct Reading: Hashable, Sendable {
    /// The sensor, unique on the device that sent the batch.
    public var sensor: SensorID
    /// The device-wide sequence number the site buffer assigned when it committed this reading; never reused.
    public var sequence: UInt64
    /// When the value was read, UTC.
    public var timestamp: Timestamp
    /// The value, in the unit of the sensor's quantity. Exact at the sensor's declared resolution once it crossed the wire.
    public var value: Double
    public var quality: QualityFlags

    public init(sensor: SensorID, sequence: UInt64, timestamp: Timestamp, value: Double, quality: QualityFlags = []) {
        self.sensor = sensor
        self.sequence = sequence
        self.timestamp = timestamp
        self.value = value
        self.quality = quality
    }
}

/// What a batch says about one of its sensors: enough for a receiver that has never heard of it.
public struct SensorDescriptor: Hashable, Sendable {
    public var id: SensorID
    public var quantity: Quantity
    public var resolution: Resolution

    public init(id: SensorID, quantity: Quantity, resolution: Resolution? = nil) {
        self.id = id
        self.quantity = quantity
        self.resolution = resolution ?? quantity.defaultResolution
    }
}

/// A set of readings from one device, the unit of upload.
///
/// Every sensor a reading names has a descriptor in ``sensors``. The order of ``readings`` carries no meaning:
/// the ingest stores them by (device, sequence).
public struct Batch: Hashable, Sendable {
    public var device: DeviceID
    public var sensors: [SensorDescriptor]
    public var readings: [Reading]

    public init(device: DeviceID, sensors: [SensorDescriptor], readings: [Reading]) {
        self.device = device
        self.sensors = sensors
        self.readings = readings
    }
}
