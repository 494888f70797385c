// The few text helpers the site binary needs that the standard library lacks and that would otherwise pull in full
// Foundation (with ICU, about 10 MB resident on a Pi): trimming, padding and fixed-point formatting.

extension StringProtocol {
    /// Without leading and trailing whitespace, newlines included (Foundation's
    /// `trimmingCharacters(in: .whitespacesAndNewlines)`).
    public func trimmingWhitespace() -> String {
        guard let first = firstIndex(where: { !$0.isWhitespace }),
              let last = lastIndex(where: { !$0.isWhitespace })
        else { return "" }
        return String(self[first...last])
    }

    /// Exactly `width` characters: cut, or filled with spaces on the right (Foundation's
    /// `padding(toLength:withPad: " ", startingAt: 0)`), for columns of plain-text tables.
    public func padded(to width: Int) -> String {
        count >= width ? String(prefix(width)) : String(self) + String(repeating: " ", count: width - count)
    }
}

/// `value` with exactly `places` digits after the point (`String(format: "%.2f")` without Foundation), for display.
/// Rounds the scaled value half away from zero, so a value whose scaled form lands on .5 (7.35 at one place) shows
/// 7.4 where printf, rounding the exact binary value, shows 7.3; and it shows no negative zero (`-0.0004` at three
/// places is `0.000`, not `-0.000`). Non-finite values and magnitudes from 10^18 show Swift's own description.
public func fixedPoint(_ value: Double, places: Int) -> String {
    let places = max(0, min(places, 9))
    var scale: UInt64 = 1
    for _ in 0..<places { scale *= 10 }
    guard value.isFinite, value.magnitude < 1e18 else { return "\(value)" }
    var whole = UInt64(value.magnitude.rounded(.towardZero))
    var fraction = UInt64(((value.magnitude - Double(whole)) * Double(scale)).rounded(.toNearestOrAwayFromZero))
    if fraction >= scale {
        whole += 1
        fraction -= scale
    }
    let sign = value < 0 && (whole != 0 || fraction != 0) ? "-" : ""
    guard places > 0 else { return sign + String(whole) }
    let digits = String(fraction)
    return sign + String(whole) + "." + String(repeating: "0", count: places - digits.count) + digits
}

extension StringProtocol {
    /// With the secret of every Farmgate credential in it cut: `fgd_`, `fgr_` or `fge_`, then at most 8 characters of
    /// its key id, then `…` in place of whatever key-like characters follow. A key pasted where a path, an id or an
    /// unquoted value was expected must not reach a log line, `farmgate status` or a terminal through an error message.
    public func redactingCredentials() -> String {
        let text = String(self)
        guard text.contains("fgd_") || text.contains("fgr_") || text.contains("fge_") else { return text }
        let bytes = Array(text.utf8)
        func keyLike(_ byte: UInt8) -> Bool {
            (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A) || byte == 0x5F
        }
        var result: [UInt8] = []
        result.reserveCapacity(bytes.count)
        var index = 0
        while index < bytes.count {
            if index + 4 <= bytes.count, bytes[index] == 0x66, bytes[index + 1] == 0x67,  // "fg"
                [0x64, 0x72, 0x65].contains(bytes[index + 2]), bytes[index + 3] == 0x5F  // d, r or e, then "_"
            {
                var end = index + 4
                while end < bytes.count, end < index + 12, keyLike(bytes[end]), bytes[end] != 0x5F { end += 1 }
                result += bytes[index..<end]
                var rest = end
                while rest < bytes.count, keyLike(bytes[rest]) { rest += 1 }
                if rest > end { result += Array("…".utf8) }
                index = rest
                continue
            }
            result.append(bytes[index])
            index += 1
        }
        return String(decoding: result, as: UTF8.self)
    }
}
