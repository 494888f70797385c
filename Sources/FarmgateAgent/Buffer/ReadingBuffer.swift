import FarmgateSupport
import FarmgateWire
import Logging
import ServiceLifecycle
import Synchronization

/// The site's store-and-forward buffer: an SQLite file (WAL, `synchronous=FULL`) where a reading comes into existence.
///
/// ```swift
/// let buffer = try ReadingBuffer(configuration: .init(path: "/var/lib/farmgate/buffer.sqlite"), logger: logger)
/// try await buffer.register(descriptors)
/// // ServiceGroup(services: [buffer, sampler, uploader], ...) runs the group-commit loop.
/// try await buffer.append([Sample(sensor: id, timestamp: now, value: 6.02)])
/// ```
///
/// - ``append(_:)`` only queues samples in memory. The group-commit loop (``run()``, a `Service`) commits everything queued at
///   most every ``BufferConfiguration/commitInterval``, in one transaction, and assigns device-wide sequence numbers in commit
///   order. ``flush()`` commits now. A commit is fsynced: once it returns, the readings survive `kill -9` and power loss.
/// - Sequence numbers are never reused: the counter is persisted with the readings, survives the deletion of every row, and is
///   mirrored into `<path>.seq` (see below) every ``BufferStore/sidecarStride`` numbers, when it jumps, and at close.
/// - Values are stored as whole steps of the sensor's resolution. A sample for a sensor not in the last ``register(_:)``, or whose
///   value cannot be quantized (NaN, infinite, too large), is dropped with a warning and counted in ``rejectedSamples``.
/// - A sample equal in sensor and timestamp to a pending reading is stored once and counted in
///   ``BufferStatistics/duplicatesIgnored``.
/// - After each commit, if the pages in use exceed ``BufferConfiguration/quotaBytes``: ``BufferFullPolicy/dropOldest`` deletes
///   the oldest pending readings until under 90 % of the quota, and only when no pending reading is left the oldest
///   quarantined ones (counted apart, in ``BufferStatistics/quarantineTrimmed``); ``BufferFullPolicy/dropNewest`` refuses the next commits' samples
///   until space is freed. Both count in ``BufferStatistics/dropped`` and log a warning. The quota can be exceeded by one commit.
/// - When a commit fails (disk full), the samples stay queued and the loop retries every interval. At most
///   ``maximumQueuedSamples`` wait in memory; beyond that the policy decides which are dropped, and they are counted.
/// - Every failed write (a commit, or recording what the ingest answered) is counted with its error in
///   ``BufferStatistics/errors``, which `farmgate status` and the metrics file show.
///
/// ## Corruption and sequence safety
/// A file SQLite cannot open as a database, or that fails `PRAGMA quick_check`, does not stop the agent: it is renamed (with its
/// `-wal` and `-shm`) to `<path>.corrupt-<UTC timestamp>`, an error names both paths, and a fresh file is created. The ingest is
/// idempotent on (device, sequence), so restarting at 1 would make it discard new readings as duplicates. The high-water mark is
/// therefore also kept in the sidecar `<path>.seq`, replaced atomically (temporary file, fsync, rename) at least every 10,000
/// numbers (``BufferStore/sidecarStride``, far below the gap). A fresh
/// file whose history was lost (moved aside as corrupt, or deleted while the sidecar remained) starts at
/// sidecar + ``recoverySequenceGap`` + 1: the gap covers commits the sidecar may not have recorded. A brand-new site (no file, no
/// sidecar) starts at 1. An existing file continues from max(its counter, its highest row, the sidecar). A file that turns
/// out damaged while the buffer runs ends ``run()`` after it is moved aside the same way, so that the agent restarts with a
/// fresh file (see there).
///
/// ## Readings taken before the clock is set
/// A sample stamped while the kernel said the clock was not synchronised carries a ``BootStamp`` (boot id and CLOCK_BOOTTIME),
/// stored in two columns that are NULL for every other reading. ``observeClock(_:)`` holds such readings of the current boot
/// back from ``pending(limit:from:)`` for a while, and repairs their time once the clock is synchronised in the same boot.
///
/// Every SQLite call runs on the buffer's own thread, never on the Swift concurrency pool.
public final class ReadingBuffer: PendingReadings, Service {
    /// The most samples kept in memory while commits fail; past it ``BufferConfiguration/whenFull`` decides what is dropped.
    public static let maximumQueuedSamples = 100_000
    /// How far a buffer whose history was lost jumps past the last known sequence number.
    public static let recoverySequenceGap: Int64 = 1_000_000

