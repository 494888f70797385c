import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Whether the agent's user may write where the agent writes: the buffer (its file, and its directory, where SQLite
/// makes `-wal`, `-shm` and journal files) and the metrics file's directory (written beside and renamed). An agent that
/// may not stops at start, or logs a failed write every interval; `doctor` says so before, with the command that fixes it.
extension Doctor {
    static func writeAccessFindings(_ configuration: AgentConfiguration, user: UnixUser, unit: ServiceUnit? = nil) -> [DoctorFinding] {
        var findings: [DoctorFinding] = []
        let buffer = configuration.buffer.path
        let bufferDirectory = directory(of: buffer)
        // The agent makes the buffer's missing directories (mkdir -p): the nearest one that exists must take them.
        var existing = bufferDirectory
        while !FileSystem.isDirectory(existing), existing != "/", !existing.isEmpty, !FileSystem.isFile(existing) {
            existing = directory(of: existing)
        }
        let what = existing == bufferDirectory ? "the buffer's directory" : "\(existing), where the agent would make the buffer's directory \(bufferDirectory),"
        if let problem = directoryProblem(existing, user: user, what: what) ?? sandboxProblem(bufferDirectory, unit: unit, what: "the buffer's directory") {
            findings.append(problem)
        } else {
            var files: [String] = []
            for path in [buffer, buffer + "-wal", buffer + "-shm"] {
                var info = stat()
                guard stat(path, &info) == 0 else { continue }
                if !user.mayOpen(mode: info.st_mode & 0o777, owner: info.st_uid, group: info.st_gid) {
                    files.append("\(path) (\(describe(info)))")
                }
            }
            if files.isEmpty {
                findings.append(
                    DoctorFinding(check: "buffer access", subject: bufferDirectory, status: .ok, message: "\(user.name) may write the buffer and its directory"))
            } else {
                findings.append(
                    DoctorFinding(
                        check: "buffer access", subject: buffer, status: .problem,
                        message: "\(user.name) cannot write \(files.joined(separator: ", ")): the agent stops at start (\"attempt to write a readonly database\")",
                        fix: "sudo chown \(user.name): \(buffer)*, then restart the agent (systemctl restart farmgate)"))
            }
        }
        if let metrics = configuration.metrics {
            let metricsDirectory = directory(of: metrics.path)
            findings.append(
                directoryProblem(metricsDirectory, user: user, what: "the metrics file's directory")
                    ?? sandboxProblem(metricsDirectory, unit: unit, what: "the metrics file's directory")
                    ?? DoctorFinding(
                        check: "metrics", subject: metricsDirectory, status: .ok, message: "\(user.name) may write \(metrics.path) (written beside and renamed)"))
        }
        return findings
    }

    /// A problem when `path` is not a directory `user` may create files in, naming what it is for.
    static func directoryProblem(_ path: String, user: UnixUser, what: String) -> DoctorFinding? {
        let check = what.contains("metrics") ? "metrics" : "buffer access"
        var info = stat()
        guard stat(path, &info) == 0 else {
            let reason = String(cString: strerror(errno))
            return DoctorFinding(
                check: check, subject: path, status: .problem, message: "\(what) cannot be found (\(reason)): the agent does not create it",
                fix: "sudo install -d -o \(user.name) -m 0755 \(path)")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            return DoctorFinding(
                check: check, subject: path, status: .problem, message: "\(what) is not a directory", fix: "give a path in an existing directory")
        }
        // Mode bits say nothing of a file system mounted read-only (an SD card remounted after errors, a bind mount).
        var fs = statvfs()
        if statvfs(path, &fs) == 0, fs.f_flag & UInt(ST_RDONLY) != 0 {
            return DoctorFinding(
                check: check, subject: path, status: .problem,
                message: "\(what) is on a file system mounted read-only: the agent cannot write there (\(check == "metrics" ? "the metrics file is not updated" : "it stops at start"))",
                fix: "remount it read-write (`sudo mount -o remount,rw` on its mount point; an SD card remounted read-only after errors needs fsck first, see dmesg), or give a path on a writable file system")
        }
        guard !mayCreateFiles(in: info, user: user) else { return nil }
        return DoctorFinding(
            check: check, subject: path, status: .problem, message: "\(user.name) cannot create files in \(what) (\(describe(info)))",
            fix: "sudo chown \(user.name): \(path) (or give the agent a directory of its own), then restart the agent (systemctl restart farmgate)")
    }

    /// A problem when the agent's systemd unit makes `path` read-only for the service (`ProtectSystem=strict` without a
    /// `ReadWritePaths=` or managed directory that holds it): mode bits and mounts are fine, yet the agent under systemd
    /// gets "Read-only file system".
    static func sandboxProblem(_ path: String, unit: ServiceUnit?, what: String) -> DoctorFinding? {
        guard let unit, !unit.mayWrite(path) else { return nil }
        let check = what.contains("metrics") ? "metrics" : "buffer access"
        return DoctorFinding(
            check: check, subject: path, status: .problem,
            message: "\(what) is read-only for the service: ProtectSystem=strict in \(unit.protectSystemFile ?? ServiceUnit.name) leaves writable only \((unit.writablePaths ?? []).joined(separator: ", "))",
            fix: "sudo systemctl edit farmgate, add under [Service]: ReadWritePaths=\(path) ; then sudo systemctl restart farmgate (or move the path under /var/lib/farmgate)")
    }

    /// Write and search permission on a directory, as the kernel decides for `user` (root may always).
    static func mayCreateFiles(in info: stat, user: UnixUser) -> Bool {
        if user.uid == 0 { return true }
        let mode = info.st_mode & 0o777
        let needed: mode_t = 0o3
        if info.st_uid == user.uid { return (mode >> 6) & needed == needed }
        if user.groups.contains(info.st_gid) { return (mode >> 3) & needed == needed }
        return mode & needed == needed
    }

    static func directory(of path: String) -> String {
        let parent = URL(fileURLWithPath: path).deletingLastPathComponent().path
        return parent.isEmpty ? "/" : parent
    }

    static func describe(_ info: stat) -> String {
        "mode \(String(info.st_mode & 0o777, radix: 8)), owner \(UnixUser.userName(info.st_uid)), group \(UnixUser.groupName(info.st_gid))"
    }
}
