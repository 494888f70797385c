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
import Synchronization

/// Atlas Scientific EZO circuits (pH, EC, RTD, ORP, DO) in UART mode: `driver = "ezo"`.
///
/// The circuit is chosen by the sensor's quantity (`ph` → pH, `ec`/`tds` → EC, `temperature` → RTD, `orp`, `do`); each
/// circuit has its own serial port. An EC circuit's further outputs are further `[[sensor]]` tables on the same port
/// with `quantity = "tds"`, `"salinity"` (`S`) or `"specific_gravity"` (`SG`): the driver turns on (`O,...`) exactly the outputs configured. pH, EC and DO reads are
/// temperature-compensated (`RT,<t>`) with the latest value of `temperature_sensor` when one is named. A circuit has
/// one compensation temperature (`RT` sets it for every output): the `temperature_sensor` one output names applies to
/// all of them, and outputs naming different ones are refused.
/// The protocol work is in ``EZOSession``; the port's ownership, exclusivity and reopening in ``SerialLine``.
public final class EZODriver: SensorDriver {
    public static let optionKeys: Set<String> = ["port", "baud", "temperature_sensor", "temperature_max_age"]

    public static let description = DriverDescription(
        kind: "ezo",
        summary: "Atlas Scientific EZO pH, EC (and TDS, salinity, specific gravity), RTD, ORP and DO circuits over UART, with temperature compensation.",
        optionKeys: optionKeys,
        sampleConfiguration: """
            [[sensor]]
            id = "tank1.ph"
            driver = "ezo"
            quantity = "ph"                  # ph, ec, tds, salinity, specific_gravity (EC outputs), temperature (RTD), orp, do
            port = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0"
            # baud = 9600                    # the circuit's UART speed (factory 9600)
            # temperature_sensor = "tank1.temp"   # compensate with this sensor's latest value (pH, EC, DO)
            # temperature_max_age = "2m"     # older than this: the last good value is used, and the log says so
            interval = "10s"
            """,
        validate: { configuration throws(ConfigurationError) in _ = try Options(configuration) },
        validateSite: { sensors throws(ConfigurationError) in try validateSite(sensors) },
        make: { configuration, context in try EZODriver(configuration: configuration, context: context) },
        // pH and RTD circuits answer with three decimals (9.560, 25.104); the other outputs fit their quantity's default.
        nativeResolution: { quantity, _ in quantity == .ph || quantity == .temperature ? .thousandth : nil })

    /// The driver's keys, validated.
    struct Options {
        var port: String
        var settings: SerialSettings
        var kind: EZOCircuitKind
        var output: EZOOutput?
        var temperatureSensor: SensorID?
        var temperatureMaxAge: Duration

        init(_ configuration: SensorConfiguration) throws(ConfigurationError) {
            let table = configuration.options
            let quantity = configuration.descriptor.quantity
            guard let kind = EZOCircuitKind(quantity: quantity) else {
                throw table.error(
                    "quantity", "the ezo driver reads ph, ec, tds, salinity and specific_gravity (an EC circuit's outputs), temperature (RTD), orp and do; not \(quantity.rawValue)")
            }
            self.kind = kind
            output = EZOOutput(quantity: quantity)
            port = try AgentConfiguration.serialPort(table, example: "\"/dev/serial/by-id/usb-FTDI_...\"")
            let baud = try table.int("baud") ?? 9600
            guard SerialSettings.supportedBauds.contains(baud) else {
                throw table.error(
                    "baud", "must be one of \(SerialSettings.supportedBauds.map(String.init).joined(separator: ", ")) (got \(baud)); EZO circuits leave the factory at 9600")
            }
            settings = SerialSettings(baud: baud)
            if let source = try table.string("temperature_sensor") {
                guard kind.compensates else {
                    throw table.error(
                        "temperature_sensor", "only pH, EC and DO circuits take a temperature; an \(kind) circuit does not compensate")
                }
                do { temperatureSensor = try SensorID(source) } catch { throw table.error("temperature_sensor", error.description) }
            } else {
                temperatureSensor = nil
            }
            let maxAge = try table.duration("temperature_max_age", in: .seconds(1)...(.seconds(86_400)))
            if maxAge != nil, temperatureSensor == nil {
                throw table.error("temperature_max_age", "has no effect without temperature_sensor")
            }
            temperatureMaxAge = maxAge ?? .seconds(120)
        }
    }

