import FarmgateSupport
import PropertyBased
import Testing

@testable import FarmgateWire

/// A receiver as the ingest is one: it keeps the tables declared to it and the newest reading per sensor of what it
/// decoded (values as decoded, i.e. at the sensor's resolution), and checks table and context before decoding.
struct StatefulReceiver {
    var tables: [UInt64: SensorTable] = [:]
    var latest: [SensorID: ContextReading] = [:]

    enum Answer: Equatable {
        case stored([Reading])
        case unknownTable
        case staleContext
    }

    mutating func receive(_ bytes: [UInt8], device: DeviceID) throws -> Answer {
        let head = try BatchCodec.decodeStatefulHead(bytes)
        if let declared = head.declaredTable { tables[declared.hash] = declared }
        guard let table = tables[head.tableHash] else { return .unknownTable }
        if head.usesContext, !head.contextMatches(table: table, context: latest) { return .staleContext }
        let frame = try BatchCodec.decodeStateful(head, table: table, context: latest, device: device)
        for reading in frame.batch.readings {
            let candidate = ContextReading(sequence: reading.sequence, timestamp: reading.timestamp, value: reading.value)
            if let current = latest[reading.sensor], !candidate.isNewer(than: current) { continue }
            latest[reading.sensor] = candidate
        }
        return .stored(frame.batch.readings)
    }
}

@Suite("Stateful frames (format version 4)")
struct StatefulCodecTests {
    /// Splits a batch's readings into `parts` runs of sequences, as an agent cuts consecutive batches.
    static func parts(of batch: Batch, _ parts: Int) -> [[Reading]] {
        let sorted = batch.readings.sorted { $0.sequence < $1.sequence }
        let size = max(1, (sorted.count + parts - 1) / max(parts, 1))
        return stride(from: 0, to: sorted.count, by: size).map { Array(sorted[$0..<min($0 + size, sorted.count)]) }
    }

    @Test("consecutive frames of one sender decode to the same readings at each sensor's resolution, for random series")
    func randomSeries() async {
        await propertyCheck(count: 200, input: Gen.uint64(in: 0...UInt64.max), Gen.bool()) { seed, extreme in
            var rng = TestRandom(seed: seed)
            let batch = try Fixtures.randomBatch(&rng, extreme: extreme)
            let table = try SensorTable(batch.sensors)
            var session = WireSession()
            var receiver = StatefulReceiver()
            for (index, part) in Self.parts(of: batch, 4).enumerated() {
                let frame = try session.encode(Batch(device: batch.device, sensors: [], readings: part), table: table, compressionLevel: 3)
                #expect(frame.declaredTable == (index == 0), "only the first frame declares the table (seed \(seed))")
                guard case .stored(let readings) = try receiver.receive(frame.bytes, device: batch.device) else {
                    Issue.record("seed \(seed): frame \(index) was not stored")
                    return
                }
                let want = Fixtures.canonical(Fixtures.quantized(Batch(device: batch.device, sensors: batch.sensors, readings: part)))
                #expect(Fixtures.canonical(readings) == want, "seed \(seed), extreme \(extreme), frame \(index)")
                session.delivered(frame, acknowledged: part)
            }
        }
    }

    @Test("a realistic live site: only the first frame declares, later ones predict from the context and cost far less than version 2")
    func realisticLive() throws {
        let batch = try Fixtures.realisticBatch(seed: 7, readings: 1200)
        let table = try SensorTable(batch.sensors)
        var session = WireSession()
        var receiver = StatefulReceiver()
        var statefulBytes = 0, version2Bytes = 0
        for (index, part) in Self.parts(of: batch, 40).enumerated() {
            let readings = Batch(device: batch.device, sensors: batch.sensors, readings: part)
            let frame = try session.encode(readings, table: table)
            #expect(frame.usedContext == (index > 0))
            guard case .stored(let decoded) = try receiver.receive(frame.bytes, device: batch.device) else {
                Issue.record("frame \(index) was not stored")
                return
            }
            #expect(Fixtures.canonical(decoded) == Fixtures.canonical(Fixtures.quantized(readings)))
            session.delivered(frame, acknowledged: part)
            if index > 0 {
                statefulBytes += frame.bytes.count
                version2Bytes += try BatchCodec.encode(readings).count
            }
        }
        // 30 readings of 12 sensors per frame: the table and the per-sensor anchors are most of a version 2 frame.
        #expect(Double(statefulBytes) < 0.75 * Double(version2Bytes), "stateful \(statefulBytes) B against version 2 \(version2Bytes) B")
    }

