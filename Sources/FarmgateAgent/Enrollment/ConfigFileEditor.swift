import FarmgateSupport
import FarmgateWire

/// Edits keys of a TOML configuration file as text, line by line, so that everything else (comments, blank lines, the
/// order of sections and keys, the `[[sensor]]` tables) stays exactly as the installer wrote it. A TOML library would
/// parse and re-render the file and lose its comments.
///
/// It handles the form Farmgate's files use: `[section]` headers and `key = value` lines (a comment after the value is
/// kept when the value is replaced). It refuses, rather than guesses, to replace a value that spans several lines.
/// Callers check the result with a real TOML parser (``ConfigDocument``) before writing it.
///
/// ```swift
/// var editor = ConfigFileEditor(text: original)
/// try editor.set("endpoint", .string("https://ingest.example.net"), in: "upload")
/// try editor.remove("key", in: "upload")
/// let edited = editor.text
/// ```
public struct ConfigFileEditor: Sendable {
    /// Why a key could not be edited as text.
    public struct Refusal: Error, Sendable, CustomStringConvertible {
        public let description: String
    }

    /// A TOML value to write.
    public enum Value: Sendable, Hashable {
        case string(String)

        /// The value as TOML source: a basic string with `"`, `\` and control characters escaped.
        var source: String {
            switch self {
            case .string(let text):
                var out = "\""
                for scalar in text.unicodeScalars {
                    switch scalar {
                    case "\"": out += "\\\""
                    case "\\": out += "\\\\"
                    case "\n": out += "\\n"
                    case "\t": out += "\\t"
                    case "\r": out += "\\r"
                    default:
                        if scalar.value < 0x20 || scalar.value == 0x7F {
                            out += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
                        } else {
                            out.unicodeScalars.append(scalar)
                        }
                    }
                }
                return out + "\""
            }
        }
    }

    /// The lines without their line ending.
    private var lines: [String]
    /// Whether each line of ``lines`` ended in CRLF (`\r\n`) rather than LF: kept line by line, so that a file written
    /// on Windows keeps its endings and a mixed one is changed only where it is edited.
    private var crlf: [Bool]
    /// The ending of added lines: CRLF when most lines of the file have it.
    private let addedCRLF: Bool
    private let endsWithNewline: Bool

    public init(text: String) {
        // Split on the bytes: in a Swift String "\r\n" is one Character, which is not equal to "\n".
        let newline = UInt8(ascii: "\n")
        let carriageReturn = UInt8(ascii: "\r")
        var pieces = text.utf8.split(separator: newline, omittingEmptySubsequences: false)
        endsWithNewline = text.isEmpty || text.utf8.last == newline
        if endsWithNewline, pieces.last?.isEmpty == true { pieces.removeLast() }
        var lines: [String] = []
        var crlf: [Bool] = []
        for (index, piece) in pieces.enumerated() {
            // The last line has no ending unless the text ends with one.
            let ended = index < pieces.count - 1 || endsWithNewline
            let hasCR = ended && piece.last == carriageReturn
            lines.append(String(decoding: hasCR ? piece.dropLast() : piece, as: UTF8.self))
            crlf.append(hasCR)
        }
        let ended = endsWithNewline ? crlf : crlf.dropLast()
        addedCRLF = ended.filter { $0 }.count * 2 > ended.count
        // A last line without an ending gets the file's usual one.
        if !endsWithNewline, !crlf.isEmpty { crlf[crlf.count - 1] = addedCRLF }
        self.lines = lines
        self.crlf = crlf
    }

    /// The edited text; every line ends with its line ending (a last line that had none gets the file's usual one).
    public var text: String {
        guard !lines.isEmpty else { return "\n" }
        var out = ""
        for (index, line) in lines.enumerated() { out += line + (crlf[index] ? "\r\n" : "\n") }
        return out
    }

    /// The lines, without their endings.
    var allLines: [String] { lines }

    /// Adds `new` at the end, after a blank line when the file does not end with one, in the file's usual ending.
    mutating func append(_ new: [String]) {
        let separated = lines.isEmpty || lines.last?.trimmingWhitespace().isEmpty == true ? new : [""] + new
        insertLines(separated, at: lines.count)
    }

    /// Removes the lines of `range`.
    mutating func removeLines(_ range: Range<Int>) {
        lines.removeSubrange(range)
        crlf.removeSubrange(range)
    }

    private mutating func insertLines(_ new: [String], at index: Int) {
        lines.insert(contentsOf: new, at: index)
        crlf.insert(contentsOf: Array(repeating: addedCRLF, count: new.count), at: index)
    }

    private mutating func removeLine(at index: Int) {
        lines.remove(at: index)
        crlf.remove(at: index)
    }

