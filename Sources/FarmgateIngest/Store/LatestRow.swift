import FarmgateWire

/// One row of a store's `latest` table with its sensor's name: the newest stored reading of the sensor by (timestamp,
/// sequence), which both stores' write paths keep so (their upsert replaces a row only with a greater (timestamp,
/// sequence)). Both stores decode their `latest` rows through it, for ``ReadingQueryStore/latestReadings(farmID:)`` and
/// ``WireStateStore/contextReadings(deviceRowID:)``.
struct LatestRow {
    /// The sensor's name as registered (a valid ``SensorID`` unless the database was edited by hand).
    var sensor: String
    var reading: StoredReading

    /// A row from the columns `sensors.name`, `latest.sequence`, `latest.timestamp_us`, `latest.value` and
    /// `latest.flags` (whose 16 bits are the quality flags, whatever the integer type of the column).
    init(sensor: String, sequence: Int64, timestamp: Int64, value: Double, flags: Int64) {
        self.sensor = sensor
        self.reading = StoredReading(
            sequence: UInt64(clamping: sequence), timestamp: Timestamp(microseconds: timestamp), value: value,
            quality: QualityFlags(rawValue: UInt16(truncatingIfNeeded: flags)))
    }

    /// The row as the latest-readings route answers it.
    /// - Throws: ``IngestStoreError/corrupt(_:)`` when the stored sensor name is not a valid sensor id.
    func latestReading(device: DeviceID, quantity: Quantity) throws -> LatestReading {
        let id: SensorID
        do { id = try SensorID(sensor) } catch { throw IngestStoreError.corrupt(error.description) }
        return LatestReading(
            device: device, sensor: id, quantity: quantity, sequence: reading.sequence, timestamp: reading.timestamp, value: reading.value,
            quality: reading.quality)
    }

    /// The row as a context reading of stateful frames (the value as stored); nil when the stored sensor name is not a
    /// valid sensor id (no frame can name such a sensor, so leaving it out changes no prediction).
    var context: (sensor: SensorID, reading: ContextReading)? {
        guard let id = try? SensorID(sensor) else { return nil }
        return (id, ContextReading(sequence: reading.sequence, timestamp: reading.timestamp, value: reading.value))
    }
}
