import FarmgateSupport
import PropertyBased
import Testing

@testable import FarmgateWire

/// Decoding is total: whatever the bytes, a batch or a typed error, quickly, with bounded memory.
@Suite("Binary batch codec: hostile input")
struct BatchCodecRobustnessTests {
    /// Decodes and, when that succeeds, checks the result is well-formed; a crash would fail the whole run.
    static func probe(_ bytes: [UInt8], limits: BatchLimits = .default) -> Result<Batch, BatchDecodingError> {
        do {
            let batch = try BatchCodec.decode(bytes, limits: limits)
            #expect(batch.readings.count <= limits.maxReadings)
            #expect(Set(batch.sensors.map(\.id)).count == batch.sensors.count)
            return .success(batch)
        } catch {
            #expect(!error.description.isEmpty)
            return .failure(error)
        }
    }

    @Test("every truncation of a frame is an error that says what ended early", arguments: [true, false])
    func truncations(compressed: Bool) throws {
        let frame = try BatchCodec.encode(Fixtures.realisticBatch(seed: 7, readings: 120), compressionLevel: 19, compressed: compressed)
        for length in 0..<frame.count {
            if case .success = Self.probe(Array(frame[0..<length])) {
                Issue.record("a frame truncated to \(length) of \(frame.count) bytes decoded")
            }
        }
        if case .failure(let error) = Self.probe(frame) { Issue.record("the whole frame failed: \(error)") }
    }

    @Test("single-byte mutations decode to a batch or an error", arguments: [true, false])
    func mutations(compressed: Bool) throws {
        let frame = try BatchCodec.encode(Fixtures.realisticBatch(seed: 8, readings: 150), compressionLevel: 3, compressed: compressed)
        var rng = TestRandom(seed: 99)
        var failures = 0
        for position in frame.indices {
            for _ in 0..<4 {
                var mutated = frame
                mutated[position] = UInt8.random(in: 0...255, using: &rng)
                if case .failure = Self.probe(mutated) { failures += 1 }
            }
        }
        #expect(failures > 0, "mutating the header at least must be detected")
    }

    @Test("random byte strings, bare and behind a valid header, decode to a batch or an error")
    func randomBytes() async {
        await propertyCheck(count: 2000, input: Gen.uint8(in: 0...255).array(of: 0...300), Gen.bool()) { bytes, withHeader in
            let frame = withHeader ? BatchCodec.magic + [BatchCodec.formatVersion, 0] + bytes : bytes
            _ = Self.probe(frame)
        }
    }

    @Test("a frame claiming huge counts is refused at once with the count in the message")
    func hugeCounts() throws {
        let clock = ContinuousClock()
        func frame(_ build: (inout ByteWriter) -> Void) -> [UInt8] {
            var w = ByteWriter()
            w.bytes(BatchCodec.magic + [BatchCodec.formatVersion, 0])
            w.uvarint(1)
            w.bytes(Array("d".utf8))
            build(&w)
            return w.bytes
        }
        let manyReadings = frame { w in
            w.uvarint(1)
            w.uvarint(4_000_000)
            w.bytes([UInt8](repeating: 0, count: 64))
        }
        let manySensors = frame { w in w.uvarint(UInt64(1) << 40) }
        let oneSensorTooMany = frame { w in
            w.uvarint(1); w.uvarint(5); w.uvarint(0); w.svarint(0); w.uvarint(1); w.byte(0); w.uvarint(0)
            // quantity, id (prefix, suffix length, suffix), resolution, frame position, one flag run, count
            w.byte(1); w.uvarint(0); w.uvarint(1); w.bytes(Array("s".utf8)); w.uvarint(0); w.svarint(0)
            w.uvarint(1); w.uvarint(0); w.uvarint(5); w.svarint(4_000_000)
            w.bytes([UInt8](repeating: 0, count: 64))
        }
        let readingsBeyondBytes = frame { w in
            w.uvarint(1)
            w.uvarint(90_000)
            w.bytes([UInt8](repeating: 0, count: 64))
        }
        var messages: [String] = []
        let elapsed = clock.measure {
            for bytes in [manyReadings, manySensors, oneSensorTooMany, readingsBeyondBytes] {
                if case .failure(let error) = Self.probe(bytes) { messages.append(error.description) }
            }
        }
        #expect(messages.count == 4)
        #expect(messages.first?.contains("reading count is 4000000, more than the limit of 100000") == true)
        #expect(messages.dropFirst().first?.contains("sensor count is 1099511627776, more than the limit of 4096") == true)
        #expect(messages.dropFirst(2).first?.contains("sensor 's' declares 4000000 readings, more than the limit of 100000") == true)
        #expect(messages.last?.contains("declares 90000 readings but only") == true)
        #expect(elapsed < .milliseconds(200))
    }

