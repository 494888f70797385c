import FarmgateSupport
import PropertyBased
import Testing

@testable import FarmgateWire

@Suite("JSON batch form")
struct BatchJSONTests {
    static func decode(_ text: String) throws(BatchDecodingError) -> DecodedJSONBatch {
        try BatchJSON.decode(Array(text.utf8))
    }

    static func error(_ text: String) -> String {
        do {
            _ = try decode(text)
            return ""
        } catch { return error.description }
    }

    @Test("decode(encode(b)) holds the same sensors and readings, for random series")
    func randomSeries() async {
        await propertyCheck(count: 200, input: Gen.uint64(in: 0...UInt64.max), Gen.bool()) { seed, extreme in
            var rng = TestRandom(seed: seed)
            let batch = try Fixtures.randomBatch(&rng, extreme: extreme, knownFlagsOnly: true)
            let decoded = try BatchJSON.decode(BatchJSON.encode(batch))
            #expect(decoded.rejected.isEmpty)
            #expect(decoded.batch.device == batch.device)
            #expect(decoded.batch.sensors == batch.sensors)
            #expect(decoded.batch.readings == Fixtures.quantized(batch), "seed \(seed)")
        }
    }

    @Test("the documented example decodes")
    func example() throws {
        let decoded = try Self.decode("""
            {"device":"greenhouse-2","sensors":[{"id":"tank1.ph","quantity":"ph","resolution":"0.01"},
             {"id":"tank1.temp","quantity":"temperature","resolution":"1/16"},{"id":"tank1.ec","quantity":"ec"},
             {"id":"tank1.orp","quantity":"orp","resolution":0.5}],
             "readings":[{"sensor":"tank1.ph","seq":1,"ts":"2026-11-23T10:00:00.123Z","value":6.02,"flags":["clock_unsynchronized"]},
                         {"sensor":"tank1.temp","seq":2,"ts":1795428000123456,"value":"NaN"},
                         {"sensor":"tank1.ec","seq":18446744073709551615,"ts":"2026-11-23T11:00:00+01:00","value":-1e3}]}
            """)
        #expect(decoded.rejected.isEmpty)
        #expect(decoded.batch.sensors.map(\.resolution) == [.hundredth, .sixteenth, .tenth, try Resolution(numerator: 1, denominator: 2)])
        let readings = decoded.batch.readings
        #expect(readings.count == 3)
        #expect(readings[0].timestamp == RFC3339.parse("2026-11-23T10:00:00.123Z"))
        #expect(readings[0].quality == .clockUnsynchronized)
        #expect(readings[0].value == 6.02)
        #expect(readings[1].value.isNaN)
        #expect(readings[1].timestamp.microseconds == 1_795_428_000_123_456)
        #expect(readings[2].sequence == UInt64.max)
        #expect(readings[2].timestamp == RFC3339.parse("2026-11-23T10:00:00Z"))
        #expect(readings[2].value == -1000)
    }

