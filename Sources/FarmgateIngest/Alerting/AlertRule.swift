public import FarmgateWire
import FarmgateSupport
import Foundation

/// One alert rule of a farm: what to watch (a kind and its parameters), which sensors (globs on device and sensor ids,
/// a quantity), and what to say (severity, labels, a summary template, the receivers to notify).
///
/// Rules come from `farmgate-ingest alert rule add|load`, or from the API with an admin token. Either way they go
/// through ``AlertRuleSpec/validated()``, which names the field at fault, and are stored as the JSON of this type.
public struct AlertRule: Codable, Sendable, Hashable {
    /// What a rule watches.
    public enum Kind: String, Codable, Sendable, CaseIterable {
        /// The value above `threshold`; clears below `clear` (default: the threshold).
        case above
        /// The value below `threshold`; clears above `clear` (default: the threshold).
        case below
        /// The value moved by at least `threshold` (either way) within `window`.
        case rateOfChange = "rate_of_change"
        /// A sensor sent no reading for `after`.
        case noData = "no_data"
        /// A device sent no reading of any sensor for `after`.
        case deviceOffline = "device_offline"
        /// `count` consecutive readings flagged `sensor_fault`.
        case sensorFault = "sensor_fault"
        /// The value outside `min`…`max`, or flagged `out_of_range` by the site when neither is given.
        case outOfRange = "out_of_range"
        /// No calibration event for `after` (a sensor never calibrated counts from when the ingest first saw it).
        case calibrationOverdue = "calibration_overdue"

        /// Whether readings drive it (the others are judged on the engine's timer against the wall clock).
        public var isReadingDriven: Bool {
            switch self {
            case .above, .below, .rateOfChange, .sensorFault, .outOfRange: true
            case .noData, .deviceOffline, .calibrationOverdue: false
            }
        }
    }

    /// Severities a rule may carry.
    public static let severities = ["critical", "warning", "info"]

    public var name: String
    public var kind: Kind
    /// Glob on device ids (`*` any run, `?` one character).
    public var device: String
    /// Glob on sensor ids.
    public var sensor: String
    public var quantity: Quantity?
    public var threshold: Double?
    public var clear: Double?
    /// Microseconds the condition must hold before the alert fires (pending meanwhile).
    public var forMicroseconds: Int64
    /// `rate_of_change`: the window, in microseconds.
    public var windowMicroseconds: Int64?
    /// `no_data`, `device_offline`, `calibration_overdue`: how long, in microseconds.
    public var afterMicroseconds: Int64?
    /// `sensor_fault`: consecutive flagged readings.
    public var count: Int?
    public var min: Double?
    public var max: Double?
    public var severity: String
    public var labels: [String: String]
    /// `{{device}} {{sensor}} {{value}} {{threshold}} {{rule}} {{severity}} {{quantity}} {{unit}}`; nil: a default per kind.
    public var summary: String?
    /// Receiver names of the farm (`alert receiver add`).
    public var receivers: [String]

    enum CodingKeys: String, CodingKey {
        case name, kind, device, sensor, quantity, threshold, clear, count, min, max, severity, labels, summary, receivers
        case forMicroseconds = "for_us"
        case windowMicroseconds = "window_us"
        case afterMicroseconds = "after_us"
    }

    /// Whether the rule watches `sensor` (of `quantity`) on `device`.
    public func matches(device: String, sensor: String, quantity: Quantity) -> Bool {
        if let wanted = self.quantity, wanted != quantity { return false }
        return Glob.matches(self.device, device) && Glob.matches(self.sensor, sensor)
    }

    /// The summary for one alert: the template with its placeholders filled.
    public func renderSummary(device: String?, sensor: String?, value: Double?, quantity: Quantity?) -> String {
        let template = summary ?? defaultSummary
        let thresholdText = threshold.map(formatValue) ?? (afterMicroseconds.map { ConfigTable.format(.microseconds($0)) } ?? "")
        let fields: [String: String] = [
            "device": device ?? "", "sensor": sensor ?? "", "value": value.map(formatValue) ?? "", "threshold": thresholdText,
            "clear": (clear ?? threshold).map(formatValue) ?? "", "rule": name, "severity": severity,
            "quantity": quantity?.rawValue ?? self.quantity?.rawValue ?? "", "unit": (quantity ?? self.quantity)?.unit ?? "",
            "min": min.map(formatValue) ?? "", "max": max.map(formatValue) ?? "", "count": count.map(String.init) ?? "",
        ]
        var text = ""
        Self.walkTemplate(template, literal: { text += $0 }, field: { text += fields[$0] ?? "{{\($0)}}" })
        return text
    }

