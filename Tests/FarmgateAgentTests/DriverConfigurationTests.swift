@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

@Suite("Hardware driver configuration")
struct DriverConfigurationTests {
    static let header = "[device]\nid = \"t\"\n"

    func error(_ sensors: String) -> ConfigurationError? {
        do {
            _ = try AgentConfiguration.parse(ConfigDocument.parse(Self.header + sensors, file: "/etc/farmgate/agent.toml"))
            return nil
        } catch {
            return error
        }
    }

    static func modbus(_ id: String, _ keys: String) -> String {
        """

        [[sensor]]
        id = "\(id)"
        driver = "modbus"
        quantity = "ph"
        port = "/dev/ttyUSB0"
        \(keys)
        """
    }

    static func gpio(_ id: String, _ quantity: String, _ keys: String) -> String {
        """

        [[sensor]]
        id = "\(id)"
        driver = "gpio"
        quantity = "\(quantity)"
        \(keys)
        """
    }

    @Test(
        "Bad Modbus keys are located and say what is allowed",
        arguments: [
            ("slave = 0\naddress = 0", "slave", "between 1 and 247 (got 0)"),
            ("slave = 248\naddress = 0", "slave", "between 1 and 247 (got 248)"),
            ("address = 0", "slave", "is required"),
            ("slave = 1", "address", "is required"),
            ("slave = 1\naddress = 0\ndata_type = \"float64\"", "data_type", "\"float32\", \"int16\", \"int32\", \"uint16\", \"uint32\" (got \"float64\")"),
            ("slave = 1\naddress = 65535\ndata_type = \"uint32\"", "address", "between 0 and 65534"),
            ("slave = 1\naddress = 0\nword_order = \"little\"", "word_order", "only applies to 32-bit"),
            ("slave = 1\naddress = 0\nbaud = 9601", "baud", "must be one of"),
            ("slave = 1\naddress = 0\nparity = \"mark\"", "parity", "must be one of"),
            ("slave = 1\naddress = 0\nfunction = \"coils\"", "function", "must be one of"),
            ("slave = 1\naddress = 0\nfunction = 6", "function", "must be \"holding\" (or 3) for holding registers, \"input\" (or 4) for input registers (got 6)"),
            ("slave = 1\naddress = 0\nfunction = true", "function", "(got a boolean)"),
            ("slave = 1\naddress = 0\ndata_type = \"float32\"\nword_order = \"bacd\"", "word_order", "\"abcd\", \"badc\", \"cdab\", \"dcba\""),
            ("slave = 1\naddress = 0\ndata_type = \"float32\"\nword_order = \"bacd\"", "word_order", "(got \"bacd\")"),
            ("slave = 1\naddress = 0\ndata_type = \"float32\"\nword_order = \"dcba\"\nbyte_order = \"big\"", "byte_order", "contradicts word_order = \"dcba\""),
            ("slave = 1\naddress = 0\nscale = 0", "scale", "must not be 0"),
            ("slave = 1\naddress = 0\nresponse_timeout = \"1ms\"", "response_timeout", "between 20ms and 10s"),
            ("slave = 1\naddress = 0\nresponse_timeout = 1e300", "response_timeout", "must be a duration between 20ms and 10s (got 1e+300 seconds)"),
        ])
    func modbusKeys(keys: String, key: String, message: String) throws {
        let failure = try #require(error(Self.modbus("tank1.ph", keys)))
        #expect(failure.key == "sensor \"tank1.ph\": \(key)")
        #expect(failure.line != nil)
        #expect(failure.message.contains(message), "\(failure.message)")
    }