    public let configuration: BufferConfiguration
    let logger: Logger
    /// Liveness for the systemd watchdog: beaten by the group-commit loop (see ``Heartbeat``).
    public let heartbeat = Heartbeat(component: "buffer")
    private let store: ThreadOwned<BufferStore>
    private let committer: Committer
    /// Failed writes since the buffer was opened, for ``statistics()`` (the callers log each one).
    let errorLog = Mutex(BufferErrors())
    /// The first error by which SQLite said the open file is damaged (`SQLITE_CORRUPT`, `SQLITE_NOTADB`), whichever
    /// operation met it; the commit loop ends on it (see ``run()``).
    private let corruption = Mutex<String?>(nil)
    /// Set when the commit loop ends (a stop, a reload, a damaged file): a job of many transactions (a requeue) ends at its
    /// next chunk instead of working on for an agent that is going away, or, after a reload, beside the next buffer.
    let ending = Mutex(false)

    /// Opens (or creates) the buffer file, recovering from a corrupt one as described in the type's documentation.
    ///
    /// Blocks the caller while the file is opened and checked (`quick_check` reads the whole file).
    ///
    /// - Parameters:
    ///   - configuration: where the file is, how often to commit, the quota and what to do at it.
    ///   - logger: receives corruption, quota and commit-failure reports.
    ///   - onCommit: called on the buffer's thread after every durable group commit (for metrics and tests). Keep it short.
    /// - Throws: ``BufferError`` or `SQLiteError` when the file cannot be used for a reason other than corruption
    ///   (permissions, a newer schema, a lock held by another process).
    public convenience init(
        configuration: BufferConfiguration, logger: Logger, onCommit: (@Sendable (BufferCommit) -> Void)? = nil
    ) throws {
        try self.init(configuration: configuration, logger: logger, durability: .full, onCommit: onCommit)
    }

    /// How each commit reaches the disk. Only `farmgate-bench` picks anything but ``full``.
    @_spi(Benchmarks)
    public enum Durability: String, Sendable {
        /// `synchronous=FULL`: the WAL is fsynced at every commit; a committed reading survives power loss.
        case full
        /// `synchronous=NORMAL`: fsync only at checkpoints; survives `kill -9` but not power loss. For comparison only.
        case normal
    }

    /// Opens the buffer with a chosen ``Durability``; for measuring what `synchronous=FULL` costs.
    @_spi(Benchmarks)
    public init(
        configuration: BufferConfiguration, logger: Logger, durability: Durability,
        onCommit: (@Sendable (BufferCommit) -> Void)? = nil
    ) throws {
        var logger = logger
        logger[metadataKey: "buffer.path"] = "\(configuration.path)"
        self.configuration = configuration
        self.logger = logger
        self.committer = Committer(configuration: configuration, logger: logger, onCommit: onCommit)
        let path = configuration.path
        let storeLogger = logger
        self.store = try ThreadOwned(name: "farmgate-buffer") {
            try BufferStore.open(path: path, synchronousFull: durability == .full, logger: storeLogger)
        }
    }

    func withStore<T: Sendable>(_ body: @escaping @Sendable (BufferStore) throws -> T) async throws -> T {
        do {
            return try await store.withValue(body)
        } catch is DedicatedThreadError {
            throw BufferError.closed
        } catch where BufferStore.isCorruption(error) {
            let description = "\(error)"
            corruption.withLock { $0 = $0 ?? description }
            throw error
        }
    }

    /// ``withStore(_:)`` for a write whose failure counts in ``BufferStatistics/errors`` (a closed buffer does not: that
    /// is shutdown, not a failing disk).
    func writing<T: Sendable>(_ operation: BufferOperation, _ body: @escaping @Sendable (BufferStore) throws -> T) async throws -> T {
        do {
            return try await withStore(body)
        } catch {
            if (error as? BufferError) != .closed {
                let message = "\(error)"
                errorLog.withLock { $0.record(operation, message: message, at: .now()) }
            }
            throw error
        }
    }

    // MARK: Writing

