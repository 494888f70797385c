import FarmgateWire
import Foundation
import PostgresNIO

/// Calibration events in the `calibrations` table (PostgreSQL migration 7), like ``SQLiteIngestStore``'s: with it a
/// PostgreSQL ingest reads format version 3 and the JSON form's `calibrations` (`accepted_versions` [2, 3]).
extension PostgresIngestStore: CalibrationStore {
    public func storeCalibrations(_ events: [CalibrationEvent], for device: DeviceIdentity, receivedAt: Timestamp) async throws -> CalibrationReceipt {
        guard !events.isEmpty else { return CalibrationReceipt(accepted: 0, duplicates: 0) }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let texts = try events.map { String(decoding: try encoder.encode($0), as: UTF8.self) }
        let ids = events.map(\.id)
        let sensors = events.map(\.sensor.rawValue)
        let times = events.map(\.time.microseconds)
        let circuits = events.map(\.circuit)
        let deviceRowID = device.rowID
        let received = receivedAt.microseconds
        let logger = self.logger
        // One statement for the whole batch; an id already stored (or repeated in the batch) inserts nothing and is
        // counted as a duplicate.
        let accepted = try await transaction { connection in
            var inserted = 0
            let rows = try await connection.query(
                """
                INSERT INTO calibrations (device_id, event_id, sensor, time_us, circuit, event, received_at_us)
                SELECT \(deviceRowID)::integer, e.id, e.sensor, e.time_us, e.circuit, e.event, \(received)
                FROM unnest(\(ids)::text[], \(sensors)::text[], \(times)::int8[], \(circuits)::text[], \(texts)::text[])
                    WITH ORDINALITY AS e(id, sensor, time_us, circuit, event, n)
                ORDER BY e.n
                ON CONFLICT (device_id, event_id) DO NOTHING
                RETURNING 1
                """, logger: logger)
            for try await _ in rows { inserted += 1 }
            return inserted
        }
        return CalibrationReceipt(accepted: accepted, duplicates: events.count - accepted)
    }

    public func storedCalibrations(ids: [String], for device: DeviceIdentity) async throws -> [String: CalibrationEvent] {
        guard !ids.isEmpty else { return [:] }
        let texts = try await rows(
            "SELECT event FROM calibrations WHERE device_id = \(device.rowID) AND event_id = ANY(\(Array(Set(ids)))::text[])"
        ) { try $0.decode(String.self) }
        let decoder = JSONDecoder()
        let events = texts.compactMap { try? decoder.decode(CalibrationEvent.self, from: Data($0.utf8)) }
        return Dictionary(events.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
    }

    public func hasSensor(_ sensor: SensorID, device: DeviceIdentity) async throws -> Bool {
        try await self.sensor(farmID: device.farmID, device: device.device, sensor: sensor) != nil
    }

    public func calibrations(deviceRowID: Int64, sensor: SensorID, limit: Int) async throws -> [CalibrationEvent] {
        let texts = try await rows(
            """
            SELECT event FROM calibrations WHERE device_id = \(deviceRowID) AND sensor = \(sensor.rawValue)
                AND time_us >= \(Self.readableTimes.lowerBound) AND time_us < \(Self.readableTimes.upperBound)
            ORDER BY time_us DESC, id DESC LIMIT \(Int64(max(0, limit)))
            """
        ) { try $0.decode(String.self) }
        let decoder = JSONDecoder()
        return texts.compactMap { try? decoder.decode(CalibrationEvent.self, from: Data($0.utf8)) }
    }
}
