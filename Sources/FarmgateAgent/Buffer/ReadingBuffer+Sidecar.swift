import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The sequence high-water mark kept beside the database, in `<buffer path>.seq`.
///
/// The database's own `last_sequence` counter is authoritative while the file is healthy. The sidecar exists for the day the
/// database is lost (corrupt and moved aside, or deleted): the ingest is idempotent on (device, sequence), so a fresh buffer that
/// started again at 1 would see its new readings silently dropped as duplicates of old ones. The sidecar holds one decimal number
/// and a newline; it is written after each commit to a temporary file that is fsynced and then renamed over the old one, and the
/// directory is fsynced after the rename, so after a crash or power loss it holds either the previous or the new value, never a
/// torn one, and once stored the new value stays.
struct SequenceSidecar {
    let path: String

    init(bufferPath: String) {
        self.path = bufferPath + ".seq"
    }

    /// What reading the sidecar found.
    enum Content: Equatable {
        case absent
        case value(Int64)
        case unreadable(String)
    }

    /// Reads the sidecar. Blocking file I/O: call it on the buffer's own thread.
    func read() -> Content {
        guard let data = FileManager.default.contents(atPath: path) else {
            return FileManager.default.fileExists(atPath: path) ? .unreadable("cannot read the file") : .absent
        }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard let value = Int64(text), value >= 0 else { return .unreadable("it does not hold a sequence number") }
        return .value(value)
    }

    /// Replaces the sidecar's content with `sequence`, atomically and durably. Blocking file I/O.
    func store(_ sequence: Int64, durably: Bool = true) throws(SidecarError) {
        let temporary = path + ".tmp"
        let bytes = Array("\(sequence)\n".utf8)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SidecarError(operation: "open", path: temporary, code: errno) }
        var written = 0
        while written < bytes.count {
            let result = bytes[written...].withUnsafeBytes { raw in
                write(fd, raw.baseAddress, raw.count)
            }
            if result < 0 {
                if errno == EINTR { continue }
                let code = errno
                close(fd)
                throw SidecarError(operation: "write", path: temporary, code: code)
            }
            written += result
        }
        if durably, fsync(fd) != 0 {
            let code = errno
            close(fd)
            throw SidecarError(operation: "fsync", path: temporary, code: code)
        }
        close(fd)
        guard rename(temporary, path) == 0 else { throw SidecarError(operation: "rename", path: path, code: errno) }
        // The rename is a change to the directory, not to the file: until the directory itself is fsynced, a power loss
        // can bring back the old directory entry (the previous value, or no sidecar at all) even though the new file's
        // bytes are on disk. The sidecar only matters on the day the database is lost, so it must not be older than the
        // commits it claims to cover: fsync the directory before saying it is stored.
        if durably { try Self.syncDirectory(of: path) }
    }

    /// fsyncs the directory holding `path`, making a rename or creation in it durable.
    static func syncDirectory(of path: String) throws(SidecarError) {
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SidecarError(operation: "open the directory", path: directory, code: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw SidecarError(operation: "fsync the directory", path: directory, code: errno) }
    }
}

/// Writing the sequence sidecar failed. Never fatal: the database's counter stays authoritative.
struct SidecarError: Error, CustomStringConvertible {
    let operation: String
    let path: String
    let code: Int32

    var description: String { "cannot \(operation) \(path): \(String(cString: strerror(code)))" }
}
