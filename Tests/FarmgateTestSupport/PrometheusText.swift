/// A strict reader of the Prometheus text exposition format (version 0.0.4), to check what the programs write: every line
/// a comment, a `# HELP`/`# TYPE` line or a sample; names and labels well-formed; a metric's `# TYPE` before its samples
/// and at most once; no series twice; the text ends with a newline (a cut-off file fails).
public enum PrometheusText {
    public struct Sample: Sendable, Equatable {
        public var name: String
        public var labels: [String: String]
        public var value: Double
    }

    public struct ParseError: Error, CustomStringConvertible {
        public let line: Int
        public let message: String
        public var description: String { "line \(line): \(message)" }
    }

    public static func parse(_ text: String) throws(ParseError) -> [Sample] {
        guard !text.isEmpty else { throw ParseError(line: 0, message: "empty text") }
        guard text.hasSuffix("\n") else { throw ParseError(line: 0, message: "does not end with a newline (cut off?)") }
        var samples: [Sample] = []
        var types: [String: String] = [:]
        var seenSamples = Set<String>()
        var series = Set<String>()
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().enumerated() {
            let number = index + 1
            let line = String(raw)
            if line.isEmpty { continue }
            if line.hasPrefix("#") {
                let parts = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: false).map(String.init)
                guard parts.count >= 3, parts[0] == "#", ["HELP", "TYPE"].contains(parts[1]) else { continue }
                guard isMetricName(parts[2]) else { throw ParseError(line: number, message: "bad metric name \(parts[2])") }
                if parts[1] == "TYPE" {
                    guard parts.count == 4, ["counter", "gauge", "histogram", "summary", "untyped"].contains(parts[3]) else {
                        throw ParseError(line: number, message: "bad TYPE line")
                    }
                    guard types[parts[2]] == nil else { throw ParseError(line: number, message: "second TYPE for \(parts[2])") }
                    guard !seenSamples.contains(parts[2]) else { throw ParseError(line: number, message: "TYPE after samples of \(parts[2])") }
                    types[parts[2]] = parts[3]
                }
                continue
            }
            let sample = try parseSample(line, number)
            seenSamples.insert(sample.name)
            let key = sample.name + "{" + sample.labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",") + "}"
            guard series.insert(key).inserted else { throw ParseError(line: number, message: "series \(key) appears twice") }
            samples.append(sample)
        }
        return samples
    }

    static func isMetricName(_ name: String) -> Bool {
        guard let first = name.unicodeScalars.first, !("0"..."9").contains(first) else { return false }
        return name.unicodeScalars.allSatisfy { ("a"..."z").contains($0) || ("A"..."Z").contains($0) || ("0"..."9").contains($0) || $0 == "_" || $0 == ":" }
    }

    static func parseSample(_ line: String, _ number: Int) throws(ParseError) -> Sample {
        var chars = Array(line.unicodeScalars)[...]
        var name = ""
        while let c = chars.first, c != "{", c != " " {
            name.unicodeScalars.append(c)
            chars = chars.dropFirst()
        }
        guard isMetricName(name) else { throw ParseError(line: number, message: "bad metric name \(name)") }
        var labels: [String: String] = [:]
        if chars.first == "{" {
            chars = chars.dropFirst()
            while chars.first != "}" {
                var label = ""
                while let c = chars.first, c != "=" {
                    label.unicodeScalars.append(c)
                    chars = chars.dropFirst()
                }
                guard !label.isEmpty, !label.hasPrefix("__"), isMetricName(label), !label.contains(":") else {
                    throw ParseError(line: number, message: "bad label name \(label)")
                }
                chars = chars.dropFirst()
                guard chars.first == "\"" else { throw ParseError(line: number, message: "label value not quoted") }
                chars = chars.dropFirst()
                var value = ""
                while true {
                    guard let c = chars.first else { throw ParseError(line: number, message: "unterminated label value") }
                    chars = chars.dropFirst()
                    if c == "\"" { break }
                    if c == "\\" {
                        guard let escaped = chars.first, ["\\", "\"", "n"].contains(escaped) else {
                            throw ParseError(line: number, message: "bad escape in label value")
                        }
                        chars = chars.dropFirst()
                        value += escaped == "n" ? "\n" : String(escaped)
                    } else {
                        value.unicodeScalars.append(c)
                    }
                }
                guard labels.updateValue(value, forKey: label) == nil else { throw ParseError(line: number, message: "label \(label) twice") }
                if chars.first == "," { chars = chars.dropFirst() } else if chars.first != "}" {
                    throw ParseError(line: number, message: "expected , or } after a label")
                }
            }
            chars = chars.dropFirst()
        }
        guard chars.first == " " else { throw ParseError(line: number, message: "no space before the value") }
        let fields = String(String.UnicodeScalarView(chars.dropFirst())).split(separator: " ")
        guard (1...2).contains(fields.count) else { throw ParseError(line: number, message: "expected a value and an optional timestamp") }
        let valueText = String(fields[0])
        let value: Double
        switch valueText {
        case "+Inf": value = .infinity
        case "-Inf": value = -.infinity
        case "NaN": value = .nan
        default:
            guard let parsed = Double(valueText), valueText.lowercased() != "inf", valueText.lowercased() != "nan" else {
                throw ParseError(line: number, message: "bad value \(valueText)")
            }
            value = parsed
        }
        if fields.count == 2, Int64(fields[1]) == nil { throw ParseError(line: number, message: "bad timestamp \(fields[1])") }
        return Sample(name: name, labels: labels, value: value)
    }
}
