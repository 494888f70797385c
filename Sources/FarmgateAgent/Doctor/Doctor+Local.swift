import CLinux
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

/// The checks of `farmgate doctor` that look only at this machine: device permissions, the clock, disk space and the
/// buffer. Blocking calls (stat, statvfs, SQLite): run them off the concurrency pool.
extension Doctor {
    // MARK: Serial ports and GPIO chips

    /// Every configured serial port (EZO, Modbus) and GPIO chip: it exists, is a character device, and the agent may open
    /// it for reading and writing, as `user` or through a group its systemd `unit` grants (when the unit runs the agent as
    /// `user`); when not, which group it needs.
    static func deviceFindings(_ configuration: AgentConfiguration, user: UnixUser, unit: ServiceUnit? = nil) -> [DoctorFinding] {
        var findings: [DoctorFinding] = []
        var seen: Set<String> = []
        let base = URL(fileURLWithPath: configuration.file).deletingLastPathComponent().path
        for sensor in configuration.sensors {
            switch sensor.driver {
            case "ezo", "modbus":
                guard let port = try? sensor.options.string("port"), !port.isEmpty else { continue }
                let path = AgentConfiguration.resolve(port, against: base)
                guard seen.insert(path).inserted else { continue }
                findings.append(
                    deviceFinding(check: "serial", path: path, sensor: sensor.id.rawValue, user: user, usualGroup: "dialout", unit: unit))
            case "gpio":
                if (try? sensor.options.string("backend")) == "events" {
                    // The file stands in for the chip: missing, the sensor reads `disconnected` (a tester, 2026-12-07:
                    // doctor said nothing about it).
                    guard let file = try? sensor.options.string("events_file"), seen.insert(file).inserted else { continue }
                    findings.append(eventsFileFinding(file, sensor: sensor.id.rawValue, user: user))
                    continue
                }
                let paths = chipPaths(sensor.options.value("chip"))
                guard !paths.isEmpty else {
                    findings.append(
                        DoctorFinding(
                            check: "gpio", subject: "chip of \(sensor.id)", status: .problem, message: "no GPIO chip on this machine (/dev/gpiochip*)",
                            fix: "on a Raspberry Pi the chips are /dev/gpiochip0..; elsewhere the board's GPIO driver must be loaded"))
                    continue
                }
                for path in paths where seen.insert(path).inserted {
                    findings.append(deviceFinding(check: "gpio", path: path, sensor: sensor.id.rawValue, user: user, usualGroup: "gpio", unit: unit))
                }
            default:
                continue
            }
        }
        return findings
    }

    /// A GPIO events file (`backend = "events"`, the test double of a chip): it exists, is a file, and `user` may read it.
    static func eventsFileFinding(_ file: String, sensor: String, user: UnixUser) -> DoctorFinding {
        let subject = "\(file) (\(sensor), backend = \"events\")"
        var info = stat()
        guard stat(file, &info) == 0 else {
            return DoctorFinding(
                check: "gpio", subject: subject, status: .problem,
                message: "the events file does not exist: its sensors read disconnected, as with a missing chip",
                fix: "create it (a line such as `level 0`), or point events_file at the file your test harness writes")
        }
        guard info.st_mode & S_IFMT == S_IFREG || info.st_mode & S_IFMT == S_IFIFO else {
            return DoctorFinding(
                check: "gpio", subject: subject, status: .problem, message: "it is not a file", fix: "point events_file at a file of protocol lines")
        }
        if let blocked = user.blockedDirectory(on: file) {
            return DoctorFinding(
                check: "gpio", subject: subject, status: .problem, message: "\(user.name) may not pass the directory \(blocked)",
                fix: "let \(user.name) through that directory, or move the events file")
        }
        guard user.mayOpen(mode: info.st_mode & 0o777, owner: info.st_uid, group: info.st_gid, write: false) else {
            return DoctorFinding(
                check: "gpio", subject: subject, status: .problem,
                message: "\(user.name) cannot read it (mode \(String(info.st_mode & 0o777, radix: 8)), owner \(UnixUser.userName(info.st_uid)))",
                fix: "chmod a+r \(file)")
        }
        return DoctorFinding(check: "gpio", subject: subject, status: .ok, message: "\(user.name) may read it (a test double of a GPIO chip)")
    }

