@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// Every driver builds while its device is missing (an unplugged adapter, a bus not enabled, no GPIO chip): the agent
/// starts, and the sensor's reads fail with what to check until the device is there.
@Suite("Drivers with their device missing at start", .serialized)
struct MissingDeviceTests {
    @Test("ezo, modbus, ds18b20 and gpio build without their device and read as disconnected with what to check")
    func everyDriverStarts() async throws {
        let dir = try Scratch(prefix: "fg-missing", in: URL(fileURLWithPath: "/tmp"))
        let text = """
            [device]
            id = "site"

            [[sensor]]
            id = "tank1.ph"
            driver = "ezo"
            quantity = "ph"
            port = "\(dir.file("no-ezo"))"

            [[sensor]]
            id = "tank2.ph"
            driver = "modbus"
            quantity = "ph"
            port = "\(dir.file("no-rs485"))"
            slave = 1
            address = 1
            data_type = "uint16"
            scale = 0.01

            [[sensor]]
            id = "tank1.temp"
            driver = "ds18b20"
            quantity = "temperature"
            address = "28-000000000001"
            w1_root = "\(dir.file("no-w1"))"

            [[sensor]]
            id = "tank1.level"
            driver = "gpio"
            quantity = "state"
            chip = "gpiochip9"
            line = 17

            """
        let configuration = try AgentConfiguration.parse(ConfigDocument.parse(text, file: dir.file("agent.toml")))
        let logger = Logger(label: "test")
        let context = DriverContext.site(configuration.sensors, logger: logger)
        var errors: [String: String] = [:]
        for sensor in configuration.sensors {
            let description = try #require(DriverRegistry.standard.driver(named: sensor.driver))
            let driver = try description.make(sensor, context)
            let reader = Sampler.Sensor(configuration: sensor, driver: driver)
            // GPIO requests its line on a thread of its own: give it the time of one attempt.
            var outcome = await reader.readOnce()
            if sensor.driver == "gpio" {
                _ = await eventually(timeout: .seconds(5)) {
                    outcome = await reader.readOnce()
                    return outcome.failureKind == .disconnected
                }
            }
            if case .failure(let error) = outcome { errors[sensor.id.rawValue] = error.description }
            #expect(outcome.failureKind == .disconnected, "\(sensor.id): \(outcome)")
            await driver.close()
        }
        #expect(errors["tank1.ph"]?.contains("is the USB adapter plugged in?") == true, "\(errors)")
        #expect(errors["tank2.ph"]?.contains("is the USB RS-485 adapter plugged in?") == true, "\(errors)")
        #expect(errors["tank1.temp"]?.contains("no 1-Wire bus") == true, "\(errors)")
        #expect(errors["tank1.level"]?.contains("gpiodetect") == true, "\(errors)")
    }
}
