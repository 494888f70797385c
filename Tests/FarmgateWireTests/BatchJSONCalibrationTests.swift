import FarmgateSupport
import Foundation
import Testing

@testable import FarmgateWire

/// The JSON form's `calibrations` member: the same events, limits and error kinds as format version 3.
@Suite("JSON batch form: calibration events")
struct BatchJSONCalibrationTests {
    static func kind(_ bytes: [UInt8]) -> BatchDecodingError.Kind? {
        do {
            _ = try BatchJSON.decode(bytes)
            return nil
        } catch { return error.kind }
    }

    static func message(_ text: String) -> String {
        do {
            _ = try BatchJSON.decode(Array(text.utf8))
            return ""
        } catch { return error.description }
    }

    static func eventText(_ id: String, points: Int = 1, firmware: String = "2.16") -> String {
        let point = #"{"at":"2026-11-23T10:00:00Z","name":"mid","reference":7,"reading":7.01}"#
        return #"{"circuit":"pH","firmware":"\#(firmware)","id":"\#(id)","points":[\#(Array(repeating: point, count: points).joined(separator: ","))],"sensor":"tank1.ph","time":"2026-11-23T10:01:00Z"}"#
    }

    static func document(events: [String]) -> String {
        #"{"device":"d","sensors":[{"id":"tank1.ph","quantity":"ph"}],"readings":[{"sensor":"tank1.ph","seq":1,"ts":"2026-11-23T10:00:00Z","value":6.5}],"calibrations":[\#(events.joined(separator: ","))]}"#
    }

    @Test("events round-trip beside the readings; the member is left out without events")
    func roundTrip() throws {
        let batch = try Fixtures.realisticBatch(seed: 5, readings: 40)
        let events = [try CalibrationEventCodecTests.event(1), try CalibrationEventCodecTests.event(2, sensor: "tank2.ph")]
        let bytes = try BatchJSON.encode(batch, calibrations: events)
        let decoded = try BatchJSON.decode(bytes)
        #expect(decoded.calibrations == events)
        #expect(decoded.batch == (try BatchJSON.decode(BatchJSON.encode(batch))).batch)
        #expect(!String(decoding: try BatchJSON.encode(batch, calibrations: []), as: UTF8.self).contains("calibrations"))
        #expect(try BatchJSON.encode(batch, calibrations: []) == BatchJSON.encode(batch))
        // The same event text as the binary form carries, so both forms decode to the same event.
        let frame = try BatchCodec.decodeFrame(try BatchCodec.encode(batch, calibrations: events))
        #expect(frame.calibrations == decoded.calibrations)
    }

    @Test("a null or empty member is no events; events before the readings are taken too")
    func placement() throws {
        #expect(try BatchJSON.decode(Array(#"{"device":"d","calibrations":null}"#.utf8)).calibrations.isEmpty)
        #expect(try BatchJSON.decode(Array(#"{"device":"d","calibrations":[]}"#.utf8)).calibrations.isEmpty)
        let first = #"{"calibrations":[\#(Self.eventText("e1"))],"device":"d","sensors":[],"readings":[]}"#
        #expect(try BatchJSON.decode(Array(first.utf8)).calibrations.map(\.id) == ["e1"])
    }

    @Test("the binary form's limits and error kinds: count, size, events that break the rules")
    func limits() throws {
        // More events than a frame may carry: malformed, like the binary count check.
        let many = Self.document(events: Array(repeating: Self.eventText("e"), count: BatchCodec.maxEvents + 1))
        #expect(Self.kind(Array(many.utf8)) == .malformed)
        #expect(Self.message(many).contains("more than the limit of \(BatchCodec.maxEvents) events"))
        // Exactly the limit is taken.
        let ids = (0..<BatchCodec.maxEvents).map { Self.eventText("e\($0)") }
        #expect(try BatchJSON.decode(Array(Self.document(events: ids).utf8)).calibrations.count == BatchCodec.maxEvents)
        // One event larger than 16 KiB of text (padding inside it): refused before it is decoded.
        let padded = Self.eventText("big").replacingOccurrences(of: #""circuit""#, with: #""pad":"\#(String(repeating: "x", count: BatchCodec.maxEventBytes))","circuit""#)
        #expect(Self.kind(Array(Self.document(events: [padded]).utf8)) == .malformed)
        #expect(Self.message(Self.document(events: [padded])).contains("more than the limit of \(BatchCodec.maxEventBytes)"))
        // Events that are not events or break the rules (the same checks as version 3).
        for (bad, says) in [
            (#"{"id":"x"}"#, "calibrations[0] is not a calibration event"),
            (Self.eventText("bad id!"), "is not 1 to 64"),
            (Self.eventText("e", points: 0), "1 to 8 expected"),
            (Self.eventText("e", points: 9), "1 to 8 expected"),
            (Self.eventText("e", firmware: String(repeating: "9", count: 33)), "firmware"),
            ("7", "calibrations[0]: expected an object, found a number"),
            // In the API's words, not the decoder's "points.Index 0.reference: Expected to decode Double but found a
            // string instead." (a tester, 2026-12-07).
            (Self.eventText("e").replacingOccurrences(of: #""reference":7"#, with: #""reference":"NaN""#),
             "calibrations[0] is not a calibration event: points[0].reference: expected a number"),
            (Self.eventText("e").replacingOccurrences(of: #""sensor":"tank1.ph","#, with: ""), "calibrations[0] is not a calibration event: member sensor is missing"),
        ] {
            let text = Self.document(events: [bad])
            #expect(Self.kind(Array(text.utf8)) == .malformed, "\(bad)")
            #expect(Self.message(text).contains(says), "\(Self.message(text))")
        }
        #expect(Self.kind(Array(#"{"device":"d","calibrations":{}}"#.utf8)) == .malformed)
        // A member repeated, and a document cut inside the events: as anywhere else in the form.
        #expect(Self.message(#"{"device":"d","calibrations":[],"calibrations":[]}"#).contains("appears more than once"))
        let cut = Array(Self.document(events: [Self.eventText("e1")]).utf8.dropLast(30))
        #expect(Self.kind(cut) == .truncated)
    }

    @Test("the encoder refuses what the binary encoder refuses")
    func encoderRefusals() throws {
        let batch = try Fixtures.realisticBatch(seed: 6, readings: 3)
        var bad = try CalibrationEventCodecTests.event(1)
        bad.id = "not valid!"
        #expect(throws: BatchEncodingError.self) { try BatchJSON.encode(batch, calibrations: [bad]) }
        let tooMany = Array(repeating: try CalibrationEventCodecTests.event(1), count: BatchCodec.maxEvents + 1)
        #expect(throws: BatchEncodingError.self) { try BatchJSON.encode(batch, calibrations: tooMany) }
    }
}
