import FarmgateSupport
import FarmgateWire
import Logging

/// Reads one value from a Modbus RTU slave (a pH, EC or temperature transmitter on RS-485) through libmodbus.
///
/// Every sensor table names its bus (`port` and the serial settings, equal for all sensors on one port) and its point
/// (`slave`, `function`, `address`, `data_type`, word and byte order, `scale`, `offset`). Sensors on one port share one
/// ``ModbusBus``: one thread, requests serialised with the silent interval, adjacent registers read together.
/// A missing or unplugged adapter is not a configuration error: the sensor reads `disconnected` and the bus reopens
/// the port with backoff (1 s doubling to 5 s), at once when the port's path is back.
public final class ModbusDriver: SensorDriver {
    public static let description = DriverDescription(
        kind: "modbus",
        summary: "A register of a Modbus RTU slave on RS-485 (pH/EC/temperature transmitters), through libmodbus.",
        optionKeys: ModbusSensorOptions.keys,
        sampleConfiguration: """
            [[sensor]]
            id = "tank1.ph"
            driver = "modbus"
            quantity = "ph"
            port = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0"
            baud = 9600              # parity = "none", data_bits = 8, stop_bits = 1: the same for every sensor on the port
            slave = 1                # unit id, 1-247
            function = "holding"     # or "input" (or the function code: 3, 4)
            address = 1              # 0-based register address (40002 in a manual)
            data_type = "uint16"     # int16, uint16, int32, uint32, float32 (word_order = "big" | "little" | "abcd" | "badc" | "cdab" | "dcba")
            scale = 0.01             # value = raw * scale + offset
            # response_timeout = "500ms"
            """,
        validate: { configuration throws(ConfigurationError) in _ = try ModbusSensorOptions(configuration) },
        claims: { configuration throws(ConfigurationError) in
            let options = try ModbusSensorOptions(configuration)
            return [
                ResourceClaim(
                    resource: "serial port \(options.bus.port)", key: "port", settings: "Modbus RTU \(options.bus)", shareable: true,
                    identity: "serial port " + SerialDevice.identity(of: options.bus.port))
            ]
        },
        make: { configuration, context in try ModbusDriver(configuration: configuration, logger: context.logger) },
        nativeResolution: { quantity, table in
            // A float register has no step of its own: a quantity's default that is not a decimal step (1/16 °C, the
            // DS18B20's) would round a transmitter's hundredths away (a tester, 2026-12-07: 21.525 °C stored as 21.5).
            let exact = ModbusPoint.exactResolution(scale: (try? table.double("scale")) ?? 1, offset: (try? table.double("offset")) ?? 0, quantity: quantity)
            guard (try? table.string("data_type"))?.lowercased() == "float32", let float = ModbusPoint.floatResolution(quantity) else { return exact }
            // The finer of the two: a float's 0.01, or the step its scale or offset needs (scale = 0.001: 0.001).
            return exact.map { $0.step < float.step ? $0 : float } ?? float
        })

    public let sensor: SensorID
    let point: ModbusPoint
    let quantity: Quantity
    let bus: ModbusBus

    public init(configuration: SensorConfiguration, logger: Logger) throws {
        let options = try ModbusSensorOptions(configuration)
        sensor = configuration.id
        point = options.point
        quantity = configuration.descriptor.quantity
        bus = try ModbusBuses.shared.bus(for: options.bus, logger: logger)
        bus.add(
            ModbusMember(
                sensor: configuration.id, slave: options.point.slave, function: options.point.function,
                address: options.point.address, count: options.point.registerCount, coalesceGap: options.coalesceGap,
                responseTimeout: options.responseTimeout, maxAge: configuration.interval))
    }

    public func read() async throws(SensorError) -> SensorValue {
        let registers = try await bus.registers(for: sensor)
        // The transmitter's own "no value" (``ModbusPoint/faultSentinel(_:)``): a fault at any scale, even where the
        // scaled value would look plausible (0xFFFF × 0.0001 = pH 6.55).
        if let sentinel = point.faultSentinel(registers[...]) {
            throw SensorError(
                .fault,
                "slave \(point.slave) register \(point.address) reads raw \(Self.hex(registers)), \(sentinel): what a transmitter sends when its probe is missing or broken, never a reading; check the probe and its cable (and data_type against its register map)")
        }
        if let problem = point.implausibleFloat(registers[...]) {
            throw SensorError(.fault, "slave \(point.slave) register \(point.address) reads raw \(Self.hex(registers)), \(problem)")
        }
        guard let value = point.decode(registers[...]) else {
            // A float32 NaN or infinity: what some transmitters send for a missing probe, or the wrong word order.
            throw SensorError(
                .fault,
                "slave \(point.slave) register \(point.address) reads raw \(Self.hex(registers)), which as \(point.dataType.rawValue) is no number (NaN or infinity): a transmitter's value for a missing or broken probe, or the wrong word_order; check the probe, and data_type and word_order against its register map")
        }
        // A value no probe of the quantity can read (a float of 1e30, an int32 sentinel at a wrong data_type) is what a
        // transmitter sends when its probe is missing or broken, or what a wrong data_type, scale or word_order makes of
        // a good value: a fault, never a reading (values outside `expected_range` but plausible are still stored,
        // flagged, by the sampler).
        guard quantity.plausibleRange.contains(value) else {
            throw SensorError(
                .fault,
                "slave \(point.slave) register \(point.address) reads \(Self.shown(value)) (raw \(Self.hex(registers))), which no \(quantity.rawValue) transmitter can measure (plausible \(quantity.plausibleRange.lowerBound)...\(quantity.plausibleRange.upperBound)): check the transmitter and its probe, and data_type, word_order, scale and offset against its register map")
        }
        return SensorValue(value)
    }

    /// A scaled value for a message, without the binary noise of the scaling (3276.7, not 3276.7000000000003).
    static func shown(_ value: Double) -> String {
        guard value.isFinite, value.magnitude < 1e9 else { return "\(value)" }
        return "\((value * 1e6).rounded() / 1e6)"
    }

    static func hex(_ registers: [UInt16]) -> String {
        registers.map { word in
            let digits = String(word, radix: 16, uppercase: true)
            return "0x" + String(repeating: "0", count: 4 - digits.count) + digits
        }.joined(separator: " ")
    }

    public func close() async {
        await ModbusBuses.shared.release(sensor, from: bus)
    }
}

/// What a read is for, where a driver treats it differently: the installer's one-off read (`farmgate sensor read`)
/// always asks the device, never a value another sensor's read brought in (a Modbus block).
public enum SensorReadContext {
    @TaskLocal public static var oneOff = false
}