    /// Makes `sensors` the configured sensors: samples for others are rejected from now on.
    ///
    /// Descriptors are upserted by id. A sensor whose resolution changed has its buffered readings converted to the new
    /// resolution. The descriptor of a sensor no longer listed stays while readings of it are buffered or quarantined.
    /// - Returns: the sensors kept back because their quantity changed under buffered readings (see
    ///   ``SensorQuantityChange``).
    @discardableResult
    public func register(_ sensors: [SensorDescriptor]) async throws -> [SensorQuantityChange] {
        try await withStore { store in try store.register(sensors) }
    }

    /// The sensors of `sensors` whose quantity differs from the one of their readings still buffered (see
    /// ``SensorQuantityChange``); what a reload checks before it gives up the running configuration.
    public func quantityChanges(_ sensors: [SensorDescriptor]) async throws -> [SensorQuantityChange] {
        try await withStore { store in try store.quantityChanges(sensors) }
    }

    /// Queues `samples` for the next group commit. Never touches the disk.
    ///
    /// - Throws: ``BufferError/closed`` after ``close()``.
    public func append(_ samples: [Sample]) async throws {
        try committer.append(samples)
    }

    /// Commits everything queued now (in transactions of at most ``Committer/chunkSamples``) and returns once it is durable.
    ///
    /// - Returns: the highest sequence number committed so far (0 if none ever was).
    /// - Throws: the commit's error (for example disk full); the samples then stay queued for the next attempt.
    @discardableResult
    public func flush() async throws -> UInt64 {
        // Capture the committer, not `self`: a closure released on the buffer's thread must never hold the last reference to
        // the buffer, whose deinit waits for that thread.
        let committer = self.committer
        return try await writing(.commit) { store in try committer.commit(on: store) }
    }

    /// The group-commit loop: commits what is queued every ``BufferConfiguration/commitInterval`` (skipping empty intervals).
    ///
    /// A failed commit is logged and retried at the next interval with the samples still queued. On graceful shutdown or
    /// cancellation the loop stops and flushes what is queued before returning.
    ///
    /// A file that SQLite finds damaged while the agent runs (any operation answering `SQLITE_CORRUPT` or `SQLITE_NOTADB`:
    /// a commit, the uploader's read, an acknowledgement) ends the loop instead, at its next turn: retrying cannot repair
    /// it, and the heartbeat would keep systemd from restarting the agent. The loop writes the last committed sequence
    /// number to the sidecar, closes the file, moves it aside as the start-up recovery does (with its `-wal` and `-shm`,
    /// to `<path>.corrupt-<UTC time>`), logs that once and throws: the agent exits non-zero, systemd restarts it, and it
    /// starts a fresh buffer numbered above the sidecar. Moving the file now rather than at the next start recovers also
    /// damage that `quick_check` at open would not see (an index that disagrees with its table). Lost, as with a
    /// corruption found at start: the readings, quarantine and calibration events of the damaged file that were not yet
    /// uploaded (they stay in the moved file), and the samples still queued in memory.
    ///
    /// - Throws: a ``BufferError`` naming the file when it is damaged. A final flush that fails otherwise (a full disk)
    ///   is logged and leaves the samples queued for ``takeUncommitted()``.
    public func run() async throws {
        let interval = max(configuration.commitInterval, .milliseconds(1))
        let damage: String? = await cancelWhenGracefulShutdown { [self] () -> String? in
            let clock = ContinuousClock()
            var deadline = clock.now.advanced(by: interval)
            var failing = false
            var lastFailureLog: ContinuousClock.Instant?
            while !Task.isCancelled {
                // Back after the sleep and one commit (a slow SD card's fsync included); a commit that never returns is stuck.
                heartbeat.beat(within: clock.now.duration(to: deadline) + .seconds(30))
                do {
                    try await Task.sleep(until: deadline, clock: clock)
                } catch {
                    return nil
                }
                deadline = deadline.advanced(by: interval)
                if deadline < clock.now { deadline = clock.now.advanced(by: interval) }
                if let damage = corruption.withLock({ $0 }) { return damage }
                do {
                    try await flush()
                    if failing {
                        logger.info("Buffer commits succeed again")
                        failing = false
                    }
                } catch {
                    if let damage = corruption.withLock({ $0 }) { return damage }
                    let now = clock.now
                    if !failing || lastFailureLog.map({ $0.duration(to: now) >= .seconds(60) }) ?? true {
                        let queued = committer.counts().uncommitted
                        logger.error(
                            "Buffer commit failed; samples stay queued and the commit is retried",
                            metadata: ["error": "\(error)", "buffer.queued": "\(queued)"])
                        lastFailureLog = now
                    }
                    failing = true
                }
            }
            return nil
        }
        ending.withLock { $0 = true }
        if let damage { try await endOnDamagedFile(damage) }
        do {
            try await flush()
            try await withStore { store in store.closing() }
        } catch {
            // Damage met while stopping (the final commit, or the uploader's last batch) is handled as while running.
            if let damage = corruption.withLock({ $0 }) { try await endOnDamagedFile(damage) }
            // The samples stay queued for ``takeUncommitted()``: a reload hands them to the next generation's buffer;
            // a stop cannot keep them, and says so (AgentRuntime).
            logger.error(
                "Buffer could not commit its queue at shutdown; the samples stay in memory",
                metadata: ["error": "\(error)", "buffer.queued": "\(committer.counts().uncommitted)"])
        }
    }

