import FarmgateWire

/// Where a reading of a batch goes in a store, or why the store refuses it before looking at its sequence: the checks
/// every store makes alike (the validator has already made the ones that need no store).
enum ReadingPlacement {
    /// Store it under `sequence` for the sensor row `sensorRow`.
    case place(sequence: Int64, sensorRow: Int64)
    /// Refused for good, with the reason.
    case refuse(RejectedReading)

    /// Where `reading` goes, its sensor's placement decided once per batch (``SensorPlacement``).
    init(_ reading: Reading, sensor: SensorPlacement) {
        switch sensor {
        case .refuse(let code, let message):
            self = .refuse(RejectedReading(sequence: reading.sequence, sensor: reading.sensor.rawValue, code: code, message: message))
        case .row(let sensorRow):
            if let sequence = Int64(exactly: reading.sequence) {
                self = .place(sequence: sequence, sensorRow: sensorRow)
            } else {
                self = .refuse(
                    RejectedReading(
                        sequence: reading.sequence, sensor: reading.sensor.rawValue, code: RejectionCode.invalidSequence,
                        message: "sequence \(reading.sequence) is larger than \(Int64.max)"))
            }
        }
    }
}

/// Where the readings of one sensor of a batch go: its row, or why they are all refused. Decided once per sensor and
/// batch, so that a store looks each reading's sensor up once.
enum SensorPlacement {
    case row(Int64)
    case refuse(code: String, message: String)

    /// - Parameters:
    ///   - conflicts: sensors of the batch registered on the device with another quantity.
    ///   - sensorRows: the store's row of every sensor of the batch it could register.
    ///   - overLimit: the batch's new sensors the store did not register because the device has `sensorLimit` already.
    init(
        _ sensor: SensorID, conflicts: [SensorID: (registered: String, sent: Quantity)], sensorRows: [SensorID: Int64],
        overLimit: Set<SensorID>, sensorLimit: Int
    ) {
        if overLimit.contains(sensor) {
            self = .refuse(
                code: RejectionCode.tooManySensors,
                message: "sensor '\(sensor)' is new and this device already has \(sensorLimit) sensors, the most the ingest allows one device ([limits] sensors_per_device); give retired sensors' ids to new ones, or have the ingest's operator raise the limit and then run `farmgate quarantine requeue --code \(RejectionCode.tooManySensors)`")
        } else if let conflict = conflicts[sensor] {
            self = .refuse(
                code: RejectionCode.sensorConflict,
                message: "sensor '\(sensor)' is registered on this device as \(conflict.registered), but the batch declares it as \(conflict.sent.rawValue); give the new sensor an id of its own")
        } else if let sensorRow = sensorRows[sensor] {
            self = .row(sensorRow)
        } else {
            self = .refuse(
                code: RejectionCode.unknownSensor,
                message: "the batch has no descriptor for sensor '\(sensor)'; list every sensor a reading names in the batch's sensors")
        }
    }
}

/// How a re-sent sequence compares with the stored reading: the same (a duplicate) or a `sequence_conflict`, judged
/// alike by every store.
enum SequenceComparison {
    /// Whether two values are the same at the sensor's resolution (whole steps), not as doubles.
    ///
    /// A stored value that lies between two steps of the sent resolution was stored at a finer one: the site converted its
    /// pending readings when the sensor's resolution changed (pH 1.005 at 0.001 becomes 1.01 at 0.01, rounding half away
    /// from zero in SQLite), perhaps more than once before they went again (1.045 → 1.05 at 0.01 → 1.1 at 0.1). Rounding
    /// the stored value here cannot retrace that (1.045 rounds to 1.0 at 0.1; 1.005 is 1.00499999… as a double), so such
    /// a value is the same when it is within one step of the sent one: each conversion moves it by at most half of its
    /// step, and a chain of resolutions that at least double each time adds up to less than the last step. Without this a
    /// reading whose answer was lost before the change came back as a `sequence_conflict`, was renumbered by the site,
    /// and was stored twice. A stored value on a step of the sent resolution (the resolution did not change) must be on
    /// the same step.
    static func sameValue(_ stored: Double, _ sent: Double, at resolution: Resolution?) -> Bool {
        if stored == sent { return true }
        guard let resolution, let storedSteps = resolution.quantize(stored), let sentSteps = resolution.quantize(sent) else { return false }
        if storedSteps == sentSteps { return true }
        let step = Double(resolution.numerator) / Double(resolution.denominator)
        let slack = max(stored.magnitude, sent.magnitude, step).ulp * 8
        let onGrid = (stored - resolution.value(ofSteps: storedSteps)).magnitude <= slack
        if onGrid { return false }
        return (stored - sent).magnitude <= step + slack
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
            // The stored value as stored (it may lie on a finer grid than the one sent now), the sent one at its resolution.
            differences.append("value (stored \(storedValue), sent \(shown(reading.value)))")
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

    /// How a re-sent reading compares with the one stored under its sequence and since removed by retention, which
    /// cannot be compared: nil (a duplicate) when the reading is older than `cutoff`, the newest raw cut-off a retention
    /// run applied, so that it may be the removed one; else its refusal: the removed reading was older than that cut-off,
    /// so this is another reading numbered alike (a site buffer replaced after retention numbers from 1 again), and
    /// acknowledging it as a duplicate would lose it. With no cut-off recorded, a duplicate (as before it was recorded).
    static func retired(_ reading: Reading, removedBefore cutoff: Timestamp?) -> RejectedReading? {
        guard let cutoff, reading.timestamp >= cutoff else { return nil }
        return RejectedReading(
            sequence: reading.sequence, sensor: reading.sensor.rawValue, code: RejectionCode.sequenceConflict,
            message: "sequence \(reading.sequence) belonged to a reading of this device that retention removed (raw readings before \(cutoff)); this one, at \(reading.timestamp), is newer, so it is another reading numbered alike (a site buffer lost or replaced): number it above the highest sequence the ingest holds (GET \(IngestProtocol.deviceStatePath))")
    }

    /// The refusal of `reading`, whose sequence is stored with other content.
    /// `inThisBatch`: the other reading came earlier in the same batch (said so, not "already stored"); nil when the
    /// store cannot tell (the SQLite writer compares a batch's repeats with what its own inserts stored).
    static func conflict(_ reading: Reading, differences: [String], inThisBatch: Bool? = nil) -> RejectedReading {
        let other =
            switch inThisBatch {
            case true?: "is taken by another reading earlier in this batch, with a different"
            case false?: "is already stored for this device with a different"
            case nil: "is already stored for this device (or taken earlier in this batch) with a different"
            }
        return RejectedReading(
            sequence: reading.sequence, sensor: reading.sensor.rawValue, code: RejectionCode.sequenceConflict,
            message: "sequence \(reading.sequence) \(other) \(differences.joined(separator: ", ")); two readings were numbered alike (a site buffer lost or replaced): number this one above the highest sequence the ingest holds (GET \(IngestProtocol.deviceStatePath))")
    }
}
