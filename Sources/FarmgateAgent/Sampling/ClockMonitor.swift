import FarmgateSupport
import FarmgateWire
import Logging
import Metrics
import ServiceLifecycle
import Synchronization

/// What the ``ClockMonitor`` tells about the clock: the site buffer.
public protocol ClockObserver: Sendable {
    /// Takes in what the clock says now; returns what was corrected when the clock was newly found synchronised. With
    /// `repair` false a repair that is due is only started (what it has to correct is held), not run.
    func observeClock(_ observation: ClockObservation, repair: Bool) async throws -> ClockCorrection?
}

extension ReadingBuffer: ClockObserver {}

/// The clock as `farmgate status` shows it.
public struct ClockStatus: Codable, Sendable, Hashable {
    /// Whether the kernel says the clock is synchronised (or `[clock] check` is off).
    public var synchronized: Bool
    /// The kernel's boot id this agent runs in.
    public var bootID: String
    /// `[clock] hold_unsynchronized` in seconds.
    public var holdSeconds: Double
    /// How long the current state (synchronised or not) has lasted, by the boot clock (the wall clock may have jumped),
    /// as of the last poll; counted from the agent's start at the latest.
    public var stateSeconds: Double = 0
    /// The last time readings were corrected, in this process.
    public var lastCorrection: Correction?
    /// Readings corrected in this process, all corrections together (nil from an agent before it was counted).
    public var correctedTotal: Int?

    public struct Correction: Codable, Sendable, Hashable {
        /// When (the synchronised clock).
        public var at: Timestamp
        public var corrected: Int
        /// Readings moved by a millisecond or more because their repaired time was taken.
        public var shifted: Int
        /// How far the clock jumped when it was set (positive: forward), seconds; nil when the monitor never saw it unset.
        public var stepSeconds: Double?
    }
}

/// Watches the kernel's clock state and tells the buffer, so that readings taken before the clock was set are held, and
/// repaired once it is (see ``ReadingBuffer/observeClock(_:)``).
///
/// Polls the ``ClockSource`` every `pollInterval` (1 s) on a thread of its own: the test hook's file is read there, never on
/// the concurrency pool. adjtimex itself never blocks. A Service: it stops on graceful shutdown.
///
/// **Metrics**: `farmgate_clock_synchronized` (gauge, 1 or 0) and `farmgate_clock_corrected_readings_total`.
public final class ClockMonitor: Service {
    private let source: any ClockSource
    private let observer: any ClockObserver
    private let hold: Duration
    private let pollInterval: Duration
    private let logger: Logger
    private let thread = DedicatedThread(name: "farmgate-clock")
    /// What the monitor knows between polls; a reload's new monitor starts from the old one's (``carriedState()``).
    public struct State: Sendable {
        var status: ClockStatus?
        var unsynchronizedEpoch: Int64?
        /// CLOCK_BOOTTIME (µs) when the current state began.
        var stateStart: Int64
    }

    private let state: Mutex<State>
    /// Whether the last observation failed: a failing buffer is reported once, not every second.
    private let failing = Mutex(false)
    private let synchronizedGauge = Gauge(label: "farmgate_clock_synchronized")
    private let correctedCounter = Counter(label: "farmgate_clock_corrected_readings_total")

    /// - Parameters:
    ///   - source: the clocks.
    ///   - observer: the site buffer.
    ///   - hold: `[clock] hold_unsynchronized`.
    ///   - pollInterval: how often the clock state is read.
    public init(
        source: any ClockSource, observer: any ClockObserver, hold: Duration, pollInterval: Duration = .seconds(1), logger: Logger,
        carrying: State? = nil
    ) {
        self.source = source
        self.observer = observer
        self.hold = hold
        self.pollInterval = pollInterval
        self.logger = logger
        self.state = Mutex(carrying ?? State(status: nil, unsynchronizedEpoch: nil, stateStart: 0))
    }

    /// What a reload's next monitor starts from (`carrying`).
    public func carriedState() -> State {
        state.withLock { $0 }
    }

