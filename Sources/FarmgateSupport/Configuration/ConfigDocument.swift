#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// A configuration problem, located: `agent.toml:14: sensor "tank1.ph": interval: must be a duration like "10s" (got "ten")`.
public struct ConfigurationError: Error, CustomStringConvertible, Sendable, Equatable {
    public let file: String
    public let line: Int?
    /// Where in the document, e.g. `upload.url` or `sensor "tank1.ph".interval`.
    public let key: String?
    public let message: String

    /// The message, and the file's name, keep no credential's secret (``StringProtocol/redactingCredentials()``): a key
    /// written unquoted, or pasted as a path or an id, would otherwise be shown by the error.
    public init(file: String, line: Int?, key: String?, message: String) {
        self.file = file.redactingCredentials()
        self.line = line
        self.key = key
        self.message = message.redactingCredentials()
    }

    public var description: String {
        var text = file
        if let line { text += ":\(line)" }
        text += ": "
        if let key { text += "\(key): " }
        return text + message
    }
}

/// A value in a configuration document, as read from TOML.
public indirect enum ConfigValue: Sendable {
    case string(String)
    case integer(Int)
    case double(Double)
    case bool(Bool)
    case array([ConfigValue])
    case table(ConfigTable)
    /// A TOML date or time; no Farmgate key takes one.
    case other(String)

    var isNumber: Bool {
        switch self {
        case .integer, .double: true
        default: false
        }
    }

    /// How errors name the value's type: "a string", "an integer".
    public var typeName: String {
        switch self {
        case .string: "a string"
        case .integer: "an integer"
        case .double: "a number"
        case .bool: "a boolean"
        case .array: "an array"
        case .table: "a table"
        case .other(let name): name
        }
    }
}

/// A parsed TOML file that remembers the line of every key, so that every error can say where it is.
public enum ConfigDocument {
    /// Reads and parses `path`; `what` names the file in an error (a rules file is not the configuration).
    public static func load(path: String, what: String = "the configuration file") throws(ConfigurationError) -> ConfigTable {
        let text: String
        do {
            text = try FileSystem.text(path)
        } catch {
            throw ConfigurationError(
                file: path, line: nil, key: nil,
                message: "cannot read \(what) (\(error.reason)); check the path and its permissions")
        }
        return try parse(text, file: path)
    }

    /// Parses `text`; `file` is only used in error messages.
    public static func parse(_ text: String, file: String) throws(ConfigurationError) -> ConfigTable {
        let root: TOMLTableBuilder
        do {
            root = try TOMLParser.parse(text)
        } catch {
            throw ConfigurationError(
                file: file, line: error.line, key: error.key, message: "not valid TOML: \(error.message) (column \(error.column))")
        }
        let index = LineIndex(text: text)
        return ConfigTable(built: root, file: file, path: [], display: nil, index: index)
    }
}

/// Maps dotted key paths (`upload.url`, `sensor#2.interval`) to the line they are written on.
final class LineIndex: Sendable {
    let lines: [String: Int]

    init(text: String) {
        var lines: [String: Int] = [:]
        var current: [String] = []
        var arrayCounts: [String: Int] = [:]
        // "\r\n" is one Character in Swift, which a split at "\n" does not see: a CRLF file was one line, and its errors
        // lost their line numbers (or named line 1).
        for (offset, rawLine) in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r\n" }).enumerated() {
            let number = offset + 1
            let line = rawLine.trimmingWhitespace()
            if line.isEmpty || line.hasPrefix("#") { continue }
            if line.hasPrefix("[[") {
                let name = LineIndex.keyPath(String(line.dropFirst(2).prefix(while: { $0 != "]" })))
                let joined = name.joined(separator: ".")
                let n = arrayCounts[joined, default: 0]
                arrayCounts[joined] = n + 1
                current = Array(name.dropLast()) + ["\(name.last ?? "")#\(n)"]
                lines[current.joined(separator: "."), default: number] = number
            } else if line.hasPrefix("[") {
                current = LineIndex.keyPath(String(line.dropFirst().prefix(while: { $0 != "]" })))
                lines[current.joined(separator: "."), default: number] = number
            } else if let equals = LineIndex.unquotedEquals(in: line) {
                let key = LineIndex.keyPath(String(line[..<equals]))
                for depth in 1...max(1, key.count) {
                    let path = (current + key.prefix(depth)).joined(separator: ".")
                    lines[path, default: number] = number
                }
            }
        }
        self.lines = lines
    }

    func line(for path: [String]) -> Int? {
        var path = path
        while !path.isEmpty {
            if let line = lines[path.joined(separator: ".")] { return line }
            path.removeLast()
        }
        return nil
    }

    static func unquotedEquals(in line: String) -> String.Index? {
        var quote: Character?
        for index in line.indices {
            let c = line[index]
            if let q = quote {
                if c == q { quote = nil }
            } else if c == "\"" || c == "'" {
                quote = c
            } else if c == "=" {
                return index
            }
        }
        return nil
    }

    /// Splits `a."b.c".d` into `["a", "b.c", "d"]`.
    static func keyPath(_ text: String) -> [String] {
        var parts: [String] = []
        var current = ""
        var quote: Character?
        for c in text {
            if let q = quote {
                if c == q { quote = nil } else { current.append(c) }
            } else if c == "\"" || c == "'" {
                quote = c
            } else if c == "." {
                parts.append(current.trimmingWhitespace())
                current = ""
            } else {
                current.append(c)
            }
        }
        parts.append(current.trimmingWhitespace())
        return parts
    }
}