    /// The samples still queued in memory, taken out of the queue: after ``run()`` ended without committing them (a full
    /// disk), for the buffer of the next generation of services when the configuration was reloaded.
    public func takeUncommitted() -> (samples: [Sample], dropped: Int64) {
        committer.takeQueued()
    }

    /// Queues `samples` handed over by the previous generation's buffer (``takeUncommitted()``), and counts the samples
    /// that buffer dropped in memory as dropped here, so that the `dropped` counter loses none across a reload.
    public func adopt(_ samples: [Sample], dropped: Int64) throws(BufferError) {
        committer.adoptDropped(dropped)
        try committer.append(samples)
    }

    /// Ends the buffer on a damaged file, as ``run()`` describes: sidecar, close, move aside, one log line, an error.
    private func endOnDamagedFile(_ damage: String) async throws -> Never {
        committer.close()
        let lost = committer.counts().uncommitted
        let path = configuration.path
        // The sidecar is a file of its own, not damaged: it gets the last number committed, so that nothing the damaged
        // file handed out is given again (the sidecar otherwise lags by up to BufferStore.sidecarStride, within the gap).
        let lastSequence = try? await withStore { store in
            store.closing()
            return store.lastSequence
        }
        await store.release()
        let moved: Result<String, any Error>
        do {
            moved = .success(try await runOffPool(name: "farmgate-buffer") { try BufferStore.moveAside(path: path) })
        } catch {
            moved = .failure(error)
        }
        var metadata: Logger.Metadata = [
            "buffer.path": "\(path)", "error": "\(damage)", "buffer.lost_uncommitted": "\(lost)",
            "buffer.last_sequence": "\(lastSequence.map { String($0) } ?? "unknown")",
        ]
        switch moved {
        case .success(let target):
            metadata["buffer.moved_to"] = "\(target)"
            logger.critical(
                "Buffer file is corrupt: moved it aside and stopping the agent; it restarts (systemd) with a fresh buffer numbered above the old one. Readings not yet uploaded are in the moved file",
                metadata: metadata)
            throw BufferError(
                "the buffer \(path) is corrupt (\(damage)); it was moved aside to \(target), and the agent stops so that it restarts "
                    + "with a fresh buffer (systemd restarts it; otherwise start it again)")
        case .failure(let error):
            metadata["buffer.move_error"] = "\(error)"
            logger.critical(
                "Buffer file is corrupt and cannot be moved aside; stopping the agent, whose next start checks the file again",
                metadata: metadata)
            throw BufferError(
                "the buffer \(path) is corrupt (\(damage)) and cannot be moved aside (\(error)); the agent stops so that it "
                    + "restarts and checks the file again; if it does not recover, stop it and move the file away")
        }
    }

    /// Commits what is queued, then closes the file on its thread. Later calls throw ``BufferError/closed``.
    ///
    /// - Throws: the final commit's error; the file is closed either way.
    public func close() async throws {
        committer.close()
        var flushError: (any Error)?
        do { try await flush() } catch { flushError = error }
        try? await withStore { store in store.closing() }
        await store.release()
        if let flushError { throw flushError }
    }

    /// Samples dropped since this buffer was opened because their sensor was not registered or their value could not be
    /// quantized. Not persisted.
    public var rejectedSamples: Int64 { committer.counts().rejected }

