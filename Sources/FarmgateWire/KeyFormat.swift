/// The text of a Farmgate bearer secret, `<kind>_<keyid>_<secret>` (`fgd_` a device key, `fgr_` a read token, `fge_` a
/// one-time enrollment token): a key id of 8 characters of lowercase base32 and a secret of 64 lowercase hex digits.
/// The ingest's `APIKey` and the agent's configuration check read keys with it, so a key the ingest could never accept
/// is refused on site when it is configured.
public enum KeyFormat {
    /// The number of characters in a key id.
    public static let keyIDLength = 8
    /// The number of hex digits in a secret.
    public static let secretLength = 64
    /// The characters of a key id.
    public static let base32Alphabet = Array("abcdefghijklmnopqrstuvwxyz234567".utf8)

    /// Whether `text` has the form of a key id: ``keyIDLength`` characters of a-z and 2-7.
    public static func isKeyID(_ text: some StringProtocol) -> Bool {
        text.utf8.count == keyIDLength && text.utf8.allSatisfy { base32Alphabet.contains($0) }
    }

    /// The kind (`fgd`, `fgr`, `fge`, not checked), key id and secret of `text`, or nil when it has another form.
    public static func parts(of text: String) -> (kind: String, keyID: String, secret: String)? {
        let bytes = Array(text.utf8)
        guard bytes.count == 3 + 1 + keyIDLength + 1 + secretLength, bytes[3] == UInt8(ascii: "_"), bytes[4 + keyIDLength] == UInt8(ascii: "_")
        else { return nil }
        let keyID = bytes[4..<(4 + keyIDLength)]
        let secret = bytes[(5 + keyIDLength)...]
        guard keyID.allSatisfy({ base32Alphabet.contains($0) }),
            secret.allSatisfy({ ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "f")) })
        else { return nil }
        return (String(decoding: bytes[0..<3], as: UTF8.self), String(decoding: keyID, as: UTF8.self), String(decoding: secret, as: UTF8.self))
    }

    /// What is wrong with `text` as a device key, or nil when it has a device key's form.
    public static func deviceKeyProblem(_ text: String) -> String? {
        if let parts = parts(of: text) {
            return parts.kind == "fgd" ? nil : "is a \(parts.kind)_ credential, not a device key (fgd_…)"
        }
        guard text.hasPrefix("fgd_") else {
            return "is not a device key: they start with fgd_ (the key printed by `farmgate-ingest device create`, or written by `farmgate enroll`)"
        }
        let length = 3 + 1 + keyIDLength + 1 + secretLength
        let form = "fgd_, \(keyIDLength) characters of a-z and 2-7, _, then \(secretLength) lowercase hex digits"
        let count = text.unicodeScalars.count
        guard count == length, text.utf8.count == length else {
            return "is not a whole device key: \(form) (\(length) characters in all; this one has \(count)); copy it again in full"
        }
        // The right length: say which part is wrong (the characters are ASCII here).
        let bytes = Array(text.utf8)
        let part: String
        if !bytes[4..<(4 + keyIDLength)].allSatisfy({ base32Alphabet.contains($0) }) {
            part = "its key id (the \(keyIDLength) characters after fgd_) holds a character other than a-z and 2-7"
        } else if bytes[4 + keyIDLength] != UInt8(ascii: "_") {
            part = "the character after its key id is not _"
        } else {
            part = "its secret (the \(secretLength) characters after the second _) holds a character other than 0-9 and a-f"
        }
        return "is not a device key: \(part); a device key is \(form). Copy it again as printed (keys are lowercase)"
    }
}
