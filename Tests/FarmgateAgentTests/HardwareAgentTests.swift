@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("The real agent on simulated hardware")
struct HardwareAgentTests {
    /// `farmgate agent` reads a Modbus bus (a libmodbus slave on a pseudo-terminal, with a silent slave), a DS18B20 in
    /// a fake w1 tree and GPIO lines driven by event files; the Modbus adapter is unplugged and replugged while it runs.
    /// Every reading lands in the buffer with the values the simulators served, and the bus resumes without a restart.
    @Test("Modbus, DS18B20 and GPIO readings reach the buffer; a replugged RS-485 adapter resumes without a restart")
    func agentReadsHardware() async throws {
        let scratch = try Scratch(prefix: "fg-hw", in: URL(fileURLWithPath: "/tmp"))
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [250, 612])
        let tree = try FakeW1Tree()
        try tree.slave("28-0316a2791aff", millidegrees: 21_500)
        let floatEvents = try scratch.write("float.events", "level 0\nnow 10\n")
        let flowEvents = try scratch.write("flow.events", "level 0\nnow 10\nrise 10.1\nfall 10.2\nrise 10.3\nfall 10.4\n")
        let buffer = scratch.file("buffer.sqlite")
        let configuration = try scratch.write(
            "agent.toml",
            """
            [device]
            id = "hw-site"
            [buffer]
            path = "\(buffer)"
            commit_interval = "100ms"
            [control]
            socket = "\(scratch.file("control.sock"))"
            [clock]
            check = false

            [[sensor]]
            id = "tank1.ph"
            driver = "modbus"
            quantity = "ph"
            interval = "300ms"
            port = "\(slave.path)"
            slave = 1
            address = 1
            scale = 0.01

            [[sensor]]
            id = "tank1.temp"
            driver = "modbus"
            quantity = "temperature"
            interval = "300ms"
            port = "\(slave.path)"
            slave = 1
            address = 0
            scale = 0.1

            [[sensor]]
            id = "tank2.ph"
            driver = "modbus"
            quantity = "ph"
            interval = "300ms"
            port = "\(slave.path)"
            slave = 7
            address = 1
            response_timeout = "150ms"

            [[sensor]]
            id = "tank1.water"
            driver = "ds18b20"
            quantity = "temperature"
            interval = "300ms"
            address = "28-0316a2791aff"
            w1_root = "\(tree.root)"

            [[sensor]]
            id = "tank1.level_ok"
            driver = "gpio"
            quantity = "state"
            interval = "300ms"
            line = 17
            active_low = true
            backend = "events"
            events_file = "\(floatEvents)"

            [[sensor]]
            id = "loop.pulses"
            driver = "gpio"
            quantity = "count"
            interval = "300ms"
            line = 27
            backend = "events"
            events_file = "\(flowEvents)"
            """)
        let binary = builtExecutable("farmgate", environmentOverride: "FARMGATE_BINARY")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["agent", "-c", configuration]
        let log = scratch.file("agent.log")
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = process.standardError
        try process.run()
        // Never left running by a test that stops early: it would go on opening its ports' paths, and a pseudo-terminal
        // number given to another test's circuit later would be taken by it.
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }

        // Running: the bus answers; then the adapter goes away for a while and comes back with new values.
        let answered = await eventually(timeout: .seconds(20)) { slave.requestCount(slave: 1) >= 3 }
        #expect(answered, "the agent never asked the Modbus slave: \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        try await Task.sleep(for: .milliseconds(500))
        slave.unplug()
        try await Task.sleep(for: .milliseconds(800))
        slave.set(slave: 1, address: 0, [240, 640])
        let before = slave.requestCount(slave: 1)
        try slave.replug()
        let resumed = await eventually(timeout: .seconds(20)) { slave.requestCount(slave: 1) >= before + 3 }
        #expect(resumed, "the bus did not resume after the replug")
        try await Task.sleep(for: .milliseconds(700))
        kill(process.processIdentifier, SIGTERM)
        let exited = await eventually(timeout: .seconds(20)) { !process.isRunning }
        #expect(exited)
        if !exited { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")

        let store = try ReadingBuffer(
            configuration: BufferConfiguration(path: buffer), logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
        let readings = try await store.pending(limit: 100_000, from: .oldest)
        try await store.close()
        func values(_ sensor: String) -> [Double] { readings.filter { $0.sensor.rawValue == sensor }.map(\.value) }

        let ph = values("tank1.ph")
        #expect(ph.first == 6.12, "\((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        #expect(ph.last == 6.4, "readings after the replug carry the new value: \(ph)")
        #expect(Set(ph).isSubset(of: [6.12, 6.4]))
        #expect(Set(values("tank1.temp")).isSubset(of: [25, 24]) && values("tank1.temp").contains(24))
        // One request per round fed both tank1 sensors: never more requests than pH readings plus failed rounds.
        #expect(slave.requests.filter { $0.slave == 1 }.allSatisfy { $0.address == 0 && $0.count == 2 })
        // The silent transmitter produced no reading, but was asked (and cost the others no reading).
        #expect(values("tank2.ph").isEmpty)
        #expect(slave.requestCount(slave: 7) > 0)
        #expect(Set(values("tank1.water")) == [21.5])
        #expect(Set(values("tank1.level_ok")) == [1])
        #expect(values("loop.pulses").last == 2)
    }
}
