public import FarmgateWire
import Foundation

extension Timestamp {
    /// 2000-01-01T00:00:00Z: no reading of a real sensor is older.
    public static let earliestPlausible = Timestamp(microseconds: 946_684_800_000_000)
}

/// Checks readings one at a time, so that one bad reading never costs the rest of its batch.
///
/// Checks that need the store (a sensor registered with another quantity) are done by the store inside its transaction.
///
/// Timestamps: a reading must be stamped on or after 2000-01-01 (``Timestamp/earliestPlausible``). A reading flagged
/// `clock_unsynchronized` was stamped by a clock the device itself did not trust (a Raspberry Pi without RTC boots with
/// the time of its last shutdown, or 1970, until NTP answers, maybe hours later on a farm without network); it may be
/// stamped anywhere up to ``unsynchronizedFutureLimit`` ahead of the ingest's clock and is stored with its flag, so that
/// it is never refused for good for its timestamp alone while that is plausible. Every other reading may be at most
/// ``futureTolerance`` ahead.
public struct ReadingValidator: Sendable {
    /// How far past `now` the timestamp of a reading from a synchronised clock may be.
    public var futureTolerance: Duration
    /// How far past `now` the timestamp of a reading flagged `clock_unsynchronized` may be (default 366 days: a clock
    /// restored from a stale fake-hwclock file or a drifting RTC, but not a random one).
    public var unsynchronizedFutureLimit: Duration

    public init(futureTolerance: Duration, unsynchronizedFutureLimit: Duration = .seconds(366 * 86_400)) {
        self.futureTolerance = futureTolerance
        self.unsynchronizedFutureLimit = unsynchronizedFutureLimit
    }

    /// The latest timestamp allowed `ahead` of `now`, in microseconds (saturating).
    static func latest(_ now: Timestamp, ahead: Duration) -> Int64 {
        let components = ahead.components
        let microseconds = components.seconds.multipliedReportingOverflow(by: 1_000_000)
        guard !microseconds.overflow else { return components.seconds < 0 ? Int64.min : Int64.max }
        let sum = now.microseconds.addingReportingOverflow(microseconds.partialValue + components.attoseconds / 1_000_000_000_000)
        return sum.overflow ? Int64.max : sum.partialValue
    }

    /// Splits `batch` into the readings that may be stored (returned as a batch) and those refused, with reasons.
    ///
    /// - Parameter now: the ingest's clock.
    public func validate(_ batch: Batch, now: Timestamp) -> (valid: Batch, rejected: [RejectedReading]) {
        var quantities: [SensorID: Quantity] = [:]
        for descriptor in batch.sensors where quantities[descriptor.id] == nil {
            quantities[descriptor.id] = descriptor.quantity
        }
        let latestAllowed = Self.latest(now, ahead: futureTolerance)
        let latestUnsynchronized = Self.latest(now, ahead: unsynchronizedFutureLimit)

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
            // The JSON decoder refuses an unknown flag name; a binary frame carries bits, checked here.
            let unknownFlags = reading.quality.subtracting(.known)
            guard unknownFlags.isEmpty else {
                let known = QualityFlags.names.map { "\($0.1) (0x\(String($0.0.rawValue, radix: 16)))" }.joined(separator: ", ")
                reject(
                    RejectionCode.invalidReading,
                    "quality flags 0x\(String(unknownFlags.rawValue, radix: 16)) are not defined by the wire format (known: \(known)); send only those")
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
            if reading.quality.contains(.clockUnsynchronized) {
                guard reading.timestamp.microseconds <= latestUnsynchronized else {
                    reject(
                        RejectionCode.timestampInFuture,
                        "the timestamp \(reading.timestamp) is more than \(Self.days(unsynchronizedFutureLimit)) ahead of the ingest's clock (\(now)), too far even for a clock flagged unsynchronised; check the device's clock source (RTC, fake-hwclock)")
                    continue
                }
            } else {
                guard reading.timestamp.microseconds <= latestAllowed else {
                    reject(
                        RejectionCode.timestampInFuture,
                        "the timestamp \(reading.timestamp) is later than the ingest's clock (\(now)) allows; synchronise the device's clock (NTP) and check its time zone setting")
                    continue
                }
            }
            guard reading.timestamp >= Timestamp.earliestPlausible else {
                reject(
                    RejectionCode.timestampImplausible,
                    "the timestamp \(reading.timestamp) is before 2000-01-01; the device's clock was not set when the reading was taken")
                continue
            }
            guard reading.sequence <= UInt64(Int64.max) else {
                // Without a sequence, as the JSON decoder reports one: a number the ingest cannot store names nothing.
                rejected.append(
                    RejectedReading(
                        sequence: nil, sensor: reading.sensor.rawValue, code: RejectionCode.invalidSequence,
                        message: "sequence \(reading.sequence) is larger than \(Int64.max), the largest the ingest stores"))
                continue
            }
            if reading.value == 0, reading.value.sign == .minus {
                // -0.0 is stored as 0: SQLite keeps an integral REAL as an integer, which has no sign, and PostgreSQL
                // keeps the sign, so the two stores (and a store's raw answer against its rollups) would disagree.
                var unsigned = reading
                unsigned.value = 0
                valid.append(unsigned)
                continue
            }
            valid.append(reading)
        }
        return (Batch(device: batch.device, sensors: batch.sensors, readings: valid), rejected)
    }

    /// What is wrong with the times of a calibration event (`time` and each point's `at`), or nil. They are held to the
    /// bounds of a reading from a synchronised clock, 2000-01-01 to ``futureTolerance`` past `now`: an event has no
    /// `clock_unsynchronized` flag, and one stamped outside them is wrong for good. Taken, an event at year 10000 or later
    /// could not be read back (RFC 3339 has four-digit years) and, being the newest, would hide the sensor's real
    /// calibrations from `GET …/calibrations?limit=1` and from `calibration_overdue` rules.
    ///
    /// - Parameter now: the ingest's clock.
    public func problem(of event: CalibrationEvent, now: Timestamp) -> String? {
        let latestAllowed = Self.latest(now, ahead: futureTolerance)
        for (field, time) in [("time", event.time)] + event.points.enumerated().map({ ("points[\($0.offset)].at", $0.element.at) }) {
            if time.microseconds > latestAllowed {
                return "calibration event \(event.id): \(field) \(time) is later than the ingest's clock (\(now)) allows; synchronise the site's clock (NTP) before calibrating"
            }
            if time < Timestamp.earliestPlausible {
                return "calibration event \(event.id): \(field) \(time) is before 2000-01-01; the site's clock was not set when it calibrated"
            }
        }
        return nil
    }

    /// A duration in whole days, or in seconds below one day, for messages.
    static func days(_ duration: Duration) -> String {
        let seconds = duration.components.seconds
        return seconds >= 86_400 ? "\(seconds / 86_400) days" : "\(seconds) s"
    }
}
