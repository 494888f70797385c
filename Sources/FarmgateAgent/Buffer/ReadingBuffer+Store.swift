import FarmgateSupport
import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging

/// A buffer file that SQLite can open but that `PRAGMA quick_check` finds damaged.
struct BufferCorruption: Error, CustomStringConvertible {
    let problems: [String]
    var description: String { "quick_check found \(problems.count) problem(s): \(problems.prefix(3).joined(separator: "; "))" }
}

/// What one group commit did.
struct CommitOutcome {
    var stored = 0
    var duplicates = 0
    var dropped = 0
    var rejected = 0
    /// Readings with a boot stamp moved to the next free millisecond of their sensor instead of being dropped as duplicates.
    var clockShifted = 0
    /// Quarantined readings the quota policy deleted (only once no pending reading was left).
    var trimmedFromQuarantine = 0
    var lastSequence: Int64 = 0
}

/// The buffer's SQLite file and everything cached about it. Lives on the buffer's ``DedicatedThread`` and is only ever touched
/// there (through ``ThreadOwned``), so it needs no locking; every method blocks on disk.
final class BufferStore {
    struct SensorEntry {
        let key: Int64
        let descriptor: SensorDescriptor
        let configured: Bool
    }

    let path: String
    let connection: SQLiteConnection
    private let sidecar: SequenceSidecar
    private let synchronousFull: Bool
    let logger: Logger

    private(set) var sensorsByID: [SensorID: SensorEntry] = [:]
    private(set) var sensorsByKey: [Int64: SensorEntry] = [:]
    /// The last sequence number assigned (committed).
    private(set) var lastSequence: Int64
    var pendingCount: Int
    /// An acknowledgement was written without its own fsync since the last synced commit (see ``acknowledge(_:)``).
    private(set) var acknowledgementsUnsynced = false
    var quarantinedCount: Int
    /// Quarantined readings by reason code, recounted after every change to the quarantine (rare) so that statistics,
    /// which the uploader polls, cost no query.
    var quarantineCodeCounts: [String: Int] = [:]
    /// Persisted counters, as committed.
    private(set) var dropped: Int64
    private(set) var duplicatesIgnored: Int64
    var quarantineTrimmed: Int64
    var quarantineDropped: Int64
    /// The `last_sequence` counter as stored in the file. A commit does not write it (its readings carry their numbers);
    /// a transaction that deletes readings does, when the rows left would no longer cover ``lastSequence``.
    private(set) var storedLastSequence: Int64
    private var sidecarSequence: Int64
    private var sidecarFailureLogged = false
    /// The current boot and what the clock said last (ReadingBuffer+Clock.swift).
    var clock = BufferClockState()
    /// Space kept for the deletes that free space on a full disk.
    private(set) var reserve: BufferReserve

    private let insertReading: SQLiteStatement
    private let updateCounter: SQLiteStatement
    private let deleteReading: SQLiteStatement
    private let deleteRange: SQLiteStatement
    private let deleteAll: SQLiteStatement
    private let selectBounds: SQLiteStatement
    private let deleteOldest: SQLiteStatement
    private let selectOldest: SQLiteStatement
    private let selectNewest: SQLiteStatement
    private let selectOldestTimestamp: SQLiteStatement
    private let copyToQuarantine: SQLiteStatement
    private let pageCount: SQLiteStatement
    private let freelistCount: SQLiteStatement
    private let pageSize: Int64

    // MARK: Opening

    /// Opens the buffer at `path`, creating it (and its directory) if needed. A damaged file is moved aside to
    /// `<path>.corrupt-<UTC timestamp>` (with its `-wal` and `-shm`) and a fresh file takes its place.
    ///
    /// Sequence numbers never go backwards: a fresh file whose history was lost (a corrupt file moved aside, or a database deleted
    /// while its `<path>.seq` sidecar remained) starts after the sidecar's high-water mark plus ``ReadingBuffer/recoverySequenceGap``,
    /// because the sidecar may lag the lost file by the commits made after its last write.
    static func open(
        path: String, synchronousFull: Bool = true, pageConversionLimit: Int64 = BufferStore.pageConversionLimit, logger: Logger
    ) throws -> BufferStore {
        try createParentDirectory(of: path)
        let sidecar = SequenceSidecar(bufferPath: path)
        let sidecarContent = sidecar.read()
        // Another program's file is neither opened (WAL mode, page conversion, migrations change it) nor moved aside.
        if let problem = foreignFileProblem(path: path, sidecar: sidecarContent) {
            throw BufferPathError(path: path, problem: problem)
        }
        var sidecarValue: Int64?
        switch sidecarContent {
        case .absent: sidecarValue = nil
        case .value(let value): sidecarValue = value
        case .unreadable(let problem):
            logger.warning(
                "Buffer sequence sidecar is unreadable; ignoring it",
                metadata: ["buffer.sidecar": "\(sidecar.path)", "error": "\(problem)"])
        }
        do {
            return try BufferStore(
                path: path, sidecar: sidecar, sidecarValue: sidecarValue, recoveredFromCorruption: false, synchronousFull: synchronousFull,
                pageConversionLimit: pageConversionLimit, logger: logger)
        } catch let error where BufferStore.isCorruption(error) {
            let movedTo = try moveAside(path: path)
            logger.error(
                "Buffer file is corrupt: moved it aside and started a fresh buffer; readings not yet uploaded are in the moved file",
                metadata: ["buffer.path": "\(path)", "buffer.moved_to": "\(movedTo)", "error": "\(error)"])
            return try BufferStore(
                path: path, sidecar: sidecar, sidecarValue: sidecarValue, recoveredFromCorruption: true, synchronousFull: synchronousFull,
                pageConversionLimit: pageConversionLimit, logger: logger)
        }
    }

    /// Why the file at `path` is not a buffer the agent may open, or nil (see ``SQLiteFileCheck``). A file that does not
    /// start as a SQLite database is the agent's own, damaged, only when its sequence sidecar lies beside it.
    static func foreignFileProblem(path: String, sidecar: SequenceSidecar.Content? = nil) -> String? {
        let content = sidecar ?? SequenceSidecar(bufferPath: path).read()
        return SQLiteFileCheck.foreignFileProblem(path: path, ownTable: "schema_version", requireHeader: content == .absent)
    }

    /// The page size of a new buffer file (see `init`).
    static let newFilePageSize = 1024

    /// The largest buffer file whose pages are converted to ``newFilePageSize`` when it is opened (see
    /// ``convertPageSize(_:path:limit:logger:)``): 64 MiB, a few seconds of copying on an SD card.
    static let pageConversionLimit: Int64 = 64 << 20

