import FarmgateSupport
import PropertyBased
import Testing

@testable import FarmgateWire

@Suite("Binary batch codec: round trips")
struct BatchCodecRoundTripTests {
    @Test("decode(encode(b)) holds the same readings at each sensor's resolution, for random series")
    func randomSeries() async {
        await propertyCheck(count: 300, input: Gen.uint64(in: 0...UInt64.max), Gen.bool()) { seed, extreme in
            var rng = TestRandom(seed: seed)
            let batch = try Fixtures.randomBatch(&rng, extreme: extreme)
            for compressed in [true, false] {
                let frame = try BatchCodec.encode(batch, compressionLevel: 3, compressed: compressed)
                let decoded = try BatchCodec.decode(frame)
                #expect(decoded.device == batch.device)
                #expect(decoded.sensors == batch.sensors.sorted { $0.id < $1.id })
                #expect(decoded.readings.map(\.sequence) == decoded.readings.map(\.sequence).sorted(), "readings come back sorted by sequence")
                let got = Fixtures.canonical(decoded.readings), want = Fixtures.canonical(Fixtures.quantized(batch))
                #expect(got.count == want.count, "seed \(seed)")
                if let k = (0..<min(got.count, want.count)).first(where: { got[$0] != want[$0] }) {
                    Issue.record("seed \(seed), extreme \(extreme), compressed \(compressed): reading \(k) differs: \(Fixtures.describe(got[k])) instead of \(Fixtures.describe(want[k]))")
                }
            }
        }
    }

    @Test("an empty batch, a batch of sensors without readings and a single reading round-trip")
    func edgeCases() throws {
        let device = try Fixtures.device()
        let empty = Batch(device: device, sensors: [], readings: [])
        #expect(try BatchCodec.decode(BatchCodec.encode(empty)) == empty)

        let ph = SensorDescriptor(id: try SensorID("tank1.ph"), quantity: .ph)
        let idle = Batch(device: device, sensors: [ph], readings: [])
        #expect(try BatchCodec.decode(BatchCodec.encode(idle)) == idle)

        let one = Batch(device: device, sensors: [ph], readings: [
            Reading(sensor: ph.id, sequence: UInt64.max, timestamp: Timestamp(microseconds: Int64.min), value: -1.234, quality: .sensorFault)
        ])
        let decoded = try BatchCodec.decode(BatchCodec.encode(one))
        #expect(decoded.readings.count == 1)
        #expect(decoded.readings.first?.sequence == UInt64.max)
        #expect(decoded.readings.first?.timestamp.microseconds == Int64.min)
        #expect(decoded.readings.first?.value == Resolution.hundredth.value(ofSteps: -123))
        #expect(decoded.readings.first?.quality == .sensorFault)
    }

    @Test("timestamps and sequences at both ends of their ranges in one column")
    func extremes() throws {
        let temperature = SensorDescriptor(id: try SensorID("t"), quantity: .temperature, resolution: try Resolution(numerator: 7, denominator: 3))
        let times: [Int64] = [Int64.min, -1, 0, 1, Int64.max, Int64.max - 1, Int64.min + 1]
        let sequences: [UInt64] = [0, UInt64.max, 1, UInt64.max - 1, 1 << 63, 5, 0]
        let readings = zip(times, sequences).enumerated().map { k, pair in
            Reading(sensor: temperature.id, sequence: pair.1, timestamp: Timestamp(microseconds: pair.0), value: Double(k) * -1e6)
        }
        let batch = Batch(device: try Fixtures.device(), sensors: [temperature], readings: readings)
        let decoded = try BatchCodec.decode(BatchCodec.encode(batch))
        #expect(Fixtures.canonical(decoded.readings) == Fixtures.canonical(Fixtures.quantized(batch)))
    }

    @Test("encoding refuses what it cannot represent, naming the reading")
    func encodingErrors() throws {
        let device = try Fixtures.device()
        let ph = SensorDescriptor(id: try SensorID("tank1.ph"), quantity: .ph)
        let ts = Timestamp(microseconds: 0)
        func message(_ batch: Batch) -> String {
            do {
                _ = try BatchCodec.encode(batch)
                return ""
            } catch { return error.description }
        }
        #expect(message(Batch(device: device, sensors: [ph], readings: [Reading(sensor: ph.id, sequence: 7, timestamp: ts, value: .nan)]))
            .contains("reading 7 of sensor 'tank1.ph' has value nan, which is not finite"))
        #expect(message(Batch(device: device, sensors: [ph], readings: [Reading(sensor: ph.id, sequence: 8, timestamp: ts, value: 1e300)]))
            .contains("too large for resolution"))
        let other = try SensorID("tank2.ph")
        #expect(message(Batch(device: device, sensors: [ph], readings: [Reading(sensor: other, sequence: 9, timestamp: ts, value: 6)]))
            .contains("reading 9 names sensor 'tank2.ph', which has no descriptor"))
        #expect(message(Batch(device: device, sensors: [ph, ph], readings: [])).contains("described more than once"))
    }

    @Test("realistic data stays near one byte per reading")
    func realisticSize() throws {
        var total = 0
        for seed in 1...5 as ClosedRange<UInt64> {
            let batch = try Fixtures.realisticBatch(seed: seed, readings: 1000)
            let frame = try BatchCodec.encode(batch)
            total += frame.count
            #expect(Fixtures.canonical(try BatchCodec.decode(frame).readings) == Fixtures.canonical(Fixtures.quantized(batch)))
        }
        // 12 sensors, ±3 ms jitter, small noise: well under the 1.0 byte/reading goal; a regression in any stream shows here.
        #expect(Double(total) / 5000 < 1.0)
    }
}