/// A table of a configuration document with typed, located accessors.
///
/// Every accessor throws a ``ConfigurationError`` naming the file, line and key when the value has the wrong type or
/// form; ``checkKeys(_:)`` rejects keys the program does not know, suggesting the closest known one.
public struct ConfigTable: Sendable {
    public let file: String
    /// The key path of this table in the document (array elements are `name#index`).
    public let path: [String]
    /// How errors name this table, e.g. `sensor "tank1.ph"`; nil for the dotted path.
    public let display: String?
    public let keys: [String]
    let values: [String: ConfigValue]
    let index: LineIndex

    init(built table: TOMLTableBuilder, file: String, path: [String], display: String?, index: LineIndex) {
        self.file = file
        self.path = path
        self.display = display
        self.index = index
        var values: [String: ConfigValue] = [:]
        for (key, entry) in table.entries {
            values[key] = ConfigTable.convert(entry, file: file, path: path + [key], index: index)
        }
        // In byte order, as toml++ (and so TOMLKit, which this parser replaced) lists them.
        self.keys = values.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
        self.values = values
    }

    private init(copying other: ConfigTable, display: String) {
        self.file = other.file
        self.path = other.path
        self.display = display
        self.keys = other.keys
        self.values = other.values
        self.index = other.index
    }

    private static func convert(_ entry: TOMLTableBuilder.Entry, file: String, path: [String], index: LineIndex) -> ConfigValue {
        switch entry {
        case .value(let value): return convert(value, file: file, path: path, index: index)
        case .table(let table): return .table(ConfigTable(built: table, file: file, path: path, display: nil, index: index))
        case .tables(let tables):
            return .array(tables.enumerated().map { offset, table in
                .table(ConfigTable(built: table, file: file, path: elementPath(path, offset), display: nil, index: index))
            })
        }
    }

    private static func convert(_ value: TOMLValue, file: String, path: [String], index: LineIndex) -> ConfigValue {
        switch value {
        case .string(let text): return .string(text)
        case .integer(let number): return .integer(number)
        case .double(let number): return .double(number)
        case .bool(let flag): return .bool(flag)
        case .dateTime(_, let kind): return .other(kind == "a local date-time" ? "a date-time" : kind)
        case .table(let table): return .table(ConfigTable(built: table, file: file, path: path, display: nil, index: index))
        case .array(let elements):
            return .array(elements.enumerated().map { offset, element in
                if case .table(let table) = element {
                    return .table(ConfigTable(built: table, file: file, path: elementPath(path, offset), display: nil, index: index))
                }
                return convert(element, file: file, path: path, index: index)
            })
        }
    }

    /// `sensors#2`: how the third element of the array `sensors` is named in key paths.
    private static func elementPath(_ path: [String], _ offset: Int) -> [String] {
        var path = path
        if !path.isEmpty { path[path.count - 1] += "#\(offset)" }
        return path
    }

    /// The same table, named `display` in errors.
    public func named(_ display: String) -> ConfigTable { ConfigTable(copying: self, display: display) }

