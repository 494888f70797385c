import FarmgateSupport
import FarmgateWire
import Foundation

/// Which kind of site the generator imitates.
enum DataProfile: String, CaseIterable, Sendable {
    /// What the Farmgate agent actually produces (see ``RealisticSite``): the figure the 1.0 byte/reading goal is about.
    case agent
    /// A harsher, less regular site than the agent makes: random phases, sequences in read-completion order, noisier
    /// sensors. Kept so that the codec is also measured on data it was not shaped around.
    case stress
}

/// Readings as a hydroponic site with `tanks` tanks produces them, each tank with an EZO-pH, an EZO-EC and a
/// temperature probe, configured in that order (tank1.ph, tank1.ec, tank1.temp, tank2.ph, ...).
///
/// ## Profile `agent`: what Farmgate's own sampler produces
/// - Schedule: every sensor runs on absolute ticks of `period`; sensors of the same interval are staggered evenly in
///   configuration order, sensor k of n at phase `period × k / n` [Sources/FarmgateAgent/Sampling/Sampler.swift, `run()`].
/// - Timestamp: taken when the read completes, `clock.now()` after `driver.read()` [Sampler.swift, `sampleOnce`], i.e. the
///   scheduled tick plus the read's duration: EZO-pH ~900 ms, EZO-EC ~600 ms [HARDWARE.md, EZO timing from
///   feastorg/ezo-driver src/ezo_product.c], RTD 600–1000 ms / DS18B20 12-bit conversion 750 ms [HARDWARE.md], taken as 750 ms.
///   Wake-up latency plus read-time variation: normal, σ = 2 ms. Stamped at whole milliseconds, truncated [WallClock.swift, `now()`].
///   The monotonic ticks and the wall clock are offset by a random fraction of a millisecond (the agent starts at an
///   arbitrary instant); NTP slew between them (a few ppm, < 0.1 ms per 10 s) is ignored.
/// - Sequence: the sample is appended to the buffer right after it is stamped and the group commit numbers samples in
///   append order [Sampler.swift, `sink.append`; ARCHITECTURE.md, delivery contract 1], so sequence order is timestamp
///   order; equal milliseconds are taken in configuration order.
/// - pH: 5.8–6.4 per tank, drifting up 0.02–0.08 pH/h as plants take up nutrients [HARDWARE.md, hydroponics 5.5–6.5];
///   noise σ = 0.004 pH (EZO-pH accuracy ±0.002, reading to 0.001), declared at 0.01.
/// - EC: 1000–2000 µS/cm per tank [HARDWARE.md, lettuce 0.6–1.2 to tomato 2.2–5 mS/cm], drifting down 5–25 µS/cm/h,
///   (both drifts reset once a day, when the dosing system corrects the tank), noise σ = 1 µS/cm, reported in whole µS/cm (the EZO-EC's output at that range), declared at 0.1 µS/cm.
/// - Water temperature: 18–24 °C per tank [HARDWARE.md, water 18–22 °C] with a daily swing of ±1.5 °C, noise σ = 0.03 °C,
///   quantized to 1/16 °C as the DS18B20 reads at 12 bits [HARDWARE.md, DS18B20].
/// - One read in 200 fails (no reading stored, the sensor keeps its schedule); one in 2000 carries the sensor_fault flag.
///
/// ## Profile `stress`: the earlier, harsher model
/// Random phase per sensor; the timestamp is the scheduled instant plus jitter (σ = 2 ms) while the sequence is given
/// at read completion (± 20 ms), so commit order is not timestamp order; pH noise σ = 0.01, EC σ = 2.5 µS/cm.
struct RealisticSite {
    var device: DeviceID
    var sensors: [SensorDescriptor]
    /// All readings in sequence order, sequences from 1.
    var readings: [Reading]

