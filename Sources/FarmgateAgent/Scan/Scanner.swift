import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// `farmgate scan`: serial ports (EZO circuits, Modbus slaves), 1-Wire temperature sensors and GPIO chips, in parallel,
/// each bounded.
public enum Scanner {
    public static func scan(_ options: ScanOptions, gpio: @escaping @Sendable () -> GPIOFinding = { GPIOScan.scan() }) async -> ScanReport {
        let plan = SerialScan.plan(options)
        async let serial = SerialScan.scan(plan.probe, options: options)
        async let oneWire = OneWireScan.scan(root: options.w1Root)
        let chips = (try? await runOffPool(name: "farmgate-scan-gpio") { gpio() }) ?? GPIOFinding(message: "GPIO could not be listed")
        var report = ScanReport(serialPorts: await serial, oneWire: await oneWire, gpio: chips)
        report.skippedPorts = plan.skipped
        return report
    }
}

/// The DS18B20s (family 28, and the other w1-therm families) under the w1 root, each read once (a conversion takes up to
/// 750 ms; each read is bounded, and so are all of them together).
public enum OneWireScan {
    /// - Parameters:
    ///   - readTimeout: how long one probe's read may take.
    ///   - overall: how long the probes' reads may take in all: a hung bus makes every read wait its `readTimeout`, and a
    ///     bus of 30 probes would hold the scan a minute; the probes not read by then are listed as such.
    public static func scan(root: String, readTimeout: Duration = .seconds(2), overall: Duration = .seconds(10)) async -> OneWireFinding {
        var finding = OneWireFinding(root: root)
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: root) else {
            finding.message = "no 1-Wire bus at \(root): enable it (Raspberry Pi: dtoverlay=w1-gpio in /boot/firmware/config.txt, then reboot)"
            return finding
        }
        let addresses = names.filter { $0.count == 15 && DS18B20Driver.families.contains(String($0.prefix(2))) }.sorted()
        let started = ContinuousClock.now
        var unanswered = 0
        for address in addresses {
            guard ContinuousClock.now - started < overall else {
                var sensor = DS18B20Finding(address: address)
                sensor.problem =
                    "not read: the scan's \(overall) for 1-Wire ran out"
                    + (unanswered > 0 ? ", \(unanswered) probe\(unanswered == 1 ? "" : "s") not answering within \(readTimeout) (a hung bus? check the wiring and pull-up)" : "")
                    + "; read it with `farmgate sensor test` once configured"
                finding.sensors.append(sensor)
                continue
            }
            let directory = root + "/" + address
            let thread = DedicatedThread(name: "farmgate-scan-w1")
            defer { thread.shutdown() }
            let outcome = await thread.run(timeout: readTimeout) { () -> Result<Int, SensorError> in
                let slave = directory + "/w1_slave"
                let temperature = directory + "/temperature"
                let useSlave = FileManager.default.fileExists(atPath: slave) || !FileManager.default.fileExists(atPath: temperature)
                switch DS18B20Driver.readFile(useSlave ? slave : temperature) {
                case .success(let text): return useSlave ? W1Therm.parseSlaveFile(text) : W1Therm.parseTemperatureFile(text)
                case .failure(let failure):
                    return .failure(SensorError(.fault, "cannot read it: \(String(cString: strerror(failure.code)))"))
                }
            }
            var sensor = DS18B20Finding(address: address)
            switch outcome {
            case nil:
                unanswered += 1
                sensor.problem = "no answer within \(readTimeout) (a hung bus? check the wiring)"
            case .failure(let error)?:
                sensor.problem = error.description
            case .success(let millidegrees)?:
                if let problem = W1Therm.check(millidegrees: millidegrees) {
                    sensor.problem = problem.description
                } else {
                    sensor.celsius = W1Therm.celsius(millidegrees: millidegrees)
                }
            }
            finding.sensors.append(sensor)
        }
        return finding
    }
}

/// GPIO chips through the libgpiod binding.
public enum GPIOScan {
    public static func scan(deviceDirectory: String = "/dev") -> GPIOFinding {
        do {
            return GPIOFinding(message: nil, chips: try LibgpiodBackend.chips(in: deviceDirectory))
        } catch {
            return GPIOFinding(message: error.message, chips: [])
        }
    }
}
