import FarmgateSupport
import FarmgateWire
import Logging
import ServiceLifecycle
import Synchronization

/// Where the sampler puts what it read: the site buffer (or a test's collector).
public protocol SampleSink: Sendable {
    func append(_ samples: [Sample]) async throws
}

/// Reads every sensor on its own interval and hands the values to the buffer.
///
/// Each sensor runs in its own child task, scheduled on absolute ticks of a monotonic clock (a slow read delays that
/// sensor's next reading, it never shifts its schedule), with sensors staggered across their interval on up to four
/// phases (see ``phaseSlots(_:)``) so that reads and commits are spread out. A failing sensor never stops the others.
///
/// The sampler stays responsive whatever a driver does: a read that takes longer than the sensor's interval (at least
/// 5 s) is abandoned, not awaited. It runs on to its end in a task of its own and its result is ignored; the sensor
/// reports `timeout`, and while that read is still running no new one is started (the sensor reports that instead of
/// piling up blocked threads). At shutdown the loops stop at once, except that a read in flight is given up to
/// ``stoppingReadGrace`` to finish and its value is stored (a read has effects that cannot be taken back: a pulse
/// count stored beside the buffer, an EZO circuit's answer consumed), sensors whose driver accumulates between reads
/// (``SensorDriver/readsAtStop``: GPIO pulse counts and flow meters) are read and stored once more, and closing the
/// drivers is awaited at most `closeTimeout`: a driver stuck in a read cannot hold the agent's stop. With no sensor to
/// poll (a site of GPIO switches only) the sampler runs until the agent stops.
public final class Sampler: Service {
    public struct Sensor: Sendable {
        public var configuration: SensorConfiguration
        public var driver: any SensorDriver
        /// Keeps one read of this sensor in flight at a time (shared by the sampler and `farmgate sensor read`).
        let gate = ReadGate()

        public init(configuration: SensorConfiguration, driver: any SensorDriver) {
            self.configuration = configuration
            self.driver = driver
        }

        /// The longest a read may take before it is abandoned: the sensor's interval, at least 5 s, plus the driver's
        /// ``SensorDriver/setupAllowance``.
        public var readTimeout: Duration { max(configuration.interval, .seconds(5)) + driver.setupAllowance }

        /// Reads once, bounded by ``readTimeout``, without storing anything (the installer's test read).
        public func readOnce() async -> Result<SensorValue, SensorError> {
            await Sampler.read(driver, timeout: readTimeout, gate: gate)
        }

        /// The sampler's read (``SensorDriver/scheduledRead()``), bounded as ``readOnce()``: nil when it gave no reading.
        func scheduledReadOnce() async -> Result<SensorValue?, SensorError> {
            let driver = self.driver
            return await Sampler.bounded(timeout: readTimeout, gate: gate) { () async throws(SensorError) -> SensorValue? in
                try await driver.scheduledRead()
            }
        }
    }

    let sensors: [Sensor]
    private let sink: any SampleSink
    private let board: SensorStatusBoard
    private let clock: WallClock
    private let logger: Logger
    /// How long shutdown waits for the drivers to close (a driver stuck in a read may never close).
    let closeTimeout: Duration
    /// Liveness for the systemd watchdog: one key per sensor loop, beaten each time round (see ``Heartbeat``).
    public let heartbeat = Heartbeat(component: "sampler")
    /// Sensors being calibrated (`farmgate calibrate`): their readings carry `calibrating`.
    public let calibrating = CalibrationFlags()
    /// When the sampler itself was late (the process stopped or not scheduled), so that reads skipped over it are not
    /// blamed on the sensors.
    let stalls = SamplerStalls()

    public init(
        sensors: [Sensor], sink: any SampleSink, board: SensorStatusBoard, clock: WallClock, closeTimeout: Duration = .seconds(3),
        logger: Logger
    ) {
        self.sensors = sensors
        self.sink = sink
        self.board = board
        self.clock = clock
        self.closeTimeout = closeTimeout
        self.logger = logger
    }

