import FarmgateSupport
import FarmgateWire
import Foundation

/// Calibration events in the `calibrations` table (migration 3): the event as JSON beside the columns a query needs.
extension SQLiteIngestStore: CalibrationStore {
    public func storeCalibrations(_ events: [CalibrationEvent], for device: DeviceIdentity, receivedAt: Timestamp) async throws -> CalibrationReceipt {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let rows = try events.map { event in (event, String(decoding: try encoder.encode(event), as: UTF8.self)) }
        // Answered with the upload's readings: checked like them (``commitUpload(_:)``).
        return try await commitUpload { db in
            var accepted = 0
            var duplicates = 0
            for (event, json) in rows {
                let inserted = try db.withStatement(
                    """
                    INSERT INTO calibrations(device_id, event_id, sensor, time_us, circuit, event, received_at_us)
                    VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, event_id) DO NOTHING RETURNING id
                    """,
                    [
                        .integer(device.rowID), .text(event.id), .text(event.sensor.rawValue), .integer(event.time.microseconds),
                        .text(event.circuit), .text(json), .integer(receivedAt.microseconds),
                    ]
                ) { statement in try statement.step() }
                if inserted { accepted += 1 } else { duplicates += 1 }
            }
            return CalibrationReceipt(accepted: accepted, duplicates: duplicates)
        }
    }

    public func storedCalibrations(ids: [String], for device: DeviceIdentity) async throws -> [String: CalibrationEvent] {
        guard !ids.isEmpty else { return [:] }
        let texts = try await reader.withValue { db in
            var texts: [String] = []
            for id in Set(ids) {
                try db.withStatement("SELECT event FROM calibrations WHERE device_id = ? AND event_id = ?", [.integer(device.rowID), .text(id)]) { statement in
                    if try statement.step() { texts.append(statement.text(0)) }
                }
            }
            return texts
        }
        let decoder = JSONDecoder()
        let events = texts.compactMap { try? decoder.decode(CalibrationEvent.self, from: Data($0.utf8)) }
        return Dictionary(events.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
    }

    public func hasSensor(_ sensor: SensorID, device: DeviceIdentity) async throws -> Bool {
        try await self.sensor(farmID: device.farmID, device: device.device, sensor: sensor) != nil
    }

    public func calibrations(deviceRowID: Int64, sensor: SensorID, limit: Int) async throws -> [CalibrationEvent] {
        let texts = try await reader.withValue { db in
            try db.withStatement(
                """
                SELECT event FROM calibrations WHERE device_id = ? AND sensor = ? AND time_us >= ? AND time_us < ?
                ORDER BY time_us DESC, id DESC LIMIT ?
                """,
                [
                    .integer(deviceRowID), .text(sensor.rawValue), .integer(Self.readableTimes.lowerBound), .integer(Self.readableTimes.upperBound),
                    .integer(Int64(max(0, limit))),
                ]
            ) { statement in
                var texts: [String] = []
                while try statement.step() { texts.append(statement.text(0)) }
                return texts
            }
        }
        let decoder = JSONDecoder()
        return texts.compactMap { try? decoder.decode(CalibrationEvent.self, from: Data($0.utf8)) }
    }
}
