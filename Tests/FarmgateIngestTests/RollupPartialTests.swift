import FarmgateWire
import Testing

@testable import FarmgateIngest

/// ``RollupPartial/partialsByLevel(of:)`` against a plain dictionary per level, on readings in no particular order.
@Suite("Rollup partials")
struct RollupPartialTests {
    @Test("sorted runs give the same partials as grouping by (sensor, bucket), in (sensor, bucket) order")
    func matchesGrouping() throws {
        var random = SystemRandomNumberGenerator()
        let sensor = try SensorID("tank1.ph")
        let day: Int64 = 86_400_000_000
        for round in 0..<20 {
            // Interleaved sensors, times over three days shuffled, repeated timestamps, some readings faulted.
            let readings = (0..<(round * 50 + 1)).map { index in
                CommittedReading(
                    sensorRowID: Int64.random(in: 1...5, using: &random), sensor: sensor, quantity: .ph, sequence: UInt64(index + 1),
                    timestamp: Timestamp(microseconds: 1_780_000_000_000_000 + Int64.random(in: -day...(2 * day), using: &random) / 7_000_000 * 7_000_000),
                    value: Double.random(in: 4...8, using: &random), quality: index % 5 == 0 ? [.sensorFault] : [])
            }
            let found = RollupPartial.partialsByLevel(of: readings)
            #expect(found.count == RollupLevel.allCases.count)
            for (level, partials) in zip(RollupLevel.allCases, found) {
                var expected: [[Int64]: RollupPartial] = [:]
                for reading in readings {
                    let key = [reading.sensorRowID, level.bucket(of: reading.timestamp.microseconds)]
                    expected[key, default: RollupPartial(sensorRowID: key[0], bucket: key[1])].add(
                        timestamp: reading.timestamp.microseconds, sequence: Int64(reading.sequence), value: reading.value, quality: reading.quality)
                }
                let ordered = expected.values.sorted { ($0.sensorRowID, $0.bucket) < ($1.sensorRowID, $1.bucket) }
                // Sums may differ in the last bits with the order of addition; everything else exactly.
                #expect(partials.count == ordered.count, "\(level)")
                for (got, want) in zip(partials, ordered) {
                    var adjusted = got
                    adjusted.sum = want.sum
                    #expect(adjusted == want, "\(level)")
                    #expect(abs(got.sum - want.sum) <= 1e-9 * max(1, abs(want.sum)), "\(level)")
                }
            }
        }
    }

    /// The order decides the sums' last bits, and both stores must agree to the bit: (sensor, time, place in the batch),
    /// whether a sensor's readings come ascending (as sites send them, the path that sorts nothing) or not.
    @Test("partials add readings in (sensor, time, place in the batch) order, to the bit, ascending or shuffled")
    func addsInSensorTimeBatchOrder() throws {
        var random = SystemRandomNumberGenerator()
        let sensor = try SensorID("tank1.ph")
        for round in 0..<20 {
            let count = round * 40 + 3
            let shuffled = round % 2 == 1
            // Five sensors taking turns; times ascending per sensor, or drawn at random with repeats.
            let readings = (0..<count).map { index in
                let time: Int64 = shuffled ? Int64.random(in: 0..<30, using: &random) * 20_000_000 : Int64(index / 5) * 1_000_000
                return CommittedReading(
                    sensorRowID: Int64(5 - index % 5), sensor: sensor, quantity: .ph, sequence: UInt64(index + 1),
                    timestamp: Timestamp(microseconds: 1_780_000_000_000_000 + time),
                    value: Double.random(in: -1e6...1e6, using: &random) * (index % 3 == 0 ? 1e-9 : 1), quality: [])
            }
            let order = readings.indices.sorted {
                (readings[$0].sensorRowID, readings[$0].timestamp.microseconds, $0) < (readings[$1].sensorRowID, readings[$1].timestamp.microseconds, $1)
            }
            let found = RollupPartial.partialsByLevel(of: readings)
            for (level, partials) in zip(RollupLevel.allCases, found) {
                var expected: [RollupPartial] = []
                for index in order {
                    let reading = readings[index]
                    let bucket = level.bucket(of: reading.timestamp.microseconds)
                    if expected.last.map({ $0.sensorRowID != reading.sensorRowID || $0.bucket != bucket }) ?? true {
                        expected.append(RollupPartial(sensorRowID: reading.sensorRowID, bucket: bucket))
                    }
                    expected[expected.count - 1].add(
                        timestamp: reading.timestamp.microseconds, sequence: Int64(reading.sequence), value: reading.value, quality: reading.quality)
                }
                let first = zip(partials, expected).first { $0 != $1 }.map { "first difference: \($0) against \($1)" }
                #expect(partials.count == expected.count && first == nil, "\(level), \(shuffled ? "shuffled" : "ascending"), \(count) readings; \(first ?? "")")
            }
        }
    }
}
