import FarmgateWire
import Testing

@Suite("RFC 3339")
struct RFC3339Tests {
    @Test("Known instants format and parse both ways")
    func known() {
        let cases: [(Int64, String)] = [
            (0, "1970-01-01T00:00:00Z"),
            (1_795_424_530_123_456, "2026-11-23T09:02:10.123456Z"),
            (951_782_400_000_000, "2000-02-29T00:00:00Z"),
            (-1, "1969-12-31T23:59:59.999999Z"),
            (-62_135_596_800_000_000, "0001-01-01T00:00:00Z"),
        ]
        for (microseconds, text) in cases {
            #expect(RFC3339.format(Timestamp(microseconds: microseconds)) == text)
            #expect(RFC3339.parse(text) == Timestamp(microseconds: microseconds))
        }
    }

    @Test("Offsets convert to UTC; fractions beyond microseconds truncate")
    func offsets() {
        #expect(RFC3339.parse("2026-11-23T10:02:10+01:00") == RFC3339.parse("2026-11-23T09:02:10Z"))
        #expect(RFC3339.parse("2026-11-23T09:02:10.1234567Z") == RFC3339.parse("2026-11-23T09:02:10.123456Z"))
        #expect(RFC3339.parse("2026-11-23t09:02:10.5z")?.microseconds == RFC3339.parse("2026-11-23T09:02:10.500000Z")?.microseconds)
    }

    // A tester, 2026-12-07: a range from 00:00:00.0000001Z returned the reading at 00:00:00Z, before it.
    @Test("Rounding up: a fraction finer than a microsecond goes to the next one; zeros past it and coarser ones do not move")
    func roundingUp() {
        let base = RFC3339.parse("2026-12-01T00:00:00Z")
        #expect(RFC3339.parse("2026-12-01T00:00:00.0000001Z", roundingUp: true)?.microseconds == base.map { $0.microseconds + 1 })
        #expect(RFC3339.parse("2026-12-01T00:00:00.000001000Z", roundingUp: true)?.microseconds == base.map { $0.microseconds + 1 })
        #expect(RFC3339.parse("2026-12-01T00:00:00.000000000Z", roundingUp: true) == base)
        #expect(RFC3339.parse("2026-12-01T00:00:00.999999999Z", roundingUp: true)?.microseconds == base.map { $0.microseconds + 1_000_000 })
        #expect(RFC3339.parse("2026-12-01T00:00:00.5Z", roundingUp: true)?.microseconds == base.map { $0.microseconds + 500_000 })
        #expect(RFC3339.parse("2026-12-01T00:00:00.0000001Z", roundingUp: false) == base)
    }

    @Test("Malformed text is refused", arguments: [
        "", "2026-11-23", "2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-11-23T24:00:00Z", "2026-11-23T09:02:10",
        "2026-11-23T09:02:10.Z", "2026-11-23T09:02:10+0100", "2026-11-23T09:02:10Zjunk", "99999-01-01T00:00:00Z",
    ])
    func malformed(text: String) {
        #expect(RFC3339.parse(text) == nil)
    }

    // Found by fuzzing: `:60` was taken at any minute, and `9999-12-31T23:59:60Z` became a year-10000 time whose text
    // `format` writes with five digits and `parse` refuses.
    @Test("A leap second is the last second of a UTC day; nothing parses to a time outside years 0000-9999")
    func leapSecondsAndTheEdgesOfTheForm() {
        #expect(RFC3339.parse("2016-12-31T23:59:60Z") == RFC3339.parse("2017-01-01T00:00:00Z"))
        #expect(RFC3339.parse("2016-12-31T15:59:60-08:00") == RFC3339.parse("2017-01-01T00:00:00Z"))
        #expect(RFC3339.parse("2017-01-01T01:29:60+01:30") == RFC3339.parse("2017-01-01T00:00:00Z"))
        for text in [
            "2026-11-23T09:02:60Z", "2016-12-31T23:58:60Z", "2016-12-31T23:59:60+01:00", "9999-12-31T23:59:60Z",
            "9999-12-31T23:30:00-01:00", "0000-01-01T00:30:00+01:00",
        ] {
            #expect(RFC3339.parse(text) == nil, "\(text)")
        }
        for text in ["9999-12-31T23:59:59.999999Z", "0000-01-01T00:00:00Z", "0000-01-01T00:30:00-01:00"] {
            let parsed = RFC3339.parse(text)
            #expect(parsed.map { RFC3339.parse(RFC3339.format($0)) } == parsed, "\(text)")
            #expect(parsed != nil, "\(text)")
        }
    }

    @Test("Every Int64 formats without trapping and round-trips where the year has four digits")
    func total() {
        var generator = SystemRandomNumberGenerator()
        let extremes: [Int64] = [.min, .max, .min + 1, .max - 1, 253_402_300_799_999_999, 253_402_300_800_000_000]
        for value in extremes + (0..<2000).map({ _ in Int64.random(in: .min ... .max, using: &generator) }) {
            let text = RFC3339.format(Timestamp(microseconds: value))
            #expect(!text.isEmpty)
            if (-62_135_596_800_000_000...253_402_300_799_999_999).contains(value) {
                #expect(RFC3339.parse(text)?.microseconds == value, "\(value) -> \(text)")
            }
        }
    }
}
