public import FarmgateSupport
import Foundation

/// Alert rules from a TOML file (`farmgate-ingest alert rule load FILE`): one `[[rule]]` table per rule, with the keys
/// of ``AlertRuleSpec``. Errors are located (`rules.toml:12: rule "ph-low": threshold: ...`), like the ingest's
/// configuration. See `examples/ingest-alert-rules.toml`.
public enum AlertRuleFile {
    /// Reads and validates every rule of `path`; fails on the first invalid one, so that a file is loaded whole or not at all.
    public static func load(path: String) throws(ConfigurationError) -> [AlertRule] {
        try rules(in: ConfigDocument.load(path: path, what: "the rules file"))
    }

    /// Parses `text` (named `file` in errors).
    public static func parse(_ text: String, file: String) throws(ConfigurationError) -> [AlertRule] {
        try rules(in: ConfigDocument.parse(text, file: file))
    }

    static func rules(in document: ConfigTable) throws(ConfigurationError) -> [AlertRule] {
        try document.checkKeys(["rule"])
        var rules: [AlertRule] = []
        var names: Set<String> = []
        for table in try document.tables("rule") {
            let named = table.named((try? table.string("name")).flatMap { $0 }.map { "rule \"\($0)\"" } ?? table.keyName(nil))
            try named.checkKeys(AlertRuleSpec.keys)
            var spec = AlertRuleSpec()
            spec.name = try named.string("name")
            spec.kind = try named.string("kind")
            spec.device = try named.string("device")
            spec.sensor = try named.string("sensor")
            spec.quantity = try named.string("quantity")
            spec.threshold = try named.double("threshold")
            spec.clear = try named.double("clear")
            spec.for = try durationText(named, "for")
            spec.window = try durationText(named, "window")
            spec.after = try durationText(named, "after")
            spec.count = try named.int("count")
            spec.min = try named.double("min")
            spec.max = try named.double("max")
            spec.severity = try named.string("severity")
            spec.summary = try named.string("summary")
            spec.receivers = try named.strings("receivers")
            if let labels = try named.table("labels") {
                var values: [String: String] = [:]
                for key in labels.keys { values[key] = try labels.requiredString(key) }
                spec.labels = values
            }
            let rule: AlertRule
            do {
                rule = try spec.validated()
            } catch {
                throw named.error(error.field, error.message)
            }
            guard names.insert(rule.name).inserted else { throw named.error("name", "'\(rule.name)' is used by an earlier rule of this file") }
            rules.append(rule)
        }
        if rules.isEmpty { throw document.error(nil, "no [[rule]] tables; see examples/ingest-alert-rules.toml") }
        return rules
    }

    /// `error`, found by the store about rule `rule` of the file at `path` (a receiver the farm does not have), located
    /// as the file's own errors are (`rules.toml:12: rule "ph-low": receivers: …`); nil when the file no longer has
    /// that rule.
    public static func locate(_ error: AlertRuleError, rule: String, path: String) -> ConfigurationError? {
        guard let document = try? ConfigDocument.load(path: path, what: "the rules file"), let tables = try? document.tables("rule") else { return nil }
        for table in tables where (try? table.string("name")) == rule {
            return table.named("rule \"\(rule)\"").error(error.field, error.message)
        }
        return nil
    }

    /// The longest duration a rule takes (``AlertRuleSpec/validated()`` refuses longer ones too).
    static let maximumDuration = Duration.seconds(366 * 86_400)

    /// A duration key as text for ``AlertRuleSpec`` (numbers are seconds), checked against 0s...366d here, before it is
    /// formatted: a number such as `for = 10000000000000000` (seconds) would not fit the text's milliseconds.
    private static func durationText(_ table: ConfigTable, _ key: String) throws(ConfigurationError) -> String? {
        guard let duration = try table.duration(key, in: .zero...maximumDuration) else { return nil }
        return ConfigTable.format(duration)
    }
}
