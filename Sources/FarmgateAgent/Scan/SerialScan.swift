import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// What `farmgate scan` looks at and how long it may take.
public struct ScanOptions: Sendable {
    /// Where the device files are (`/dev`; a test's directory of links to pseudo-terminals). Ports are its
    /// `serial/by-id/*` links first, then `ttyUSB*`, `ttyACM*`, `ttyAMA*` and `ttyS*` not already named by a link.
    public var deviceDirectory = "/dev"
    /// Ports named on the command line (`--port`): probed whatever their kind, an on-board UART too.
    public var explicitPorts: [String] = []
    /// Whether on-board UARTs (`ttyS*`, `ttyAMA*`) are probed (`--onboard-uarts`). Off by default: they are often wired to
    /// a serial console or another device, which must not receive probe bytes. Ports without a UART are never probed.
    public var includeOnboardUARTs = false
    /// Tells whether a UART is behind an on-board port (a test replaces it; see ``SerialScan/detectUART(_:)``).
    public var detectUART: @Sendable (_ device: String) -> UARTDetection = { SerialScan.detectUART($0) }
    /// The bauds tried, in order: EZO circuits leave the factory at 9600.
    public var bauds: [Int] = [9600, 38400, 115_200, 19200, 57600]
    /// The Modbus unit ids asked for.
    public var modbusIDs: ClosedRange<Int> = 1...16
    /// Where the kernel lists 1-Wire devices.
    public var w1Root = "/sys/bus/w1/devices"
    /// How long an EZO circuit has to answer `i` (the probe's leading carriage return is a command too: about 300 ms
    /// each by the datasheet).
    public var ezoTimeout: Duration = .milliseconds(1200)
    /// How long a Modbus slave has to answer.
    public var modbusTimeout: Duration = .milliseconds(150)
    /// The most one port's probing may take, whatever answers.
    public var portBudget: Duration = .seconds(30)
    /// How long a port that is in use is tried again before it is reported busy: a program may hold a new port for a
    /// moment (ModemManager probes every new ttyUSB and ttyACM when it appears).
    public var busyPatience: Duration = .seconds(1)
    /// Ports the running agent is configured to use (resolved device → why), which are not opened at all.
    public var agentPorts: [String: String] = [:]

    public init() {}
}

/// Finds serial ports and what answers on them, without fighting anyone for a port: each port is opened with the
/// exclusive lock the drivers take (non-blocking, tried again for ``ScanOptions/busyPatience`` before a held port is
/// reported busy), and every probe has a deadline inside the port's budget.
public enum SerialScan {
    /// A port to probe.
    public struct Candidate: Sendable, Hashable {
        public var path: String
        public var device: String
        /// Built-in UARTs (`ttyS*`) are listed only when something answers: most PCs have 32 that lead nowhere.
        public var listOnlyIfFound: Bool
    }

    /// What the scan will probe and what it leaves alone.
    public struct Plan: Sendable {
        public var probe: [Candidate] = []
        public var skipped: [SkippedPort] = []
    }