    @Test("a receiver that lost the table answers unknown_sensor_table; the session declares it again and is stored")
    func lostTable() throws {
        let batch = try Fixtures.realisticBatch(seed: 3, readings: 120)
        let table = try SensorTable(batch.sensors)
        let parts = Self.parts(of: batch, 3)
        var session = WireSession()
        var receiver = StatefulReceiver()
        let first = try session.encode(Batch(device: batch.device, sensors: [], readings: parts[0]), table: table)
        let firstAnswer = try receiver.receive(first.bytes, device: batch.device)
        #expect(firstAnswer != .unknownTable)
        session.delivered(first, acknowledged: parts[0])

        // The ingest restarted on a store without the table (or another deployment answers).
        receiver.tables = [:]
        let second = try session.encode(Batch(device: batch.device, sensors: [], readings: parts[1]), table: table)
        #expect(!second.declaredTable)
        let secondAnswer = try receiver.receive(second.bytes, device: batch.device)
        #expect(secondAnswer == .unknownTable)
        let resend = session.refused(code: IngestErrorCode.unknownSensorTable)
        #expect(resend)
        let again = try session.encode(Batch(device: batch.device, sensors: [], readings: parts[1]), table: table)
        #expect(again.declaredTable)
        guard case .stored(let readings) = try receiver.receive(again.bytes, device: batch.device) else {
            Issue.record("the declared frame was not stored")
            return
        }
        #expect(Fixtures.canonical(readings) == Fixtures.canonical(Fixtures.quantized(Batch(device: batch.device, sensors: batch.sensors, readings: parts[1]))))
    }

    @Test("any difference in the receiver's context is caught before decoding: a value, a timestamp, a sequence, a missing sensor")
    func staleContext() throws {
        let batch = try Fixtures.realisticBatch(seed: 11, readings: 96)
        let table = try SensorTable(batch.sensors)
        let parts = Self.parts(of: batch, 2)
        var session = WireSession()
        var receiver = StatefulReceiver()
        let first = try session.encode(Batch(device: batch.device, sensors: [], readings: parts[0]), table: table)
        _ = try receiver.receive(first.bytes, device: batch.device)
        session.delivered(first, acknowledged: parts[0])
        let second = try session.encode(Batch(device: batch.device, sensors: [], readings: parts[1]), table: table)
        #expect(second.usedContext)
        let head = try BatchCodec.decodeStatefulHead(second.bytes)
        #expect(head.contextMatches(table: table, context: receiver.latest))

        guard let (sensor, reading) = receiver.latest.first else {
            Issue.record("no context")
            return
        }
        let step = table.sensors.first { $0.id == sensor }?.resolution.step ?? 1
        var changes: [[SensorID: ContextReading]] = []
        for change in 0..<4 {
            var context = receiver.latest
            var altered = reading
            switch change {
            case 0: altered.value += step
            case 1: altered.timestamp = Timestamp(microseconds: reading.timestamp.microseconds + 1)
            case 2: altered.sequence += 1
            default: context[sensor] = nil
            }
            if change < 3 { context[sensor] = altered }
            changes.append(context)
        }
        for context in changes {
            #expect(!head.contextMatches(table: table, context: context))
            #expect(throws: BatchDecodingError.self) { try BatchCodec.decodeStateful(head, table: table, context: context, device: batch.device) }
        }
        // The session adopts the ingest's context from the 409 answer and the next frame matches it.
        var ingestContext = changes[0]
        ingestContext[sensor]?.value = reading.value + step
        let adopted = session.refused(code: IngestErrorCode.staleContext, ingestContext: ingestContext.map { ContextEntryJSON(sensor: $0.key, reading: $0.value) })
        #expect(adopted)
        let resent = try session.encode(Batch(device: batch.device, sensors: [], readings: parts[1]), table: table)
        #expect(try BatchCodec.decodeStatefulHead(resent.bytes).contextMatches(table: table, context: ingestContext))
        // Without a context in the answer the session sends none.
        let forgotten = session.refused(code: IngestErrorCode.staleContext)
        #expect(forgotten)
        #expect(!(try session.encode(Batch(device: batch.device, sensors: [], readings: parts[1]), table: table)).usedContext)
        let other = session.refused(code: "malformed_batch")
        #expect(!other)
    }

    @Test("a context for some sensors only is sent with a bitmap and decodes")
    func partialContext() throws {
        let batch = try Fixtures.realisticBatch(seed: 5, readings: 60)
        let table = try SensorTable(batch.sensors)
        let parts = Self.parts(of: batch, 2)
        var session = WireSession()
        var receiver = StatefulReceiver()
        let onlyOne = parts[0].filter { $0.sensor == table.sensors[0].id }
        let first = try session.encode(Batch(device: batch.device, sensors: [], readings: onlyOne), table: table)
        _ = try receiver.receive(first.bytes, device: batch.device)
        session.delivered(first, acknowledged: onlyOne)
        #expect(session.context.count == 1)
        let second = try session.encode(Batch(device: batch.device, sensors: [], readings: parts[1]), table: table)
        guard case .stored(let readings) = try receiver.receive(second.bytes, device: batch.device) else {
            Issue.record("not stored")
            return
        }
        #expect(Fixtures.canonical(readings) == Fixtures.canonical(Fixtures.quantized(Batch(device: batch.device, sensors: batch.sensors, readings: parts[1]))))
    }

