import Crypto
import FarmgateWire

/// A bearer secret: `fgd_<keyid>_<secret>` for a device key, `fgr_<keyid>_<secret>` for a read token,
/// `fge_<keyid>_<secret>` for a one-time enrollment token.
///
/// The key id (8 characters of lowercase base32) is stored in clear and finds the credential; the secret (32 random
/// bytes as 64 hex digits) is stored only as its SHA-256 and compared in constant time.
///
/// ```swift
/// let key = APIKey.generate(kind: .device)
/// print(key.text)              // fgd_k3j9x2ab_5f0c...
/// let parsed = APIKey(parsing: key.text)
/// ```
public struct APIKey: Sendable, Hashable {
    /// What the key opens.
    public enum Kind: String, Sendable, Hashable {
        /// Uploads batches for one device.
        case device = "fgd"
        /// Reads one farm's data.
        case readToken = "fgr"
        /// Exchanged once for a device's key (`POST /v1/enroll`).
        case enrollment = "fge"
    }

    public let kind: Kind
    /// The public part that locates the stored credential.
    public let keyID: String
    /// The secret part, 64 lowercase hex digits.
    public let secret: String

    /// The number of characters in a key id.
    public static let keyIDLength = KeyFormat.keyIDLength
    /// The number of hex digits in a secret.
    public static let secretLength = KeyFormat.secretLength
    static let base32Alphabet = KeyFormat.base32Alphabet

    /// Whether `text` has the form of a key id: ``keyIDLength`` characters of a-z and 2-7.
    public static func isKeyID(_ text: some StringProtocol) -> Bool { KeyFormat.isKeyID(text) }

    /// The whole key, as given to its holder.
    public var text: String { "\(kind.rawValue)_\(keyID)_\(secret)" }

    /// SHA-256 of the secret: what the store keeps.
    public var secretHash: [UInt8] { APIKey.hash(secret: secret) }

    /// SHA-256 of `secret`'s UTF-8 bytes.
    public static func hash(secret: String) -> [UInt8] {
        Array(SHA256.hash(data: Array(secret.utf8)))
    }

    /// A new random key from `SystemRandomNumberGenerator`.
    public static func generate(kind: Kind) -> APIKey {
        var generator = SystemRandomNumberGenerator()
        return generate(kind: kind, using: &generator)
    }

    /// A new random key from `generator` (tests pass a seeded one).
    public static func generate(kind: Kind, using generator: inout some RandomNumberGenerator) -> APIKey {
        var keyID = [UInt8]()
        for _ in 0..<keyIDLength {
            keyID.append(base32Alphabet[Int(generator.next(upperBound: UInt8(base32Alphabet.count)))])
        }
        let hexDigits = Array("0123456789abcdef".utf8)
        var secret = [UInt8]()
        for _ in 0..<(secretLength / 2) {
            let byte: UInt8 = generator.next()
            secret.append(hexDigits[Int(byte >> 4)])
            secret.append(hexDigits[Int(byte & 0x0F)])
        }
        return APIKey(kind: kind, keyID: String(decoding: keyID, as: UTF8.self), secret: String(decoding: secret, as: UTF8.self))
    }

    init(kind: Kind, keyID: String, secret: String) {
        self.kind = kind
        self.keyID = keyID
        self.secret = secret
    }

    /// Parses a key written as `fgd_<keyid>_<secret>` or `fgr_<keyid>_<secret>`, or returns nil when `text` has another form.
    public init?(parsing text: String) {
        guard let parts = KeyFormat.parts(of: text), let kind = Kind(rawValue: parts.kind) else { return nil }
        self.init(kind: kind, keyID: parts.keyID, secret: parts.secret)
    }
}

/// Compares two byte strings in time that depends only on their lengths, never on where they first differ.
///
/// - Returns: true when `a` and `b` are equal.
public func constantTimeEquals(_ a: some Collection<UInt8>, _ b: some Collection<UInt8>) -> Bool {
    guard a.count == b.count else { return false }
    var difference: UInt8 = 0
    for (x, y) in zip(a, b) { difference |= x ^ y }
    return difference == 0
}
