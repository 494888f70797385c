import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// What `farmgate scan` found, as JSON (`--json`) or as text with ready-to-paste `[[sensor]]` tables.
public struct ScanReport: Codable, Sendable {
    public var serialPorts: [SerialPortFinding] = []
    /// Serial ports left alone (on-board UARTs not asked for, ports without a UART), each with the reason.
    public var skippedPorts: [SkippedPort] = []
    public var oneWire: OneWireFinding
    public var gpio: GPIOFinding

    public init(serialPorts: [SerialPortFinding] = [], oneWire: OneWireFinding, gpio: GPIOFinding) {
        self.serialPorts = serialPorts
        self.oneWire = oneWire
        self.gpio = gpio
    }
}

/// One serial port and what answered on it.
public struct SerialPortFinding: Codable, Sendable, Hashable {
    public enum State: String, Codable, Sendable {
        /// Something answered (see `ezo` and `modbus`).
        case found
        /// Opened and probed; nothing answered.
        case silent
        /// Another process holds it (the running agent, a terminal program); not probed.
        case busy
        /// Configured for the running agent's sensors; not probed.
        case agent
        /// Could not be opened (permission, gone); `message` says what to check.
        case error
    }

    /// The path to configure: the `/dev/serial/by-id/` link when there is one.
    public var path: String
    /// The device it resolves to (`/dev/ttyUSB0`).
    public var device: String
    public var state: State
    public var message: String?
    public var ezo: EZOFinding?
    public var modbusSlaves: [ModbusFinding] = []
    /// How long probing took, in milliseconds.
    public var milliseconds: Int = 0
}

public struct EZOFinding: Codable, Sendable, Hashable {
    /// `pH`, `EC`, `RTD`, `ORP`, `DO` as the circuit names itself.
    public var circuit: String
    public var firmware: String
    public var baud: Int
}

public struct ModbusFinding: Codable, Sendable, Hashable {
    public var slave: Int
    public var baud: Int
    /// Holding register 0, when the slave has one.
    public var register0: UInt16?
    /// The exception it answered with instead (it exists, but has no holding register 0).
    public var exception: Int?
}

public struct OneWireFinding: Codable, Sendable, Hashable {
    public var root: String
    /// Why nothing could be listed (no bus), or nil.
    public var message: String?
    public var sensors: [DS18B20Finding] = []
}

public struct DS18B20Finding: Codable, Sendable, Hashable {
    /// The device's directory name, `28-0316a2791aff`.
    public var address: String
    /// The temperature it reads now, or nil with `problem`.
    public var celsius: Double?
    public var problem: String?
}

public struct GPIOFinding: Codable, Sendable, Hashable {
    public var message: String?
    public var chips: [GPIOChipInfo] = []
}

/// A GPIO chip and its lines as the kernel reports them.
public struct GPIOChipInfo: Codable, Sendable, Hashable {
    public struct Line: Codable, Sendable, Hashable {
        public var offset: Int
        public var name: String?
        /// Who holds it (`farmgate`, `kernel`...), nil when free.
        public var consumer: String?

        public init(offset: Int, name: String?, consumer: String?) {
            self.offset = offset
            self.name = name
            self.consumer = consumer
        }
    }

    public var name: String
    public var label: String
    public var lines: [Line]

    public init(name: String, label: String, lines: [Line]) {
        self.name = name
        self.label = label
        self.lines = lines
    }
}

