import FarmgateSupport
import FarmgateWire
import Testing

@testable import FarmgateIngest

/// The engine skips a rule without an alert when a batch's summary shows that its condition holds at none of the
/// sensor's readings (``SensorReadings/skips(_:memory:)``). These tests hold that shortcut against what evaluating
/// reading by reading does (the engine's loop for a series without an alert): a skip must never hide a reading at
/// which the condition holds or one out of order, and must leave the memory as the loop leaves it.
@Suite("Alert engine's per-sensor batch summary against reading-by-reading evaluation")
struct AlertSensorReadingsTests {
    /// The engine's loop for a series without a stored alert, up to the first reading that would record something:
    /// true when one would (out of order, or the condition holds), with the memory as the loop left it.
    static func wouldRecord(_ condition: AlertCondition, _ readings: [CommittedReading], after: Timestamp?, memory: inout SeriesMemory) -> Bool {
        var newest = after
        for reading in readings {
            if let newest, reading.timestamp <= newest { return true }
            newest = reading.timestamp
            let holds = AlertEvaluator.holds(condition, value: reading.value, quality: reading.quality, at: reading.timestamp, active: false, memory: &memory)
            if holds == true { return true }
        }
        return false
    }

    static func rule(_ kind: String, _ configure: (inout AlertRuleSpec) -> Void) throws -> AlertCondition {
        var spec = AlertRuleSpec()
        spec.name = "r"
        spec.kind = kind
        configure(&spec)
        return AlertCondition(try spec.validated())
    }

    // A tester, 2026-12-07: rate_of_change fired at a change of exactly its threshold, `above` only past it.
    @Test("rate_of_change, like above and below, holds only past its threshold, and the batch summary skips a batch that only reaches it")
    func thresholdItself() throws {
        let sensor = try SensorID("tank1.ph")
        func readings(_ values: [Double]) -> [CommittedReading] {
            values.enumerated().map { index, value in
                CommittedReading(
                    sensorRowID: 1, sensor: sensor, quantity: .ph, sequence: UInt64(index + 1),
                    timestamp: Timestamp(microseconds: testNow.microseconds + Int64(index) * 1_000_000), value: value, quality: [])
            }
        }
        // Binary-exact values, so that "exactly the threshold" is exact.
        let cases: [(AlertCondition, [Double], Bool)] = try [
            (Self.rule("rate_of_change") { $0.threshold = 0.5; $0.window = "10m" }, [6.0, 6.5], false),
            (Self.rule("rate_of_change") { $0.threshold = 0.5; $0.window = "10m" }, [6.0, 6.625], true),
            (Self.rule("rate_of_change") { $0.threshold = 0.5; $0.window = "10m" }, [6.5, 6.0], false),
            (Self.rule("above") { $0.threshold = 6.5 }, [6.0, 6.5], false),
            (Self.rule("below") { $0.threshold = 6.0 }, [6.5, 6.0], false),
        ]
        for (condition, values, fires) in cases {
            var memory = SeriesMemory()
            #expect(Self.wouldRecord(condition, readings(values), after: nil, memory: &memory) == fires, "\(condition.kind) \(values)")
            var summary = try #require(SensorReadings(readings(values), after: nil))
            var skipMemory = SeriesMemory()
            #expect(summary.skips(condition, memory: &skipMemory) == !fires, "\(condition.kind) \(values)")
        }
    }

    static func conditions() throws -> [AlertCondition] {
        try [
            rule("above") { $0.threshold = 6.2 },
            rule("above") { $0.threshold = 6.2; $0.clear = 6.0; $0.for = "5m" },
            rule("below") { $0.threshold = 5.9 },
            rule("below") { $0.threshold = 5.9; $0.clear = 6.1 },
            rule("out_of_range") { $0.min = 5.8; $0.max = 6.3 },
            rule("out_of_range") { $0.min = 5.8 },
            rule("out_of_range") { $0.max = 6.3 },
            rule("out_of_range") { _ in },
            rule("sensor_fault") { $0.count = 1 },
            rule("sensor_fault") { $0.count = 3 },
            rule("rate_of_change") { $0.threshold = 0.2; $0.window = "1m" },
            // Rate rules share one window run per length when their windows hold the same readings (``SensorReadings``):
            // several of one length, with different thresholds and starting windows, and one of another length.
            rule("rate_of_change") { $0.threshold = 0.05; $0.window = "1m" },
            rule("rate_of_change") { $0.threshold = 0.5; $0.window = "1m" },
            rule("rate_of_change") { $0.threshold = 0.3; $0.window = "1m" },
            rule("rate_of_change") { $0.threshold = 0.1; $0.window = "2m" },
        ]
    }