    /// The sensor with `id`, for a read on the installer's request.
    public func sensor(_ id: SensorID) -> Sensor? {
        sensors.first { $0.configuration.id == id }
    }

    public func run() async throws {
        let start = ContinuousClock.now
        heartbeat.start()
        await cancelWhenGracefulShutdown {
            // A site whose sensors all stream (only GPIO switches) has nothing to poll: the sampler still runs until the
            // agent stops, as a service that returned early would stop the whole agent.
            guard !self.sensors.isEmpty else {
                while !Task.isCancelled { try? await Task.sleep(for: .seconds(3600)) }
                return
            }
            await withTaskGroup(of: Void.self) { group in
                let slots = Self.phaseSlots(self.sensors.count)
                let assigned = Self.phases(self.sensors.map(\.configuration))
                for (sensor, slot) in zip(self.sensors, assigned) {
                    let phase = sensor.configuration.interval * Double(slot) / Double(slots)
                    group.addTask { await self.loop(sensor, firstTick: start + phase) }
                }
                await group.waitForAll()
            }
        }
        await readAtStop()
        let sensors = self.sensors
        // The sensors whose driver has not closed yet: the ones a warning names (not those busy reading, which may
        // have closed while another one hangs).
        let closing = Pending(sensors.map(\.configuration.id.rawValue))
        let closed: Bool? = await withDeadline(closeTimeout, graceOnCancel: closeTimeout) {
            await withTaskGroup(of: Void.self) { group in
                for sensor in sensors {
                    group.addTask {
                        await sensor.driver.close()
                        closing.done(sensor.configuration.id.rawValue)
                    }
                }
                await group.waitForAll()
                return true
            }
        }
        if closed == nil {
            logger.warning(
                "Drivers did not close in time; leaving them to the process exit",
                metadata: ["timeout": "\(closeTimeout)", "stuck": "\(closing.left.joined(separator: ","))"])
        }
    }

    /// Reads once more, and stores, every sensor whose driver accumulates between reads (``SensorDriver/readsAtStop``):
    /// a pulse count or flow meter stopped by SIGTERM or a reload would otherwise lose the pulses since its last read.
    /// Skipped when the agent is cancelled rather than stopped gracefully.
    func readAtStop() async {
        let finals = sensors.filter(\.driver.readsAtStop)
        guard !finals.isEmpty, !Task.isCancelled else { return }
        await withTaskGroup(of: Void.self) { group in
            for sensor in finals {
                group.addTask {
                    var gate = Deadband(deadband: 0, heartbeat: sensor.configuration.heartbeat)
                    await self.sampleOnce(sensor, gate: &gate, atStop: true)
                }
            }
            await group.waitForAll()
        }
    }

    /// How long a read in flight when the sampler stops may still take to be stored (bounded by its own timeout):
    /// longer than an EZO circuit's slowest read (900 ms for pH), short against systemd's stop timeout.
    static let stoppingReadGrace: Duration = .milliseconds(1_500)

    /// Sensors start on this many phases of their interval (sensor `i` on phase `i % slots`): spread enough that reads
    /// do not all fall together, few enough that sensors sharing a phase wake together. Every wake-up costs the process
    /// a few context switches, which were most of the agent's CPU at 50 sensors and 1 Hz: with a phase per sensor about
    /// 275 switches a second and 2.5 % of a core, with 10 phases 101 and 1.3 %, with 4 phases 61 and 1.1 %. Readings
    /// are committed by the buffer's group commit whatever their phase, and a bus still reads its sensors one at a time.
    static func phaseSlots(_ sensors: Int) -> Int { max(1, min(sensors, 4)) }

    /// The phase slot of each sensor: sensor `i` on `i % slots`, except that sensors on one port (an EC circuit's
    /// outputs, a Modbus bus's slaves) share the first one's, so that they wake together and one reading of the
    /// circuit, or one request for adjacent registers, serves them all.
    static func phases(_ sensors: [SensorConfiguration]) -> [Int] {
        let slots = phaseSlots(sensors.count)
        var slotOfPort: [String: Int] = [:]
        return sensors.enumerated().map { index, sensor in
            guard let port = try? sensor.options.string("port") else { return index % slots }
            let slot = slotOfPort[port] ?? index % slots
            slotOfPort[port] = slot
            return slot
        }
    }