    /// The ports under `deviceDirectory` that are safe to probe: `serial/by-id` links first, then `ttyUSB*` and `ttyACM*`
    /// (USB serial adapters, which lead to whatever the installer plugged in). On-board UARTs (`ttyAMA*`, `ttyS*`) are
    /// skipped, each with the reason, unless named in ``ScanOptions/explicitPorts`` or ``ScanOptions/includeOnboardUARTs``
    /// is set: a Raspberry Pi's ttyAMA0 or a PC's ttyS0 is often a serial console, a modem or a UPS, and `i\r` written
    /// to it lands there. A port the kernel reports without a UART (PORT_UNKNOWN: most of a PC's 32 ttyS) is never probed
    /// unless named.
    public static func plan(_ options: ScanOptions) -> Plan {
        var plan = Plan()
        var devices: Set<String> = []
        for path in options.explicitPorts {
            let device = resolve(path)
            guard devices.insert(device).inserted else { continue }
            plan.probe.append(Candidate(path: path, device: device, listOnlyIfFound: false))
        }
        let deviceDirectory = options.deviceDirectory
        let byID = deviceDirectory + "/serial/by-id"
        for name in (try? FileManager.default.contentsOfDirectory(atPath: byID))?.sorted() ?? [] {
            let path = byID + "/" + name
            let device = resolve(path)
            guard devices.insert(device).inserted else { continue }
            plan.probe.append(Candidate(path: path, device: device, listOnlyIfFound: false))
        }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: deviceDirectory)) ?? []
        for prefix in ["ttyUSB", "ttyACM", "ttyAMA", "ttyS"] {
            let matching = names.filter { $0.hasPrefix(prefix) && Int($0.dropFirst(prefix.count)) != nil }
                .sorted { Int($0.dropFirst(prefix.count)) ?? 0 < Int($1.dropFirst(prefix.count)) ?? 0 }
            for name in matching {
                let path = deviceDirectory + "/" + name
                let device = resolve(path)
                guard devices.insert(device).inserted else { continue }
                guard prefix == "ttyAMA" || prefix == "ttyS" else {
                    plan.probe.append(Candidate(path: path, device: device, listOnlyIfFound: false))
                    continue
                }
                switch options.detectUART(device) {
                case .none:
                    plan.skipped.append(SkippedPort(path: path, device: device, reason: .noUART))
                case .uart, .unknown:
                    if options.includeOnboardUARTs {
                        plan.probe.append(Candidate(path: path, device: device, listOnlyIfFound: false))
                    } else {
                        plan.skipped.append(SkippedPort(path: path, device: device, reason: .onboardUART))
                    }
                }
            }
        }
        return plan
    }

    /// The ports `scan` would probe, for callers that only list them.
    public static func candidates(in deviceDirectory: String) -> [Candidate] {
        var options = ScanOptions()
        options.deviceDirectory = deviceDirectory
        return plan(options).probe
    }

    /// Whether a UART is behind `device`, without writing to it: the kernel's `/sys/class/tty/<name>/type` (no open at
    /// all: opening a port raises its modem lines, which resets some boards), else `TIOCGSERIAL` on a read-only,
    /// non-blocking open. Type 0 is PORT_UNKNOWN: the port exists but no UART answered the kernel's probe at boot.
    public static func detectUART(_ device: String) -> UARTDetection {
        let name = URL(fileURLWithPath: device).lastPathComponent
        if let text = try? String(contentsOfFile: "/sys/class/tty/\(name)/type", encoding: .utf8),
            let type = Int32(text.trimmingWhitespace())
        {
            return type == portUnknown ? .none : .uart(type: type)
        }
        return serialType(device)
    }

    /// `TIOCGSERIAL`'s answer for `device`: `.unknown` when the ioctl is not supported (a pseudo-terminal, a USB ACM
    /// device) or the port cannot be opened.
    public static func serialType(_ device: String) -> UARTDetection {
        let fd = Glibc.open(device, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
        guard fd >= 0 else { return .unknown }
        defer { close(fd) }
        // struct serial_struct starts with `int type`; the buffer is larger than the struct on every architecture.
        var buffer = [Int32](repeating: -1, count: 64)
        let result = buffer.withUnsafeMutableBytes { bytes -> Int32 in
            guard let pointer = bytes.baseAddress else { return -1 }
            return ioctl(fd, UInt(TIOCGSERIAL), pointer)
        }
        guard result == 0, let type = buffer.first, type >= 0 else { return .unknown }
        return type == portUnknown ? .none : .uart(type: type)
    }

    /// PORT_UNKNOWN in linux/serial.h.
    static let portUnknown: Int32 = 0

    /// The serial ports `configuration`'s sensors use, by resolved device, with the sensor that uses each.
    public static func agentPorts(_ configuration: AgentConfiguration) -> [String: String] {
        var ports: [String: String] = [:]
        let base = URL(fileURLWithPath: configuration.file).deletingLastPathComponent().path
        for sensor in configuration.sensors {
            guard case .string(let raw)? = sensor.options.value("port") else { continue }
            let device = resolve(AgentConfiguration.resolve(raw, against: base))
            ports[device] = "used by the running agent (sensor \(sensor.id))"
        }
        return ports
    }

    /// `path` with every link followed (itself when it cannot be resolved).
    public static func resolve(_ path: String) -> String {
        guard let real = realpath(path, nil) else { return path }
        defer { free(real) }
        return String(cString: real)
    }

    /// Probes every port ``plan(_:)`` allows, each on a thread of its own, all at once; ports that lead nowhere are left
    /// out.
    public static func scan(_ options: ScanOptions) async -> [SerialPortFinding] {
        await scan(plan(options).probe, options: options)
    }

    static func scan(_ ports: [Candidate], options: ScanOptions) async -> [SerialPortFinding] {
        let findings = await withTaskGroup(of: (Int, SerialPortFinding?).self) { group in
            for (index, candidate) in ports.enumerated() {
                group.addTask {
                    let finding = try? await runOffPool(name: "farmgate-scan") { probe(candidate, options: options) }
                    return (index, finding ?? nil)
                }
            }
            var results: [(Int, SerialPortFinding?)] = []
            for await result in group { results.append(result) }
            return results.sorted { $0.0 < $1.0 }.compactMap(\.1)
        }
        return findings
    }

    /// Probes one port: EZO circuits at each baud, then Modbus slaves. Blocks (run it off the concurrency pool).
    public static func probe(_ candidate: Candidate, options: ScanOptions) -> SerialPortFinding? {
        let start = ContinuousClock.now
        let budgetEnd = start + options.portBudget
        var finding = SerialPortFinding(path: candidate.path, device: candidate.device, state: .silent)
        func done() -> SerialPortFinding? {
            finding.milliseconds = Int((ContinuousClock.now - start) / .milliseconds(1))
            if candidate.listOnlyIfFound, finding.state != .found, finding.state != .busy, finding.state != .agent { return nil }
            return finding
        }
        if let why = options.agentPorts[candidate.device] {
            finding.state = .agent
            finding.message = why
            return done()
        }
        // EZO first: one circuit per port, and its answer is quick.
        for baud in options.bauds where ContinuousClock.now < budgetEnd {
            switch open(candidate, baud: baud, patience: min(options.busyPatience, start.duration(to: budgetEnd))) {
            case .failure(let error):
                finding.state = error.kind == .busy ? .busy : .error
                finding.message = error.kind == .busy ? "in use (by the running agent?)" : error.message
                return done()
            case .success(let port):
                if let ezo = probeEZO(port, baud: baud, deadline: min(ContinuousClock.now + options.ezoTimeout, budgetEnd)) {
                    finding.state = .found
                    finding.ezo = ezo
                    return done()
                }
            }
        }
        for baud in options.bauds where ContinuousClock.now < budgetEnd {
            guard case .success(let port) = open(candidate, baud: baud) else { break }
            // Every probe waits the RTU silent interval (t3.5) after the previous frame ended: a slave that keeps to
            // the specification takes a request sent sooner as the tail of the previous frame and ignores it.
            let silentInterval = ModbusBusSettings(port: candidate.path, baud: baud).silentInterval
            var lastFrameEnd = ContinuousClock.now
            for slave in options.modbusIDs where ContinuousClock.now < budgetEnd {
                let due = lastFrameEnd + silentInterval
                if ContinuousClock.now < due { sleepBlocking(ContinuousClock.now.duration(to: due)) }
                let deadline = min(ContinuousClock.now + options.modbusTimeout, budgetEnd)
                let found = probeModbus(port, slave: slave, baud: baud, deadline: deadline)
                lastFrameEnd = ContinuousClock.now
                if let found { finding.modbusSlaves.append(found) }
            }
            if !finding.modbusSlaves.isEmpty {
                finding.state = .found
                return done()
            }
        }
        let tried = options.bauds.map(String.init).joined(separator: ", ")
        finding.message =
            ContinuousClock.now >= budgetEnd
            ? "nothing answered within the port's time budget"
            : "no EZO circuit and no Modbus slave \(options.modbusIDs.lowerBound)-\(options.modbusIDs.upperBound) at \(tried) baud: check power, wiring (TX/RX crossed, A/B) and the device's baud; a Modbus transmitter may also answer slower than the \(ConfigTable.format(options.modbusTimeout)) scan waits (--modbus-timeout 500ms, with --modbus-ids its id or --port-timeout longer)"
        return done()
    }

    /// Opens the port; one that is in use is tried again every 100 ms for `patience`.
    static func open(_ candidate: Candidate, baud: Int, patience: Duration = .zero) -> Result<SerialPort, SerialError> {
        let end = ContinuousClock.now + patience
        while true {
            do {
                return .success(try SerialPort(path: candidate.path, settings: SerialSettings(baud: baud)))
            } catch {
                guard error.kind == .busy, ContinuousClock.now < end else { return .failure(error) }
                usleep(100_000)
            }
        }
    }

    /// Sends `i` and waits for `?I,<kind>,<firmware>` until `deadline`.
    static func probeEZO(_ port: SerialPort, baud: Int, deadline: ContinuousClock.Instant) -> EZOFinding? {
        port.discardInput()
        // The carriage return first ends whatever half line the circuit holds.
        guard (try? port.write(Array("\ri\r".utf8), deadline: deadline)) != nil else { return nil }
        var splitter = EZOLineSplitter()
        while ContinuousClock.now < deadline {
            guard let bytes = try? port.read(until: deadline) else { return nil }
            for line in splitter.feed(bytes) {
                if case .text(let text) = line, let (type, firmware) = EZOParse.identity(text) {
                    return EZOFinding(circuit: type, firmware: firmware, baud: baud)
                }
            }
        }
        // A circuit slower than the wait may still be answering: let it finish at this baud (until 300 ms of quiet, at
        // most 2 s), or its late answer would be read as the answer at the next baud, and a wrong `baud =` printed.
        let quietUntil = ContinuousClock.now + .seconds(2)
        while ContinuousClock.now < quietUntil {
            guard let bytes = try? port.read(until: min(ContinuousClock.now + .milliseconds(300), quietUntil)), !bytes.isEmpty else { break }
        }
        return nil
    }

    /// Reads holding register 0 of `slave`: an answer, or an exception, proves the slave is there.
    static func probeModbus(_ port: SerialPort, slave: Int, baud: Int, deadline: ContinuousClock.Instant) -> ModbusFinding? {
        port.discardInput()
        guard (try? port.write(ModbusRTU.readHoldingRequest(slave: UInt8(clamping: slave), address: 0, count: 1), deadline: deadline)) != nil
        else { return nil }
        var received: [UInt8] = []
        while ContinuousClock.now < deadline {
            guard let bytes = try? port.read(until: deadline) else { return nil }
            received += bytes
            switch ModbusRTU.parseReadAnswer(received, slave: UInt8(clamping: slave)) {
            case .registers(let values)?:
                return ModbusFinding(slave: slave, baud: baud, register0: values.first, exception: nil)
            case .exception(let code)?:
                return ModbusFinding(slave: slave, baud: baud, register0: nil, exception: code)
            case nil:
                continue
            }
        }
        return nil
    }
}

