import FarmgateSupport
import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// The 1-Wire probes (`ds18b20`): the file the driver reads exists where the driver looks for it
/// (``DS18B20Driver/sysfsFile(_:)``), the agent's user may read it, and one read passes the kernel's CRC check and gives a
/// temperature. A probe the agent cannot find reads `disconnected` at every interval; `doctor` says what to check.
extension Doctor {
    static let oneWireCheck = "1-wire"

    /// Every configured ds18b20 sensor, one after the other (the bus reads one probe at a time anyway). Each is looked at
    /// on a thread of its own, given up after the sensor's `read_timeout` as the driver gives up a read: a sysfs read
    /// blocks for the probe's conversion (750 ms), and one on a hung bus may not return.
    static func oneWireFindings(_ configuration: AgentConfiguration, user: UnixUser) async -> [DoctorFinding] {
        var findings: [DoctorFinding] = []
        for sensor in configuration.sensors where sensor.driver == DS18B20Driver.description.kind {
            // The configuration was validated as it loaded: a sensor whose options do not parse is not one to look at.
            guard let options = try? DS18B20Driver.Options(sensor) else { continue }
            let id = sensor.id.rawValue
            let thread = DedicatedThread(name: "farmgate-w1")
            let finding = await thread.run(timeout: options.readTimeout) { oneWireFinding(options, sensor: id, user: user) }
            thread.shutdown()
            findings.append(
                finding
                    ?? DoctorFinding(
                        check: oneWireCheck, subject: "\(DS18B20Driver.sysfsFile(options).path) (\(id))", status: .problem,
                        message: "no answer within \(ConfigTable.format(options.readTimeout)): the 1-Wire bus hangs, and the agent's reads of it time out",
                        fix: "check the probe's wiring and power (a short between data and ground holds the bus), then `dmesg | grep -i w1`"))
        }
        return findings
    }

    /// What one probe's sysfs files say, for `user`. Blocking (stat, the read itself): run it off the concurrency pool.
    static func oneWireFinding(_ options: DS18B20Driver.Options, sensor: String, user: UnixUser) -> DoctorFinding {
        let (directory, path, isSlave) = DS18B20Driver.sysfsFile(options)
        let subject = "\(path) (\(sensor))"
        let enable =
            "Raspberry Pi: add dtoverlay=w1-gpio to /boot/firmware/config.txt (data on GPIO4) and reboot; elsewhere load the "
            + "w1-gpio and w1-therm modules (sudo modprobe w1-gpio w1-therm; `lsmod | grep w1` lists them)"
        // What to do about a probe that is not there: no bus at all, or the probe not on it.
        func missing(_ message: String) -> DoctorFinding {
            let fix =
                FileSystem.isDirectory(options.root)
                ? "check the probe's wiring (data to GPIO4 with a 4.7 kΩ pull-up to 3.3 V, VDD to 3.3 V, ground) and its address "
                    + "(`ls \(options.root)`); the bus needs dtoverlay=w1-gpio on a Raspberry Pi and the w1-gpio and w1-therm modules loaded"
                : enable
            return DoctorFinding(check: oneWireCheck, subject: subject, status: .problem, message: message, fix: fix)
        }
        // The driver's own words: no bus at all, or which probes the bus lists instead.
        guard FileSystem.isDirectory(directory) else { return missing(DS18B20Driver.missing(options).message) }
        var info = stat()
        guard stat(path, &info) == 0 else {
            return DoctorFinding(
                check: oneWireCheck, subject: subject, status: .problem, message: DS18B20Driver.notServed(options).message,
                fix: "sudo modprobe w1-therm (and add w1-therm to /etc/modules so that it loads at boot)")
        }
        let mode = info.st_mode & 0o777
        let shown = "mode \(String(mode, radix: 8)), owner \(UnixUser.userName(info.st_uid)), group \(UnixUser.groupName(info.st_gid))"
        if let blocked = user.blockedDirectory(on: path) {
            return DoctorFinding(
                check: oneWireCheck, subject: subject, status: .problem,
                message: "\(user.name) cannot reach it: it may not pass the directory \(blocked), so every read of the agent fails",
                fix: "the kernel lets everyone through its w1 directories: if something changed that, sudo chmod a+x on that directory; check w1_root too")
        }
        guard user.mayOpen(mode: mode, owner: info.st_uid, group: info.st_gid, write: false) else {
            return DoctorFinding(
                check: oneWireCheck, subject: subject, status: .problem,
                message: "\(user.name) cannot read it (\(shown)): every read of the agent fails",
                fix: "the kernel lets everyone read it: if something changed that, sudo chmod a+r \(path); check w1_root too")
        }
        let file = isSlave ? "w1_slave, CRC checked by the kernel" : "temperature"
        let problem: SensorError
        switch DS18B20Driver.readMillidegrees(options) {
        case .success(let millidegrees):
            guard let refused = W1Therm.check(millidegrees: millidegrees) else {
                return DoctorFinding(
                    check: oneWireCheck, subject: subject, status: .ok,
                    message: "reads \(W1Therm.celsius(millidegrees: millidegrees)) °C (\(file)); \(user.name) may read it (\(shown))")
            }
            problem = refused
        case .failure(let error) where error.kind == .disconnected:
            return missing(error.message)
        case .failure(let error):
            problem = error
        }
        // A failed CRC (`crc=.. NO`), an empty or all-zero read, the power-on value: the agent stores no reading for such a
        // read, and the next may be fine; many are a wiring or power fault.
        return DoctorFinding(
            check: oneWireCheck, subject: subject, status: .warning, message: "a read failed: \(problem.message)",
            fix: "one now and then costs one reading; if `farmgate status` shows it often, check the 4.7 kΩ pull-up, the cable (length, shielding) and the probe's power")
    }
}
