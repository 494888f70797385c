// A TOML 1.0 parser for configuration files, written here rather than taken from a library: the TOML library on the
// mirror (TOMLKit, over the C++ toml++) imports full Foundation and libstdc++, which cost a Pi about 11 MB resident
// of the agent's 15 MB budget. It reads the whole language (tables, arrays of tables, dotted and quoted keys, the four
// string forms, integers in four bases, floats, booleans, arrays, inline tables); dates and times are recognised and
// kept as text (no Farmgate key takes one). Tested against TOMLKit as an oracle on generated documents.

/// A syntax or structure error, located by line and column (both from 1; the column counts bytes).
struct TOMLSyntaxError: Error, Sendable {
    let line: Int
    let column: Int
    let message: String
    /// The key whose value is wrong (`upload.endpoint`, `sensor#2.port`), when the error is inside a value.
    var key: String? = nil

    /// The error with `outer` in front of its key (or as its key): the parser names the innermost key first.
    func inside(_ outer: String) -> TOMLSyntaxError {
        var named = self
        named.key = key.map { "\(outer).\($0)" } ?? outer
        return named
    }
}

/// The parsed document before it becomes ``ConfigTable``s: tables are classes so that headers can reopen them.
final class TOMLTableBuilder {
    enum Entry {
        case value(TOMLValue)
        case table(TOMLTableBuilder)
        case tables([TOMLTableBuilder])
    }

    enum Origin {
        /// Created as the parent of a header or dotted key; a later `[header]` may still define it, once.
        case implicit
        /// Defined by its own `[header]`.
        case header
        /// Created by a dotted key (`a.b = 1` creates `a`); no `[header]` may reopen it.
        case dotted
        /// `{ ... }` or an element of `[[...]]` (always extensible by sub-headers, never by keys elsewhere).
        case inline
        case arrayElement
    }

    var entries: [String: Entry] = [:]
    var origin: Origin

    init(origin: Origin) { self.origin = origin }
}

indirect enum TOMLValue {
    case string(String)
    case integer(Int)
    case double(Double)
    case bool(Bool)
    case dateTime(String, kind: String)
    case array([TOMLValue])
    case table(TOMLTableBuilder)
}

struct TOMLParser {
    private let bytes: [UInt8]
    private var position = 0
    private var line = 1
    private var lineStart = 0
    /// Arrays and inline tables open around the current value. This and the parts of a key are bounded so that a
    /// hostile file cannot nest tables deep enough to exhaust a stack (at most 16 × 33 levels); configurations use 4.
    private var depth = 0
    static let maximumDepth = 32
    static let maximumKeyParts = 16

    init(_ text: String) { bytes = Array(text.utf8) }

    /// Parses the whole document into its root table.
    static func parse(_ text: String) throws(TOMLSyntaxError) -> TOMLTableBuilder {
        var parser = TOMLParser(text)
        return try parser.document()
    }

    // MARK: Document structure

    private mutating func document() throws(TOMLSyntaxError) -> TOMLTableBuilder {
        let root = TOMLTableBuilder(origin: .header)
        var current = root
        // How an error in a value names the table it is in: `upload`, `sensor#2` (the second `[[sensor]]`).
        var currentName: String?
        if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { position = 3; lineStart = 3 }
        while true {
            skipWhitespace()
            guard let byte = peek() else { return root }
            switch byte {
            case UInt8(ascii: "#"), UInt8(ascii: "\n"), UInt8(ascii: "\r"):
                try endOfLine()
            case UInt8(ascii: "["):
                if peek(1) == UInt8(ascii: "[") {
                    position += 2
                    let key = try keyPath(closing: "]")
                    try expect("]", "`]]` to close the array-of-tables header")
                    try expect("]", "`]]` to close the array-of-tables header")
                    current = try appendTable(root, key)
                    currentName = Self.displayName(root, key)
                } else {
                    position += 1
                    let key = try keyPath(closing: "]")
                    try expect("]", "`]` to close the table header")
                    current = try defineTable(root, key)
                    currentName = Self.displayName(root, key)
                }
                try endOfLine()
            default:
                do {
                    try keyValue(into: current)
                } catch let failure {
                    guard failure.key != nil, let currentName else { throw failure }
                    throw failure.inside(currentName)
                }
                try endOfLine()
            }
        }
    }