/// The two Modbus RTU frames the scan needs (the drivers use libmodbus, which cannot share the scan's locked port).
enum ModbusRTU {
    enum Answer: Equatable {
        case registers([UInt16])
        case exception(Int)
    }

    /// CRC-16/MODBUS: init 0xFFFF, polynomial 0xA001 reflected; sent low byte first.
    static func crc16(_ bytes: some Collection<UInt8>) -> UInt16 {
        var crc: UInt16 = 0xFFFF
        for byte in bytes {
            crc ^= UInt16(byte)
            for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0xA001 : crc >> 1 }
        }
        return crc
    }

    static func readHoldingRequest(slave: UInt8, address: UInt16, count: UInt16) -> [UInt8] {
        let body: [UInt8] = [slave, 3, UInt8(address >> 8), UInt8(address & 0xFF), UInt8(count >> 8), UInt8(count & 0xFF)]
        let crc = crc16(body)
        return body + [UInt8(crc & 0xFF), UInt8(crc >> 8)]
    }

    /// The answer of `slave` to a function 3 request in `bytes` (noise before it is skipped); nil while incomplete.
    static func parseReadAnswer(_ bytes: [UInt8], slave: UInt8) -> Answer? {
        for start in bytes.indices where bytes[start] == slave {
            let frame = bytes[start...]
            guard frame.count >= 5 else { return nil }
            let function = frame[start + 1]
            if function == 0x83 {
                if checks(frame.prefix(5)) { return .exception(Int(frame[start + 2])) }
                continue
            }
            guard function == 3 else { continue }
            let length = Int(frame[start + 2])
            guard frame.count >= 5 + length else { continue }
            let whole = frame.prefix(5 + length)
            guard checks(whole), length % 2 == 0 else { continue }
            let data = Array(whole.dropFirst(3).prefix(length))
            return .registers(stride(from: 0, to: data.count, by: 2).map { UInt16(data[$0]) << 8 | UInt16(data[$0 + 1]) })
        }
        return nil
    }

    private static func checks(_ frame: ArraySlice<UInt8>) -> Bool {
        guard frame.count >= 4 else { return false }
        let body = frame.dropLast(2)
        let crc = crc16(body)
        return frame[frame.endIndex - 2] == UInt8(crc & 0xFF) && frame[frame.endIndex - 1] == UInt8(crc >> 8)
    }
}

/// Whether a UART is behind an on-board serial port (``SerialScan/detectUART(_:)``).
public enum UARTDetection: Sendable, Hashable {
    /// The kernel found a UART of this type (linux/serial.h: 4 is a 16550A).
    case uart(type: Int32)
    /// The kernel reports PORT_UNKNOWN: no UART behind the port.
    case none
    /// The kernel could not say (a pseudo-terminal, no permission).
    case unknown
}

/// A serial port `farmgate scan` did not probe, and why.
public struct SkippedPort: Codable, Sendable, Hashable {
    public enum Reason: String, Codable, Sendable {
        /// An on-board UART (`ttyS*`, `ttyAMA*`) not named with `--port` and not opted into with `--onboard-uarts`.
        case onboardUART = "onboard_uart"
        /// The kernel reports no UART behind it (PORT_UNKNOWN).
        case noUART = "no_uart"
    }

    public var path: String
    public var device: String
    public var reason: Reason

    public init(path: String, device: String, reason: Reason) {
        self.path = path
        self.device = device
        self.reason = reason
    }
}