    // MARK: PendingReadings

    /// Up to `limit` committed, unacknowledged readings from one end of the backlog, in ascending sequence order, leaving
    /// out those numbered within `excluded`.
    public func pending(limit: Int, from end: BacklogEnd, excluding excluded: ClosedRange<UInt64>?) async throws -> [Reading] {
        try await withStore { store in try store.pending(limit: limit, from: end, excluding: excluded) }
    }

    /// The registered descriptors of `sensors` (including sensors no longer configured whose readings are still buffered).
    public func descriptors(for sensors: Set<SensorID>) async throws -> [SensorDescriptor] {
        try await withStore { store in store.descriptors(for: sensors) }
    }

    public func allDescriptors() async throws -> [SensorDescriptor] {
        try await withStore { store in store.allDescriptors() }
    }

    /// Makes sure the next reading is numbered above `sequence` (the highest the ingest holds for this device): raises the
    /// counter, and the sidecar, when it is below. Pending readings keep their numbers.
    ///
    /// - Returns: the last sequence before the jump, or nil when the counter was already at or above `sequence`.
    @discardableResult
    public func advanceSequence(past sequence: UInt64) async throws -> UInt64? {
        let floor = Int64(clamping: sequence)
        return try await withStore { store in try store.advanceSequence(past: floor).map { UInt64(max(0, $0)) } }
    }

    /// Renumbers pending readings above max(`floor`, the last sequence), keeping their content, atomically with the counter
    /// (and then the sidecar). For readings the ingest refused with `sequence_conflict`: their numbers belong to other
    /// readings it stored before this buffer lost its history. Numbers not pending are skipped.
    ///
    /// - Returns: (old, new) pairs in ascending order.
    public func renumber(_ sequences: [UInt64], above floor: UInt64) async throws -> [SequenceRenumbering] {
        let bound = Int64(clamping: floor)
        return try await writing(.acknowledge) { store in
            try store.renumber(sequences, above: bound).map { SequenceRenumbering(old: $0.old, new: $0.new) }
        }
    }

    /// Deletes the readings with these sequence numbers, in one transaction. Unknown numbers are ignored.
    public func acknowledge(_ sequences: [UInt64]) async throws {
        try await writing(.acknowledge) { store in _ = try store.acknowledge(sequences) }
    }

    /// Moves these readings into quarantine with their reasons and the current time, in one transaction. Sequence numbers
    /// that are not pending are ignored.
    public func quarantine(_ reasons: [UInt64: String]) async throws {
        try await writing(.acknowledge) { store in _ = try store.quarantine(reasons) }
    }

    /// The `limit` most recently quarantined readings, newest first.
    public func quarantined(limit: Int) async throws -> [QuarantinedReading] {
        try await withStore { store in try store.quarantined(limit: limit) }
    }

    /// Counts, ages and sizes, for batching decisions, status and metrics.
    public func statistics() async throws -> BufferStatistics {
        let (uncommitted, droppedInMemory, _) = committer.counts()
        let quota = configuration.quotaBytes
        var statistics = try await withStore { store in
            try store.statistics(uncommitted: uncommitted, droppedInMemory: droppedInMemory, quotaBytes: quota)
        }
        let errors = errorLog.withLock { $0 }
        statistics.errors = errors == BufferErrors() ? nil : errors
        return statistics
    }

    // MARK: Clock

