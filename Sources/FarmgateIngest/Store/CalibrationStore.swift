import FarmgateWire

/// Where the ingest keeps calibration events (both stores do). Separate from ``IngestStore`` so that a store that does not
/// keep them still serves readings: the ingest advertises format version 3 (`accepted_versions` in GET /v1/device) only
/// when its store is also a `CalibrationStore`, so an agent never sends it events, and ignores a JSON `calibrations` member.
public protocol CalibrationStore: Sendable {
    /// Stores `events` of `device` in one durable transaction, once per (device, event id).
    /// - Returns: how many were new and how many were already stored.
    func storeCalibrations(_ events: [CalibrationEvent], for device: DeviceIdentity, receivedAt: Timestamp) async throws -> CalibrationReceipt

    /// The calibrations of one sensor of a device, newest first.
    func calibrations(deviceRowID: Int64, sensor: SensorID, limit: Int) async throws -> [CalibrationEvent]

    /// The events of `device` already stored under any of `ids`, by id: an event sent again with the same id and other
    /// content is refused by the batch controller, not counted as a duplicate of what is stored.
    func storedCalibrations(ids: [String], for device: DeviceIdentity) async throws -> [String: CalibrationEvent]

    /// Whether `device` has registered `sensor` (sent a reading of it before): an event of a sensor the device never
    /// declared is refused.
    func hasSensor(_ sensor: SensorID, device: DeviceIdentity) async throws -> Bool
}

extension CalibrationStore {
    /// The event times (UTC microseconds) an event can be read back with: years 0000 to 9999, what RFC 3339 writes and
    /// parses. The ingest refuses events outside 2000-01-01 to now + `future_tolerance` (``ReadingValidator/problem(of:now:)``),
    /// but a store written before it did may hold some; reads skip them, so that one (newest of all at year 294247) does
    /// not take a `limit` slot and hide the sensor's real calibrations.
    static var readableTimes: Range<Int64> { -62_167_219_200_000_000..<253_402_300_800_000_000 }
}