    @Test(
        "libmodbus's float orders set word and byte order; a float comes out the same in each",
        arguments: [
            ("abcd", false, false, [UInt16(0x449A), 0x5000]),
            ("badc", false, true, [UInt16(0x9A44), 0x0050]),
            ("cdab", true, false, [UInt16(0x5000), 0x449A]),
            ("dcba", true, true, [UInt16(0x0050), 0x9A44]),
        ])
    func modbusFloatOrders(order: String, lowWordFirst: Bool, swapBytes: Bool, registers: [UInt16]) throws {
        #expect(Float(1234.5).bitPattern == 0x449A_5000)
        for extra in ["", "\nbyte_order = \"\(swapBytes ? "little" : "big")\""] {
            let text = Self.header + Self.modbus("t.f", "slave = 1\naddress = 0\ndata_type = \"float32\"\nword_order = \"\(order.uppercased())\"" + extra)
            let sensor = try #require(try AgentConfiguration.parse(ConfigDocument.parse(text, file: "t.toml")).sensors.first)
            let point = try ModbusSensorOptions(sensor).point
            #expect(point.lowWordFirst == lowWordFirst)
            #expect(point.swapBytes == swapBytes)
            #expect(point.decode(registers[...]) == 1234.5)
        }
    }

    @Test("function is the name, or the function code as a string or a TOML integer")
    func modbusFunctionCodes() throws {
        for (written, expected) in [("3", ModbusFunction.holding), ("4", .input), ("\"04\"", .input), ("\"input\"", .input), ("\"holding\"", .holding)] {
            let text = Self.header + Self.modbus("t.a", "slave = 1\naddress = 0\nfunction = \(written)")
            let sensor = try #require(try AgentConfiguration.parse(ConfigDocument.parse(text, file: "t.toml")).sensors.first)
            #expect(try ModbusSensorOptions(sensor).point.function == expected, "function = \(written)")
        }
    }

    @Test("A relative Modbus port resolves against the configuration file's directory, as every path does")
    func relativePort() throws {
        let text = Self.header + Self.modbus("a", "slave = 1\naddress = 0").replacingOccurrences(of: "/dev/ttyUSB0", with: "tty/bus")
        let sensor = try #require(try AgentConfiguration.parse(ConfigDocument.parse(text, file: "/etc/farmgate/agent.toml")).sensors.first)
        #expect(try ModbusSensorOptions(sensor).bus.port == "/etc/farmgate/tty/bus")
        let dotted = Self.header + Self.modbus("a", "slave = 1\naddress = 0").replacingOccurrences(of: "/dev/ttyUSB0", with: "../../dev/ttyUSB1")
        let up = try #require(try AgentConfiguration.parse(ConfigDocument.parse(dotted, file: "/etc/farmgate/agent.toml")).sensors.first)
        #expect(try ModbusSensorOptions(up).bus.port == "/dev/ttyUSB1")
        let empty = try #require(error(Self.modbus("a", "slave = 1\naddress = 0").replacingOccurrences(of: "\"/dev/ttyUSB0\"", with: "\"\"")))
        #expect(empty.key == "sensor \"a\": port")
    }