    /// The device nodes a `chip` value can mean: one path for a number or `gpiochipN`, every chip for a label.
    static func chipPaths(_ value: ConfigValue?) -> [String] {
        switch value {
        case nil:
            return ["/dev/gpiochip0"]
        case .integer(let number)?:
            return ["/dev/gpiochip\(number)"]
        case .string(let text)?:
            let trimmed = text.trimmingWhitespace()
            for prefix in ["/dev/gpiochip", "gpiochip", ""] where trimmed.hasPrefix(prefix) {
                if let number = Int(trimmed.dropFirst(prefix.count)), number >= 0 { return ["/dev/gpiochip\(number)"] }
            }
            let names = (try? FileManager.default.contentsOfDirectory(atPath: "/dev")) ?? []
            return names.filter { $0.hasPrefix("gpiochip") }.sorted().map { "/dev/" + $0 }
        default:
            return []
        }
    }

    static func deviceFinding(
        check: String, path: String, sensor: String, user: UnixUser, usualGroup: String, unit: ServiceUnit? = nil
    ) -> DoctorFinding {
        let subject = "\(path) (\(sensor))"
        var info = stat()
        guard stat(path, &info) == 0 else {
            let reason = String(cString: strerror(errno))
            let fix =
                check == "serial"
                ? "plug the adapter in and check the name: `ls -l /dev/serial/by-id/` lists the USB serial adapters (use those paths: they survive replugging)"
                : "check that this machine has that GPIO chip: `ls /dev/gpiochip*`, `gpiodetect`"
            return DoctorFinding(check: check, subject: subject, status: .problem, message: "cannot be found (\(reason))", fix: fix)
        }
        guard info.st_mode & S_IFMT == S_IFCHR else {
            return DoctorFinding(
                check: check, subject: subject, status: .problem, message: "is not a character device",
                fix: "give the device node of the port or chip (under /dev)")
        }
        let mode = info.st_mode & 0o777
        let group = UnixUser.groupName(info.st_gid)
        let owner = UnixUser.userName(info.st_uid)
        let shown = "mode \(String(mode, radix: 8)), owner \(owner), group \(group)"
        if user.mayOpen(mode: mode, owner: info.st_uid, group: info.st_gid) {
            let via = user.uid == 0 ? "as root" : info.st_uid == user.uid ? "as its owner" : user.groups.contains(info.st_gid) ? "through group \(group)" : "as anyone"
            return DoctorFinding(check: check, subject: subject, status: .ok, message: "\(user.name) may read and write it \(via) (\(shown))")
        }
        // The agent runs with the groups of its unit too (the installed one grants dialout and gpio): what the service
        // may open counts, not what a login of its user could.
        let unitRunsUser = unit?.runs(as: user) == true
        if let unit, unitRunsUser {
            var service = user
            service.groups.formUnion(unit.groupIDs().map(\.id))
            if service.mayOpen(mode: mode, owner: info.st_uid, group: info.st_gid) {
                let grant = unit.grantedBy[group] ?? unit.files.joined(separator: ", ")
                return DoctorFinding(
                    check: check, subject: subject, status: .ok,
                    message:
                        "the agent may read and write it through group \(group), which its systemd unit grants (\(grant)); \(user.name) is not in the group itself, so only the agent started by systemd has it (\(shown))")
            }
        }
        if !user.groups.contains(info.st_gid), (mode >> 3) & 0o6 == 0o6, info.st_gid != 0 {
            let fix =
                unitRunsUser
                ? "sudo usermod -aG \(group) \(user.name), or grant the group to the service: `sudo systemctl edit farmgate`, add SupplementaryGroups=\(group) under [Service]; then restart the agent (systemctl restart farmgate)"
                : "sudo usermod -aG \(group) \(user.name), then restart the agent (systemctl restart farmgate)"
            let granted = unitRunsUser ? ", nor does its systemd unit grant it" : ""
            return DoctorFinding(
                check: check, subject: subject, status: .problem,
                message: "\(user.name) may not open it: it is not in group \(group)\(granted) (\(shown))", fix: fix)
        }
        return DoctorFinding(
            check: check, subject: subject, status: .problem, message: "\(user.name) may not open it (\(shown))",
            fix:
                "the node should be group \(usualGroup) with mode 660 (a udev rule sets that: Raspberry Pi OS has one; `ls -l \(path)`), and \(user.name) in group \(usualGroup): sudo usermod -aG \(usualGroup) \(user.name)")
    }

