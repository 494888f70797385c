// A small, strict JSON (RFC 8259) pull reader and a writer for the JSON batch form, without Foundation.
//
// The reader never builds a tree: the batch decoder walks the document member by member, keeps only what it needs and
// skips everything else without building it, checking the grammar (and UTF-8) as it goes. Memory beyond the input is
// therefore bounded by what the decoder keeps (a batch's readings, themselves capped), not by the shape of the input:
// a 32 MiB member the decoder does not know costs no allocation at all. Strings and numbers it keeps are bounded
// (``JSONReader/maxStringBytes``, ``JSONReader/maxNumberBytes``), objects hold at most ``JSONReader/maxMembers`` members
// and a member name may appear once per object. Numbers keep their text so that sequences up to 2^64−1 and microsecond
// timestamps are exact. Nesting is limited so that deep input cannot exhaust the stack; every cost is linear in the input.

/// The kind of the JSON value that starts at the reader's position.
enum JSONKind: Hashable {
    case null, bool, number, string, array, object

    /// A short name, for error messages.
    var name: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

/// A value the batch decoder keeps: a scalar, or only the kind of an array or object it skipped.
enum JSONScalar: Hashable {
    case null
    case bool(Bool)
    /// The number's text, already checked against the JSON grammar.
    case number(String)
    case string(String)
    /// An array or object, skipped without being built.
    case composite(JSONKind)

    var kind: JSONKind {
        switch self {
        case .null: .null
        case .bool: .bool
        case .number: .number
        case .string: .string
        case .composite(let kind): kind
        }
    }
}

/// Reads JSON text front to back; errors name the byte offset and what was expected, and are ``BatchDecodingError/Kind/truncated``
/// when the text ended where more was due.
struct JSONReader {
    /// How deep arrays and objects may nest.
    static let maxDepth = 32
    /// The longest string (member name or value) the reader builds, in bytes of JSON text; identifiers are at most 64
    /// characters and timestamps about 30, so only a hostile document comes near. Skipped strings are not limited.
    static let maxStringBytes = 4_096
    /// The longest number the reader keeps, in characters (a double needs fewer than 30).
    static let maxNumberBytes = 128
    /// The most members of one object: the batch's own objects have a handful; the bound keeps the duplicate check of a
    /// hostile object (millions of distinct names) from costing more memory than the names themselves.
    static let maxMembers = 1_024

    private let bytes: [UInt8]
    private(set) var index = 0

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
        // A UTF-8 byte order mark is tolerated.
        if bytes.starts(with: [0xEF, 0xBB, 0xBF]) { index = 3 }
    }

    /// The document's bytes in `range` (positions from ``index``).
    func text(_ range: Range<Int>) -> ArraySlice<UInt8> { bytes[range] }

    func error(_ message: String) -> BatchDecodingError {
        BatchDecodingError("not valid JSON: \(message) at byte \(index)", kind: index >= bytes.count ? .truncated : .malformed)
    }

    private func error(_ message: String, kind: BatchDecodingError.Kind) -> BatchDecodingError {
        BatchDecodingError("not valid JSON: \(message) at byte \(index)", kind: kind)
    }

    private mutating func skipWhitespace() {
        while index < bytes.count, bytes[index] == 0x20 || bytes[index] == 0x0A || bytes[index] == 0x0D || bytes[index] == 0x09 {
            index += 1
        }
    }

    /// The kind of the next value (after whitespace), without consuming it.
    mutating func nextKind() throws(BatchDecodingError) -> JSONKind {
        skipWhitespace()
        guard index < bytes.count else { throw error("the document ends where a value was expected") }
        switch bytes[index] {
        case UInt8(ascii: "{"): return .object
        case UInt8(ascii: "["): return .array
        case UInt8(ascii: "\""): return .string
        case UInt8(ascii: "t"), UInt8(ascii: "f"): return .bool
        case UInt8(ascii: "n"): return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number
        default: throw error("unexpected character")
        }
    }

    /// Checks that only whitespace follows the document's value.
    mutating func end() throws(BatchDecodingError) {
        skipWhitespace()
        guard index == bytes.count else { throw error("unexpected data after the JSON value") }
    }

