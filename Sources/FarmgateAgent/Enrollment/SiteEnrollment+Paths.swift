import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// The checks of ``SiteEnrollment/prepare(_:)`` on paths: the configuration's path names a file, the file it is written
/// to (a symbolic link's target), that the new file can keep the old one's owner, and that the key would not land on one
/// of the agent's own files. All before the token is spent. Blocking file system calls.
extension SiteEnrollment {
    // MARK: The configuration's path

    /// Refuses a configuration path that cannot name a file: empty (`-c ''`, `FARMGATE_CONFIG=`), ending in a slash,
    /// `.` or `..`, or an existing directory. Without this the key and the edited file would be written beside the
    /// wrong directory, after the exchange.
    static func checkConfigPath(_ path: String) throws(Failure) {
        let example = "such as /etc/farmgate/agent.toml"
        if path.trimmingWhitespace().isEmpty {
            throw Failure(
                description: "the configuration path is empty (-c '' or FARMGATE_CONFIG set to nothing); give the agent's configuration file, \(example)",
                exitCode: 64)
        }
        let last = path.split(separator: "/").last
        if path.hasSuffix("/") || last == "." || last == ".." || FileSystem.isDirectory(path) {
            throw Failure(
                description: "the configuration path \(path) names a directory; give the agent's configuration file in it, \(example)",
                exitCode: 64)
        }
    }

    /// The file a write to `path` must replace: `path` itself, or, when it is a symbolic link (or a chain of them), the
    /// file it points to, which may not exist yet. Replacing the link itself would turn it into a regular file and leave
    /// its target, the file the installer keeps, unedited.
    static func writeTarget(of path: String) throws(Failure) -> String {
        var current = AgentConfiguration.lexicalPath(path)
        for _ in 0..<40 {
            var info = stat()
            guard lstat(current, &info) == 0, info.st_mode & S_IFMT == S_IFLNK else { return current }
            guard let target = FileSystem.linkTarget(current) else {
                throw Failure(description: "cannot read the symbolic link \(current): \(String(cString: strerror(errno)))", exitCode: 78)
            }
            let directory = URL(fileURLWithPath: current).deletingLastPathComponent().path
            current = AgentConfiguration.lexicalPath(target.hasPrefix("/") ? target : directory + "/" + target)
        }
        throw Failure(description: "\(path): too many levels of symbolic links; point -c at the configuration file itself", exitCode: 78)
    }

    // MARK: The configuration's owner

    /// Who this process is, for deciding whether it may give a file to an owner (`fchown`).
    struct Identity: Sendable {
        var uid: uid_t
        var gid: gid_t
        var groups: Set<gid_t>
        var name: String

        /// The running process: effective ids and supplementary groups.
        static var current: Identity {
            let count = getgroups(0, nil)
            var groups = [gid_t](repeating: 0, count: Int(max(count, 0)))
            let filled = count > 0 ? getgroups(count, &groups) : 0
            let uid = geteuid()
            let name = getpwuid(uid).map { String(cString: $0.pointee.pw_name) } ?? "uid \(uid)"
            return Identity(uid: uid, gid: getegid(), groups: Set(groups.prefix(Int(max(filled, 0)))), name: name)
        }

        /// Whether `fchown(fd, uid, gid)` on a file this process created can succeed: root may give any file away; anyone
        /// else only keeps their own uid and may choose one of their own groups.
        func mayGive(uid owner: uid_t, gid group: gid_t) -> Bool {
            uid == 0 || (owner == uid && (group == gid || groups.contains(group)))
        }
    }

    /// Refuses, before the exchange, to edit a configuration whose owner this process cannot give the new file: the edit
    /// writes a new file and renames it over the old one, keeping the old owner, and only root may give a file to
    /// another user (or to a group it is not in). Without this check the token was spent and the file left unedited.
    static func checkConfigOwner(_ target: String, as identity: Identity) throws(Failure) {
        var info = stat()
        guard stat(target, &info) == 0, !identity.mayGive(uid: info.st_uid, gid: info.st_gid) else { return }
        let owner = "\(UnixUser.userName(info.st_uid)):\(UnixUser.groupName(info.st_gid))"
        throw Failure(
            description: "\(target) belongs to \(owner), and \(identity.name) cannot give the edited file that owner (enroll writes a new file and "
                + "renames it over the old one, keeping its owner); nothing was sent, the token is unused. Run farmgate enroll as root "
                + "(sudo farmgate enroll …), or, if the file should be \(identity.name)'s, `sudo chown \(identity.name) \(target)` first",
            exitCode: 73)
    }

