import FarmgateSupport
import Foundation
import TOMLKit
import Testing

/// The configuration parser against TOMLKit (toml++), which it replaced in the site binary: the same tree for every
/// valid document, a located refusal for every invalid one.
@Suite("TOML parser")
struct TOMLParserTests {
    // MARK: A canonical rendering of both trees

    static func render(_ table: ConfigTable) -> String {
        "{" + table.keys.map { "\($0.debugDescription)=\(render(table.value($0)))" }.joined(separator: ",") + "}"
    }

    static func render(_ value: ConfigValue?) -> String {
        switch value {
        case nil: return "nil"
        case .string(let text)?: return "s\(text.debugDescription)"
        case .integer(let number)?: return "i\(number)"
        case .double(let number)?: return number.isNaN ? "dnan" : "d\(number)"
        case .bool(let flag)?: return "b\(flag)"
        case .array(let elements)?: return "[" + elements.map { render($0) }.joined(separator: ",") + "]"
        case .table(let table)?: return render(table)
        case .other(let kind)?: return "o\(kind)"
        }
    }

    static func render(_ table: TOMLTable) -> String {
        "{" + table.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }.map { key in
            "\(key.debugDescription)=\(table[key].map { render($0) } ?? "nil")"
        }.joined(separator: ",") + "}"
    }

    static func render(_ node: any TOMLValueConvertible) -> String {
        switch node.type {
        case .string: return "s\((node.string ?? "").debugDescription)"
        case .int: return "i\(node.int ?? 0)"
        case .double: return (node.double ?? 0).isNaN ? "dnan" : "d\(node.double ?? 0)"
        case .bool: return "b\(node.bool ?? false)"
        case .table: return node.table.map { render($0) } ?? "?"
        case .array: return "[" + (node.array.map { Array($0) } ?? []).map { render($0) }.joined(separator: ",") + "]"
        case .date: return "oa date"
        case .time: return "oa time"
        case .dateTime: return "oa date-time"
        }
    }

    static func ours(_ text: String) throws(ConfigurationError) -> String {
        render(try ConfigDocument.parse(text, file: "t.toml"))
    }

    static func theirs(_ text: String) throws -> String { render(try TOMLTable(string: text)) }

    // MARK: Generated documents

    struct Generator {
        var random: SplitMix64

        mutating func pick<T>(_ options: [T]) -> T { options[Int(random.next() % UInt64(options.count))] }
        mutating func chance(_ percent: UInt64) -> Bool { random.next() % 100 < percent }

        mutating func key() -> String {
            switch random.next() % 6 {
            case 0: return "\"quoted key \(random.next() % 50)\""
            case 1: return "'lit.\(random.next() % 50)'"
            case 2: return "k\(random.next() % 40)-x_\(random.next() % 3)"
            case 3: return "\(random.next() % 100)"
            default: return pick(["interval", "url", "sensors", "id", "driver", "port", "baud", "min", "max", "true", "inf"]) + "\(random.next() % 9)"
            }
        }

        mutating func string() -> String {
            switch random.next() % 6 {
            case 0: return "\"plain \(random.next() % 1000) ünï ✓\""
            case 1: return #""esc \" \\ \t \n \u00e9 \U0001F331 end""#
            case 2: return "'C:\\path\\\(random.next() % 9) \"q\"'"
            case 3: return "\"\"\"\nline one\n  line \"two\" \"\"\nthree \\\n    continued\"\"\""
            case 4: return "'''\nraw ''quotes'' \\n\nsecond'''"
            default: return "\"\""
            }
        }

        mutating func scalar() -> String {
            switch random.next() % 12 {
            case 0, 1: return string()
            case 2: return pick(["0", "-17", "+42", "1_000_000", "9223372036854775807", "-9223372036854775808"])
            case 3: return pick(["0xDEAD_beef", "0o755", "0b1101_0001", "0x0"])
            case 4: return pick(["6.5", "-0.001", "1e3", "5E-2", "+1.5e+10", "3.141_592", "0.0", "-0.0", "1_0.2_5"])
            case 5: return pick(["inf", "-inf", "+inf", "nan"])
            case 6: return pick(["true", "false"])
            case 7: return pick(["1979-05-27T07:32:00Z", "1979-05-27 07:32:00.999-07:00", "1979-05-27T07:32:00", "1979-05-27", "07:32:00.5"])
            default: return "\(Int64(bitPattern: random.next()) % 100_000)"
            }
        }

        mutating func value(depth: Int) -> String {
            guard depth < 3, chance(30) else { return scalar() }
            if chance(50) {
                let count = Int(random.next() % 4)
                let elements = (0..<count).map { _ in value(depth: depth + 1) }
                let multiline = chance(40)
                let separator = multiline ? ",\n    # a comment\n  " : ", "
                return "[" + (multiline ? "\n  " : "") + elements.joined(separator: separator) + (chance(30) && !elements.isEmpty ? "," : "") + (multiline ? "\n]" : "]")
            }
            var used = Set<String>()
            var pairs: [String] = []
            for _ in 0..<Int(random.next() % 4) {
                let k = key()
                guard used.insert(k).inserted else { continue }
                pairs.append("\(k) = \(value(depth: depth + 1))")
            }
            return "{ " + pairs.joined(separator: ", ") + " }"
        }

        mutating func document() -> String {
            var lines = ["# generated", ""]
            var usedTop = Set<String>()
            for _ in 0..<Int(random.next() % 4) {
                let k = key()
                if usedTop.insert(k).inserted { lines.append("\(k) = \(value(depth: 0))  # trailing comment") }
            }
            var usedTables = Set<String>()
            for index in 0..<Int(random.next() % 5) {
                let name = "t\(index)"
                if chance(40) {
                    for _ in 0..<Int(1 + random.next() % 3) {
                        lines.append("")
                        lines.append("[[\(name)]]")
                        appendPairs(&lines)
                        if chance(30) {
                            lines.append("[\(name).sub]")
                            appendPairs(&lines)
                        }
                    }
                } else {
                    let header = chance(30) ? "\(name).\"inner part\"" : name
                    guard usedTables.insert(header).inserted else { continue }
                    lines.append("")
                    lines.append(chance(50) ? "[\(header)]" : "[ \(header.replacingOccurrences(of: ".", with: " . ")) ]")
                    appendPairs(&lines)
                }
            }
            return lines.joined(separator: chance(10) ? "\r\n" : "\n") + (chance(50) ? "\n" : "")
        }

        mutating func appendPairs(_ lines: inout [String]) {
            var used = Set<String>()
            for _ in 0..<Int(random.next() % 5) {
                let k = key()
                guard used.insert(k).inserted else { continue }
                if chance(15) {
                    // A dotted key: its first part must not collide with a plain key.
                    let dotted = "dot\(random.next() % 1000)"
                    guard used.insert(dotted).inserted else { continue }
                    lines.append("\(dotted).\(k) = \(value(depth: 1))")
                } else {
                    lines.append("\t\(k)=\(value(depth: 0))")
                }
            }
        }
    }

    @Test("the same tree as TOMLKit for 1,500 generated documents")
    func differential() throws {
        var generator = Generator(random: SplitMix64(seed: 0xF4_12_6A7E))
        var compared = 0
        for _ in 0..<1500 {
            let text = generator.document()
            let expected: String
            do {
                expected = try Self.theirs(text)
            } catch {
                Issue.record("the generator wrote a document TOMLKit refuses (\(error)):\n\(text)")
                continue
            }
            do {
                let got = try Self.ours(text)
                #expect(got == expected, "\(text)")
                if got != expected { return }
            } catch {
                Issue.record("refused a valid document: \(error)\n\(text)")
                return
            }
            compared += 1
        }
        #expect(compared == 1500)
    }

    @Test("the TOML specification's examples parse as specified")
    func specExamples() throws {
        let text = #"""
            title = "TOML Example"
            "character encoding" = "value"
            'quoted "value"' = "value"
            physical.color = "orange"
            physical.shape = "round"
            site."google.com" = true
            3.14159 = "pi"
            str = "I'm a string. \"You can quote me\". Name\tJos\u00E9\nLocation\tSF."
            str2 = """
            The quick brown \


              fox jumps over \
                the lazy dog."""
            str5 = """Here are three quotation marks: ""\"."""
            str7 = """"This," she said, "is just a pointless statement.""""
            winpath = 'C:\Users\nodejs\templates'
            regex2 = '''I [dw]on't need \d{2} apples'''
            quot15 = '''Here are fifteen quotation marks: """""""""""""""'''
            int6 = 5_349_221
            hex3 = 0xdead_beef
            oct1 = 0o01234567
            bin1 = 0b11010110
            flt2 = 3.1415
            flt7 = 6.626e-34
            sf1 = -inf
            integers2 = [
              1, 2, 3,
            ]
            nested_mixed_array = [ [ 1, 2 ], ["a", "b", "c"] ]
            point = { x = 1, y = 2 }
            animal = { type.name = "pug" }
            odt1 = 1979-05-27T07:32:00Z
            ld1 = 1979-05-27

            [fruit]
            apple.color = "red"
            apple.taste.sweet = true

            [fruit.apple.texture]
            smooth = true

            [x.y.z.w]
            [x]
            found = 1

            [[products]]
            name = "Hammer"
            sku = 738594937

            [[products]]  # empty table within the array

            [[products]]
            name = "Nail"
            color = "gray"
            """#
        let table = try ConfigDocument.parse(text, file: "spec.toml")
        #expect(try table.string("str") == "I'm a string. \"You can quote me\". Name\tJosé\nLocation\tSF.")
        #expect(try table.string("str2") == "The quick brown fox jumps over the lazy dog.")
        #expect(try table.string("str5") == #"Here are three quotation marks: """."#)
        #expect(try table.string("str7") == #""This," she said, "is just a pointless statement.""#)
        #expect(try table.string("winpath") == #"C:\Users\nodejs\templates"#)
        #expect(try table.string("quot15") == "Here are fifteen quotation marks: " + String(repeating: "\"", count: 15))
        #expect(try table.int("hex3") == 0xdead_beef)
        #expect(try table.int("oct1") == 0o01234567)
        #expect(try table.int("bin1") == 0b11010110)
        #expect(try table.double("flt7") == 6.626e-34)
        #expect(Self.render(table.value("odt1")) == "oa date-time")
        #expect(try table.table("fruit")?.table("apple")?.table("taste")?.bool("sweet") == true)
        #expect(try table.table("x")?.int("found") == 1)
        let products = try table.tables("products")
        #expect(products.count == 3)
        #expect(try products[2].string("color") == "gray")
        #expect(try Self.ours(text) == Self.theirs(text))
    }

    @Test("invalid documents are refused with the line and column, as TOMLKit refuses them", arguments: [
        ("a = 1\na = 2\n", 2),
        ("[t]\n[t]\n", 2),
        ("a = \"open\n", 1),
        ("a = 1 b = 2\n", 1),
        ("x = 01\n", 1),
        ("x = 1__0\n", 1),
        ("x = _1\n", 1),
        ("x = 1.\n", 1),
        ("x = .5\n", 1),
        ("x = 0x\n", 1),
        ("x = +0x10\n", 1),
        ("x = \"\\q\"\n", 1),
        ("x = \"\\u12\"\n", 1),
        ("x = { a = 1, }\n", 1),
        ("x = { a = 1,\n b = 2 }\n", 1),
        ("x = [1, 2\n", 2),
        ("x = tru\n", 1),
        ("key with space = 1\n", 1),
        ("= 1\n", 1),
        ("[fruit]\napple.color = 1\n[fruit.apple]\n", 3),
        ("a = { b = 1 }\n[a.c]\n", 2),
        ("a = [1]\n[[a]]\n", 2),
        ("[[a]]\n[a]\n", 2),
        ("a.b = 1\na.b.c = 2\n", 2),
        ("x = 9223372036854775808\n", 1),
        ("x = 1979-05-27T07:32\n", 1),
        // Dates and times that do not exist (found by fuzzing against TOMLKit: only their shape was checked).
        ("x = 1979-00-27\n", 1),
        ("x = 1979-13-01\n", 1),
        ("x = 1979-02-29\n", 1),
        ("x = 1979-04-31\n", 1),
        ("x = 99:99:99\n", 1),
        ("x = 1979-05-27T24:00:00Z\n", 1),
        ("x = 1979-05-27T07:60:00Z\n", 1),
        ("x = 1979-05-27T07:32:61\n", 1),
        ("x = 1979-05-27T07:32:00+24:00\n", 1),
        ("ok = 1\n\n\nx = \"\u{01}\"\n", 4),
    ])
    func invalid(document: String, line: Int) {
        #expect(throws: (any Error).self, "TOMLKit accepts \(document.debugDescription) too") { try TOMLTable(string: document) }
        do {
            _ = try ConfigDocument.parse(document, file: "bad.toml")
            Issue.record("accepted \(document.debugDescription)")
        } catch {
            #expect(error.line == line, "\(error)")
            #expect(error.description.hasPrefix("bad.toml:\(line): "), "\(error)")
            #expect(error.description.contains("not valid TOML: "), "\(error)")
            #expect(error.description.contains("(column "), "\(error)")
        }
    }

    // Before (an installer CLI tester, 2026-12-07) a value error gave file, line and column but not the key, and an
    // integer past 64 bits was "not a valid value" like a word.
    @Test("an error inside a value names its key, with its table, and what to write instead", arguments: [
        ("[upload]\nendpoint = \"http://x\"\n[[sensor]]\nid = \"a\"\n[[sensor]]\nid = \"b\"\nport = /dev/ttyUSB0\n", 7,
         "sensor#2.port", #"`/dev/ttyUSB0` is not a valid value: a string needs quotes ("/dev/ttyUSB0")"#),
        ("[buffer]\ncommit_interval = 10s # every ten\n", 2, "buffer.commit_interval", #"`10s` is not a valid value: a string needs quotes ("10s")"#),
        ("x = 99999999999999999999\n", 1, "x", "`99999999999999999999` is too large for an integer (from -9223372036854775808 to 9223372036854775807)"),
        ("x = -0x1\n", 1, "x", "is not a valid value"),
        ("x = 0xFFFFFFFFFFFFFFFFF\n", 1, "x", "is too large for an integer"),
        ("[a.b]\nc = { d = [1, { e = C:\\dir }] }\n", 2, "a.b.c.d.e", #"a string needs quotes ("C:\\dir")"#),
        ("x = \n", 1, "x", "expected a value"),
        // Tables under an element of an array of tables say which element (a review, 2026-12-07: `sensor.options`).
        ("[[sensor]]\nid = \"a\"\n[[sensor]]\nid = \"b\"\n[sensor.options]\nport = COM1\n", 6, "sensor#2.options.port", "`COM1` is not a valid value"),
        ("[[sensor]]\nid = \"a\"\n[[sensor.alarm]]\nx = 1\n[[sensor.alarm]]\nlevel = high\n", 6, "sensor#1.alarm#2.level", "`high` is not a valid value"),
        // A word too long to show whole is cut, without a quoted form that would be cut too.
        ("u = http://" + String(repeating: "é", count: 200) + "\n", 1, "u", "…` is not a valid value: a string needs quotes; numbers"),
    ])
    func valueErrorsNameTheirKey(document: String, line: Int, key: String, says: String) {
        do {
            _ = try ConfigDocument.parse(document, file: "bad.toml")
            Issue.record("accepted \(document.debugDescription)")
        } catch {
            #expect(error.line == line, "\(error)")
            #expect(error.key == key, "\(error)")
            #expect(error.description.hasPrefix("bad.toml:\(line): \(key): not valid TOML: "), "\(error)")
            #expect(error.message.contains(says), "\(error)")
        }
    }

    @Test("a syntax error outside any value names no key")
    func structureErrorsNameNoKey() {
        for document in ["[upload\n", "a b = 1\n", "[x]\n[x]\n"] {
            do {
                _ = try ConfigDocument.parse(document, file: "bad.toml")
                Issue.record("accepted \(document.debugDescription)")
            } catch {
                #expect(error.key == nil, "\(error)")
            }
        }
    }

    @Test("dates and times at the edges of the calendar are taken, as TOMLKit takes them")
    func calendarEdges() throws {
        let text = "a = 2000-02-29\nc = 00:00:00\nd = 2024-02-29T23:59:59.999-23:59\ne = 1979-04-30\n"
        #expect(try Self.ours(text) == Self.theirs(text))
        // A leap second, which TOML 1.0's grammar allows (`time-second` 00-60) and TOMLKit refuses.
        #expect(throws: Never.self) { try ConfigDocument.parse("b = 1979-12-31T23:59:60Z\n", file: "leap.toml") }
    }

    // Before the fix (a tester, 2026-12-06) the message showed the first byte of a non-ASCII character as Latin-1
    // (`Ã` for `ä`).
    @Test("an unexpected non-ASCII character is named as written", arguments: [
        ("[device]\nfärm = \"f\"\n", "unexpected `ä` in the key `f`"),
        ("x = 1 é\n", "unexpected `é` after the value"),
        ("x = 1 🌱\n", "unexpected `🌱` after the value"),
        // Control characters are named, never echoed (a tester, 2026-12-07: a raw CR hid the message's start).
        ("x = 1\ry = 2\n", "unexpected `\\u{D} (a carriage return: save the file with LF or CRLF line endings)` after the value"),
        ("x = 1\u{7}\n", "unexpected `\\u{7}` after the value"),
    ])
    func nonASCIIInMessages(document: String, says: String) {
        #expect {
            _ = try ConfigDocument.parse(document, file: "bad.toml")
        } throws: { error in
            "\(error)".contains(says)
        }
    }

    @Test("random bytes and truncations never crash the parser")
    func hostileBytes() {
        var random = SplitMix64(seed: 77)
        let seed = Array("[a]\nb = \"c\" # d\ne = [1, {f = 'g'}]\n[[h]]\ni = \"\"\"j\\\n k\"\"\"\n".utf8)
        for _ in 0..<3000 {
            var bytes = seed
            for _ in 0..<Int(random.next() % 4) {
                let index = Int(random.next() % UInt64(bytes.count))
                switch random.next() % 3 {
                case 0: bytes[index] = UInt8(truncatingIfNeeded: random.next())
                case 1: bytes.remove(at: index)
                default: bytes.insert(UInt8(truncatingIfNeeded: random.next() % 128), at: index)
                }
                if bytes.isEmpty { break }
            }
            let text = String(decoding: bytes.prefix(Int(random.next() % UInt64(bytes.count + 1))), as: UTF8.self)
            _ = try? ConfigDocument.parse(text, file: "fuzz.toml")
        }
    }

    /// Each `[[sensor]]` header appends to its array in place (TOMLParser.appendTable); copying the array per header made
    /// a file of 20,000 tables cost 200 million element copies. No time is asserted: the result is, and the append stays
    /// obviously linear in the parser.
    @Test("20,000 [[sensor]] tables and a nested [[sensor.alarm]] under the last are all kept, in order")
    func manyArrayTables() throws {
        var text = "[agent]\nname = \"big\"\n"
        for index in 0..<20_000 { text += "[[sensor]]\nid = \"s\(index)\"\n" }
        text += "[[sensor.alarm]]\nlevel = 1\n[[sensor]]\nid = \"last\"\n"
        let document = try ConfigDocument.parse(text, file: "big.toml")
        let sensors = try document.tables("sensor")
        #expect(sensors.count == 20_001)
        #expect(try sensors.first?.string("id") == "s0")
        #expect(try sensors[19_999].string("id") == "s19999")
        #expect(try sensors[19_999].tables("alarm").count == 1)
        #expect(try sensors.last?.string("id") == "last")
        #expect(try document.table("agent")?.string("name") == "big")
        // The line of an element's key is still found.
        #expect(sensors[19_999].error("id", "x").line == 40_002)
        // A header that names a table already defined is still refused.
        #expect(throws: ConfigurationError.self) { try ConfigDocument.parse("[a]\nb = 1\n[[a]]\n", file: "bad.toml") }
    }

    @Test("deeply nested arrays and inline tables are refused, not a stack overflow")
    func nesting() throws {
        for open in ["[", "{ a = "] {
            let text = "x = " + String(repeating: open, count: 100_000) + "\n"
            do {
                _ = try ConfigDocument.parse(text, file: "deep.toml")
                Issue.record("accepted 100,000 levels of \(open)")
            } catch {
                #expect(error.description.contains("nested deeper than 32 levels"), "\(error)")
                #expect(error.line == 1)
            }
        }
        let fine = "x = " + String(repeating: "[", count: 32) + String(repeating: "]", count: 32) + "\n"
        #expect(Self.render(try ConfigDocument.parse(fine, file: "ok.toml").value("x")).hasPrefix("[[[["))
        for key in [String(repeating: "a.", count: 100_000) + "a = 1\n", "[" + String(repeating: "t.", count: 20) + "t]\n"] {
            #expect(throws: ConfigurationError.self) { try ConfigDocument.parse(key, file: "long.toml") }
        }
        #expect(try ConfigDocument.parse(String(repeating: "a.", count: 15) + "a = 1\n", file: "ok.toml").table("a") != nil)
    }
}
