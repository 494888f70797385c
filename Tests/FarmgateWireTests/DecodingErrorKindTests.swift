import FarmgateSupport
import PropertyBased
import Testing

@testable import FarmgateWire

/// What kind of problem a decoding error is decides the ingest's answer (and whether the agent retries, falls back or
/// splits), so the kinds are tested as carefully as the messages.
@Suite("Decoding error kinds and the bounded JSON reader")
struct DecodingErrorKindTests {
    static func jsonError(_ text: String, limits: BatchLimits = .default) -> BatchDecodingError? {
        do {
            _ = try BatchJSON.decode(Array(text.utf8), limits: limits)
            return nil
        } catch { return error }
    }

    @Test("every truncation of a binary frame is .truncated, whether its body is compressed or not", arguments: [true, false])
    func binaryTruncations(compressed: Bool) throws {
        let frame = try BatchCodec.encode(Fixtures.realisticBatch(seed: 7, readings: 120), compressionLevel: 19, compressed: compressed)
        for length in 0..<frame.count {
            do {
                _ = try BatchCodec.decode(Array(frame[0..<length]))
                Issue.record("a frame cut to \(length) bytes decoded")
            } catch {
                #expect(error.kind == .truncated, "cut to \(length) of \(frame.count): \(error)")
            }
        }
    }

