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
}