    /// Rules across sensors: one port carries one circuit at one baud and belongs to one driver; a compensation source
    /// exists and measures temperature, and the outputs of one circuit name at most one (with one maximum age).
    static func validateSite(_ sensors: [SensorConfiguration]) throws(ConfigurationError) {
        var claims: [String: (sensor: SensorConfiguration, options: Options)] = [:]
        var outputs: [String: Set<EZOOutput>] = [:]
        var sources: [String: (sensor: SensorConfiguration, source: SensorID, maxAge: Duration?)] = [:]
        // One device written two ways (a /dev/serial/by-id link and its target, `/dev/./ttyS0`) must be written one way:
        // the circuit's rules below, and the agent's one session per port, go by the path as written.
        var spellings: [String: (sensor: SensorConfiguration, port: String)] = [:]
        for sensor in sensors where sensor.driver == "ezo" {
            let options = try Options(sensor)
            let table = sensor.options
            let device = SerialDevice.identity(of: options.port)
            if let (first, written) = spellings[device], written != options.port {
                throw table.error(
                    "port",
                    "port \(options.port) names the same device as \(written), which sensor \"\(first.id)\" uses; write the port the same way for every sensor of the circuit (such as \(written))")
            }
            if spellings[device] == nil { spellings[device] = (sensor, options.port) }
            if let source = options.temperatureSensor {
                let maxAge = table.value("temperature_max_age") == nil ? nil : options.temperatureMaxAge
                if let first = sources[options.port] {
                    guard first.source == source else {
                        throw table.error(
                            "temperature_sensor",
                            "sensor \"\(first.sensor.id)\" on the same circuit (port \(options.port)) compensates with \"\(first.source)\"; a circuit has one compensation temperature (RT sets it for every output): name \"\(first.source)\" here too, or leave temperature_sensor out (this sensor then uses it)")
                    }
                    if let firstAge = first.maxAge, let maxAge, firstAge != maxAge {
                        throw table.error(
                            "temperature_max_age",
                            "sensor \"\(first.sensor.id)\" on the same circuit (port \(options.port)) sets \(ConfigTable.format(firstAge)); the circuit's outputs share one compensation: set the same, or leave it out here")
                    }
                    if first.maxAge == nil, maxAge != nil { sources[options.port]?.maxAge = maxAge }
                } else {
                    sources[options.port] = (sensor, source, maxAge)
                }
            }
            if let source = options.temperatureSensor {
                guard let linked = sensors.first(where: { $0.id == source }) else {
                    throw table.error(
                        "temperature_sensor",
                        "no sensor \"\(source)\" in this file; name the id of a [[sensor]] with quantity = \"temperature\" (an EZO RTD or a DS18B20 in the same tank)")
                }
                guard linked.descriptor.quantity == .temperature else {
                    throw table.error(
                        "temperature_sensor", "sensor \"\(source)\" measures \(linked.descriptor.quantity.rawValue), not temperature")
                }
            }
            if let (first, firstOptions) = claims[options.port] {
                if firstOptions.settings.baud != options.settings.baud {
                    throw table.error(
                        "baud",
                        "port \(options.port) is also used by sensor \"\(first.id)\" at \(firstOptions.settings.baud) baud; sensors on one port share its baud (the circuit's)")
                }
                if firstOptions.kind != options.kind {
                    throw table.error(
                        "port",
                        "port \(options.port) is already claimed by sensor \"\(first.id)\" (an \(firstOptions.kind) circuit); this sensor needs an \(options.kind) circuit, and each EZO circuit has its own port")
                }
                guard let output = options.output, outputs[options.port]?.contains(output) == false else {
                    throw table.error(
                        "port",
                        "sensor \"\(first.id)\" already reads the \(options.kind) circuit on \(options.port); two sensors on one circuit must read different outputs (ec, tds, salinity, specific_gravity)")
                }
                outputs[options.port]?.insert(output)
            } else {
                claims[options.port] = (sensor, options)
                outputs[options.port] = options.output.map { [$0] } ?? []
            }
        }
        // A port belongs to one driver: an EZO circuit and, say, a Modbus bus cannot share one, however each names it.
        var devices: [String: (sensor: SensorConfiguration, port: String)] = [:]
        for (port, claim) in claims { devices[SerialDevice.identity(of: port)] = (claim.sensor, port) }
        for sensor in sensors where sensor.driver != "ezo" {
            guard case .string(let raw)? = sensor.options.value("port") else { continue }
            let base = URL(fileURLWithPath: sensor.options.file).deletingLastPathComponent().path
            let port = AgentConfiguration.resolve(raw, against: base)
            if let (first, written) = devices[SerialDevice.identity(of: port)] {
                let same = written == port ? "" : " (as \(written), the same device)"
                throw sensor.options.error(
                    "port", "port \(port) is already claimed by sensor \"\(first.id)\"\(same) (driver ezo); a port belongs to one driver")
            }
        }
    }

