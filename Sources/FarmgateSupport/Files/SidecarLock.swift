#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// An exclusive `flock` on a sidecar file beside a SQLite database (`<path><suffix>`), taken without waiting and held
/// until ``release()`` or until the process ends (the kernel drops it with the descriptor, `kill -9` included): the
/// ingest's one `serve` and one retention run per SQLite file, the agent's one process per buffer.
///
/// A sidecar rather than the database file itself, whose locks belong to SQLite (closing any descriptor of a file drops
/// the process's POSIX locks on it). The sidecar is named after the database's resolved path (links followed; for a file
/// not made yet, its directory's), so two spellings of one file, or a link to it, take the same lock; it stays when the
/// lock is let go (removing it would let a third process lock a new file beside a held one).
///
/// `open` and `flock` are system calls: take and release it on a thread of its own (the store's writer), not on the
/// Swift concurrency pool.
public final class SidecarLock: Sendable {
    /// Why the lock could not be taken.
    public enum Failure: Error {
        /// Another process (or another descriptor of this one) holds it.
        case held(lockPath: String)
        /// The sidecar cannot be opened or locked (permissions, a read-only directory).
        case unusable(lockPath: String, errno: Int32)
    }

    /// The sidecar's path.
    public let path: String
    /// The locked descriptor; -1 once released.
    private let descriptor: Mutex<Int32>

    /// Takes the lock of the SQLite file at `databasePath` named by `suffix`, creating the sidecar when missing.
    public init(databasePath: String, suffix: String) throws(Failure) {
        let resolved = FileSystem.resolvedPath(databasePath)
        let path = resolved + suffix
        let descriptor = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else { throw .unusable(lockPath: path, errno: errno) }
        var result: Int32
        repeat { result = flock(descriptor, LOCK_EX | LOCK_NB) } while result != 0 && errno == EINTR
        guard result == 0 else {
            let code = errno
            close(descriptor)
            throw code == EWOULDBLOCK ? .held(lockPath: path) : .unusable(lockPath: path, errno: code)
        }
        self.path = path
        self.descriptor = Mutex(descriptor)
    }

    /// Lets the lock go. Safe to call more than once.
    public func release() {
        let open = descriptor.withLock { descriptor -> Int32 in
            defer { descriptor = -1 }
            return descriptor
        }
        guard open >= 0 else { return }
        // Unlocked before the close: a process forked meanwhile (any spawn, until its exec closes the inherited copy)
        // shares the open file description, and the close alone would leave the lock held until that copy went. A
        // test saw a run skipped right after another had let go, beside tests spawning processes.
        _ = flock(open, LOCK_UN)
        close(open)
    }

    deinit { release() }
}