    /// The names a summary template may put in `{{...}}`.
    public static let summaryFields: [String] = [
        "device", "sensor", "value", "threshold", "clear", "rule", "severity", "quantity", "unit", "min", "max", "count",
    ]

    /// Splits a template into its literal text and its `{{name}}` fields (the name trimmed of blanks); a `{{` never
    /// closed is literal text.
    static func walkTemplate(_ template: String, literal: (Substring) -> Void, field: (String) -> Void) {
        var rest = Substring(template)
        while let open = rest.range(of: "{{") {
            literal(rest[..<open.lowerBound])
            guard let close = rest[open.upperBound...].range(of: "}}") else {
                literal(rest[open.lowerBound...])
                return
            }
            field(rest[open.upperBound..<close.lowerBound].trimmingCharacters(in: .whitespaces))
            rest = rest[close.upperBound...]
        }
        literal(rest)
    }

    /// What the condition is, for people: "below 5.5", "silent for 15m".
    public var conditionText: String {
        let t = threshold.map(formatValue) ?? "?"
        switch kind {
        case .above: return "above \(t)"
        case .below: return "below \(t)"
        case .rateOfChange: return "changing by \(t) within \(ConfigTable.format(.microseconds(windowMicroseconds ?? 0)))"
        case .noData: return "silent for \(ConfigTable.format(.microseconds(afterMicroseconds ?? 0)))"
        case .deviceOffline: return "offline for \(ConfigTable.format(.microseconds(afterMicroseconds ?? 0)))"
        case .sensorFault: return "faulty (\(count ?? 1) readings in a row)"
        case .outOfRange:
            if min == nil, max == nil { return "flagged out of range" }
            return "outside \(min.map(formatValue) ?? "-∞")…\(max.map(formatValue) ?? "∞")"
        case .calibrationOverdue: return "not calibrated for \(ConfigTable.format(.microseconds(afterMicroseconds ?? 0)))"
        }
    }

    private var defaultSummary: String {
        switch kind {
        case .deviceOffline: "{{device}} is \(conditionText)"
        case .noData, .calibrationOverdue, .sensorFault: "{{device}} {{sensor}} is \(conditionText)"
        default: "{{device}} {{sensor}} is \(conditionText) ({{value}})"
        }
    }
}

/// A rule as written, before validation: every field optional and loosely typed (durations as text), as it comes from
/// a TOML table or a JSON body. ``validated()`` turns it into an ``AlertRule`` or names the field at fault.
public struct AlertRuleSpec: Codable, Sendable, Hashable {
    public var name: String?
    public var kind: String?
    public var device: String?
    public var sensor: String?
    public var quantity: String?
    public var threshold: Double?
    public var clear: Double?
    public var `for`: String?
    public var window: String?
    public var after: String?
    public var count: Int?
    public var min: Double?
    public var max: Double?
    public var severity: String?
    public var labels: [String: String]?
    public var summary: String?
    public var receivers: [String]?

    public init() {}

    /// A character a device or sensor glob may hold: an id's (`A-Z a-z 0-9 . _ -`) or a wildcard (`*`, `?`).
    static func isGlobScalar(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar {
        case "a"..."z", "A"..."Z", "0"..."9", ".", "_", "-", "*", "?": return true
        default: return false
        }
    }

    /// The keys a rule may have (TOML and JSON alike).
    public static let keys: Set<String> = [
        "name", "kind", "device", "sensor", "quantity", "threshold", "clear", "for", "window", "after", "count", "min", "max", "severity",
        "labels", "summary", "receivers",
    ]

