import FarmgateAgent
import FarmgateSupport
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
}