    @Test("One serial device named two ways (a by-id link and its target, or with /./) is one port: different settings are refused naming both")
    func modbusPortTwoSpellings() throws {
        let scratch = try Scratch(prefix: "fg-twopath")
        // A by-id style link to a character device that exists on every machine.
        let link = scratch.file("usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0")
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "/dev/null")
        func on(_ port: String, _ id: String, _ keys: String) -> String {
            Self.modbus(id, keys).replacingOccurrences(of: "/dev/ttyUSB0", with: port)
        }
        let twoSettings = on(link, "a", "slave = 1\naddress = 0") + on("/dev/null", "b", "slave = 2\naddress = 0\nbaud = 19200")
        let failure = try #require(error(twoSettings), "one device at two bauds was accepted")
        #expect(failure.key == "sensor \"b\": port")
        #expect(failure.message.contains("serial port /dev/null"), "\(failure)")
        #expect(failure.message.contains(link), "\(failure)")
        #expect(failure.message.contains("this one has Modbus RTU 19200 8N1"), "\(failure)")
        // The same settings: one bus, however it is written.
        #expect(error(on(link, "a", "slave = 1\naddress = 0") + on("/dev/null", "b", "slave = 2\naddress = 0")) == nil)
        // A device that does not exist here is compared by its normalised path.
        let missing = on("/dev/serial/by-id/usb-X-if00-port0", "a", "slave = 1\naddress = 0")
            + on("/dev/serial/./by-id//usb-X-if00-port0", "b", "slave = 2\naddress = 0\nparity = \"even\"")
        let normalised = try #require(error(missing), "one path written with /./ at two parities was accepted")
        #expect(normalised.message.contains("this one has Modbus RTU 9600 8E1"), "\(normalised)")
    }

    @Test("Two Modbus sensors on one port with different bus settings: the second is refused at its port line")
    func modbusBusMismatch() throws {
        let text = Self.modbus("tank1.ph", "slave = 1\naddress = 0") + "\n" + Self.modbus("tank1.ec", "slave = 2\naddress = 0\nbaud = 19200")
        let failure = try #require(error(text))
        #expect(failure.key == "sensor \"tank1.ec\": port")
        #expect(failure.line == 16)
        #expect(failure.message.contains("serial port /dev/ttyUSB0 is also used by sensor \"tank1.ph\" (line 8) with Modbus RTU 9600 8N1"))
        #expect(failure.message.contains("this one has Modbus RTU 19200 8N1"))
        // The same settings written differently are one bus.
        #expect(error(Self.modbus("a", "slave = 1\naddress = 0\nparity = \"N\"") + Self.modbus("b", "slave = 2\naddress = 0\nparity = \"none\"")) == nil)
    }

    @Test("A GPIO line used twice is refused, however the chip is written; a flow and a count sensor may share one")
    func gpioLineTwice() throws {
        let twice = Self.gpio("tank1.float", "state", "chip = \"gpiochip0\"\nline = 17") + Self.gpio("tank1.leak", "state", "chip = 0\nline = 17")
        let failure = try #require(error(twice))
        #expect(failure.key == "sensor \"tank1.leak\": line")
        #expect(failure.message.contains("GPIO line gpiochip0:17 is already used by sensor \"tank1.float\" (line 9)"))

        let shared = Self.gpio("loop.flow", "flow", "line = 27\npulses_per_litre = 450") + Self.gpio("loop.count", "count", "line = 27")
        #expect(error(shared) == nil)
        let twoFlows = shared + Self.gpio("loop.flow2", "flow", "line = 27\npulses_per_litre = 330")
        #expect(try #require(error(twoFlows)).message.contains("the flow of GPIO line gpiochip0:27 is already used by sensor \"loop.flow\""))
        let differentEdges = Self.gpio("loop.flow", "flow", "line = 27\npulses_per_litre = 450") + Self.gpio("loop.count", "count", "line = 27\nedge = \"falling\"")
        #expect(try #require(error(differentEdges)).message.contains("every sensor on it must use the same settings"))
        let stateAndFlow = Self.gpio("a", "state", "line = 5") + Self.gpio("b", "flow", "line = 5\npulses_per_litre = 1")
        #expect(try #require(error(stateAndFlow)).message.contains("only one sensor may use it"))
    }

    @Test(
        "Bad GPIO keys are located",
        arguments: [
            ("state", "chip = \"gpiochip0\"", "line", "is required"),
            ("state", "line = 600", "line", "between 0 and 511"),
            ("state", "line = 17\npulses_per_litre = 450", "pulses_per_litre", "only applies to pulse counting"),
            ("flow", "line = 17", "pulses_per_litre", "is required for a flow meter"),
            ("ph", "line = 17", "quantity", "measures \"state\""),
            ("state", "line = 17\nbias = \"pullup\"", "bias", "must be one of"),
            ("state", "line = 17\ndebounce = \"20s\"", "debounce", "between 0s and 10s"),
            ("state", "line = 17\nbackend = \"events\"", "events_file", "is required with backend"),
            ("state", "line = 17\nevents_file = \"/tmp/x\"", "events_file", "only applies with backend"),
        ])
    func gpioKeys(quantity: String, keys: String, key: String, message: String) throws {
        let failure = try #require(error(Self.gpio("s", quantity, keys)))
        #expect(failure.key == "sensor \"s\": \(key)")
        #expect(failure.message.contains(message), "\(failure.message)")
    }

    @Test("DS18B20 addresses are checked, and one probe cannot be two sensors")
    func ds18b20() throws {
        func sensor(_ id: String, _ address: String) -> String {
            "\n[[sensor]]\nid = \"\(id)\"\ndriver = \"ds18b20\"\nquantity = \"temperature\"\naddress = \"\(address)\"\n"
        }
        #expect(try #require(error(sensor("a", "28-xyz"))).message.contains("family, dash, 12 hex digits"))
        #expect(try #require(error(sensor("a", "2d-0316a2791aff"))).message.contains("not a w1-therm temperature sensor"))
        #expect(error(sensor("a", "28-0316A2791AFF")) == nil)
        let twice = try #require(error(sensor("a", "28-0316a2791aff") + sensor("b", "28-0316a2791aff")))
        #expect(twice.key == "sensor \"b\": address")
        #expect(twice.message.contains("is already used by sensor \"a\""))
        // However w1_root is spelt (a tester, 2026-12-07: a trailing slash, `//` or `..` made a second sensor of one probe).
        for root in ["/sys/bus/w1/devices/", "/sys/bus//w1/devices", "/sys/bus/w1/x/../devices", "/sys/bus/w1/./devices"] {
            let spelt = try #require(
                error(sensor("a", "28-0316a2791aff") + sensor("b", "28-0316a2791aff") + "w1_root = \"\(root)\"\n"), "\(root)")
            #expect(spelt.message.contains("is already used by sensor \"a\""), "\(root): \(spelt.message)")
            // Named as written in each sensor, not as resolved.
            #expect(spelt.message.hasPrefix("1-Wire device \(root)/28-0316a2791aff is already used"), "\(root): \(spelt.message)")
            #expect(spelt.message.contains("(the same device, written 1-Wire device /sys/bus/w1/devices/28-0316a2791aff there)"), "\(spelt.message)")
        }
        #expect(error(sensor("a", "28-0316a2791aff") + sensor("b", "28-0316a2791aff") + "w1_root = \"/tmp/other-bus\"\n") == nil)
        #expect(FileSystem.lexicallyNormalized("/a//b/./c/../d/") == "/a/b/d" && FileSystem.lexicallyNormalized("/../x") == "/x")
    }

    @Test("A DS18B20 measures temperature only: any other quantity is refused at its line, naming temperature", arguments: ["ph", "ec", "state", "flow", "do"])
    func ds18b20Quantity(quantity: String) throws {
        let text = "\n[[sensor]]\nid = \"tank1.ph\"\ndriver = \"ds18b20\"\nquantity = \"\(quantity)\"\naddress = \"28-000000000001\"\n"
        let failure = try #require(error(text))
        #expect(failure.key == "sensor \"tank1.ph\": quantity")
        #expect(failure.line == 7, "the quantity's line: \(failure)")
        #expect(failure.message.contains("measures \"temperature\" only, not \"\(quantity)\""), "\(failure.message)")
    }

    @Test("The registry lists the hardware drivers with samples that are themselves valid")
    func registry() throws {
        #expect(Set(DriverRegistry.standard.names).isSuperset(of: ["modbus", "ds18b20", "gpio", "simulated"]))
        for kind in ["modbus", "ds18b20", "gpio"] {
            let sample = try #require(DriverRegistry.standard.driver(named: kind)).sampleConfiguration
            let parsed = try AgentConfiguration.parse(ConfigDocument.parse(Self.header + sample, file: "sample.toml"))
            #expect(parsed.sensors.first?.driver == kind)
        }
    }
}

