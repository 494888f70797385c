@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

/// `farmgate scan` against simulators on pseudo-terminals in a directory that stands in for /dev, a fake w1 tree and a
/// machine without GPIO chips.
@Suite("Scan", .serialized)
struct ScanTests {
    func options(dev: String, w1: String) -> ScanOptions {
        var options = ScanOptions()
        options.deviceDirectory = dev
        options.w1Root = w1
        options.modbusIDs = 1...4
        options.modbusTimeout = .milliseconds(150)
        options.ezoTimeout = .milliseconds(1500)
        options.portBudget = .seconds(20)
        return options
    }

    /// Which descriptors of this process are open on `device`, for a failure message: a port reported busy names its
    /// holder.
    static func holders(of device: String) -> String {
        let descriptors = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        let open = descriptors.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)")) == device }
        return "descriptors of this process on \(device): \(open.isEmpty ? "none" : open.joined(separator: ", "))"
    }

    @Test("EZO circuits at 9600 and 38400 baud, Modbus slaves on a bus, a port held by another opener: found, reported, pasteable")
    func serialPorts() async throws {
        let dir = try Scratch(prefix: "fg-scan", in: URL(fileURLWithPath: "/tmp"))
        let dev = dir.file("dev")
        try FileManager.default.createDirectory(atPath: dev + "/serial/by-id", withIntermediateDirectories: true)
        let ph = try EZOSimulator(.ph, path: dev + "/serial/by-id/usb-Atlas_pH-if00", firmware: "2.16", values: { _, _ in 6.1 })
        ph.setBaud(9600)
        let ec = try EZOSimulator(.ec, path: dev + "/serial/by-id/usb-Atlas_EC-if00", firmware: "2.15", values: { _, _ in 1413 })
        ec.setBaud(38400)
        let bus = try ModbusTestSlave(path: dev + "/ttyUSB0", answering: [1, 3])
        bus.set(slave: 1, address: 0, [700])
        let held = try EZOSimulator(.rtd, path: dev + "/ttyUSB1", values: { _, _ in 20 })
        defer {
            ph.stop()
            ec.stop()
            held.stop()
            bus.stop()
        }
        // Another program holds ttyUSB1 (the way the agent's drivers hold their ports).
        let holder = try SerialPort(path: held.path, settings: SerialSettings(baud: 9600))
        defer { withExtendedLifetime(holder) {} }

        let start = ContinuousClock.now
        let found = await SerialScan.scan(options(dev: dev, w1: dir.file("w1")))
        let took = ContinuousClock.now - start
        #expect(took < .seconds(20), "the scan took \(took)")

        let byPath = Dictionary(found.map { ($0.path, $0) }, uniquingKeysWith: { first, _ in first })
        #expect(found.count == 4, "\(found.map(\.path))")
        #expect(byPath[ph.path]?.ezo == EZOFinding(circuit: "pH", firmware: "2.16", baud: 9600))
        #expect(byPath[ec.path]?.ezo == EZOFinding(circuit: "EC", firmware: "2.15", baud: 38400))
        let modbus = try #require(byPath[bus.path])
        #expect(modbus.state == .found, "\(modbus.message ?? "no message"); \(Self.holders(of: SerialScan.resolve(bus.path)))")
        #expect(modbus.modbusSlaves == [
            ModbusFinding(slave: 1, baud: 9600, register0: 700, exception: nil),
            ModbusFinding(slave: 3, baud: 9600, register0: 0, exception: nil),
        ])
        #expect(bus.requests.contains { $0.slave == 2 } && bus.requests.contains { $0.slave == 4 })
        let busy = try #require(byPath[held.path])
        #expect(busy.state == .busy)
        #expect(held.commands.isEmpty, "the held port was written to: \(held.commands)")

        // The tables paste into a configuration that passes the check.
        let report = ScanReport(serialPorts: found, oneWire: OneWireFinding(root: "/sys/bus/w1/devices"), gpio: GPIOFinding())
        let text = report.text()
        #expect(text.contains("in use (by the running agent?)"))
        #expect(text.contains("baud = 38400"))
        let tables = try #require(text.components(separatedBy: "`farmgate config check`.\n").last)
        let configuration = try AgentConfiguration.parse(ConfigDocument.parse("[device]\nid = \"site\"\n\n" + tables, file: "pasted.toml"))
        #expect(configuration.sensors.map(\.driver) == ["ezo", "ezo", "modbus", "modbus"])
        #expect(configuration.sensors.map(\.id.rawValue) == ["tank1.ec", "tank2.ph", "bus1.slave1", "bus1.slave3"])
    }

    @Test("A circuit slower than the EZO probe's wait is never reported at the next baud its late answer arrives in")
    func lateEZOAnswerIsNotTakenForTheNextBaud() throws {
        let dir = try Scratch(prefix: "fg-scan", in: URL(fileURLWithPath: "/tmp"))
        // `i` answered after 750 ms, at any speed (a USB bridge that ignores the baud, or a pty).
        let slow = try EZOSimulator(.ph, path: dir.file("ttyUSB0"), timeScale: 2.5, values: { _, _ in 6 })
        slow.setBaud(nil)
        slow.setStreamsBetweenCommands(false)
        defer { slow.stop() }
        var scan = self.options(dev: dir.file("dev"), w1: dir.file("w1"))
        scan.bauds = [9600, 38400]
        scan.modbusIDs = 1...1
        scan.ezoTimeout = .milliseconds(500)
        let finding = try #require(SerialScan.probe(SerialScan.Candidate(path: slow.path, device: slow.path, listOnlyIfFound: false), options: scan))
        #expect(finding.ezo == nil || finding.ezo?.baud == 9600, "reported at \(finding.ezo?.baud ?? 0) baud")
        // With the default wait the datasheet's times fit: found at its own baud (a fresh circuit: the first one is
        // still answering the Modbus probes' bytes).
        let fresh = try EZOSimulator(.ph, path: dir.file("ttyUSB1"), timeScale: 2.5, values: { _, _ in 6 })
        fresh.setBaud(nil)
        fresh.setStreamsBetweenCommands(false)
        defer { fresh.stop() }
        scan.ezoTimeout = ScanOptions().ezoTimeout
        let found = try #require(SerialScan.probe(SerialScan.Candidate(path: fresh.path, device: fresh.path, listOnlyIfFound: false), options: scan))
        #expect(found.ezo?.baud == 9600, "\(String(describing: found.ezo))")
    }

    @Test("Modbus probes keep the RTU silent interval (t3.5) after the previous answer")
    func modbusProbesKeepSilentInterval() throws {
        let dir = try Scratch(prefix: "fg-scan", in: URL(fileURLWithPath: "/tmp"))
        let bus = try ModbusTestSlave(path: dir.file("ttyUSB0"), answering: [1, 2, 3, 4])
        defer { bus.stop() }
        var scan = self.options(dev: dir.file("dev"), w1: dir.file("w1"))
        scan.bauds = [9600]
        scan.ezoTimeout = .milliseconds(100)
        let finding = try #require(
            SerialScan.probe(SerialScan.Candidate(path: bus.path, device: bus.path, listOnlyIfFound: false), options: scan))
        #expect(finding.modbusSlaves.map(\.slave) == [1, 2, 3, 4])
        let requests = bus.requests
        #expect(requests.count == 4)
        let interval = ModbusBusSettings(port: bus.path, baud: 9600).silentInterval
        for (previous, next) in zip(requests, requests.dropFirst()) {
            let end = try #require(previous.answeredAt)
            #expect(next.receivedAt - end >= interval, "only \(next.receivedAt - end) between an answer and the next probe")
        }
    }

    // A tester, 2026-12-07: a transmitter answering after 150 ms was "no answer: check power, wiring" while it read fine.
    @Test("A Modbus slave slower than the scan's wait is found with a longer one; the wait it missed says how")
    func slowModbusSlave() throws {
        let dir = try Scratch(prefix: "fg-scan", in: URL(fileURLWithPath: "/tmp"))
        let bus = try ModbusTestSlave(path: dir.file("ttyUSB0"), answering: [2])
        defer { bus.stop() }
        bus.delayAnswers(of: 2, by: .milliseconds(250))
        var scan = self.options(dev: dir.file("dev"), w1: dir.file("w1"))
        scan.bauds = [9600]
        scan.ezoTimeout = .milliseconds(100)
        scan.modbusIDs = 1...2
        let candidate = SerialScan.Candidate(path: bus.path, device: bus.path, listOnlyIfFound: false)
        let missed = try #require(SerialScan.probe(candidate, options: scan))
        #expect(missed.modbusSlaves.isEmpty)
        #expect(missed.message?.contains("slower than the 150ms scan waits (--modbus-timeout 500ms") == true, "\(missed.message ?? "")")
        scan.modbusTimeout = .milliseconds(600)
        let found = try #require(SerialScan.probe(candidate, options: scan))
        #expect(found.modbusSlaves.map(\.slave) == [2])
    }

    @Test("Ports the running agent is configured for are not opened; a silent port is bounded by its budget")
    func agentPortsAndBudget() async throws {
        let dir = try Scratch(prefix: "fg-scan", in: URL(fileURLWithPath: "/tmp"))
        let dev = dir.file("dev")
        try FileManager.default.createDirectory(atPath: dev, withIntermediateDirectories: true)
        let agentOwned = try EZOSimulator(.ph, path: dev + "/ttyACM0", values: { _, _ in 6 })
        let silent = try EZOSimulator(.ph, path: dev + "/ttyACM1", values: { _, _ in 6 })
        silent.setBaudMismatch(true)
        defer {
            agentOwned.stop()
            silent.stop()
        }
        var options = options(dev: dev, w1: dir.file("w1"))
        options.agentPorts = [SerialScan.resolve(agentOwned.path): "used by the running agent (sensor tank1.ph)"]
        options.modbusIDs = 1...247
        options.portBudget = .seconds(2)
        let start = ContinuousClock.now
        let found = await SerialScan.scan(options)
        #expect(ContinuousClock.now - start < .seconds(5))
        #expect(found.first { $0.path == agentOwned.path }?.state == .agent)
        #expect(agentOwned.commands.isEmpty)
        let quiet = try #require(found.first { $0.path == silent.path })
        #expect(quiet.state == .silent)
        #expect(quiet.message?.contains("time budget") == true, "\(quiet.message ?? "-")")
    }

    @Test("A port held for a moment (ModemManager probing a new adapter) is waited for and found; held longer than the patience, it is busy")
    func briefHolderIsWaitedFor() async throws {
        let dir = try Scratch(prefix: "fg-scan", in: URL(fileURLWithPath: "/tmp"))
        let dev = dir.file("dev")
        try FileManager.default.createDirectory(atPath: dev, withIntermediateDirectories: true)
        let circuit = try EZOSimulator(.ph, path: dev + "/ttyUSB0", values: { _, _ in 6 })
        defer { circuit.stop() }
        var options = options(dev: dev, w1: dir.file("w1"))
        options.busyPatience = .milliseconds(1500)
        for (held, expected) in [(Duration.milliseconds(400), SerialPortFinding.State.found), (.milliseconds(2500), .busy)] {
            let holder = Mutex<SerialPort?>(try SerialPort(path: circuit.path, settings: SerialSettings(baud: 9600)))
            let release = Task {
                try? await Task.sleep(for: held)
                holder.withLock { $0 = nil }
            }
            let found = await SerialScan.scan(options)
            #expect(found.first { $0.path == circuit.path }?.state == expected, "held \(held)")
            await release.value
        }
    }

    @Test("On-board UARTs (ttyS, ttyAMA) get no probe bytes unless named with --port or opted into; ports without a UART never; the report says which were skipped and why")
    func onboardUARTsAreLeftAlone() async throws {
        let dir = try Scratch(prefix: "fg-scan", in: URL(fileURLWithPath: "/tmp"))
        let dev = dir.file("dev")
        try FileManager.default.createDirectory(atPath: dev, withIntermediateDirectories: true)
        // A console-like device on ttyS0 (an EZO circuit stands in: it records every byte written to it), a circuit on
        // the Pi's ttyAMA0, one on a USB adapter, and ttyS1 with no UART behind it.
        let console = try EZOSimulator(.ph, path: dev + "/ttyS0", values: { _, _ in 6 })
        let ama = try EZOSimulator(.ec, path: dev + "/ttyAMA0", values: { _, _ in 1413 })
        let empty = try EZOSimulator(.rtd, path: dev + "/ttyS1", values: { _, _ in 20 })
        let usb = try EZOSimulator(.ph, path: dev + "/ttyUSB0", values: { _, _ in 6 })
        defer {
            console.stop()
            ama.stop()
            empty.stop()
            usb.stop()
        }
        let noUART = SerialScan.resolve(empty.path)
        var options = options(dev: dev, w1: dir.file("w1"))
        options.detectUART = { device in device == noUART ? .none : SerialScan.detectUART(device) }

        // By default: only the USB adapter is probed.
        let report = await Scanner.scan(options, gpio: { GPIOFinding() })
        #expect(report.serialPorts.map(\.path) == [usb.path])
        #expect(report.serialPorts.first?.ezo?.circuit == "pH")
        #expect(Set(report.skippedPorts.map(\.path)) == [console.path, ama.path, empty.path])
        #expect(report.skippedPorts.first { $0.path == empty.path }?.reason == .noUART)
        #expect(report.skippedPorts.first { $0.path == console.path }?.reason == .onboardUART)
        #expect(console.commands.isEmpty && ama.commands.isEmpty && empty.commands.isEmpty, "probe bytes reached an on-board port")
        let text = report.text()
        #expect(text.contains("\(console.path): skipped: an on-board UART"), "\(text)")
        #expect(text.contains("--port \(ama.path)"))
        #expect(text.contains("skipped ttyS1: no UART behind it"), "\(text)")

        // Named with --port: probed, the others still not.
        options.explicitPorts = [console.path]
        let named = await SerialScan.scan(options)
        #expect(Set(named.map(\.path)) == [console.path, usb.path])
        #expect(named.first { $0.path == console.path }?.ezo?.circuit == "pH")
        #expect(ama.commands.isEmpty && empty.commands.isEmpty)

        // Opted in: every on-board port with a UART (or that cannot say) is probed; the one without a UART still is not.
        options.explicitPorts = []
        options.includeOnboardUARTs = true
        let all = await SerialScan.scan(options)
        #expect(Set(all.map(\.path)) == [console.path, ama.path, usb.path])
        #expect(all.first { $0.path == ama.path }?.ezo?.circuit == "EC")
        #expect(empty.commands.isEmpty)
    }

    @Test("UART detection: a pseudo-terminal answers no TIOCGSERIAL (unknown); PORT_UNKNOWN means no UART")
    func uartDetection() throws {
        let dir = try Scratch(prefix: "fg-uart", in: URL(fileURLWithPath: "/tmp"))
        let pty = try EZOSimulator(.ph, path: dir.file("ttyS7"), values: { _, _ in 6 })
        defer { pty.stop() }
        #expect(SerialScan.serialType(SerialScan.resolve(pty.path)) == .unknown)
        #expect(SerialScan.detectUART(SerialScan.resolve(pty.path)) == .unknown)
        #expect(SerialScan.detectUART(dir.file("no-such-port")) == .unknown)
        #expect(pty.commands.isEmpty, "detection wrote to the port")
        #expect(SerialScan.portUnknown == 0)
    }

    @Test("DS18B20s in a fake w1 tree: values, a CRC failure, and a missing bus")
    func oneWire() async throws {
        let dir = try Scratch(prefix: "fg-w1")
        let root = dir.file("w1")
        for (address, text) in [
            ("28-000000000001", "50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=21437\n"),
            ("28-000000000002", "50 05 4b 46 7f ff 0c 10 1c : crc=1d NO\n50 05 4b 46 7f ff 0c 10 1c t=21437\n"),
        ] {
            try FileManager.default.createDirectory(atPath: root + "/" + address, withIntermediateDirectories: true)
            try text.write(toFile: root + "/" + address + "/w1_slave", atomically: true, encoding: .utf8)
        }
        try FileManager.default.createDirectory(atPath: root + "/w1_bus_master1", withIntermediateDirectories: true)
        // Generous bounds: a file read under a loaded test run once took more than the default 2 s (the bounds have
        // their own test).
        let finding = await OneWireScan.scan(root: root, readTimeout: .seconds(30), overall: .seconds(60))
        #expect(finding.message == nil)
        #expect(finding.sensors.map(\.address) == ["28-000000000001", "28-000000000002"])
        #expect(finding.sensors[0].celsius == 21.437)
        #expect(finding.sensors[1].problem?.contains("CRC check failed") == true)
        let text = ScanReport(oneWire: finding, gpio: GPIOFinding()).text()
        #expect(text.contains("address = \"28-000000000001\"") && text.contains("w1_root = \"\(root)\""))
        #expect(text.contains("28-000000000001: DS18B20, 21.437 °C"), "\(text)")
        // A tester, 2026-12-07: a family-10 device was listed as a DS18B20.
        #expect(ScanReport.w1ThermName("10-000000000009") == "DS18S20" && ScanReport.w1ThermName("28-000000000009") == "DS18B20")
        let none = ScanReport(oneWire: OneWireFinding(root: root), gpio: GPIOFinding()).text()
        #expect(none.contains("no w1-therm temperature sensor (DS18B20 28-*, DS18S20 10-*"), "\(none)")

        let missing = await OneWireScan.scan(root: dir.file("no-such-bus"))
        #expect(missing.message?.contains("dtoverlay=w1-gpio") == true)
    }

    // A tester, 2026-12-07: scan's 1-Wire reads had no overall limit, 2 s for each probe of a hung bus.
    @Test("A hung 1-Wire bus holds the scan at most its overall time; the probes not read are listed as such")
    func hungOneWireBus() async throws {
        let dir = try Scratch(prefix: "fg-w1hung")
        let root = dir.file("devices")
        // Eight probes whose w1_slave is a FIFO nobody writes: opening it blocks, as a read of a hung bus does.
        for index in 1...8 {
            let address = String(format: "28-%012d", index)
            try FileManager.default.createDirectory(atPath: root + "/" + address, withIntermediateDirectories: true)
            #expect(mkfifo(root + "/" + address + "/w1_slave", 0o600) == 0)
        }
        let started = ContinuousClock.now
        // Without the overall limit: 8 × 0.5 s. With it: the reads begun within the first second.
        let finding = await OneWireScan.scan(root: root, readTimeout: .milliseconds(500), overall: .seconds(1))
        let took = started.duration(to: .now)
        #expect(took < .seconds(3), "took \(took)")
        #expect(finding.sensors.count == 8)
        let unanswered = finding.sensors.filter { $0.problem?.contains("no answer within 0.5 seconds") == true }.count
        let skipped = finding.sensors.filter { $0.problem?.hasPrefix("not read: the scan's 1.0 seconds for 1-Wire ran out") == true }
        #expect((1...3).contains(unanswered), "\(finding.sensors.map { $0.problem ?? "-" })")
        #expect(skipped.count == 8 - unanswered)
        #expect(skipped.first?.problem?.contains("not answering within 0.5 seconds") == true, "\(skipped.first?.problem ?? "-")")
        // Unblock the threads left in open(2).
        for index in 1...8 {
            let fd = open(root + "/" + String(format: "28-%012d", index) + "/w1_slave", O_WRONLY | O_NONBLOCK)
            if fd >= 0 { close(fd) }
        }
    }

    @Test("No gpiochip under the device directory is said plainly, through the libgpiod binding")
    func noGPIOChip() throws {
        let dir = try Scratch(prefix: "fg-gpio")
        let finding = GPIOScan.scan(deviceDirectory: dir.path)
        #expect(finding.chips.isEmpty)
        #expect(finding.message?.hasPrefix("no GPIO chip: \(dir.path) has no gpiochip device") == true, "\(finding.message ?? "-")")
    }

    @Test("Modbus RTU frames: the request's CRC, answers and exceptions found behind noise, incomplete answers wait")
    func modbusFrames() {
        #expect(ModbusRTU.readHoldingRequest(slave: 1, address: 0, count: 1) == [0x01, 0x03, 0x00, 0x00, 0x00, 0x01, 0x84, 0x0A])
        let answer: [UInt8] = [0x01, 0x03, 0x02, 0x02, 0xBC]
        let crc = ModbusRTU.crc16(answer)
        let frame = answer + [UInt8(crc & 0xFF), UInt8(crc >> 8)]
        #expect(ModbusRTU.parseReadAnswer([0xFF, 0x01] + frame, slave: 1) == .registers([700]))
        for cut in 0..<frame.count { #expect(ModbusRTU.parseReadAnswer(Array(frame.prefix(cut)), slave: 1) == nil) }
        let exception: [UInt8] = [0x02, 0x83, 0x02]
        let ecrc = ModbusRTU.crc16(exception)
        #expect(ModbusRTU.parseReadAnswer(exception + [UInt8(ecrc & 0xFF), UInt8(ecrc >> 8)], slave: 2) == .exception(2))
        #expect(ModbusRTU.parseReadAnswer(frame, slave: 2) == nil)
    }
}
