#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The file system calls the site binary needs, with errors that carry `errno` and a reason an installer can act on
/// ("Permission denied"): whole small files (configuration, keys, sysfs attributes), `mkdir -p`, a file's kind and
/// size. What `String(contentsOfFile:)` and `FileManager` would do, without full Foundation. Blocking: run them off
/// the concurrency pool where it matters.
public enum FileSystem {
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let path: String
        /// `errno`, or 0 when the file was read but is not UTF-8 text or is larger than the limit.
        public let code: Int32
        /// What went wrong without the path: `strerror(code)`, "not UTF-8 text", "larger than N bytes".
        public let reason: String
        /// What was being done: "read", or "create the directory" for ``createDirectories(_:mode:)``.
        public var operation = "read"

        public var description: String { "cannot \(operation) \(path): \(reason)" }
    }

    /// The bytes of `path`; files larger than `limit` are refused rather than read into memory, and anything but a
    /// regular file (a FIFO, socket or device, which a read could wait on for ever: a `key_file` that was a FIFO hung
    /// every command and a reload) is refused without reading it.
    public static func bytes(_ path: String, limit: Int = 16 << 20) throws(Failure) -> [UInt8] {
        // O_NONBLOCK: opening a FIFO no writer holds would itself wait. It changes nothing for a regular file.
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { throw failure(path, errno) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw failure(path, errno) }
        switch info.st_mode & S_IFMT {
        case S_IFREG:
            break
        case S_IFDIR:
            throw Failure(path: path, code: EISDIR, reason: "is a directory, not a file")
        default:
            throw Failure(path: path, code: EINVAL, reason: "is not a regular file (a FIFO, socket or device); give the path of a file")
        }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16_384)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw failure(path, errno)
            }
            if count == 0 { return bytes }
            guard bytes.count + count <= limit else {
                throw Failure(path: path, code: 0, reason: "larger than \(limit) bytes")
            }
            bytes.append(contentsOf: chunk[..<count])
        }
    }

    /// The UTF-8 text of `path`.
    public static func text(_ path: String, limit: Int = 16 << 20) throws(Failure) -> String {
        let bytes = try bytes(path, limit: limit)
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw Failure(path: path, code: 0, reason: "not UTF-8 text")
        }
        return text
    }

    /// Creates `path` and any missing parents (`mkdir -p`), the new ones with `mode` (less the umask); an existing
    /// directory is fine, an existing file of another kind is an error.
    public static func createDirectories(_ path: String, mode: mode_t = 0o755) throws(Failure) {
        guard !path.isEmpty, !isDirectory(path) else { return }
        let parent = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? ""
        if !parent.isEmpty { try createDirectories(parent, mode: mode) }
        if mkdir(path, mode) != 0, errno != EEXIST {
            var failure = failure(path, errno)
            failure.operation = "create the directory"
            throw failure
        }
        guard isDirectory(path) else {
            throw Failure(path: path, code: ENOTDIR, reason: "exists and is not a directory", operation: "create the directory")
        }
    }

    /// An absolute `path` without empty, `.` and `..` components and trailing slashes (`/a//b/./c/../d/` is `/a/b/d`),
    /// read as text only: nothing is looked up. A relative path is returned as it is.
    public static func lexicallyNormalized(_ path: String) -> String {
        guard path.hasPrefix("/") else { return path }
        var parts: [Substring] = []
        for part in path.split(separator: "/") where part != "." {
            if part == ".." { _ = parts.popLast() } else { parts.append(part) }
        }
        return "/" + parts.joined(separator: "/")
    }

    /// `path` with links followed (`realpath`); for a file that does not exist yet, its directory's path with links
    /// followed and its own name: two names of one file compare equal, whether or not it exists yet.
    public static func resolvedPath(_ path: String) -> String {
        func real(_ path: String) -> String? {
            guard let resolved = realpath(path, nil) else { return nil }
            defer { free(resolved) }
            return String(cString: resolved)
        }
        if let file = real(path) { return file }
        guard let slash = path.lastIndex(of: "/") else { return real(".").map { $0 + "/" + path } ?? path }
        let directory = slash == path.startIndex ? "/" : String(path[..<slash])
        guard let resolved = real(directory) else { return path }
        return (resolved == "/" ? "" : resolved) + "/" + path[path.index(after: slash)...]
    }

    /// The nearest existing ancestor of `path` that is not a directory (a file where a directory of the path must be):
    /// nothing could ever make `path`'s directory; nil when nothing is in the way.
    public static func fileInTheWay(of path: String) -> String? {
        var directory = path
        while let slash = directory.lastIndex(of: "/") {
            directory = String(directory[..<slash])
            guard !directory.isEmpty else { return nil }
            var info = stat()
            if stat(directory, &info) == 0 { return info.st_mode & S_IFMT == S_IFDIR ? nil : directory }
        }
        return nil
    }

    /// Whether `path` is a directory (following symbolic links).
    public static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFDIR
    }

    /// Whether `path` exists and is anything but a directory (following symbolic links).
    public static func isFile(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && info.st_mode & S_IFMT != S_IFDIR
    }

    /// What a file of mode `mode` is, for the error that refuses it ("a regular file", "a directory", ...).
    public static func kind(of mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFREG: "a regular file"
        case S_IFDIR: "a directory"
        case S_IFLNK: "a symbolic link"
        case S_IFIFO: "a named pipe"
        case S_IFCHR: "a character device"
        case S_IFBLK: "a block device"
        case S_IFSOCK: "a socket"
        default: "another kind of file"
        }
    }

    /// The target a symbolic link at `path` names, as written in it (relative or absolute); nil when `path` is no link
    /// or cannot be read (`errno` says why).
    public static func linkTarget(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = readlink(path, &buffer, buffer.count - 1)
        guard count > 0 else { return nil }
        return String(decoding: buffer[..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// A file as the kernel names it (device and inode), whatever path leads to it.
    public struct Identity: Hashable, Sendable {
        public var device: UInt64
        public var inode: UInt64
    }

    /// What `stat(path)` says of a file's identity.
    public enum IdentityLookup: Hashable, Sendable {
        case found(Identity)
        /// No such file (`ENOENT`, `ENOTDIR`): removed.
        case missing
        /// Any other failure (permissions on a directory, I/O): nothing can be concluded.
        case unknown
    }

    /// The identity of the file at `path` (following symbolic links).
    public static func identity(_ path: String) -> IdentityLookup {
        var info = stat()
        guard stat(path, &info) == 0 else { return errno == ENOENT || errno == ENOTDIR ? .missing : .unknown }
        return .found(Identity(device: UInt64(truncatingIfNeeded: info.st_dev), inode: UInt64(truncatingIfNeeded: info.st_ino)))
    }

    /// The size of `path` in bytes, or nil when it does not exist or cannot be read.
    public static func size(_ path: String) -> Int64? {
        var info = stat()
        return stat(path, &info) == 0 ? Int64(info.st_size) : nil
    }

    private static func failure(_ path: String, _ code: Int32) -> Failure {
        Failure(path: path, code: code, reason: String(cString: strerror(code)))
    }
}