    /// The sensor whose latest value compensates `sensor`'s reads: its own `temperature_sensor`, else the one another
    /// output of its circuit (a sensor on the same port) names; nil when none does or `sensor` is no EZO sensor.
    public static func compensationSource(of sensor: SensorConfiguration, among sensors: [SensorConfiguration]) -> SensorID? {
        guard sensor.driver == "ezo", let options = try? Options(sensor) else { return nil }
        if let own = options.temperatureSensor { return own }
        for other in sensors where other.driver == "ezo" {
            guard let otherOptions = try? Options(other), otherOptions.port == options.port, let source = otherOptions.temperatureSensor else { continue }
            return source
        }
        return nil
    }

    private struct Compensation: Sendable {
        var source: SensorID
        var maxAge: Duration
    }

    private struct CompensationState: Sendable {
        var lastGood: Double?
        var stale = false
    }

    public let sensor: SensorID
    let kind: EZOCircuitKind
    let quantity: Quantity
    let line: SerialLine
    let session: EZOSession
    /// Which field of the reading is this sensor's (an EC circuit's outputs come in order).
    private let field: Int
    private let compensation: Compensation?
    private let latestValues: any LatestValues
    private let compensationState = Mutex(CompensationState())
    private let logger: Logger

    /// Builds the driver without touching the port: a missing device is a read error, not a start failure.
    public init(configuration: SensorConfiguration, context: DriverContext) throws {
        let options = try Options(configuration)
        sensor = configuration.id
        kind = options.kind
        quantity = configuration.descriptor.quantity
        line = try context.serialPorts.line(path: options.port, settings: options.settings)
        // Every sensor on this port reads the same circuit; the EC circuit outputs what any of them needs.
        var siblings: [SensorConfiguration] = []
        var outputs: Set<EZOOutput> = []
        // The circuit's one compensation source: this sensor's, else the one another output of the circuit names
        // (`config check` refuses outputs naming different ones). RT sets the circuit's temperature for every output,
        // so an output read with R after it would be compensated all the same, unflagged.
        var compensation = options.temperatureSensor.map { Compensation(source: $0, maxAge: options.temperatureMaxAge) }
        for other in context.sensors where other.driver == "ezo" {
            guard let otherOptions = try? Options(other), otherOptions.port == options.port else { continue }
            siblings.append(other)
            if let output = otherOptions.output { outputs.insert(output) }
            if compensation == nil, let source = otherOptions.temperatureSensor {
                compensation = Compensation(source: source, maxAge: otherOptions.temperatureMaxAge)
            }
        }
        if let output = options.output { outputs.insert(output) }
        if siblings.isEmpty { siblings = [configuration] }
        let names = siblings.map { "sensor \"\($0.id)\" (quantity \($0.descriptor.quantity.rawValue))" }.joined(separator: " and ")
        var logger = context.logger
        logger[metadataKey: "sensor"] = "\(configuration.id)"
        self.logger = logger
        let ordered = outputs.sorted()
        let kind = options.kind
        let port = options.port
        session = line.attachment("ezo") {
            EZOSession(kind: kind, outputs: ordered, portPath: port, sensors: names, logger: logger)
        }
        field = options.output.flatMap { ordered.firstIndex(of: $0) } ?? 0
        self.compensation = compensation
        latestValues = context.latestValues
    }

