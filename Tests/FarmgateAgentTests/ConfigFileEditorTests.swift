import FarmgateAgent
import FarmgateSupport
import Foundation
import Testing

@Suite("Editing the configuration as text (farmgate enroll)")
struct ConfigFileEditorTests {
    static let site = """
        # Greenhouse 2, north wall.
        [device]
        id = "greenhouse-2"   # as registered on the ingest

        [upload]
        endpoint = "http://old.example.net"   # the old server
        key = "fgd_old"
        batch_max_age = "5s"

        # pH of tank 1
        [[sensor]]
        id = "tank1.ph"
        driver = "simulated"
        quantity = "ph"

        """

    @Test func replacesValuesKeepingCommentsAndEverythingElse() throws {
        var editor = ConfigFileEditor(text: Self.site)
        try editor.set("endpoint", .string("https://ingest.example.net"), in: "upload")
        try editor.remove("key", in: "upload")
        try editor.set("key_file", .string("/etc/farmgate/device.key"), in: "upload")
        let expected = """
            # Greenhouse 2, north wall.
            [device]
            id = "greenhouse-2"   # as registered on the ingest

            [upload]
            endpoint = "https://ingest.example.net"  # the old server
            batch_max_age = "5s"
            key_file = "/etc/farmgate/device.key"

            # pH of tank 1
            [[sensor]]
            id = "tank1.ph"
            driver = "simulated"
            quantity = "ph"

            """
        #expect(editor.text == expected)
        let document = try ConfigDocument.parse(editor.text, file: "site.toml")
        #expect(try document.table("upload")?.string("endpoint") == "https://ingest.example.net")
        #expect(try document.tables("sensor").count == 1)
    }

    @Test func addsAMissingSectionBeforeTheSensorsAndTheirComments() throws {
        let text = """
            [device]
            id = "a"

            # the first sensor
            [[sensor]]
            id = "t.ph"
            """
        var editor = ConfigFileEditor(text: text)
        try editor.set("endpoint", .string("https://i.example"), in: "upload")
        #expect(
            editor.text == """
                [device]
                id = "a"

                [upload]
                endpoint = "https://i.example"

                # the first sensor
                [[sensor]]
                id = "t.ph"

                """)
    }

    @Test func writesIntoAnEmptyFileAndEscapesStrings() throws {
        var editor = ConfigFileEditor(text: "")
        try editor.set("id", .string("site-1"), in: "device")
        try editor.set("key_file", .string(#"/etc/a "quoted"\path"#), in: "upload")
        let document = try ConfigDocument.parse(editor.text, file: "new.toml")
        #expect(try document.table("device")?.string("id") == "site-1")
        #expect(try document.table("upload")?.string("key_file") == #"/etc/a "quoted"\path"#)
        #expect(editor.stringValue("id", in: "device") == "site-1")
    }

    @Test func aHashInsideTheValueIsNotAComment() throws {
        var editor = ConfigFileEditor(text: "[upload]\nendpoint = \"https://a.example/#x\"  # note\n")
        try editor.set("endpoint", .string("https://b.example"), in: "upload")
        #expect(editor.text == "[upload]\nendpoint = \"https://b.example\"  # note\n")
    }

    @Test func refusesToReplaceAValueOverSeveralLines() {
        var editor = ConfigFileEditor(text: "[upload]\nendpoint = \"\"\"\nhttps://a.example\n\"\"\"\n")
        #expect(throws: ConfigFileEditor.Refusal.self) { try editor.set("endpoint", .string("https://b.example"), in: "upload") }
    }

    // Before the fix a file with CRLF endings was one line to the editor (in a Swift String "\r\n" is one Character, not
    // "\n"): [upload] was not found and a second one was added, which the TOML parser refused ("defined twice").
    @Test func aFileWithCRLFEndingsIsEditedInPlaceAndKeepsThem() throws {
        let crlf = Self.site.replacingOccurrences(of: "\n", with: "\r\n")
        var editor = ConfigFileEditor(text: crlf)
        try editor.set("endpoint", .string("https://ingest.example.net"), in: "upload")
        try editor.remove("key", in: "upload")
        try editor.set("key_file", .string("/etc/farmgate/device.key"), in: "upload")
        try editor.set("level", .string("debug"), in: "log")
        let text = editor.text
        #expect(text.components(separatedBy: "[upload]").count == 2, "one [upload]: \(text)")
        #expect(text.contains("[upload]\r\nendpoint = \"https://ingest.example.net\"  # the old server\r\nbatch_max_age = \"5s\"\r\nkey_file = "))
        #expect(text.contains("[log]\r\nlevel = \"debug\"\r\n"), "added lines take the file's endings: \(text)")
        #expect(!text.utf8.split(separator: UInt8(ascii: "\n")).contains { $0.last != UInt8(ascii: "\r") }, "every line ends in CRLF")
        let document = try ConfigDocument.parse(text, file: "crlf.toml")
        #expect(try document.table("upload")?.string("endpoint") == "https://ingest.example.net")
        #expect(try document.table("upload")?.string("key") == nil)

        // A file with LF endings and one CRLF line keeps each line's ending; a last line without one gets the usual one.
        var mixed = ConfigFileEditor(text: "[device]\r\nid = \"a\"\n[upload]\nendpoint = \"http://x\"")
        try mixed.set("endpoint", .string("https://y"), in: "upload")
        #expect(mixed.text == "[device]\r\nid = \"a\"\n[upload]\nendpoint = \"https://y\"\n")
    }
}
