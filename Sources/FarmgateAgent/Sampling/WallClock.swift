import CLinux
import FarmgateWire
import Foundation

/// The site's wall clock, as readings are stamped with it.
///
/// Readings are stamped at millisecond precision: an EZO read takes 300–900 ms and a DS18B20 conversion 750 ms, so
/// microsecond digits would only be noise (and would cost bytes on a metered link).
public struct WallClock: Sendable {
    /// Whether to ask the kernel if the clock is synchronised (adjtimex). When false, every reading counts as synchronised.
    public var checkSynchronization: Bool

    public init(checkSynchronization: Bool = true) {
        self.checkSynchronization = checkSynchronization
    }

    /// Now, truncated to whole milliseconds.
    public func now() -> Timestamp {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        let milliseconds = Int64(spec.tv_sec) * 1000 + Int64(spec.tv_nsec) / 1_000_000
        return Timestamp(microseconds: milliseconds * 1000)
    }

    /// Whether the kernel considers the clock synchronised (NTP or an RTC has set it). Without an RTC, a Raspberry Pi
    /// boots with a wrong clock until NTP syncs; readings taken before that are flagged `clock_unsynchronized`.
    public func isSynchronized() -> Bool {
        guard checkSynchronization else { return true }
        return fg_clock_is_synchronized() != 0
    }
}
