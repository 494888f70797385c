import FarmgateSupport
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The one `serve` of a SQLite file: an exclusive `flock` on the sidecar `<path>.lock`, held until ``release()`` or
/// until the process ends (the kernel drops it with the descriptor, `kill -9` included).
///
/// Two `serve` processes on one SQLite file would each keep their own `latest` cache, current only with their own
/// commits (the cache follows other instances only on PostgreSQL, through LISTEN/NOTIFY), so each would answer stale
/// values. Only `serve` takes the lock: the admin commands (`device create`, `retention run`, `export`...) work on the
/// file beside it, as SQLite's own locking allows (a retention run takes a lock of its own, `<path>.retention.lock`,
/// see ``SQLiteIngestStore/runRetention(_:now:options:)``). A ``SidecarLock``.
public final class SQLiteServeLock {
    /// Why the lock could not be taken.
    public enum Failure: Error, CustomStringConvertible {
        /// Another process holds it: a `serve` runs on the file.
        case held(lockPath: String, databasePath: String)
        /// The sidecar cannot be opened or locked (permissions, a read-only directory).
        case unusable(lockPath: String, errno: Int32)

        public var description: String {
            switch self {
            case .held(let lockPath, let databasePath):
                "another farmgate-ingest serve is running on the SQLite file \(databasePath) (it holds \(lockPath)); SQLite takes one serve per file, several instances need PostgreSQL ([storage] url)"
            case .unusable(let lockPath, let code):
                "cannot lock \(lockPath): \(String(cString: strerror(code)))"
            }
        }
    }

    /// The sidecar's path: the database file's with `.lock` appended.
    public var path: String { lock.path }
    private let lock: SidecarLock

    /// Takes the lock for the SQLite file at `databasePath`, creating the sidecar when missing; never waits.
    ///
    /// - Throws: ``Failure/held(lockPath:databasePath:)`` when another process holds it, else
    ///   ``Failure/unusable(lockPath:errno:)``.
    ///
    /// The sidecar is named after the file's resolved path (links followed), so two spellings of one file, or a link to
    /// it, take the same lock. Taken after the store opened the file, which then exists.
    public init(databasePath: String) throws(Failure) {
        do {
            lock = try SidecarLock(databasePath: databasePath, suffix: ".lock")
        } catch {
            switch error {
            case .held(let lockPath): throw .held(lockPath: lockPath, databasePath: databasePath)
            case .unusable(let lockPath, let code): throw .unusable(lockPath: lockPath, errno: code)
            }
        }
    }

    /// Lets the lock go (the sidecar stays: removing it would let a third process lock a new file beside a held one).
    public func release() {
        lock.release()
    }
}
