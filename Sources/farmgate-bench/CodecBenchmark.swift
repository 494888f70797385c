import ArgumentParser
import FarmgateWire
import Foundation

/// `farmgate-bench codec`: bytes per reading of the binary codec against JSON+gzip and line protocol+gzip, on the same
/// generated batches, plus encode and decode throughput.
struct CodecBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "codec",
        abstract: "Bytes per reading and throughput of the batch codec on realistic generated data."
    )

    @Option(help: "Batches to generate.")
    var batches = 50

    @Option(help: "Readings per batch.")
    var readings = 1000

    @Option(help: "Tanks on the simulated site; each has a pH, an EC and a temperature sensor.")
    var tanks = 20

    @Option(help: "Sampling period of every sensor, in seconds.")
    var period = 10.0

    @Option(help: "Seed of the generator; the same seed gives the same data.")
    var seed: UInt64 = 42

    @Option(help: "zstd level of the binary codec.")
    var level: Int32 = 19

    @Option(help: "Data profile: 'agent' (what the Farmgate agent produces), 'stress' (random phases, completion-order sequences, noisier sensors) or 'both'.")
    var profile = "both"

    @Flag(help: "Also print where the bytes of the binary frame go, stream by stream.")
    var streams = false

    func validate() throws {
        guard batches > 0, readings > 0, tanks > 0, period > 0 else {
            throw ValidationError("--batches, --readings, --tanks and --period must be positive")
        }
        guard profile == "both" || DataProfile(rawValue: profile) != nil else {
            throw ValidationError("--profile must be agent, stress or both, not '\(profile)'")
        }
    }

    func run() async throws {
        let profiles = DataProfile(rawValue: profile).map { [$0] } ?? DataProfile.allCases
        print("\(batches) batches of \(readings) readings, \(tanks * 3) sensors every \(period) s, seed \(seed)")
        print("profile agent: what the Farmgate agent produces (even stagger, stamped at read completion, sequences in time order)")
        print("profile stress: random phases, sequences in read-completion order, pH σ 0.01 and EC σ 2.5 µS/cm")
        print("")
        print("format                                  bytes/reading   encode readings/s   decode readings/s")
        var tables: [(DataProfile, [Batch], Double)] = []
        for profile in profiles {
            let site = try RealisticSite(tanks: tanks, readingCount: batches * readings, period: period, seed: seed, profile: profile)
            let batchList = site.batches(of: readings)
            try measure(batchList, total: site.readings.count, profile: profile)
            tables.append((profile, batchList, Double(site.readings.count)))
        }
        if streams {
            for (profile, batchList, total) in tables { try printStreams(batchList, total: total, profile: profile) }
        }
    }

    /// Prints the rows of one profile: the binary codec (checked to round-trip), JSON, line protocol.
    func measure(_ batchList: [Batch], total count: Int, profile: DataProfile) throws {
        let total = Double(count)
        var binary = 0, jsonRaw = 0, jsonGzip = 0, lineRaw = 0, lineGzip = 0
        var encoded: [[UInt8]] = []
        let clock = ContinuousClock()
        let encodeTime = try clock.measure {
            for batch in batchList { encoded.append(try BatchCodec.encode(batch, compressionLevel: level)) }
        }
        binary = encoded.reduce(0) { $0 + $1.count }
        var decodedBatches: [Batch] = []
        let decodeTime = try clock.measure {
            for frame in encoded { decodedBatches.append(try BatchCodec.decode(frame)) }
        }
        let decodedCount = decodedBatches.reduce(0) { $0 + $1.readings.count }
        // Lossless at the declared resolution: the same (sequence, sensor, timestamp, steps, flags) come back.
        var mismatches = 0
        for (original, decoded) in zip(batchList, decodedBatches) {
            let resolution = Dictionary(original.sensors.map { ($0.id, $0.resolution) }, uniquingKeysWith: { a, _ in a })
            let want = original.readings.sorted { $0.sequence < $1.sequence }
            if want.count != decoded.readings.count { mismatches += abs(want.count - decoded.readings.count) }
            for (a, b) in zip(want, decoded.readings) {
                let steps = resolution[a.sensor]?.quantize(a.value)
                if a.sequence != b.sequence || a.sensor != b.sensor || a.timestamp != b.timestamp || a.quality != b.quality
                    || steps == nil || resolution[a.sensor]?.value(ofSteps: steps ?? 0) != b.value
                {
                    mismatches += 1
                }
            }
        }
        if mismatches > 0 { print("warning (\(profile)): \(mismatches) readings did not round-trip") }
        let stateful = try statefulBytes(batchList)
        var jsonDocuments: [[UInt8]] = []
        let jsonEncodeTime = clock.measure {
            for batch in batchList { jsonDocuments.append(BatchJSON.encode(batch)) }
        }
        var jsonDecoded = 0
        let jsonDecodeTime = try clock.measure {
            for document in jsonDocuments { jsonDecoded += try BatchJSON.decode(document).batch.readings.count }
        }
        for document in jsonDocuments {
            jsonRaw += document.count
            jsonGzip += Gzip.compress(document).count
        }
        for batch in batchList {
            let lines = lineProtocol(batch)
            lineRaw += lines.count
            lineGzip += Gzip.compress(lines).count
        }
        guard decodedCount == count, jsonDecoded == count else {
            print("warning (\(profile)): decoded \(decodedCount) binary and \(jsonDecoded) JSON readings of \(count)")
            return
        }

        func perReading(_ bytes: Int) -> String { String(format: "%8.3f", Double(bytes) / total) }
        func rate(_ duration: Duration) -> String {
            String(format: "%12.0f", total / max(duration.seconds, 1e-9))
        }
        func label(_ format: String) -> String {
            "[\(profile)] \(format)".padding(toLength: 40, withPad: " ", startingAt: 0)
        }
        print(label("farmgate binary (zstd \(level))") + "  \(perReading(binary))        \(rate(encodeTime))        \(rate(decodeTime))")
        print(label("farmgate stateful (v4, zstd \(level))") + "  \(perReading(stateful.bytes))        \(rate(stateful.encodeTime))        \(rate(stateful.decodeTime))")
        print(label("JSON") + "  \(perReading(jsonRaw))        \(rate(jsonEncodeTime))        \(rate(jsonDecodeTime))")
        print(label("JSON + gzip") + "  \(perReading(jsonGzip))")
        print(label("InfluxDB line protocol") + "  \(perReading(lineRaw))")
        print(label("InfluxDB line protocol + gzip") + "  \(perReading(lineGzip))")
    }

    /// The batches as one sender sends them in the stateful mode (format version 4): the first declares the table, each
    /// later one references it and predicts from the newest reading per sensor of those before, as the ingest holds them.
    /// Every frame is decoded as the ingest does (table and context checked first) and must give back its readings.
    func statefulBytes(_ batchList: [Batch]) throws -> (bytes: Int, encodeTime: Duration, decodeTime: Duration) {
        guard let first = batchList.first else { return (0, .zero, .zero) }
        let table = try SensorTable(Array(Set(batchList.flatMap(\.sensors))))
        var session = WireSession()
        var held: [SensorID: ContextReading] = [:]
        var bytes = 0
        var encodeTime = Duration.zero, decodeTime = Duration.zero
        let clock = ContinuousClock()
        for batch in batchList {
            var frame: StatefulFrame?
            encodeTime += try clock.measure { frame = try session.encode(batch, table: table, compressionLevel: level) }
            guard let frame else { continue }
            bytes += frame.bytes.count
            var decoded: BatchFrame?
            decodeTime += try clock.measure {
                let head = try BatchCodec.decodeStatefulHead(frame.bytes)
                guard head.contextMatches(table: table, context: held) else { throw ValidationError("the ingest's context differs from the sender's") }
                decoded = try BatchCodec.decodeStateful(head, table: table, context: held, device: first.device)
            }
            let readings = decoded?.batch.readings ?? []
            guard readings.count == batch.readings.count else {
                throw ValidationError("a stateful frame decoded to \(readings.count) readings instead of \(batch.readings.count)")
            }
            for reading in readings {
                let candidate = ContextReading(sequence: reading.sequence, timestamp: reading.timestamp, value: reading.value)
                if let current = held[reading.sensor], !candidate.isNewer(than: current) { continue }
                held[reading.sensor] = candidate
            }
            session.delivered(frame, acknowledged: batch.readings)
        }
        return (bytes, encodeTime, decodeTime)
    }

    /// `reading,device=...,sensor=... value=6.02 <ns timestamp>`, one line per reading, values at their resolution.
    func lineProtocol(_ batch: Batch) -> [UInt8] {
        var resolutions: [SensorID: Resolution] = [:]
        for sensor in batch.sensors { resolutions[sensor.id] = sensor.resolution }
        var text = ""
        for reading in batch.readings {
            var value = reading.value
            if let resolution = resolutions[reading.sensor], let steps = resolution.quantize(value) {
                value = resolution.value(ofSteps: steps)
            }
            text += "reading,device=\(batch.device),sensor=\(reading.sensor) value=\(value) \(reading.timestamp.microseconds * 1000)\n"
        }
        return Array(text.utf8)
    }

    /// Where the bytes go: each stream's raw size, and how much the compressed body grows because of it (the body
    /// compressed with the stream minus without it).
    func printStreams(_ batches: [Batch], total: Double, profile: DataProfile) throws {
        var names: [String] = []
        var raw: [Int] = []
        var marginal: [Int] = []
        var entropy: [Double] = []
        var whole = 0
        for batch in batches {
            let streams = try BatchCodec.encodeStreams(batch)
            if names.isEmpty {
                names = streams.map(\.name)
                raw = Array(repeating: 0, count: streams.count)
                marginal = Array(repeating: 0, count: streams.count)
                entropy = Array(repeating: 0, count: streams.count)
            }
            let all = BatchCodec.compress(streams: streams, level: level).count
            whole += all
            for (k, stream) in streams.enumerated() {
                raw[k] += stream.bytes.count
                var histogram = [Int](repeating: 0, count: 256)
                for b in stream.bytes { histogram[Int(b)] += 1 }
                let n = Double(stream.bytes.count)
                for c in histogram where c > 0 { entropy[k] += Double(c) * -log2(Double(c) / n) / 8 }
                var without = streams
                without[k].bytes = []
                marginal[k] += all - BatchCodec.compress(streams: without, level: level).count
            }
        }
        print("")
        print("[\(profile)] where the bytes go")
        print("stream                raw B/reading   order-0 entropy B/reading   compressed cost B/reading (with − without)")
        for k in names.indices {
            print(names[k].padding(toLength: 20, withPad: " ", startingAt: 0)
                + "  \(String(format: "%8.3f", Double(raw[k]) / total))        \(String(format: "%8.3f", entropy[k] / total))                  \(String(format: "%8.3f", Double(marginal[k]) / total))")
        }
        print("whole body (zstd)     \(String(format: "%8.3f", Double(whole) / total)); the frame adds 5 bytes per batch")
    }
}
