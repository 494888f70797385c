public import FarmgateWire

/// What the ingest keeps for stateful frames (format version 4, see ``BatchCodec``): the sensor tables devices declared,
/// and each device's newest reading per sensor. Both live in the store, so every instance of the ingest (and one that
/// restarted) answers a device the same way.
public protocol WireStateStore: Sendable {
    /// The table of the device named `hash`, as declared (its ``SensorTable/encoded`` bytes), or nil when the device
    /// never declared it (or it was removed).
    func sensorTable(deviceRowID: Int64, hash: UInt64) async throws -> [UInt8]?

    /// Keeps a declared table. Idempotent (a table already held stays as it is) and safe with several writers; durable
    /// when it returns, before the frame that declared it is answered.
    func rememberSensorTable(deviceRowID: Int64, hash: UInt64, encoded: [UInt8]) async throws

    /// The newest stored reading of each sensor of the device: the store's `latest` rows (greatest (timestamp,
    /// sequence)), with the value as stored.
    func contextReadings(deviceRowID: Int64) async throws -> [SensorID: ContextReading]
}

extension WireStateStore {
    /// The most sensor tables a store keeps per device: a device that declares a new table with every frame must not fill
    /// the store (the newest declared stay), nor memory (``WireStateCache`` keeps as many per device, the most recently
    /// used). A device whose table was dropped declares it again after a 409 `unknown_sensor_table`. A site declares one
    /// table per configuration it ran, so 16 is more than any site needs at once.
    public static var maxSensorTablesPerDevice: Int { 16 }
}