    @Test("a zstd body that expands beyond the limit is refused")
    func bodyBomb() {
        let zeros = [UInt8](repeating: 0, count: 4 << 20)
        let header = BatchCodec.magic + [BatchCodec.formatVersion]
        let magicless = Zstd.compress(frames: [zeros, zeros], level: 3, magicless: true)
        #expect(magicless.magicless)
        let bombs = [
            header + [BatchCodec.flagZstd] + Zstd.compress(zeros),
            header + [BatchCodec.flagZstd | BatchCodec.flagMagicless] + magicless.bytes,
        ]
        let limits = BatchLimits(maxDecompressedBytes: 1 << 20)
        for bomb in bombs {
            guard case .failure(let error) = Self.probe(bomb, limits: limits) else {
                Issue.record("a 4 MiB body passed a 1 MiB limit")
                continue
            }
            #expect(error.description.contains("expands beyond the limit of 1048576 bytes"))
        }
    }

    @Test("header problems are named")
    func headerMessages() throws {
        let good = try BatchCodec.encode(Fixtures.realisticBatch(seed: 1, readings: 10))
        func message(_ bytes: [UInt8]) -> String {
            if case .failure(let error) = Self.probe(bytes) { return error.description }
            return ""
        }
        #expect(message(Array(good.prefix(3))).contains("shorter than its 5-byte header"))
        #expect(message([0x7B] + good.dropFirst()).contains("does not start with \"FGB\""))
        var version = good
        version[3] = 9
        #expect(message(version).contains("unsupported format version 9"))
        var flags = good
        flags[4] = 0x80
        #expect(message(flags).contains("unknown flags 0x80"))
        #expect(good[4] == BatchCodec.flagZstd | BatchCodec.flagMagicless)
        flags[4] = BatchCodec.flagMagicless
        #expect(message(flags).contains("unknown flags 0x2"))
        flags[4] = BatchCodec.flagZstd
        #expect(message(flags).contains("not valid zstd"))
        #expect(message(good + [0]).contains("not valid zstd") || message(good + [0]).contains("follow the last reading"))
        let raw = try BatchCodec.encode(Fixtures.realisticBatch(seed: 1, readings: 10), compressionLevel: 1, compressed: false)
        #expect(message(raw + [0, 0]).contains("2 bytes follow the last reading"))
    }

    @Test("duplicate sensor ids and invalid identifiers in a frame are refused")
    func invalidTables() {
        func frame(names: [(Int, String)]) -> [UInt8] {
            var w = ByteWriter()
            w.bytes(BatchCodec.magic + [BatchCodec.formatVersion, 0])
            w.uvarint(1); w.bytes(Array("d".utf8))
            // header: sensors, readings (none), base sequence, base timestamp, unit, layout, anchor lag
            w.uvarint(names.count); w.uvarint(0); w.uvarint(0); w.svarint(0); w.uvarint(1); w.byte(0); w.uvarint(0)
            for _ in names { w.byte(1) }  // quantity
            for (prefix, suffix) in names {
                w.uvarint(prefix)
                w.uvarint(suffix.utf8.count)
            }
            for (_, suffix) in names { w.bytes(Array(suffix.utf8)) }
            for _ in names { w.uvarint(0) }  // default resolution
            for _ in names { w.svarint(0) }  // frame position: table order
            w.uvarint(0)  // no flag runs
            for _ in names { w.svarint(0) }  // reading count: no change from the previous sensor's 0
            return w.bytes
        }
        let ok = frame(names: [(0, "ab"), (1, "c")])
        if case .failure(let error) = Self.probe(ok) { Issue.record("a valid hand-made frame failed: \(error)") }
        if case .success = Self.probe(frame(names: [(0, "ab"), (2, "")])) { Issue.record("a duplicate id passed") }
        if case .failure(let error) = Self.probe(frame(names: [(0, "ab"), (2, "")])) {
            #expect(error.description.contains("sensor 'ab' is described more than once"))
        }
        if case .failure(let error) = Self.probe(frame(names: [(0, "a b")])) {
            #expect(error.description.contains("invalid sensor id 'a b'"))
        } else {
            Issue.record("an id with a space passed")
        }
        if case .failure(let error) = Self.probe(frame(names: [(0, "a"), (5, "b")])) {
            #expect(error.description.contains("shares 5 bytes with the previous id, which has only 1"))
        } else {
            Issue.record("a prefix longer than the previous id passed")
        }
    }
}