    /// Converts a buffer written with another page size (4 KiB, by farmgate before 2026-12) to ``newFilePageSize``, which
    /// halves what each group commit writes to the SD card. SQLite changes the page size only by rebuilding the file
    /// (`VACUUM`) outside WAL mode, so the file leaves WAL mode for the rebuild; `VACUUM` is one transaction under a
    /// rollback journal, so a power cut during it leaves the old file intact, converted at the next start. A file larger
    /// than `limit` (a long backlog) keeps its pages until a start finds it smaller; a failure (another process holds the
    /// file, no room for the copy) is logged and changes nothing. Either way the buffer works as before.
    static func convertPageSize(_ connection: SQLiteConnection, path: String, limit: Int64, logger: Logger) {
        guard let current = try? connection.queryInt("PRAGMA page_size"), current != Int64(newFilePageSize) else { return }
        let bytes = ((try? connection.queryInt("PRAGMA page_count")) ?? Int64.max / current) * current
        let metadata: Logger.Metadata = ["buffer.path": "\(path)", "buffer.page_size": "\(current)", "buffer.bytes": "\(bytes)"]
        guard bytes <= limit else {
            logger.notice(
                "Buffer keeps its \(current)-byte pages for now: converting a file this large at start would take too long; it is converted at a start after the backlog has drained",
                metadata: metadata.merging(["buffer.conversion_limit": "\(limit)"]) { $1 })
            return
        }
        let started = ContinuousClock.now
        do {
            // Leaving WAL mode checkpoints the WAL into the file; SQLite answers with the mode it is in.
            let mode = try connection.query("PRAGMA journal_mode = DELETE").first?.first?.string?.lowercased()
            guard mode == "delete" else {
                logger.warning(
                    "Buffer keeps its \(current)-byte pages: it cannot leave WAL mode for the conversion (another process has it open?); tried again at the next start",
                    metadata: metadata.merging(["buffer.journal_mode": "\(mode ?? "none")"]) { $1 })
                return
            }
            try connection.execute("PRAGMA page_size = \(newFilePageSize)")
            try connection.execute("VACUUM")
            logger.info(
                "Buffer converted to \(newFilePageSize)-byte pages (each commit writes less to the SD card)",
                metadata: metadata.merging(["duration": "\(ContinuousClock.now - started)"]) { $1 })
        } catch {
            logger.warning(
                "Buffer keeps its \(current)-byte pages: the conversion failed and changed nothing; tried again at the next start",
                metadata: metadata.merging(["error": "\(error)"]) { $1 })
        }
    }

    static func isCorruption(_ error: any Error) -> Bool {
        if error is BufferCorruption { return true }
        if let error = error as? SQLiteError { return error.isCorruption }
        return false
    }

