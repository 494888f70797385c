import FarmgateWire

/// One sensor's readings of a batch in time order, as plain columns, and what the rules without a stored alert need to
/// know about them as a whole.
///
/// The engine runs every rule that selects a sensor over that sensor's readings; with 1,000 rules that is hundreds of
/// rules per sensor. Columns let the loop over rules read a reading without copying a ``CommittedReading`` (which holds
/// reference-counted names), and the summary (lowest and highest non-faulty value, any `out_of_range` or `sensor_fault`
/// flag) decides in O(1) per rule the common case, a rule without an alert whose condition holds at none of the
/// readings (``skips(_:memory:)``).
struct SensorReadings {
    let sensor: String
    let quantity: Quantity
    private(set) var times: [Timestamp] = []
    private(set) var values: [Double] = []
    private(set) var qualities: [QualityFlags] = []
    /// Every reading is newer than `after` and than the reading before it: a rule without a stored alert (whose newest
    /// judged reading is `after`) evaluates each of them in place, none is out of order.
    private(set) var inOrder = true
    /// Lowest and highest value of the readings not flagged `sensor_fault` (±infinity when there is none).
    private(set) var lowest = Double.infinity
    private(set) var highest = -Double.infinity
    /// Some reading not flagged `sensor_fault` carries the site's `out_of_range` flag.
    private(set) var flaggedOutOfRange = false
    /// Some reading is flagged `sensor_fault`.
    private(set) var faulty = false
    /// Per window length: a rate window taken through these readings once, for every rate-of-change rule without an
    /// alert whose window held the same readings before the batch (``RateRun``).
    private var rateRuns: [Int64: RateRun] = [:]

    /// One rate window taken through the batch: where it started, where it ended, and the largest spread it had at a
    /// reading (the condition `spread > threshold` holds at some reading exactly when this is past the threshold).
    private struct RateRun {
        var before: RateWindow
        var after: RateWindow
        var largestSpread: Double
    }

    var count: Int { times.count }

    /// - Parameters:
    ///   - readings: one sensor's readings, sorted by time (then sequence).
    ///   - after: the newest reading time the engine evaluated in order on this sensor (nil: none).
    /// - Returns: nil when `readings` is empty.
    init?(_ readings: [CommittedReading], after: Timestamp?) {
        guard let first = readings.first else { return nil }
        sensor = first.sensor.rawValue
        quantity = first.quantity
        times.reserveCapacity(readings.count)
        values.reserveCapacity(readings.count)
        qualities.reserveCapacity(readings.count)
        var newest = after
        for reading in readings {
            if let newest, reading.timestamp <= newest { inOrder = false }
            newest = reading.timestamp
            times.append(reading.timestamp)
            values.append(reading.value)
            qualities.append(reading.quality)
            if reading.quality.contains(.sensorFault) {
                faulty = true
            } else {
                lowest = Swift.min(lowest, reading.value)
                highest = Swift.max(highest, reading.value)
                if reading.quality.contains(.outOfRange) { flaggedOutOfRange = true }
            }
        }
    }

    /// True when `condition`, for a series without a stored alert, holds at none of these readings, so that evaluating
    /// them one by one would record nothing; `memory` is then left as that evaluation would leave it. False when the
    /// summary cannot tell (readings out of order, a rate-of-change rule, a condition that holds somewhere): the
    /// engine then evaluates reading by reading.
    ///
    /// Without an alert the condition is judged as inactive (no hysteresis): `above` holds somewhere exactly when the
    /// highest non-faulty value is above the threshold, `below` when the lowest is below it, a range when either end
    /// is outside it, the flag form when a non-faulty reading carries the flag; a fault run is reset by the first
    /// reading that is not faulty, so without any faulty reading it ends at 0 and never reaches `count` (at least 1).
    ///
    /// A rate-of-change rule (the engine has ~50 on each pH sensor with 1,000 rules) takes its window through the
    /// readings once per window length: every rule whose window held the same readings before the batch (rules without
    /// an alert saw the same readings, so they normally do) ends with the same window, and holds somewhere exactly when
    /// the largest spread at a non-faulty reading is past its threshold. Such a rule is given the shared result (its
    /// buffers shared until it changes) instead of taking its own window through the readings.
    mutating func skips(_ condition: AlertCondition, memory: inout SeriesMemory) -> Bool {
        guard inOrder, !times.isEmpty else { return false }
        switch condition.kind {
        case .above:
            guard let threshold = condition.threshold else { return true }
            return !(highest > threshold)
        case .below:
            guard let threshold = condition.threshold else { return true }
            return !(lowest < threshold)
        case .outOfRange:
            if condition.min == nil, condition.max == nil { return !flaggedOutOfRange }
            let under = condition.min.map { lowest < $0 } ?? false
            let over = condition.max.map { highest > $0 } ?? false
            return !(under || over)
        case .sensorFault:
            guard !faulty, (condition.count ?? 1) >= 1 else { return false }
            memory.faultRun = 0
            return true
        case .rateOfChange:
            guard let threshold = condition.threshold, let length = condition.windowMicroseconds else { return true }
            let run: RateRun
            if let shared = rateRuns[length], shared.before.holdsSameReadings(as: memory.window) {
                run = shared
            } else {
                run = rateRun(from: memory.window, length: length)
                // The first window of each length seen in this batch is the one later rules are compared with.
                if rateRuns[length] == nil { rateRuns[length] = run }
            }
            guard run.largestSpread <= threshold else { return false }
            memory.window = run.after
            return true
        case .noData, .deviceOffline, .calibrationOverdue:
            return true  // not judged on readings
        }
    }

    /// `window` taken through the readings as ``AlertEvaluator/holds(_:value:quality:at:active:memory:)`` takes a rate
    /// window: each non-faulty reading appended, the readings older than the window dropped, the spread read.
    private func rateRun(from window: RateWindow, length: Int64) -> RateRun {
        var moved = window
        var largest = -Double.infinity
        for index in times.indices where !qualities[index].contains(.sensorFault) {
            let at = times[index].microseconds
            moved.append(at, values[index])
            moved.drop(before: at - length)
            largest = Swift.max(largest, moved.spread)
        }
        return RateRun(before: window, after: moved, largestSpread: largest)
    }
}