    @Test("an unknown format version, garbage and too many readings are told apart")
    func binaryKinds() throws {
        var frame = try BatchCodec.encode(Fixtures.realisticBatch(seed: 7, readings: 10))
        frame[3] = 9
        #expect(throws: BatchDecodingError("unsupported format version 9 (this build reads version 2)", kind: .unsupportedVersion(9))) {
            try BatchCodec.decode(frame)
        }
        #expect(throws: BatchDecodingError("the frame does not start with \"FGB\": not a Farmgate binary batch")) {
            try BatchCodec.decode(Array("garbage!".utf8))
        }
        #expect((try? BatchCodec.decode(Array("xy".utf8))) == nil)
        do {
            _ = try BatchCodec.decode(Array("xy".utf8))
        } catch { #expect(error.kind == .malformed) }
        let many = try BatchCodec.encode(Fixtures.realisticBatch(seed: 7, readings: 10))
        do {
            _ = try BatchCodec.decode(many, limits: BatchLimits(maxReadings: 5))
        } catch { #expect(error.kind == .tooManyReadings) }
    }

    @Test("every proper prefix of a JSON batch is .truncated; complete bad documents are .malformed")
    func jsonTruncations() throws {
        let document = BatchJSON.encode(try Fixtures.realisticBatch(seed: 3, readings: 15))
        for length in 0..<document.count {
            do {
                _ = try BatchJSON.decode(Array(document[0..<length]))
                Issue.record("a document cut to \(length) bytes decoded")
            } catch {
                #expect(error.kind == .truncated, "cut to \(length): \(error)")
            }
        }
        #expect(Self.jsonError(#"{"device":"d"} x"#)?.kind == .malformed)
        #expect(Self.jsonError(#"{"device":"d",]"#)?.kind == .malformed)
        #expect(Self.jsonError(#"{"device":tru}"#)?.kind == .malformed)
    }

    @Test("unknown members of any shape are skipped, and still checked against the grammar")
    func unknownMembers() throws {
        let big = String(repeating: "[1,{\"a\":\"\\u00e9\"},\"x\",null,true,-2.5e3],", count: 20_000)
        let decoded = try BatchJSON.decode(
            Array(
                """
                {"extension":[\(big)0],"device":"d","sensors":[{"id":"a","quantity":"ph","vendor":{"x":[1,2]}}],
                 "readings":[{"sensor":"a","seq":1,"ts":0,"value":6.5,"note":"é ✓"}],"trailer":{}}
                """.utf8))
        #expect(decoded.batch.readings.map(\.sequence) == [1])
        #expect(decoded.rejected.isEmpty)
        #expect(Self.jsonError(#"{"device":"d","x":[1,2,}"#)?.description.contains("not valid JSON") == true)
        #expect(Self.jsonError("{\"device\":\"d\",\"x\":\"\u{01}\"}")?.description.contains("control character") == true)
        var invalidUTF8 = Array(#"{"device":"d","x":"ab"}"#.utf8)
        invalidUTF8[20] = 0xC0
        #expect(throws: BatchDecodingError.self) { try BatchJSON.decode(invalidUTF8) }
        #expect(Self.jsonError(#"{"device":"d","x":\#(String(repeating: "[", count: 40))}"#)?.description.contains("nested more than 32") == true)
    }

    @Test("readings are counted while they are read: the limit stops the decoder before the rest of the document")
    func countWhileReading() {
        // The readings after the limit are not even valid JSON: the count stops the decoder first.
        let error = Self.jsonError(#"{"device":"d","readings":[{},{},{}, this is not JSON"#, limits: BatchLimits(maxReadings: 2))
        #expect(error == BatchDecodingError("readings: more than the limit of 2 entries", kind: .tooManyReadings))
        let sensors = Self.jsonError(#"{"device":"d","sensors":[{"id":"a","quantity":"ph"},{}, nope"#, limits: BatchLimits(maxSensors: 1))
        #expect(sensors?.description == "sensors: more than the limit of 1 entries")
    }

    @Test("strings and numbers the decoder keeps are bounded; skipped ones are not built at all")
    func boundedScalars() throws {
        let long = String(repeating: "x", count: 5_000)
        #expect(Self.jsonError(#"{"device":"\#(long)"}"#)?.description.contains("longer than 4096 bytes") == true)
        let digits = String(repeating: "1", count: 200)
        #expect(
            Self.jsonError(#"{"device":"d","sensors":[{"id":"a","quantity":"ph"}],"readings":[{"sensor":"a","seq":1,"ts":0,"value":\#(digits)}]}"#)?
                .description.contains("a number of 200 characters") == true)
        // In a member the decoder does not know, both are fine.
        let decoded = try BatchJSON.decode(Array(#"{"device":"d","x":"\#(long)","y":\#(digits),"readings":[]}"#.utf8))
        #expect(decoded.batch.device.rawValue == "d")
        // A 250-character sensor name is kept (to be reported as unknown_sensor), not refused.
        let named = try BatchJSON.decode(
            Array(#"{"device":"d","readings":[{"sensor":"\#(String(repeating: "s", count: 250))","seq":1,"ts":0,"value":1}]}"#.utf8))
        #expect(named.rejected.map(\.code) == [RejectionCode.unknownSensor])
    }

    @Test("a member twice in any object is refused naming it, whatever the values")
    func duplicateMembers() {
        let cases = [
            (#"{"device":"d","device":"d"}"#, #"the member "device" appears more than once"#),
            (#"{"device":"d","sensors":[{"id":"a","id":"a","quantity":"ph"}]}"#, #"sensors[0]: the member "id" appears more than once"#),
            (#"{"device":"d","readings":[{"ts":0,"ts":1}]}"#, #"readings[0]: the member "ts" appears more than once"#),
            (#"{"device":"d","x":[{"k":1,"\u006b":2}]}"#, #"the member "k" appears more than once"#),
        ]
        for (text, expected) in cases {
            let error = Self.jsonError(text)
            #expect(error?.kind == .malformed)
            #expect(error?.description.contains(expected) == true, "\(error?.description ?? "decoded")")
        }
    }

    @Test("a member order other than the encoder's decodes the same")
    func memberOrder() throws {
        let reordered = try BatchJSON.decode(
            Array(#"{"readings":[{"value":6.5,"ts":0,"seq":2,"sensor":"a"},{"sensor":"b","seq":3,"ts":0,"value":1}],"sensors":[{"quantity":"ph","id":"a"}],"device":"d"}"#.utf8))
        #expect(reordered.batch.readings.map(\.sequence) == [2])
        #expect(reordered.rejected.map(\.code) == [RejectionCode.unknownSensor])
        let noSensors = try BatchJSON.decode(Array(#"{"device":"d","readings":[{"sensor":"a","seq":1,"ts":0,"value":1}]}"#.utf8))
        #expect(noSensors.rejected.map(\.code) == [RejectionCode.unknownSensor])
    }
}
