extension StringProtocol {
    /// What is wrong with this text as a stored field, or nil: a control character (C0, U+0000 to U+001F; DEL, U+007F;
    /// C1, U+0080 to U+009F, of which U+009B starts an escape sequence on some terminals), other than a tab when
    /// `allowingTab` (free text such as a comment).
    ///
    /// Text a client sends that ends up in a store is checked with this before it gets there. PostgreSQL refuses U+0000
    /// in `text` (SQLSTATE 22021): taken, such a field made the request fail as if the store were down (503), and a
    /// sender retries that for ever. The other control characters garble every listing and log line that prints the
    /// field. The message reads after the field's name: `circuit: contains the control character U+0000 at character 2`.
    public func controlCharacterProblem(allowingTab: Bool = false) -> String? {
        for (offset, scalar) in unicodeScalars.enumerated() where (scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value)) && !(allowingTab && scalar == "\t") {
            let code = String(scalar.value, radix: 16, uppercase: true)
            return "contains the control character U+\(String(repeating: "0", count: 4 - code.count))\(code) at character \(offset + 1); "
                + (allowingTab ? "send printable text (tabs are taken)" : "send printable text")
        }
        return nil
    }

    /// The text with each control character (as ``controlCharacterProblem(allowingTab:)`` counts them, tabs included)
    /// written as `\u{D}`: for echoing refused input in a message, which must not end a log line or move a terminal's
    /// cursor where the input put a CR or LF.
    public var escapingControlCharacters: String {
        var text = ""
        for scalar in unicodeScalars {
            if scalar.value < 0x20 || (0x7F...0x9F).contains(scalar.value) {
                text += "\\u{\(String(scalar.value, radix: 16, uppercase: true))}"
            } else {
                text.unicodeScalars.append(scalar)
            }
        }
        return text
    }
}
