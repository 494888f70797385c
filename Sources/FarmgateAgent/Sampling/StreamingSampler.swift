import FarmgateSupport
import FarmgateWire
import Logging
import ServiceLifecycle

/// A value a streaming driver saw happen, and how long ago (relative to the end of the ``StreamingSensorDriver/poll()``
/// that returned it), so that it is stored at the time it happened rather than at the time it was collected.
public struct StreamedValue: Sendable, Hashable {
    public var value: SensorValue
    /// How long before the end of the poll it happened (never negative).
    public var age: Duration

    public init(_ value: SensorValue, age: Duration) {
        self.value = value
        self.age = max(age, .zero)
    }
}

/// What a streaming driver has to say at one poll.
public struct StreamedUpdate: Sendable, Hashable {
    /// Every value that happened since the previous poll, oldest first. None is ever dropped between polls.
    public var values: [StreamedValue]
    /// The settled value now, stored as a heartbeat when nothing was stored for the sensor's `heartbeat`; nil while the
    /// value is settling (a change still inside its debounce time), so that a heartbeat never contradicts a change
    /// about to be reported with an earlier time.
    public var current: SensorValue?

    public init(values: [StreamedValue] = [], current: SensorValue?) {
        self.values = values
        self.current = current
    }
}

/// A sensor that reports what happens when it happens (a float switch's every debounced change, with the kernel's
/// event time) instead of being read on an interval. Such sensors are run by the ``StreamingSampler`` instead of the
/// ``Sampler``; ``SensorDriver/read()`` still answers one-off reads (`farmgate sensor read`).
public protocol StreamingSensorDriver: SensorDriver {
    /// Whether this configured sensor streams: one driver type may stream some quantities and be read for others
    /// (a GPIO switch streams, a GPIO flow meter is read per interval).
    var streams: Bool { get }
    /// What happened since the previous call. Must not block: the sampler calls it every ``StreamingSampler/pollInterval``.
    func poll() async throws(SensorError) -> StreamedUpdate
}

/// Runs the streaming sensors beside the ``Sampler``: polls each every ``pollInterval`` and appends every value it
/// reports to the same sink (the buffer), stamped with the time it happened, plus a heartbeat of the current value
/// when nothing was stored for the sensor's `heartbeat`. It updates the same ``SensorStatusBoard`` (a failure is
/// counted there once per the sensor's `interval` while it lasts; `interval` plays no other part for these sensors).
///
/// Polling is only how values are collected: the driver keeps every value between polls (a GPIO line's watcher thread
/// sees each edge as it happens), so a change shorter than the poll interval is stored all the same, at its own time.
public final class StreamingSampler: Service {
    public struct Sensor: Sendable {
        public var configuration: SensorConfiguration
        public var driver: any StreamingSensorDriver

        public init(configuration: SensorConfiguration, driver: any StreamingSensorDriver) {
            self.configuration = configuration
            self.driver = driver
        }
    }

    /// How often each sensor is asked what happened: the delay between a change and its storage, not a sampling rate.
    public static let pollInterval: Duration = .milliseconds(100)

    private let sensors: [Sensor]
    private let sink: any SampleSink
    private let board: SensorStatusBoard
    private let clock: WallClock
    private let logger: Logger
    private let pollInterval: Duration

    public init(
        sensors: [Sensor], sink: any SampleSink, board: SensorStatusBoard, clock: WallClock, logger: Logger,
        pollInterval: Duration = StreamingSampler.pollInterval
    ) {
        self.sensors = sensors
        self.sink = sink
        self.board = board
        self.clock = clock
        self.logger = logger
        self.pollInterval = pollInterval
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                for sensor in self.sensors {
                    group.addTask { await self.loop(sensor) }
                }
                await group.waitForAll()
            }
        }
        for sensor in sensors { await sensor.driver.close() }
    }

    private func loop(_ sensor: Sensor) async {
        var gate = HeartbeatGate()
        var tick = ContinuousClock.now
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            await pollOnce(sensor, gate: &gate)
            tick += pollInterval
            let now = ContinuousClock.now
            if tick < now { tick = now }
            do { try await Task.sleep(until: tick, clock: .continuous) } catch { break }
        }
        // One last poll, so that a change seen just before the stop is stored too.
        await pollOnce(sensor, gate: &gate)
    }

    /// When the sensor last stored a value and whether it is failing, across polls.
    struct HeartbeatGate {
        var lastStored: ContinuousClock.Instant?
        var failing = false
        /// When a failure was last counted on the status board: once per `interval` while it lasts, not once per poll.
        var lastFailureRecorded: ContinuousClock.Instant?
    }

    /// Collects what `sensor` reports and stores it.
    func pollOnce(_ sensor: Sensor, gate: inout HeartbeatGate) async {
        let configuration = sensor.configuration
        let update: StreamedUpdate
        do throws(SensorError) {
            update = try await sensor.driver.poll()
        } catch {
            let now = ContinuousClock.now
            if !gate.failing || gate.lastFailureRecorded.map({ now - $0 >= configuration.interval }) ?? true {
                board.recordFailure(configuration.id, error: error, at: clock.now())
                gate.lastFailureRecorded = now
            }
            if !gate.failing {
                logger.warning(
                    "Sensor failed", metadata: ["sensor": "\(configuration.id)", "error": "\(error)", "driver": "\(configuration.driver)"])
            }
            gate.failing = true
            return
        }
        let recovered = gate.failing
        if recovered { logger.info("Sensor is back", metadata: ["sensor": "\(configuration.id)"]) }
        gate.failing = false
        gate.lastFailureRecorded = nil
        // One clock reading for the whole update: the values keep their spacing exactly.
        let clocks = clock.source.read()
        let synchronized = !clock.checkSynchronization || clocks.synchronized
        var samples: [Sample] = []
        for streamed in update.values {
            samples.append(sample(configuration, streamed.value, age: streamed.age, clocks: clocks, synchronized: synchronized))
        }
        let now = ContinuousClock.now
        // A sensor that is back (a replugged GPIO chip) has its state stored at once, not at the next change or
        // heartbeat: until a value is recorded the status board still shows it failing.
        if samples.isEmpty, let current = update.current,
            recovered || gate.lastStored.map({ now - $0 >= configuration.heartbeat }) ?? true
        {
            var heartbeat = sample(configuration, current, age: .zero, clocks: clocks, synchronized: synchronized)
            if gate.lastStored != nil, !recovered { heartbeat.quality.insert(.heartbeat) }
            samples.append(heartbeat)
        }
        guard !samples.isEmpty else { return }
        gate.lastStored = now
        for sample in samples {
            board.recordSuccess(configuration.id, value: sample.value, at: sample.timestamp, stored: true)
        }
        do {
            try await sink.append(samples)
        } catch {
            logger.error("Buffer refused a sample", metadata: ["sensor": "\(configuration.id)", "error": "\(error)"])
        }
    }

    private func sample(
        _ configuration: SensorConfiguration, _ value: SensorValue, age: Duration, clocks: ClockReading, synchronized: Bool
    ) -> Sample {
        let ageMicroseconds = age.wholeMicroseconds
        var quality = value.quality
        if !synchronized { quality.insert(.clockUnsynchronized) }
        if let expected = configuration.expectedRange, !expected.contains(value.value) { quality.insert(.outOfRange) }
        return Sample(
            sensor: configuration.id, timestamp: Timestamp(microseconds: clocks.realtime.microseconds - ageMicroseconds),
            value: value.value, quality: quality,
            boot: synchronized ? nil : BootStamp(bootID: clocks.bootID, boottime: clocks.boottime - ageMicroseconds))
    }
}
