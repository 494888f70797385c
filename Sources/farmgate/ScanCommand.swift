import ArgumentParser
import FarmgateAgent
import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// `farmgate scan`: what is connected, printed as `[[sensor]]` tables to paste.
struct ScanCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scan",
        abstract: "Find sensors: EZO circuits and Modbus slaves on serial ports, DS18B20s on 1-Wire, GPIO chips and lines.",
        discussion: """
            Serial ports probed are USB serial adapters: /dev/serial/by-id links (the paths to configure), ttyUSB and ttyACM \
            ports. On-board UARTs (ttyAMA, ttyS) are often wired to a serial console or another device and are skipped (the \
            output says so) unless named with --port or opted into with --onboard-uarts; a port the kernel reports without a \
            UART is never probed unless named. Each port is opened with the lock the agent's drivers take, without waiting: a \
            port in use is reported, never fought for, and the ports the running agent is configured for are not opened at \
            all. Every probe has a deadline.
            """)

    @OptionGroup var options: ConfigOption

    @Option(
        name: .customLong("serial-baud"), parsing: .upToNextOption,
        help: ArgumentHelp("Bauds to try, in order (default 9600 38400 115200 19200 57600).", valueName: "baud"))
    var bauds: [Int] = []

    @Option(name: .customLong("modbus-ids"), help: ArgumentHelp("Modbus unit ids to ask for: a range or one id, within 1-247.", valueName: "first-last"))
    var modbusIDs: String = "1-16"

    @Option(name: .customLong("w1-root"), help: ArgumentHelp("Where the kernel lists 1-Wire devices.", valueName: "path"))
    var w1Root: String = "/sys/bus/w1/devices"

    @Option(
        name: .customLong("device-dir"),
        help: ArgumentHelp("Where to look for serial ports and GPIO chips (for tests and containers).", valueName: "path"))
    var deviceDirectory: String = "/dev"

    @Option(name: .customLong("port-timeout"), parsing: .unconditional, help: ArgumentHelp("The most one serial port's probing may take.", valueName: "duration"))
    var portTimeout: String = "30s"

    @Option(
        name: .customLong("modbus-timeout"), parsing: .unconditional,
        help: ArgumentHelp("How long each Modbus unit id has to answer (a transmitter's response time is its maker's choice).", valueName: "duration"))
    var modbusTimeout: String = "150ms"

    @Option(
        name: .customLong("port"),
        help: ArgumentHelp("Probe this serial port too, an on-board UART included (repeat for several).", valueName: "path"))
    var ports: [String] = []

    @Flag(
        name: .customLong("onboard-uarts"),
        help: "Also probe on-board UARTs (ttyAMA*, ttyS*) that have a UART behind them; make sure none is wired to a console or another device.")
    var onboardUARTs = false

    @Flag(help: "Print the findings as JSON.")
    var json = false

    func validate() throws {
        guard Self.idRange(modbusIDs) != nil else {
            throw ValidationError("--modbus-ids must be a range such as 1-16 or one id such as 3, within 1-247 (got \"\(modbusIDs)\")")
        }
        for baud in bauds where !SerialSettings.supportedBauds.contains(baud) {
            throw ValidationError("--serial-baud \(baud) is not supported; use \(SerialSettings.supportedBauds.map(String.init).joined(separator: ", "))")
        }
        for port in ports {
            var info = stat()
            guard stat(port, &info) == 0 else {
                throw ValidationError("--port \(port): no such device; list the serial ports with `ls -l /dev/serial/by-id /dev/tty*`")
            }
            guard info.st_mode & S_IFMT == S_IFCHR else {
                throw ValidationError(
                    "--port \(port) is not a serial port (a character device) but \(FileSystem.kind(of: info.st_mode)); list the serial ports with `ls -l /dev/serial/by-id /dev/tty*`")
            }
        }
        guard let budget = ConfigTable.parseDuration(portTimeout) else {
            throw ValidationError("--port-timeout must be a duration such as \"10s\" (got \"\(portTimeout)\")")
        }
        // Under a second no probe of a port at 9600 baud can answer (a false "no answer"); over an hour is a mistake.
        guard budget >= .seconds(1), budget <= .seconds(3600) else {
            throw ValidationError("--port-timeout must be between 1s and 1h (got \"\(portTimeout)\"): a port's probes at every baud need a few seconds")
        }
        // Under 20 ms not even a one-register answer at 9600 baud is in; over 5 s one id would hold a scan for minutes.
        guard let wait = ConfigTable.parseDuration(modbusTimeout), wait >= .milliseconds(20), wait <= .seconds(5) else {
            throw ValidationError("--modbus-timeout must be a duration from 20ms to 5s, such as \"500ms\" (got \"\(modbusTimeout)\")")
        }
        for (option, path) in [("--w1-root", w1Root), ("--device-dir", deviceDirectory)] where path.isEmpty {
            throw ValidationError("\(option) is empty: give a directory, or leave the option out for its default")
        }
        if deviceDirectory != "/dev", !FileSystem.isDirectory(deviceDirectory) {
            throw ValidationError("--device-dir \(deviceDirectory) is not a directory")
        }
        // A 1-Wire root that does not exist is a machine without 1-Wire (the scan says so); a file there is a mistake.
        if FileManager.default.fileExists(atPath: w1Root), !FileSystem.isDirectory(w1Root) {
            throw ValidationError("--w1-root \(w1Root) is not a directory (the kernel lists 1-Wire devices in /sys/bus/w1/devices once w1-gpio is loaded)")
        }
    }

    static func idRange(_ text: String) -> ClosedRange<Int>? {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false).map { Int($0.trimmingWhitespace()) }
        guard (1...2).contains(parts.count), let first = parts.first ?? nil, let last = parts.last ?? nil, first <= last,
            first >= 1, last <= 247
        else { return nil }
        return first...last
    }

    func run() async throws {
        var scan = ScanOptions()
        scan.deviceDirectory = deviceDirectory
        scan.explicitPorts = ports
        scan.includeOnboardUARTs = onboardUARTs
        if !bauds.isEmpty { scan.bauds = bauds }
        scan.modbusIDs = Self.idRange(modbusIDs) ?? 1...16
        // Absolute, as the tables it prints are pasted into a configuration, which takes only an absolute w1_root (a
        // tester, 2026-12-07: `--w1-root w1/devices` printed tables `config check` refused).
        scan.w1Root = FileSystem.lexicallyNormalized(w1Root.hasPrefix("/") ? w1Root : FileManager.default.currentDirectoryPath + "/" + w1Root)
        if let budget = ConfigTable.parseDuration(portTimeout) { scan.portBudget = budget }
        if let wait = ConfigTable.parseDuration(modbusTimeout) { scan.modbusTimeout = wait }
        scan.agentPorts = agentPorts()
        let directory = deviceDirectory
        let report = await Scanner.scan(scan, gpio: { GPIOScan.scan(deviceDirectory: directory) })
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(report.text())
        }
    }

    /// The serial ports of the configured sensors, when an agent answers on the configuration's control socket: those are
    /// the agent's, and the scan does not open them (opening a port can reset the device behind it).
    func agentPorts() -> [String: String] {
        let configuration: AgentConfiguration
        do {
            configuration = try AgentConfiguration.load(path: options.config)
        } catch {
            // Without the configuration the running agent's ports are not known, and would be opened like any other.
            // Said unless it is the default file that is missing (a machine without an agent yet).
            if options.config != AgentConfiguration.defaultPath || FileManager.default.fileExists(atPath: options.config) {
                StandardStream.error.write(
                    "farmgate scan: warning: \(error.description)\nThe running agent's serial ports are not known: they are probed like any other (opening a port can reset the device behind it); fix the file or give the agent's own with -c.\n")
            }
            return [:]
        }
        guard (try? ControlClient.send(ControlRequest(command: "status"), to: configuration.controlSocket, timeoutSeconds: 5)) != nil
        else { return [:] }
        return SerialScan.agentPorts(configuration)
    }
}