    /// Reads an object, calling `member` with each member's name; `member` must consume the value (with one of the
    /// reading methods). A name that appears twice is refused, whatever its value.
    ///
    /// - Parameter depth: the depth of the object itself (0 for the document).
    mutating func object(
        depth: Int, path: @autoclosure () -> String, _ member: (inout JSONReader, String) throws(BatchDecodingError) -> Void
    ) throws(BatchDecodingError) {
        guard depth < JSONReader.maxDepth else { throw error("nested more than \(JSONReader.maxDepth) levels deep") }
        skipWhitespace()
        guard index < bytes.count, bytes[index] == UInt8(ascii: "{") else { throw error("expected an object") }
        index += 1
        skipWhitespace()
        if index < bytes.count, bytes[index] == UInt8(ascii: "}") {
            index += 1
            return
        }
        var names = Set<String>()
        while true {
            skipWhitespace()
            guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") else { throw error("expected a member name") }
            let nameStart = index
            guard let name = try string(keep: true) else { throw error("expected a member name") }
            guard names.insert(name).inserted else {
                let shown = name.count > 64 ? String(name.prefix(63)) + "…" : name
                throw BatchDecodingError(
                    "\(path().isEmpty ? "" : path() + ": ")the member \"\(shown)\" appears more than once in one object (byte \(nameStart)); send each member once")
            }
            guard names.count <= JSONReader.maxMembers else {
                throw error("an object with more than \(JSONReader.maxMembers) members", kind: .malformed)
            }
            skipWhitespace()
            guard index < bytes.count, bytes[index] == UInt8(ascii: ":") else { throw error("expected ':'") }
            index += 1
            try member(&self, name)
            skipWhitespace()
            guard index < bytes.count else { throw error("the document ends inside an object") }
            if bytes[index] == UInt8(ascii: ",") {
                index += 1
            } else if bytes[index] == UInt8(ascii: "}") {
                index += 1
                return
            } else {
                throw error("expected ',' or '}'")
            }
        }
    }

    /// Reads an array, calling `element` with each element's position; `element` must consume the value.
    mutating func array(depth: Int, _ element: (inout JSONReader, Int) throws(BatchDecodingError) -> Void) throws(BatchDecodingError) {
        guard depth < JSONReader.maxDepth else { throw error("nested more than \(JSONReader.maxDepth) levels deep") }
        skipWhitespace()
        guard index < bytes.count, bytes[index] == UInt8(ascii: "[") else { throw error("expected an array") }
        index += 1
        skipWhitespace()
        if index < bytes.count, bytes[index] == UInt8(ascii: "]") {
            index += 1
            return
        }
        var position = 0
        while true {
            try element(&self, position)
            position += 1
            skipWhitespace()
            guard index < bytes.count else { throw error("the document ends inside an array") }
            if bytes[index] == UInt8(ascii: ",") {
                index += 1
            } else if bytes[index] == UInt8(ascii: "]") {
                index += 1
                return
            } else {
                throw error("expected ',' or ']'")
            }
        }
    }

    /// Reads a value, keeping it if it is a scalar; an array or object is skipped and only its kind is returned.
    mutating func scalar(depth: Int) throws(BatchDecodingError) -> JSONScalar {
        switch try nextKind() {
        case .object, .array:
            let kind = try nextKind()
            try skipValue(depth: depth)
            return .composite(kind)
        case .string:
            return .string(try string(keep: true) ?? "")
        case .number:
            return .number(try number(keep: true))
        case .bool:
            if bytes[index] == UInt8(ascii: "t") {
                try literal("true")
                return .bool(true)
            }
            try literal("false")
            return .bool(false)
        case .null:
            try literal("null")
            return .null
        }
    }

    /// Reads a value without keeping anything of it, checking its grammar.
    mutating func skipValue(depth: Int) throws(BatchDecodingError) {
        switch try nextKind() {
        case .object:
            try object(depth: depth, path: "") { reader, _ throws(BatchDecodingError) in try reader.skipValue(depth: depth + 1) }
        case .array:
            try array(depth: depth) { reader, _ throws(BatchDecodingError) in try reader.skipValue(depth: depth + 1) }
        case .string:
            _ = try string(keep: false)
        case .number:
            _ = try number(keep: false)
        case .bool:
            try literal(bytes[index] == UInt8(ascii: "t") ? "true" : "false")
        case .null:
            try literal("null")
        }
    }

    private mutating func literal(_ word: StaticString) throws(BatchDecodingError) {
        let count = word.utf8CodeUnitCount
        for k in 0..<count {
            guard index + k < bytes.count else { throw error("unexpected end of the document", kind: .truncated) }
            guard bytes[index + k] == word.utf8Start[k] else { throw error("unexpected character") }
        }
        index += count
    }