    // MARK: Clock

    /// Whether the kernel says the clock is synchronised (adjtimex), as the agent sees it (the agent's test hook too).
    static func clockFinding(_ configuration: AgentConfiguration, clock: any ClockSource) -> DoctorFinding {
        let reading = clock.read()
        guard configuration.checkClock else {
            // The agent does not ask the kernel; TLS and the readings' times still depend on the clock.
            if reading.synchronized {
                return DoctorFinding(
                    check: "clock", subject: "system clock", status: .ok,
                    message: "synchronised (adjtimex), \(RFC3339.format(reading.realtime)); [clock] check = false: the agent never holds or flags readings for it")
            }
            return DoctorFinding(
                check: "clock", subject: "system clock", status: .warning,
                message:
                    "not synchronised (adjtimex says so), and [clock] check = false: readings are stamped with this clock unflagged; TLS fails if it is far off",
                fix: "enable NTP: sudo timedatectl set-ntp true (in a container whose clock the host keeps, nothing to do)")
        }
        if reading.synchronized {
            return DoctorFinding(
                check: "clock", subject: "system clock", status: .ok, message: "synchronised (adjtimex), \(RFC3339.format(reading.realtime))")
        }
        return DoctorFinding(
            check: "clock", subject: "system clock", status: .problem,
            message:
                "not synchronised (adjtimex says so): readings are held up to [clock] hold_unsynchronized, then sent flagged clock_unsynchronized; TLS fails if the clock is far off",
            fix:
                "enable NTP: sudo timedatectl set-ntp true; `timedatectl timesync-status` shows the server; UDP port 123 must be reachable (or set [clock] check = false in a container that never reports a synchronised clock)")
    }

    // MARK: Disk

    /// Free space where the buffer lives, against what its quota may still take.
    static func diskFinding(_ configuration: AgentConfiguration) -> DoctorFinding {
        let path = configuration.buffer.path
        var directory = URL(fileURLWithPath: path).deletingLastPathComponent()
        while !FileManager.default.fileExists(atPath: directory.path), directory.path != "/" { directory.deleteLastPathComponent() }
        var info = statvfs()
        guard statvfs(directory.path, &info) == 0 else {
            return DoctorFinding(
                check: "disk", subject: directory.path, status: .problem, message: "cannot read the file system's free space: \(String(cString: strerror(errno)))")
        }
        let free = Int64(info.f_bavail) * Int64(info.f_frsize)
        let used = [path, path + "-wal", path + "-shm"].reduce(Int64(0)) { total, file in
            total + (FileSystem.size(file) ?? 0)
        }
        let quota = configuration.buffer.quotaBytes
        let stillNeeded = max(0, quota - used)
        let shown = "\(mebibytes(free)) free, the buffer uses \(mebibytes(used)) of its \(mebibytes(quota)) quota"
        if almostFull(free: free, size: Int64(info.f_blocks) * Int64(info.f_frsize)) {
            return DoctorFinding(
                check: "disk", subject: directory.path, status: .problem, message: "almost full: \(shown)",
                fix: "free space on this file system (`df -h \(directory.path)`, `journalctl --vacuum-size=50M`), or the buffer stops storing readings")
        }
        if free < stillNeeded {
            return DoctorFinding(
                check: "disk", subject: directory.path, status: .warning, message: "the buffer's quota does not fit: \(shown)",
                fix: "lower [buffer] quota below the free space, or free space: the disk fills before the quota is reached")
        }
        return DoctorFinding(check: "disk", subject: directory.path, status: .ok, message: shown)
    }

    /// Whether a file system of `size` bytes with `free` left is almost full: under 64 MiB free, or a tenth of a file
    /// system smaller than 640 MiB. A fixed 64 MiB called a small data partition or tmpfs that the buffer's quota fits in
    /// easily "almost full" (a tester: 47 MiB free of 182 MiB, an 8 MiB quota); whether the quota fits is its own check.
    static func almostFull(free: Int64, size: Int64) -> Bool {
        free < min(64 << 20, size / 10)
    }

    static func mebibytes(_ bytes: Int64) -> String {
        bytes >= 10 << 30 ? "\(bytes >> 30) GiB" : "\(bytes >> 20) MiB"
    }

    // MARK: Buffer

