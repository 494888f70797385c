import FarmgateWire
import Synchronization

/// What `farmgate status` shows for one sensor.
public struct SensorStatus: Sendable, Hashable, Codable {
    public var id: String
    public var driver: String
    public var quantity: String
    public var unit: String
    public var intervalSeconds: Double
    public var lastValue: Double?
    public var lastReadAt: Timestamp?
    public var lastError: String?
    public var lastErrorAt: Timestamp?
    public var consecutiveErrors: Int
    public var readsOK: Int64
    public var readsFailed: Int64
    /// Readings not stored because they were inside the deadband.
    public var suppressed: Int64
}

/// The latest state of every sensor, written by the sampler and read by the control socket.
public final class SensorStatusBoard: Sendable {
    private let entries: Mutex<[SensorID: SensorStatus]>
    private let order: [SensorID]

    public init(sensors: [SensorConfiguration]) {
        var entries: [SensorID: SensorStatus] = [:]
        for sensor in sensors {
            entries[sensor.id] = SensorStatus(
                id: sensor.id.rawValue, driver: sensor.driver, quantity: sensor.descriptor.quantity.rawValue,
                unit: sensor.descriptor.quantity.unit,
                intervalSeconds: sensor.interval / .seconds(1),
                lastValue: nil, lastReadAt: nil, lastError: nil, lastErrorAt: nil, consecutiveErrors: 0, readsOK: 0,
                readsFailed: 0, suppressed: 0)
        }
        self.entries = Mutex(entries)
        self.order = sensors.map(\.id)
    }

    func recordSuccess(_ sensor: SensorID, value: Double, at time: Timestamp, stored: Bool) {
        entries.withLock { entries in
            entries[sensor]?.lastValue = value
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

    /// Every sensor, in configuration order.
    public func snapshot() -> [SensorStatus] {
        entries.withLock { entries in order.compactMap { entries[$0] } }
    }
}