    /// The clock's state at the last poll; nil before the first.
    public func status() -> ClockStatus? {
        state.withLock { $0.status }
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                await self.poll()
                do { try await Task.sleep(for: self.pollInterval) } catch { return }
            }
        }
    }

    /// Reads the clock once and tells the buffer. The runtime calls it once before the uploader starts, so that nothing of
    /// this boot goes out before the hold applies; with `repair` false (that first call), a repair of the buffer's readings
    /// is started but left to the next poll, so that the agent is ready, and commits, while it runs.
    public func poll(repair: Bool = true) async {
        let source = self.source
        let reading: ClockReading
        do {
            reading = try await thread.run {
                source.refresh()
                return source.read()
            }
        } catch {
            return  // the thread is shutting down with the monitor
        }
        let correction: ClockCorrection?
        do {
            correction = try await observer.observeClock(ClockObservation(reading: reading, hold: hold), repair: repair)
        } catch {
            if !failing.withLock({ $0 }) {
                logger.error("Cannot tell the buffer the clock's state; retrying every poll", metadata: ["error": "\(error)"])
            }
            failing.withLock { $0 = true }
            return
        }
        if failing.withLock({ $0 }) {
            logger.info("The buffer takes the clock's state again")
            failing.withLock { $0 = false }
        }
        record(reading, correction: correction)
    }

    private func record(_ reading: ClockReading, correction: ClockCorrection?) {
        let holdSeconds = Double(hold.components.seconds) + Double(hold.components.attoseconds) / 1e18
        let (previous, step) = state.withLock { state -> (ClockStatus?, Double?) in
            let previous = state.status
            var status = previous ?? ClockStatus(synchronized: reading.synchronized, bootID: reading.bootID, holdSeconds: holdSeconds)
            if previous?.synchronized != reading.synchronized || previous?.bootID != reading.bootID { state.stateStart = reading.boottime }
            status.stateSeconds = Double(max(0, reading.boottime - state.stateStart)) / 1e6
            status.synchronized = reading.synchronized
            status.bootID = reading.bootID
            var step: Double?
            if reading.synchronized {
                if let before = state.unsynchronizedEpoch { step = Double(reading.bootEpochMicroseconds - before) / 1e6 }
                state.unsynchronizedEpoch = nil
            } else {
                state.unsynchronizedEpoch = reading.bootEpochMicroseconds
            }
            if let correction, correction.corrected > 0 {
                status.lastCorrection = ClockStatus.Correction(
                    at: reading.realtime, corrected: correction.corrected, shifted: correction.shifted, stepSeconds: step)
                status.correctedTotal = (status.correctedTotal ?? 0) + correction.corrected
            }
            state.status = status
            return (previous, step)
        }
        synchronizedGauge.record(reading.synchronized ? 1 : 0)
        if let correction, correction.corrected > 0 { correctedCounter.increment(by: Int64(correction.corrected)) }
        let metadata: Logger.Metadata = ["clock.boot_id": "\(reading.bootID)", "clock.now": "\(reading.realtime)"]
        if let correction, correction.corrected > 0 {
            var details = metadata
            details["clock.corrected"] = "\(correction.corrected)"
            details["clock.shifted"] = "\(correction.shifted)"
            if let step { details["clock.step_seconds"] = "\(step)" }
            logger.notice("Clock synchronised; corrected the times of the readings taken before, in this boot", metadata: details)
        } else if reading.synchronized, previous?.synchronized == false {
            logger.notice("Clock synchronised", metadata: metadata)
        } else if !reading.synchronized, previous?.synchronized != false {
            var details = metadata
            details["clock.hold"] = "\(hold)"
            // With `hold_unsynchronized = "0s"` nothing is held: readings go at once, flagged, and only those still
            // waiting in the buffer when the clock is set get their time corrected.
            let held = hold > .zero
            logger.warning(
                previous == nil
                    ? (held
                        ? "Clock not synchronised: readings are flagged clock_unsynchronized, held back, and corrected once NTP sets the clock"
                        : "Clock not synchronised: readings are flagged clock_unsynchronized and sent at once (hold_unsynchronized is 0); those still buffered when NTP sets the clock are corrected")
                    : (held
                        ? "Clock lost synchronisation: readings are flagged clock_unsynchronized and held back again"
                        : "Clock lost synchronisation: readings are flagged clock_unsynchronized again (sent at once: hold_unsynchronized is 0)"),
                metadata: details)
        }
    }
}
