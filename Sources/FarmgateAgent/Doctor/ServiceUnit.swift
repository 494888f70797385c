import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// What the agent's systemd unit says about the user and groups the service runs with, read as systemd would read it:
/// the first `farmgate.service` on the unit search path, then its drop-ins.
///
/// `farmgate doctor` needs it because the installed unit grants the serial and GPIO groups itself
/// (`SupplementaryGroups=dialout gpio`): the agent's user need not be a member of them, and calling that a problem sent
/// installers to fix what was not broken.
///
/// Read: `User=`, `Group=` and `SupplementaryGroups=` in `[Service]`, across the unit file and the `.conf` files of every
/// `farmgate.service.d/` on the search path (a file name found in several directories counts once, from the first; all
/// applied in file-name order after the unit). A later `User=` or `Group=` replaces an earlier one; `SupplementaryGroups=`
/// adds to the list, and an empty assignment clears it, as in systemd. Comments (`#`, `;`) and lines continued with a
/// trailing backslash are understood; specifiers (`%u`) and `DynamicUser=` are not.
public struct ServiceUnit: Sendable, Hashable {
    /// The unit's name.
    public static let name = "farmgate.service"

    /// systemd's search path for system units, highest priority first, as far as an installed farmgate can be: local
    /// configuration and `systemctl edit` drop-ins (`/etc`), runtime units, `make install` (`/usr/local/lib`), the package
    /// (`/lib` on systems whose `/usr` is not merged, `/usr/lib`).
    public static let standardDirectories = [
        "/etc/systemd/system.control", "/run/systemd/system.control", "/etc/systemd/system", "/run/systemd/system",
        "/usr/local/lib/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system",
    ]

    /// The search path, from `SYSTEMD_UNIT_PATH` when it is set (colon-separated; ending in a colon appends the standard
    /// directories, as systemd does), else ``standardDirectories``.
    public static func directories(environment: [String: String]) -> [String] {
        guard let value = environment["SYSTEMD_UNIT_PATH"], !value.isEmpty else { return standardDirectories }
        let given = value.split(separator: ":").map(String.init)
        return value.hasSuffix(":") ? given + standardDirectories : given
    }

    /// The unit file and drop-ins read, in the order they were applied.
    public var files: [String]
    /// `User=`, or nil when the unit sets none (the service then runs as root).
    public var user: String?
    /// `Group=`, the service's primary group, or nil.
    public var group: String?
    /// `SupplementaryGroups=`, in order.
    public var supplementaryGroups: [String] { supplementary.map(\.name) }
    /// The file that set `Group=`, and for each supplementary group the file that added it.
    private var groupFile: String?
    private var supplementary: [Grant] = []
    /// `ProtectSystem=` (the last one), and the file that set it.
    public var protectSystem: String?
    public var protectSystemFile: String?
    /// `ReadWritePaths=`, in order (a leading `-`, "ignore if missing", taken off).
    public var readWritePaths: [String] = []
    /// `StateDirectory=`, `RuntimeDirectory=`, `LogsDirectory=`, `CacheDirectory=`: made and writable under /var/lib,
    /// /run, /var/log, /var/cache.
    public var managedDirectories: [String] = []

    /// The directories the service may write under `ProtectSystem=strict` (nil: the unit does not make the file system
    /// read-only): `ReadWritePaths=`, the managed directories, and `/tmp`, `/var/tmp` and `/dev/shm`.
    public var writablePaths: [String]? {
        guard protectSystem == "strict" else { return nil }
        return readWritePaths + managedDirectories + ["/tmp", "/var/tmp", "/dev/shm"]
    }

    /// Whether `path` lies in one of ``writablePaths`` (true when the unit does not protect the file system).
    public func mayWrite(_ path: String) -> Bool {
        guard let writable = writablePaths else { return true }
        return writable.contains { root in
            let base = root.hasSuffix("/") && root.count > 1 ? String(root.dropLast()) : root
            return path == base || path.hasPrefix(base == "/" ? "/" : base + "/")
        }
    }

    private struct Grant: Sendable, Hashable {
        let name: String
        let file: String
    }

    /// An empty unit read from no file.
    init() {
        files = []
    }

    /// For each group of ``groups``: the setting and the file that grants it, e.g.
    /// `SupplementaryGroups= in /etc/systemd/system/farmgate.service`.
    public var grantedBy: [String: String] {
        var sources: [String: String] = [:]
        for entry in supplementary where sources[entry.name] == nil { sources[entry.name] = "SupplementaryGroups= in \(entry.file)" }
        if let group, let groupFile { sources[group] = "Group= in \(groupFile)" }
        return sources
    }

    /// Every group the unit gives the service: `Group=` and `SupplementaryGroups=`.
    public var groups: [String] { (group.map { [$0] } ?? []) + supplementaryGroups }

