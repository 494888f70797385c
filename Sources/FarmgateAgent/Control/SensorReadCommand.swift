import FarmgateWire
import Logging

/// What `farmgate sensor read` gets back, from the running agent (`sensor.read` on the control socket) or from a direct
/// read when no agent runs: one line of JSON either way.
public struct SensorReadAnswer: Codable, Sendable {
    /// Why there is no reading, for the CLI's exit code.
    public enum Code: String, Codable, Sendable {
        /// No sensor with that id in the configuration (exit 64).
        case unknownSensor = "unknown_sensor"
        /// The sensor is configured but the read failed (exit 1); `error` says what to check.
        case readFailed = "read_failed"
        /// The request named no sensor.
        case badRequest = "bad_request"
    }

    public var ok: Bool
    public var code: Code?
    public var error: String?
    public var reading: SensorReadResult?

    public init(ok: Bool, code: Code? = nil, error: String? = nil, reading: SensorReadResult? = nil) {
        self.ok = ok
        self.code = code
        self.error = error
        self.reading = reading
    }
}

/// One test read of one sensor. It is not stored in the buffer: the sampler's own readings are.
public struct SensorReadResult: Codable, Sendable, Hashable {
    public var sensor: String
    public var driver: String
    public var quantity: String
    public var unit: String
    public var resolution: String
    /// The value at the sensor's resolution, as the buffer would store it; nil when the read failed.
    public var value: Double?
    /// The value as the driver read it.
    public var raw: Double?
    /// Quality flags the driver set (`compensated`), by name.
    public var flags: [String]
    /// `timeout`, `fault`, `disconnected` or `invalid_response` when the read failed.
    public var errorKind: String?
    public var at: Timestamp
    /// How long the read took.
    public var milliseconds: Int
    /// `agent` (read by the running agent, with its compensation values) or `direct` (no agent ran).
    public var via: String
}

/// `sensor.read`: reads one sensor through the agent's own driver (the one that owns the port), bounded like the
/// sampler's reads and never two at once on one sensor.
public enum SensorReadCommand {
    public static let command = "sensor.read"

    /// Answers `{"command": "sensor.read", "arguments": {"sensor": "tank1.ph"}}`.
    /// - Parameter sensors: every configured sensor, in configuration order: the sampler's and the streaming ones (a GPIO
    ///   switch, which the sampler does not poll, is read through the same driver).
    public static func answer(_ request: ControlRequest, sensors: [Sampler.Sensor]) async -> SensorReadAnswer {
        guard let name = request.arguments?["sensor"], !name.isEmpty else {
            return SensorReadAnswer(ok: false, code: .badRequest, error: "sensor.read needs the argument \"sensor\" (a sensor id)")
        }
        guard let id = try? SensorID(name), let sensor = sensors.first(where: { $0.configuration.id == id }) else {
            return unknown(name, known: sensors.map(\.configuration.id), byTheRunningAgent: true)
        }
        return await read(sensor, via: "agent")
    }

    /// Answers for the sampler's sensors only.
    public static func answer(_ request: ControlRequest, sampler: Sampler) async -> SensorReadAnswer {
        await answer(request, sensors: sampler.sensors)
    }

    /// The answer for a sensor id that is not configured, or (`byTheRunningAgent`) that the running agent does not run:
    /// a sensor added to the file since its last reload is not one of them yet.
    public static func unknown(_ name: String, known: [SensorID], byTheRunningAgent: Bool = false) -> SensorReadAnswer {
        let list = known.map(\.rawValue).joined(separator: ", ")
        let error = byTheRunningAgent
            ? "the running agent has no sensor \"\(name)\"; it runs: \(list.isEmpty ? "none" : list) (a sensor added to the configuration since is read after `farmgate reload`)"
            : "no sensor \"\(name)\" in the configuration; configured: \(list.isEmpty ? "none" : list) (`farmgate config check` lists them)"
        return SensorReadAnswer(ok: false, code: .unknownSensor, error: error)
    }

    /// Reads `sensor` once (at most its read timeout) and describes the outcome.
    public static func read(_ sensor: Sampler.Sensor, via: String) async -> SensorReadAnswer {
        let configuration = sensor.configuration
        let start = ContinuousClock.now
        // The installer asks the device, never a value another sensor's read brought in (a Modbus block).
        let outcome = await SensorReadContext.$oneOff.withValue(true) { await sensor.readOnce() }
        let took = ContinuousClock.now - start
        let descriptor = configuration.descriptor
        var result = SensorReadResult(
            sensor: configuration.id.rawValue, driver: configuration.driver, quantity: descriptor.quantity.rawValue,
            unit: descriptor.quantity.unit, resolution: descriptor.resolution.description, value: nil, raw: nil, flags: [],
            errorKind: nil, at: Timestamp.now(), milliseconds: Int(took / .milliseconds(1)), via: via)
        switch outcome {
        case .success(let value):
            result.raw = value.value
            result.value = descriptor.resolution.quantize(value.value).map(descriptor.resolution.value(ofSteps:)) ?? value.value
            result.flags = QualityFlags.names.filter { value.quality.contains($0.0) }.map(\.1)
            if let expected = configuration.expectedRange, !expected.contains(value.value) { result.flags.append("out_of_range") }
            return SensorReadAnswer(ok: true, reading: result)
        case .failure(let error):
            result.errorKind = error.kind.rawValue
            return SensorReadAnswer(ok: false, code: .readFailed, error: error.description, reading: result)
        }
    }
}

extension Sampler {
    /// The configured sensors' ids, in configuration order.
    public var sensorIDs: [SensorID] { sensors.map(\.configuration.id) }
}

extension DriverContext {
    /// The context the agent gives every driver of `sensors`; `farmgate sensor read` builds the same one for a direct read.
    public static func site(
        _ sensors: [SensorConfiguration], latestValues: any LatestValues = NoLatestValues(), logger: Logger,
        stateFilePrefix: String? = nil
    ) -> DriverContext {
        DriverContext(
            sensors: sensors, latestValues: latestValues, serialPorts: SerialPortRegistry(logger: logger), logger: logger,
            stateFilePrefix: stateFilePrefix)
    }
}