    private func loop(_ sensor: Sensor, firstTick: ContinuousClock.Instant) async {
        let configuration = sensor.configuration
        var gate = Deadband(deadband: configuration.deadband, heartbeat: configuration.heartbeat)
        var tick = firstTick
        var skips = SkippedReadWarning()
        var firstRead = true  // the first read is still to come
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            // Back by the next tick plus the longest read (sampleOnce's timeout); a read that ignores its timeout is stuck.
            heartbeat.beat("\(configuration.id)", within: ContinuousClock.now.duration(to: tick) + sensor.readTimeout)
            do {
                // The shared timer: sensors on one phase wake together, from one timer wake-up.
                try await SharedTimer.shared.sleep(until: tick)
            } catch {
                return
            }
            let due = tick
            stalls.woke(due: due, at: ContinuousClock.now, interval: configuration.interval)
            await sampleOnce(sensor, gate: &gate)
            // Next tick on the sensor's grid; skip ticks that a slow read already missed, and say so: counted in
            // `farmgate status` and the metrics, logged at most every few minutes. Not for the first read, which
            // sets the device up (an EZO circuit's initialisation takes 2–4 s): that is no sign of an interval too short.
            let now = ContinuousClock.now
            tick += configuration.interval
            defer { firstRead = false }
            if tick < now {
                let missed = ((now - tick) / configuration.interval).rounded(.up)
                tick += configuration.interval * missed
                if firstRead { continue }
                // Without the time the sampler itself was not running (this sensor, or another, woke long past its
                // tick: the process was stopped, SIGSTOP, or not scheduled), the read kept its interval: the sensor and
                // its bus are not to blame, and these are not reads that ran past their interval.
                if now - due - stalls.overlap(from: due, to: now) < configuration.interval {
                    if let stall = stalls.takeUnreported() {
                        logger.warning(
                            "Scheduled reads skipped: the agent was not running or was delayed (the process stopped, e.g. by SIGSTOP or a debugger, the machine suspended, or starved of CPU), not a slow sensor or bus",
                            metadata: [
                                "sensor": "\(configuration.id)", "delayed": "\(ConfigTable.format(stall))",
                                "interval": "\(ConfigTable.format(configuration.interval))",
                            ])
                    }
                    continue
                }
                let count = Int64(missed)
                board.recordSkipped(configuration.id, count: count)
                if let total = skips.record(count, at: now) {
                    logger.warning(
                        "Sensor reads take longer than its interval; scheduled reads skipped (sensors on one bus, such as Modbus, wait for each other: a slave that does not answer, or more sensors than the bus can read in the interval)",
                        metadata: [
                            "sensor": "\(configuration.id)", "driver": "\(configuration.driver)", "skipped": "\(total)",
                            "interval": "\(ConfigTable.format(configuration.interval))",
                        ])
                }
            }
        }
    }

    /// Reads `sensor` once and stores the value unless the deadband suppresses it.
    /// - Parameter atStop: the read the sampler takes as it stops (a failure then is logged, not counted against the sensor).
    func sampleOnce(_ sensor: Sensor, gate: inout Deadband, atStop: Bool = false) async {
        let configuration = sensor.configuration
        let outcome = await sensor.scheduledReadOnce()
        // A read abandoned because the agent is stopping is no failure of the sensor; one that finished is stored.
        if Task.isCancelled, case .failure = outcome { return }
        let stamp = clock.stamp()
        let now = stamp.timestamp
        switch outcome {
        case .success(nil):
            // The read only began what the next one measures (a flow meter's first window after a start): nothing to
            // store, and no failure.
            logger.debug("Sensor read began its measuring window; no reading yet", metadata: ["sensor": "\(configuration.id)"])
        case .failure(let error) where atStop:
            logger.info(
                "The last read before stopping failed; nothing stored for it",
                metadata: ["sensor": "\(configuration.id)", "error": "\(error)"])
        case .failure(let error):
            board.recordFailure(configuration.id, error: error, at: now)
            logger.warning(
                "Sensor read failed",
                metadata: ["sensor": "\(configuration.id)", "error": "\(error)", "driver": "\(configuration.driver)"])
        case .success(let reading?):
            var quality = reading.quality
            // Unsynchronised: flagged, and the boot stamp lets the buffer repair the time once the clock is set.
            if !stamp.synchronized { quality.insert(.clockUnsynchronized) }
            if let expected = configuration.expectedRange, !expected.contains(reading.value) { quality.insert(.outOfRange) }
            if calibrating.contains(configuration.id) { quality.insert(.calibrating) }
            let decision = gate.admit(reading.value, at: now)
            board.recordSuccess(configuration.id, value: reading.value, at: now, stored: decision != .suppress)
            guard decision != .suppress else { return }
            if decision == .heartbeat { quality.insert(.heartbeat) }
            do {
                try await sink.append([Sample(sensor: configuration.id, timestamp: now, value: reading.value, quality: quality, boot: stamp.boot)])
            } catch {
                logger.error("Buffer refused a sample", metadata: ["sensor": "\(configuration.id)", "error": "\(error)"])
            }
        }
    }

    /// Reads `driver` once, waiting at most `timeout`; when the calling task is cancelled, at most
    /// ``stoppingReadGrace`` more.
    ///
    /// The read runs in a task of its own: a driver that ignores cancellation or is blocked on a thread cannot hold the
    /// caller. An abandoned read runs on to its end and its result is dropped; until it ends, `gate` refuses a new one.
    static func read(_ driver: any SensorDriver, timeout: Duration, gate: ReadGate = ReadGate()) async -> Result<SensorValue, SensorError> {
        await bounded(timeout: timeout, gate: gate) { () async throws(SensorError) -> SensorValue in try await driver.read() }
    }

    /// Runs `read` (a driver's read) as ``read(_:timeout:gate:)`` runs the driver's ``SensorDriver/read()``.
    static func bounded<Value: Sendable>(
        timeout: Duration, gate: ReadGate, _ read: @escaping @Sendable () async throws(SensorError) -> Value
    ) async -> Result<Value, SensorError> {
        // A read in flight that is younger than the timeout is someone else's ordinary read (the installer's test read
        // beside the sampler's): wait for it. One older than that is stuck: report it rather than start another.
        var busySince = gate.enter()
        while let since = busySince, ContinuousClock.now - since < timeout, !Task.isCancelled {
            try? await Task.sleep(for: .milliseconds(10))
            busySince = gate.enter()
        }
        if let since = busySince {
            let elapsed = ContinuousClock.now - since
            let seconds = Int(elapsed / .seconds(1))
            return .failure(
                SensorError(
                    .timeout,
                    "the previous read (started \(seconds) s ago) has not finished; the driver is stuck on the device: check its wiring and power, or unplug and replug it"
                        + SensorError.stuckForGood(elapsed: elapsed, timeout: timeout)))
        }
        let outcome = await withDeadline(timeout, graceOnCancel: stoppingReadGrace) { () -> Result<Value, SensorError> in
            defer { gate.leave() }
            do throws(SensorError) { return .success(try await read()) } catch { return .failure(error) }
        }
        guard let outcome else {
            if Task.isCancelled { return .failure(SensorError(.timeout, "read cancelled (the agent is stopping)")) }
            return .failure(SensorError(.timeout, "no answer within \(ConfigTable.format(timeout)); the read was abandoned"))
        }
        return outcome
    }
}