    /// Sets `key = value` in `[section]`: replaces the value on the key's line (keeping its indentation and a trailing
    /// comment), else adds the line after the section's last key, else adds the section (before the first `[[...]]`
    /// table and the comments just above it, or at the end).
    public mutating func set(_ key: String, _ value: Value, in section: String) throws(Refusal) {
        let assignment = "\(key) = \(value.source)"
        if let range = sectionRange(section) {
            if let index = keyLine(key, in: range) {
                let line = lines[index]
                let indent = String(line.prefix(while: { $0 == " " || $0 == "\t" }))
                try checkSingleLine(line, key: key, section: section)
                let comment = Self.trailingComment(of: line).map { "  " + $0 } ?? ""
                lines[index] = indent + assignment + comment
                return
            }
            var insertAt = range.lowerBound + 1
            for index in range.dropFirst() where Self.isKeyLine(lines[index]) { insertAt = index + 1 }
            insertLines([assignment], at: insertAt)
            return
        }
        var insertAt = lines.count
        if let firstArray = lines.firstIndex(where: { Self.header(of: $0)?.isArray == true }) {
            insertAt = firstArray
            while insertAt > 0, lines[insertAt - 1].trimmingSpaces.hasPrefix("#") { insertAt -= 1 }
        }
        var block = ["[\(section)]", assignment]
        if insertAt > 0, !lines[insertAt - 1].trimmingSpaces.isEmpty { block.insert("", at: 0) }
        if insertAt < lines.count { block.append("") }
        insertLines(block, at: insertAt)
    }

    /// Removes the line of `key` in `[section]`, if there is one.
    public mutating func remove(_ key: String, in section: String) throws(Refusal) {
        guard let range = sectionRange(section), let index = keyLine(key, in: range) else { return }
        try checkSingleLine(lines[index], key: key, section: section)
        removeLine(at: index)
    }

    /// The value of `key` in `[section]` as written (a basic or literal string without escapes), or nil.
    public func stringValue(_ key: String, in section: String) -> String? {
        guard let range = sectionRange(section), let index = keyLine(key, in: range) else { return nil }
        let line = lines[index]
        guard let equals = line.firstIndex(of: "=") else { return nil }
        let value = line[line.index(after: equals)...].trimmingSpaces
        guard let quote = value.first, quote == "\"" || quote == "'" else { return nil }
        let rest = value.dropFirst()
        guard let end = rest.firstIndex(of: quote) else { return nil }
        return String(rest[..<end])
    }

    // MARK: Lines

    /// The lines of `[section]`: its header's index up to (not including) the next header.
    private func sectionRange(_ section: String) -> Range<Int>? {
        guard let start = lines.firstIndex(where: { Self.header(of: $0).map { !$0.isArray && $0.name == section } ?? false }) else { return nil }
        var end = start + 1
        while end < lines.count, Self.header(of: lines[end]) == nil { end += 1 }
        return start..<end
    }

    private func keyLine(_ key: String, in range: Range<Int>) -> Int? {
        range.dropFirst().first { index in
            let trimmed = lines[index].trimmingSpaces
            guard trimmed.hasPrefix(key) else { return false }
            return trimmed.dropFirst(key.count).trimmingSpaces.hasPrefix("=")
        }
    }

    private func checkSingleLine(_ line: String, key: String, section: String) throws(Refusal) {
        guard let equals = line.firstIndex(of: "=") else { return }
        let value = line[line.index(after: equals)...].trimmingSpaces
        if value.hasPrefix("\"\"\"") || value.hasPrefix("'''") || (value.hasPrefix("[") && !value.contains("]")) {
            throw Refusal(description: "[\(section)] \(key) spans several lines; make it one line (key = \"value\") and run the command again")
        }
    }

    private static func isKeyLine(_ line: String) -> Bool {
        let trimmed = line.trimmingSpaces
        return !trimmed.isEmpty && !trimmed.hasPrefix("#") && trimmed.contains("=")
    }

    /// `[name]` or `[[name]]` (a trailing comment allowed), or nil for any other line.
    static func header(of line: String) -> (name: String, isArray: Bool)? {
        var trimmed = line.trimmingSpaces
        if let hash = trimmed.firstIndex(of: "#") { trimmed = String(trimmed[..<hash]).trimmingSpaces }
        guard trimmed.hasPrefix("["), trimmed.hasSuffix("]") else { return nil }
        if trimmed.hasPrefix("[["), trimmed.hasSuffix("]]"), trimmed.count >= 4 {
            return (String(trimmed.dropFirst(2).dropLast(2)).trimmingSpaces, true)
        }
        return (String(trimmed.dropFirst().dropLast()).trimmingSpaces, false)
    }

    /// A `# comment` after the value of a `key = "value"` line, or nil. A `#` inside the quotes is not a comment.
    private static func trailingComment(of line: String) -> String? {
        guard let equals = line.firstIndex(of: "=") else { return nil }
        var quote: Character?
        var escaped = false
        for index in line[line.index(after: equals)...].indices {
            let character = line[index]
            if let open = quote {
                if escaped { escaped = false } else if character == "\\", open == "\"" { escaped = true } else if character == open { quote = nil }
            } else if character == "\"" || character == "'" {
                quote = character
            } else if character == "#" {
                return String(line[index...])
            }
        }
        return nil
    }
}