    // MARK: The key file against the agent's own files

    /// The files the agent owns, named by the configuration or by its defaults: the key must never replace one of them.
    /// `document` is nil when the configuration does not exist yet (the defaults then apply).
    static func agentFiles(configPath: String, document: ConfigTable?, base: String) -> [(path: String, what: String)] {
        let buffer = (try? document?.table("buffer")?.string("path")).map { AgentConfiguration.resolve($0, against: base) }
            ?? BufferConfiguration().path
        var files: [(path: String, what: String)] = [
            (configPath, "the configuration file itself"),
            (buffer, "the agent's buffer ([buffer] path), which holds the readings not yet sent"),
            (buffer + "-wal", "the buffer's -wal file, which holds its latest committed readings"),
            (buffer + "-shm", "the buffer's -shm file"),
            (buffer + ".seq", "the buffer's .seq sidecar, which keeps sequence numbers from going backwards"),
            (buffer + ".lock", "the buffer's .lock file, which keeps a second agent off the buffer"),
            (buffer + ".control", "the buffer's .control file, which names the agent's control socket"),
            (buffer + ".reserve", "the buffer's .reserve file, the disk space it keeps for a full disk"),
        ]
        if let metrics = try? document?.table("metrics")?.string("textfile"), !metrics.isEmpty {
            files.append((AgentConfiguration.resolve(metrics, against: base), "the metrics file ([metrics] textfile)"))
        }
        let socket = (try? document?.table("control")?.string("socket")).map { AgentConfiguration.resolve($0, against: base) }
            ?? "/run/farmgate/control.sock"
        files.append((socket, "the agent's control socket ([control] socket)"))
        return files
    }

    /// Another agent configuration beside this one (or beside the key file), under any name, whose key is the existing `keyFile` and
    /// whose device is not `device` (nil: this configuration names none yet, so any other device's): writing this
    /// device's key over it would make that agent's uploads refused for good. A neighbour that does not parse (a
    /// half-finished edit: its agent still runs the file it loaded) is read line by line, as `status` reads one; one
    /// that names no device yet counts as another device's, and one that names `device` is a copy of this site, not
    /// another. Only agent configurations count: a `[device]`, `[upload]` or `[[sensor]]` table (an ingest's
    /// configuration beside it reads no key), and not the leftover copies of `isLeftoverCopy`.
    static func otherDeviceKeyedAt(_ keyFile: String, configPath: String, device: String?) -> (config: String, device: String?)? {
        guard FileSystem.isFile(keyFile) else { return nil }  // nothing to replace
        let directories = Set([configPath, keyFile].map { URL(fileURLWithPath: canonicalPath($0)).deletingLastPathComponent().path })
        for directory in directories.sorted() {
            guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { continue }
            // Any name (`agent-a.conf`, `site-b.toml.disabled`): what counts is the content. Hidden files are editors'
            // swap files and the like, and installers', packages' and editors' leftover copies (`agent.toml.example`,
            // `.dpkg-dist`, `.bak`, `~`) are no site; the key files, units and the rest are not agent configurations.
            for name in names.sorted() where !name.hasPrefix(".") && !isLeftoverCopy(name) {
                let other = directory + "/" + name
                var info = stat()  // a regular file only: reading a FIFO would wait for a writer
                guard stat(other, &info) == 0, info.st_mode & S_IFMT == S_IFREG, !sameFile(other, configPath),
                    let text = try? FileSystem.text(other, limit: 1 << 20)
                else { continue }
                let neighbour = NeighbourConfiguration(text: text, file: other)
                guard neighbour.isAgentConfiguration, neighbour.device == nil || neighbour.device != device else { continue }
                let base = URL(fileURLWithPath: other).deletingLastPathComponent().path
                let otherKey = AgentConfiguration.resolve(neighbour.keyFile ?? "device.key", against: base)
                if sameFile(keyFile, otherKey) { return (other, neighbour.device) }
            }
        }
        return nil
    }