    /// How errors name `key` in this table.
    public func keyName(_ key: String?) -> String {
        let base = display ?? path.map { $0.replacing("#", with: "[") + ($0.contains("#") ? "]" : "") }
            .joined(separator: ".")
        guard let key else { return base.isEmpty ? "(top level)" : base }
        if base.isEmpty { return key }
        return display != nil ? "\(base): \(key)" : "\(base).\(key)"
    }

    /// An error located at `key` (or at the table itself).
    public func error(_ key: String?, _ message: String) -> ConfigurationError {
        let line = index.line(for: key.map { path + [$0] } ?? path)
        return ConfigurationError(file: file, line: line, key: keyName(key), message: message)
    }

    /// Whether `key` is present.
    public func contains(_ key: String) -> Bool { values[key] != nil }

    /// The raw value of `key`, if present.
    public func value(_ key: String) -> ConfigValue? { values[key] }

    /// Fails on the first key not in `allowed`, suggesting the closest allowed one.
    public func checkKeys(_ allowed: Set<String>) throws(ConfigurationError) {
        for key in keys where !allowed.contains(key) {
            var message = "unknown key"
            if let suggestion = closest(to: key, in: allowed) {
                message += "; did you mean '\(suggestion)'?"
            } else {
                message += "."
            }
            message += " Allowed here: \(allowed.sorted().joined(separator: ", "))"
            throw error(key, message)
        }
    }

    public func string(_ key: String) throws(ConfigurationError) -> String? {
        guard let value = values[key] else { return nil }
        guard case .string(let text) = value else { throw error(key, "must be a string (got \(value.typeName))") }
        return text
    }

    public func requiredString(_ key: String) throws(ConfigurationError) -> String {
        guard let text = try string(key) else { throw error(key, "is required") }
        return text
    }

    public func int(_ key: String, in range: ClosedRange<Int>? = nil) throws(ConfigurationError) -> Int? {
        guard let value = values[key] else { return nil }
        guard case .integer(let number) = value else { throw error(key, "must be an integer (got \(value.typeName))") }
        if let range, !range.contains(number) {
            throw error(key, "must be between \(range.lowerBound) and \(range.upperBound) (got \(number))")
        }
        return number
    }

    public func double(_ key: String, in range: ClosedRange<Double>? = nil) throws(ConfigurationError) -> Double? {
        guard let value = values[key] else { return nil }
        let number: Double
        switch value {
        case .integer(let n): number = Double(n)
        case .double(let d): number = d
        default: throw error(key, "must be a number (got \(value.typeName))")
        }
        guard number.isFinite else { throw error(key, "must be a finite number") }
        if let range, !range.contains(number) {
            throw error(key, "must be between \(range.lowerBound) and \(range.upperBound) (got \(number))")
        }
        return number
    }

    public func bool(_ key: String) throws(ConfigurationError) -> Bool? {
        guard let value = values[key] else { return nil }
        guard case .bool(let flag) = value else { throw error(key, "must be true or false (got \(value.typeName))") }
        return flag
    }

    /// A duration written as `"250ms"`, `"10s"`, `"5m"`, `"2h"`, `"7d"`, or a number of seconds.
    ///
    /// A number too large for a duration (`1e300`, `inf`, `nan`, or more than ``maximumDurationMilliseconds``) is an
    /// error naming the allowed range, never a trap in a conversion to an integer.
    public func duration(_ key: String, in range: ClosedRange<Duration>? = nil) throws(ConfigurationError) -> Duration? {
        guard let value = values[key] else { return nil }
        let milliseconds: Double?
        switch value {
        case .integer(let seconds): milliseconds = Double(seconds) * 1000
        case .double(let seconds): milliseconds = seconds * 1000
        case .string(let text): milliseconds = ConfigTable.durationMilliseconds(text)
        default: milliseconds = nil
        }
        guard let milliseconds else {
            throw error(key, "must be a duration such as \"500ms\", \"10s\", \"5m\", \"1h\" or \"7d\" (got \(ConfigTable.show(value)))")
        }
        guard milliseconds.magnitude < ConfigTable.maximumDurationMilliseconds else {
            let got = value.isNumber ? "\(ConfigTable.show(value)) seconds" : ConfigTable.show(value)
            let allowed = range.map { "between \(ConfigTable.format($0.lowerBound)) and \(ConfigTable.format($0.upperBound))" }
                ?? "at most \(Int64(ConfigTable.maximumDurationMilliseconds / 1000)) seconds"
            throw error(key, "must be a duration \(allowed) (got \(got))")
        }
        let duration: Duration
        if case .integer(let seconds) = value {
            duration = .seconds(seconds)
        } else {
            duration = .milliseconds(Int64(milliseconds.rounded()))
        }
        if let range, !range.contains(duration) {
            // As written: "0d", not the 0s it comes to.
            let got = value.isNumber ? "\(ConfigTable.show(value)) seconds" : ConfigTable.show(value)
            throw error(key, "must be between \(ConfigTable.format(range.lowerBound)) and \(ConfigTable.format(range.upperBound)) (got \(got))")
        }
        return duration
    }

