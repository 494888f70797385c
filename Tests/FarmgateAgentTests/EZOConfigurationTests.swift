@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Testing

@Suite("EZO configuration")
struct EZOConfigurationTests {
    func error(_ sensors: String) -> ConfigurationError? {
        do {
            _ = try AgentConfiguration.parse(ConfigDocument.parse("[device]\nid = \"site\"\n" + sensors, file: "/etc/farmgate/agent.toml"))
            return nil
        } catch {
            return error
        }
    }

    static func sensor(_ id: String, _ quantity: String, port: String, _ extra: String = "") -> String {
        """

        [[sensor]]
        id = "\(id)"
        driver = "ezo"
        quantity = "\(quantity)"
        port = "\(port)"
        \(extra)
        """
    }

    @Test("A port shared by two sensors with different bauds is refused where the second says so")
    func sharedPortBauds() throws {
        let text = Self.sensor("tank1.ec", "ec", port: "/dev/ttyUSB0") + Self.sensor("tank1.tds", "tds", port: "/dev/ttyUSB0", "baud = 38400")
        let failure = try #require(error(text))
        #expect(failure.key == "sensor \"tank1.tds\": baud", "\(failure)")
        #expect(failure.line == 15, "\(failure)")
        #expect(failure.message.contains("also used by sensor \"tank1.ec\" at 9600 baud"), "\(failure)")
    }

