import FarmgateSupport
import FarmgateWire

/// The `Retry-After` of a webhook receiver's 429 or 503 (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.
///
/// Read as the agent reads the ingest's (`RetryAfter` in FarmgateAgent/Upload/Backoff.swift, a module the ingest does not
/// link): digits only for seconds, and the three HTTP-date forms a recipient must accept. What the wait becomes is
/// decided by ``NotificationDelivery/retryDelay(for:attempt:configuration:)``: never shorter than the backoff, at most
/// ``NotificationDelivery/retryAfterMax``.
enum WebhookRetryAfter {
    /// Larger values are read as this (a year): the delivery caps the wait far below it, and no arithmetic on a
    /// receiver's `Retry-After: 99999999999999999999` can overflow.
    static let ceiling: Duration = .seconds(366 * 86_400)

    /// How long `value` asks to wait at `now`.
    ///
    /// - Returns: The wait, at most ``ceiling``; zero for `0` and for a date that is not after `now`; nil for anything
    ///   else (a negative or fractional number, a date in no HTTP form), which the delivery treats as no `Retry-After`.
    static func delay(_ value: String, now: Timestamp) -> Duration? {
        let text = value.trimmingWhitespace()
        guard !text.isEmpty else { return nil }
        let ceilingSeconds = ceiling.components.seconds
        if text.utf8.allSatisfy({ (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }) {
            // More than 12 digits is beyond the ceiling anyway; Int64 would overflow past 18.
            guard text.utf8.count <= 12, let seconds = Int64(text) else { return ceiling }
            return .seconds(min(seconds, ceilingSeconds))
        }
        guard let date = httpDate(text) else { return nil }
        let microseconds = date * 1_000_000 - now.microseconds
        guard microseconds > 0 else { return .zero }
        return min(.microseconds(microseconds), ceiling)
    }

    private static let months = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]

    /// Unix seconds of an HTTP-date in any of its three forms, or nil.
    static func httpDate(_ text: String) -> Int64? {
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
}
