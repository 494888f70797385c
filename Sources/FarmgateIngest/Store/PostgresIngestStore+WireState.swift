import FarmgateWire
import PostgresNIO

/// The state of stateful frames (``WireStateStore``): declared sensor tables in `sensor_tables` (migration 9), context
/// readings from `latest`. Each call is one statement, outside a transaction (autocommit): shared by every instance.
extension PostgresIngestStore: WireStateStore {
    public func sensorTable(deviceRowID: Int64, hash: UInt64) async throws -> [UInt8]? {
        try await rows(
            "SELECT encoded FROM sensor_tables WHERE device_id = \(deviceRowID)::integer AND hash = \(Int64(bitPattern: hash))"
        ) { row in
            Array(try row.decode(ByteBuffer.self).readableBytesView)
        }.first
    }

    /// Committed when it returns (the statement's own transaction). Several writers declaring the same table at once:
    /// the primary key serialises them, the first inserts and the others do nothing.
    public func rememberSensorTable(deviceRowID: Int64, hash: UInt64, encoded: [UInt8]) async throws {
        let bytes = ByteBuffer(bytes: encoded)
        let declared = Timestamp.now().microseconds
        do {
            let inserted = try await rows(
                """
                INSERT INTO sensor_tables(device_id, hash, encoded, declared_us)
                VALUES (\(deviceRowID)::integer, \(Int64(bitPattern: hash)), \(bytes), \(declared))
                ON CONFLICT (device_id, hash) DO NOTHING RETURNING 1
                """
            ) { _ in 1 }
            guard !inserted.isEmpty else { return }
            // Bounded per device (a device that declares a new table with every frame must not fill the store): the
            // newest tables stay; one pruned away is declared again by its device after a 409 unknown_sensor_table.
            _ = try await rows(
                """
                DELETE FROM sensor_tables WHERE device_id = \(deviceRowID)::integer AND hash NOT IN (
                    SELECT hash FROM sensor_tables WHERE device_id = \(deviceRowID)::integer
                    ORDER BY declared_us DESC LIMIT \(Self.maxSensorTablesPerDevice))
                """
            ) { _ in () }
        } catch let error as PSQLError where error.serverInfo?[.sqlState] == PostgresError.Code.foreignKeyViolation.raw {
            throw IngestStoreError.notFound("device #\(deviceRowID)")
        }
    }

    public func contextReadings(deviceRowID: Int64) async throws -> [SensorID: ContextReading] {
        let found = try await rows(
            """
            SELECT s.name, l.sequence, l.timestamp_us, l.value, l.flags
            FROM sensors s JOIN latest l ON l.sensor_id = s.id WHERE s.device_id = \(deviceRowID)::integer
            """
        ) { row in
            let (sensor, sequence, timestamp, value, flags) = try row.decode((String, Int64, Int64, Double, Int16).self)
            return Self.latestRow(sensor, sequence, timestamp, value, flags).context
        }
        var context: [SensorID: ContextReading] = [:]
        for case let (sensor, reading)? in found { context[sensor] = reading }
        return context
    }
}