    /// Name endings of the copies that installers, package managers and editors leave beside a configuration: no agent
    /// runs them. `make install` over an existing file writes the template to `.example`; dpkg and ucf keep a changed
    /// conffile's other version as `.dpkg-dist`/`.dpkg-old`/`.dpkg-new`/`.ucf-dist`/`.ucf-old`/`.ucf-new`, rpm and
    /// pacman as `.rpmnew`/`.rpmsave`/`.pacnew`/`.pacsave`; patch leaves `.orig`/`.rej`; editors and people leave
    /// `.bak`/`.old`/`.save`/`.swp`, `name~` and `#name#`. Counting them as sites would refuse this site's own key
    /// after every reinstall or upgrade (before the fix, a tester: exit 78 for `agent.toml.example`).
    static let leftoverSuffixes = [
        ".example", ".sample", ".dist", ".dpkg-dist", ".dpkg-old", ".dpkg-new", ".dpkg-bak", ".dpkg-tmp", ".dpkg-remove",
        ".ucf-dist", ".ucf-old", ".ucf-new", ".rpmnew", ".rpmsave", ".rpmorig", ".pacnew", ".pacsave", ".orig", ".rej",
        ".bak", ".old", ".save", ".swp", ".swo", "~",
    ]

    /// Whether `name` (a file name, no directory) is such a leftover copy; compared without regard to case.
    static func isLeftoverCopy(_ name: String) -> Bool {
        let lower = name.lowercased()
        if lower.count > 2, lower.hasPrefix("#"), lower.hasSuffix("#") { return true }  // Emacs auto-save
        return leftoverSuffixes.contains { lower.count > $0.count && lower.hasSuffix($0) }
    }

    /// What enrollment needs of a neighbouring configuration: parsed when it parses, else read line by line.
    struct NeighbourConfiguration {
        var isAgentConfiguration: Bool
        var device: String?
        var keyFile: String?

        init(text: String, file: String) {
            if let document = try? ConfigDocument.parse(text, file: file) {
                isAgentConfiguration = document.contains("device") || document.contains("upload") || document.contains("sensor")
                device = (try? document.table("device")?.string("id")) ?? nil
                keyFile = (try? document.table("upload")?.string("key_file")) ?? nil
            } else {
                let editor = ConfigFileEditor(text: text)
                let headers = text.split(whereSeparator: \.isNewline).map { $0.filter { $0 != " " && $0 != "\t" } }
                isAgentConfiguration = headers.contains { $0.hasPrefix("[device]") || $0.hasPrefix("[upload]") || $0.hasPrefix("[[sensor]]") }
                device = editor.stringValue("id", in: "device")
                keyFile = editor.stringValue("key_file", in: "upload")
            }
            if device?.isEmpty == true { device = nil }
            if keyFile?.isEmpty == true { keyFile = nil }
        }
    }

    /// `path` absolute, with `.`, `..` and repeated slashes resolved, and the symbolic links of its longest existing
    /// prefix resolved (`realpath`): two names of one file compare equal even when the file does not exist yet.
    static func canonicalPath(_ path: String) -> String {
        var existing = AgentConfiguration.lexicalPath(path)
        var rest: [String] = []
        while existing != "/" {
            if let resolved = realpath(existing, nil) {
                defer { free(resolved) }
                let base = String(cString: resolved)
                return rest.isEmpty ? base : AgentConfiguration.lexicalPath(base + "/" + rest.reversed().joined(separator: "/"))
            }
            let url = URL(fileURLWithPath: existing)
            rest.append(url.lastPathComponent)
            existing = url.deletingLastPathComponent().path
        }
        return AgentConfiguration.lexicalPath(path)
    }

    /// Whether `a` and `b` name the same file: the same canonical path, or the same inode when both exist.
    static func sameFile(_ a: String, _ b: String) -> Bool {
        var first = stat()
        var second = stat()
        if stat(a, &first) == 0, stat(b, &second) == 0, first.st_dev == second.st_dev, first.st_ino == second.st_ino { return true }
        return canonicalPath(a) == canonicalPath(b)
    }
}