extension ScanReport {
    /// The report as an installer reads it: what was found, then `[[sensor]]` tables to paste into the configuration.
    public func text(w1DefaultRoot: String = "/sys/bus/w1/devices") -> String {
        var out: [String] = []
        var tables: [String] = []
        out.append("Serial ports")
        if serialPorts.isEmpty { out.append("  none probed (no /dev/serial/by-id links, no ttyUSB or ttyACM port, no port named with --port)") }
        var ezoCount = 0
        var busCount = 0
        for port in serialPorts {
            let shown = port.device == port.path ? port.path : "\(port.path) (\(port.device))"
            switch port.state {
            case .found:
                if let ezo = port.ezo {
                    out.append("  \(shown): EZO \(ezo.circuit) circuit, firmware \(ezo.firmware), \(ezo.baud) baud")
                    ezoCount += 1
                    tables.append(Self.ezoTable(ezo, port: port.path, index: ezoCount))
                }
                if !port.modbusSlaves.isEmpty {
                    busCount += 1
                    let list = port.modbusSlaves.map { "\($0.slave)" }.joined(separator: ", ")
                    out.append("  \(shown): Modbus RTU slave\(port.modbusSlaves.count == 1 ? "" : "s") \(list) at \(port.modbusSlaves[0].baud) baud 8N1")
                    for slave in port.modbusSlaves {
                        tables.append(Self.modbusTable(slave, port: port.path, bus: busCount))
                    }
                }
            case .silent:
                out.append("  \(shown): no answer (\(port.message ?? "nothing answered"))")
            case .busy:
                out.append("  \(shown): in use (by the running agent?); not probed")
            case .agent:
                out.append("  \(shown): \(port.message ?? "used by the running agent"); not probed")
            case .error:
                out.append("  \(shown): \(port.message ?? "cannot open")")
            }
        }
        let onboard = skippedPorts.filter { $0.reason == .onboardUART }
        for port in onboard {
            out.append(
                "  \(port.path): skipped: an on-board UART, often wired to a serial console or another device; probe it with --port \(port.path), or every on-board UART with --onboard-uarts")
        }
        let empty = skippedPorts.filter { $0.reason == .noUART }.map { URL(fileURLWithPath: $0.path).lastPathComponent }
        if !empty.isEmpty {
            let names = empty.count > 6 ? empty.prefix(5).joined(separator: ", ") + ", ... (\(empty.count) in all)" : empty.joined(separator: ", ")
            out.append("  skipped \(names): no UART behind \(empty.count == 1 ? "it" : "them") (the kernel reports the port type as unknown)")
        }
        out.append("")
        out.append("1-Wire (\(oneWire.root))")
        if let message = oneWire.message { out.append("  \(message)") }
        if oneWire.message == nil && oneWire.sensors.isEmpty {
            out.append("  no w1-therm temperature sensor (DS18B20 28-*, DS18S20 10-*, DS1822 22-*, DS1825/MAX31850 3b-*, DS28EA00 42-*)")
        }
        for sensor in oneWire.sensors {
            let reading = sensor.celsius.map { "\($0) °C" } ?? (sensor.problem ?? "no reading")
            out.append("  \(sensor.address): \(Self.w1ThermName(sensor.address)), \(reading)")
            tables.append(Self.ds18b20Table(sensor, root: oneWire.root == w1DefaultRoot ? nil : oneWire.root))
        }
        out.append("")
        out.append("GPIO")
        if let message = gpio.message { out.append("  \(message)") }
        for chip in gpio.chips {
            let used = chip.lines.filter { $0.consumer != nil }.map { "\($0.offset)\($0.name.map { " \($0)" } ?? "") (\($0.consumer ?? ""))" }
            out.append("  \(chip.name) [\(chip.label)]: \(chip.lines.count) lines\(used.isEmpty ? "" : "; in use: \(used.joined(separator: ", "))")")
            let named = chip.lines.filter { $0.name != nil }.map { "\($0.offset)=\($0.name ?? "")" }
            if !named.isEmpty { out.append("    names: \(named.joined(separator: " "))") }
            if let free = chip.lines.first(where: { $0.consumer == nil }) {
                tables.append(Self.gpioTable(chip: chip.name, line: free))
            }
        }
        if !tables.isEmpty {
            out.append("")
            out.append("# Paste into the agent's configuration; rename the ids, set what each measures, then `farmgate config check`.")
            out.append(tables.joined(separator: "\n\n"))
        }
        return out.joined(separator: "\n")
    }

    static func ezoTable(_ ezo: EZOFinding, port: String, index: Int) -> String {
        let quantity: String
        switch EZOCircuitKind(identity: ezo.circuit) {
        case .ph?: quantity = Quantity.ph.rawValue
        case .ec?: quantity = Quantity.electricalConductivity.rawValue
        case .rtd?: quantity = Quantity.temperature.rawValue
        case .orp?: quantity = Quantity.orp.rawValue
        case .dissolvedOxygen?: quantity = Quantity.dissolvedOxygen.rawValue
        case nil: quantity = "ph"
        }
        var lines = [
            "[[sensor]]", "id = \"tank\(index).\(quantity)\"", "driver = \"ezo\"", "quantity = \"\(quantity)\"", "port = \"\(port)\"",
        ]
        if ezo.baud != 9600 { lines.append("baud = \(ezo.baud)") }
        lines.append("interval = \"10s\"")
        if EZOCircuitKind(identity: ezo.circuit)?.compensates == true {
            lines.append("# temperature_sensor = \"tank\(index).temperature\"   # compensate with a temperature sensor in the same tank")
        }
        return lines.joined(separator: "\n")
    }

    static func modbusTable(_ slave: ModbusFinding, port: String, bus: Int) -> String {
        var lines = [
            "[[sensor]]", "id = \"bus\(bus).slave\(slave.slave)\"", "driver = \"modbus\"",
            "quantity = \"ph\"                # what the register holds (the transmitter's manual)", "port = \"\(port)\"",
            "baud = \(slave.baud)", "slave = \(slave.slave)", "function = \"holding\"",
            "address = 0                     # from the register map", "data_type = \"uint16\"", "scale = 1.0",
        ]
        if let value = slave.register0 {
            lines.append("# holding register 0 reads \(value) now")
        } else if let exception = slave.exception {
            lines.append("# the slave answered exception \(exception) for holding register 0: take the address from its manual")
        }
        lines.append("interval = \"10s\"")
        return lines.joined(separator: "\n")
    }

    /// The chip a w1-therm address's family stands for (`28-…` DS18B20, `10-…` DS18S20, …).
    static func w1ThermName(_ address: String) -> String {
        switch address.prefix(2) {
        case "10": "DS18S20"
        case "22": "DS1822"
        case "3b": "DS1825 or MAX31850"
        case "42": "DS28EA00"
        default: "DS18B20"
        }
    }

    static func ds18b20Table(_ sensor: DS18B20Finding, root: String?) -> String {
        var lines = [
            "[[sensor]]", "id = \"temp.\(sensor.address)\"", "driver = \"ds18b20\"", "quantity = \"temperature\"",
            "address = \"\(sensor.address)\"",
        ]
        if let root { lines.append("w1_root = \"\(root)\"") }
        lines.append("interval = \"30s\"")
        return lines.joined(separator: "\n")
    }

    static func gpioTable(chip: String, line: GPIOChipInfo.Line) -> String {
        [
            "# [[sensor]]                     # a float switch or leak sensor on a free line",
            "# id = \"tank1.level\"", "# driver = \"gpio\"", "# quantity = \"state\"", "# chip = \"\(chip)\"",
            "# line = \(line.name.map { "\"\($0)\"" } ?? "\(line.offset)")", "# bias = \"pull_up\"",
        ].joined(separator: "\n")
    }
}
