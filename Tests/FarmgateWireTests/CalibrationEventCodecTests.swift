import FarmgateSupport
import Foundation
import PropertyBased
import Testing

@testable import FarmgateWire

/// Format version 3 (calibration events before the readings) and the events' own checks.
@Suite("Binary batch codec: calibration events (format version 3)")
struct CalibrationEventCodecTests {
    static func event(_ n: Int, sensor: String = "tank1.ph") throws -> CalibrationEvent {
        CalibrationEvent(
            id: "0b7e5a1c-\(n)", sensor: try SensorID(sensor), time: Timestamp(microseconds: 1_790_000_000_000_000 + Int64(n)),
            circuit: "pH", firmware: "2.16",
            points: [
                .init(name: "mid", reference: 7, at: Timestamp(microseconds: 1_789_999_000_000_000), reading: 7.01),
                .init(name: "low", reference: 4, at: Timestamp(microseconds: 1_789_999_100_000_000), reading: nil),
            ],
            calibratedPoints: 2, slope: .init(acidPercent: 99.7, basePercent: 100.3, offsetMillivolts: -0.89))
    }

    static func probe(_ bytes: [UInt8]) -> Result<BatchFrame, BatchDecodingError> {
        do {
            let frame = try BatchCodec.decodeFrame(bytes)
            #expect(frame.calibrations.allSatisfy { $0.problem == nil })
            #expect(frame.calibrations.count <= BatchCodec.maxEvents)
            return .success(frame)
        } catch {
            #expect(!error.description.isEmpty)
            return .failure(error)
        }
    }

    @Test("events and readings round-trip in a version 3 frame; without events the frame stays version 2")
    func roundTrip() throws {
        let batch = try Fixtures.realisticBatch(seed: 3, readings: 80)
        let events = [try Self.event(1), try Self.event(2, sensor: "tank2.ph")]
        let frame = try BatchCodec.encode(batch, calibrations: events)
        #expect(frame[3] == 3)
        let decoded = try BatchCodec.decodeFrame(frame)
        #expect(decoded.version == 3)
        #expect(decoded.calibrations == events)
        #expect(decoded.batch == (try BatchCodec.decode(try BatchCodec.encode(batch))))

        let plain = try BatchCodec.encode(batch, calibrations: [])
        #expect(plain[3] == 2)
        #expect(try BatchCodec.decode(plain) == decoded.batch, "an ingest that reads only version 2 takes a batch without events")
        #expect(try BatchCodec.decodeFrame(plain).calibrations.isEmpty)
        // Events alone, without readings, travel too.
        let alone = try BatchCodec.decodeFrame(try BatchCodec.encode(Batch(device: batch.device, sensors: [], readings: []), calibrations: events))
        #expect(alone.calibrations == events && alone.batch.readings.isEmpty)
    }

    @Test("a reader of version 2 only refuses a version 3 frame as an unsupported version (the ingest's 415)")
    func olderReader() throws {
        let frame = try BatchCodec.encode(Fixtures.realisticBatch(seed: 4, readings: 10), calibrations: [try Self.event(1)])
        #expect(throws: BatchDecodingError("unsupported format version 3 (this build reads version 2)", kind: .unsupportedVersion(3))) {
            try BatchCodec.decode(frame)
        }
    }

    @Test("the encoder refuses an event it could not send")
    func encoderRefusals() throws {
        var bad = try Self.event(1)
        bad.id = "not an id!"
        #expect(throws: BatchEncodingError.self) { try BatchCodec.encode(Fixtures.realisticBatch(seed: 1, readings: 2), calibrations: [bad]) }
    }

    @Test("every truncation of a version 3 frame is an error")
    func truncations() throws {
        let frame = try BatchCodec.encode(Fixtures.realisticBatch(seed: 5, readings: 40), calibrations: [try Self.event(1), try Self.event(2)])
        for length in 0..<frame.count {
            if case .success = Self.probe(Array(frame[0..<length])) { Issue.record("a frame cut to \(length) of \(frame.count) bytes decoded") }
        }
        if case .failure(let error) = Self.probe(frame) { Issue.record("the whole frame failed: \(error)") }
    }

    @Test("hostile events sections: huge counts, huge lengths, JSON that is no event, events that break the rules")
    func hostileSections() throws {
        let readings = try BatchCodec.encodeStreams(Batch(device: try DeviceID("site"), sensors: [], readings: []))
        func frame(_ build: (inout ByteWriter) -> Void) throws -> [UInt8] {
            var writer = ByteWriter()
            build(&writer)
            return BatchCodec.magic + [3, 0] + writer.bytes + readings.flatMap(\.bytes)
        }
        func json(_ text: String) -> (inout ByteWriter) -> Void {
            { writer in
                writer.uvarint(1)
                writer.uvarint(text.utf8.count)
                writer.bytes(Array(text.utf8))
            }
        }
        let cases: [(String, (inout ByteWriter) -> Void)] = [
            ("calibration event count", { $0.uvarint(UInt64.max) }),
            ("calibration events but only", { $0.uvarint(900) }),
            ("length of calibration event 1", { $0.uvarint(1); $0.uvarint(1 << 30) }),
            ("is not a calibration event", json("[1,2]")),
            ("is not a calibration event", json(#"{"id":"a","sensor":"Bad Id!","time":0,"circuit":"pH","points":[]}"#)),
            ("1 to 8 expected", json(#"{"id":"a","sensor":"t.ph","time":0,"circuit":"pH","points":[]}"#)),
            ("is not 1 to 64", json(#"{"id":"","sensor":"t.ph","time":0,"circuit":"pH","points":[{"name":"mid","at":0}]}"#)),
        ]
        for (expected, build) in cases {
            guard case .failure(let error) = Self.probe(try frame(build)) else {
                Issue.record("a section that should fail with \"\(expected)\" decoded")
                continue
            }
            #expect(error.description.contains(expected), "\(error)")
        }
        // A valid minimal event decodes.
        let minimal = try frame(json(#"{"id":"a","sensor":"t.ph","time":0,"circuit":"pH","points":[{"name":"mid","reference":7,"at":0}]}"#))
        #expect(try BatchCodec.decodeFrame(minimal).calibrations.first?.points.first?.reference == 7)
    }

    @Test("random bytes behind a version 3 header, and single-byte mutations, decode to a frame or an error")
    func randomAndMutated() async throws {
        await propertyCheck(count: 1500, input: Gen.uint8(in: 0...255).array(of: 0...300)) { bytes in
            _ = Self.probe(BatchCodec.magic + [3, 0] + bytes)
        }
        let frame = try BatchCodec.encode(Fixtures.realisticBatch(seed: 9, readings: 30), calibrations: [try Self.event(1)], compressionLevel: 3)
        var rng = TestRandom(seed: 5)
        for position in frame.indices {
            var mutated = frame
            mutated[position] = UInt8.random(in: 0...255, using: &rng)
            _ = Self.probe(mutated)
        }
    }
}
