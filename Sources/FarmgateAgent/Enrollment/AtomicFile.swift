import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Writes a file so that it is either the old one or the whole new one, even across a power cut (``DurableFile``): the
/// temporary file gets its final mode and owner before a byte is written, so a key is never readable by others, not
/// even for a moment. Creates missing directories first.
///
/// Blocking file system calls: run it off the concurrency pool (the CLI calls it from its own thread).
public enum AtomicFile {
    /// Who should own a file: a user id and group id.
    public struct Owner: Sendable, Hashable {
        public var uid: uid_t
        public var gid: gid_t
        /// The user's name, for messages.
        public var name: String

        public init(uid: uid_t, gid: gid_t, name: String) {
            self.uid = uid
            self.gid = gid
            self.name = name
        }

        /// The user `name` from the password database, or nil when there is none.
        public static func user(named name: String) -> Owner? {
            guard let entry = getpwnam(name) else { return nil }
            return Owner(uid: entry.pointee.pw_uid, gid: entry.pointee.pw_gid, name: name)
        }
    }

    /// Why a file could not be written: the path and what the system said.
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let description: String
    }

    /// Writes `bytes` to `path` with `mode`, owned by `owner` (nil: the current user), creating missing directories
    /// (mode 0755).
    public static func write(_ bytes: [UInt8], to path: String, mode: mode_t, owner: Owner?) throws(Failure) {
        let url = URL(fileURLWithPath: path)
        let directory = url.deletingLastPathComponent().path
        do {
            try FileSystem.createDirectories(directory, mode: 0o755)
        } catch {
            throw Failure(description: "cannot create the directory \(directory): \(error.reason)")
        }
        do {
            try DurableFile.replace(
                path, with: bytes, temporary: directory + "/." + url.lastPathComponent + ".tmp-\(getpid())", mode: mode,
                owner: owner.map { (uid: $0.uid, gid: $0.gid) })
        } catch {
            let detail = error.step == "chown" ? " to \(owner?.name ?? "its owner")" : ""
            throw Failure(description: "\(error.description)\(detail)")
        }
    }

    /// Whether a file can be created in `directory` (or in the nearest existing parent, where it would be created):
    /// checked by creating and removing one, which also catches a read-only file system.
    public static func canCreate(in directory: String) -> Failure? {
        // `..` resolved first: URL's deleteLastPathComponent appends another `..` to a path ending in one, and the walk
        // up to an existing parent never ended (`--key-file /missing/../device.key`).
        var existing = AgentConfiguration.lexicalPath(directory)
        while !FileManager.default.fileExists(atPath: existing), existing != "/" {
            existing = existing.lastIndex(of: "/").map { $0 == existing.startIndex ? "/" : String(existing[..<$0]) } ?? "/"
        }
        let probe = (existing == "/" ? "" : existing) + "/.farmgate-probe-\(getpid())"
        let fd = open(probe, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return failure("cannot write in \(existing)") }
        close(fd)
        unlink(probe)
        return nil
    }

    private static func failure(_ what: String) -> Failure {
        Failure(description: "\(what): \(String(cString: strerror(errno)))")
    }
}