    /// `key = value`, the key possibly dotted, into `table`.
    private mutating func keyValue(into table: TOMLTableBuilder) throws(TOMLSyntaxError) {
        let keyColumn = position
        let key = try keyPath(closing: "=")
        skipWhitespace()
        try expect("=", "`=` after the key \(shown(key))")
        skipWhitespace()
        let value: TOMLValue
        do {
            value = try self.value()
        } catch let failure {
            throw failure.inside(Self.named(key))
        }
        var target = table
        for part in key.dropLast() {
            switch target.entries[part] {
            case nil:
                let created = TOMLTableBuilder(origin: .dotted)
                target.entries[part] = .table(created)
                target = created
            case .table(let existing) where existing.origin == .dotted || existing.origin == .implicit:
                // A table a header created on the way (`[a.b.c]` creates `a.b`) may be extended by dotted keys; it
                // then counts as defined by them, and no `[header]` may define it later.
                existing.origin = .dotted
                target = existing
            default:
                throw error(at: keyColumn, "\(shown(key)) extends \(shown([part])), which is already defined as a value or table elsewhere")
            }
        }
        guard let last = key.last else { throw error(at: keyColumn, "a key is missing") }
        guard target.entries[last] == nil else {
            throw error(at: keyColumn, "the key \(shown(key)) is defined twice")
        }
        target.entries[last] = .value(value)
    }

    /// The table a `[a.b.c]` header names, created or defined now.
    private mutating func defineTable(_ root: TOMLTableBuilder, _ key: [String]) throws(TOMLSyntaxError) -> TOMLTableBuilder {
        let column = position
        let parent = try walk(root, Array(key.dropLast()), column: column)
        guard let last = key.last else { throw error(at: column, "a table header needs a name") }
        switch parent.entries[last] {
        case nil:
            let table = TOMLTableBuilder(origin: .header)
            parent.entries[last] = .table(table)
            return table
        case .table(let existing) where existing.origin == .implicit:
            existing.origin = .header
            return existing
        default:
            throw error(at: column, "the table [\(key.joined(separator: "."))] is defined twice (or its name is already a value)")
        }
    }

    /// A new element of the `[[a.b]]` array of tables.
    private mutating func appendTable(_ root: TOMLTableBuilder, _ key: [String]) throws(TOMLSyntaxError) -> TOMLTableBuilder {
        let column = position
        let parent = try walk(root, Array(key.dropLast()), column: column)
        guard let last = key.last else { throw error(at: column, "an array-of-tables header needs a name") }
        let element = TOMLTableBuilder(origin: .arrayElement)
        // The array is taken out of the dictionary and consumed into `elements`, its only reference, so that the append
        // is in place. While the dictionary (or a copy the switch keeps, as a debug build does without `consume`) still
        // holds it, the append copies the whole array first: a file of n `[[sensor]]` tables would cost n²/2 copies.
        let existing = parent.entries.removeValue(forKey: last)
        switch consume existing {
        case nil:
            parent.entries[last] = .tables([element])
        case .tables(var elements)?:
            elements.append(element)
            parent.entries[last] = .tables(elements)
        case .value?, .table?:
            // The document is not used after an error, so the entry taken out need not go back.
            throw error(at: column, "[[\(key.joined(separator: "."))]] names something already defined as a table or value")
        }
        return element
    }

    /// A key as errors name it: `upload.endpoint`, quoting parts that are not bare keys.
    private static func named(_ key: [String]) -> String {
        key.map { part in
            part.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-") } && !part.isEmpty ? part : "\"\(part)\""
        }.joined(separator: ".")
    }

