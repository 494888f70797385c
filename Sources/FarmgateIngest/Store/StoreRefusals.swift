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
    ///   - overLimit: the batch's new sensors the store did not register because the device has `sensorLimit` already.
    init(
        _ reading: Reading, conflicts: [SensorID: (registered: String, sent: Quantity)], sensorRows: [SensorID: Int64],
        overLimit: Set<SensorID> = [], sensorLimit: Int = 0
    ) {
        func refusal(_ code: String, _ message: String) -> ReadingPlacement {
            .refuse(RejectedReading(sequence: reading.sequence, sensor: reading.sensor.rawValue, code: code, message: message))
        }
        if overLimit.contains(reading.sensor) {
            self = refusal(
                RejectionCode.tooManySensors,
                "sensor '\(reading.sensor)' is new and this device already has \(sensorLimit) sensors, the most the ingest allows one device ([limits] sensors_per_device); give retired sensors' ids to new ones, or have the ingest's operator raise the limit and then run `farmgate quarantine requeue --code \(RejectionCode.tooManySensors)`")
        } else if let conflict = conflicts[reading.sensor] {
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

/// How a re-sent sequence compares with the stored reading: the same (a duplicate) or a `sequence_conflict`, judged
/// alike by every store.
enum SequenceComparison {
    /// Whether two values are the same at the sensor's resolution (whole steps), not as doubles.
    ///
    /// A value exactly half a step from the sent one is the same too: a site converts its pending readings when a sensor's
    /// resolution changes (pH 1.005 at 0.001 becomes 1.01 at 0.01, rounding half away from zero in SQLite), and when the
    /// stored value is such a tie, rounding it here in binary floating point can land on the other side (1.005 is
    /// 1.00499999… as a double). Without this a reading whose answer was lost before the change came back as a
    /// `sequence_conflict`, was renumbered by the site, and was stored twice. A value on another step is never that close.
    static func sameValue(_ stored: Double, _ sent: Double, at resolution: Resolution?) -> Bool {
        if stored == sent { return true }
        guard let resolution, let storedSteps = resolution.quantize(stored), let sentSteps = resolution.quantize(sent) else { return false }
        if storedSteps == sentSteps { return true }
        guard (storedSteps - sentSteps).magnitude == 1 else { return false }
        let halfStep = Double(resolution.numerator) / Double(resolution.denominator) / 2
        let slack = max(stored.magnitude, sent.magnitude, halfStep).ulp * 8
        return ((stored - sent).magnitude - halfStep).magnitude <= slack
    }

    /// What differs between `reading` and the stored one, each as "field (stored X, sent Y)"; empty for the same reading.
    ///
    /// - Parameter storedSensor: the stored reading's sensor name when it is another sensor than `reading`'s, else nil.
    static func differences(
        _ reading: Reading, resolution: Resolution?, storedSensor: String?, storedTimestamp: Int64, storedValue: Double,
        storedFlags: QualityFlags
    ) -> [String] {
        var differences: [String] = []
        if let storedSensor { differences.append("sensor (stored '\(storedSensor)', sent '\(reading.sensor)')") }
        if storedTimestamp != reading.timestamp.microseconds {
            differences.append("timestamp (stored \(Timestamp(microseconds: storedTimestamp)), sent \(reading.timestamp))")
        }
        if !sameValue(storedValue, reading.value, at: resolution) {
            let shown = { (value: Double) -> String in
                guard let resolution, let steps = resolution.quantize(value) else { return "\(value)" }
                return "\(resolution.value(ofSteps: steps))"
            }
            differences.append("value (stored \(shown(storedValue)), sent \(shown(reading.value)))")
        }
        if storedFlags != reading.quality {
            let names = { (flags: QualityFlags) -> String in
                let named = QualityFlags.names.filter { flags.contains($0.0) }.map(\.1)
                return named.isEmpty ? "none" : named.joined(separator: "|")
            }
            differences.append("flags (stored \(names(storedFlags)), sent \(names(reading.quality)))")
        }
        return differences
    }

    /// The refusal of `reading`, whose sequence is stored with other content.
    static func conflict(_ reading: Reading, differences: [String]) -> RejectedReading {
        RejectedReading(
            sequence: reading.sequence, sensor: reading.sensor.rawValue, code: RejectionCode.sequenceConflict,
            message: "sequence \(reading.sequence) is already stored for this device with another \(differences.joined(separator: ", ")); two readings were numbered alike (a site buffer lost or replaced): number this one above the highest sequence the ingest holds (GET \(IngestProtocol.deviceStatePath))")
    }
}