    private init(
        path: String, sidecar: SequenceSidecar, sidecarValue: Int64?, recoveredFromCorruption: Bool, synchronousFull: Bool,
        pageConversionLimit: Int64, logger: Logger
    ) throws {
        let fileExisted = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int).map { $0 > 0 } ?? false
        let connection = try SQLiteConnection(path: path, mode: .readWriteCreate, busyTimeoutMilliseconds: 5_000)
        // A new file gets 1 KiB pages. A group commit rewrites the last page of the table and of its index whole, so the
        // page size is what a commit costs the SD card: 50 readings are about 2.3 KB of rows and index entries, and with
        // 4 KiB pages each commit wrote about 16 KiB. Only possible before the first table exists; an existing file keeps
        // its page size, until it is converted.
        if !fileExisted {
            try connection.execute("PRAGMA page_size = \(Self.newFilePageSize)")
        } else {
            Self.convertPageSize(connection, path: path, limit: pageConversionLimit, logger: logger)
        }
        let journalMode = try connection.query("PRAGMA journal_mode = WAL").first?.first?.string
        guard journalMode?.lowercased() == "wal" else {
            throw BufferError("cannot put the buffer \(path) in WAL mode (SQLite answered \(journalMode ?? "nothing")); is it on a network file system?")
        }
        // FULL: every group commit is fsynced, so a committed reading survives power loss (the delivery contract).
        try connection.execute(synchronousFull ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL")
        // What the SD card sees (see README "SD-card wear"):
        // - secure_delete: Debian builds SQLite with it on, which overwrites every deleted reading with zeros, so that each
        //   acknowledgement rewrote the pages it emptied. The buffer holds no secrets: off.
        // - wal_autocheckpoint: a checkpoint copies the pages changed since the last one into the database file; the
        //   buffer's live pages are few and reused, so fewer checkpoints write fewer pages. 1000 pages (1 MiB of WAL with
        //   1 KiB pages) is SQLite's default, set here so that it stays a decision.
        // - journal_size_limit: the WAL is reused from its start after each checkpoint rather than truncated and grown
        //   again (each regrowth is a file-system metadata write); only a WAL left larger than 16 MiB by a big backlog
        //   is cut back.
        try connection.execute("PRAGMA secure_delete = OFF")
        try connection.execute("PRAGMA wal_autocheckpoint = 1000")
        try connection.execute("PRAGMA journal_size_limit = 16777216")
        let problems = try connection.integrityProblems(quick: true)
        guard problems.isEmpty else { throw BufferCorruption(problems: problems) }

        let version = try BufferSchema.version(of: connection)
        if version > BufferSchema.currentVersion {
            throw BufferError(
                "the buffer \(path) has schema version \(version), newer than this farmgate understands (\(BufferSchema.currentVersion)); "
                    + "upgrade farmgate, or move the file away to start an empty buffer")
        }
        if version == 0 {
            // A fresh file. Where did the history go?
            var start: Int64 = 0
            if recoveredFromCorruption || (sidecarValue != nil && !fileExisted) {
                // The sidecar was read as at most maximumPlausibleSequence: no overflow.
                start = (sidecarValue ?? 0) + ReadingBuffer.recoverySequenceGap
                logger.warning(
                    "Buffer history was lost; new sequence numbers start above the old high-water mark",
                    metadata: [
                        "buffer.path": "\(path)", "buffer.sidecar_sequence": "\(sidecarValue.map(String.init) ?? "none")",
                        "buffer.first_sequence": "\(start + 1)",
                    ])
            }
            try connection.transaction {
                try connection.execute(BufferSchema.version1)
                try connection.query(
                    "INSERT INTO schema_version(version, applied_at) VALUES (?, ?)", [.integer(1), .integer(Timestamp.now().microseconds)])
                for (name, value) in [
                    (BufferSchema.counterLastSequence, start), (BufferSchema.counterDropped, 0), (BufferSchema.counterDuplicatesIgnored, 0),
                ] {
                    try connection.query("INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)", [.text(name), .integer(value)])
                }
            }
        }

        // Later migrations, for a new file and for one written by an older farmgate alike.
        let applied = try BufferSchema.version(of: connection)
        for migration in BufferSchema.migrations where migration.version > applied {
            try connection.transaction {
                try connection.execute(migration.sql)
                try connection.query(
                    "INSERT INTO schema_version(version, applied_at) VALUES (?, ?)",
                    [.integer(migration.version), .integer(Timestamp.now().microseconds)])
            }
            logger.info("Buffer schema migrated", metadata: ["buffer.path": "\(path)", "buffer.schema_version": "\(migration.version)"])
        }

        func counter(_ name: String) throws -> Int64 {
            try connection.queryInt("SELECT value FROM counters WHERE name = ?", [.text(name)]) ?? 0
        }
        // Numbers past any this buffer can have given (a hand edit, a bad block) are not trusted: numbering above them
        // would overflow at the next commit, at every start. Rows carrying one stay and are sent as they are.
        let plausible = SQLiteValue.integer(Self.maximumPlausibleSequence)
        var counted = try counter(BufferSchema.counterLastSequence)
        let maxPending = try connection.queryInt("SELECT max(sequence) FROM readings WHERE sequence <= ?1", [plausible]) ?? 0
        let maxQuarantined = try connection.queryInt("SELECT max(sequence) FROM quarantine WHERE sequence <= ?1", [plausible]) ?? 0
        let implausibleRows =
            (try connection.queryInt("SELECT count(*) FROM readings WHERE sequence > ?1", [plausible]) ?? 0)
            + (try connection.queryInt("SELECT count(*) FROM quarantine WHERE sequence > ?1", [plausible]) ?? 0)
        if counted > Self.maximumPlausibleSequence || implausibleRows > 0 {
            let trusted = counted <= Self.maximumPlausibleSequence ? counted : 0
            let repaired = max(trusted, maxPending, maxQuarantined, sidecarValue ?? 0)
            logger.error(
                "Buffer holds sequence numbers past any it can have given (the file was edited or damaged); they are ignored and numbering goes on from the highest plausible one. If the ingest holds higher numbers, the agent's start-up question to it (GET /v1/device) moves the counter above them",
                metadata: [
                    "buffer.path": "\(path)", "buffer.counter": "\(counted)", "buffer.implausible_rows": "\(implausibleRows)",
                    "buffer.maximum_plausible": "\(Self.maximumPlausibleSequence)", "buffer.last_sequence": "\(repaired)",
                ])
            if counted > Self.maximumPlausibleSequence {
                try connection.query(
                    "INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)", [.text(BufferSchema.counterLastSequence), .integer(repaired)])
                counted = repaired
            }
        }

        self.path = path
        self.connection = connection
        self.sidecar = sidecar
        self.synchronousFull = synchronousFull
        self.logger = logger
        self.lastSequence = max(counted, maxPending, maxQuarantined, sidecarValue ?? 0)
        self.storedLastSequence = counted
        self.sidecarSequence = sidecarValue ?? -1
        self.dropped = try counter(BufferSchema.counterDropped)
        self.duplicatesIgnored = try counter(BufferSchema.counterDuplicatesIgnored)
        self.quarantineTrimmed = try counter(BufferSchema.counterQuarantineTrimmed)
        self.quarantineDropped = try counter(BufferSchema.counterQuarantineDropped)
        self.pendingCount = Int(try connection.queryInt("SELECT count(*) FROM readings") ?? 0)
        self.quarantinedCount = Int(try connection.queryInt("SELECT count(*) FROM quarantine") ?? 0)
        self.pageSize = try connection.queryInt("PRAGMA page_size") ?? 4096
        self.reserve = BufferReserve(bufferPath: path)

        insertReading = try connection.prepare(
            "INSERT OR IGNORE INTO readings(sequence, sensor, timestamp, steps, quality) VALUES (?, ?, ?, ?, ?)")
        updateCounter = try connection.prepare("INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)")
        deleteReading = try connection.prepare("DELETE FROM readings WHERE sequence = ?")
        deleteRange = try connection.prepare("DELETE FROM readings WHERE sequence BETWEEN ?1 AND ?2")
        deleteAll = try connection.prepare("DELETE FROM readings")
        // Two subqueries: SQLite answers a lone min() or max() from the ends of the primary key, but `min(x), max(x)` in
        // one query scans the whole table (a quarter of the CPU of a backlog drain, once per acknowledged batch).
        selectBounds = try connection.prepare("SELECT (SELECT min(sequence) FROM readings), (SELECT max(sequence) FROM readings)")
        deleteOldest = try connection.prepare(
            "DELETE FROM readings WHERE sequence IN (SELECT sequence FROM readings ORDER BY sequence LIMIT ?)")
        // ?2...?3: sequences left out (acknowledged, their deletion not yet run; 1...0 leaves out none). They lie at the
        // other end of the backlog from the batch read, so the scan from this end rarely steps over them.
        selectOldest = try connection.prepare(
            "SELECT sequence, sensor, timestamp, steps, quality FROM readings WHERE sequence NOT BETWEEN ?2 AND ?3 ORDER BY sequence LIMIT ?1")
        selectNewest = try connection.prepare(
            "SELECT sequence, sensor, timestamp, steps, quality FROM readings WHERE sequence NOT BETWEEN ?2 AND ?3 ORDER BY sequence DESC LIMIT ?1")
        selectOldestTimestamp = try connection.prepare("SELECT timestamp FROM readings ORDER BY sequence LIMIT 1")
        copyToQuarantine = try connection.prepare(
            """
            INSERT OR REPLACE INTO quarantine(sequence, sensor, timestamp, steps, quality, reason, quarantined_at, code, message)
            SELECT sequence, sensor, timestamp, steps, quality, ?2, ?3, ?4, ?5 FROM readings WHERE sequence = ?1
            """)
        pageCount = try connection.prepare("PRAGMA page_count")
        freelistCount = try connection.prepare("PRAGMA freelist_count")

        try loadSensors()
        try recountQuarantineCodes()
        reserve.ensure(force: true)
    }

    private static func createParentDirectory(of path: String) throws {
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? ""
        guard !directory.isEmpty else { return }
        do {
            try FileSystem.createDirectories(directory)
        } catch {
            throw BufferError("cannot create the buffer directory \(directory): \(error.reason)")
        }
    }

    /// Renames `path` and its `-wal` and `-shm` files to `<path>.corrupt-<UTC timestamp>[-n]`; returns the new name.
    static func moveAside(path: String) throws -> String {
        let stamp = RFC3339.format(Timestamp(microseconds: Timestamp.now().microseconds / 1_000_000 * 1_000_000))
            .filter { $0 != "-" && $0 != ":" }
        var target = "\(path).corrupt-\(stamp)"
        var attempt = 1
        while FileManager.default.fileExists(atPath: target) {
            attempt += 1
            target = "\(path).corrupt-\(stamp)-\(attempt)"
        }
        for suffix in ["", "-wal", "-shm"] where FileManager.default.fileExists(atPath: path + suffix) {
            guard rename(path + suffix, target + suffix) == 0 else {
                let reason = String(cString: strerror(errno))
                throw BufferError("the buffer \(path) is corrupt and cannot be moved aside to \(target + suffix): \(reason)")
            }
        }
        return target
    }

