import Crypto
import Foundation

/// The signature of a webhook request, so that a receiver can tell a notification from this ingest from anyone else's
/// POST, and refuse a recorded one replayed later.
///
/// Headers sent with every webhook of a receiver that has a secret:
/// - `X-Farmgate-Timestamp: 1767225600` (Unix seconds when the request was signed)
/// - `X-Farmgate-Signature: sha256=<hex>`: HMAC-SHA256, keyed with the receiver's secret (its UTF-8 bytes), of the
///   timestamp's decimal digits, one `.`, and the exact body bytes.
///
/// A receiver verifies it by recomputing the HMAC over `timestamp + "." + raw body` (before any JSON parsing), comparing
/// in constant time, and refusing a timestamp more than five minutes from its clock. The idempotency key is inside the
/// signed body (`farmgate.idempotencyKey`) as well as in the `Idempotency-Key` header.
///
/// ```sh
/// printf '%s.%s' "$TIMESTAMP" "$(cat body.json)" | openssl dgst -sha256 -hmac "$SECRET" -hex
/// ```
public enum WebhookSignature {
    public static let signatureHeader = "X-Farmgate-Signature"
    public static let timestampHeader = "X-Farmgate-Timestamp"
    /// How far a request's timestamp may be from the receiver's clock (what ``verify(body:timestamp:signature:secret:now:)`` allows).
    public static let tolerance: Int64 = 300

    /// `sha256=<hex>` for `body` signed at `timestamp` (Unix seconds) with `secret`.
    public static func sign(body: [UInt8], timestamp: Int64, secret: String) -> String {
        let code = HMAC<SHA256>.authenticationCode(for: signedBytes(body: body, timestamp: String(timestamp)), using: SymmetricKey(data: Array(secret.utf8)))
        return "sha256=" + code.map { String(format: "%02x", $0) }.joined()
    }

    /// Whether `signature` (the header's value) signs `body` at `timestamp` (the header's value) with `secret`, and the
    /// timestamp is within ``tolerance`` of `now` (Unix seconds). Constant time in the signature.
    public static func verify(body: [UInt8], timestamp: String, signature: String, secret: String, now: Int64) -> Bool {
        guard let seconds = Int64(timestamp), abs(now - seconds) <= tolerance, signature.hasPrefix("sha256=") else { return false }
        guard let code = hexBytes(signature.dropFirst("sha256=".count)) else { return false }
        return HMAC<SHA256>.isValidAuthenticationCode(
            code, authenticating: signedBytes(body: body, timestamp: timestamp), using: SymmetricKey(data: Array(secret.utf8)))
    }

    private static func signedBytes(body: [UInt8], timestamp: String) -> [UInt8] {
        Array(timestamp.utf8) + [UInt8(ascii: ".")] + body
    }

    private static func hexBytes(_ text: Substring) -> [UInt8]? {
        let digits = Array(text.utf8)
        guard digits.count == 64 else { return nil }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(32)
        var index = 0
        while index < digits.count {
            guard let high = hexValue(digits[index]), let low = hexValue(digits[index + 1]) else { return nil }
            bytes.append(high << 4 | low)
            index += 2
        }
        return bytes
    }

    private static func hexValue(_ digit: UInt8) -> UInt8? {
        switch digit {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): digit - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): digit - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): digit - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
