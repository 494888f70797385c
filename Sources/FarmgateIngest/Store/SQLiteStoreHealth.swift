import FarmgateSupport
import Logging
import Synchronization

/// What the SQLite store knows of its writes that a query answering does not show: whether its file is still the one at
/// its path, and whether the last commit of an upload failed for a full disk. ``SQLiteIngestStore/ping()`` (`/readyz`)
/// answers with both.
///
/// A store file removed (`rm ingest.sqlite*`) or replaced (a copy moved over it) under a running `serve` goes on working:
/// SQLite writes into the inode it has open, no longer linked into the file system, every commit succeeds, and all of it
/// is gone at the next start, after the agents deleted what was acknowledged. So after each commit of an upload, before
/// it is answered, the path is `stat`ed and compared with the file opened (device and inode; the database, and its
/// `-wal`, which holds what was committed since the last checkpoint): one `stat` each beside the commit's `fsync`. Once
/// they differ, every upload is refused (503, nothing acknowledged: the agents keep their readings) until `serve` is
/// restarted. The store does not reopen the path by itself: what is there now (nothing, or another file) is for its
/// operator to judge. The `stat`s block, so they run on the store's own threads, like its SQLite calls.
final class SQLiteStoreHealth: Sendable {
    typealias FileIdentity = FileSystem.Identity
    typealias Lookup = FileSystem.IdentityLookup

    private struct Files {
        /// The database at ``path`` when it was opened; nil when `stat` could not tell (nothing is then compared).
        var database: FileIdentity?
        /// The WAL beside the file SQLite opened (links resolved), and the file found there first.
        var walPath: String?
        var wal: FileIdentity?
        /// Why the store's files are no longer the ones open, once that was found; for good.
        var lost: String?
    }

    /// The database's path as configured.
    let path: String
    private let logger: Logger
    private let files = Mutex(Files())
    /// When the last commit of an upload failed for a full disk; nil once one committed since.
    private let diskFullSince = Mutex<ContinuousClock.Instant?>(nil)
    /// How long a failed commit keeps `/readyz` at 503 without another: a balancer that takes the instance out on it
    /// sends no more uploads, and no commit could then ever say the disk has room again. After this the instance is
    /// offered again, and the next upload that fails for want of space holds it out again.
    static let diskFullHold: Duration = .seconds(30)

    init(path: String, logger: Logger) {
        self.path = path
        self.logger = logger
    }

    /// Records the files just opened, on the writer's thread right after opening. `databaseFile` is the file SQLite
    /// opened (`PRAGMA database_list`, links resolved), beside which it keeps the WAL; empty for none.
    func recordOpened(databaseFile: String) {
        let walPath = databaseFile.isEmpty ? nil : databaseFile + "-wal"
        var opened = Files(walPath: walPath)
        if case .found(let identity) = Self.lookup(path) { opened.database = identity }
        if let walPath, case .found(let identity) = Self.lookup(walPath) { opened.wal = identity }
        files.withLock { $0 = opened }
    }

    /// Throws ``SQLiteIngestStoreError/fileReplaced(path:problem:)`` at once when the files were found gone before,
    /// without looking again.
    func refuseIfLost() throws(SQLiteIngestStoreError) {
        if let lost = files.withLock({ $0.lost }) { throw .fileReplaced(path: path, problem: lost) }
    }

    /// Checks that the database at ``path``, and its WAL, are still the files the store has open; throws
    /// ``SQLiteIngestStoreError/fileReplaced(path:problem:)`` when either was removed or another file is in its place,
    /// and logs that once, at error. Blocking (`stat`): on the store's threads only.
    func checkFiles() throws(SQLiteIngestStoreError) {
        let path = self.path
        let (problem, isNew) = files.withLock { files -> (String?, Bool) in
            if let lost = files.lost { return (lost, false) }
            guard let database = files.database else { return (nil, false) }
            var problem: String?
            switch Self.lookup(path) {
            case .missing: problem = "\(path) no longer exists"
            case .found(let now) where now != database: problem = "\(path) is now another file than the one the ingest opened"
            default: break
            }
            if problem == nil, let walPath = files.walPath {
                switch Self.lookup(walPath) {
                case .missing where files.wal != nil:
                    problem = "\(walPath) no longer exists"
                case .found(let now):
                    // Made by SQLite after the open (its first write): the one found first is the one it has open.
                    if files.wal == nil { files.wal = now } else if now != files.wal { problem = "\(walPath) is now another file than the one the ingest opened" }
                default: break
                }
            }
            files.lost = problem
            return (problem, problem != nil)
        }
        guard let problem else { return }
        if isNew {
            logger.error(
                "the SQLite store file was removed or replaced under the running ingest; restart farmgate-ingest serve",
                metadata: [
                    "store.path": "\(path)", "store.problem": "\(problem)",
                    "store.lost": "what was committed since it was removed went into the removed file and is lost when serve stops",
                    "hint": "every upload is answered 503 (nothing acknowledged, the agents keep their readings) until serve is restarted; put the right file back at the path first if it was not meant to go",
                ])
        }
        throw .fileReplaced(path: path, problem: problem)
    }

    /// Whether the last commit of an upload failed for a full disk (`SQLITE_FULL`), within ``diskFullHold``.
    var diskFull: Bool { diskFullSince.withLock { $0 }.map { $0.duration(to: .now) < Self.diskFullHold } ?? false }

    /// Notes how a commit of an upload ended: `error` nil when it committed.
    func committed(failure error: (any Error)?) {
        // Another failure (a lock, the file gone) says nothing of the disk: the flag stays as it was.
        if let error {
            if let error = error as? SQLiteError, error.isDiskFull { diskFullSince.withLock { $0 = .now } }
        } else {
            diskFullSince.withLock { $0 = nil }
        }
    }

    static func lookup(_ path: String) -> Lookup { FileSystem.identity(path) }
}

/// Why a store cannot take an upload, when it is neither down nor slow: answered in words of its own (``APIError/unavailable(_:retryAfterSeconds:)``).
enum StoreWriteProblem {
    /// `SQLITE_FULL`: the store answers, but its disk takes nothing more.
    case diskFull
    /// ``SQLiteIngestStoreError/fileReplaced(path:problem:)``.
    case fileReplaced

    init?(_ error: any Error) {
        switch error {
        case let error as SQLiteError where error.isDiskFull: self = .diskFull
        case SQLiteIngestStoreError.diskFull: self = .diskFull
        case SQLiteIngestStoreError.fileReplaced: self = .fileReplaced
        default: return nil
        }
    }
}