    /// Tells the buffer what the clock says now (the ``ClockMonitor`` calls this about once a second, and once before the
    /// uploader starts).
    ///
    /// - While the clock is not synchronised, readings of this boot taken less than `hold` ago (by CLOCK_BOOTTIME) are held:
    ///   ``pending(limit:from:)`` skips them and ``BufferStatistics/held`` counts them. Older ones go up flagged
    ///   `clock_unsynchronized`, as do readings of earlier boots (their time can no longer be repaired). A reading of this
    ///   boot stamped before 2000 (a box that booted at 1970) is held as long as the boot lasts: the ingest would refuse it
    ///   for good, only a correction can save it. With `hold` zero nothing is held.
    /// - The first time it is synchronised in this boot, every reading of this boot still in the buffer and not yet sent
    ///   (a reading's content never changes once a request carrying it left, see ``freezeForSending(_:)``) gets its true
    ///   time (`boottime + realtime − boottime at synchronisation`) and `clock_corrected` instead of
    ///   `clock_unsynchronized`; readings of this boot committed later (taken just before) are corrected as they are
    ///   stored. The repair runs in steps of ``BufferStore/clockRepairStep`` readings, each its own transaction, with
    ///   commits and the uploader's reads between them; until it is done the readings it has not reached are held.
    ///
    /// - Parameter repair: false to start a due repair without running it (the readings it must correct are held; the next
    ///   observation runs it): the agent's first observation, before it is ready.
    /// - Returns: what was corrected, when this observation found the clock newly synchronised; nil otherwise.
    @discardableResult
    public func observeClock(_ observation: ClockObservation, repair: Bool = true) async throws -> ClockCorrection? {
        guard try await withStore({ store in try store.observeClock(observation) }), repair else { return nil }
        var total = ClockCorrection(corrected: 0, shifted: 0, bootEpochMicroseconds: observation.reading.bootEpochMicroseconds)
        while true {
            let (step, finished) = try await withStore { store in try store.repairClockStep() }
            total.corrected += step.corrected
            total.shifted += step.shifted
            // A stop between steps leaves the rest for the next observation (or start), which resumes the repair.
            if finished || Task.isCancelled { return total }
        }
    }

    /// Makes the content of `sequences` final just before a request carrying them leaves; false when one of them was
    /// repaired since it was read (the request must not go). Blocks the calling thread (the uploader's HTTP thread, never
    /// the concurrency pool) while the buffer's thread writes. See ``PendingReadings/freezeForSending(_:)``.
    public func freezeForSending(_ sequences: [UInt64]) throws -> Bool {
        do {
            return try store.withValueBlocking { store in try store.freezeForSending(sequences) }
        } catch is DedicatedThreadError {
            throw BufferError.closed
        } catch where BufferStore.isCorruption(error) {
            let description = "\(error)"
            corruption.withLock { $0 = $0 ?? description }
            throw error
        }
    }

    /// Limits the file to `pages` pages (`PRAGMA max_page_count`), so that tests can provoke a real `SQLITE_FULL`.
    func limitPageCount(_ pages: Int64) async throws {
        try await withStore { store in try store.limitPageCount(pages) }
    }

    /// Runs SQLite's `quick_check` on the open file; an empty answer means healthy. For `farmgate doctor` and tests.
    public func integrityProblems() async throws -> [String] {
        try await withStore { store in try store.integrityProblems() }
    }
}

/// The samples waiting for the next group commit, and the commit itself. Separate from ``ReadingBuffer`` so that closures
/// run on the buffer's thread capture this object rather than the buffer.
private final class Committer: Sendable {
    private struct Queue {
        var samples: [Sample] = []
        /// Samples taken out of `samples` by the commit running now: still uncommitted for `counts()`.
        var committing = 0
        /// Samples dropped in memory (cap reached) and not yet added to the persisted counter.
        var droppedInMemory: Int64 = 0
        var rejected: Int64 = 0
        var closed = false
        var lastOverflowWarning: ContinuousClock.Instant?
    }

    private let queue = Mutex(Queue())
    private let policy: BufferFullPolicy
    private let quotaBytes: Int64
    private let logger: Logger
    private let onCommit: (@Sendable (BufferCommit) -> Void)?

    init(configuration: BufferConfiguration, logger: Logger, onCommit: (@Sendable (BufferCommit) -> Void)?) {
        self.policy = configuration.whenFull
        self.quotaBytes = configuration.quotaBytes
        self.logger = logger
        self.onCommit = onCommit
    }

    func append(_ samples: [Sample]) throws(BufferError) {
        guard !samples.isEmpty else { return }
        let policy = self.policy
        let overflow = try queue.withLock { queue throws(BufferError) -> (dropped: Int, warn: Bool) in
            guard !queue.closed else { throw BufferError.closed }
            queue.samples.append(contentsOf: samples)
            return Committer.enforceCap(&queue, policy: policy)
        }
        if overflow.warn { warnOverflow(overflow.dropped) }
    }

    func close() { queue.withLock { $0.closed = true } }

    /// Empties the queue and returns what it held, with the samples dropped in memory and not yet counted in the file.
    func takeQueued() -> (samples: [Sample], dropped: Int64) {
        queue.withLock { queue in
            defer {
                queue.samples = []
                queue.droppedInMemory = 0
            }
            return (queue.samples, queue.droppedInMemory)
        }
    }

