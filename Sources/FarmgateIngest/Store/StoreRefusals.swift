import FarmgateWire

/// Where a reading of a batch goes in a store, or why the store refuses it before looking at its sequence: the checks
/// every store makes alike (the validator has already made the ones that need no store).
enum ReadingPlacement {
    /// Store it under `sequence` for the sensor row `sensorRow`.
    case place(sequence: Int64, sensorRow: Int64)
    /// Refused for good, with the reason.
    case refuse(RejectedReading)

    /// - Parameters:
    ///   - conflicts: sensors of the batch registered on the device with another quantity.
    ///   - sensorRows: the store's row of every sensor of the batch it could register.
    init(_ reading: Reading, conflicts: [SensorID: (registered: String, sent: Quantity)], sensorRows: [SensorID: Int64]) {
        func refusal(_ code: String, _ message: String) -> ReadingPlacement {
            .refuse(RejectedReading(sequence: reading.sequence, sensor: reading.sensor.rawValue, code: code, message: message))
        }
        if let conflict = conflicts[reading.sensor] {
            self = refusal(
                RejectionCode.sensorConflict,
                "sensor '\(reading.sensor)' is registered on this device as \(conflict.registered), but the batch declares it as \(conflict.sent.rawValue); give the new sensor an id of its own")
        } else if let sensorRow = sensorRows[reading.sensor] {
            if let sequence = Int64(exactly: reading.sequence) {
                self = .place(sequence: sequence, sensorRow: sensorRow)
            } else {
                self = refusal(RejectionCode.invalidSequence, "sequence \(reading.sequence) is larger than \(Int64.max)")
            }
        } else {
            self = refusal(
                RejectionCode.unknownSensor,
                "the batch has no descriptor for sensor '\(reading.sensor)'; list every sensor a reading names in the batch's sensors")
        }
    }
}
