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

    /// - Parameter failures: failures already counted (carried across a configuration reload).
    public init(initial: Duration, maximum: Duration, failures: Int = 0) {
        self.initial = max(.zero, initial)
        self.maximum = max(.zero, maximum)
        self.failures = max(0, failures)
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