    /// Counts samples dropped elsewhere (by the previous generation's queue) as dropped in memory here: the next
    /// commit adds them to the file's counter.
    func adoptDropped(_ count: Int64) {
        guard count > 0 else { return }
        queue.withLock { $0.droppedInMemory += count }
    }

    func counts() -> (uncommitted: Int, droppedInMemory: Int64, rejected: Int64) {
        queue.withLock { ($0.samples.count + $0.committing, $0.droppedInMemory, $0.rejected) }
    }

    /// Drops samples past ``ReadingBuffer/maximumQueuedSamples`` according to `policy`; says whether a warning is due (at
    /// most once a minute).
    private static func enforceCap(_ queue: inout Queue, policy: BufferFullPolicy) -> (dropped: Int, warn: Bool) {
        let excess = queue.samples.count - ReadingBuffer.maximumQueuedSamples
        guard excess > 0 else { return (0, false) }
        switch policy {
        case .dropOldest: queue.samples.removeFirst(excess)
        case .dropNewest: queue.samples.removeLast(excess)
        }
        queue.droppedInMemory += Int64(excess)
        let now = ContinuousClock.now
        if let last = queue.lastOverflowWarning, last.duration(to: now) < .seconds(60) { return (excess, false) }
        queue.lastOverflowWarning = now
        return (excess, true)
    }

    private func warnOverflow(_ count: Int) {
        logger.warning(
            "Buffer cannot commit and its memory queue is full; samples were dropped",
            metadata: [
                "buffer.dropped": "\(count)", "buffer.max_queued": "\(ReadingBuffer.maximumQueuedSamples)",
                "buffer.policy": "\(policy.rawValue)",
            ])
    }

    /// How many samples must wait in memory, their commit failing for a full disk, before `drop_oldest` deletes stored
    /// readings to make room: half the queue (at 50 readings a second, about 17 minutes of a full disk). Below it nothing
    /// stored is deleted: a disk filled by something else for a while costs nothing once space returns.
    static let makeRoomAt = ReadingBuffer.maximumQueuedSamples / 2

    /// The most samples one transaction commits. A group commit holds a few hundred; after the disk was full for a
    /// while the queue holds up to ``ReadingBuffer/maximumQueuedSamples``, and one transaction of all of them needs
    /// several megabytes of WAL (and of pages to delete, for `drop_oldest`'s room) at once: on a card with a megabyte or
    /// two free again it never fit, and the queue stayed stuck in memory until much more space came back. In chunks,
    /// each its own transaction, what fits is committed, oldest first.
    static let chunkSamples = 5_000

    /// Commits everything queued, in transactions of at most ``chunkSamples``. Runs on the buffer's thread, so commits
    /// happen one at a time and sequence numbers follow commit order. On failure the chunk goes back to the front of the
    /// queue (the chunks before it stay committed).
    func commit(on store: BufferStore) throws -> UInt64 {
        var sequence = UInt64(max(0, store.lastSequence))
        // What this commit finds queued decides: whether `drop_oldest` may make room on a full disk (every chunk then
        // deletes the oldest stored readings for its own samples), and how many chunks it commits at most, so that
        // samples appended faster than they commit wait for the next commit instead of keeping this one going.
        let queued = queue.withLock { $0.samples.count }
        let mayMakeRoom = queued >= Self.makeRoomAt
        let chunks = max(1, (queued + Self.chunkSamples - 1) / Self.chunkSamples)
        for chunk in 0..<chunks {
            guard let committed = try commitChunk(on: store, first: chunk == 0, mayMakeRoom: mayMakeRoom) else { break }
            sequence = committed
        }
        return sequence
    }

