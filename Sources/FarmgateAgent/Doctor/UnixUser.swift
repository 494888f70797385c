#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// A user and the groups it belongs to, to tell whether it may open a device node, from the node's mode, owner and group
/// (what the kernel checks; ACLs are not looked at).
public struct UnixUser: Sendable, Hashable {
    public var name: String
    public var uid: uid_t
    public var gid: gid_t
    /// Every group of the user, its primary group included.
    public var groups: Set<gid_t>

    public init(name: String, uid: uid_t, gid: gid_t, groups: Set<gid_t>) {
        self.name = name
        self.uid = uid
        self.gid = gid
        self.groups = groups.union([gid])
    }

    /// The user `name` with its groups from the system's databases, or nil when there is no such user.
    public static func named(_ name: String) -> UnixUser? {
        guard let entry = getpwnam(name) else { return nil }
        let uid = entry.pointee.pw_uid
        let gid = entry.pointee.pw_gid
        var count: Int32 = 64
        var list = [gid_t](repeating: 0, count: Int(count))
        if getgrouplist(name, gid, &list, &count) < 0, count > 0 {
            list = [gid_t](repeating: 0, count: Int(count))
            _ = getgrouplist(name, gid, &list, &count)
        }
        return UnixUser(name: name, uid: uid, gid: gid, groups: Set(list.prefix(Int(max(0, count)))))
    }

    /// The user this process runs as.
    public static var current: UnixUser {
        let uid = geteuid()
        let name = getpwuid(uid).map { String(cString: $0.pointee.pw_name) } ?? "uid \(uid)"
        return named(name) ?? UnixUser(name: name, uid: uid, gid: getegid(), groups: [getegid()])
    }

    /// The name of group `gid`, or its number.
    public static func groupName(_ gid: gid_t) -> String {
        getgrgid(gid).map { String(cString: $0.pointee.gr_name) } ?? "\(gid)"
    }

    /// The name of user `uid`, or its number.
    public static func userName(_ uid: uid_t) -> String {
        getpwuid(uid).map { String(cString: $0.pointee.pw_name) } ?? "\(uid)"
    }

    /// The first directory on the way to `path` that this user may not pass (search, the `x` bit), with its mode and
    /// owners in words; nil when every one lets it through. Both the path as written and the one its links resolve to
    /// are walked: the kernel checks every directory it goes through. A file readable by everyone in a directory of mode
    /// 700 is still unreadable to others (a tester, 2026-12-07: `doctor --user` said "may read it").
    public func blockedDirectory(on path: String) -> String? {
        guard uid != 0 else { return nil }
        var paths = [path]
        if let resolved = realpath(path, nil) {
            paths.append(String(cString: resolved))
            free(resolved)
        }
        for candidate in paths where candidate.hasPrefix("/") {
            var directory = ""
            for component in candidate.split(separator: "/").dropLast() {
                directory += "/" + component
                var info = stat()
                guard stat(directory, &info) == 0 else { break }
                let mode = info.st_mode & 0o777
                let allowed =
                    info.st_uid == uid ? (mode >> 6) & 1 == 1 : groups.contains(info.st_gid) ? (mode >> 3) & 1 == 1 : mode & 1 == 1
                if !allowed {
                    return "\(directory) (mode \(String(mode, radix: 8)), owner \(Self.userName(info.st_uid)), group \(Self.groupName(info.st_gid)))"
                }
            }
        }
        return nil
    }

    /// Whether this user may open a file of `mode`, owned by `owner` and `group`, for reading and writing (or reading only).
    public func mayOpen(mode: mode_t, owner: uid_t, group: gid_t, write: Bool = true) -> Bool {
        if uid == 0 { return true }
        let needed: mode_t = write ? 0o6 : 0o4
        if owner == uid { return (mode >> 6) & needed == needed }
        if groups.contains(group) { return (mode >> 3) & needed == needed }
        return mode & needed == needed
    }
}
