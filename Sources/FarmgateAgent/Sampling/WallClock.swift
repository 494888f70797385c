import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging

/// The site's wall clock, as readings are stamped with it.
///
/// Readings are stamped at millisecond precision: an EZO read takes 300–900 ms and a DS18B20 conversion 750 ms, so
/// microsecond digits would only be noise (and would cost bytes on a metered link).
///
/// A reading taken while the kernel says the clock is not synchronised (a Raspberry Pi without RTC after boot) is flagged
/// `clock_unsynchronized` and carries a ``BootStamp``: the boot id and CLOCK_BOOTTIME, from which the buffer repairs its
/// time once the clock is set (see ``ClockMonitor``).
public struct WallClock: Sendable {
    /// Whether to ask the kernel if the clock is synchronised (adjtimex). When false, every reading counts as synchronised.
    public var checkSynchronization: Bool
    /// Where the time comes from: the kernel's clocks, or a test's.
    public let source: any ClockSource

    /// - Parameters:
    ///   - checkSynchronization: `[clock] check`.
    ///   - source: the clocks; nil for the kernel's (reads the boot id from procfs, which never waits on a device).
    public init(checkSynchronization: Bool = true, source: (any ClockSource)? = nil) {
        self.checkSynchronization = checkSynchronization
        self.source =
            source
            ?? SystemClockSource(
                checkSynchronization: checkSynchronization, logger: .init(label: "farmgate.clock") { _ in SwiftLogNoOpLogHandler() })
    }

    /// What a reading taken now is stamped with.
    public func stamp() -> ClockStamp {
        let reading = source.read()
        let synchronized = !checkSynchronization || reading.synchronized
        let timestamp = Self.wholeMilliseconds(reading.realtime.microseconds)
        // The boot time of the stamped millisecond, not of the instant read: timestamp − boottime is then the clocks'
        // exact offset, which the buffer keeps per run of readings, and a repair gives the true time of that millisecond.
        let truncated = reading.realtime.microseconds &- timestamp.microseconds
        return ClockStamp(
            timestamp: timestamp, synchronized: synchronized,
            boot: synchronized ? nil : BootStamp(bootID: reading.bootID, boottime: reading.boottime &- truncated))
    }

    /// Now, truncated to whole milliseconds.
    public func now() -> Timestamp { Self.wholeMilliseconds(source.read().realtime.microseconds) }

    /// Whether the kernel considers the clock synchronised (NTP or an RTC has set it). Without an RTC, a Raspberry Pi
    /// boots with a wrong clock until NTP syncs; readings taken before that are flagged `clock_unsynchronized`.
    public func isSynchronized() -> Bool {
        guard checkSynchronization else { return true }
        return source.read().synchronized
    }

    /// `microseconds` rounded down to a whole millisecond (also before 1970).
    static func wholeMilliseconds(_ microseconds: Int64) -> Timestamp {
        var milliseconds = microseconds / 1000
        if microseconds % 1000 < 0 { milliseconds -= 1 }
        return Timestamp(microseconds: milliseconds * 1000)
    }
}

/// What a reading is stamped with: its time, and, while the clock is not synchronised, what repairs that time later.
public struct ClockStamp: Hashable, Sendable {
    public var timestamp: Timestamp
    public var synchronized: Bool
    /// Set only when not ``synchronized``.
    public var boot: BootStamp?
}

/// The boot a reading was taken in and CLOCK_BOOTTIME when it was: once the clock is synchronised in the same boot, its true
/// time is `boottime + (realtime − boottime at synchronisation)`.
public struct BootStamp: Hashable, Sendable {
    /// `/proc/sys/kernel/random/boot_id`.
    public var bootID: String
    /// Microseconds since boot (CLOCK_BOOTTIME).
    public var boottime: Int64

    public init(bootID: String, boottime: Int64) {
        self.bootID = bootID
        self.boottime = boottime
    }
}