    @Test("a skip never hides a recording reading and leaves the memory as the loop does", arguments: [UInt64(1), 2, 3, 4, 5, 6])
    func againstTheLoop(seed: UInt64) throws {
        var random = SplitMix64(seed: seed)
        let conditions = try Self.conditions()
        let sensor = try SensorID("tank1.ph")
        var skipped = 0
        var evaluated = 0
        var rateSkipped = 0
        for _ in 0..<3_000 {
            // 1 to 20 readings in time order (sometimes two at one instant), values around the levels above, now and
            // then flagged; sometimes `after` lies inside the batch (readings out of order for a series without alert).
            var time = Int64(random.next() % 1_000) * 1_000_000
            var readings: [CommittedReading] = []
            for index in 0..<Int(1 + random.next() % 20) {
                time += Int64(random.next() % 4) * 5_000_000
                var quality: QualityFlags = []
                if random.next() % 8 == 0 { quality.insert(.sensorFault) }
                if random.next() % 8 == 0 { quality.insert(.outOfRange) }
                let value = 5.7 + Double(random.next() % 700) / 1000
                readings.append(
                    CommittedReading(
                        sensorRowID: 1, sensor: sensor, quantity: .ph, sequence: UInt64(index + 1), timestamp: Timestamp(microseconds: time), value: value,
                        quality: quality))
            }
            let after: Timestamp? =
                switch random.next() % 4 {
                case 0: nil
                case 1: readings.randomElement(using: &random)?.timestamp
                default: Timestamp(microseconds: (readings.first?.timestamp.microseconds ?? 0) - 1)
                }
            // Most batches start from an empty memory; some with a fault run or a filled window from before.
            var start = SeriesMemory()
            if random.next() % 3 == 0 { start.faultRun = Int(random.next() % 4) }
            if random.next() % 3 == 0 { start.window.append((readings.first?.timestamp.microseconds ?? 0) - 10_000_000, 5.7 + Double(random.next() % 700) / 1000) }
            // A second starting memory, given to every third rule: a window that holds other readings than the first.
            var other = start
            other.window.append((readings.first?.timestamp.microseconds ?? 0) - 5_000_000, 5.7 + Double(random.next() % 700) / 1000)
            var summary = try #require(SensorReadings(readings, after: after))
            for (index, condition) in conditions.enumerated() {
                let begin = index % 3 == 2 ? other : start
                var fast = begin
                var slow = begin
                let records = Self.wouldRecord(condition, readings, after: after, memory: &slow)
                if summary.skips(condition, memory: &fast) {
                    skipped += 1
                    if condition.kind == .rateOfChange { rateSkipped += 1 }
                    #expect(!records, "a skipped \(condition.kind) rule records something at some reading")
                    #expect(fast.faultRun == slow.faultRun && fast.window == slow.window, "memory after a skip of \(condition.kind)")
                } else {
                    evaluated += 1
                    #expect(fast.faultRun == begin.faultRun && fast.window == begin.window, "memory touched without a skip")
                }
            }
        }
        // Both paths are exercised.
        #expect(skipped > 1_000 && evaluated > 1_000)
        #expect(rateSkipped > 500)
    }

    @Test("the columns hold the readings in order, and readings at or before `after` or repeated instants are out of order")
    func columnsAndOrder() throws {
        let sensor = try SensorID("tank1.ec")
        func reading(_ seconds: Int64, _ value: Double, _ quality: QualityFlags = []) -> CommittedReading {
            CommittedReading(
                sensorRowID: 7, sensor: sensor, quantity: .electricalConductivity, sequence: UInt64(seconds), timestamp: Timestamp(microseconds: seconds * 1_000_000),
                value: value, quality: quality)
        }
        #expect(SensorReadings([], after: nil) == nil)
        let batch = [reading(10, 1500), reading(20, 1400, .sensorFault), reading(30, 1600, .outOfRange)]
        let summary = try #require(SensorReadings(batch, after: Timestamp(microseconds: 9_000_000)))
        #expect(summary.sensor == "tank1.ec" && summary.quantity == .electricalConductivity)
        #expect(summary.times == batch.map(\.timestamp) && summary.values == [1500, 1400, 1600] && summary.count == 3)
        #expect(summary.inOrder && summary.faulty && summary.flaggedOutOfRange)
        #expect(summary.lowest == 1500 && summary.highest == 1600)
        #expect(try #require(SensorReadings(batch, after: Timestamp(microseconds: 10_000_000))).inOrder == false)
        #expect(try #require(SensorReadings([reading(10, 1), reading(10, 2)], after: nil)).inOrder == false)
    }
}