    /// How an error names the table `key` of a header just read: each array of tables on the way with the number of its
    /// element (`sensor#3.options` for a `[sensor.options]` under the third `[[sensor]]`, `sensor#3.alarm#1`).
    private static func displayName(_ root: TOMLTableBuilder, _ key: [String]) -> String {
        var table = root
        var parts: [String] = []
        for part in key {
            let shown = named([part])
            switch table.entries[part] {
            case .tables(let elements):
                parts.append(shown + "#\(elements.count)")
                table = elements.last ?? table
            case .table(let child):
                parts.append(shown)
                table = child
            default:
                parts.append(shown)
            }
        }
        return parts.joined(separator: ".")
    }

    /// Follows the parents of a header, creating implicit tables; an array of tables means its last element.
    private func walk(_ root: TOMLTableBuilder, _ parents: [String], column: Int) throws(TOMLSyntaxError) -> TOMLTableBuilder {
        var table = root
        for part in parents {
            switch table.entries[part] {
            case nil:
                let created = TOMLTableBuilder(origin: .implicit)
                table.entries[part] = .table(created)
                table = created
            case .table(let existing) where existing.origin != .inline:
                table = existing
            case .tables(let elements):
                guard let lastElement = elements.last else { throw error(at: column, "empty array of tables") }
                table = lastElement
            default:
                throw error(at: column, "\(shown([part])) is already a value or an inline table; a header cannot extend it")
            }
        }
        return table
    }

    // MARK: Keys

    /// A possibly dotted key, up to (not including) `closing`.
    private mutating func keyPath(closing: Character) throws(TOMLSyntaxError) -> [String] {
        var parts: [String] = []
        while true {
            skipWhitespace()
            guard parts.count < Self.maximumKeyParts else {
                throw error("a key of more than \(Self.maximumKeyParts) dotted parts")
            }
            parts.append(try simpleKey())
            skipWhitespace()
            guard peek() == UInt8(ascii: ".") else { break }
            position += 1
        }
        if peek() != closing.asciiValue {
            if peek() == nil || isNewline(peek()) { throw error("expected `\(closing)` after the key \(shown(parts))") }
            throw error("unexpected `\(characterHere())` in the key \(shown(parts)) (quote keys with other characters)")
        }
        return parts
    }

    private mutating func simpleKey() throws(TOMLSyntaxError) -> String {
        switch peek() {
        case UInt8(ascii: "\""):
            return try string(quote: UInt8(ascii: "\""), multiline: false)
        case UInt8(ascii: "'"):
            return try string(quote: UInt8(ascii: "'"), multiline: false)
        default:
            let start = position
            while let byte = peek(), isBareKeyByte(byte) { position += 1 }
            guard position > start else { throw error("expected a key (letters, digits, `_`, `-`, or a quoted key)") }
            return String(decoding: bytes[start..<position], as: UTF8.self)
        }
    }

    // MARK: Values