    @Test("a reading of a sensor outside the table is refused by the encoder, naming it")
    func outsideTable() throws {
        let ph = SensorDescriptor(id: try SensorID("tank1.ph"), quantity: .ph)
        let table = try SensorTable([ph])
        let stranger = Reading(sensor: try SensorID("tank9.ec"), sequence: 4, timestamp: Timestamp(microseconds: 1), value: 1)
        #expect(throws: BatchEncodingError.self) { try WireSession().encode(Batch(device: try Fixtures.device(), sensors: [], readings: [stranger]), table: table) }
        do {
            _ = try WireSession().encode(Batch(device: try Fixtures.device(), sensors: [], readings: [stranger]), table: table)
        } catch let error as BatchEncodingError {
            #expect(error.description.contains("tank9.ec"))
        }
    }

    @Test("the table's encoding is canonical: natural order, round-trips, and a reordered encoding is refused")
    func tableEncoding() throws {
        let ids = ["tank10.ph", "tank2.ph", "tank1.ec", "tank1.ph"]
        let sensors = try ids.map { SensorDescriptor(id: try SensorID($0), quantity: $0.hasSuffix("ec") ? .electricalConductivity : .ph) }
        let table = try SensorTable(sensors)
        #expect(table.sensors.map { $0.id.rawValue } == ["tank1.ec", "tank1.ph", "tank2.ph", "tank10.ph"])
        #expect(try SensorTable(sensors.reversed()).hash == table.hash, "the order given does not matter")
        let decoded = try SensorTable(encoded: table.encoded)
        #expect(decoded == table)
        var other = sensors
        other[0].resolution = try Resolution(numerator: 1, denominator: 1000)
        #expect(try SensorTable(other).hash != table.hash, "a resolution change is another table")
        // Swap the first two entries (each is length, id, quantity, numerator, denominator).
        var reader = ByteReader(table.encoded)
        _ = try reader.uvarint("count")
        let start = reader.offset
        func entryEnd(_ r: inout ByteReader) throws {
            let length = try r.count("length", limit: 64)
            _ = try r.bytes(count: length, "id")
            _ = try r.byte("quantity")
            _ = try r.uvarint("numerator")
            _ = try r.uvarint("denominator")
        }
        try entryEnd(&reader)
        let middle = reader.offset
        try entryEnd(&reader)
        let end = reader.offset
        let swapped = Array(table.encoded[..<start]) + Array(table.encoded[middle..<end]) + Array(table.encoded[start..<middle])
            + Array(table.encoded[end...])
        #expect(throws: BatchDecodingError.self) { try SensorTable(encoded: swapped) }
        #expect(throws: BatchDecodingError.self) { try SensorTable(encoded: sensors.isEmpty ? [] : [UInt8](table.encoded.dropLast())) }
        #expect(throws: BatchEncodingError.self) { try SensorTable(sensors + [sensors[0]]) }
    }

    @Test("truncated and mutated version 4 frames give an error or readings, never a crash")
    func robustness() throws {
        let batch = try Fixtures.realisticBatch(seed: 2, readings: 200)
        let table = try SensorTable(batch.sensors)
        let parts = Self.parts(of: batch, 2)
        var session = WireSession()
        var receiver = StatefulReceiver()
        let first = try session.encode(Batch(device: batch.device, sensors: [], readings: parts[0]), table: table)
        _ = try receiver.receive(first.bytes, device: batch.device)
        session.delivered(first, acknowledged: parts[0])
        let second = try session.encode(Batch(device: batch.device, sensors: [], readings: parts[1]), table: table, compressionLevel: 3)
        var rng = TestRandom(seed: 99)
        for frame in [first.bytes, second.bytes] {
            for cut in 0..<frame.count {
                var copy = receiver
                _ = try? copy.receive(Array(frame[..<cut]), device: batch.device)
            }
            for _ in 0..<400 {
                var mutated = frame
                let index = Int.random(in: 0..<mutated.count, using: &rng)
                mutated[index] ^= UInt8.random(in: 1...255, using: &rng)
                var copy = receiver
                _ = try? copy.receive(mutated, device: batch.device)
            }
        }
        // A version 2 frame is not a stateful one.
        #expect(throws: BatchDecodingError.self) { try BatchCodec.decodeStatefulHead(try BatchCodec.encode(batch)) }
    }

    @Test("compact receipts: a few bytes without rejections, none with them, and garbage is no receipt")
    func compactReceipts() throws {
        let plain = IngestReceipt(accepted: 150, duplicates: 0)
        let bytes = try #require(plain.compact)
        #expect(bytes.count == 3)
        #expect(IngestReceipt(compact: bytes) == plain)
        var withEvents = IngestReceipt(accepted: 3, duplicates: 2)
        withEvents.calibrations = CalibrationReceipt(accepted: 1, duplicates: 0)
        #expect(IngestReceipt(compact: try #require(withEvents.compact)) == withEvents)
        let rejecting = IngestReceipt(
            accepted: 1, duplicates: 0,
            rejections: [RejectedReading(sequence: 4, sensor: "tank1.ph", code: RejectionCode.outOfRange, message: "too high")])
        #expect(rejecting.compact == nil)
        #expect(IngestReceipt(compact: []) == nil)
        #expect(IngestReceipt(compact: [0x80]) == nil)
        #expect(IngestReceipt(compact: [1, 2, 3]) == nil)
        #expect(IngestReceipt(compact: [1, 2, 3, 4, 5]) == nil)
    }
}
