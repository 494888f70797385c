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
/// file beside it, as SQLite's own locking allows. A sidecar rather than the database file itself, whose locks belong
/// to SQLite (closing any descriptor of a file drops the process's POSIX locks on it).
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
    public let path: String
    private var descriptor: Int32

    /// Takes the lock for the SQLite file at `databasePath`, creating the sidecar when missing; never waits.
    ///
    /// - Throws: ``Failure/held(lockPath:databasePath:)`` when another process holds it, else
    ///   ``Failure/unusable(lockPath:errno:)``.
    ///
    /// The sidecar is named after the file's resolved path (links followed), so two spellings of one file, or a link to
    /// it, take the same lock. Taken after the store opened the file, which then exists.
    public init(databasePath: String) throws(Failure) {
        var resolved = databasePath
        if let real = realpath(databasePath, nil) {
            resolved = String(cString: real)
            free(real)
        }
        let path = resolved + ".lock"
        let descriptor = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else { throw .unusable(lockPath: path, errno: errno) }
        var result: Int32
        repeat { result = flock(descriptor, LOCK_EX | LOCK_NB) } while result != 0 && errno == EINTR
        guard result == 0 else {
            let code = errno
            close(descriptor)
            throw code == EWOULDBLOCK ? .held(lockPath: path, databasePath: databasePath) : .unusable(lockPath: path, errno: code)
        }
        self.path = path
        self.descriptor = descriptor
    }

    /// Lets the lock go (the sidecar stays: removing it would let a third process lock a new file beside a held one).
    public func release() {
        guard descriptor >= 0 else { return }
        close(descriptor)
        descriptor = -1
    }

    deinit { release() }
}