    /// Depth, age of the oldest unsent reading and quarantine, from the running agent when it answers; else from the file
    /// itself, read-only, with an integrity check.
    static func bufferFindings(_ configuration: AgentConfiguration, status: AgentStatus?, now: Timestamp) -> [DoctorFinding] {
        let path = configuration.buffer.path
        if let buffer = status?.buffer {
            return bufferDepthFindings(
                path: path, pending: buffer.pending, oldest: buffer.oldestPending, quarantined: buffer.quarantined, now: now,
                integrity: "checked by the agent when it opened the buffer")
                + [bufferFailureFinding(path: path, errors: buffer.errors, now: now)].compactMap { $0 }
        }
        guard FileManager.default.fileExists(atPath: path) else {
            return [DoctorFinding(check: "buffer", subject: path, status: .ok, message: "no buffer yet: the agent creates it when it starts")]
        }
        // An empty file (made by touch, or by a start that stopped before its first write) is what SQLite takes as a new
        // database: the agent creates its tables in it. Read, it has no tables, which is no problem of permissions.
        if FileSystem.size(path) == 0, FileSystem.isFile(path) {
            return [DoctorFinding(check: "buffer", subject: path, status: .ok, message: "empty: the agent creates its tables in it when it starts")]
        }
        let existedBefore = [path + "-wal", path + "-shm"].filter { FileManager.default.fileExists(atPath: $0) }
        defer { giveBack(createdBesides: path, except: existedBefore) }
        do {
            let connection = try SQLiteConnection(path: path, mode: .readOnly, busyTimeoutMilliseconds: 2_000)
            let problems = try connection.integrityProblems(quick: true)
            guard problems.isEmpty else {
                return [
                    DoctorFinding(
                        check: "buffer", subject: path, status: .problem,
                        message: "damaged: \(problems.prefix(3).joined(separator: "; "))",
                        fix: Self.damagedBufferFix(path))
                ]
            }
            let rows = try connection.query("SELECT count(*), min(timestamp) FROM readings")
            var pending = 0
            var oldest: Timestamp?
            if let row = rows.first, row.count == 2 {
                if case .integer(let count) = row[0] { pending = Int(count) }
                if case .integer(let micros) = row[1] { oldest = Timestamp(microseconds: micros) }
            }
            let quarantined = Int((try? connection.queryInt("SELECT count(*) FROM quarantine")) ?? 0)
            return bufferDepthFindings(path: path, pending: pending, oldest: oldest, quarantined: quarantined, now: now, integrity: "quick_check ok")
        } catch where error.isCorruption {
            // Not a question of permissions: the file itself is damaged (SQLITE_CORRUPT) or is no database at all
            // (SQLITE_NOTADB), and chown cannot help.
            let what = error.code == 26 /* SQLITE_NOTADB */ ? "not an SQLite database (damaged, or another file put there)" : "damaged"
            return [
                DoctorFinding(
                    check: "buffer", subject: path, status: .problem, message: "\(what): \(error)",
                    fix: Self.damagedBufferFix(path))
            ]
        } catch {
            return [
                DoctorFinding(
                    check: "buffer", subject: path, status: .problem, message: "cannot be read: \(error)",
                    fix: "check the file's owner and mode (the agent's user must own it) and the disk; the agent's log says more")
            ]
        }
    }

    /// How long after the running agent's last failed buffer write it is still a problem (the agent's own status line
    /// says `BUFFER ERROR` as long).
    static let bufferFailureWindow: Int64 = 3_600

    /// A problem when the running agent's buffer writes failed within ``bufferFailureWindow``: readings it cannot
    /// commit are lost once its memory is full, and acknowledgements it cannot write are sent again.
    static func bufferFailureFinding(path: String, errors: BufferErrors?, now: Timestamp) -> DoctorFinding? {
        guard let errors, let last = errors.last else { return nil }
        let ageSeconds = max(0, (now.microseconds - last.at.microseconds) / 1_000_000)
        guard ageSeconds <= bufferFailureWindow else { return nil }
        return DoctorFinding(
            check: "buffer", subject: path, status: .problem,
            message: "the agent's last \(last.operation) failed \(duration(ageSeconds)) ago: \(last.message) (\(errors.commit) commit and \(errors.acknowledge) acknowledge failures since it opened the buffer)",
            fix: "free space on the buffer's file system (df -h \(directory(of: path))) or see the kernel log for the disk (dmesg); the agent keeps new readings in memory and retries, and `farmgate status` shows when it writes again")
    }

