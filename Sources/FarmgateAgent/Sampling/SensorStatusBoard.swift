import FarmgateWire
import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// What `farmgate status` shows for one sensor.
public struct SensorStatus: Sendable, Hashable, Codable {
    public var id: String
    public var driver: String
    public var quantity: String
    public var unit: String
    /// The sensor's resolution (`1/100`): values are stored, sent and shown as whole steps of it.
    public var resolution: String
    public var intervalSeconds: Double
    /// The last value at the sensor's resolution, as the buffer stores it (6.08, not the driver's raw 6.075).
    public var lastValue: Double?
    public var lastReadAt: Timestamp?
    public var lastError: String?
    public var lastErrorAt: Timestamp?
    public var consecutiveErrors: Int
    public var readsOK: Int64
    public var readsFailed: Int64
    /// Readings not stored because they were inside the deadband.
    public var suppressed: Int64
    /// Scheduled reads not made because the read before ran past them (a sensor behind others on a shared bus, a slow
    /// device); nil from an agent older than this field.
    public var skippedReads: Int64?
}

/// The latest state of every sensor, written by the sampler and read by the control socket.
public final class SensorStatusBoard: Sendable {
    private let entries: Mutex<[SensorID: SensorStatus]>
    private let order: [SensorID]
    private let resolutions: [SensorID: Resolution]

    public init(sensors: [SensorConfiguration]) {
        var entries: [SensorID: SensorStatus] = [:]
        for sensor in sensors {
            entries[sensor.id] = SensorStatus(
                id: sensor.id.rawValue, driver: sensor.driver, quantity: sensor.descriptor.quantity.rawValue,
                unit: sensor.descriptor.quantity.unit, resolution: sensor.descriptor.resolution.description,
                intervalSeconds: sensor.interval / .seconds(1),
                lastValue: nil, lastReadAt: nil, lastError: nil, lastErrorAt: nil, consecutiveErrors: 0, readsOK: 0,
                readsFailed: 0, suppressed: 0, skippedReads: 0)
        }
        self.entries = Mutex(entries)
        self.order = sensors.map(\.id)
        self.resolutions = Dictionary(sensors.map { ($0.id, $0.descriptor.resolution) }, uniquingKeysWith: { first, _ in first })
    }

    func recordSuccess(_ sensor: SensorID, value: Double, at time: Timestamp, stored: Bool) {
        // What the buffer stores: whole steps of the resolution (a value that cannot be quantized is shown raw).
        let stepped = resolutions[sensor].flatMap { resolution in resolution.quantize(value).map(resolution.value(ofSteps:)) } ?? value
        entries.withLock { entries in
            entries[sensor]?.lastValue = stepped
            entries[sensor]?.lastReadAt = time
            entries[sensor]?.consecutiveErrors = 0
            entries[sensor]?.readsOK += 1
            if !stored { entries[sensor]?.suppressed += 1 }
        }
    }

    func recordFailure(_ sensor: SensorID, error: SensorError, at time: Timestamp) {
        entries.withLock { entries in
            entries[sensor]?.lastError = error.description
            entries[sensor]?.lastErrorAt = time
            entries[sensor]?.consecutiveErrors += 1
            entries[sensor]?.readsFailed += 1
        }
    }

    /// Counts scheduled reads of `sensor` that were skipped because its previous read ran past them.
    func recordSkipped(_ sensor: SensorID, count: Int64) {
        entries.withLock { entries in
            guard var entry = entries[sensor] else { return }
            entry.skippedReads = (entry.skippedReads ?? 0) + count
            entries[sensor] = entry
        }
    }

    /// Carries the counters and last reading of each sensor of `previous` (the board of the services a reload
    /// replaced) that is still configured with the same driver, so that `status` and the metrics file's counters
    /// (`farmgate_driver_reads_total`, ...) do not start again from zero at every reload.
    public func carry(from previous: [SensorStatus]) {
        entries.withLock { entries in
            for old in previous {
                guard let id = try? SensorID(old.id), var entry = entries[id], entry.driver == old.driver else { continue }
                entry.readsOK += old.readsOK
                entry.readsFailed += old.readsFailed
                entry.suppressed += old.suppressed
                entry.skippedReads = (entry.skippedReads ?? 0) + (old.skippedReads ?? 0)
                if entry.lastReadAt == nil {
                    entry.lastValue = old.lastValue
                    entry.lastReadAt = old.lastReadAt
                }
                entries[id] = entry
            }
        }
    }

    /// Every sensor, in configuration order.
    public func snapshot() -> [SensorStatus] {
        entries.withLock { entries in order.compactMap { entries[$0] } }
    }
}

extension Resolution {
    /// The decimal places that show every multiple of this resolution exactly (2 for 1/100, 4 for 1/16), at most 6.
    public var decimalPlaces: Int {
        var scaled = UInt64(numerator)
        for places in 0...6 {
            if scaled % UInt64(denominator) == 0 { return places }
            scaled *= 10
        }
        return 6
    }

    /// `value` with the decimal places of `resolution` (`1/100` shows 6.08; `1/16` shows 20.0625); with three places when
    /// the resolution is unknown or unreadable.
    public static func display(_ value: Double, resolution: String?) -> String {
        let places = resolution.flatMap { try? Resolution(parsing: $0) }?.decimalPlaces ?? 3
        return fixedPoint(value, places: places)
    }
}