    /// Commits the oldest ``chunkSamples`` queued; nil when nothing was queued (after the first chunk: the loop is done).
    private func commitChunk(on store: BufferStore, first: Bool, mayMakeRoom: Bool) throws -> UInt64? {
        let (samples, carried) = queue.withLock { queue in
            let count = min(queue.samples.count, Self.chunkSamples)
            defer {
                queue.committing = count
                queue.samples.removeFirst(count)
                queue.droppedInMemory = 0
            }
            return (Array(queue.samples.prefix(count)), queue.droppedInMemory)
        }
        defer { queue.withLock { $0.committing = 0 } }
        guard !samples.isEmpty || carried > 0 else {
            guard first else { return nil }
            // Nothing to commit in this window: acknowledgements written since the last commit are synced now. A failure
            // only means they wait for the next commit, as they always could: logged, never the flush's error.
            do {
                try store.syncAcknowledgements()
            } catch {
                logger.debug("Cannot checkpoint the buffer's acknowledgements now", metadata: ["error": "\(error)"])
            }
            return nil
        }
        var outcome: CommitOutcome
        do {
            do {
                outcome = try store.commit(samples, carriedDrops: carried, quotaBytes: quotaBytes, policy: policy)
            } catch let error as SQLiteError where error.isDiskFull {
                // A WAL holding space the file system needs: truncated (it fails harmlessly while a reader holds it),
                // the commit may fit.
                store.truncateWAL()
                do {
                    outcome = try store.commit(samples, carriedDrops: carried, quotaBytes: quotaBytes, policy: policy)
                } catch let error as SQLiteError
                    where error.isDiskFull && policy == .dropOldest && mayMakeRoom && store.pendingCount > 0
                {
                    // The disk filled before the quota, and has stayed full while half the memory queue filled up: the
                    // policy drops the oldest readings, so the oldest stored ones make room (their pages take the newest,
                    // in the same transaction: a commit that still fails deletes nothing) rather than newer ones waiting
                    // in memory, which are lost at the cap or in a restart. Deleting is making room: it may use the
                    // buffer's reserve.
                    outcome = try store.makingRoomOnFullDisk("the oldest readings can be deleted") {
                        try store.commit(
                            samples, carriedDrops: carried, quotaBytes: quotaBytes, policy: policy, makeRoom: samples.count + samples.count / 10 + 256)
                    }
                    logger.warning(
                        "The disk is full before the buffer's quota; the oldest stored readings were dropped to commit the newest",
                        metadata: ["buffer.dropped": "\(outcome.dropped)", "buffer.policy": "\(policy.rawValue)", "error": "\(error)"])
                }
            }
        } catch {
            let policy = self.policy
            let overflow = queue.withLock { queue in
                queue.samples.insert(contentsOf: samples, at: 0)
                queue.committing = 0
                queue.droppedInMemory += carried
                return Committer.enforceCap(&queue, policy: policy)
            }
            if overflow.warn { warnOverflow(overflow.dropped) }
            throw error
        }
        if outcome.rejected > 0 { queue.withLock { $0.rejected += Int64(outcome.rejected) } }
        let sequence = UInt64(max(0, outcome.lastSequence))
        onCommit?(
            BufferCommit(
                lastSequence: sequence, stored: outcome.stored, duplicates: outcome.duplicates, dropped: outcome.dropped,
                rejected: outcome.rejected, trimmedFromQuarantine: outcome.trimmedFromQuarantine))
        return sequence
    }
}

/// What one group commit did, reported to ``ReadingBuffer``'s `onCommit` observer.
public struct BufferCommit: Hashable, Sendable {
    /// The highest sequence number committed so far; durable when the observer runs.
    public var lastSequence: UInt64
    /// Readings stored by this commit.
    public var stored: Int
    /// Samples ignored because the same sensor and timestamp was already buffered.
    public var duplicates: Int
    /// Readings dropped by the quota policy in this commit.
    public var dropped: Int
    /// Samples rejected (unregistered sensor, unquantizable value).
    public var rejected: Int
    /// Quarantined readings the quota policy deleted in this commit (only once no pending reading was left).
    public var trimmedFromQuarantine: Int

    public init(lastSequence: UInt64, stored: Int, duplicates: Int, dropped: Int, rejected: Int, trimmedFromQuarantine: Int = 0) {
        self.trimmedFromQuarantine = trimmedFromQuarantine
        self.lastSequence = lastSequence
        self.stored = stored
        self.duplicates = duplicates
        self.dropped = dropped
        self.rejected = rejected
    }
}

/// The buffer cannot be used, with a message that says what to do.
public struct BufferError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String

    public init(_ description: String) { self.description = description }

    /// The buffer was closed.
    public static let closed = BufferError("the reading buffer is closed")

    /// The buffer's commit loop has ended: the agent stops or restarts its services.
    public static let ending = BufferError("the reading buffer is stopping (the agent stops or reloads its configuration)")
}
