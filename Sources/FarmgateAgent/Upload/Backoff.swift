import FarmgateWire
import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Exponential backoff with full jitter, capped: after `n` consecutive failures the next wait is uniformly random in
/// `0...min(maximum, initial × 2ⁿ)`. A success resets it.
///
/// Full jitter spreads the retries of many sites that lost the ingest at the same moment, so that they do not all come back
/// at once when it returns.
///
/// ```swift
/// var backoff = Backoff(initial: .seconds(1), maximum: .seconds(300))
/// let wait = backoff.nextDelay()   // 0...1 s, then 0...2 s, 0...4 s, ... up to 0...300 s
/// backoff.reset()                  // after a success
/// ```
public struct Backoff: Sendable, Hashable {
    /// The ceiling of the first wait.
    public var initial: Duration
    /// The largest ceiling.
    public var maximum: Duration
    /// Failures since the last ``reset()``.
    public private(set) var failures: Int = 0

    public init(initial: Duration, maximum: Duration) {
        self.initial = max(.zero, initial)
        self.maximum = max(.zero, maximum)
    }

    /// The ceiling of the next wait: `min(maximum, initial × 2^failures)`.
    public var ceiling: Duration {
        let initialSeconds = Self.seconds(initial)
        let maximumSeconds = Self.seconds(maximum)
        let grown = initialSeconds * pow(2, Double(min(failures, 1000)))
        return Self.duration(min(maximumSeconds, grown))
    }

    /// Counts a failure and returns how long to wait before the next attempt: uniformly random in `0...ceiling`, the ceiling
    /// taken before this failure is counted.
    public mutating func nextDelay<Generator: RandomNumberGenerator>(using generator: inout Generator) -> Duration {
        let bound = Self.seconds(ceiling)
        recordFailure()
        guard bound > 0 else { return .zero }
        return Self.duration(Double.random(in: 0...bound, using: &generator))
    }

    /// ``nextDelay(using:)`` with the system's random number generator.
    public mutating func nextDelay() -> Duration {
        var generator = SystemRandomNumberGenerator()
        return nextDelay(using: &generator)
    }

    /// Counts a failure whose wait the caller chose itself (a `Retry-After`, the cap after a credentials error).
    public mutating func recordFailure() {
        failures = failures == Int.max ? failures : failures + 1
    }

    /// Forgets the failures: the next wait starts from ``initial`` again.
    public mutating func reset() {
        failures = 0
    }

    static func seconds(_ duration: Duration) -> Double {
        duration / .seconds(1)
    }

    static func duration(_ seconds: Double) -> Duration {
        guard seconds.isFinite, seconds > 0 else { return .zero }
        return .nanoseconds(Int64(min(seconds, 1e9) * 1e9))
    }
}

/// The `Retry-After` header of RFC 9110 §10.2.3: a number of seconds or an HTTP-date.
public enum RetryAfter {
    /// How long a `Retry-After` value asks the client to wait.
    ///
    /// This is what the ingest asked, nothing more: the uploader never waits less than its own backoff, so that an answer
    /// of zero (or a date already past) cannot make it send the same batch again at once, forever.
    ///
    /// - Parameters:
    ///   - value: The header's value: delta-seconds (`120`) or an HTTP-date in any of the three forms recipients must accept
    ///     (`Sun, 06 Nov 1994 08:49:37 GMT`, `Sunday, 06-Nov-94 08:49:37 GMT`, `Sun Nov  6 08:49:37 1994`).
    ///   - now: The current time, for a date when the answer carries no readable `Date` header.
    ///   - responseDate: The answer's `Date` header. A date is measured against it when it can be read: the ingest wrote
    ///     both with its own clock, while this box's clock may be years off (no RTC, no NTP yet).
    /// - Returns: The wait (zero for a date in the past), or nil when the value is neither form. Delta-seconds are read
    ///   whatever their leading zeros, and saturate at `Int64.max` seconds rather than wrap or shrink.
    public static func delay(_ value: String, now: Date = Date(), responseDate: String? = nil) -> Duration? {
        let trimmed = value.trimmingWhitespace()
        guard !trimmed.isEmpty else { return nil }
        if trimmed.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) {
            return .seconds(deltaSeconds(trimmed.utf8))
        }
        guard let date = httpDate(trimmed) else { return nil }
        let reference = responseDate.flatMap { httpDate($0.trimmingWhitespace()) } ?? now.timeIntervalSince1970
        let seconds = date - reference
        return seconds > 0 ? Backoff.duration(seconds) : .zero
    }

    /// The value of a run of ASCII digits, saturating at `Int64.max` (the caller caps the wait anyway).
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

    /// Seconds since 1970 for an HTTP-date, or nil.
    static func httpDate(_ text: String) -> Double? {
        let tokens = text.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        let day: Int?, month: Int?, year: Int?, time: String
        if tokens.count == 6, tokens[0].hasSuffix(","), tokens[5] == "GMT" {
            // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
            (day, month, year, time) = (Int(tokens[1]), monthNumber(tokens[2]), Int(tokens[3]), tokens[4])
        } else if tokens.count == 4, tokens[0].hasSuffix(","), tokens[3] == "GMT" {
            // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
            let parts = tokens[1].split(separator: "-").map(String.init)
            guard parts.count == 3, let shortYear = Int(parts[2]), parts[2].count == 2 else { return nil }
            (day, month, year, time) = (Int(parts[0]), monthNumber(parts[1]), shortYear < 70 ? 2000 + shortYear : 1900 + shortYear, tokens[2])
        } else if tokens.count == 5 {
            // asctime: Sun Nov  6 08:49:37 1994
            (day, month, year, time) = (Int(tokens[2]), monthNumber(tokens[1]), Int(tokens[4]), tokens[3])
        } else {
            return nil
        }
        let clock = time.split(separator: ":").map { Int($0) }
        guard let day, let month, let year, (1...31).contains(day), (1900...9999).contains(year), clock.count == 3,
            let hour = clock[0], let minute = clock[1], let second = clock[2], (0..<24).contains(hour), (0..<60).contains(minute),
            (0...60).contains(second)
        else { return nil }
        let days = Int(RFC3339.days(fromCivil: Int64(year), Int64(month), Int64(day)))
        return Double(days * 86_400 + hour * 3600 + minute * 60 + second)
    }

    private static func monthNumber(_ name: String) -> Int? {
        months.firstIndex(of: name.lowercased()).map { $0 + 1 }
    }
}
