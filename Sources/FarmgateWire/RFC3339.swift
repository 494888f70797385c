/// RFC 3339 timestamps (`2026-11-23T10:15:30.123456Z`) without Foundation: the proleptic Gregorian calendar in UTC,
/// microsecond precision. Offsets other than `Z` are accepted when parsing and converted to UTC.
public enum RFC3339 {
    /// Formats `timestamp` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (fraction omitted when zero).
    public static func format(_ timestamp: Timestamp) -> String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(27)
        append(timestamp, to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Appends ``format(_:)``'s text to `bytes`, digit by digit (answers with thousands of timestamps format them all;
    /// building each through Strings cost a tenth of such a request).
    public static func append(_ timestamp: Timestamp, to bytes: inout [UInt8]) {
        let us = timestamp.microseconds
        var seconds = us / 1_000_000
        var micros = us % 1_000_000
        if micros < 0 {
            seconds -= 1
            micros += 1_000_000
        }
        let days = floorDiv(seconds, 86_400)
        let secondOfDay = seconds - days * 86_400
        let (y, m, d) = civil(fromDays: days)
        if (0...9999).contains(y) {
            digits(y, 4, &bytes)
        } else {
            bytes.append(contentsOf: pad(y, 4).utf8)
        }
        bytes.append(UInt8(ascii: "-"))
        digits(m, 2, &bytes)
        bytes.append(UInt8(ascii: "-"))
        digits(d, 2, &bytes)
        bytes.append(UInt8(ascii: "T"))
        digits(secondOfDay / 3600, 2, &bytes)
        bytes.append(UInt8(ascii: ":"))
        digits(secondOfDay / 60 % 60, 2, &bytes)
        bytes.append(UInt8(ascii: ":"))
        digits(secondOfDay % 60, 2, &bytes)
        if micros != 0 {
            bytes.append(UInt8(ascii: "."))
            digits(micros, 6, &bytes)
        }
        bytes.append(UInt8(ascii: "Z"))
    }

    /// Appends `value` (0 ≤ value < 10^width) in exactly `width` decimal digits.
    private static func digits(_ value: Int64, _ width: Int, _ bytes: inout [UInt8]) {
        var divisor: Int64 = 1
        for _ in 1..<width { divisor *= 10 }
        var rest = value
        while divisor > 0 {
            bytes.append(UInt8(ascii: "0") + UInt8(truncatingIfNeeded: rest / divisor))
            rest %= divisor
            divisor /= 10
        }
    }

    /// The seconds since 1970 of the years ``format(_:)`` writes with four digits, 0000–9999 (computed once: ``parse(_:)``
    /// runs for every timestamp of a JSON batch).
    private static let writableSeconds = (days(fromCivil: 0, 1, 1) * 86_400)..<(days(fromCivil: 10_000, 1, 1) * 86_400)

    /// Parses an RFC 3339 date-time, or returns nil. Fractions beyond microseconds are truncated.
    public static func parse(_ text: String) -> Timestamp? {
        parse(text, roundingUp: false)
    }

    /// Parses an RFC 3339 date-time, or returns nil; a fraction finer than a microsecond (Go's RFC3339Nano writes
    /// nine digits) is rounded up to the next microsecond, truncated otherwise. A range's bounds take the rounded-up
    /// instant: the first stored instant (whole microseconds) at or after `from`, and the first not before `to`, so
    /// that `from` stays inclusive and `to` exclusive as written.
    public static func parse(_ text: String, roundingUp: Bool) -> Timestamp? {
        guard let (seconds, micros, finer) = instant(text), writableSeconds.contains(seconds) else { return nil }
        let (product, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000)
        guard !overflow else { return nil }
        return Timestamp(microseconds: product + micros + (roundingUp && finer ? 1 : 0))
    }

    /// Whether `text` is a well-formed RFC 3339 date-time whose offset carries it out of the years 0000–9999 in UTC
    /// (`9999-12-31T23:59:59-01:00`), which ``parse(_:)`` refuses: for an error that says so rather than "not a timestamp".
    public static func isOutOfRange(_ text: String) -> Bool {
        guard let (seconds, _, _) = instant(text) else { return false }
        return !writableSeconds.contains(seconds)
    }

    /// The seconds since 1970 (any year the text can write, before the range check) and the microseconds of `text`,
    /// and whether its fraction goes on past the microseconds with a digit other than 0.
    private static func instant(_ text: String) -> (seconds: Int64, micros: Int64, finer: Bool)? {
        let b = Array(text.utf8)
        func num(_ from: Int, _ count: Int) -> Int64? {
            guard from + count <= b.count else { return nil }
            var v: Int64 = 0
            for i in from..<(from + count) {
                let c = b[i]
                guard c >= 48 && c <= 57 else { return nil }
                v = v * 10 + Int64(c - 48)
            }
            return v
        }
        guard b.count >= 20, let y = num(0, 4), b[4] == UInt8(ascii: "-"), let mo = num(5, 2), b[7] == UInt8(ascii: "-"),
            let d = num(8, 2), b[10] == UInt8(ascii: "T") || b[10] == UInt8(ascii: "t") || b[10] == UInt8(ascii: " "),
            let h = num(11, 2), b[13] == UInt8(ascii: ":"), let mi = num(14, 2), b[16] == UInt8(ascii: ":"), let s = num(17, 2)
        else { return nil }
        guard (1...12).contains(mo), (1...daysIn(month: mo, year: y)).contains(d), h < 24, mi < 60, s < 61 else { return nil }
        var i = 19
        var micros: Int64 = 0
        var finer = false
        if i < b.count, b[i] == UInt8(ascii: ".") {
            i += 1
            var digits = 0
            while i < b.count, b[i] >= 48, b[i] <= 57 {
                if digits < 6 { micros = micros * 10 + Int64(b[i] - 48) } else if b[i] != 48 { finer = true }
                digits += 1
                i += 1
            }
            guard digits > 0 else { return nil }
            for _ in digits..<max(digits, 6) { micros *= 10 }
        }
        guard i < b.count else { return nil }
        var offsetSeconds: Int64 = 0
        if b[i] == UInt8(ascii: "Z") || b[i] == UInt8(ascii: "z") {
            i += 1
        } else if b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: "-") {
            let sign: Int64 = b[i] == UInt8(ascii: "-") ? -1 : 1
            guard let oh = num(i + 1, 2), b.count > i + 3, b[i + 3] == UInt8(ascii: ":"), let om = num(i + 4, 2), oh < 24, om < 60
            else { return nil }
            offsetSeconds = sign * (oh * 3600 + om * 60)
            i += 6
        } else {
            return nil
        }
        guard i == b.count else { return nil }
        // A leap second is the last second of a UTC day (23:59:60Z, or 15:59:60-08:00): elsewhere `:60` names no time.
        if s == 60, ((h * 3600 + mi * 60 - offsetSeconds) % 86_400 + 86_400) % 86_400 != 86_340 { return nil }
        let days = days(fromCivil: y, mo, d)
        // ``parse(_:)`` keeps it within the years this form can write (0000–9999 in UTC): an offset or a leap second must
        // not carry a time past them, whose text ``format(_:)`` could not give back.
        return (days * 86_400 + h * 3600 + mi * 60 + s - offsetSeconds, micros, finer)
    }

    private static func floorDiv(_ a: Int64, _ b: Int64) -> Int64 {
        let q = a / b
        return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q
    }

    private static func pad(_ value: Int64, _ width: Int) -> String {
        let digits = String(value.magnitude)
        let padded = digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
        return value < 0 ? "-" + padded : padded
    }

    private static func daysIn(month: Int64, year: Int64) -> Int64 {
        switch month {
        case 2: (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: 30
        default: 31
        }
    }

    // Howard Hinnant's days_from_civil / civil_from_days.
    package static func days(fromCivil year: Int64, _ month: Int64, _ day: Int64) -> Int64 {
        let y = month <= 2 ? year - 1 : year
        let era = floorDiv(y, 400)
        let yoe = y - era * 400
        let mp = (month + 9) % 12
        let doy = (153 * mp + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    private static func civil(fromDays days: Int64) -> (Int64, Int64, Int64) {
        let z = days + 719_468
        let era = floorDiv(z, 146_097)
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d)
    }
}
