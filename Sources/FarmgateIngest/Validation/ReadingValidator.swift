public import FarmgateWire
import Foundation

extension Timestamp {
    /// 2000-01-01T00:00:00Z: no reading of a real sensor is older.
    public static let earliestPlausible = Timestamp(microseconds: 946_684_800_000_000)
}

/// Checks readings one at a time, so that one bad reading never costs the rest of its batch.
///
/// Checks that need the store (a sensor registered with another quantity) are done by the store inside its transaction.
public struct ReadingValidator: Sendable {
    /// How far past `now` a timestamp may be.
    public var futureTolerance: Duration

    public init(futureTolerance: Duration) {
        self.futureTolerance = futureTolerance
    }

    /// Splits `batch` into the readings that may be stored (returned as a batch) and those refused, with reasons.
    ///
    /// - Parameter now: the ingest's clock.
    public func validate(_ batch: Batch, now: Timestamp) -> (valid: Batch, rejected: [RejectedReading]) {
        var quantities: [SensorID: Quantity] = [:]
        for descriptor in batch.sensors where quantities[descriptor.id] == nil {
            quantities[descriptor.id] = descriptor.quantity
        }
        let tolerance = futureTolerance.components
        let toleranceMicroseconds = tolerance.seconds.multipliedReportingOverflow(by: 1_000_000).partialValue
            + tolerance.attoseconds / 1_000_000_000_000
        let latest = now.microseconds.addingReportingOverflow(toleranceMicroseconds)
        let latestAllowed = latest.overflow ? Int64.max : latest.partialValue

        var valid: [Reading] = []
        valid.reserveCapacity(batch.readings.count)
        var rejected: [RejectedReading] = []
        for reading in batch.readings {
            func reject(_ code: String, _ message: String) {
                rejected.append(RejectedReading(sequence: reading.sequence, sensor: reading.sensor.rawValue, code: code, message: message))
            }
            guard let quantity = quantities[reading.sensor] else {
                reject(RejectionCode.unknownSensor, "the batch has no descriptor for sensor '\(reading.sensor)'; list every sensor a reading names in the batch's sensors")
                continue
            }
            guard reading.value.isFinite else {
                reject(RejectionCode.notFinite, "the value is \(reading.value); send only finite numbers and flag a faulty sensor instead")
                continue
            }
            let range = quantity.plausibleRange
            guard range.contains(reading.value) else {
                reject(
                    RejectionCode.outOfRange,
                    "\(reading.value) \(quantity.unit) is outside the plausible range \(range.lowerBound)...\(range.upperBound) for \(quantity.rawValue); check the sensor's quantity and calibration")
                continue
            }
            guard reading.timestamp.microseconds <= latestAllowed else {
                reject(
                    RejectionCode.timestampInFuture,
                    "the timestamp \(reading.timestamp) is later than the ingest's clock (\(now)) allows; synchronise the device's clock (NTP) and check its time zone setting")
                continue
            }
            guard reading.timestamp >= Timestamp.earliestPlausible else {
                reject(
                    RejectionCode.timestampImplausible,
                    "the timestamp \(reading.timestamp) is before 2000-01-01; the device's clock was not set when the reading was taken")
                continue
            }
            guard reading.sequence <= UInt64(Int64.max) else {
                reject(RejectionCode.invalidSequence, "sequence \(reading.sequence) is larger than \(Int64.max)")
                continue
            }
            valid.append(reading)
        }
        return (Batch(device: batch.device, sensors: batch.sensors, readings: valid), rejected)
    }
}