    /// A size written as `"512KiB"`, `"64MiB"`, `"2GiB"`, `"10MB"`, or a number of bytes.
    public func byteSize(_ key: String, in range: ClosedRange<Int64>? = nil) throws(ConfigurationError) -> Int64? {
        guard let value = values[key] else { return nil }
        let parsed: Int64?
        switch value {
        case .integer(let bytes): parsed = Int64(bytes)
        case .string(let text): parsed = ConfigTable.parseByteSize(text)
        default: parsed = nil
        }
        guard let bytes = parsed, bytes >= 0 else {
            if case .string(let text) = value, let bytes = ConfigTable.byteSizeBytes(text), bytes >= ConfigTable.maximumByteSize {
                let allowed = range.map { "between \($0.lowerBound) and \($0.upperBound) bytes" } ?? "below \(Int64(ConfigTable.maximumByteSize)) bytes"
                throw error(key, "must be a size \(allowed) (got \(ConfigTable.show(value)))")
            }
            throw error(key, "must be a size such as \"512KiB\", \"64MiB\" or \"2GiB\" (got \(ConfigTable.show(value)))")
        }
        if let range, !range.contains(bytes) {
            throw error(key, "must be between \(range.lowerBound) and \(range.upperBound) bytes (got \(bytes))")
        }
        return bytes
    }

    public func table(_ key: String) throws(ConfigurationError) -> ConfigTable? {
        guard let value = values[key] else { return nil }
        guard case .table(let table) = value else { throw error(key, "must be a table (got \(value.typeName))") }
        return table
    }

    /// The tables of an array of tables (`[[sensor]]`); empty when absent.
    public func tables(_ key: String) throws(ConfigurationError) -> [ConfigTable] {
        guard let value = values[key] else { return [] }
        guard case .array(let elements) = value else {
            throw error(key, "must be an array of tables, written [[\(key)]] (got \(value.typeName))")
        }
        var tables: [ConfigTable] = []
        for element in elements {
            guard case .table(let table) = element else {
                throw error(key, "must be an array of tables, written [[\(key)]] (an element is \(element.typeName))")
            }
            tables.append(table)
        }
        return tables
    }

    public func strings(_ key: String) throws(ConfigurationError) -> [String]? {
        guard let value = values[key] else { return nil }
        guard case .array(let elements) = value else { throw error(key, "must be an array of strings (got \(value.typeName))") }
        var strings: [String] = []
        for element in elements {
            guard case .string(let text) = element else {
                throw error(key, "must be an array of strings (an element is \(element.typeName))")
            }
            strings.append(text)
        }
        return strings
    }