    init(tanks: Int, readingCount: Int, period: Double = 10, seed: UInt64, profile: DataProfile = .agent) throws {
        var rng = SplitMix64(seed: seed)
        device = try DeviceID("greenhouse-2")
        let stress = profile == .stress
        struct Channel {
            var descriptor: SensorDescriptor
            var phaseMs: Double
            var readMs: Double
            var base: Double
            var drift: Double  // per hour
            var noise: Double
        }
        let periodMs = period * 1000
        var channels: [Channel] = []
        // The stress profile draws in the order of the earlier generator, so that its figures stay comparable.
        func phase(_ k: Int) -> Double {
            stress ? Double(Int64.random(in: 0..<Int64(periodMs), using: &rng)) : periodMs * Double(k) / Double(3 * tanks)
        }
        for tank in 1...tanks {
            let ph = Double.random(in: 5.8...6.4, using: &rng)
            let ec = Double.random(in: 1000...2000, using: &rng)
            let temperature = Double.random(in: 18...24, using: &rng)
            let k = channels.count
            channels.append(Channel(
                descriptor: SensorDescriptor(id: try SensorID("tank\(tank).ph"), quantity: .ph),
                phaseMs: phase(k), readMs: 900, base: ph, drift: Double.random(in: 0.02...0.08, using: &rng),
                noise: stress ? 0.01 : 0.004))
            channels.append(Channel(
                descriptor: SensorDescriptor(id: try SensorID("tank\(tank).ec"), quantity: .electricalConductivity),
                phaseMs: phase(k + 1), readMs: 600, base: ec, drift: -Double.random(in: 5...25, using: &rng),
                noise: stress ? 2.5 : 1))
            channels.append(Channel(
                descriptor: SensorDescriptor(id: try SensorID("tank\(tank).temp"), quantity: .temperature),
                phaseMs: phase(k + 2), readMs: 750, base: temperature, drift: 0, noise: 0.03))
        }
        sensors = channels.map(\.descriptor)

        let start: Double = 1_795_428_000_000 + (stress ? 0 : Double.random(in: 0..<1, using: &rng))  // 2026-11-23T10:00:00Z in ms
        var pending: [(order: Double, index: Int, reading: Reading)] = []
        let rounds = readingCount / channels.count + 2
        pending.reserveCapacity(rounds * channels.count)
        for round in 0..<rounds {
            for (index, channel) in channels.enumerated() {
                let scheduled = start + channel.phaseMs + Double(round) * periodMs
                let timestampMs: Int64
                if stress {
                    timestampMs = Int64(scheduled) + Int64(rng.normal(deviation: 2).rounded())
                } else {
                    timestampMs = Int64((scheduled + channel.readMs + rng.normal(deviation: 2)).rounded(.down))
                }
                let hours = (Double(timestampMs) - start) / 3_600_000
                // The dosing system brings pH and EC back once a day: drift never carries a long run (a day of a
                // 50-sensor site at 1 Hz spans ten days here) out of the plausible range. Runs under a day are unchanged.
                let sinceDosing = hours.truncatingRemainder(dividingBy: 24)
                if Int.random(in: 0..<200, using: &rng) == 0 { continue }  // a failed read
                let noise = rng.normal(deviation: channel.noise)
                let value: Double
                switch channel.descriptor.quantity {
                case .ph:
                    value = channel.base + channel.drift * sinceDosing + noise
                case .electricalConductivity:
                    value = (channel.base + channel.drift * sinceDosing + noise).rounded()
                default:
                    let daily = 1.5 * cos(2 * Double.pi * hours / 24)
                    value = ((channel.base + daily + noise) * 16).rounded() / 16
                }
                let flags: QualityFlags = Int.random(in: 0..<2000, using: &rng) == 0 ? .sensorFault : []
                // The buffer numbers readings in the order they reach it: at read completion (stress), or right after
                // the completion stamp (agent).
                let order = stress ? Double(timestampMs) + channel.readMs + rng.normal(deviation: 20) : Double(timestampMs)
                pending.append((order, index, Reading(
                    sensor: channel.descriptor.id, sequence: 0, timestamp: Timestamp(microseconds: timestampMs * 1000),
                    value: value, quality: flags)))
            }
        }
        pending.sort { ($0.order, $0.index) < ($1.order, $1.index) }
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