    private func loadSensors() throws {
        var byID: [SensorID: SensorEntry] = [:]
        var byKey: [Int64: SensorEntry] = [:]
        let rows = try connection.query(
            "SELECT key, id, quantity, resolution_numerator, resolution_denominator, configured FROM sensors")
        for row in rows where row.count == 6 {
            guard let key = row[0].int64, let idText = row[1].string, let id = try? SensorID(idText),
                let quantity = row[2].string.flatMap(Quantity.init(rawValue:)),
                let numerator = row[3].int64.flatMap(UInt32.init(exactly:)),
                let denominator = row[4].int64.flatMap(UInt32.init(exactly:)),
                let resolution = try? Resolution(numerator: numerator, denominator: denominator)
            else {
                logger.warning("Buffer has an unusable sensor row; its readings will be quarantined", metadata: ["buffer.row": "\(row)"])
                continue
            }
            let entry = SensorEntry(
                key: key, descriptor: SensorDescriptor(id: id, quantity: quantity, resolution: resolution),
                configured: row[5].int64 != 0)
            byID[id] = entry
            byKey[key] = entry
        }
        sensorsByID = byID
        sensorsByKey = byKey
    }

    // MARK: Transactions

    /// Runs `body` in `BEGIN IMMEDIATE ... COMMIT`; on failure rolls back and restores the cached counts.
    func write<T>(_ body: () throws -> T) throws -> T {
        let saved = (lastSequence, pendingCount, quarantinedCount, dropped, duplicatesIgnored)
        let savedStoredLastSequence = storedLastSequence
        let savedQuarantine = (quarantineTrimmed, quarantineDropped, quarantineCodeCounts)
        do {
            return try connection.transaction(body)
        } catch {
            (lastSequence, pendingCount, quarantinedCount, dropped, duplicatesIgnored) = saved
            (quarantineTrimmed, quarantineDropped, quarantineCodeCounts) = savedQuarantine
            storedLastSequence = savedStoredLastSequence
            throw error
        }
    }

    func setCounter(_ name: String, _ value: Int64) throws {
        try updateCounter.run([.text(name), .integer(value)])
        if name == BufferSchema.counterLastSequence { storedLastSequence = value }
    }

    /// Writes `last_sequence` when the rows left no longer carry the last number assigned. Call it inside the write
    /// transaction of anything that deletes readings or quarantined readings, after the delete: the counter then never
    /// goes backwards across a restart, and a commit, whose new readings carry their own numbers, need not write it.
    func persistLastSequenceIfUncovered() throws {
        guard storedLastSequence < lastSequence else { return }
        let highest = max(
            try connection.queryInt("SELECT max(sequence) FROM readings") ?? 0,
            try connection.queryInt("SELECT max(sequence) FROM quarantine") ?? 0)
        if highest < lastSequence { try setCounter(BufferSchema.counterLastSequence, lastSequence) }
    }

    /// Bytes in use: pages that are not on the free list.
    func usedBytes() throws -> Int64 {
        (try scalar(pageCount) - scalar(freelistCount)) * pageSize
    }

    private func scalar(_ statement: SQLiteStatement) throws -> Int64 {
        try statement.bind([])
        defer { statement.reset() }
        return try statement.step() ? statement.int64(0) : 0
    }

    /// A generous estimate of the bytes one reading takes in the file, its row and index entry (about 40).
    static let estimatedBytesPerReading: Int64 = 64

    /// Refuses, as a full disk, a commit of `count` readings that would leave the file system less than the reserve's
    /// room while the reserve is not in place (``BufferReserve/leavesRoom(growth:transient:)``); ``Committer`` then waits
    /// or drops by the policy, as on any full disk. Pages on the free list (freed by acknowledgements) take readings
    /// without growing the file. A tester filled the disk of a site whose clock was not set: the commits took every page
    /// the reserve gave back for the uploader, no request could leave for 16 minutes while the ingest was reachable,
    /// and `drop_oldest` then deleted committed readings that ingest would have taken.
    private func requireHeadroom(forReadings count: Int) throws {
        guard !reserve.held, count > 0 else { return }
        let pages = Int64(count) * Self.estimatedBytesPerReading / pageSize + 4
        let growth = max(0, pages - (try scalar(freelistCount))) * pageSize
        guard reserve.leavesRoom(growth: growth, transient: pages * (pageSize + 24)) else {
            throw SQLiteError.diskFull(
                "the buffer's file system is nearly full: commits leave the room of the buffer's reserve (\(reserve.path), given back) to the deletes of acknowledged readings; free space on it")
        }
    }

    // MARK: Sensors

    /// The sensors of `descriptors` whose quantity differs from the one their readings still in the buffer (pending or
    /// quarantined) were taken as: registering them would send those readings as the new quantity.
    func quantityChanges(_ descriptors: [SensorDescriptor]) throws -> [SensorQuantityChange] {
        var changes: [SensorQuantityChange] = []
        for descriptor in descriptors {
            guard let existing = sensorsByID[descriptor.id], existing.descriptor.quantity != descriptor.quantity else { continue }
            let key: [SQLiteValue] = [.integer(existing.key)]
            let held = (try connection.queryInt("SELECT count(*) FROM readings WHERE sensor = ?", key) ?? 0)
                + (try connection.queryInt("SELECT count(*) FROM quarantine WHERE sensor = ?", key) ?? 0)
            if held > 0 {
                changes.append(SensorQuantityChange(sensor: descriptor.id, buffered: existing.descriptor.quantity, configured: descriptor.quantity, readings: held))
            }
        }
        return changes
    }

