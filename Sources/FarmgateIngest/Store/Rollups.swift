public import FarmgateWire

/// The summaries kept beside raw readings: one row per sensor and bucket at each level, so that a day at 1-minute
/// resolution or a year at 1-day resolution is read from at most a few thousand rows whatever the sampling rate.
///
/// Both stores keep them the same way: the write transaction that stores readings for the first time merges them
/// (``StoreOutcome/fresh``, never a duplicate, so nothing counts twice) into `rollups_1m`, `rollups_1h` and `rollups_1d`
/// (SQLite: one upsert statement per level; PostgreSQL: one insert per level inside the group's single write
/// statement). A backlog that arrives days late updates the old buckets it falls in, in the same
/// way. Each level has its own retention (`[retention]`); on PostgreSQL `rollups_1m` is partitioned by month, so that
/// its retention drops whole months (``PostgresSchema/partitionedMinuteRollups``).
///
/// ## What a bucket holds
/// `count` is every stored reading in the bucket. Readings flagged `sensor_fault` are counted there but left out of
/// the value statistics (`min`, `max`, `mean`, `last`): a faulted probe's value is not a measurement, and one garbage
/// value would own the bucket's min or max. `valid_count` is the readings that are in the statistics, so
/// `count - valid_count` is how many were faulted; the statistics are nil when every reading of the bucket was faulted.
/// Other flags (`clock_unsynchronized`, `calibrating`, ...) do not exclude a reading: it is stored raw as it is, and its
/// rollup agrees with the raw readings. `mean` is `sum / valid_count` (both kept, so that merging stays exact); `last`
/// is the value at the latest timestamp (then the highest sequence).
public enum RollupLevel: String, Sendable, Hashable, CaseIterable, Comparable {
    case minute = "1m"
    case hour = "1h"
    case day = "1d"

    /// The bucket width in microseconds. Buckets start at multiples of it since the Unix epoch (UTC).
    public var width: Int64 {
        switch self {
        case .minute: 60_000_000
        case .hour: 3_600_000_000
        case .day: 86_400_000_000
        }
    }

    /// The table that holds this level on both stores.
    var table: String { "rollups_" + rawValue }

    /// The start of the bucket holding `microseconds`.
    public func bucket(of microseconds: Int64) -> Int64 {
        let remainder = microseconds % width
        return microseconds - (remainder < 0 ? remainder + width : remainder)
    }

    /// The starts of the first and last buckets wholly inside `from..<to`, or nil when none is.
    func wholeBuckets(from: Timestamp, to: Timestamp) -> (first: Int64, last: Int64)? {
        let start = bucket(of: from.microseconds)
        let (first, firstOverflow) = start == from.microseconds ? (start, false) : start.addingReportingOverflow(width)
        let (last, lastOverflow) = bucket(of: to.microseconds).subtractingReportingOverflow(width)
        guard !firstOverflow, !lastOverflow, first <= last else { return nil }
        return (first, last)
    }

    public static func < (lhs: RollupLevel, rhs: RollupLevel) -> Bool { lhs.width < rhs.width }
}

/// One bucket of one sensor as the read API returns it.
public struct RollupPoint: Sendable, Hashable {
    /// The bucket's start.
    public var start: Timestamp
    /// Every reading in the bucket, faulted ones included.
    public var count: Int
    /// The readings in the statistics (not flagged `sensor_fault`).
    public var validCount: Int
    /// Nil when every reading of the bucket was faulted.
    public var min: Double?
    public var max: Double?
    public var mean: Double?
    /// The value at the latest timestamp, and that timestamp.
    public var last: Double?
    public var lastTimestamp: Timestamp?

    public init(
        start: Timestamp, count: Int, validCount: Int, min: Double?, max: Double?, mean: Double?, last: Double?, lastTimestamp: Timestamp?
    ) {
        self.start = start
        self.count = count
        self.validCount = validCount
        self.min = min
        self.max = max
        self.mean = mean
        self.last = last
        self.lastTimestamp = lastTimestamp
    }

    /// A point from a stored row's columns (`sum` is only read when `validCount > 0`).
    init(start: Int64, count: Int64, validCount: Int64, sum: Double, min: Double?, max: Double?, lastTimestamp: Int64?, last: Double?) {
        let valid = Int(validCount)
        self.init(
            start: Timestamp(microseconds: start), count: Int(count), validCount: valid, min: valid > 0 ? min : nil, max: valid > 0 ? max : nil,
            mean: valid > 0 ? sum / Double(valid) : nil, last: valid > 0 ? last : nil,
            lastTimestamp: valid > 0 ? lastTimestamp.map { Timestamp(microseconds: $0) } : nil)
    }
}

/// What one transaction adds to one (sensor, bucket): the partial aggregate that the upsert merges into the stored row.
struct RollupPartial: Sendable, Hashable {
    var sensorRowID: Int64
    var bucket: Int64
    var count: Int64 = 0
    var validCount: Int64 = 0
    var sum: Double = 0
    /// Meaningful only when `validCount > 0` (the statements write NULL otherwise).
    var min: Double = 0
    var max: Double = 0
    var lastTimestamp: Int64 = 0
    var lastSequence: Int64 = 0
    var lastValue: Double = 0