    /// A warning when the running agent has not rewritten `[metrics] textfile` for more than twice its interval and
    /// 10 s (a full disk, a directory made read-only after start): node_exporter then serves the old figures as current.
    /// Nothing is said while the agent runs for less than that, or when it does not run.
    static func metricsFreshnessFinding(_ metrics: MetricsFileConfiguration?, status: AgentStatus?, now: Timestamp) -> DoctorFinding? {
        guard let metrics, let status else { return nil }
        let allowedSeconds = 2 * metrics.interval.components.seconds + 10
        let runningSeconds = (now.microseconds - status.startedAt.microseconds) / 1_000_000
        guard runningSeconds > allowedSeconds else { return nil }
        var info = stat()
        guard stat(metrics.path, &info) == 0 else {
            return DoctorFinding(
                check: "metrics", subject: metrics.path, status: .warning,
                message: "the agent has run for \(duration(runningSeconds)) and has not written this file",
                fix: "the agent's log (journalctl -u farmgate) says why: the directory must exist and be writable by the agent's user")
        }
        let ageSeconds = max(0, now.microseconds / 1_000_000 - Int64(info.st_mtim.tv_sec))
        guard ageSeconds > allowedSeconds else { return nil }
        return DoctorFinding(
            check: "metrics", subject: metrics.path, status: .warning,
            message: "not rewritten for \(duration(ageSeconds)) (every \(metrics.interval.components.seconds) s expected): node_exporter serves old figures",
            fix: "the agent's log (journalctl -u farmgate) says why its writes fail: a full disk (df -h) or a directory it may no longer write")
    }

    /// What the agent does with a damaged buffer, and what is left to do.
    static func damagedBufferFix(_ path: String) -> String {
        "the agent moves a damaged buffer aside (\(path).corrupt-<time>, with its -wal and -shm) and starts a new one when it "
            + "starts: restart it (systemctl restart farmgate). The readings in the damaged file not yet sent stay there: "
            + "`sqlite3 \(path).corrupt-… .recover` may salvage some. Replace the SD card if it happens again"
    }

    static func bufferDepthFindings(path: String, pending: Int, oldest: Timestamp?, quarantined: Int, now: Timestamp, integrity: String) -> [DoctorFinding] {
        var findings: [DoctorFinding] = []
        let ageSeconds = oldest.map { max(0, (now.microseconds - $0.microseconds) / 1_000_000) }
        let depth = "\(pending) reading\(pending == 1 ? "" : "s") waiting\(ageSeconds.map { ", the oldest \(duration($0)) old" } ?? ""); \(integrity)"
        if let ageSeconds, ageSeconds > 3600 {
            findings.append(
                DoctorFinding(
                    check: "buffer", subject: path, status: .warning, message: "uploads are behind: \(depth)",
                    fix: "see `farmgate status` for the last upload result; the ingest checks below say whether it can be reached"))
        } else {
            findings.append(DoctorFinding(check: "buffer", subject: path, status: .ok, message: depth))
        }
        if quarantined > 0 {
            findings.append(
                DoctorFinding(
                    check: "buffer", subject: "quarantine", status: .warning,
                    message: "\(quarantined) reading\(quarantined == 1 ? "" : "s") the ingest refused for good",
                    fix: "farmgate quarantine list shows why; fix the cause, then farmgate quarantine requeue --code CODE (or drop)"))
        }
        return findings
    }

    static func duration(_ seconds: Int64) -> String {
        switch seconds {
        case ..<120: "\(seconds) s"
        case ..<7200: "\(seconds / 60) min"
        case ..<172_800: "\(seconds / 3600) h"
        default: "\(seconds / 86_400) days"
        }
    }

    /// Reading a WAL database may create its `-wal` and `-shm` files; made by root, the agent could no longer open its
    /// buffer. Those that did not exist before are given to the owner of the database file.
    static func giveBack(createdBesides path: String, except existed: [String]) {
        var info = stat()
        guard stat(path, &info) == 0 else { return }
        for file in [path + "-wal", path + "-shm"] where !existed.contains(file) && FileManager.default.fileExists(atPath: file) {
            _ = chown(file, info.st_uid, info.st_gid)
        }
    }
}