    /// Makes `descriptors` the configured sensors. A sensor whose resolution changed has its buffered and quarantined
    /// readings converted to the new resolution; a sensor no longer listed keeps its row while readings refer to it.
    ///
    /// A sensor whose quantity changed while readings taken as the old one are still in the buffer is not changed: those
    /// readings would go up as the new quantity (pH 6.1 stored as 6.1 °C). It is kept as it was, unconfigured (its new
    /// samples are refused), until they are sent and a later registration (a reload, a restart) takes the new quantity.
    /// Reloads refuse such a change before it gets here; this is for a file edited while the agent was stopped, and
    /// for readings taken between a reload's check and the services' stop. Never refusing keeps the agent running to
    /// send them.
    /// - Returns: the sensors kept back so.
    @discardableResult
    func register(_ descriptors: [SensorDescriptor]) throws -> [SensorQuantityChange] {
        let changes = try quantityChanges(descriptors).sorted { $0.sensor < $1.sensor }
        let keptBack = Set(changes.map(\.sensor))
        var wanted: [SensorID: SensorDescriptor] = [:]
        for descriptor in descriptors where !keptBack.contains(descriptor.id) { wanted[descriptor.id] = descriptor }
        try write {
            for descriptor in wanted.values.sorted(by: { $0.id < $1.id }) {
                let values: [SQLiteValue] = [
                    .text(descriptor.quantity.rawValue), .integer(Int64(descriptor.resolution.numerator)),
                    .integer(Int64(descriptor.resolution.denominator)),
                ]
                if let existing = sensorsByID[descriptor.id] {
                    let old = existing.descriptor.resolution
                    if old != descriptor.resolution {
                        try requantize(key: existing.key, from: old, to: descriptor.resolution)
                        logger.info(
                            "Sensor resolution changed; converted its buffered readings",
                            metadata: ["sensor": "\(descriptor.id)", "resolution.old": "\(old)", "resolution.new": "\(descriptor.resolution)"])
                    }
                    try connection.query(
                        "UPDATE sensors SET quantity = ?, resolution_numerator = ?, resolution_denominator = ?, configured = 1 WHERE key = ?",
                        values + [.integer(existing.key)])
                } else {
                    try connection.query(
                        "INSERT INTO sensors(id, quantity, resolution_numerator, resolution_denominator, configured) VALUES (?, ?, ?, ?, 1)",
                        [.text(descriptor.id.rawValue)] + values)
                }
            }
            for entry in sensorsByID.values where wanted[entry.descriptor.id] == nil {
                try connection.query(
                    """
                    DELETE FROM sensors WHERE key = ?1
                    AND NOT EXISTS (SELECT 1 FROM readings WHERE sensor = ?1) AND NOT EXISTS (SELECT 1 FROM quarantine WHERE sensor = ?1)
                    """, [.integer(entry.key)])
                if connection.changes == 0 {
                    try connection.query("UPDATE sensors SET configured = 0 WHERE key = ?", [.integer(entry.key)])
                }
            }
        }
        try loadSensors()
        for change in changes {
            logger.error(
                "Sensor not sampled: its quantity changed while the buffer holds readings taken as the old one; they are sent as that, and the sensor is taken with its new quantity at the first reload or restart after they are gone",
                metadata: ["sensor": "\(change.sensor)", "error": "\(change)"])
        }
        return changes
    }

    private func requantize(key: Int64, from old: Resolution, to new: Resolution) throws {
        // steps_new = round(steps_old * old.step / new.step), as Resolution.quantize(old.value(ofSteps:)) would compute it.
        let numerator = SQLiteValue.real(Double(old.numerator) * Double(new.denominator))
        let denominator = SQLiteValue.real(Double(old.denominator) * Double(new.numerator))
        for table in ["readings", "quarantine"] {
            try connection.query(
                "UPDATE \(table) SET steps = CAST(round(steps * ?2 / ?3) AS INTEGER) WHERE sensor = ?1",
                [.integer(key), numerator, denominator])
        }
    }

    // MARK: Group commit

    /// Stores `samples` in one transaction, assigning sequence numbers in order, and applies the quota policy.
    ///
    /// Samples for a sensor that is not configured, or whose value cannot be quantized, are counted in `rejected` and
    /// skipped. `carriedDrops` (samples dropped in memory since the last commit) is added to the persisted `dropped` counter.
    ///
    /// `makeRoom`: how many of the oldest pending readings to delete first, in the same transaction (``Committer``'s
    /// `drop_oldest` on a full disk): the deleted pages take the new readings, and a commit that still fails deletes
    /// nothing.
    func commit(
        _ samples: [Sample], carriedDrops: Int64, quotaBytes: Int64, policy: BufferFullPolicy, makeRoom: Int = 0
    ) throws -> CommitOutcome {
        struct Row {
            let key: Int64
            let timestamp: Int64
            let steps: Int64
            let quality: QualityFlags
            let boot: BootStamp?
        }
        var outcome = CommitOutcome()
        var rows: [Row] = []
        rows.reserveCapacity(samples.count)
        var unknownSensors = 0
        var badValues = 0
        var example: Sample?
        // Numbered by (timestamp, natural sensor-id order), the order in which a frame predicts sequence numbers: sensors
        // of one sampling phase are stamped in the same millisecond and appended in whatever order their reads ended,
        // and numbering them in that order cost every live frame two streams of sequence corrections (about 100 bytes
        // a request at 60 sensors). One sensor's samples keep their order.
        let ordered = samples.indices.sorted { a, b in
            let x = samples[a], y = samples[b]
            if x.timestamp != y.timestamp { return x.timestamp < y.timestamp }
            if x.sensor != y.sensor { return naturalOrder(x.sensor.rawValue, y.sensor.rawValue) }
            return a < b
        }
        for sample in ordered.lazy.map({ samples[$0] }) {
            guard let entry = sensorsByID[sample.sensor], entry.configured else {
                unknownSensors += 1
                example = example ?? sample
                continue
            }
            guard let steps = entry.descriptor.resolution.quantize(sample.value) else {
                badValues += 1
                example = example ?? sample
                continue
            }
            rows.append(Row(key: entry.key, timestamp: sample.timestamp.microseconds, steps: steps, quality: sample.quality, boot: sample.boot))
        }
        outcome.rejected = unknownSensors + badValues
        if let example {
            logger.warning(
                "Buffer dropped samples it cannot store",
                metadata: [
                    "buffer.unregistered_sensor": "\(unknownSensors)", "buffer.unquantizable_value": "\(badValues)",
                    "sensor": "\(example.sensor)", "value": "\(example.value)",
                ])
        }

        if makeRoom == 0 { try requireHeadroom(forReadings: rows.count) }
        var makeRoomDropped = 0
        let bootKeys = try resolveBoots(Set(rows.compactMap { $0.boot?.bootID }))
        try write {
            var stamps = ClockStampRuns()
            var deleted = 0
            while deleted < makeRoom, pendingCount > 0 {
                try deleteOldest.run([.integer(Int64(min(makeRoom - deleted, 10_000)))])
                let removed = connection.changes
                guard removed > 0 else { break }
                deleted += removed
                pendingCount -= removed
            }
            outcome.dropped = deleted
            makeRoomDropped = deleted
            if policy == .dropNewest, !rows.isEmpty, try usedBytes() >= quotaBytes {
                outcome.dropped = rows.count
            } else {
                for row in rows {
                    let placed = placement(timestamp: row.timestamp, quality: row.quality, boot: row.boot, bootKeys: bootKeys)
                    var timestamp = placed.timestamp
                    var attempts = 0
                    let (next, exhausted) = lastSequence.addingReportingOverflow(1)
                    guard !exhausted else { throw Self.sequencesExhausted(path) }
                    while true {
                        try insertReading.run([
                            .integer(next), .integer(row.key), .integer(timestamp), .integer(row.steps), .integer(placed.quality),
                        ])
                        // A boot-stamped reading is a distinct measurement: on a taken timestamp, the next free millisecond.
                        guard connection.changes == 0, placed.distinct, attempts <= pendingCount + outcome.stored else { break }
                        attempts += 1
                        timestamp &+= 1000
                    }
                    if connection.changes == 1 {
                        lastSequence = next
                        outcome.stored += 1
                        if attempts > 0 { outcome.clockShifted += 1 }
                        if placed.holdable { clock.mayHold = true }
                        stamps.append(sequence: next, placed.stamp)
                    } else {
                        outcome.duplicates += 1
                    }
                }
                try recordClockStamps(stamps)
                pendingCount += outcome.stored
                if policy == .dropOldest, outcome.stored > 0, try usedBytes() > quotaBytes {
                    outcome.dropped += try dropOldest(downTo: quotaBytes / 10 * 9)
                    outcome.trimmedFromQuarantine = try trimQuarantine(downTo: quotaBytes / 10 * 9)
                }
            }
            // The new readings carry lastSequence; only a quota drop can have deleted them again.
            if outcome.dropped > 0 || outcome.trimmedFromQuarantine > 0 { try persistLastSequenceIfUncovered() }
            if outcome.duplicates > 0 {
                duplicatesIgnored += Int64(outcome.duplicates)
                try setCounter(BufferSchema.counterDuplicatesIgnored, duplicatesIgnored)
            }
            if outcome.dropped > 0 || carriedDrops > 0 {
                dropped += Int64(outcome.dropped) + carriedDrops
                try setCounter(BufferSchema.counterDropped, dropped)
            }
        }
        // A commit that wrote readings synced the WAL, and every acknowledgement written before it with it.
        if synchronousFull, outcome.stored > 0 { acknowledgementsUnsynced = false }
        if outcome.trimmedFromQuarantine > 0 {
            logger.warning(
                "Buffer is at its disk quota with no pending reading left; the oldest quarantined readings were deleted",
                metadata: [
                    "buffer.quarantine_trimmed": "\(outcome.trimmedFromQuarantine)", "buffer.policy": "\(policy.rawValue)",
                    "buffer.quota_bytes": "\(quotaBytes)",
                ])
        }
        // Drops to make room on a full disk (`makeRoom`) are the committer's to report; these are the quota's.
        if outcome.dropped > makeRoomDropped {
            logger.warning(
                "Buffer is at its disk quota; readings were dropped",
                metadata: [
                    "buffer.dropped": "\(outcome.dropped - makeRoomDropped)", "buffer.policy": "\(policy.rawValue)", "buffer.quota_bytes": "\(quotaBytes)",
                ])
        }
        if outcome.clockShifted > 0 {
            logger.notice(
                "Readings taken before the clock was set found their time taken by another reading; each moved to the next free millisecond",
                metadata: ["buffer.shifted": "\(outcome.clockShifted)"])
        }
        outcome.lastSequence = lastSequence
        writeSidecar()
        reserve.ensure()
        return outcome
    }