    /// Whether the service runs as `user`, so that the unit's groups are that user's when the agent runs.
    public func runs(as user: UnixUser) -> Bool {
        guard let named = self.user else { return false }
        return named == user.name || named == String(user.uid)
    }

    /// The group ids of ``groups`` that exist on this machine, each with its name.
    public func groupIDs() -> [(id: gid_t, name: String)] {
        groups.compactMap { name in
            if let entry = getgrnam(name) { return (entry.pointee.gr_gid, name) }
            if let number = UInt32(name) { return (gid_t(number), UnixUser.groupName(gid_t(number))) }
            return nil
        }
    }

    /// The unit as systemd would load it from `directories`, or nil when there is none (or it is masked: a link to
    /// `/dev/null`, or empty).
    public static func load(directories: [String], name: String = ServiceUnit.name) -> ServiceUnit? {
        guard let main = directories.lazy.map({ "\($0)/\(name)" }).first(where: { FileManager.default.fileExists(atPath: $0) }),
            let text = try? String(contentsOfFile: main, encoding: .utf8),
            !text.trimmingWhitespace().isEmpty
        else { return nil }
        var dropIns: [String: String] = [:]
        for directory in directories {
            let folder = "\(directory)/\(name).d"
            let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
            for file in names where file.hasSuffix(".conf") && dropIns[file] == nil {
                dropIns[file] = "\(folder)/\(file)"
            }
        }
        var unit = ServiceUnit()
        unit.apply(text, from: main)
        for file in dropIns.keys.sorted() {
            guard let path = dropIns[file], let text = try? String(contentsOfFile: path, encoding: .utf8) else { continue }
            unit.apply(text, from: path)
        }
        return unit
    }

    /// Applies the `[Service]` settings of one file.
    mutating func apply(_ text: String, from path: String) {
        files.append(path)
        var section = ""
        for line in Self.logicalLines(text) {
            if line.hasPrefix("[") {
                section = line.hasSuffix("]") ? String(line.dropFirst().dropLast()) : ""
                continue
            }
            guard section == "Service", let equals = line.firstIndex(of: "=") else { continue }
            let key = line[..<equals].trimmingWhitespace()
            let value = line[line.index(after: equals)...].trimmingWhitespace()
            switch key {
            case "User": user = value.isEmpty ? nil : Self.unquoted(value)
            case "Group":
                group = value.isEmpty ? nil : Self.unquoted(value)
                groupFile = path
            case "SupplementaryGroups":
                // A list: each assignment adds to it; an empty one clears it.
                if value.isEmpty { supplementary = [] }
                for name in value.split(whereSeparator: { $0 == " " || $0 == "\t" }) {
                    supplementary.append(Grant(name: Self.unquoted(String(name)), file: path))
                }
            case "ProtectSystem":
                protectSystem = value.isEmpty ? nil : value.lowercased()
                protectSystemFile = path
            case "ReadWritePaths":
                if value.isEmpty { readWritePaths = [] }
                for entry in value.split(whereSeparator: { $0 == " " || $0 == "\t" }) {
                    var item = Self.unquoted(String(entry))
                    while let first = item.first, first == "-" || first == "+" { item.removeFirst() }
                    if !item.isEmpty { readWritePaths.append(item) }
                }
            case "StateDirectory", "RuntimeDirectory", "LogsDirectory", "CacheDirectory":
                let root = ["StateDirectory": "/var/lib", "RuntimeDirectory": "/run", "LogsDirectory": "/var/log", "CacheDirectory": "/var/cache"][key] ?? "/var/lib"
                for entry in value.split(whereSeparator: { $0 == " " || $0 == "\t" }) {
                    let name = Self.unquoted(String(entry)).split(separator: ":").first.map(String.init) ?? ""
                    if !name.isEmpty { managedDirectories.append("\(root)/\(name)") }
                }
            default: continue
            }
        }
    }

    /// The file's lines with comments and blank lines left out and continued lines (a trailing backslash) joined.
    static func logicalLines(_ text: String) -> [String] {
        var lines: [String] = []
        var pending: String?
        for raw in text.split(omittingEmptySubsequences: false, whereSeparator: { $0 == "\n" || $0 == "\r" }) {
            let line = raw.trimmingWhitespace()
            // systemd skips comment lines inside a continuation too.
            if line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasSuffix("\\") {
                pending = (pending.map { $0 + " " } ?? "") + String(line.dropLast())
                continue
            }
            let whole = pending.map { $0 + " " + line } ?? line
            pending = nil
            if !whole.trimmingWhitespace().isEmpty { lines.append(whole.trimmingWhitespace()) }
        }
        if let pending, !pending.trimmingWhitespace().isEmpty { lines.append(pending.trimmingWhitespace()) }
        return lines
    }

    private static func unquoted(_ text: String) -> String {
        guard text.count >= 2, let first = text.first, first == text.last, first == "\"" || first == "'" else { return text }
        return String(text.dropFirst().dropLast())
    }
}
