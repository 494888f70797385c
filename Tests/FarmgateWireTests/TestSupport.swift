import FarmgateSupport
@testable import FarmgateWire

/// Property cases replay from their seed.
typealias TestRandom = SplitMix64

enum Fixtures {
    static func device() throws -> DeviceID { try DeviceID("greenhouse-2") }

    /// A random batch: random sensors, quantities and resolutions, random walks with gaps, negative values,
    /// and (with `extreme`) timestamps and sequences anywhere in their ranges.
    static func randomBatch(_ rng: inout TestRandom, extreme: Bool = false, knownFlagsOnly: Bool = false) throws -> Batch {
        let sensorCount = Int.random(in: 0...8, using: &rng)
        var sensors: [SensorDescriptor] = []
        var used = Set<String>()
        let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789._-")
        while sensors.count < sensorCount {
            let prefix = ["tank1.", "tank10.", "tank2.", "x", "Zone-3_"].randomElement(using: &rng) ?? "s"
            let suffix = String((0..<Int.random(in: 0...6, using: &rng)).map { _ in alphabet.randomElement(using: &rng) ?? "a" })
            let name = prefix + suffix
            guard let id = try? SensorID(name), used.insert(name).inserted else { continue }
            let quantity = Quantity.allCases.randomElement(using: &rng) ?? .ph
            var resolution: Resolution?
            if Bool.random(using: &rng) {
                resolution = try? Resolution(
                    numerator: UInt32.random(in: 1...1000, using: &rng), denominator: UInt32.random(in: 1...1000, using: &rng))
            }
            sensors.append(SensorDescriptor(id: id, quantity: quantity, resolution: resolution))
        }
        var readings: [Reading] = []
        var sequence = extreme ? UInt64.random(in: 0...UInt64.max, using: &rng) : UInt64.random(in: 1...1_000_000, using: &rng)
        for sensor in sensors {
            let count = Int.random(in: 0...40, using: &rng)
            var t = extreme ? Int64.random(in: Int64.min...Int64.max, using: &rng) : Int64.random(in: 0...2_000_000_000_000_000, using: &rng)
            var steps = Int64.random(in: -100_000...100_000, using: &rng)
            let period = Int64.random(in: 1...60_000_000, using: &rng)
            for _ in 0..<count {
                if extreme && Int.random(in: 0..<4, using: &rng) == 0 {
                    t = Int64.random(in: Int64.min...Int64.max, using: &rng)
                } else {
                    let gap = Int.random(in: 0..<10, using: &rng) == 0 ? Int64.random(in: 1...5, using: &rng) : 1
                    t = t &+ period &* gap &+ Int64.random(in: -5000...5000, using: &rng)
                }
                steps += Int64.random(in: -50...50, using: &rng)
                if Int.random(in: 0..<20, using: &rng) == 0 { steps = Int64.random(in: -1_000_000_000_000...1_000_000_000_000, using: &rng) }
                let jitter = Double.random(in: -0.3...0.3, using: &rng) * sensor.resolution.step
                var flags = QualityFlags()
                if Int.random(in: 0..<8, using: &rng) == 0 {
                    flags = QualityFlags(rawValue: knownFlagsOnly ? UInt16.random(in: 0...63, using: &rng) : UInt16.random(in: 0...UInt16.max, using: &rng))
                }
                sequence = extreme && Bool.random(using: &rng) ? UInt64.random(in: 0...UInt64.max, using: &rng) : sequence &+ UInt64.random(in: 1...70, using: &rng)
                readings.append(Reading(
                    sensor: sensor.id, sequence: sequence, timestamp: Timestamp(microseconds: t),
                    value: sensor.resolution.value(ofSteps: steps) + jitter, quality: flags))
            }
        }
        readings.shuffle(using: &rng)
        return Batch(device: try device(), sensors: sensors.shuffled(using: &rng), readings: readings)
    }

    /// What a receiver must get back: every value at its sensor's resolution.
    static func quantized(_ batch: Batch) -> [Reading] {
        let resolutions = Dictionary(batch.sensors.map { ($0.id, $0.resolution) }, uniquingKeysWith: { a, _ in a })
        return batch.readings.map { reading in
            var r = reading
            if let resolution = resolutions[r.sensor], let steps = resolution.quantize(r.value) {
                r.value = resolution.value(ofSteps: steps)
            }
            return r
        }
    }

    /// A reading without Timestamp.description (RFC3339.format traps on timestamps near Int64.min).
    static func describe(_ r: Reading) -> String {
        "\(r.sensor) seq \(r.sequence) ts \(r.timestamp.microseconds) value \(r.value) flags \(r.quality.rawValue)"
    }

    /// Readings in an order independent of how a codec arranges them.
    static func canonical(_ readings: [Reading]) -> [Reading] {
        readings.sorted {
            ($0.sequence, $0.sensor.rawValue, $0.timestamp.microseconds, $0.value, $0.quality.rawValue)
                < ($1.sequence, $1.sensor.rawValue, $1.timestamp.microseconds, $1.value, $1.quality.rawValue)
        }
    }

    /// A realistic small batch: 12 sensors every 10 s with millisecond jitter, sequences in commit order.
    static func realisticBatch(seed: UInt64, readings count: Int = 200) throws -> Batch {
        var rng = TestRandom(seed: seed)
        var sensors: [SensorDescriptor] = []
        for tank in 1...4 {
            sensors.append(SensorDescriptor(id: try SensorID("tank\(tank).ph"), quantity: .ph))
            sensors.append(SensorDescriptor(id: try SensorID("tank\(tank).ec"), quantity: .electricalConductivity))
            sensors.append(SensorDescriptor(id: try SensorID("tank\(tank).temp"), quantity: .temperature))
        }
        let phases = sensors.map { _ in Int64.random(in: 0..<10_000, using: &rng) }
        var readings: [Reading] = []
        var round: Int64 = 0
        while readings.count < count {
            for (k, sensor) in sensors.enumerated() {
                let ms = 1_795_428_000_000 + phases[k] + round * 10_000 + Int64.random(in: -3...3, using: &rng)
                let value: Double = switch sensor.quantity {
                case .ph: 6.1 + Double(Int.random(in: -2...2, using: &rng)) * 0.01
                case .electricalConductivity: 1500 + Double(Int.random(in: -3...3, using: &rng))
                default: 20 + Double(Int.random(in: -1...1, using: &rng)) / 16
                }
                readings.append(Reading(sensor: sensor.id, sequence: 0, timestamp: Timestamp(microseconds: ms * 1000), value: value))
            }
            round += 1
        }
        readings.sort { $0.timestamp < $1.timestamp }
        readings = readings.prefix(count).enumerated().map { index, reading in
            var r = reading
            r.sequence = 1000 + UInt64(index)
            return r
        }
        return Batch(device: try device(), sensors: sensors, readings: readings)
    }
}
