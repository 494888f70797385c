import FarmgateSupport
import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

@Suite("Alert rules: validation, TOML files, templates, globs")
struct AlertRuleTests {
    @Test("the example rules file loads: pH band, EC band, water temperature, pump flow, float switch, calibration overdue")
    func exampleFile() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("examples/ingest-alert-rules.toml").path
        let rules = try AlertRuleFile.load(path: path)
        let byName = Dictionary(uniqueKeysWithValues: rules.map { ($0.name, $0) })
        #expect(byName["ph-low"]?.kind == .below && byName["ph-low"]?.clear == 5.6 && byName["ph-low"]?.forMicroseconds == 1_800_000_000)
        #expect(byName["ec-band"]?.kind == .outOfRange && byName["ec-band"]?.min == 1200)
        #expect(byName["water-warm"]?.kind == .above)
        #expect(byName["pump-flow-stopped"]?.quantity == .flowRate)
        #expect(byName["reservoir-low"]?.quantity == .state)
        let overdue = byName["ph-calibration-overdue"]?.afterMicroseconds ?? 0
        #expect(overdue == Int64(30) * 86_400 * 1_000_000)
        #expect(Set(rules.map(\.kind)) == Set(AlertRule.Kind.allCases))
    }

    @Test("an invalid rule in a file is located: file, line, rule and field")
    func locatedErrors() throws {
        let text = """
            [[rule]]
            name = "ph-low"
            kind = "below"
            threshold = 5.5

            [[rule]]
            name = "ph-high"
            kind = "above"
            threshold = 6.5
            clear = 6.8
            """
        #expect {
            try AlertRuleFile.parse(text, file: "rules.toml")
        } throws: { error in
            "\(error)" == "rules.toml:10: rule \"ph-high\": clear: must be at or below threshold 6.5 for kind above (it is where the alert clears)"
        }
        #expect {
            try AlertRuleFile.parse("[[rule]]\nname = \"x\"\nkind = \"below\"\ntreshold = 5\n", file: "r.toml")
        } throws: { error in
            "\(error)".hasPrefix("r.toml:4: rule \"x\": treshold: unknown key; did you mean 'threshold'?")
        }
        #expect {
            try AlertRuleFile.parse("[[rule]]\nname = \"x\"\nkind = \"below\"\nthreshold = 5\nfor = \"soon\"\n", file: "r.toml")
        } throws: { error in
            "\(error)".hasPrefix("r.toml:5: rule \"x\": for: must be a duration")
        }
    }

    @Test("a duration in a rules file out of 0s...366d is refused naming file, rule and key, however large the number")
    func outOfRangeDurationsInAFile() throws {
        for (line, shown) in [
            ("for = 10000000000000000", "10000000000000000 seconds"), ("window = 1e300", "1e+300 seconds"), ("for = -5", "-5 seconds"),
            ("window = \"367d\"", "\"367d\""), ("for = 31622401", "31622401 seconds"),
        ] {
            let kind = line.hasPrefix("window") ? "kind = \"rate_of_change\"" : "kind = \"below\""
            let key = line.hasPrefix("window") ? "window" : "for"
            do {
                _ = try AlertRuleFile.parse("[[rule]]\nname = \"x\"\n\(kind)\nthreshold = 5\n\(line)\n", file: "r.toml")
                Issue.record("\(line) was accepted")
            } catch {
                #expect("\(error)".hasPrefix("r.toml:5: rule \"x\": \(key): must be"), "\(error)")
                #expect("\(error)".contains("between 0s and 366d (got \(shown))"), "\(error)")
            }
        }
        // The limit itself, as a number or as text, is taken.
        let limit: Int64 = 366 * 86_400_000_000
        let rules = try AlertRuleFile.parse("[[rule]]\nname = \"x\"\nkind = \"below\"\nthreshold = 5\nfor = 31622400\n", file: "r.toml")
        #expect(rules.first?.forMicroseconds == limit)
        let window = try AlertRuleFile.parse("[[rule]]\nname = \"x\"\nkind = \"rate_of_change\"\nthreshold = 5\nwindow = \"366d\"\n", file: "r.toml")
        #expect(window.first?.windowMicroseconds == limit)
    }

    @Test("validation names the field", arguments: [
        (#"{"kind": "below", "threshold": 5}"#, "name"),
        (#"{"name": "a", "kind": "sideways"}"#, "kind"),
        (#"{"name": "a", "kind": "below"}"#, "threshold"),
        (#"{"name": "a", "kind": "below", "threshold": 5, "clear": 4}"#, "clear"),
        (#"{"name": "a", "kind": "rate_of_change", "threshold": 1}"#, "window"),
        (#"{"name": "a", "kind": "no_data"}"#, "after"),
        (#"{"name": "a", "kind": "device_offline", "after": "5m", "sensor": "x"}"#, "sensor"),
        (#"{"name": "a", "kind": "out_of_range", "min": 5, "max": 4}"#, "max"),
        (#"{"name": "a", "kind": "sensor_fault", "count": 0}"#, "count"),
        (#"{"name": "a", "kind": "below", "threshold": 5, "quantity": "acidity"}"#, "quantity"),
        (#"{"name": "a", "kind": "below", "threshold": 5, "severity": "panic"}"#, "severity"),
        (#"{"name": "a", "kind": "below", "threshold": 5, "labels": {"device": "x"}}"#, "labels"),
        (#"{"name": "a", "kind": "below", "threshold": "low"}"#, "threshold"),
        (#"{"name": "a", "kind": "below", "threshold": 5, "colour": "red"}"#, "colour"),
        (#"{"name": "a", "kind": "below", "threshold": 5, "window": "5m"}"#, "window"),
        (#"{"name": "a", "kind": "below", "threshold": 5, "receivers": ["r1", "r2", "r1"]}"#, "receivers"),
        // A tester, 2026-12-07: told "The given data was not valid JSON".
        (#"{"name": "a", "kind": "sensor_fault", "count": 99999999999999999999}"#, "count"),
    ])
    func fieldErrors(json: String, field: String) throws {
        #expect {
            try AlertRuleSpec.parseJSON(Array(json.utf8)).validated()
        } throws: { error in
            (error as? AlertRuleError)?.field == field && !((error as? AlertRuleError)?.message.isEmpty ?? true)
        }
    }

    // A tester, 2026-12-07: a glob with a character no id has selected nothing, and a summary's {{nosuch}} was sent as
    // written; both were taken without a word.
    @Test("a device or sensor glob no id can match, and a summary field that does not exist, are refused")
    func globsAndTemplateFields() throws {
        for (json, field, says) in [
            (#"{"name": "a", "kind": "below", "threshold": 5, "device": "tank#1"}"#, "device", "contains '#', which no device id has"),
            (#"{"name": "a", "kind": "below", "threshold": 5, "sensor": "tank[12].ph"}"#, "sensor", "contains '[', which no sensor id has"),
            (#"{"name": "a", "kind": "below", "threshold": 5, "device": "gewächshaus*"}"#, "device", #"contains '\u{00E4}'"#),
            (#"{"name": "a", "kind": "below", "threshold": 5, "summary": "{{device}}: {{nosuch}}"}"#, "summary", "names no field: {{nosuch}}; a summary may use {{device}}"),
        ] {
            #expect {
                try AlertRuleSpec.parseJSON(Array(json.utf8)).validated()
            } throws: { error in
                (error as? AlertRuleError)?.field == field && (error as? AlertRuleError)?.message.contains(says) == true
            }
        }
        let fine = try AlertRuleSpec.parseJSON(
            Array(#"{"name": "a", "kind": "below", "threshold": 5, "device": "gh-?.north_*", "sensor": "*", "summary": "{{rule}} {{ count }} {{min}}{{max}}"}"#.utf8)
        ).validated()
        #expect(fine.device == "gh-?.north_*")
    }

    // A tester, 2026-12-07: a negative rate_of_change threshold was told "--threshold is required".
    @Test("a rate_of_change threshold that is not positive is refused as such, not as missing")
    func rateOfChangeThresholdSign() throws {
        for (json, says) in [
            (#"{"name": "a", "kind": "rate_of_change", "threshold": -1, "window": "10m"}"#, "must be a positive number for kind rate_of_change (got -1.0)"),
            (#"{"name": "a", "kind": "rate_of_change", "window": "10m"}"#, "is required for kind rate_of_change"),
        ] {
            #expect {
                try AlertRuleSpec.parseJSON(Array(json.utf8)).validated()
            } throws: { error in
                (error as? AlertRuleError)?.field == "threshold" && (error as? AlertRuleError)?.message.hasPrefix(says) == true
            }
        }
    }

    @Test("a rule goes to JSON and back unchanged, and its summary template is filled")
    func roundTripAndSummary() throws {
        let rule = try AlertRuleSpec.parseJSON(
            Array(#"{"name": "ph-low", "kind": "below", "quantity": "ph", "sensor": "tank*.ph", "threshold": 5.5, "clear": 5.6, "for": "30m", "summary": "{{device}} {{ sensor }}: pH {{value}} below {{threshold}} {{unit", "receivers": ["grower"]}"#.utf8)
        ).validated()
        let again = try AlertRuleSpec(rule).validated()
        #expect(again == rule)
        #expect(rule.renderSummary(device: "gh1", sensor: "tank1.ph", value: 5.32, quantity: .ph) == "gh1 tank1.ph: pH 5.32 below 5.5 {{unit")
        #expect(rule.matches(device: "gh1", sensor: "tank12.ph", quantity: .ph))
        #expect(!rule.matches(device: "gh1", sensor: "tank1.ec", quantity: .ph))
        #expect(!rule.matches(device: "gh1", sensor: "tank1.ph", quantity: .electricalConductivity))
    }

    @Test("globs: * any run, ? one character, everything else literal")
    func globs() {
        #expect(Glob.matches("*", ""))
        #expect(Glob.matches("tank*.ph", "tank1.ph") && Glob.matches("tank*.ph", "tank.ph"))
        #expect(!Glob.matches("tank*.ph", "tank1.ec"))
        #expect(Glob.matches("gh?-*", "gh1-north") && !Glob.matches("gh?-*", "gh12-north"))
        #expect(Glob.matches("*pump*", "main_pump_flow") && !Glob.matches("pump", "pump2"))
    }
}
