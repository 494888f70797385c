import FarmgateWire
import Foundation

/// A small, fast, seedable generator (SplitMix64), so that runs of the benchmark are comparable.
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A normally distributed number (Box–Muller).
    mutating func normal(mean: Double = 0, deviation: Double) -> Double {
        let u1 = Double.random(in: Double.ulpOfOne..<1, using: &self)
        let u2 = Double.random(in: 0..<1, using: &self)
        return mean + deviation * (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)
    }
}

/// Readings as a hydroponic site with `tanks` tanks produces them, each tank with an EZO-pH, an EZO-EC and a DS18B20.
///
/// - Every sensor is sampled every `period` seconds on its own phase (uniformly random, so schedules are staggered).
/// - The recorded timestamp is the scheduled instant plus scheduler jitter (normal, σ = 2 ms), at millisecond precision.
/// - Readings are committed, and get their device-wide sequence number, when the read completes: an EZO-pH read takes
///   about 900 ms, an EZO-EC 600 ms, a DS18B20 conversion 750 ms, each ± 20 ms. So commit order is not timestamp order.
/// - pH: 5.8–6.4 per tank, drifting up slowly as plants take up nutrients, noise σ = 0.01 pH (±0.02 at 2σ), declared at 0.01.
/// - EC: 1000–2000 µS/cm per tank, drifting down slowly, noise σ = 2.5 µS/cm, reported in whole µS/cm (as the EZO-EC does
///   at that range), declared at 0.1 µS/cm.
/// - Water temperature: 18–24 °C per tank with a daily swing of ±1.5 °C, noise σ = 0.03 °C, read at 1/16 °C.
/// - One read in 200 fails (no reading); one in 2000 carries the sensor_fault flag.
struct RealisticSite {
    var device: DeviceID
    var sensors: [SensorDescriptor]
    /// All readings in sequence order, sequences from 1.
    var readings: [Reading]

    init(tanks: Int, readingCount: Int, period: Double = 10, seed: UInt64) throws {
        var rng = SeededGenerator(seed: seed)
        device = try DeviceID("greenhouse-2")
        struct Channel {
            var descriptor: SensorDescriptor
            var phaseMs: Int64
            var readMs: Double
            var base: Double
            var drift: Double  // per hour
        }
        var channels: [Channel] = []
        for tank in 1...tanks {
            let ph = Double.random(in: 5.8...6.4, using: &rng)
            let ec = Double.random(in: 1000...2000, using: &rng)
            let temperature = Double.random(in: 18...24, using: &rng)
            let periodMs = Int64(period * 1000)
            channels.append(Channel(
                descriptor: SensorDescriptor(id: try SensorID("tank\(tank).ph"), quantity: .ph),
                phaseMs: Int64.random(in: 0..<periodMs, using: &rng), readMs: 900, base: ph,
                drift: Double.random(in: 0.02...0.08, using: &rng)))
            channels.append(Channel(
                descriptor: SensorDescriptor(id: try SensorID("tank\(tank).ec"), quantity: .electricalConductivity),
                phaseMs: Int64.random(in: 0..<periodMs, using: &rng), readMs: 600, base: ec,
                drift: -Double.random(in: 5...25, using: &rng)))
            channels.append(Channel(
                descriptor: SensorDescriptor(id: try SensorID("tank\(tank).temp"), quantity: .temperature),
                phaseMs: Int64.random(in: 0..<periodMs, using: &rng), readMs: 750, base: temperature, drift: 0))
        }
        sensors = channels.map(\.descriptor)

        let start: Int64 = 1_795_428_000_000  // 2026-11-23T10:00:00Z in ms
        let periodMs = Int64(period * 1000)
        var pending: [(completion: Double, reading: Reading)] = []
        let rounds = readingCount / channels.count + 2
        pending.reserveCapacity(rounds * channels.count)
        for round in 0..<rounds {
            for channel in channels {
                let scheduled = start + channel.phaseMs + Int64(round) * periodMs
                let jitter = Int64(rng.normal(deviation: 2).rounded())
                let timestampMs = scheduled + jitter
                let hours = Double(timestampMs - start) / 3_600_000
                if Int.random(in: 0..<200, using: &rng) == 0 { continue }  // a failed read
                let value: Double
                switch channel.descriptor.quantity {
                case .ph:
                    value = channel.base + channel.drift * hours + rng.normal(deviation: 0.01)
                case .electricalConductivity:
                    value = (channel.base + channel.drift * hours + rng.normal(deviation: 2.5)).rounded()
                default:
                    let daily = 1.5 * cos(2 * Double.pi * hours / 24)
                    let raw = channel.base + daily + rng.normal(deviation: 0.03)
                    value = (raw * 16).rounded() / 16
                }
                let flags: QualityFlags = Int.random(in: 0..<2000, using: &rng) == 0 ? .sensorFault : []
                let completion = Double(timestampMs) + channel.readMs + rng.normal(deviation: 20)
                pending.append((completion, Reading(
                    sensor: channel.descriptor.id, sequence: 0, timestamp: Timestamp(microseconds: timestampMs * 1000),
                    value: value, quality: flags)))
            }
        }
        pending.sort { $0.completion < $1.completion }
        readings = pending.prefix(readingCount).enumerated().map { index, entry in
            var reading = entry.reading
            reading.sequence = UInt64(index + 1)
            return reading
        }
    }

    /// The readings cut into batches of `size` consecutive sequence numbers, as the uploader sends them.
    func batches(of size: Int) -> [Batch] {
        stride(from: 0, to: readings.count, by: size).map { offset in
            let slice = Array(readings[offset..<min(offset + size, readings.count)])
            let used = Set(slice.map(\.sensor))
            return Batch(device: device, sensors: sensors.filter { used.contains($0.id) }, readings: slice)
        }
    }
}