    /// Makes unsynced acknowledgements durable when no commit came to do it: on a site that samples nothing for a while
    /// (long intervals, every sensor failing) they would otherwise wait for the next reading, and a power cut meanwhile
    /// would send the acknowledged readings again. A checkpoint syncs the WAL (then writes its pages into the file, which a
    /// later checkpoint would have written anyway); once per quiet commit window after an upload.
    func syncAcknowledgements() throws {
        guard acknowledgementsUnsynced else { return }
        // (busy, frames in the WAL, frames checkpointed): the WAL was synced only when the checkpoint copied it all.
        let result = try connection.query("PRAGMA wal_checkpoint(PASSIVE)").first ?? []
        if result.count == 3, result[0].int64 == 0, result[1].int64 == result[2].int64 { acknowledgementsUnsynced = false }
    }

    /// On a disk that is really full the WAL cannot grow either: a checkpoint that truncates it gives its space back to
    /// the file system before ``Committer`` retries a commit that makes room (it fails harmlessly while anything holds
    /// the WAL).
    func truncateWAL() {
        _ = try? connection.query("PRAGMA wal_checkpoint(TRUNCATE)")
    }

    /// Deletes the oldest pending readings in chunks until the used bytes are at most `target`. Returns how many it deleted.
    private func dropOldest(downTo target: Int64) throws -> Int {
        var deleted = 0
        while pendingCount > 0, try usedBytes() > target {
            let chunk = max(64, min(pendingCount / 20, 10_000))
            try deleteOldest.run([.integer(Int64(chunk))])
            let removed = connection.changes
            guard removed > 0 else { break }
            deleted += removed
            pendingCount -= removed
        }
        return deleted
    }

    /// How far the sidecar may lag the counter. It is read only when the database was lost, and a recovered buffer starts
    /// ``ReadingBuffer/recoverySequenceGap`` (1,000,000) above it, so a lag of at most this many numbers is safe; writing
    /// it (a new file, an fsync, a rename, an fsync of the directory) after every commit cost the SD card 4 KiB a second.
    static let sidecarStride: Int64 = 10_000

    /// Mirrors the counter into the sidecar when it has moved ``sidecarStride`` or more since the last write (or always,
    /// with `force`: jumps of the counter, and closing).
    func writeSidecar(force: Bool = false) {
        guard lastSequence != sidecarSequence else { return }
        guard force || sidecarSequence < 0 || lastSequence - sidecarSequence >= Self.sidecarStride else { return }
        do {
            try sidecar.store(lastSequence, durably: synchronousFull)
            sidecarSequence = lastSequence
            sidecarFailureLogged = false
        } catch {
            if !sidecarFailureLogged {
                logger.warning(
                    "Cannot write the buffer sequence sidecar; sequence numbers stay safe while the database is healthy",
                    metadata: ["error": "\(error)"])
                sidecarFailureLogged = true
            }
        }
    }

    // MARK: The uploader's view