/// When the sampler itself was late: a sensor's wake-up came long after its tick, because the process was not running
/// (stopped by SIGSTOP or a debugger, a suspended machine) or not scheduled. Every sensor wakes late then, at once; a
/// sensor whose read was in flight meanwhile sees only a long read, so the sensors share what they saw. Reads skipped
/// over such a time are the agent's delay, not its sensors' or buses', and one warning says so for all of them.
final class SamplerStalls: Sendable {
    /// A wake-up later than this (or than the sensor's interval, when that is shorter) is a stall, not scheduling noise.
    static let threshold: Duration = .milliseconds(500)

    private struct Stall {
        var from: ContinuousClock.Instant
        var to: ContinuousClock.Instant
        var reported = false
    }

    /// The latest stall: the wake-ups of one stop, seen by several sensors, make one.
    private let latest = Mutex<Stall?>(nil)

    /// A sensor's wake-up due at `due` came at `woke`.
    func woke(due: ContinuousClock.Instant, at woke: ContinuousClock.Instant, interval: Duration) {
        guard woke - due >= min(Self.threshold, interval) else { return }
        latest.withLock { latest in
            if var stall = latest, due <= stall.to, stall.from <= woke {
                stall.from = min(stall.from, due)
                stall.to = max(stall.to, woke)
                latest = stall
            } else {
                latest = Stall(from: due, to: woke)
            }
        }
    }