    private mutating func digits() -> Int {
        let start = index
        while index < bytes.count, bytes[index] >= UInt8(ascii: "0"), bytes[index] <= UInt8(ascii: "9") { index += 1 }
        return index - start
    }

    /// A number's text when `keep` (empty otherwise).
    private mutating func number(keep: Bool) throws(BatchDecodingError) -> String {
        let start = index
        if bytes[index] == UInt8(ascii: "-") { index += 1 }
        guard index < bytes.count else { throw error("the document ends inside a number") }
        if bytes[index] == UInt8(ascii: "0") {
            index += 1
        } else {
            guard digits() > 0 else { throw error("expected a digit") }
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: ".") {
            index += 1
            guard digits() > 0 else { throw error("expected a digit after '.'") }
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E") {
            index += 1
            if index < bytes.count, bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-") { index += 1 }
            guard digits() > 0 else { throw error("expected a digit in the exponent") }
        }
        guard keep else { return "" }
        guard index - start <= JSONReader.maxNumberBytes else {
            throw BatchDecodingError(
                "a number of \(index - start) characters at byte \(start), more than the \(JSONReader.maxNumberBytes) this batch form allows")
        }
        return String(decoding: bytes[start..<index], as: UTF8.self)
    }

    private mutating func hex4() throws(BatchDecodingError) -> UInt32 {
        guard index + 4 <= bytes.count else { throw error("the document ends inside a \\u escape", kind: .truncated) }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let c = bytes[index]
            let digit: UInt32
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(c - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(c - UInt8(ascii: "A") + 10)
            default: throw error("invalid \\u escape")
            }
            value = value << 4 | digit
            index += 1
        }
        return value
    }

    /// Reads the string at the reader's position (its opening quote), returning it when `keep`; a kept string longer
    /// than ``maxStringBytes`` bytes of JSON text is refused. Either way escapes, control characters and UTF-8 are checked.
    private mutating func string(keep: Bool) throws(BatchDecodingError) -> String? {
        let start = index
        index += 1  // the opening quote
        var runStart = index
        var result = ""
        func flushRun(_ end: Int) throws(BatchDecodingError) {
            guard runStart < end else { return }
            if keep {
                guard let text = String(validating: bytes[runStart..<end], as: UTF8.self) else {
                    throw BatchDecodingError("not valid JSON: a string is not valid UTF-8 near byte \(runStart)")
                }
                result += text
            } else {
                guard isValidUTF8(bytes, runStart..<end) else {
                    throw BatchDecodingError("not valid JSON: a string is not valid UTF-8 near byte \(runStart)")
                }
            }
        }
        while true {
            guard index < bytes.count else { throw error("the document ends inside a string") }
            if keep, index - start > JSONReader.maxStringBytes {
                throw BatchDecodingError(
                    "a string longer than \(JSONReader.maxStringBytes) bytes at byte \(start) where the batch form expects a name, an id, a timestamp or a flag")
            }
            let c = bytes[index]
            if c == UInt8(ascii: "\"") {
                try flushRun(index)
                index += 1
                return keep ? result : nil
            }
            if c < 0x20 { throw error("a control character inside a string") }
            if c != UInt8(ascii: "\\") {
                index += 1
                continue
            }
            try flushRun(index)
            index += 1
            guard index < bytes.count else { throw error("the document ends inside a string") }
            let escape = bytes[index]
            index += 1
            var scalar: Unicode.Scalar?
            switch escape {
            case UInt8(ascii: "\""): scalar = "\""
            case UInt8(ascii: "\\"): scalar = "\\"
            case UInt8(ascii: "/"): scalar = "/"
            case UInt8(ascii: "b"): scalar = "\u{08}"
            case UInt8(ascii: "f"): scalar = "\u{0C}"
            case UInt8(ascii: "n"): scalar = "\n"
            case UInt8(ascii: "r"): scalar = "\r"
            case UInt8(ascii: "t"): scalar = "\t"
            case UInt8(ascii: "u"):
                let high = try hex4()
                if (0xD800...0xDBFF).contains(high) {
                    guard index + 2 <= bytes.count else { throw error("the document ends inside a \\u escape", kind: .truncated) }
                    guard bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u") else {
                        throw error("an unpaired surrogate in a \\u escape")
                    }
                    index += 2
                    let low = try hex4()
                    guard (0xDC00...0xDFFF).contains(low) else { throw error("an unpaired surrogate in a \\u escape") }
                    scalar = Unicode.Scalar(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
                } else {
                    scalar = Unicode.Scalar(high)
                }
                guard scalar != nil else { throw error("an unpaired surrogate in a \\u escape") }
            default:
                throw error("invalid escape")
            }
            if keep, let scalar { result.unicodeScalars.append(scalar) }
            runStart = index
        }
    }
}