    /// The rule, or an error naming the field and what to write instead.
    public func validated() throws(AlertRuleError) -> AlertRule {
        guard let name, !name.isEmpty else { throw AlertRuleError(field: "name", message: "is required: 1 to 64 characters of A-Z a-z 0-9 . _ -") }
        guard (try? DeviceID(name)) != nil else {
            throw AlertRuleError(field: "name", message: "'\(name.prefix(80))' must be 1 to 64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit")
        }
        guard let kindText = kind else {
            throw AlertRuleError(field: "kind", message: "is required: one of \(AlertRule.Kind.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard let kind = AlertRule.Kind(rawValue: kindText) else {
            throw AlertRuleError(field: "kind", message: "'\(kindText.prefix(40))' is not a rule kind; use one of \(AlertRule.Kind.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        for (field, glob) in [("device", device), ("sensor", sensor)] {
            if let glob, glob.isEmpty || glob.count > 128 || glob.contains(where: { $0.isWhitespace }) {
                throw AlertRuleError(field: field, message: "must be a glob of 1 to 128 characters without spaces, such as \"tank*.ph\" or \"*\"")
            }
            if let problem = glob?.controlCharacterProblem() { throw AlertRuleError(field: field, message: problem) }
            // Ids are A-Z a-z 0-9 . _ -: a glob with any other character selects nothing, forever.
            if let glob, let bad = glob.unicodeScalars.first(where: { !Self.isGlobScalar($0) }) {
                throw AlertRuleError(
                    field: field,
                    message: "'\(glob.prefix(80))' contains '\(bad.escaped(asASCII: true))', which no \(field) id has: a glob is A-Z a-z 0-9 . _ - with * (any run) and ? (one character), such as \"tank*.ph\"")
            }
        }
        var quantity: Quantity?
        if let text = self.quantity {
            guard let parsed = Quantity(rawValue: text) else {
                throw AlertRuleError(field: "quantity", message: "'\(text.prefix(40))' is not a quantity; use one of \(Quantity.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            quantity = parsed
        }
        func duration(_ field: String, _ text: String?, required: Bool) throws(AlertRuleError) -> Int64? {
            guard let text else {
                if required { throw AlertRuleError(field: field, message: "is required for kind \(kind.rawValue): a duration such as \"15m\", \"2h\" or \"30d\"") }
                return nil
            }
            guard let parsed = ConfigTable.parseDuration(text) else {
                throw AlertRuleError(field: field, message: "'\(text.prefix(40))' is not a duration; write it like \"30s\", \"15m\", \"2h\" or \"30d\"")
            }
            let micro = parsed.wholeMicroseconds
            guard micro <= 366 * 86_400_000_000 else { throw AlertRuleError(field: field, message: "must be at most 366 days") }
            return micro
        }
        func unused(_ field: String, _ present: Bool) throws(AlertRuleError) {
            if present { throw AlertRuleError(field: field, message: "does not apply to kind \(kind.rawValue); remove it") }
        }
        for (field, value) in [("threshold", threshold), ("clear", clear), ("min", min), ("max", max)] {
            if let value, !value.isFinite { throw AlertRuleError(field: field, message: "must be a finite number") }
        }
        let forMicro = try duration("for", self.for, required: false) ?? 0
        var window: Int64?
        var after: Int64?
        var count: Int?
        switch kind {
        case .above, .below:
            guard let threshold else { throw AlertRuleError(field: "threshold", message: "is required for kind \(kind.rawValue): the level, e.g. 6.5") }
            if let clear {
                if kind == .above, clear > threshold {
                    throw AlertRuleError(field: "clear", message: "must be at or below threshold \(formatValue(threshold)) for kind above (it is where the alert clears)")
                }
                if kind == .below, clear < threshold {
                    throw AlertRuleError(field: "clear", message: "must be at or above threshold \(formatValue(threshold)) for kind below (it is where the alert clears)")
                }
            }
            try unused("window", self.window != nil); try unused("after", self.after != nil); try unused("count", self.count != nil)
            try unused("min", min != nil); try unused("max", max != nil)
        case .rateOfChange:
            guard let threshold else {
                throw AlertRuleError(field: "threshold", message: "is required for kind rate_of_change: the change (either way) that alerts, a positive number")
            }
            guard threshold > 0 else {
                throw AlertRuleError(
                    field: "threshold", message: "must be a positive number for kind rate_of_change (got \(threshold)): a change either way alerts, so give its size")
            }
            window = try duration("window", self.window, required: true)
            if window == 0 { throw AlertRuleError(field: "window", message: "must be longer than 0s") }
            try unused("clear", clear != nil); try unused("after", self.after != nil); try unused("count", self.count != nil)
            try unused("min", min != nil); try unused("max", max != nil)
        case .noData, .deviceOffline, .calibrationOverdue:
            after = try duration("after", self.after, required: true)
            if after == 0 { throw AlertRuleError(field: "after", message: "must be longer than 0s") }
            try unused("threshold", threshold != nil); try unused("clear", clear != nil); try unused("window", self.window != nil)
            try unused("count", self.count != nil); try unused("min", min != nil); try unused("max", max != nil)
            try unused("for", self.for != nil)
            if kind == .deviceOffline { try unused("sensor", sensor != nil); try unused("quantity", quantity != nil) }
        case .sensorFault:
            count = self.count ?? 3
            guard let count, (1...10_000).contains(count) else { throw AlertRuleError(field: "count", message: "must be a whole number from 1 to 10000") }
            try unused("threshold", threshold != nil); try unused("clear", clear != nil); try unused("window", self.window != nil)
            try unused("after", self.after != nil); try unused("min", min != nil); try unused("max", max != nil)
        case .outOfRange:
            if let min, let max, min >= max { throw AlertRuleError(field: "max", message: "must be above min (\(formatValue(min)))") }
            try unused("threshold", threshold != nil); try unused("clear", clear != nil); try unused("window", self.window != nil)
            try unused("after", self.after != nil); try unused("count", self.count != nil)
        }
        let severity = self.severity ?? "warning"
        guard AlertRule.severities.contains(severity) else {
            throw AlertRuleError(field: "severity", message: "'\(severity.prefix(40))' must be one of \(AlertRule.severities.joined(separator: ", "))")
        }
        let labels = self.labels ?? [:]
        guard labels.count <= 32 else { throw AlertRuleError(field: "labels", message: "at most 32 labels") }
        for (key, value) in labels {
            guard Self.isLabelName(key) else { throw AlertRuleError(field: "labels", message: "label name '\(key.prefix(64))' must be 1 to 64 of A-Z a-z 0-9 _, not starting with a digit") }
            guard value.count <= 256 else { throw AlertRuleError(field: "labels", message: "the value of '\(key)' is longer than 256 characters") }
            // A line break in a label split the e-mail body's lines (a receiver reading it as a header); every other
            // control character garbles listings and logs.
            if let problem = value.controlCharacterProblem() { throw AlertRuleError(field: "labels", message: "the value of '\(key)' \(problem)") }
            if ["alertname", "farm", "severity", "device", "sensor"].contains(key) {
                throw AlertRuleError(field: "labels", message: "'\(key)' is set by the engine; choose another label name")
            }
        }
        if let summary, summary.count > 1000 { throw AlertRuleError(field: "summary", message: "is longer than 1000 characters") }
        if let problem = summary?.controlCharacterProblem() { throw AlertRuleError(field: "summary", message: problem) }
        if let summary {
            var unknown: [String] = []
            AlertRule.walkTemplate(summary, literal: { _ in }, field: { if !AlertRule.summaryFields.contains($0) { unknown.append($0) } })
            if let first = unknown.first {
                throw AlertRuleError(
                    field: "summary",
                    message: "names no field: {{\(first.prefix(40))}}; a summary may use {{\(AlertRule.summaryFields.joined(separator: "}}, {{"))}}")
            }
        }
        let receivers = self.receivers ?? []
        guard receivers.count <= 16 else { throw AlertRuleError(field: "receivers", message: "at most 16 receivers") }
        for receiver in receivers where (try? DeviceID(receiver)) == nil {
            throw AlertRuleError(field: "receivers", message: "'\(receiver.prefix(80))' is not a receiver name (1 to 64 of A-Z a-z 0-9 . _ -)")
        }
        if let twice = receivers.enumerated().first(where: { receivers[..<$0.offset].contains($0.element) })?.element {
            throw AlertRuleError(field: "receivers", message: "'\(twice)' is listed twice; name each receiver once")
        }
        return AlertRule(
            name: name, kind: kind, device: device ?? "*", sensor: sensor ?? "*", quantity: quantity, threshold: threshold, clear: clear,
            forMicroseconds: forMicro, windowMicroseconds: window, afterMicroseconds: after, count: count, min: min, max: max,
            severity: severity, labels: labels, summary: summary, receivers: receivers)
    }

    /// The spec of `rule`, as `alert rule show` prints it and the API returns it (durations written back as text).
    public init(_ rule: AlertRule) {
        name = rule.name
        kind = rule.kind.rawValue
        device = rule.device
        sensor = rule.kind == .deviceOffline ? nil : rule.sensor
        quantity = rule.quantity?.rawValue
        threshold = rule.threshold
        clear = rule.clear
        self.for = rule.forMicroseconds > 0 ? ConfigTable.format(.microseconds(rule.forMicroseconds)) : nil
        window = rule.windowMicroseconds.map { ConfigTable.format(.microseconds($0)) }
        after = rule.afterMicroseconds.map { ConfigTable.format(.microseconds($0)) }
        count = rule.count
        min = rule.min
        max = rule.max
        severity = rule.severity
        labels = rule.labels.isEmpty ? nil : rule.labels
        summary = rule.summary
        receivers = rule.receivers
    }

    /// Parses a JSON object (an API body), refusing keys a rule does not have.
    public static func parseJSON(_ bytes: [UInt8]) throws(AlertRuleError) -> AlertRuleSpec {
        let object: Any
        do {
            object = try JSONSerialization.jsonObject(with: Data(bytes))
        } catch {
            // Foundation refuses a number no double holds (`1e400`) as it refuses what is not JSON at all; the strict
            // reader tells the two apart.
            if (try? StrictJSON.topLevelMembers(bytes)) != nil {  // an object, read to its end
                throw AlertRuleError(field: nil, message: "a number in the body is out of range (a double holds up to about 1.8e308)")
            }
            throw AlertRuleError(field: nil, message: "the body is not JSON; send one rule as a JSON object such as {\"name\": \"ph-low\", \"kind\": \"below\", ...}")
        }
        // JSON, but read strictly: a member twice in an object (`"threshold": 7, "threshold": 8`) is refused, where the
        // decoding below would keep one of them.
        do {
            _ = try StrictJSON.topLevelMembers(bytes)
        } catch {
            throw AlertRuleError(field: nil, message: "the rule cannot be read: \(error.description)")
        }
        guard let dictionary = object as? [String: Any] else { throw AlertRuleError(field: nil, message: "the body must be one JSON object (a rule)") }
        for key in dictionary.keys.sorted() where !keys.contains(key) {
            throw AlertRuleError(field: key, message: "is not a rule field; the fields are \(keys.sorted().joined(separator: ", "))")
        }
        do {
            return try JSONDecoder().decode(AlertRuleSpec.self, from: Data(bytes))
        } catch let DecodingError.typeMismatch(_, context), let DecodingError.valueNotFound(_, context) {
            let field = context.codingPath.first?.stringValue
            throw AlertRuleError(field: field, message: "has the wrong type (\(context.debugDescription))")
        } catch DecodingError.dataCorrupted {
            // The body is JSON (read above); what the decoder calls corrupt is an integer past 64 bits
            // (`"count": 99999999999999999999`), which Foundation tells as "not valid JSON" without naming the field.
            let huge = dictionary.keys.sorted().first { key in
                guard !(dictionary[key] is Bool), let number = dictionary[key] as? Double else { return false }
                return number.magnitude >= 0x1p63
            }
            guard let huge else { throw AlertRuleError(field: nil, message: "the rule cannot be read: a value is not one its field takes") }
            throw AlertRuleError(field: huge, message: "is too large a number; give a smaller one")
        } catch {
            throw AlertRuleError(field: nil, message: "the rule cannot be read: \(error)")
        }
    }
}

/// Why a rule is refused: the field (nil for the whole rule) and what to do.
extension AlertRuleSpec {
    /// A label name as rules and silences write them: 1 to 64 of A-Z a-z 0-9 _, not starting with a digit.
    static func isLabelName(_ name: String) -> Bool {
        !name.isEmpty && name.count <= 64 && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
            && !(name.first?.isNumber ?? true)
    }
}

public struct AlertRuleError: Error, Sendable, Hashable, CustomStringConvertible {
    public var field: String?
    public var message: String
    /// The rule of several it is about, when a check of many found it (a rules file's receivers), so that it can be
    /// located in the file.
    public var rule: String?

    public init(field: String?, message: String, rule: String? = nil) {
        self.field = field
        self.message = message
        self.rule = rule
    }

    public var description: String { field.map { "\($0): \(message)" } ?? message }
}
