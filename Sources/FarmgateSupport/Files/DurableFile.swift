#if canImport(Glibc)
    import Glibc
#endif

/// Replaces a file so that a reader, or the file system after a power cut, sees the old content or the whole new one,
/// never a part: the bytes go to `temporary` (in the same directory), created with its final mode (and owner) before a
/// byte is written, then `fsync`, a rename over `path`, and an `fsync` of the directory so that the rename itself is
/// durable. The one implementation behind the metrics file, the buffer's sequence sidecar and the enrolled key and
/// configuration.
///
/// Blocking file system calls: run it off the concurrency pool.
public enum DurableFile {
    /// What failed: the step (`create`, `chmod`, `chown`, `write`, `fsync`, `rename`, `fsync the directory`), the path it
    /// failed on and `errno`.
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let step: String
        public let path: String
        public let code: Int32

        public var description: String { "cannot \(step) \(path): \(String(cString: strerror(code)))" }
    }

    /// Writes `bytes` to `temporary`, then renames it over `path`.
    ///
    /// - Parameters:
    ///   - mode: set with `fchmod` whatever the umask.
    ///   - owner: (uid, gid) given with `fchown` before any byte is written; nil keeps the caller's.
    ///   - durably: false skips both `fsync`s (still atomic for readers, not across a power cut).
    public static func replace(
        _ path: String, with bytes: [UInt8], temporary: String, mode: mode_t, owner: (uid: uid_t, gid: gid_t)? = nil, durably: Bool = true
    ) throws(Failure) {
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode)
        guard fd >= 0 else { throw Failure(step: "create", path: temporary, code: errno) }
        var failure: Failure?
        if fchmod(fd, mode) != 0 { failure = Failure(step: "chmod", path: temporary, code: errno) }
        if failure == nil, let owner, fchown(fd, owner.uid, owner.gid) != 0 { failure = Failure(step: "chown", path: temporary, code: errno) }
        var written = 0
        while failure == nil, written < bytes.count {
            let count = bytes[written...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else {
                failure = Failure(step: "write", path: temporary, code: count < 0 ? errno : EIO)
                break
            }
            written += count
        }
        if failure == nil, durably, fsync(fd) != 0 { failure = Failure(step: "fsync", path: temporary, code: errno) }
        close(fd)
        if failure == nil, rename(temporary, path) != 0 { failure = Failure(step: "rename", path: path, code: errno) }
        if let failure {
            unlink(temporary)
            throw failure
        }
        if durably { try syncDirectory(of: path) }
    }

    /// fsyncs the directory holding `path`, making a rename or creation in it durable.
    public static func syncDirectory(of path: String) throws(Failure) {
        let slash = path.utf8.lastIndex(of: UInt8(ascii: "/"))
        let directory = slash.map { $0 == path.utf8.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw Failure(step: "open the directory", path: directory, code: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw Failure(step: "fsync the directory", path: directory, code: errno) }
    }
}