    func pending(limit: Int, from end: BacklogEnd, excluding excluded: ClosedRange<UInt64>? = nil) throws -> [Reading] {
        guard limit > 0 else { return [] }
        let statement: SQLiteStatement
        let bounds: [SQLiteValue] = excluded.map { [.integer(Int64(clamping: $0.lowerBound)), .integer(Int64(clamping: $0.upperBound))] }
            ?? [.integer(1), .integer(0)]
        if let hold = holdFilter {
            statement = try unheldSelect(end)
            try statement.bind([.integer(Int64(limit))] + hold.bindings + bounds)
        } else {
            statement = end == .oldest ? selectOldest : selectNewest
            try statement.bind([.integer(Int64(limit))] + bounds)
        }
        defer { statement.reset() }
        var readings: [Reading] = []
        readings.reserveCapacity(min(limit, pendingCount))
        var orphans: [Int64] = []
        while try statement.step() {
            let sequence = statement.int64(0)
            guard sequence > 0, let entry = sensorsByKey[statement.int64(1)] else {
                orphans.append(sequence)
                continue
            }
            readings.append(
                Reading(
                    sensor: entry.descriptor.id, sequence: UInt64(sequence), timestamp: Timestamp(microseconds: statement.int64(2)),
                    value: entry.descriptor.resolution.value(ofSteps: statement.int64(3)),
                    quality: QualityFlags(rawValue: UInt16(truncatingIfNeeded: statement.int64(4)))))
        }
        statement.reset()
        if !orphans.isEmpty {
            // Impossible through this API (a sensor row stays while readings refer to it); a hand-edited file could do it.
            // Never let such rows block the queue.
            logger.error("Buffer readings refer to an unknown sensor; quarantining them", metadata: ["buffer.count": "\(orphans.count)"])
            var reasons: [UInt64: String] = [:]
            for sequence in orphans where sequence > 0 {
                reasons[UInt64(sequence)] = "missing_descriptor: the buffer has no descriptor for this reading's sensor"
            }
            try quarantine(reasons)
            if orphans.contains(where: { $0 <= 0 }) {
                try write {
                    try connection.query("DELETE FROM readings WHERE sequence <= 0")
                    pendingCount -= connection.changes
                    try persistLastSequenceIfUncovered()
                }
            }
        }
        return end == .oldest ? readings : readings.reversed()
    }

    func descriptors(for sensors: Set<SensorID>) -> [SensorDescriptor] {
        sensors.sorted().compactMap { sensorsByID[$0]?.descriptor }
    }

    /// The configured sensors (those only kept for their pending readings are left out).
    func allDescriptors() -> [SensorDescriptor] {
        sensorsByID.values.filter(\.configured).map(\.descriptor)
    }

    // MARK: Sequence repair (the ingest holds numbers this buffer has forgotten)

    /// The highest sequence the counter may be raised to from outside: half the range, so that numbering above it can never
    /// overflow. A larger number (from an ingest's answer) is refused rather than trusted.
    static let maximumSequenceFloor = Int64.max / 2

    /// The highest sequence this buffer can have given: ``maximumSequenceFloor`` plus 2^50 numbers (35,000 years at 1,000
    /// readings a second). A larger one in the buffer's own files (its counter, a row, the `.seq` sidecar) was not written by
    /// it and is not trusted; everything added to a trusted number stays far below `Int64.max`.
    static let maximumPlausibleSequence = maximumSequenceFloor + (1 << 50)

    /// Sequence numbers are used up: never on a real site (see ``maximumPlausibleSequence``), checked all the same so that
    /// the buffer refuses to commit rather than trap.
    static func sequencesExhausted(_ path: String) -> BufferError {
        BufferError(
            "the buffer \(path) has used every sequence number; stop the agent, move the file and its .seq sidecar aside, "
                + "and start it again (a new buffer asks the ingest where to continue)")
    }

    private static func checkSequenceFloor(_ floor: Int64) throws(BufferError) {
        guard floor <= maximumSequenceFloor else {
            throw BufferError(
                "cannot number readings above \(floor): sequence numbers past \(maximumSequenceFloor) are not plausible; "
                    + "check what the ingest reports for this device (GET /v1/device)")
        }
    }

    /// Raises the sequence counter to `floor` when it is below, so that the next reading is numbered `floor + 1`; the counter
    /// and the sidecar are written before this returns. Returns the previous last sequence, or nil when the counter was
    /// already at or above `floor` (nothing changed).
    func advanceSequence(past floor: Int64) throws -> Int64? {
        guard floor > lastSequence else { return nil }
        try Self.checkSequenceFloor(floor)
        let previous = lastSequence
        try write {
            lastSequence = floor
            try setCounter(BufferSchema.counterLastSequence, lastSequence)
        }
        writeSidecar(force: true)
        return previous
    }

    /// Gives the pending readings numbered `sequences` new numbers above max(`floor`, the last sequence), in ascending order
    /// of their old numbers, in one transaction with the counter: after a crash either all of them have their new number and
    /// the counter covers it, or none has. Their content (every other column) is kept. Numbers that are not pending are
    /// skipped. Returns the renumbered readings as (old, new) pairs, ascending.
    func renumber(_ sequences: [UInt64], above floor: Int64) throws -> [(old: UInt64, new: UInt64)] {
        let wanted = Set(sequences.compactMap { Int64(exactly: $0) }).filter { $0 > 0 }.sorted()
        guard !wanted.isEmpty else { return [] }
        try Self.checkSequenceFloor(floor)
        let move = try connection.prepare("UPDATE readings SET sequence = ?2 WHERE sequence = ?1")
        let pairs = try write { () throws -> [(old: UInt64, new: UInt64)] in
            // The moved readings go above the last sequence: out of reach of the open run of clock stamps.
            try closeOpenClockRun()
            var next = max(floor, lastSequence)
            var pairs: [(old: UInt64, new: UInt64)] = []
            for old in wanted {
                let (candidate, exhausted) = next.addingReportingOverflow(1)
                guard !exhausted else { throw Self.sequencesExhausted(path) }
                try move.run([.integer(old), .integer(candidate)])
                guard connection.changes == 1 else { continue }
                next = candidate
                pairs.append((UInt64(old), UInt64(next)))
            }
            if next > lastSequence {
                lastSequence = next
                try setCounter(BufferSchema.counterLastSequence, lastSequence)
            }
            return pairs
        }
        writeSidecar(force: true)
        return pairs
    }

    /// Deletes the readings with these sequence numbers; unknown numbers are ignored. Returns how many were deleted.
    ///
    /// On a full disk (`SQLITE_FULL`: the WAL cannot grow) the delete is tried once more after the WAL is truncated
    /// and the ``BufferReserve`` given back: deleting is how the buffer makes room, so it must not wait for room.
    @discardableResult
    func acknowledge(_ sequences: [UInt64]) throws -> Int {
        try makingRoomOnFullDisk("acknowledged readings can be deleted") { try acknowledgeOnce(sequences) }
    }

