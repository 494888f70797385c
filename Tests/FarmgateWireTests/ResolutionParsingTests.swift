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
}
