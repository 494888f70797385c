/// The `Retry-After` header of RFC 9110 §10.2.3: a number of seconds or an HTTP-date. Read by the agent from the
/// ingest's answers and by the ingest from webhook receivers' answers; each decides what the wait becomes (never less
/// than its own backoff, so that `0` or a date already past cannot make it send again at once, forever; capped).
public enum RetryAfter {
    /// How long a `Retry-After` value asks the client to wait.
    ///
    /// - Parameters:
    ///   - value: The header's value: delta-seconds (`120`) or an HTTP-date in any of the three forms recipients must accept
    ///     (`Sun, 06 Nov 1994 08:49:37 GMT`, `Sunday, 06-Nov-94 08:49:37 GMT`, `Sun Nov  6 08:49:37 1994`).
    ///   - now: The current time, for a date when the answer carries no readable `Date` header.
    ///   - responseDate: The answer's `Date` header. A date is measured against it when it can be read: the server wrote
    ///     both with its own clock, while this one may be years off (a site box without RTC or NTP yet).
    /// - Returns: The wait (zero for a date in the past), or nil when the value is neither form (a negative or fractional
    ///   number, a date in no HTTP form). Delta-seconds are read whatever their leading zeros, and saturate at
    ///   `Int64.max` seconds rather than wrap or shrink.
    public static func delay(_ value: String, now: Timestamp = .now(), responseDate: String? = nil) -> Duration? {
        let text = trimmed(value)
        guard !text.isEmpty else { return nil }
        if text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) {
            return .seconds(deltaSeconds(text.utf8))
        }
        guard let date = httpDate(text) else { return nil }
        let reference = responseDate.flatMap { httpDate(trimmed($0)) }.map { $0 * 1_000_000 } ?? now.microseconds
        // Both are within years 1900...9999 or a Timestamp: microseconds fit an Int64 with room to spare.
        let (wait, overflow) = (date * 1_000_000).subtractingReportingOverflow(reference)
        guard !overflow else { return nil }
        return wait > 0 ? .microseconds(wait) : .zero
    }

    /// The value of a run of ASCII digits, saturating at `Int64.max`.
    static func deltaSeconds(_ digits: some Collection<UInt8>) -> Int64 {
        var value: Int64 = 0
        for digit in digits {
            let (shifted, overflowed) = value.multipliedReportingOverflow(by: 10)
            let (next, overflowedAgain) = shifted.addingReportingOverflow(Int64(digit - UInt8(ascii: "0")))
            guard !overflowed, !overflowedAgain else { return Int64.max }
            value = next
        }
        return value
    }

    private static let months = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]

    /// Unix seconds of an HTTP-date in any of its three forms, or nil.
    public static func httpDate(_ text: String) -> Int64? {
        let tokens = text.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        let day: Int?, month: Int?, year: Int?, time: String
        if tokens.count == 6, tokens[0].hasSuffix(","), tokens[5] == "GMT" {
            // IMF-fixdate, the form senders must use: Sun, 06 Nov 1994 08:49:37 GMT
            (day, month, year, time) = (Int(tokens[1]), monthNumber(tokens[2]), Int(tokens[3]), tokens[4])
        } else if tokens.count == 4, tokens[0].hasSuffix(","), tokens[3] == "GMT" {
            // RFC 850 (obsolete): Sunday, 06-Nov-94 08:49:37 GMT
            let parts = tokens[1].split(separator: "-").map(String.init)
            guard parts.count == 3, parts[2].count == 2, let shortYear = Int(parts[2]) else { return nil }
            (day, month, year, time) = (Int(parts[0]), monthNumber(parts[1]), shortYear < 70 ? 2000 + shortYear : 1900 + shortYear, tokens[2])
        } else if tokens.count == 5 {
            // asctime (obsolete): Sun Nov  6 08:49:37 1994
            (day, month, year, time) = (Int(tokens[2]), monthNumber(tokens[1]), Int(tokens[4]), tokens[3])
        } else {
            return nil
        }
        let clock = time.split(separator: ":", omittingEmptySubsequences: false).map { Int($0) }
        guard let day, let month, let year, (1...31).contains(day), (1900...9999).contains(year), clock.count == 3,
            let hour = clock[0], let minute = clock[1], let second = clock[2], (0..<24).contains(hour), (0..<60).contains(minute),
            (0...60).contains(second)
        else { return nil }
        let days = RFC3339.days(fromCivil: Int64(year), Int64(month), Int64(day))
        return days * 86_400 + Int64(hour * 3600 + minute * 60 + second)
    }

    private static func monthNumber(_ name: String) -> Int? {
        months.firstIndex(of: name.lowercased()).map { $0 + 1 }
    }

    /// `text` without the spaces and tabs around it (a header value's optional whitespace).
    private static func trimmed(_ text: String) -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" }
        return String(text.drop(while: isSpace).reversed().drop(while: isSpace).reversed())
    }
}
