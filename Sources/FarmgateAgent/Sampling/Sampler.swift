import FarmgateWire
import Logging
import ServiceLifecycle

/// Where the sampler puts what it read: the site buffer (or a test's collector).
public protocol SampleSink: Sendable {
    func append(_ samples: [Sample]) async throws
}

/// Reads every sensor on its own interval and hands the values to the buffer.
///
/// Each sensor runs in its own child task, scheduled on absolute ticks of a monotonic clock (a slow read delays that
/// sensor's next reading, it never shifts its schedule), with sensors of the same interval staggered across it so that
/// reads and commits are spread out. A read that takes longer than the sensor's interval (at least 5 s) is abandoned and
/// counted as a timeout. A failing sensor never stops the others.
public final class Sampler: Service {
    public struct Sensor: Sendable {
        public var configuration: SensorConfiguration
        public var driver: any SensorDriver

        public init(configuration: SensorConfiguration, driver: any SensorDriver) {
            self.configuration = configuration
            self.driver = driver
        }
    }

    private let sensors: [Sensor]
    private let sink: any SampleSink
    private let board: SensorStatusBoard
    private let clock: WallClock
    private let logger: Logger
    /// Sensors being calibrated (`farmgate calibrate`): their readings carry `calibrating`.
    public let calibrating = CalibrationFlags()

    public init(sensors: [Sensor], sink: any SampleSink, board: SensorStatusBoard, clock: WallClock, logger: Logger) {
        self.sensors = sensors
        self.sink = sink
        self.board = board
        self.clock = clock
        self.logger = logger
    }

    public func run() async throws {
        let start = ContinuousClock.now
        await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                for (index, sensor) in self.sensors.enumerated() {
                    let phase = sensor.configuration.interval * Double(index) / Double(max(1, self.sensors.count))
                    group.addTask { await self.loop(sensor, firstTick: start + phase) }
                }
                await group.waitForAll()
            }
        }
        for sensor in sensors { await sensor.driver.close() }
    }

    private func loop(_ sensor: Sensor, firstTick: ContinuousClock.Instant) async {
        let configuration = sensor.configuration
        var gate = Deadband(deadband: configuration.deadband, heartbeat: configuration.heartbeat)
        var tick = firstTick
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            do {
                try await Task.sleep(until: tick, clock: .continuous)
            } catch {
                return
            }
            await sampleOnce(sensor, gate: &gate)
            // Next tick on the sensor's grid; skip ticks that a slow read already missed.
            let now = ContinuousClock.now
            tick += configuration.interval
            if tick < now {
                let missed = ((now - tick) / configuration.interval).rounded(.up)
                tick += configuration.interval * missed
            }
        }
    }

    /// Reads `sensor` once and stores the value unless the deadband suppresses it.
    func sampleOnce(_ sensor: Sensor, gate: inout Deadband) async {
        let configuration = sensor.configuration
        let timeout = max(configuration.interval, .seconds(5))
        let outcome = await Self.read(sensor.driver, timeout: timeout)
        let stamp = clock.stamp()
        let now = stamp.timestamp
        switch outcome {
        case .failure(let error):
            board.recordFailure(configuration.id, error: error, at: now)
            logger.warning(
                "Sensor read failed",
                metadata: ["sensor": "\(configuration.id)", "error": "\(error)", "driver": "\(configuration.driver)"])
        case .success(let reading):
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

    static func read(_ driver: any SensorDriver, timeout: Duration) async -> Result<SensorValue, SensorError> {
        await withTaskGroup(of: Result<SensorValue, SensorError>?.self) { group in
            group.addTask {
                do throws(SensorError) { return .success(try await driver.read()) } catch { return .failure(error) }
            }
            group.addTask {
                do { try await Task.sleep(for: timeout) } catch { return nil }
                return .failure(SensorError(.timeout, "no answer within \(timeout)"))
            }
            defer { group.cancelAll() }
            while let next = await group.next() {
                if let result = next { return result }
            }
            return .failure(SensorError(.timeout, "read cancelled"))
        }
    }
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
        let components = heartbeat.components
        self.heartbeatMicroseconds = components.seconds * 1_000_000 + components.attoseconds / 1_000_000_000_000
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