    /// A read that finds the circuit to initialise (the first, or one after a restart) waits for its boot and sends
    /// each setting with a command's time (without `*OK` codes, the full time of each): a few seconds on top of the read.
    public var setupAllowance: Duration { EZOSession.bootTime + .seconds(5) }

    public func read() async throws(SensorError) -> SensorValue {
        let temperature = compensationTemperature()
        let session = self.session
        let outcome: Result<EZOSession.Reading, SensorError>
        let requestedAt = ContinuousClock.now
        do {
            outcome = try await line.withPort { port, generation in
                try session.read(port: port, generation: generation, temperature: temperature, requestedAt: requestedAt)
            }
        } catch let error as SerialError {
            switch error.kind {
            case .timeout: throw SensorError(.timeout, error.message)
            default: throw SensorError(.disconnected, error.message)
            }
        } catch {
            throw SensorError(.disconnected, "\(line.path): \(error)")
        }
        let reading = try outcome.get()
        let values = reading.values
        guard field < values.count else {
            throw SensorError(.invalidResponse, "the reading has \(values.count) fields, field \(field + 1) expected")
        }
        let value = values[field]
        guard quantity.plausibleRange.contains(value) else {
            throw SensorError(
                .invalidResponse,
                "the \(kind) circuit on \(line.path) read \(value), outside what is stored for \(quantity.rawValue) (\(quantity.plausibleRange.lowerBound)…\(quantity.plausibleRange.upperBound) \(quantity.unit)): check the probe and the circuit's calibration")
        }
        var quality: QualityFlags = []
        // Whatever this read sent: the circuit compensates every output with the temperature RT or T last set.
        if reading.temperature != nil { quality.insert(.compensated) }
        return SensorValue(value, quality: quality)
    }

    /// The temperature to compensate this read with: the linked sensor's latest value while it is fresh, else the last
    /// fresh one (the log says so once, and again when it is fresh again); nil without a link or before any value.
    func compensationTemperature() -> Double? {
        guard let compensation else { return nil }
        let latest = latestValues.latest(compensation.source)
        let now = Timestamp.now()
        let maxAgeMicroseconds = Int64(compensation.maxAge / .microseconds(1))
        let logger = self.logger
        return compensationState.withLock { state -> Double? in
            if let latest, now.microseconds - latest.at.microseconds <= maxAgeMicroseconds, Quantity.temperature.plausibleRange.contains(latest.value) {
                if state.stale {
                    logger.notice(
                        "Compensation temperature is fresh again", metadata: ["temperature_sensor": "\(compensation.source)", "temperature": "\(latest.value)"])
                }
                state.stale = false
                state.lastGood = latest.value
                return latest.value
            }
            if !state.stale {
                state.stale = true
                let age = latest.map { "\((now.microseconds - $0.at.microseconds) / 1_000_000) s old" } ?? "no value yet"
                if let last = state.lastGood {
                    logger.warning(
                        "Compensation temperature is stale; using the last good value",
                        metadata: ["temperature_sensor": "\(compensation.source)", "age": "\(age)", "temperature": "\(last)"])
                } else {
                    logger.warning(
                        "No compensation temperature yet; reading with the circuit's own temperature setting",
                        metadata: ["temperature_sensor": "\(compensation.source)", "age": "\(age)"])
                }
            }
            return state.lastGood
        }
    }

    public func close() async {
        await line.close()
    }
}

extension SensorStatusBoard: LatestValues {
    /// The last value the sensor read successfully and when (whether or not the deadband stored it).
    public func latest(_ sensor: SensorID) -> (value: Double, at: Timestamp)? {
        guard let status = snapshot().first(where: { $0.id == sensor.rawValue }), let value = status.lastValue,
            let at = status.lastReadAt
        else { return nil }
        return (value, at)
    }
}
