import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

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
        let text = String(decoding: data, as: UTF8.self).trimmingWhitespace()
        guard let value = Int64(text), value >= 0 else { return .unreadable("it does not hold a sequence number") }
        // Past any number this buffer can have given (a hand edit, a bad block): trusting it would overflow the
        // arithmetic that starts a recovered buffer above it, at every start.
        guard value <= BufferStore.maximumPlausibleSequence else {
            return .unreadable("it holds \(value), past any sequence number this buffer can have given (\(BufferStore.maximumPlausibleSequence))")
        }
        return .value(value)
    }

    /// Replaces the sidecar's content with `sequence`, atomically and durably. Blocking file I/O.
    func store(_ sequence: Int64, durably: Bool = true) throws(SidecarError) {
        // The rename is a change to the directory, not to the file: until the directory itself is fsynced, a power loss
        // can bring back the old directory entry (the previous value, or no sidecar at all) even though the new file's
        // bytes are on disk. The sidecar only matters on the day the database is lost, so it must not be older than the
        // commits it claims to cover: ``DurableFile`` fsyncs the directory before saying it is stored.
        do {
            try DurableFile.replace(path, with: Array("\(sequence)\n".utf8), temporary: path + ".tmp", mode: 0o644, durably: durably)
        } catch {
            throw SidecarError(operation: error.step, path: error.path, code: error.code)
        }
    }

    /// fsyncs the directory holding `path`, making a rename or creation in it durable.
    static func syncDirectory(of path: String) throws(SidecarError) {
        do {
            try DurableFile.syncDirectory(of: path)
        } catch {
            throw SidecarError(operation: error.step, path: error.path, code: error.code)
        }
    }
}

/// Writing the sequence sidecar failed. Never fatal: the database's counter stays authoritative.
struct SidecarError: Error, CustomStringConvertible {
    let operation: String
    let path: String
    let code: Int32

    var description: String { "cannot \(operation) \(path): \(String(cString: strerror(code)))" }
}