    @Test("readings that cannot be represented are rejected one by one, the rest is taken")
    func rejections() throws {
        let decoded = try Self.decode("""
            {"device":"d","sensors":[{"id":"a","quantity":"ph"}],"readings":[
              {"sensor":"a","seq":1,"ts":0,"value":1},
              {"sensor":"nope","seq":2,"ts":0,"value":1},
              {"sensor":"a","ts":0,"value":1},
              {"sensor":"a","seq":4,"ts":"yesterday","value":1},
              {"sensor":"a","seq":5,"ts":0,"value":"six"},
              {"sensor":"a","seq":6,"ts":0,"value":1,"flags":["shiny"]},
              {"sensor":"a","seq":-7,"ts":0,"value":1},
              17,
              {"sensor":"a","seq":9,"ts":0,"value":"Infinity"}]}
            """)
        #expect(decoded.batch.readings.map(\.sequence) == [1, 9])
        #expect(decoded.batch.readings.last?.value == .infinity)
        let rejected = decoded.rejected
        #expect(
            rejected.map(\.code) == [
                "unknown_sensor", "invalid_sequence", "invalid_reading", "invalid_reading", "invalid_reading", "invalid_sequence",
                "invalid_reading",
            ])
        // A missing or invalid seq is reported as missing (nil), never as a real sequence number such as 0.
        #expect(rejected.map(\.sequence) == [2, nil, 4, 5, 6, nil, nil])
        #expect(rejected[0].sensor == "nope")
        #expect(rejected[0].message.contains("readings[1].sensor: 'nope' is not declared"))
        #expect(rejected[1].message.contains("readings[2].seq: missing"))
        #expect(rejected[2].message == "readings[3].ts: not an RFC 3339 timestamp or integer microseconds")
        #expect(rejected[3].message.contains("readings[4].value"))
        #expect(rejected[4].message.contains("readings[5].flags[0]: not a known flag"))
        #expect(rejected[5].message.contains("readings[6].seq"))
        #expect(rejected[6].message.contains("readings[7]: expected an object, found a number"))
        // Each says what was found: a value or sequence sent as a string or null is not "missing".
        #expect(rejected[3].message == #"readings[4].value: a string ("six"); send the number itself, or "NaN", "Infinity" or "-Infinity""#)
        #expect(rejected[5].message == "readings[6].seq: -7 is not a whole number from 0 to 9223372036854775807")
        #expect(rejected[1].message == "readings[2].seq: missing; expected a whole number from 0 to 9223372036854775807")
    }

    @Test("a value or sequence of the wrong JSON type is named by what was found")
    func wrongTypesAreNamed() throws {
        let decoded = try Self.decode(
            """
            {"device":"d","sensors":[{"id":"a","quantity":"ph"}],"readings":[
              {"sensor":"a","seq":1,"ts":0,"value":"5"},
              {"sensor":"a","seq":2,"ts":0,"value":null},
              {"sensor":"a","seq":"3","ts":0,"value":1},
              {"sensor":"a","seq":null,"ts":0,"value":1},
              {"sensor":"a","seq":4.5,"ts":0,"value":1}]}
            """)
        #expect(decoded.batch.readings.isEmpty)
        #expect(
            decoded.rejected.map(\.message) == [
                #"readings[0].value: a string ("5"); send the number itself, or "NaN", "Infinity" or "-Infinity""#,
                #"readings[1].value: found null; expected a number (or "NaN", "Infinity", "-Infinity")"#,
                #"readings[2].seq: a string ("3"); send the number itself, a whole number from 0 to 9223372036854775807"#,
                "readings[3].seq: found null; expected a whole number from 0 to 9223372036854775807",
                "readings[4].seq: 4.5 is not a whole number from 0 to 9223372036854775807",
            ])
    }

    @Test("structural problems throw, naming the path")
    func structuralErrors() {
        #expect(Self.error("").contains("not valid JSON"))
        #expect(Self.error("{\"device\":\"d\"").contains("not valid JSON: the document ends inside an object"))
        #expect(Self.error("[1]").contains("the document is an array, not an object"))
        #expect(Self.error("{}") == "device: missing")
        #expect(Self.error("{\"device\":3}") == "device: expected a string, found a number")
        #expect(Self.error("{\"device\":\"a b\"}").contains("device: invalid device id 'a b'"))
        #expect(Self.error("{\"device\":\"d\",\"sensors\":[{\"id\":\"x\",\"quantity\":\"mood\"}]}")
            .contains("sensors[0].quantity: unknown quantity 'mood'"))
        #expect(Self.error("{\"device\":\"d\",\"sensors\":[{\"id\":\"x\",\"quantity\":\"ph\",\"resolution\":\"0\"}]}")
            .contains("sensors[0].resolution: invalid resolution"))
        // A sign is not read past: -0.01 is not 0.01.
        for negative in ["-0.01", "\"-0.01\"", "\"+0.01\"", "\"-1/16\""] {
            #expect(Self.error("{\"device\":\"d\",\"sensors\":[{\"id\":\"x\",\"quantity\":\"ph\",\"resolution\":\(negative)}]}")
                .contains("sensors[0].resolution: invalid resolution"), "\(negative)")
        }
        #expect(Self.error("{\"device\":\"d\",\"sensors\":[{\"id\":\"x\",\"quantity\":\"ph\"},{\"id\":\"x\",\"quantity\":\"ec\"}]}")
            == "sensors[1].id: 'x' is declared more than once")
        #expect(Self.error("{\"device\":\"d\",\"readings\":{}}") == "readings: expected an array, found an object")
        #expect(Self.error(String(repeating: "[", count: 100)).contains("nested more than 32 levels deep"))
        #expect(Self.error("{\"device\":\"d\"} x").contains("unexpected data after the JSON value"))
        #expect(Self.error("{\"device\":\"\\ud800\"}").contains("unpaired surrogate"))
        // A misspelt "readings" was skipped as an unknown member and the batch taken with nothing in it (a tester,
        // 2026-12-07); a batch with "readings" (even empty or null) or "calibrations" alone is one.
        #expect(
            Self.error("{\"device\":\"d\",\"sensors\":[],\"reading\":[{\"sensor\":\"x\"}]}")
                == #"readings: missing; a batch carries its readings in "readings" (or calibration events in "calibrations"), and this one has only other members besides device and sensors: "reading""#)
        #expect(Self.error("{\"device\":\"d\"}").hasPrefix("readings: missing; "))
        for body in ["{\"device\":\"d\",\"readings\":[]}", "{\"device\":\"d\",\"readings\":null}", "{\"device\":\"d\",\"calibrations\":[]}"] {
            #expect(throws: Never.self, "\(body)") { _ = try BatchJSON.decode(Array(body.utf8)) }
        }
    }

    @Test("limits cap the document size and the reading count")
    func limits() {
        let text = Array("{\"device\":\"d\",\"readings\":[1,2,3]}".utf8)
        #expect(throws: BatchDecodingError("readings: more than the limit of 2 entries", kind: .tooManyReadings)) {
            try BatchJSON.decode(text, limits: BatchLimits(maxReadings: 2))
        }
        #expect(throws: BatchDecodingError("the JSON document is \(text.count) bytes, more than the limit of 10", kind: .tooLarge)) {
            try BatchJSON.decode(text, limits: BatchLimits(maxDecompressedBytes: 10))
        }
    }

    @Test("random and mutated documents decode or throw, never crash")
    func hostile() async throws {
        let document = BatchJSON.encode(try Fixtures.realisticBatch(seed: 3, readings: 20))
        var rng = TestRandom(seed: 5)
        for position in document.indices {
            var mutated = document
            mutated[position] = [UInt8(ascii: "\""), UInt8(ascii: "{"), UInt8(ascii: "]"), 0xFF, UInt8(ascii: "\\"), UInt8(ascii: "9")]
                .randomElement(using: &rng) ?? 0
            _ = try? BatchJSON.decode(mutated)
            _ = try? BatchJSON.decode(Array(document.prefix(position)))
        }
        await propertyCheck(count: 500, input: Gen.uint8(in: 0...255).array(of: 0...200)) { bytes in
            _ = try? BatchJSON.decode(bytes)
        }
    }

    @Test("resolutions are written so that they parse back to the same fraction")
    func resolutionText() throws {
        #expect(BatchJSON.text(of: .hundredth) == "0.01")
        #expect(BatchJSON.text(of: .sixteenth) == "1/16")
        #expect(BatchJSON.text(of: .one) == "1")
        #expect(BatchJSON.text(of: try Resolution(numerator: 25, denominator: 100)) == "25/100")
        #expect(BatchJSON.text(of: try Resolution(numerator: 5, denominator: 10)) == "5/10")
        #expect(BatchJSON.text(of: try Resolution(numerator: 3, denominator: 1000)) == "0.003")
        #expect(BatchJSON.text(of: try Resolution(numerator: 15, denominator: 1)) == "15")
    }
}