@Suite("Hardware example configurations")
struct DriverExamplesTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// Runs the real `farmgate` binary and returns its status and standard output.
    func farmgate(_ arguments: [String]) async throws -> (status: Int32, output: String) {
        let binary = builtExecutable("farmgate", environmentOverride: "FARMGATE_BINARY")
        return try await runProgram(binary, arguments)
    }

    @Test(
        "Each hardware example passes `farmgate config check`",
        arguments: [
            ("site-modbus.toml", ["tank1.ph", "tank1.ec", "tank1.temp", "modbus"]),
            ("site-ds18b20-gpio.toml", ["tank1.temp", "tank1.level_ok", "floor.leak", "loop.flow", "loop.pulses", "ds18b20", "gpio"]),
        ])
    func example(file: String, expected: [String]) async throws {
        // Its key_file (/etc/farmgate/device.key) does not exist here: a copy beside one that does.
        let scratch = try Scratch(prefix: "fg-example")
        let key = try scratch.write("device.key", "fgd_testkey2_" + String(repeating: "0123456789abcdef", count: 4) + "\n")
        let original = try String(contentsOfFile: Self.root.appendingPathComponent("examples/\(file)").path, encoding: .utf8)
        #expect(original.contains("\nkey_file = \"/etc/farmgate/device.key\""))
        let path = try scratch.write(file, original.replacingOccurrences(of: "\"/etc/farmgate/device.key\"", with: "\"\(key)\""))
        let result = try await farmgate(["config", "check", "-c", path])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("\(path): OK"))
        for word in expected { #expect(result.output.contains(word), "\(word) missing from: \(result.output)") }
    }

    @Test("Every agent configuration in examples/ passes `farmgate config check` without a warning (no key a driver ignores)")
    func everyExampleIsCheckedAndClean() async throws {
        let directory = Self.root.appendingPathComponent("examples").path
        let files = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".toml") }.sorted()
        var agentFiles: [String] = []
        for file in files {
            let text = try String(contentsOfFile: directory + "/" + file, encoding: .utf8)
            // The ingest's own configuration is checked by the ingest's tests (IngestConfiguration.load).
            if text.contains("\n[device]") || text.hasPrefix("[device]") { agentFiles.append(file) } else { #expect(file.contains("ingest"), "\(file) is neither an agent nor an ingest configuration") }
        }
        #expect(agentFiles.count >= 4, "\(agentFiles)")
        // Key files the examples name (/etc/farmgate/device.key, the demo's) do not exist here: each copy points at one
        // that does, and nothing else changes (no other path an example names is opened by the check).
        let scratch = try Scratch(prefix: "fg-all-examples")
        let key = try scratch.write("device.key", "fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n")
        for file in agentFiles {
            let original = try String(contentsOfFile: directory + "/" + file, encoding: .utf8)
            let text = original.split(separator: "\n", omittingEmptySubsequences: false).map { line in
                line.hasPrefix("key_file = ") ? "key_file = \"\(key)\"" : String(line)
            }.joined(separator: "\n")
            let path = try scratch.write(file, text)
            let result = try await farmgate(["config", "check", "-c", path])
            #expect(result.status == 0, "\(file): \(result.output)")
            #expect(result.output.contains("\(path): OK"), "\(file): \(result.output)")
            #expect(!result.output.contains("warning"), "\(file): \(result.output)")
        }
    }

    @Test("interval and deadband on a GPIO switch are warned about, located, and the configuration still passes; on a flow meter they apply")
    func ignoredKeysOnAGPIOSwitch() async throws {
        let scratch = try Scratch(prefix: "fg-ignored")
        let path = try scratch.write(
            "agent.toml",
            """
            [device]
            id = "site"

            [[sensor]]
            id = "tank1.level_ok"
            driver = "gpio"
            quantity = "state"
            line = 17
            interval = "1s"
            deadband = 0.5

            [[sensor]]
            id = "loop.flow"
            driver = "gpio"
            quantity = "flow"
            line = 27
            pulses_per_litre = 450
            interval = "10s"
            deadband = 0.1
            """)
        let configuration = try AgentConfiguration.load(path: path)
        #expect(configuration.warnings.map(\.description) == [
            "\(path):10: sensor \"tank1.level_ok\": deadband: has no effect here and is ignored: a GPIO switch stores every debounced change (a state is 0 or 1); remove it",
            "\(path):9: sensor \"tank1.level_ok\": interval: has no effect here and is ignored: a GPIO switch is not polled; every debounced change is stored as it happens, plus the unchanged state every heartbeat; remove it",
        ])
        let result = try await farmgate(["config", "check", "-c", path])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("warning     \(path):9: sensor \"tank1.level_ok\": interval: has no effect here"), "\(result.output)")
        #expect(!result.output.contains("loop.flow\": interval"), "\(result.output)")
    }

    @Test("Sensors on one port (an EC circuit's outputs, a Modbus bus) start on one phase, the others on i % 4")
    func sensorsOnOnePortShareAPhase() throws {
        func table(_ id: String, _ driver: String, _ quantity: String, _ keys: String) -> String {
            "\n[[sensor]]\nid = \"\(id)\"\ndriver = \"\(driver)\"\nquantity = \"\(quantity)\"\n\(keys)\n"
        }
        let ec = "port = \"/dev/ttyUSB1\""
        let text = DriverConfigurationTests.header
            + table("a.ph", "simulated", "ph", "")
            + table("t.ec", "ezo", "ec", ec) + table("t.tds", "ezo", "tds", ec) + table("t.sal", "ezo", "salinity", ec) + table("t.sg", "ezo", "specific_gravity", ec)
            + table("b.ph", "simulated", "ph", "")
            + table("m.1", "modbus", "ph", "port = \"/dev/ttyUSB0\"\nslave = 1\naddress = 0")
            + table("m.2", "modbus", "ph", "port = \"/dev/ttyUSB0\"\nslave = 2\naddress = 0")
        let configuration = try AgentConfiguration.parse(ConfigDocument.parse(text, file: "/etc/farmgate/agent.toml"))
        #expect(Sampler.phases(configuration.sensors) == [0, 1, 1, 1, 1, 1, 2, 2])
    }

    @Test("Without a resolution, a sensor gets one that holds what its device sends: EZO pH and RTD thousandths, a Modbus register its scale's decimal step, a float 0.01 or its quantity's decimal step; the DS18B20 1/16 °C; a set one wins")
    func resolutionHoldsWhatTheDeviceSends() throws {
        func table(_ id: String, _ driver: String, _ quantity: String, _ keys: String) -> String {
            "\n[[sensor]]\nid = \"\(id)\"\ndriver = \"\(driver)\"\nquantity = \"\(quantity)\"\n\(keys)\n"
        }
        let text = DriverConfigurationTests.header
            + table("ezo.temp", "ezo", "temperature", "port = \"/dev/ttyUSB1\"")
            + table("ezo.ph", "ezo", "ph", "port = \"/dev/ttyUSB2\"")
            + table("ezo.ec", "ezo", "ec", "port = \"/dev/ttyUSB3\"")
            + table("mb.tenth", "modbus", "temperature", "port = \"/dev/ttyUSB0\"\nslave = 1\naddress = 0\ndata_type = \"int16\"\nscale = 0.1")
            + table("mb.offset", "modbus", "temperature", "port = \"/dev/ttyUSB0\"\nslave = 1\naddress = 1\nscale = 0.0625\noffset = -40.05")
            + table("mb.sixteenth", "modbus", "temperature", "port = \"/dev/ttyUSB0\"\nslave = 1\naddress = 2\nscale = 0.0625")
            + table("mb.ph", "modbus", "ph", "port = \"/dev/ttyUSB0\"\nslave = 1\naddress = 3\nscale = 0.1")
            + table("mb.fine", "modbus", "ph", "port = \"/dev/ttyUSB0\"\nslave = 1\naddress = 4\nscale = 0.0001")
            + table("mb.set", "modbus", "temperature", "port = \"/dev/ttyUSB0\"\nslave = 1\naddress = 5\nscale = 0.1\nresolution = \"1/16\"")
            + table("w1.temp", "ds18b20", "temperature", "address = \"28-0000075a3b21\"")
            // A float register: temperature's 1/16 °C would round a transmitter's hundredths (a tester, 2026-12-07).
            + table("mb.float", "modbus", "temperature", "port = \"/dev/ttyUSB0\"\nslave = 2\naddress = 2\ndata_type = \"FLOAT32\"\nfunction = \"input\"")
            + table("mb.floatph", "modbus", "ph", "port = \"/dev/ttyUSB0\"\nslave = 2\naddress = 4\ndata_type = \"float32\"")
            + table("mb.floatset", "modbus", "temperature", "port = \"/dev/ttyUSB0\"\nslave = 2\naddress = 6\ndata_type = \"float32\"\nresolution = \"0.001\"")
            // A float's scale still sets a finer step (a review, 2026-12-07).
            + table("mb.floatscaled", "modbus", "temperature", "port = \"/dev/ttyUSB0\"\nslave = 2\naddress = 8\ndata_type = \"float32\"\nscale = 0.001")
            + table("mb.floatphscaled", "modbus", "ph", "port = \"/dev/ttyUSB0\"\nslave = 2\naddress = 10\ndata_type = \"float32\"\nscale = 0.001")
        let configuration = try AgentConfiguration.parse(ConfigDocument.parse(text, file: "/etc/farmgate/agent.toml"))
        let steps = Dictionary(uniqueKeysWithValues: configuration.sensors.map { ($0.id.rawValue, $0.descriptor.resolution) })
        let expected: [String: Resolution] = [
            "ezo.temp": .thousandth, "ezo.ph": .thousandth, "ezo.ec": .tenth, "mb.tenth": .tenth, "mb.offset": try Resolution(numerator: 1, denominator: 10_000),
            "mb.sixteenth": .sixteenth, "mb.ph": .hundredth, "mb.fine": try Resolution(numerator: 1, denominator: 10_000), "mb.set": .sixteenth,
            "w1.temp": .sixteenth, "mb.float": .hundredth, "mb.floatph": .hundredth, "mb.floatset": .thousandth,
            "mb.floatscaled": .thousandth, "mb.floatphscaled": .thousandth,
        ]
        for (id, resolution) in expected { #expect(steps[id] == resolution, "\(id): \(String(describing: steps[id]))") }
    }

    @Test("A broken copy of an example fails `farmgate config check` with the located error (exit 78)")
    func brokenExample() async throws {
        let scratch = try Scratch(prefix: "fg-examples")
        let text = try String(contentsOf: Self.root.appendingPathComponent("examples/site-modbus.toml"), encoding: .utf8)
        let key = try scratch.write("device.key", "fgd_testkey2_" + String(repeating: "0123456789abcdef", count: 4) + "\n")
        let broken = try scratch.write(
            "agent.toml",
            text.replacingOccurrences(of: "slave = 2\n", with: "slave = 300\n").replacingOccurrences(of: "\"/etc/farmgate/device.key\"", with: "\"\(key)\""))
        let result = try await farmgate(["config", "check", "-c", broken])
        #expect(result.status == 78)
        #expect(result.output.contains("\(broken):"))
        #expect(result.output.contains("sensor \"tank1.ec\": slave: must be a unit id between 1 and 247 (got 300)"), "\(result.output)")
    }

    @Test("`farmgate sensor drivers` lists the hardware drivers")
    func drivers() async throws {
        let result = try await farmgate(["sensor", "drivers"])
        #expect(result.status == 0)
        for kind in ["modbus:", "ds18b20:", "gpio:", "simulated:"] { #expect(result.output.contains(kind)) }
    }
}
