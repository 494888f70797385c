import Testing

@testable import FarmgateWire

@Suite("Resolution parsing")
struct ResolutionParsingTests {
    @Test("accepted forms", arguments: [("0.01", 1, 100), ("1/16", 1, 16), ("0.5", 1, 2), ("5", 5, 1), (" 1 / 8 ", 1, 8)])
    func accepted(text: String, numerator: UInt32, denominator: UInt32) throws {
        #expect(try Resolution(parsing: text) == Resolution(numerator: numerator, denominator: denominator))
    }

    @Test("a refused resolution's error quotes what was written, not what it was reduced to", arguments: ["0", "0.0", "0/1", "1/0", "-0.01", "x", "0.0000001"])
    func refusedQuotesTheText(text: String) {
        #expect(throws: ResolutionError(text: text)) { try Resolution(parsing: text) }
    }

    @Test(
        "a decimal number is rounded to steps half away from zero on its exact value as written, not on its nearest double",
        arguments: [
            ("1.005", "0.01", 101), ("0.285", "0.01", 29), ("1.015", "0.01", 102), ("1.025", "0.01", 103), ("-1.005", "0.01", -101),
            ("0.0049999999999999999", "0.01", 0), ("0.015", "0.01", 2), ("2.675", "0.01", 268), ("6.004", "0.01", 600),
            ("1e2", "0.01", 10_000), ("6.02e-1", "0.01", 60), ("1.005E+0", "0.01", 101), ("+7", "0.1", 70), ("-0", "0.01", 0),
            ("0.03125", "1/16", 1), ("-0.03125", "1/16", -1), ("0.03124", "1/16", 0), ("4.5", "3", 2), ("4.4", "3", 1),
            ("21.1235", "0.001", 21_124), ("1413.05", "0.1", 14_131),
        ] as [(String, String, Int64)])
    func decimalTies(text: String, resolution: String, steps: Int64) throws {
        let resolution = try Resolution(parsing: resolution)
        #expect(resolution.quantize(decimal: text) == steps)
        // Off a tie the double's rounding agrees.
        if let double = Double(text), abs(abs((double * Double(resolution.denominator) / Double(resolution.numerator)).truncatingRemainder(dividingBy: 1)) - 0.5) > 1e-6 {
            #expect(resolution.quantize(double) == steps)
        }
    }

    @Test("what cannot be computed exactly is left to the double", arguments: ["1e400", "abc", "1.2.3", "", "-", "e5", "1234567890123456789012345678901", "1e-300"])
    func notExact(text: String) throws {
        let answer = Resolution.hundredth.quantize(decimal: text)
        // 1e-300: its divisor would overflow 128 bits; the double (0 steps) answers.
        #expect(answer == nil, "\(text): \(String(describing: answer))")
    }
}