    @Test("A compensation source that does not exist, or is no temperature, is refused")
    func compensationSource() throws {
        let missing = try #require(error(Self.sensor("tank1.ph", "ph", port: "/dev/ttyUSB0", "temperature_sensor = \"tank1.tmp\"")))
        #expect(missing.key == "sensor \"tank1.ph\": temperature_sensor")
        #expect(missing.line == 9)
        #expect(missing.message.contains("no sensor \"tank1.tmp\""), "\(missing)")
        let notTemperature = try #require(error(
            Self.sensor("tank1.ph", "ph", port: "/dev/ttyUSB0", "temperature_sensor = \"tank1.ec\"")
                + Self.sensor("tank1.ec", "ec", port: "/dev/ttyUSB1")))
        #expect(notTemperature.message.contains("measures ec, not temperature"), "\(notTemperature)")
        let onRTD = try #require(error(Self.sensor("tank1.temp", "temperature", port: "/dev/ttyUSB0", "temperature_sensor = \"tank1.temp\"")))
        #expect(onRTD.message.contains("only pH, EC and DO circuits"), "\(onRTD)")
    }

    @Test("Outputs of one circuit that name different temperature sensors are refused: the circuit has one compensation temperature")
    func siblingCompensationSources() throws {
        let temperatures = """

            [[sensor]]
            id = "tank1.temp"
            driver = "simulated"
            quantity = "temperature"

            [[sensor]]
            id = "tank2.temp"
            driver = "simulated"
            quantity = "temperature"
            """
        let different = try #require(error(
            Self.sensor("tank1.ec", "ec", port: "/dev/ttyUSB0", "temperature_sensor = \"tank1.temp\"")
                + Self.sensor("tank1.tds", "tds", port: "/dev/ttyUSB0", "temperature_sensor = \"tank2.temp\"") + temperatures))
        #expect(different.key == "sensor \"tank1.tds\": temperature_sensor", "\(different)")
        #expect(different.message.contains("\"tank1.ec\""), "\(different)")
        #expect(different.message.contains("tank1.temp"), "\(different)")
        #expect(different.message.contains("one compensation temperature"), "\(different)")
        let ages = try #require(error(
            Self.sensor("tank1.ec", "ec", port: "/dev/ttyUSB0", "temperature_sensor = \"tank1.temp\"\ntemperature_max_age = \"1m\"")
                + Self.sensor("tank1.tds", "tds", port: "/dev/ttyUSB0", "temperature_sensor = \"tank1.temp\"\ntemperature_max_age = \"5m\"") + temperatures))
        #expect(ages.key == "sensor \"tank1.tds\": temperature_max_age", "\(ages)")
        // The same source on both, or on one only (the other output inherits it): accepted.
        #expect(error(
            Self.sensor("tank1.ec", "ec", port: "/dev/ttyUSB0", "temperature_sensor = \"tank1.temp\"")
                + Self.sensor("tank1.tds", "tds", port: "/dev/ttyUSB0", "temperature_sensor = \"tank1.temp\"") + temperatures) == nil)
        #expect(error(
            Self.sensor("tank1.ec", "ec", port: "/dev/ttyUSB0")
                + Self.sensor("tank1.tds", "tds", port: "/dev/ttyUSB0", "temperature_sensor = \"tank1.temp\"") + temperatures) == nil)
    }

    @Test("Two circuits on one port, the same output twice, a port shared with another driver, bad keys")
    func portClaims() throws {
        let twoCircuits = try #require(error(Self.sensor("a.ph", "ph", port: "/dev/ttyUSB0") + Self.sensor("a.temp", "temperature", port: "/dev/ttyUSB0")))
        #expect(twoCircuits.key == "sensor \"a.temp\": port")
        #expect(twoCircuits.message.contains("each EZO circuit has its own port"), "\(twoCircuits)")
        let sameOutput = try #require(error(Self.sensor("a.ec", "ec", port: "/dev/ttyUSB0") + Self.sensor("b.ec", "ec", port: "/dev/ttyUSB0")))
        #expect(sameOutput.message.contains("different outputs"), "\(sameOutput)")
        let baud = try #require(error(Self.sensor("a.ph", "ph", port: "/dev/ttyUSB0", "baud = 9601")))
        #expect(baud.message.contains("must be one of"), "\(baud)")
        let quantity = try #require(error(Self.sensor("a.flow", "flow", port: "/dev/ttyUSB0")))
        #expect(quantity.key == "sensor \"a.flow\": quantity")
        let noPort = try #require(error("\n[[sensor]]\nid = \"a.ph\"\ndriver = \"ezo\"\nquantity = \"ph\""))
        #expect(noPort.message == "is required")
        #expect(noPort.key == "sensor \"a.ph\": port")
    }

    @Test("One device written two ways (a link and its target, /dev/./tty…) is refused, whatever the circuits: the agent keeps one session per port as written")
    func onePortTwoSpellings() throws {
        let scratch = try Scratch(prefix: "fg-ezo-ports")
        let link = scratch.file("serial-by-id")
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "/dev/null")
        for (first, second) in [("/dev/null", link), ("/dev/null", "/dev/./null"), (link, "/dev/null")] {
            // Two outputs of one EC circuit (fine on one spelling), two pH circuits, two bauds: all refused by the spelling.
            for (a, b) in [
                (Self.sensor("a.ec", "ec", port: first), Self.sensor("a.tds", "tds", port: second)),
                (Self.sensor("a.ph", "ph", port: first), Self.sensor("b.ph", "ph", port: second)),
                (Self.sensor("a.ec", "ec", port: first), Self.sensor("a.tds", "tds", port: second, "baud = 19200")),
            ] {
                let failure = try #require(error(a + b), "\(first) and \(second) passed")
                #expect(failure.key?.hasSuffix(": port") == true, "\(failure)")
                #expect(failure.message.contains("names the same device as \(first)"), "\(failure)")
            }
        }
        #expect(error(Self.sensor("a.ec", "ec", port: link) + Self.sensor("a.tds", "tds", port: link)) == nil, "one spelling is fine")
    }

    @Test("examples/site-ezo.toml passes `farmgate config check`")
    func example() async throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let text = try String(contentsOf: root.appendingPathComponent("examples/site-ezo.toml"), encoding: .utf8)
        // The example names /etc/farmgate/device.key; point it at a key that exists here, and change nothing else.
        let dir = try Scratch(prefix: "fg-ezo-example")
        let key = try dir.write("device.key", "fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n")
        #expect(text.contains("\"/etc/farmgate/device.key\""))
        let config = try dir.write("site-ezo.toml", text.replacingOccurrences(of: "/etc/farmgate/device.key", with: key))
        let binary = builtExecutable("farmgate")
        let (status, output) = try await runProgram(binary, ["config", "check", "--config", config])
        #expect(status == 0, "\(output)")
        #expect(output.contains("sensors     4"), "\(output)")
        #expect(output.contains("tank1.tds"), "\(output)")

        // And the same file with the compensation source misspelled fails with its location.
        let broken = try dir.write("broken.toml", text.replacingOccurrences(of: "/etc/farmgate/device.key", with: key)
            .replacingOccurrences(of: "temperature_sensor = \"tank1.temp\"  #", with: "temperature_sensor = \"tank1.tmp\"  #"))
        let (brokenStatus, brokenOutput) = try await runProgram(binary, ["config", "check", "--config", broken], capturing: .standardError)
        #expect(brokenStatus == 78)
        #expect(brokenOutput.contains("broken.toml:29: sensor \"tank1.ph\": temperature_sensor: no sensor \"tank1.tmp\""), "\(brokenOutput)")
    }
}