    /// Runs `operation`, a write that makes room (a delete, or the small write an upload needs before it can leave,
    /// ``freezeForSending(_:)``: the upload is what lets the buffer delete); when it fails for a full disk, releases the
    /// reserve, truncates the WAL and runs it once more, then truncates the WAL again so that the space it used goes
    /// back to the file system.
    func makingRoomOnFullDisk<T>(_ what: String, _ operation: () throws -> T) throws -> T {
        do {
            return try operation()
        } catch let error as SQLiteError where error.isDiskFull {
            // The reserve first: truncating the WAL is a checkpoint, which may need to grow the file by the pages that
            // live only in the WAL (up to `wal_autocheckpoint`, about 1 MiB) before it can give the WAL's space back.
            let freed = reserve.release()
            truncateWAL()
            logger.warning(
                "The disk is full: gave back the buffer's reserve so that \(what) to make room",
                metadata: ["buffer.reserve_bytes": "\(freed ?? 0)", "buffer.reserve": "\(reserve.path)", "error": "\(error)"])
            let result = try operation()
            truncateWAL()
            return result
        }
    }

    private func acknowledgeOnce(_ sequences: [UInt64]) throws -> Int {
        guard !sequences.isEmpty else { return 0 }
        // An acknowledgement need not survive a power cut: lost, it only brings back readings the ingest already holds,
        // which go again and are counted as duplicates. So it is committed without its own fsync (`synchronous=NORMAL`
        // for this transaction); the next group commit's fsync makes it durable together with that commit's readings,
        // and the SD card sees one flush of the WAL's last page per commit window instead of two.
        if synchronousFull {
            try connection.execute("PRAGMA synchronous = NORMAL")
            acknowledgementsUnsynced = true
        }
        defer { if synchronousFull { try? connection.execute("PRAGMA synchronous = FULL") } }
        return try write {
            // An acknowledged batch is nearly always one run of consecutive numbers: one range delete per run.
            // Numbers that are not buffered delete nothing and are not counted.
            var removed = 0
            let sorted = Set(sequences.compactMap { Int64(exactly: $0) }).sorted()
            // The usual case once the ingest keeps up: the batch held every committed reading, one run of numbers from the
            // lowest to the highest. `DELETE` without `WHERE` then frees the pages of the table and its index without
            // rewriting them (SQLite's truncate optimisation), where a range delete rewrote every page it emptied: half of
            // what the buffer wrote to the SD card.
            if let first = sorted.first, let last = sorted.last, last - first == Int64(sorted.count) - 1,
                try coversEveryReading(from: first, through: last)
            {
                try deleteAll.run()
                removed = connection.changes
                pendingCount -= removed
                if removed > 0 { try persistLastSequenceIfUncovered() }
                return removed
            }
            var start = 0
            while start < sorted.count {
                var end = start
                while end + 1 < sorted.count, sorted[end + 1] &- sorted[end] == 1 { end += 1 }
                try deleteRange.run([.integer(sorted[start]), .integer(sorted[end])])
                removed += connection.changes
                start = end + 1
            }
            pendingCount -= removed
            if removed > 0 { try persistLastSequenceIfUncovered() }
            return removed
        }
    }

    /// Whether every buffered reading is numbered within `first...last`.
    private func coversEveryReading(from first: Int64, through last: Int64) throws -> Bool {
        try selectBounds.bind([])
        defer { selectBounds.reset() }
        guard try selectBounds.step() else { return false }
        if selectBounds.isNull(0) { return true }
        return selectBounds.int64(0) >= first && selectBounds.int64(1) <= last
    }

    /// Moves the readings with these sequence numbers to quarantine, in one transaction. Returns how many moved.
    @discardableResult
    func quarantine(_ reasons: [UInt64: String]) throws -> Int {
        guard !reasons.isEmpty else { return 0 }
        let now = Timestamp.now().microseconds
        return try write {
            var moved = 0
            for (sequence, reason) in reasons.sorted(by: { $0.key < $1.key }) {
                guard let value = Int64(exactly: sequence) else { continue }
                let text = String(reason.prefix(1_000))
                let parsed = QuarantineReason(parsing: text)
                try copyToQuarantine.run([
                    .integer(value), .text(text), .integer(now), .text(parsed.code), .text(parsed.message),
                ])
                guard connection.changes == 1 else { continue }
                try deleteReading.run([.integer(value)])
                moved += connection.changes
            }
            pendingCount -= moved
            quarantinedCount += moved
            if moved > 0 { try recountQuarantineCodes() }
            return moved
        }
    }

    func quarantined(limit: Int) throws -> [QuarantinedReading] {
        guard limit > 0 else { return [] }
        let rows = try connection.query(
            """
            SELECT \(Self.quarantineColumns) FROM quarantine
            ORDER BY quarantined_at DESC, sequence DESC LIMIT ?
            """, [.integer(Int64(limit))])
        return rows.compactMap(quarantinedReading(row:))
    }

    func statistics(uncommitted: Int, droppedInMemory: Int64, quotaBytes: Int64) throws -> BufferStatistics {
        var oldest: Timestamp?
        let held = try heldCount()
        if held > 0, let hold = holdFilter {
            oldest = pendingCount > held ? try oldestUnheldTimestamp(hold) : nil
        } else if pendingCount > 0 {  // the uploader polls this while idle: no query when nothing is pending
            try selectOldestTimestamp.bind([])
            defer { selectOldestTimestamp.reset() }
            oldest = try selectOldestTimestamp.step() ? Timestamp(microseconds: selectOldestTimestamp.int64(0)) : nil
        }
        return BufferStatistics(
            pending: max(0, pendingCount - held), oldestPending: oldest, uncommitted: uncommitted, quarantined: quarantinedCount,
            dropped: dropped + droppedInMemory, duplicatesIgnored: duplicatesIgnored, lastSequence: UInt64(max(0, lastSequence)),
            usedBytes: try usedBytes(), quotaBytes: quotaBytes, quarantinedByCode: quarantineCodeCounts,
            quarantineTrimmed: quarantineTrimmed, quarantineDropped: quarantineDropped, held: held,
            pendingCalibrations: Int(try connection.queryInt("SELECT count(*) FROM calibrations WHERE quarantined_at IS NULL") ?? 0),
            quarantinedCalibrations: Int(try connection.queryInt("SELECT count(*) FROM calibrations WHERE quarantined_at IS NOT NULL") ?? 0))
    }

    /// Brings the sequence sidecar up to date (it otherwise lags by up to ``sidecarStride``); when the buffer closes.
    func closing() {
        writeSidecar(force: true)
    }

    func limitPageCount(_ pages: Int64) throws {
        try connection.execute("PRAGMA max_page_count = \(max(1, pages))")
    }

    /// Runs `PRAGMA quick_check`; empty means healthy.
    func integrityProblems() throws -> [String] {
        try connection.integrityProblems(quick: true)
    }
}
