import FarmgateSupport
import FarmgateWire

/// The state of stateful frames (``WireStateStore``): declared sensor tables in `sensor_tables` (migration 9), context
/// readings from `latest`. Like every other call of this store, the statements run on its writer or reader thread.
extension SQLiteIngestStore: WireStateStore {
    public func sensorTable(deviceRowID: Int64, hash: UInt64) async throws -> [UInt8]? {
        try await reader.withValue { db in
            try db.withStatement(
                "SELECT encoded FROM sensor_tables WHERE device_id = ? AND hash = ?", [.integer(deviceRowID), .integer(Int64(bitPattern: hash))]
            ) { statement throws -> [UInt8]? in
                try statement.step() ? statement.blob(0) : nil
            }
        }
    }

    /// One statement in its own transaction on the writer thread, committed (`synchronous=FULL`) when it returns; a
    /// table already held stays as it is, whoever declared it first.
    public func rememberSensorTable(deviceRowID: Int64, hash: UInt64, encoded: [UInt8]) async throws {
        let declared = Timestamp.now().microseconds
        try await writer.withValue { db in
            do {
                try db.statement(
                    "INSERT INTO sensor_tables(device_id, hash, encoded, declared_us) VALUES (?, ?, ?, ?) ON CONFLICT (device_id, hash) DO NOTHING"
                ).run([.integer(deviceRowID), .integer(Int64(bitPattern: hash)), .blob(encoded), .integer(declared)])
                guard db.connection.changes > 0 else { return }
                // Bounded per device (a device that declares a new table with every frame must not fill the store): the
                // newest tables stay; one pruned away is declared again by its device after a 409 unknown_sensor_table.
                try db.statement(
                    """
                    DELETE FROM sensor_tables WHERE device_id = ?1 AND hash NOT IN (
                        SELECT hash FROM sensor_tables WHERE device_id = ?1 ORDER BY declared_us DESC LIMIT ?2)
                    """
                ).run([.integer(deviceRowID), .integer(Int64(Self.maxSensorTablesPerDevice))])
            } catch let error as SQLiteError where error.isConstraint {
                // Only the foreign key can refuse it (a conflict on the key inserts nothing).
                throw IngestStoreError.notFound("device #\(deviceRowID)")
            }
        }
    }

    public func contextReadings(deviceRowID: Int64) async throws -> [SensorID: ContextReading] {
        try await reader.withValue { db in
            try db.withStatement(
                "SELECT \(Self.latestColumns) FROM sensors s JOIN latest l ON l.sensor_id = s.id WHERE s.device_id = ?", [.integer(deviceRowID)]
            ) { statement throws -> [SensorID: ContextReading] in
                var context: [SensorID: ContextReading] = [:]
                while try statement.step() {
                    if let (sensor, reading) = Self.latestRow(statement, from: 0).context { context[sensor] = reading }
                }
                return context
            }
        }
    }
}
