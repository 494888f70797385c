import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

/// Synthetic months of one device: `tank1.ph` and `tank1.temp` every 15 minutes, sequences interleaved in time order,
/// every 50th reading of each sensor flagged `sensor_fault` with a wild value that must never reach min, max or mean.
struct SyntheticMonths {
    static let ph = try! SensorID("tank1.ph")  // a literal: cannot fail
    static let temp = try! SensorID("tank1.temp")  // a literal: cannot fail
    static let step: Int64 = 15 * 60_000_000

    let start: Timestamp
    let readings: [Reading]

    /// Readings from `start` for `days` days.
    init(start: Timestamp, days: Int) {
        self.start = start
        var readings: [Reading] = []
        let slots = days * 96
        for slot in 0..<slots {
            let time = Timestamp(microseconds: start.microseconds + Int64(slot) * Self.step)
            for (index, sensor) in [Self.ph, Self.temp].enumerated() {
                let sequence = UInt64(slot * 2 + index + 1)
                let faulted = slot % 50 == 7
                let base = index == 0 ? 5.5 + Double((slot * 37) % 200) / 100 : 18 + Double((slot * 11) % 160) / 16
                readings.append(
                    Reading(sensor: sensor, sequence: sequence, timestamp: time, value: faulted ? 99 : base, quality: faulted ? [.sensorFault] : []))
            }
        }
        self.readings = readings
    }

    static var descriptors: [SensorDescriptor] {
        [SensorDescriptor(id: ph, quantity: .ph), SensorDescriptor(id: temp, quantity: .temperature)]
    }

    /// `readings` cut into batches of `size`, in order.
    static func batches(_ readings: [Reading], size: Int = 2_000) throws -> [Batch] {
        let device = try DeviceID("d1")
        return stride(from: 0, to: readings.count, by: size).map { first in
            Batch(device: device, sensors: descriptors, readings: Array(readings[first..<min(first + size, readings.count)]))
        }
    }
}

/// A rollup bucket computed directly from raw readings: what the stores must hold.
struct ExpectedBucket: Equatable, CustomStringConvertible {
    var start: Int64
    var count: Int
    var validCount: Int
    var min: Double?
    var max: Double?
    var sum: Double
    var last: Double?
    var lastTimestamp: Int64?
    var lastSequence: UInt64 = 0

    var description: String { "\(start): n=\(count) valid=\(validCount) min=\(min as Any) max=\(max as Any) sum=\(sum) last=\(last as Any)@\(lastTimestamp as Any)" }

    /// The buckets of one sensor's `readings` at `level`, in time order.
    static func of(_ readings: [Reading], sensor: SensorID, level: RollupLevel, from: Int64 = .min) -> [ExpectedBucket] {
        var buckets: [Int64: ExpectedBucket] = [:]
        for reading in readings where reading.sensor == sensor {
            let start = level.bucket(of: reading.timestamp.microseconds)
            guard start >= from else { continue }
            var bucket = buckets[start] ?? ExpectedBucket(start: start, count: 0, validCount: 0, sum: 0)
            bucket.count += 1
            if !reading.quality.contains(.sensorFault) {
                bucket.validCount += 1
                bucket.sum += reading.value
                bucket.min = Swift.min(bucket.min ?? reading.value, reading.value)
                bucket.max = Swift.max(bucket.max ?? reading.value, reading.value)
                let time = reading.timestamp.microseconds
                if bucket.lastTimestamp.map({ (time, reading.sequence) > ($0, bucket.lastSequence) }) ?? true {
                    (bucket.last, bucket.lastTimestamp, bucket.lastSequence) = (reading.value, time, reading.sequence)
                }
            }
            buckets[start] = bucket
        }
        return buckets.values.sorted { $0.start < $1.start }
    }

    /// Whether a stored point holds exactly this bucket (the mean to within rounding: sums merge in another order).
    func matches(_ point: RollupPoint) -> Bool {
        guard point.start.microseconds == start, point.count == count, point.validCount == validCount, point.min == min, point.max == max,
            point.last == last, point.lastTimestamp?.microseconds == lastTimestamp
        else { return false }
        guard validCount > 0, let mean = point.mean else { return point.mean == nil }
        return abs(mean - sum / Double(validCount)) <= 1e-9 * Swift.max(1, abs(mean))
    }
}

/// Every rollup point of `sensor` at `level`.
func allRollups(_ store: any IngestStore, sensor: Int64, level: RollupLevel) async throws -> [RollupPoint] {
    try await store.rollups(sensorRowID: sensor, level: level, from: nil, to: nil, limit: 1_000_000)
}

/// Checks that the store's rollups of `sensor` at `level` are exactly `expected`; returns how many differ.
@discardableResult
func expectRollups(
    _ store: any IngestStore, sensor: Int64, level: RollupLevel, _ expected: [ExpectedBucket], sourceLocation: SourceLocation = #_sourceLocation
) async throws -> Int {
    let points = try await allRollups(store, sensor: sensor, level: level)
    #expect(points.count == expected.count, "\(level.rawValue): \(points.count) buckets stored, \(expected.count) expected", sourceLocation: sourceLocation)
    var wrong = 0
    for (point, bucket) in zip(points, expected) where !bucket.matches(point) {
        if wrong < 3 { Issue.record("\(level.rawValue): stored \(point), expected \(bucket)", sourceLocation: sourceLocation) }
        wrong += 1
    }
    #expect(wrong == 0, sourceLocation: sourceLocation)
    return wrong
}

/// The row ids of `tank1.ph` and `tank1.temp` of `device`.
func syntheticSensorRows(_ store: any IngestStore, device: DeviceIdentity) async throws -> (ph: Int64, temp: Int64) {
    guard let ph = try await store.sensor(farmID: device.farmID, device: device.device, sensor: SyntheticMonths.ph),
        let temp = try await store.sensor(farmID: device.farmID, device: device.device, sensor: SyntheticMonths.temp)
    else { throw IngestStoreError.notFound("the synthetic sensors") }
    return (ph.rowID, temp.rowID)
}
