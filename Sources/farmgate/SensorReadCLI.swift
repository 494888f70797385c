import ArgumentParser
import FarmgateAgent
import FarmgateSupport
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

/// `farmgate sensor read SENSOR`: one test read, through the running agent (which owns the ports) or, when none answers,
/// directly with the sensor's own driver.
struct SensorRead: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "read",
        abstract: "Read one sensor once, through the running agent or directly when none runs; nothing is stored (alias: test).",
        discussion: """
            With an agent running, the agent reads the sensor with the driver that owns its port (compensation included). \
            Without one, the sensor's driver is built from the configuration, reads once and closes. \
            Exit codes: 0 read, 1 read failed (the message says what to check), 64 unknown sensor, 78 bad configuration.
            """,
        aliases: ["test"])

    @OptionGroup var options: ConfigOption

    @OptionGroup var control: SocketOption
    var socket: String? { control.socket }

    @Flag(help: "Print the answer as JSON.")
    var json = false

    @Argument(help: ArgumentHelp("The sensor's id, as in its [[sensor]] table.", valueName: "sensor"))
    var sensor: String

    /// A sensor id no configuration can hold ('' among others) is a usage error, as an unknown one is.
    func validate() throws {
        do { _ = try SensorID(sensor) } catch {
            throw ValidationError("\(error); give the id of a [[sensor]] table (`farmgate config check` lists them)")
        }
    }

    func run() async throws {
        var loaded: Result<AgentConfiguration, ConfigurationError>
        do { loaded = .success(try AgentConfiguration.load(path: options.config)) } catch { loaded = .failure(error) }
        // Found as `status` finds the agent: the file's `[control] socket`, then the one the running agent recorded beside
        // its buffer (an edit that moves the socket, not reloaded yet), or when the file does not load, the sockets it
        // names read leniently, but not the default one: a sensor of this file must not be read from another agent
        // (a review, 2026-12-07). Only a socket nobody listens on passes to the next.
        let candidates = socket.map { [$0] }
            ?? (try? loaded.get()).map(StatusCommand.sockets(of:))
            ?? StatusCommand.sockets(namedIn: options.config, withDefault: false)
        var viaAgent: SensorReadAnswer?
        for path in candidates where viaAgent == nil { viaAgent = try askAgent(path) }
        let answer: SensorReadAnswer
        if let viaAgent {
            answer = viaAgent
        } else {
            let configuration: AgentConfiguration
            switch loaded {
            case .success(let value): configuration = value
            case .failure(let error): throw CleanExit.message(error.description, code: 78)
            }
            answer = await Self.readDirectly(sensor, configuration: configuration)
        }
        let sensors = (try? loaded.get())?.sensors ?? []
        let configured = sensors.first { $0.id.rawValue == sensor }
        if answer.code == .unknownSensor, answer.reading == nil, configured != nil {
            // The file has it, the running agent does not: an edit not reloaded yet (or one a reload refused).
            throw CleanExit.message(
                "farmgate sensor read: \(options.config) has sensor \"\(sensor)\", but the running agent does not: reload it to apply the file (sudo systemctl reload farmgate, or farmgate reload), then read again; `farmgate status` shows a reload the agent refused",
                code: 1)
        }
        // An EZO output without temperature_sensor of its own is compensated with the one another output of its circuit names.
        let source: String?? = configured.map { EZODriver.compensationSource(of: $0, among: sensors)?.rawValue }
        try report(answer, temperatureSensor: source)
    }

    /// The agent's answer, or nil when no agent listens on `path` (then the sensor is read directly).
    func askAgent(_ path: String) throws -> SensorReadAnswer? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        let bytes: [UInt8]
        do {
            // The agent's read is bounded by the sensor's interval (at least 5 s); leave room for it.
            bytes = try ControlClient.send(
                ControlRequest(command: SensorReadCommand.command, arguments: ["sensor": sensor]), to: path, timeoutSeconds: 120, settling: ControlClient.cliSettling)
        } catch {
            // A socket file that nobody listens on: the agent is not running.
            if "\(error)".contains("connection refused") || "\(error)".contains("no such socket") { return nil }
            throw CleanExit.message("farmgate sensor read: \(error)", code: 1)
        }
        if let answer = try? JSONDecoder().decode(SensorReadAnswer.self, from: Data(bytes)), answer.ok || answer.code != nil {
            return answer
        }
        let other = try? JSONDecoder().decode(ControlAnswer.self, from: Data(bytes))
        throw CleanExit.message(
            "farmgate sensor read: the agent answered: \(other?.error ?? String(decoding: bytes, as: UTF8.self)) (is it an older version? restart it after an upgrade)",
            code: 1)
    }

    /// Builds the sensor's driver as the agent would (same driver context), reads once and closes it.
    static func readDirectly(_ name: String, configuration: AgentConfiguration) async -> SensorReadAnswer {
        guard let id = try? SensorID(name), let sensor = configuration.sensors.first(where: { $0.id == id }) else {
            return SensorReadCommand.unknown(name, known: configuration.sensors.map(\.id))
        }
        // The driver's error is the message; its log lines would only repeat it.
        let logger = Logger(label: "farmgate.sensor-read", factory: { _ in SwiftLogNoOpLogHandler() })
        let context = DriverContext.site(configuration.sensors, logger: logger)
        guard let description = DriverRegistry.standard.driver(named: sensor.driver) else {
            return SensorReadAnswer(ok: false, code: .readFailed, error: "sensor \(name): unknown driver \(sensor.driver)")
        }
        let driver: any SensorDriver
        do {
            driver = try description.make(sensor, context)
        } catch {
            return SensorReadAnswer(ok: false, code: .readFailed, error: "cannot set up the \(sensor.driver) driver: \(error)")
        }
        let reader = Sampler.Sensor(configuration: sensor, driver: driver)
        let answer = await SensorReadCommand.read(reader, via: "direct")
        // A driver stuck in its read may never close; the process exits anyway.
        _ = await withDeadline(.seconds(2)) { await driver.close() }
        return answer
    }

    /// What applies to the compensation of a reading taken directly, or nil when nothing needs saying: only EZO pH, EC
    /// and DO circuits are compensated by the agent (with `temperature_sensor`); other drivers (a Modbus transmitter)
    /// take no temperature from it.
    /// - Parameter temperatureSensor: the sensor's `temperature_sensor` (`.some(nil)`: none set; nil: unknown).
    static func compensationNote(_ reading: SensorReadResult, temperatureSensor: String??) -> String? {
        guard reading.via == "direct", reading.driver == "ezo", !reading.flags.contains("compensated"),
            ["ph", "ec", "do", "tds", "salinity", "specific_gravity"].contains(reading.quantity)
        else { return nil }
        switch temperatureSensor {
        case .some(.some(let source)):
            return "not temperature-compensated: read directly, the agent would compensate with \(source)'s latest value"
        case .some(.none):
            let factory = reading.quantity == "do" ? "20 °C from the factory and after a power cut" : "25 °C from the factory"
            return "not compensated by the agent (no temperature_sensor set): the circuit uses its own temperature setting (T, \(factory))"
        case .none:
            return nil
        }
    }

    func report(_ answer: SensorReadAnswer, temperatureSensor: String?? = nil) throws {
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            if let data = try? encoder.encode(answer) { print(String(decoding: data, as: UTF8.self)) }
        }
        switch answer.code {
        case nil:
            guard let reading = answer.reading, let value = reading.value else { throw ExitCode(1) }
            if !json {
                let shown = Resolution.display(value, resolution: reading.resolution)
                var line = "\(reading.sensor): \(shown) \(reading.unit)"
                var notes = ["\(reading.via == "agent" ? "read by the running agent" : "read directly (no agent running)") in \(reading.milliseconds) ms"]
                if !reading.flags.isEmpty { notes.append("flags: \(reading.flags.joined(separator: ", "))") }
                if let note = Self.compensationNote(reading, temperatureSensor: temperatureSensor) { notes.append(note) }
                line += " (\(notes.joined(separator: "; ")))"
                print(line)
            }
        case .unknownSensor?:
            throw CleanExit.message("farmgate sensor read: \(answer.error ?? "unknown sensor")", code: 64)
        case .readFailed?, .badRequest?:
            let via = answer.reading.map { $0.via == "agent" ? " (read by the running agent)" : " (read directly; no agent running)" } ?? ""
            throw CleanExit.message("farmgate sensor read \(sensor): \(answer.error ?? "the read failed")\(via)", code: 1)
        }
    }
}