    /// The value of `key` as one of `choices` (a string), or nil when absent.
    public func choice<T>(_ key: String, _ choices: [String: T]) throws(ConfigurationError) -> T? {
        guard let text = try string(key) else { return nil }
        guard let choice = choices[text.lowercased()] else {
            throw error(key, "must be one of \(choices.keys.sorted().map { "\"\($0)\"" }.joined(separator: ", ")) (got \"\(text)\")")
        }
        return choice
    }

    // MARK: Parsing helpers

    /// The longest duration a key may give, whatever its own range (31,700 years): every duration below it converts
    /// to whole milliseconds or microseconds in an Int64, so that neither parsing nor an error message can overflow.
    public static let maximumDurationMilliseconds: Double = 1e15

    /// A duration string (`"500ms"`, `"10s"`, `"1.5h"`), or nil when it is not one. One that is not below
    /// ``maximumDurationMilliseconds`` is that longest duration less a millisecond: still a duration, so that the
    /// caller's range check says it is too long rather than "not a duration" (`--ttl 99999999999d`).
    public static func parseDuration(_ text: String) -> Duration? {
        guard let milliseconds = durationMilliseconds(text) else { return nil }
        return .milliseconds(Int64(min(milliseconds, maximumDurationMilliseconds - 1).rounded()))
    }

    /// The milliseconds a duration string means, however many (nil when it is not a duration).
    static func durationMilliseconds(_ text: String) -> Double? {
        let trimmed = text.trimmingWhitespace().lowercased()
        let digits = trimmed.prefix(while: { $0.isNumber || $0 == "." })
        let unit = trimmed.dropFirst(digits.count).trimmingWhitespace()
        guard !digits.isEmpty, let number = Double(digits), number.isFinite, number >= 0 else { return nil }
        let millisecondsPerUnit: Double
        switch unit {
        case "ms": millisecondsPerUnit = 1
        case "s", "sec", "secs", "second", "seconds": millisecondsPerUnit = 1000
        case "m", "min", "mins", "minute", "minutes": millisecondsPerUnit = 60_000
        case "h", "hour", "hours": millisecondsPerUnit = 3_600_000
        case "d", "day", "days": millisecondsPerUnit = 86_400_000
        default: return nil
        }
        let milliseconds = number * millisecondsPerUnit
        return milliseconds.isFinite ? milliseconds : nil
    }

    /// The largest size a key may give, whatever its own range: sizes below it are exact in an Int64.
    public static let maximumByteSize: Double = 9e18

    /// A size string (`"512KiB"`, `"64MiB"`, `"2GiB"`), or nil when it is not one or is not below ``maximumByteSize``.
    public static func parseByteSize(_ text: String) -> Int64? {
        guard let bytes = byteSizeBytes(text), bytes < maximumByteSize else { return nil }
        return Int64(bytes.rounded())
    }

    /// The bytes a size string means, however many (nil when it is not a size).
    static func byteSizeBytes(_ text: String) -> Double? {
        let trimmed = text.trimmingWhitespace()
        let digits = trimmed.prefix(while: { $0.isNumber || $0 == "." })
        let unit = trimmed.dropFirst(digits.count).trimmingWhitespace().lowercased()
        guard !digits.isEmpty, let number = Double(digits), number.isFinite, number >= 0 else { return nil }
        let multiplier: Double
        switch unit {
        case "", "b": multiplier = 1
        case "kb": multiplier = 1e3
        case "mb": multiplier = 1e6
        case "gb": multiplier = 1e9
        case "kib", "k": multiplier = 1024
        case "mib", "m": multiplier = 1_048_576
        case "gib", "g": multiplier = 1_073_741_824
        default: return nil
        }
        let bytes = number * multiplier
        return bytes.isFinite ? bytes : nil
    }

    public static func format(_ duration: Duration) -> String {
        let ms = duration.wholeMilliseconds
        if ms % 86_400_000 == 0, ms > 0 { return "\(ms / 86_400_000)d" }
        if ms % 3_600_000 == 0, ms > 0 { return "\(ms / 3_600_000)h" }
        if ms % 60_000 == 0, ms > 0 { return "\(ms / 60_000)m" }
        if ms % 1000 == 0 { return "\(ms / 1000)s" }
        return "\(ms)ms"
    }

    static func show(_ value: ConfigValue) -> String {
        switch value {
        case .string(let text): "\"\(text)\""
        case .integer(let n): "\(n)"
        case .double(let d): "\(d)"
        case .bool(let b): "\(b)"
        default: value.typeName
        }
    }
}

/// The allowed word closest to `word` by edit distance, if it is close enough to be a likely typo.
func closest(to word: String, in allowed: Set<String>) -> String? {
    func distance(_ a: [Character], _ b: [Character]) -> Int {
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var previous = Array(0...b.count)
        for i in 1...a.count {
            var current = [i] + Array(repeating: 0, count: b.count)
            for j in 1...b.count {
                let substitution: Int = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)
                let deletion: Int = previous[j] + 1
                let insertion: Int = current[j - 1] + 1
                current[j] = min(substitution, deletion, insertion)
            }
            previous = current
        }
        return previous[b.count]
    }
    let target = Array(word.lowercased())
    var best: (word: String, distance: Int)?
    for candidate in allowed.sorted() {
        let d = distance(target, Array(candidate.lowercased()))
        if best == nil || d < best?.distance ?? Int.max { best = (candidate, d) }
    }
    guard let best, best.distance <= max(2, target.count / 3) else { return nil }
    return best.word
}