    private mutating func value() throws(TOMLSyntaxError) -> TOMLValue {
        guard let byte = peek() else { throw error("a value is missing") }
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "'"):
            return .string(try string(quote: byte, multiline: peek(1) == byte && peek(2) == byte))
        case UInt8(ascii: "["):
            return try array()
        case UInt8(ascii: "{"):
            return try inlineTable()
        case UInt8(ascii: "t") where matches("true"):
            position += 4
            return .bool(true)
        case UInt8(ascii: "f") where matches("false"):
            position += 5
            return .bool(false)
        default:
            return try numberOrDate()
        }
    }

    private mutating func array() throws(TOMLSyntaxError) -> TOMLValue {
        try enter()
        defer { depth -= 1 }
        position += 1  // [
        var elements: [TOMLValue] = []
        while true {
            try skipWhitespaceCommentsAndNewlines()
            if peek() == UInt8(ascii: "]") {
                position += 1
                return .array(elements)
            }
            elements.append(try value())
            try skipWhitespaceCommentsAndNewlines()
            switch peek() {
            case UInt8(ascii: ","): position += 1
            case UInt8(ascii: "]"):
                position += 1
                return .array(elements)
            default: throw error("expected `,` or `]` in the array")
            }
        }
    }

    private mutating func inlineTable() throws(TOMLSyntaxError) -> TOMLValue {
        try enter()
        defer { depth -= 1 }
        position += 1  // {
        let table = TOMLTableBuilder(origin: .inline)
        skipWhitespace()
        if peek() == UInt8(ascii: "}") {
            position += 1
            return .table(table)
        }
        while true {
            skipWhitespace()
            try keyValue(into: table)
            skipWhitespace()
            switch peek() {
            case UInt8(ascii: ","): position += 1
            case UInt8(ascii: "}"):
                position += 1
                freeze(table)
                return .table(table)
            default: throw error("expected `,` or `}` in the inline table (it must stay on one line)")
            }
        }
    }

    private mutating func enter() throws(TOMLSyntaxError) {
        guard depth < Self.maximumDepth else {
            throw error("arrays and inline tables nested deeper than \(Self.maximumDepth) levels")
        }
        depth += 1
    }

    /// Tables made by dotted keys inside an inline table are as closed as the inline table itself.
    private func freeze(_ table: TOMLTableBuilder) {
        table.origin = .inline
        for case .table(let child) in table.entries.values { freeze(child) }
    }

    private mutating func numberOrDate() throws(TOMLSyntaxError) -> TOMLValue {
        let start = position
        // A date starts with four digits and `-`, a time with two digits and `:`.
        if isDigit(peek()), isDigit(peek(1)), (peek(2) == UInt8(ascii: ":") || isDigit(peek(2)) && isDigit(peek(3)) && peek(4) == UInt8(ascii: "-")) {
            return try dateTime()
        }
        while let byte = peek(), isNumberByte(byte) { position += 1 }
        let token = String(decoding: bytes[start..<position], as: UTF8.self)
        if let integer = Self.integer(token) { return .integer(integer) }
        if let double = Self.double(token) { return .double(double) }
        if Self.isIntegerPastRange(token) {
            throw error(at: start, "`\(token)` is too large for an integer (from \(Int.min) to \(Int.max))")
        }
        // What was written, up to where a value would end, so that `/dev/ttyUSB0` or `10s` is shown whole (a word of
        // more than 120 characters is shown cut, without a quoted form to copy, which would be cut too).
        var end = start
        while let byte = end < bytes.count ? bytes[end] : nil, !Self.endsUnquotedWord(byte) { end += 1 }
        let written = String(decoding: bytes[start..<end], as: UTF8.self)
        guard !written.isEmpty else {
            throw error(at: start, "expected a value (a string in quotes, a number, true/false, an array or an inline table)")
        }
        guard written.count <= 120 else {
            throw error(
                at: start, "`\(written.prefix(120))…` is not a valid value: a string needs quotes; numbers look like 42, 0x2A, 6.5, 1e3")
        }
        let escaped = String(written.flatMap { $0 == "\\" || $0 == "\"" ? ["\\", $0] : [$0] })
        throw error(
            at: start,
            "`\(written)` is not a valid value: a string needs quotes (\"\(escaped)\"); numbers look like 42, 0x2A, 6.5, 1e3")
    }

    /// A decimal, hex, octal or binary integer that is well formed but does not fit in 64 bits.
    static func isIntegerPastRange(_ token: String) -> Bool {
        var text = Substring(token)
        var radix = 10
        for (prefix, base) in [("0x", 16), ("0o", 8), ("0b", 2)] where text.hasPrefix(prefix) {
            radix = base
            text = text.dropFirst(2)
        }
        if radix == 10, let sign = text.first, sign == "+" || sign == "-" { text = text.dropFirst() }
        guard validUnderscores(text) else { return false }
        let digits = text.filter { $0 != "_" }
        if radix == 10, digits.count > 1, digits.first == "0" { return false }
        return digits.allSatisfy { $0.isASCII && $0.isHexDigit && Int(String($0), radix: 16).map { $0 < radix } == true }
    }

    private static func endsUnquotedWord(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D || byte == UInt8(ascii: "#") || byte == UInt8(ascii: ",")
            || byte == UInt8(ascii: "]") || byte == UInt8(ascii: "}") || byte < 0x20 || byte == 0x7F
    }

    static func integer(_ token: String) -> Int? {
        var text = Substring(token)
        var radix = 10
        for (prefix, base) in [("0x", 16), ("0o", 8), ("0b", 2)] where text.hasPrefix(prefix) {
            radix = base
            text = text.dropFirst(2)
        }
        var negative = false
        if radix == 10, let sign = text.first, sign == "+" || sign == "-" {
            negative = sign == "-"
            text = text.dropFirst()
        }
        guard validUnderscores(text), !text.isEmpty else { return nil }
        let digits = text.filter { $0 != "_" }
        if radix == 10, digits.count > 1, digits.first == "0" { return nil }  // no leading zeros
        guard digits.allSatisfy({ $0.isHexDigit }), let magnitude = UInt64(digits, radix: radix) else { return nil }
        if negative {
            return magnitude <= UInt64(Int.max) + 1 ? Int(truncatingIfNeeded: 0 &- magnitude) : nil
        }
        return magnitude <= UInt64(Int.max) ? Int(magnitude) : nil
    }

    static func double(_ token: String) -> Double? {
        var text = Substring(token)
        var sign = 1.0
        if let first = text.first, first == "+" || first == "-" {
            sign = first == "-" ? -1 : 1
            text = text.dropFirst()
        }
        if text == "inf" { return sign * .infinity }
        if text == "nan" { return .nan }
        // int part, then .fraction and/or e[+-]exponent; digits on both sides of every `.` and `_`.
        let exponentIndex = text.firstIndex(where: { $0 == "e" || $0 == "E" })
        let mantissa = exponentIndex.map { text[..<$0] } ?? text
        let exponent: Substring? = exponentIndex.map { text[text.index(after: $0)...] }
        let parts = mantissa.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count <= 2, parts.count == 2 || exponent != nil else { return nil }
        let whole = parts[0]
        guard validUnderscores(whole), whole.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == "_") }) else { return nil }
        if whole.filter({ $0 != "_" }).count > 1, whole.first == "0" { return nil }
        if parts.count == 2 {
            guard validUnderscores(parts[1]), parts[1].allSatisfy({ $0.isASCII && ($0.isNumber || $0 == "_") }) else { return nil }
        }
        if var digits = exponent {
            if let first = digits.first, first == "+" || first == "-" { digits = digits.dropFirst() }
            guard validUnderscores(digits), digits.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == "_") }) else { return nil }
        }
        guard let value = Double(String(text.filter { $0 != "_" })) else { return nil }
        return sign * value
    }

    /// Digits with single underscores between them, neither first nor last.
    private static func validUnderscores(_ text: Substring) -> Bool {
        guard !text.isEmpty, text.first != "_", text.last != "_" else { return false }
        return !text.contains("__")
    }

    private mutating func dateTime() throws(TOMLSyntaxError) -> TOMLValue {
        let start = position
        var hasDate = false
        var hasTime = false
        if peek(4) == UInt8(ascii: "-") {
            try datePart()
            hasDate = true
            if let separator = peek(), separator == UInt8(ascii: "T") || separator == UInt8(ascii: "t")
                || separator == UInt8(ascii: " ") && isDigit(peek(1))
            {
                position += 1
                try timePart()
                hasTime = true
            }
        } else {
            try timePart()
            hasTime = true
        }
        var offset = false
        if hasDate && hasTime {
            if let zone = peek(), zone == UInt8(ascii: "Z") || zone == UInt8(ascii: "z") {
                position += 1
                offset = true
            } else if let sign = peek(), sign == UInt8(ascii: "+") || sign == UInt8(ascii: "-") {
                let start = position
                position += 1
                let hours = try digits(2)
                try expect(":", "`:` in the time offset")
                let minutes = try digits(2)
                guard hours < 24, minutes < 60 else { throw error(at: start, "a time offset that does not exist (hours 00-23, minutes 00-59)") }
                offset = true
            }
        }
        let text = String(decoding: bytes[start..<position], as: UTF8.self)
        let kind = hasDate && hasTime ? (offset ? "a date-time" : "a local date-time") : hasDate ? "a date" : "a time"
        return .dateTime(text, kind: kind)
    }

    /// A full date whose month and day exist (RFC 3339, as TOML 1.0 asks: `1979-02-29` is refused, `2000-02-29` taken).
    private mutating func datePart() throws(TOMLSyntaxError) {
        let start = position
        let year = try digits(4)
        try expect("-", "`-` in the date (YYYY-MM-DD)")
        let month = try digits(2)
        try expect("-", "`-` in the date (YYYY-MM-DD)")
        let day = try digits(2)
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
        let days = [31, leap ? 29 : 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
        guard (1...12).contains(month), (1...days[month - 1]).contains(day) else {
            throw error(at: start, "a date that does not exist (months 01-12, days 01 to the month's last)")
        }
    }

    /// A time of day: hours 00-23, minutes 00-59, seconds 00-60 (a leap second).
    private mutating func timePart() throws(TOMLSyntaxError) {
        let start = position
        let hour = try digits(2)
        try expect(":", "`:` in the time (HH:MM:SS)")
        let minute = try digits(2)
        try expect(":", "`:` in the time (HH:MM:SS)")
        let second = try digits(2)
        guard hour < 24, minute < 60, second <= 60 else {
            throw error(at: start, "a time that does not exist (hours 00-23, minutes 00-59, seconds 00-60)")
        }
        if peek() == UInt8(ascii: ".") {
            position += 1
            let start = position
            while isDigit(peek()) { position += 1 }
            guard position > start else { throw error("digits after the `.` of the seconds") }
        }
    }

    /// `count` decimal digits, and their value.
    @discardableResult
    private mutating func digits(_ count: Int) throws(TOMLSyntaxError) -> Int {
        var value = 0
        for _ in 0..<count {
            guard let digit = peek(), isDigit(digit) else { throw error("expected a digit in the date or time") }
            value = value * 10 + Int(digit - UInt8(ascii: "0"))
            position += 1
        }
        return value
    }

    // MARK: Strings

    /// A basic (`"`, with escapes) or literal (`'`) string, on one line or multi-line (three quotes).
    private mutating func string(quote: UInt8, multiline: Bool) throws(TOMLSyntaxError) -> String {
        let escapes = quote == UInt8(ascii: "\"")
        let mark = Character(UnicodeScalar(quote))
        let start = position
        position += multiline ? 3 : 1
        if multiline { skipOneNewline() }
        var out: [UInt8] = []
        while true {
            guard let byte = peek() else { throw error(at: start, "the string is not closed (a `\(mark)` is missing)") }
            if byte == quote {
                if !multiline {
                    position += 1
                    return try decode(out, start: start)
                }
                if peek(1) == quote, peek(2) == quote {
                    // Up to two quotes may end the content right before the closing three.
                    var extra = 0
                    while extra < 2, peek(3 + extra) == quote { extra += 1 }
                    out.append(contentsOf: repeatElement(quote, count: extra))
                    position += 3 + extra
                    return try decode(out, start: start)
                }
                out.append(byte)
                position += 1
                continue
            }
            if escapes, byte == UInt8(ascii: "\\") {
                position += 1
                if multiline, let next = peek(), next == UInt8(ascii: " ") || next == UInt8(ascii: "\t") || isNewline(next) {
                    // A line-ending backslash: drop it, the newline and all whitespace up to the next content.
                    let save = position
                    skipWhitespace()
                    guard isNewline(peek()) else {
                        position = save
                        throw error("`\\` followed by spaces must end the line in a multi-line string")
                    }
                    try skipWhitespaceAndNewlines()
                    continue
                }
                try escape(into: &out)
                continue
            }
            if isNewline(byte) {
                guard multiline else { throw error("the string is not closed on its line (a `\(mark)` is missing)") }
                if byte == UInt8(ascii: "\r") {
                    guard peek(1) == UInt8(ascii: "\n") else { throw error("a carriage return must be followed by a line feed") }
                    position += 1
                }
                position += 1
                newLine()
                out.append(UInt8(ascii: "\n"))
                continue
            }
            if isControl(byte) {
                throw error("control character 0x\(String(byte, radix: 16)) in a string\(escapes ? "; escape it" : "")")
            }
            out.append(byte)
            position += 1
        }
    }

    private mutating func escape(into out: inout [UInt8]) throws(TOMLSyntaxError) {
        guard let code = peek() else { throw error("the string ends inside an escape") }
        position += 1
        switch code {
        case UInt8(ascii: "b"): out.append(0x08)
        case UInt8(ascii: "t"): out.append(0x09)
        case UInt8(ascii: "n"): out.append(0x0A)
        case UInt8(ascii: "f"): out.append(0x0C)
        case UInt8(ascii: "r"): out.append(0x0D)
        case UInt8(ascii: "\""): out.append(0x22)
        case UInt8(ascii: "\\"): out.append(0x5C)
        case UInt8(ascii: "u"), UInt8(ascii: "U"):
            let count = code == UInt8(ascii: "u") ? 4 : 8
            guard position + count <= bytes.count,
                let scalarValue = UInt32(String(decoding: bytes[position..<position + count], as: UTF8.self), radix: 16),
                bytes[position..<position + count].allSatisfy({ Character(UnicodeScalar($0)).isHexDigit }),
                let scalar = UnicodeScalar(scalarValue)
            else { throw error("`\\\(Character(UnicodeScalar(code)))` needs \(count) hex digits of a Unicode scalar") }
            position += count
            out.append(contentsOf: Array(String(Character(scalar)).utf8))
        default:
            throw error("unknown escape `\\\(Character(UnicodeScalar(code)))` (use \\\\ for a backslash, or a literal 'string')")
        }
    }

    private func decode(_ bytes: [UInt8], start: Int) throws(TOMLSyntaxError) -> String {
        guard let text = String(validating: bytes, as: UTF8.self) else { throw error(at: start, "the string is not valid UTF-8") }
        return text
    }

    // MARK: Whitespace, comments, lines

    private mutating func skipWhitespace() {
        while let byte = peek(), byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") { position += 1 }
    }

    private mutating func skipOneNewline() {
        if peek() == UInt8(ascii: "\n") {
            position += 1
            newLine()
        } else if peek() == UInt8(ascii: "\r"), peek(1) == UInt8(ascii: "\n") {
            position += 2
            newLine()
        }
    }

    private mutating func skipWhitespaceAndNewlines() throws(TOMLSyntaxError) {
        while true {
            skipWhitespace()
            guard isNewline(peek()) else { return }
            if peek() == UInt8(ascii: "\r") {
                guard peek(1) == UInt8(ascii: "\n") else { throw error("a carriage return must be followed by a line feed") }
                position += 1
            }
            position += 1
            newLine()
        }
    }

    private mutating func skipWhitespaceCommentsAndNewlines() throws(TOMLSyntaxError) {
        while true {
            try skipWhitespaceAndNewlines()
            guard peek() == UInt8(ascii: "#") else { return }
            try comment()
        }
    }

    private mutating func comment() throws(TOMLSyntaxError) {
        position += 1  // #
        while let byte = peek(), !isNewline(byte) {
            if isControl(byte) && byte != 0x09 { throw error("control character 0x\(String(byte, radix: 16)) in a comment") }
            position += 1
        }
    }

    /// Optional whitespace and comment, then a newline or the end of the document.
    private mutating func endOfLine() throws(TOMLSyntaxError) {
        skipWhitespace()
        if peek() == UInt8(ascii: "#") { try comment() }
        guard let byte = peek() else { return }
        if byte == UInt8(ascii: "\r"), peek(1) == UInt8(ascii: "\n") {
            position += 2
        } else if byte == UInt8(ascii: "\n") {
            position += 1
        } else {
            throw error("unexpected `\(characterHere())` after the value; one key = value per line")
        }
        newLine()
    }

    private mutating func newLine() {
        line += 1
        lineStart = position
    }

    // MARK: Bytes

    /// The character that starts at `position`, decoded from UTF-8 (`ä`, not the `Ã` of its first byte), for messages;
    /// a byte that starts no valid sequence is shown as `\xNN`.
    private func characterHere() -> String {
        guard let lead = peek() else { return "" }
        // A control character is named, not echoed: a raw CR (a file with old Mac line endings) moved the terminal's
        // cursor and hid the message's start, a NUL or BEL went to the log as it was.
        if lead < 0x20 || lead == 0x7F {
            let name = lead == 0x0D ? " (a carriage return: save the file with LF or CRLF line endings)" : ""
            return "\\u{\(String(lead, radix: 16, uppercase: true))}" + name
        }
        let length = lead < 0x80 ? 1 : lead >> 5 == 0b110 ? 2 : lead >> 4 == 0b1110 ? 3 : lead >> 3 == 0b11110 ? 4 : 0
        if length > 0, position + length <= bytes.count,
            let text = String(validating: bytes[position..<position + length], as: UTF8.self)
        {
            return text
        }
        let hex = Array("0123456789ABCDEF")
        return "\\x" + String([hex[Int(lead >> 4)], hex[Int(lead & 0xF)]])
    }

    private func peek(_ offset: Int = 0) -> UInt8? {
        position + offset < bytes.count ? bytes[position + offset] : nil
    }

    private func matches(_ word: String) -> Bool {
        let word = Array(word.utf8)
        guard bytes[position...].starts(with: word) else { return false }
        guard let next = peek(word.count) else { return true }
        return !isBareKeyByte(next)
    }

    private mutating func expect(_ character: Character, _ what: String) throws(TOMLSyntaxError) {
        guard let ascii = character.asciiValue, peek() == ascii else { throw error("expected \(what)") }
        position += 1
    }

    private func isDigit(_ byte: UInt8?) -> Bool { byte.map { $0 >= 0x30 && $0 <= 0x39 } ?? false }
    private func isNewline(_ byte: UInt8?) -> Bool { byte == 0x0A || byte == 0x0D }
    private func isControl(_ byte: UInt8) -> Bool { (byte < 0x20 && byte != 0x09) || byte == 0x7F }

    private func isBareKeyByte(_ byte: UInt8) -> Bool {
        (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
            || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-")
    }

    private func isNumberByte(_ byte: UInt8) -> Bool {
        isBareKeyByte(byte) || byte == UInt8(ascii: "+") || byte == UInt8(ascii: ".")
    }

    private func shown(_ key: [String]) -> String { "`" + Self.named(key) + "`" }

    private func error(_ message: String) -> TOMLSyntaxError { error(at: position, message) }

    private func error(at offset: Int, _ message: String) -> TOMLSyntaxError {
        // The column of `offset` on the current line; an offset on an earlier line (an unclosed string) reports its
        // own line by counting back.
        var lineNumber = line
        var start = lineStart
        if offset < lineStart {
            lineNumber = 1 + bytes[..<offset].count(where: { $0 == 0x0A })
            start = (bytes[..<offset].lastIndex(of: 0x0A).map { $0 + 1 }) ?? 0
        }
        return TOMLSyntaxError(line: lineNumber, column: max(1, offset - start + 1), message: message)
    }
}