    /// Whether a reading's value enters the statistics: a reading flagged `sensor_fault` is only counted.
    static func isValid(_ quality: QualityFlags) -> Bool { !quality.contains(.sensorFault) }

    mutating func add(timestamp: Int64, sequence: Int64, value: Double, quality: QualityFlags) {
        count += 1
        guard Self.isValid(quality) else { return }
        if validCount == 0 {
            (min, max) = (value, value)
            (lastTimestamp, lastSequence, lastValue) = (timestamp, sequence, value)
        } else {
            min = Swift.min(min, value)
            max = Swift.max(max, value)
            if (timestamp, sequence) > (lastTimestamp, lastSequence) {
                (lastTimestamp, lastSequence, lastValue) = (timestamp, sequence, value)
            }
        }
        validCount += 1
        sum += value
    }

    /// The partial aggregates of `readings` at every level, in ``RollupLevel/allCases`` order, one per (sensor,
    /// bucket), each level's ordered by sensor then bucket (a fixed order, so that concurrent transactions take row
    /// locks in the same order).
    ///
    /// The readings in (sensor, time) order, ties in their order in `readings`, then a pass per level in which a bucket
    /// is a run of that order: no hashing per reading and level (a dictionary per level was most of the rollups' cost
    /// on the write path). The order is made by grouping the readings by sensor (in their order) and sorting a group
    /// only when its times are not already ascending, as a site sends them: a sort of the whole batch, whose sensors
    /// take turns, cost a twentieth of a backlog's store time.
    static func partialsByLevel(of readings: [CommittedReading]) -> [[RollupPartial]] {
        var groupOf: [Int64: Int] = [:]
        var groups: [(sensor: Int64, indices: [Int])] = []
        for index in readings.indices {
            let sensor = readings[index].sensorRowID
            if let group = groupOf[sensor] {
                groups[group].indices.append(index)
            } else {
                groupOf[sensor] = groups.count
                groups.append((sensor, [index]))
            }
        }
        groups.sort { $0.sensor < $1.sensor }
        var order: [(sensor: Int64, time: Int64, index: Int)] = []
        order.reserveCapacity(readings.count)
        for group in groups {
            let start = order.count
            var ascending = true
            var previous = Int64.min
            for index in group.indices {
                let time = readings[index].timestamp.microseconds
                if time < previous { ascending = false }
                previous = time
                order.append((group.sensor, time, index))
            }
            // Readings of one sensor and time stay in their order.
            if !ascending { order[start...].sort { ($0.time, $0.index) < ($1.time, $1.index) } }
        }
        return RollupLevel.allCases.map { level in
            var partials: [RollupPartial] = []
            for entry in order {
                let bucket = level.bucket(of: entry.time)
                if partials.last.map({ $0.sensorRowID != entry.sensor || $0.bucket != bucket }) ?? true {
                    partials.append(RollupPartial(sensorRowID: entry.sensor, bucket: bucket))
                }
                let reading = readings[entry.index]
                partials[partials.count - 1].add(
                    timestamp: entry.time, sequence: Int64(clamping: reading.sequence), value: reading.value, quality: reading.quality)
            }
            return partials
        }
    }
}

/// The `ON CONFLICT` merge both stores use, so that SQLite and PostgreSQL agree to the bit: counts and sums add, min and
/// max take the smaller and larger of the non-null ones, `last` moves only to a later (timestamp, sequence).
enum RollupSQL {
    static func merge(table: String, excluded: String = "excluded") -> String {
        let newer = "\(excluded).last_us IS NOT NULL AND (\(table).last_us IS NULL OR (\(excluded).last_us, \(excluded).last_sequence) > (\(table).last_us, \(table).last_sequence))"
        return """
            ON CONFLICT (sensor_id, bucket_us) DO UPDATE SET
                count = \(table).count + \(excluded).count,
                valid_count = \(table).valid_count + \(excluded).valid_count,
                sum_value = \(table).sum_value + \(excluded).sum_value,
                min_value = CASE WHEN \(table).min_value IS NULL OR \(excluded).min_value < \(table).min_value THEN coalesce(\(excluded).min_value, \(table).min_value) ELSE \(table).min_value END,
                max_value = CASE WHEN \(table).max_value IS NULL OR \(excluded).max_value > \(table).max_value THEN coalesce(\(excluded).max_value, \(table).max_value) ELSE \(table).max_value END,
                last_value = CASE WHEN \(newer) THEN \(excluded).last_value ELSE \(table).last_value END,
                last_sequence = CASE WHEN \(newer) THEN \(excluded).last_sequence ELSE \(table).last_sequence END,
                last_us = CASE WHEN \(newer) THEN \(excluded).last_us ELSE \(table).last_us END
            """
    }
}