/// Whether `bytes[range]` is well-formed UTF-8 (no overlong forms, surrogates or values above U+10FFFF), checked
/// without allocating.
func isValidUTF8(_ bytes: [UInt8], _ range: Range<Int>) -> Bool {
    var i = range.lowerBound
    while i < range.upperBound {
        let lead = bytes[i]
        if lead < 0x80 {
            i += 1
            continue
        }
        let following: Int
        var scalar: UInt32
        let smallest: UInt32
        if lead & 0xE0 == 0xC0 {
            (following, scalar, smallest) = (1, UInt32(lead & 0x1F), 0x80)
        } else if lead & 0xF0 == 0xE0 {
            (following, scalar, smallest) = (2, UInt32(lead & 0x0F), 0x800)
        } else if lead & 0xF8 == 0xF0 {
            (following, scalar, smallest) = (3, UInt32(lead & 0x07), 0x10000)
        } else {
            return false
        }
        guard range.upperBound - i > following else { return false }
        for k in 1...following {
            let byte = bytes[i + k]
            guard byte & 0xC0 == 0x80 else { return false }
            scalar = scalar << 6 | UInt32(byte & 0x3F)
        }
        guard scalar >= smallest, scalar <= 0x10FFFF, !(0xD800...0xDFFF).contains(scalar) else { return false }
        i += following + 1
    }
    return true
}

/// Appends JSON text.
package struct JSONWriter {
    package var bytes: [UInt8] = []

    package init(capacity: Int = 0) {
        bytes.reserveCapacity(capacity)
    }

    package mutating func raw(_ text: String) { bytes.append(contentsOf: text.utf8) }

    /// A finite number in Swift's shortest form that reads back to the same value ("6.5", "1e-05"); `null` otherwise.
    package mutating func number(_ value: Double) {
        raw(value.isFinite ? value.description : "null")
    }

    package mutating func number(_ value: some BinaryInteger) { raw(String(value)) }

    /// A quoted RFC 3339 timestamp.
    package mutating func timestamp(_ value: Timestamp) {
        bytes.append(UInt8(ascii: "\""))
        RFC3339.append(value, to: &bytes)
        bytes.append(UInt8(ascii: "\""))
    }

    package mutating func string(_ text: String) {
        bytes.append(UInt8(ascii: "\""))
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "\""): raw("\\\"")
            case UInt8(ascii: "\\"): raw("\\\\")
            case 0x0A: raw("\\n")
            case 0x0D: raw("\\r")
            case 0x09: raw("\\t")
            case 0..<0x20:
                let hex = String(byte, radix: 16)
                raw("\\u00" + (hex.count < 2 ? "0" + hex : hex))
            default: bytes.append(byte)
            }
        }
        bytes.append(UInt8(ascii: "\""))
    }
}

/// The strict reading of a JSON request body that is decoded some other way (the ingest's API bodies, through
/// `Codable`, which keeps one of a repeated member): the grammar, UTF-8, nesting, and every member name once per
/// object, checked without building anything.
public enum StrictJSON {
    /// The names of the document's top-level members, in order, when it is an object (nil for another value), after
    /// checking the whole document.
    ///
    /// - Throws: ``BatchDecodingError`` naming the problem: not JSON, or a member that appears twice in an object
    ///   ("the member "by" appears more than once in one object (byte 12); send each member once").
    public static func topLevelMembers(_ bytes: [UInt8]) throws(BatchDecodingError) -> [String]? {
        var reader = JSONReader(bytes)
        var names: [String]?
        if try reader.nextKind() == .object {
            var found: [String] = []
            try reader.object(depth: 0, path: "") { reader, name throws(BatchDecodingError) in
                found.append(name)
                try reader.skipValue(depth: 1)
            }
            names = found
        } else {
            try reader.skipValue(depth: 0)
        }
        try reader.end()
        return names
    }
}
