import CLinux
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
import Logging
import Synchronization

/// The clocks at one instant: what a reading is stamped with, and what repairs its time later.
public struct ClockReading: Hashable, Sendable {
    /// The wall clock (CLOCK_REALTIME), in microseconds. Wrong until the clock is synchronised on a box without an RTC.
    public var realtime: Timestamp
    /// Microseconds since boot (CLOCK_BOOTTIME): monotonic, never set by NTP or by hand, counts through suspend.
    public var boottime: Int64
    /// Whether the kernel says the wall clock is synchronised (adjtimex).
    public var synchronized: Bool
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): boot times compare only within one boot.
    public var bootID: String

    public init(realtime: Timestamp, boottime: Int64, synchronized: Bool, bootID: String) {
        self.realtime = realtime
        self.boottime = boottime
        self.synchronized = synchronized
        self.bootID = bootID
    }

    /// realtime − boottime: the wall-clock time of the boot. Once the clock is synchronised, a reading's boot time plus this
    /// is its true time.
    public var bootEpochMicroseconds: Int64 { realtime.microseconds &- boottime }
}

/// Where the agent learns the time and whether the kernel trusts it. ``SystemClockSource`` is the real one; tests inject
/// their own to play a boot with an unset clock and the moment NTP sets it.
public protocol ClockSource: Sendable {
    /// The clocks now. Never blocks: the sampler calls it for every reading.
    func read() -> ClockReading
    /// Re-reads whatever ``read()`` caches (the test hook's file). May block on file I/O: the ``ClockMonitor`` calls it on a
    /// thread of its own about once a second. The default does nothing.
    func refresh()
}

extension ClockSource {
    public func refresh() {}
}

/// The kernel's clocks: CLOCK_REALTIME, CLOCK_BOOTTIME, adjtimex's synchronised state and the boot id.
///
/// **Test hook.** When the environment variable `FARMGATE_TEST_CLOCK_FILE` names a file, the synchronised state and an
/// offset added to the wall clock come from that file instead of the kernel, so that an end-to-end test can run the real
/// agent on a clock three days behind and then "synchronise" it:
///
/// ```json
/// {"synchronized": false, "offset_seconds": -259200}
/// ```
///
/// `offset_seconds` (default 0) is added to CLOCK_REALTIME; `boot_id` (optional) replaces the kernel's boot id, to play a
/// reboot. The file is re-read about once a second (by ``refresh()``); while it cannot be read or parsed the last good
/// state is kept and the problem is logged. Unset (always, outside tests), the variable changes nothing.
public final class SystemClockSource: ClockSource {
    /// The environment variable that names the test hook's file. A test hook only: never set it on a real site.
    public static let testHookVariable = "FARMGATE_TEST_CLOCK_FILE"

    /// What the test hook's file holds.
    struct HookState: Decodable, Equatable {
        var synchronized: Bool
        var offsetSeconds: Double?
        var bootID: String?

        enum CodingKeys: String, CodingKey {
            case synchronized
            case offsetSeconds = "offset_seconds"
            case bootID = "boot_id"
        }
    }

    /// The largest `offset_seconds` the test hook takes: a hundred years.
    static let maximumHookOffsetSeconds: Double = 100 * 366 * 86_400

    private let bootID: String
    private let checkSynchronization: Bool
    private let hookPath: String?
    private let hook: Mutex<(state: HookState, problem: String?)>
    private let logger: Logger

    /// Reads the boot id (and the test hook's file, if one is named). Blocking file reads: create it off the concurrency pool.
    ///
    /// - Parameters:
    ///   - checkSynchronization: `[clock] check`; when false every reading counts as synchronised.
    ///   - testHookPath: the value of ``testHookVariable``; nil outside tests.
    public init(checkSynchronization: Bool = true, testHookPath: String? = nil, logger: Logger) {
        self.checkSynchronization = checkSynchronization
        self.hookPath = testHookPath.flatMap { $0.isEmpty ? nil : $0 }
        self.logger = logger
        self.bootID = Self.kernelBootID(logger: logger)
        self.hook = Mutex((HookState(synchronized: false), nil))
        if let hookPath {
            logger.warning(
                "Test clock hook active: the clock state comes from a file, not the kernel (unset \(Self.testHookVariable) on a real site)",
                metadata: ["clock.hook": "\(hookPath)"])
            refresh()
        }
    }

    public func read() -> ClockReading {
        var realtime: Int64 = 0
        var boottime: Int64 = 0
        if fg_clock_pair_microseconds(&realtime, &boottime) != 0 {
            // Both clocks exist on every Linux since 2.6.39; keep stamping with Foundation's clock if they ever do not.
            realtime = Timestamp.now().microseconds
            boottime = 0
        }
        guard hookPath != nil else {
            let synchronized = !checkSynchronization || fg_clock_is_synchronized() != 0
            return ClockReading(
                realtime: Timestamp(microseconds: realtime), boottime: boottime, synchronized: synchronized, bootID: bootID)
        }
        let state = hook.withLock { $0.state }
        let offset = Int64(((state.offsetSeconds ?? 0) * 1_000_000).rounded())
        return ClockReading(
            realtime: Timestamp(microseconds: realtime &+ offset), boottime: boottime,
            synchronized: !checkSynchronization || state.synchronized, bootID: state.bootID ?? bootID)
    }

    public func refresh() {
        guard let hookPath else { return }
        var state: HookState?
        var problem: String?
        if let data = FileManager.default.contents(atPath: hookPath) {
            do {
                let decoded = try JSONDecoder().decode(HookState.self, from: data)
                if let offset = decoded.offsetSeconds, !(abs(offset) <= Self.maximumHookOffsetSeconds) {
                    problem = "offset_seconds must be a number of seconds within ±100 years (got \(offset))"
                } else {
                    state = decoded
                }
            } catch {
                problem = "not {\"synchronized\": true|false, \"offset_seconds\": N}: \(error)"
            }
        } else {
            problem = "cannot read the file"
        }
        let report = hook.withLock { hook -> String? in
            if let state { hook.state = state }
            defer { hook.problem = problem }
            return hook.problem == problem ? nil : problem
        }
        if let report {
            logger.error("Test clock hook file is unusable; keeping its last state", metadata: ["clock.hook": "\(hookPath)", "error": "\(report)"])
        }
    }

    /// The kernel's boot id. Without one (not Linux), a random id per process: readings of an earlier run are then never
    /// corrected, only sent flagged, which is the safe side.
    private static func kernelBootID(logger: Logger) -> String {
        let path = "/proc/sys/kernel/random/boot_id"
        if let data = FileManager.default.contents(atPath: path) {
            let text = String(decoding: data, as: UTF8.self).trimmingWhitespace()
            if !text.isEmpty { return text }
        }
        let fallback = UUID().uuidString.lowercased()
        logger.warning(
            "Cannot read the kernel's boot id; readings taken before the clock is set can only be corrected while this process runs",
            metadata: ["clock.boot_id_path": "\(path)", "clock.boot_id": "\(fallback)"])
        return fallback
    }
}
