import FarmgateSupport
import FarmgateWire

/// `farmgate sensor add` and `sensor remove`: one `[[sensor]]` table added to or removed from the configuration's text,
/// the rest of the file (comments, order, spacing) left as it was, and the result checked as the agent would load it,
/// so that a file these write always loads.
public enum SensorTables {
    /// Why the edit was refused; nothing was written. `exitCode` 64 for what the command line said, 78 for the file.
    public struct Refusal: Error, Sendable, CustomStringConvertible {
        public let description: String
        public let exitCode: Int32
    }

    /// The edited text, the configuration it loads as, the lines added or removed, and what the edit changed for other
    /// sensors that the installer should know (an EZO circuit's outputs losing the temperature compensation the
    /// removed output named).
    public struct Edit: Sendable {
        public let text: String
        public let configuration: AgentConfiguration
        public let table: String
        public var notes: [String] = []
    }

    /// `text` with a `[[sensor]]` table for `id` appended, its keys from `settings` (`key=value` as given on the
    /// command line, see ``tomlValue(_:)``).
    public static func adding(id: String, settings: [String], to text: String, file: String) throws(Refusal) -> Edit {
        // A file without sensors yet (a new site's) does not load either: the first sensor is what it lacks.
        let document: ConfigTable
        do { document = try ConfigDocument.parse(text, file: file) } catch { throw fixFirst(error) }
        let hasSensors = (try? document.tables("sensor").isEmpty == false) ?? true
        let existing: [String]
        do { existing = hasSensors ? try AgentConfiguration.parse(document).sensors.map(\.id.rawValue) : [] } catch { throw fixFirst(error) }
        do { _ = try SensorID(id) } catch { throw Refusal(description: "\(error)", exitCode: 64) }
        if existing.contains(id) {
            throw Refusal(
                description: "\(file) already has a sensor \"\(id)\"; choose another id, or `farmgate sensor remove \(id)` first", exitCode: 64)
        }
        var lines = ["[[sensor]]", "id = \(ConfigFileEditor.Value.string(id).source)"]
        var keys = Set<String>()
        for setting in settings {
            guard let equals = setting.firstIndex(of: "="), equals != setting.startIndex else {
                throw Refusal(description: "'\(setting)' is not key=value (such as driver=ezo or port=/dev/ttyUSB0)", exitCode: 64)
            }
            let key = String(setting[..<equals])
            let value = String(setting[setting.index(after: equals)...])
            // A bare key as TOML reads one (not dotted, not quoted): what the parser takes as this very key.
            guard (try? ConfigDocument.parse("\(key) = 0\n", file: "argument"))?.contains(key) == true else {
                throw Refusal(description: "'\(key)' is not a key of a [[sensor]] table (letters, digits, _ and -)", exitCode: 64)
            }
            guard key != "id" else { throw Refusal(description: "the id is the first argument; remove id=\(value)", exitCode: 64) }
            guard keys.insert(key).inserted else { throw Refusal(description: "\(key) is given twice; give it once", exitCode: 64) }
            lines.append("\(key) = \(tomlValue(value))")
        }
        let table = lines.joined(separator: "\n") + "\n"
        var editor = ConfigFileEditor(text: text)
        editor.append(lines)
        let edited = editor.text
        let configuration: AgentConfiguration
        do {
            configuration = try AgentConfiguration.parse(ConfigDocument.parse(edited, file: file))
        } catch {
            // Located in a file that was not written: said as the new sensor's problem, with its key (the file loaded
            // without it: a sensor past the limit is the addition's problem too); a problem elsewhere in a file that
            // had no sensor to load with is the file's.
            guard hasSensors || error.key?.hasPrefix("sensor \"\(id)\"") != false else { throw fixFirst(error) }
            // The file parsed and the table appended is valid TOML on its own: a syntax error now is the file's way of
            // writing `sensor` (an inline array `sensor = [{ … }]`, a `[sensor]` table), which a [[sensor]] cannot extend.
            if error.message.hasPrefix("not valid TOML") {
                throw Refusal(
                    description: "\(file) writes its sensors in a form a [[sensor]] table cannot be added to (\(error.line.map { "line \($0): " } ?? "")\(error.message)); write each sensor as its own [[sensor]] table, or add this one by hand; nothing was written",
                    exitCode: 78)
            }
            throw Refusal(description: "\(error.key ?? "sensor \"\(id)\""): \(error.message); nothing was written", exitCode: 64)
        }
        // The lines as the chips (or events files) name them, as `config check`, a reload and the agent's start check
        // them (a tester, 2026-12-07: `line=GPIO17` beside a sensor on 17 was written, then refused by all three). The
        // new sensor is the last, so a line it shares is named on it; a clash between sensors already there is the file's.
        do {
            _ = try GPIODriver.checkLinesOnChips(configuration.sensors)
        } catch {
            guard error.key?.hasPrefix("sensor \"\(id)\"") == true else { throw fixFirst(error) }
            throw Refusal(description: "\(error.key ?? "sensor \"\(id)\""): \(error.message); nothing was written", exitCode: 64)
        }
        return Edit(text: edited, configuration: configuration, table: table)
    }