    /// How much of `from...to` the sampler was stalled.
    func overlap(from: ContinuousClock.Instant, to: ContinuousClock.Instant) -> Duration {
        latest.withLock { latest in
            guard let stall = latest else { return .zero }
            let start = max(from, stall.from), end = min(to, stall.to)
            return end > start ? start.duration(to: end) : .zero
        }
    }

    /// How long the latest stall lasted, the first time it is asked for (one warning for every sensor it delayed).
    func takeUnreported() -> Duration? {
        latest.withLock { latest in
            guard var stall = latest, !stall.reported else { return nil }
            stall.reported = true
            latest = stall
            return stall.from.duration(to: stall.to)
        }
    }
}

/// Rate-limits the warning about a sensor's skipped reads: the first skip is logged at once, later ones at most every
/// ``interval`` with how many were skipped since the last warning.
struct SkippedReadWarning {
    static let interval: Duration = .seconds(300)
    private var lastWarning: ContinuousClock.Instant?
    private var unreported: Int64 = 0

    /// Counts `count` skipped reads; returns how many to report when a warning is due.
    mutating func record(_ count: Int64, at now: ContinuousClock.Instant) -> Int64? {
        unreported += count
        if let lastWarning, now - lastWarning < Self.interval { return nil }
        lastWarning = now
        defer { unreported = 0 }
        return unreported
    }
}

/// Lets one read of a sensor run at a time, remembering when it started.
final class ReadGate: Sendable {
    private let started = Mutex<ContinuousClock.Instant?>(nil)

    /// Takes the gate; returns when the read in flight started if there is one (the gate is then not taken).
    func enter() -> ContinuousClock.Instant? {
        started.withLock { started in
            if let started { return started }
            started = .now
            return nil
        }
    }

    func leave() { started.withLock { $0 = nil } }

    var isBusy: Bool { started.withLock { $0 != nil } }
}

/// Suppresses values that have not moved by more than `deadband` since the last stored one, until `heartbeat` has passed.
/// With a deadband of 0 every value is stored (lossless).
struct Deadband {
    enum Decision: Equatable {
        case store
        case heartbeat
        case suppress
    }

    let deadband: Double
    let heartbeatMicroseconds: Int64
    private var last: (value: Double, time: Timestamp)?

    init(deadband: Double, heartbeat: Duration) {
        self.deadband = deadband
        self.heartbeatMicroseconds = heartbeat.wholeMicroseconds
    }

    mutating func admit(_ value: Double, at time: Timestamp) -> Decision {
        guard deadband > 0 else { return .store }
        guard let last else {
            self.last = (value, time)
            return .store
        }
        if abs(value - last.value) >= deadband {
            self.last = (value, time)
            return .store
        }
        if time.microseconds - last.time.microseconds >= heartbeatMicroseconds || time < last.time {
            self.last = (value, time)
            return .heartbeat
        }
        return .suppress
    }
}

/// The names of the jobs of a group that have not finished yet (the drivers still closing at a stop).
private final class Pending: Sendable {
    private let names: Mutex<Set<String>>
    init(_ names: [String]) { self.names = Mutex(Set(names)) }
    func done(_ name: String) { _ = names.withLock { $0.remove(name) } }
    var left: [String] { names.withLock { $0.sorted() } }
}
