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

    /// Whether this user may open a file of `mode`, owned by `owner` and `group`, for reading and writing (or reading only).
    public func mayOpen(mode: mode_t, owner: uid_t, group: gid_t, write: Bool = true) -> Bool {
        if uid == 0 { return true }
        let needed: mode_t = write ? 0o6 : 0o4
        if owner == uid { return (mode >> 6) & needed == needed }
        if groups.contains(group) { return (mode >> 3) & needed == needed }
        return mode & needed == needed
    }
}