    /// `text` without the `[[sensor]]` table of `id` (and the tables under it, such as `[[sensor.alarm]]`).
    public static func removing(id: String, from text: String, file: String) throws(Refusal) -> Edit {
        let existing = try loadCurrent(text, file: file)
        guard existing.sensors.contains(where: { $0.id.rawValue == id }) else {
            let known = existing.sensors.map(\.id.rawValue)
            throw Refusal(
                description: "\(file) has no sensor \"\(id)\"" + (known.isEmpty ? "" : "; it has \(known.joined(separator: ", "))"), exitCode: 64)
        }
        var editor = ConfigFileEditor(text: text)  // CRLF endings are kept line by line
        let lines = editor.allLines
        // Each [[sensor]] table runs from its header to the next header that is not one of its own sub-tables.
        let headers = lines.indices.compactMap { index in ConfigFileEditor.header(of: lines[index]).map { (index, $0) } }
        var found: Range<Int>?
        for (position, (start, table)) in headers.enumerated() where table.isArray && table.name == "sensor" {
            var end = lines.count
            for (next, other) in headers[(position + 1)...] where !other.name.hasPrefix("sensor.") {
                end = next
                break
            }
            // Blank lines and comments just before the next header are that table's, and stay.
            while end > start + 1, lines[end - 1].trimmingWhitespace().isEmpty || lines[end - 1].trimmingWhitespace().hasPrefix("#") {
                end -= 1
            }
            let block = lines[start..<end].joined(separator: "\n")
            if let table = try? ConfigDocument.parse(block, file: file).tables("sensor").first, (try? table.string("id")) == id {
                found = start..<end
                break
            }
        }
        guard var range = found else {
            throw Refusal(description: "the [[sensor]] table of \"\(id)\" is not written as one table this command can remove; edit \(file) by hand", exitCode: 78)
        }
        // Comment lines right above its header (no blank line between) are its own, and go with it; so does the blank
        // line that separated it from what came before.
        while range.lowerBound > 0, isProse(lines[range.lowerBound - 1]) {
            range = (range.lowerBound - 1)..<range.upperBound
        }
        if range.lowerBound > 0, lines[range.lowerBound - 1].trimmingWhitespace().isEmpty {
            range = (range.lowerBound - 1)..<range.upperBound
        }
        let removed = lines[range].joined(separator: "\n")
        editor.removeLines(range)
        let edited = editor.text
        do {
            let configuration = try AgentConfiguration.parse(ConfigDocument.parse(edited, file: file))
            // The outputs of one EZO circuit share the temperature_sensor one of them names.
            let notes = configuration.sensors.compactMap { sensor -> String? in
                guard let before = EZODriver.compensationSource(of: sensor, among: existing.sensors),
                    EZODriver.compensationSource(of: sensor, among: configuration.sensors) == nil
                else { return nil }
                return "sensor \"\(sensor.id)\" is no longer temperature-compensated: its circuit's compensation (temperature_sensor = \"\(before)\") was on \"\(id)\"; add temperature_sensor to one of its outputs"
            }
            return Edit(text: edited, configuration: configuration, table: removed, notes: notes)
        } catch {
            throw Refusal(description: "without sensor \"\(id)\" the configuration would not load: \(error.key.map { "\($0): " } ?? "")\(error.message); nothing was written", exitCode: 64)
        }
    }

    /// A value given on the command line as TOML: a number, boolean or array, or a quoted string, as written
    /// (`slave=1`, `scale=0.01`, `active_low=true`, `name="x"`); anything else a string (`port=/dev/ttyUSB0`,
    /// `interval=10s`, `quantity=ph`).
    static func tomlValue(_ text: String) -> String {
        // A line break or another control character ends the value in TOML and could start keys or tables of its own
        // (`1\n[metrics]…`): such a value is only ever a string.
        // A # outside quotes would start a comment, and the value written would be only what stands before it
        // (`base=1#comment` is the number 1): such a value is a string too.
        if !text.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }), !hasCommentMark(text),
            let parsed = try? ConfigDocument.parse("v = \(text)\n", file: "argument"), let value = parsed.value("v")
        {
            switch value {
            case .string, .integer, .double, .bool, .array, .table: return text
            case .other: break
            }
        }
        return ConfigFileEditor.Value.string(text).source
    }

    /// Whether `text` holds a `#` outside a quoted string (`"…"` with backslash escapes, or `'…'`).
    static func hasCommentMark(_ text: String) -> Bool {
        var quote: Unicode.Scalar?
        var escaped = false
        for scalar in text.unicodeScalars {
            if let open = quote {
                if escaped { escaped = false } else if open == "\"", scalar == "\\" { escaped = true } else if scalar == open { quote = nil }
            } else if scalar == "\"" || scalar == "'" {
                quote = scalar
            } else if scalar == "#" {
                return true
            }
        }
        return false
    }

    private static func loadCurrent(_ text: String, file: String) throws(Refusal) -> AgentConfiguration {
        do {
            return try AgentConfiguration.parse(ConfigDocument.parse(text, file: file))
        } catch {
            throw fixFirst(error)
        }
    }

    private static func fixFirst(_ error: ConfigurationError) -> Refusal {
        Refusal(description: "\(error)\nfix the file first (farmgate config check): the sensor commands edit it and must be able to load it", exitCode: 78)
    }

    /// A comment line of words (`# pH probe, tank 1`), not a commented-out header or key (`# [[sensor]]`, `# id = "x"`).
    private static func isProse(_ line: String) -> Bool {
        let trimmed = line.trimmingWhitespace()
        guard trimmed.hasPrefix("#") else { return false }
        let text = trimmed.dropFirst().trimmingWhitespace()
        return !text.hasPrefix("[") && !text.contains("=")
    }
}
