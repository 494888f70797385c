import FarmgateSupport
import FarmgateWire

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Retention on SQLite: deletes in small transactions that never stall ingest.
extension SQLiteIngestStore: RetentionStore {
    /// The sidecar whose lock a retention run holds throughout: `<path>.retention.lock`.
    static let retentionLockSuffix = ".retention.lock"

    /// Deletes raw readings and rollup rows before their cut-offs, sensor by sensor, at most
    /// ``RetentionRunOptions/rowsPerTransaction`` rows per transaction. The deletes walk `readings_by_sensor_time` and
    /// the rollups' primary keys, so a run costs in proportion to what it removes. Cancelled (graceful shutdown), a run
    /// stops between transactions.
    ///
    /// A batch waits for at most about one of these transactions:
    /// - In this process (`serve`'s scheduled run), each transaction is one job on the writer thread, so a batch that
    ///   arrives meanwhile runs right after the transaction in progress.
    /// - In another process (`farmgate-ingest retention run` beside `serve`), the database's write lock is what they
    ///   share, and SQLite has no queue for it: a run that began its next transaction at once after a commit took the
    ///   lock again before a waiting `serve` looked (batches waited seconds). So after each transaction the run leaves
    ///   the lock free for as long as that transaction took (``TransactionPacer``; the run takes up to twice as long),
    ///   and a waiting connection tries the lock every millisecond (`SQLiteConnection`'s busy handler).
    ///
    /// One run at a time per file: the run holds an exclusive lock on `<path>.retention.lock` (``SidecarLock``,
    /// taken without waiting, the command's and `serve`'s alike). A run that finds it held does nothing and reports
    /// ``RetentionReport/Skip/runningElsewhere`` (the command exits 75); two runs at once would each delete part of the
    /// same rows, in twice as many transactions.
    ///
    /// The file does not shrink: the freed pages are reused by new readings (run `VACUUM` by hand to give them back).
    public func runRetention(_ retention: IngestConfiguration.Retention, now: Timestamp, options: RetentionRunOptions) async throws -> RetentionReport {
        let path = self.path
        let lock: SidecarLock? = try await writer.withValue { _ in
            do throws(SidecarLock.Failure) {
                return try SidecarLock(databasePath: path, suffix: Self.retentionLockSuffix)
            } catch {
                switch error {
                case .held: return nil
                case .unusable(let lockPath, let code):
                    throw SQLiteIngestStoreError.lockUnusable(lockPath: lockPath, reason: String(cString: strerror(code)))
                }
            }
        }
        guard let lock else { return .skip(.runningElsewhere, retention: retention, now: now, dryRun: options.dryRun) }
        do {
            let report = try await runRetentionHoldingLock(retention, now: now, options: options)
            await release(lock)
            return report
        } catch {
            await release(lock)
            throw error
        }
    }

    /// Lets the run's lock go, on the writer thread (or here, once the store is closed).
    private func release(_ lock: SidecarLock) async {
        do {
            try await writer.withValue { _ in lock.release() }
        } catch {
            lock.release()
        }
    }

    /// The run itself, under the retention lock.
    private func runRetentionHoldingLock(
        _ retention: IngestConfiguration.Retention, now: Timestamp, options: RetentionRunOptions
    ) async throws -> RetentionReport {
        let started = ContinuousClock.now
        var report = RetentionReport.empty(retention, now: now, dryRun: options.dryRun)
        var pacer = TransactionPacer()
        let sensors = try await reader.withValue { db in
            try db.withStatement("SELECT id FROM sensors ORDER BY id") { statement throws -> [Int64] in
                var ids: [Int64] = []
                while try statement.step() { ids.append(statement.int64(0)) }
                return ids
            }
        }
        var removed = 0
        /// Deletes (or counts) the rows of `table` before `cutoff`; `key` is the time column, `rowKey` the primary key.
        func purge(_ table: String, key: String, rowKey: String, before cutoff: Timestamp) async throws -> Int {
            var total = 0
            for sensor in sensors {
                if options.dryRun {
                    total += try await reader.withValue { db in
                        try db.withStatement("SELECT count(*) FROM \(table) WHERE sensor_id = ? AND \(key) < ?", [.integer(sensor), .integer(cutoff.microseconds)]) {
                            statement in try statement.step() ? Int(statement.int64(0)) : 0
                        }
                    }
                    continue
                }
                let raw = table == "readings"
                while true {
                    try Task.checkCancellation()
                    let limit = Int64(options.rowsPerTransaction)
                    let deleted = try await pacer.transaction(on: writer) { db in
                        try db.connection.transaction { () throws -> Int in
                            let delete = try db.statement(
                                """
                                DELETE FROM \(table) WHERE (\(rowKey)) IN (
                                    SELECT \(rowKey) FROM \(table) WHERE sensor_id = ? AND \(key) < ? ORDER BY \(key) LIMIT ?)
                                RETURNING \(raw ? "device_id, sequence" : "sensor_id, 0")
                                """)
                            try delete.bind([.integer(sensor), .integer(cutoff.microseconds), .integer(limit)])
                            var keys: [(device: Int64, sequence: Int64)] = []
                            do {
                                defer { delete.reset() }
                                while try delete.step() { keys.append((delete.int64(0), delete.int64(1))) }
                            }
                            if raw { try SQLiteIngestStore.retire(keys, in: db) }
                            return keys.count
                        }
                    }
                    total += deleted
                    if deleted > 0 {
                        removed += deleted
                        options.progress?(removed)
                    }
                    if deleted < options.rowsPerTransaction { break }
                }
            }
            return total
        }
        if let cutoff = report.rawCutoff {
            if !options.dryRun {
                // Recorded before anything goes, in a transaction of its own: a retired sequence sent again is judged by
                // it (a duplicate only when older), so it must never lag what was removed. Kept at its highest: a
                // longer `[retention] raw` moves the cut-off back, but what went, went.
                try await pacer.transaction(on: writer) { db -> Void in
                    try db.query(
                        "INSERT INTO retention_cutoff(id, raw_us) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET raw_us = max(raw_us, excluded.raw_us)",
                        [.integer(cutoff.microseconds)])
                }
            }
            report.rawRowsDeleted = try await purge("readings", key: "timestamp_us", rowKey: "device_id, sequence", before: cutoff)
        }
        for level in RollupLevel.allCases {
            guard let cutoff = report.rollupCutoffs[level] else { continue }
            if !options.dryRun {
                // Recorded before anything goes (kept at its highest), as the raw cut-off is.
                try await pacer.transaction(on: writer) { db -> Void in
                    try db.query(
                        "INSERT INTO rollup_cutoffs(level, cutoff_us) VALUES (?, ?) ON CONFLICT (level) DO UPDATE SET cutoff_us = max(cutoff_us, excluded.cutoff_us)",
                        [.text(level.rawValue), .integer(cutoff.microseconds)])
                }
            }
            report.rollupRowsDeleted[level] = try await purge(level.table, key: "bucket_us", rowKey: "sensor_id, bucket_us", before: cutoff)
        }
        if let cutoff = report.deliveredNotificationCutoff {
            report.deliveredNotificationsDeleted = try await purgeOutbox(
                "state = 'delivered' AND delivered_at_us < ?", before: cutoff, options: options, pacer: &pacer)
        }
        if let cutoff = report.deadNotificationCutoff {
            report.deadNotificationsDeleted = try await purgeOutbox(
                "state = 'dead' AND coalesce(last_attempt_at_us, created_at_us) < ?", before: cutoff, options: options, pacer: &pacer)
        }
        if let cutoff = report.alertHistoryCutoff {
            report.alertTransitionsDeleted = try await purgeAlertHistory(before: cutoff, options: options, removedBefore: removed, pacer: &pacer)
        }
        report.duration = ContinuousClock.now - started
        return report
    }

    /// Deletes (or counts) the outbox rows that match `condition` (one `?`: the cut-off), a transaction of at most
    /// ``RetentionRunOptions/rowsPerTransaction`` rows at a time, like the readings.
    private func purgeOutbox(
        _ condition: String, before cutoff: Timestamp, options: RetentionRunOptions, pacer: inout TransactionPacer
    ) async throws -> Int {
        if options.dryRun {
            return try await reader.withValue { db in
                try db.withStatement("SELECT count(*) FROM alert_outbox WHERE \(condition)", [.integer(cutoff.microseconds)]) { statement in
                    try statement.step() ? Int(statement.int64(0)) : 0
                }
            }
        }
        var total = 0
        while true {
            try Task.checkCancellation()
            let deleted = try await pacer.transaction(on: writer) { db in
                try db.connection.transaction { () throws -> Int in
                    let delete = try db.statement(
                        "DELETE FROM alert_outbox WHERE id IN (SELECT id FROM alert_outbox WHERE \(condition) ORDER BY id LIMIT ?) RETURNING id")
                    try delete.bind([.integer(cutoff.microseconds), .integer(Int64(options.rowsPerTransaction))])
                    defer { delete.reset() }
                    var count = 0
                    while try delete.step() { count += 1 }
                    return count
                }
            }
            total += deleted
            if deleted < options.rowsPerTransaction { return total }
        }
    }

    /// The alert transitions retention removes: recorded before the cut-off (the first `?`), not their alert's newest
    /// (a newer one of the same alert exists), and not of an alert whose late report is due (it is gathering a
    /// backlog: the report reads the alert's history, see ``AlertEngine``). Found through
    /// `alert_transitions_by_recorded`; the newer one through `alert_transitions_newest` (one seek per row).
    private static let oldAlertTransitions = """
        t.recorded_at_us < ? AND t.alert_id NOT IN (SELECT id FROM alerts WHERE late_due_us IS NOT NULL)
            AND EXISTS (SELECT 1 FROM alert_transitions n WHERE n.alert_id = t.alert_id AND n.id > t.id)
        """

    /// Deletes (or counts) the alert transitions recorded before `cutoff`, keeping each alert's newest (the engine takes
    /// it as the alert's latest change: `max(id)` for a late report's notification), at most
    /// ``RetentionRunOptions/rowsPerTransaction`` rows per transaction, oldest first, like the readings (and told to
    /// ``RetentionRunOptions/progress`` as they are, after the `removedBefore` rows of the readings and rollups).
    ///
    /// Keeping each alert's newest also keeps the table's highest id, so SQLite (no `AUTOINCREMENT`: a new row gets
    /// the highest id plus one) never hands out a deleted id again, and an idempotency key
    /// `farmgate-<alert>-<transition>-<receiver>` never names two transitions. Outbox rows keep their transition's id
    /// as a number (no foreign key) and their payload whole, so a notification still pending or delivered is not
    /// changed when its transition goes.
    private func purgeAlertHistory(
        before cutoff: Timestamp, options: RetentionRunOptions, removedBefore: Int, pacer: inout TransactionPacer
    ) async throws -> Int {
        if options.dryRun {
            return try await reader.withValue { db in
                try db.withStatement("SELECT count(*) FROM alert_transitions t WHERE \(Self.oldAlertTransitions)", [.integer(cutoff.microseconds)]) {
                    statement in try statement.step() ? Int(statement.int64(0)) : 0
                }
            }
        }
        var total = 0
        // Where the next transaction starts (a recorded time): what lies before it and is still there is kept (an
        // alert's newest, or the history of an alert whose late report is due), and would otherwise be read again by
        // every transaction.
        var from = Int64.min
        while true {
            try Task.checkCancellation()
            let start = from
            let (deleted, last) = try await pacer.transaction(on: writer) { db in
                try db.connection.transaction { () throws -> (Int, Int64?) in
                    let delete = try db.statement(
                        """
                        DELETE FROM alert_transitions WHERE id IN (
                            SELECT t.id FROM alert_transitions t WHERE \(Self.oldAlertTransitions) AND t.recorded_at_us >= ?
                            ORDER BY t.recorded_at_us LIMIT ?)
                        RETURNING recorded_at_us
                        """)
                    try delete.bind([.integer(cutoff.microseconds), .integer(start), .integer(Int64(options.rowsPerTransaction))])
                    defer { delete.reset() }
                    var count = 0
                    var last: Int64?
                    while try delete.step() {
                        count += 1
                        last = max(last ?? Int64.min, delete.int64(0))
                    }
                    return (count, last)
                }
            }
            total += deleted
            if deleted > 0 { options.progress?(removedBefore + total) }
            if deleted < options.rowsPerTransaction { return total }
            // The newest recorded time deleted, not past it: rows recorded at that very time may be left.
            if let last { from = last }
        }
    }

    /// Spaces a run's write transactions: before each one after the first, the write lock is left free for as long as
    /// the one before held the writer (measured on the writer thread, so it includes a wait for the lock), so that a
    /// connection of another process waiting for the lock gets it between two of them, and the run holds the lock at
    /// most about half of the time. The pause is a `Task.sleep` (the writer thread takes this process's batches
    /// meanwhile); cancelled, it ends the run like the check between transactions.
    struct TransactionPacer {
        /// How long the last transaction held the writer; nil before the first.
        private var lastHeld: Duration?

        /// Runs `body` (one transaction) on `writer` after the pause the previous transaction calls for.
        mutating func transaction<T: Sendable>(
            on writer: ThreadOwned<CachedConnection>, _ body: @escaping @Sendable (CachedConnection) throws -> T
        ) async throws -> T {
            if let lastHeld, lastHeld > .zero { try await Task.sleep(for: lastHeld) }
            let (result, held) = try await writer.withValue { db in
                let clock = ContinuousClock()
                let start = clock.now
                let result = try body(db)
                return (result, clock.now - start)
            }
            lastHeld = held
            return result
        }
    }

    /// Records that the readings `keys` were deleted, merged into `retired_sequences` ranges per device: one chunk of
    /// one sensor's readings is every n-th sequence of its device, and the other sensors' chunks fill the gaps, so a
    /// device's ranges join up as the run goes on (a few rows per device, like PostgreSQL's `stored_sequences`).
    static func retire(_ keys: [(device: Int64, sequence: Int64)], in db: CachedConnection) throws {
        guard !keys.isEmpty else { return }
        let before = try db.statement(
            "SELECT first_sequence, last_sequence FROM retired_sequences WHERE device_id = ? AND first_sequence <= ? ORDER BY first_sequence DESC LIMIT 1")
        let after = try db.statement("SELECT last_sequence FROM retired_sequences WHERE device_id = ? AND first_sequence = ?")
        let remove = try db.statement("DELETE FROM retired_sequences WHERE device_id = ? AND first_sequence = ?")
        let extend = try db.statement("UPDATE retired_sequences SET last_sequence = ? WHERE device_id = ? AND first_sequence = ?")
        let insert = try db.statement("INSERT INTO retired_sequences(device_id, first_sequence, last_sequence) VALUES (?, ?, ?)")
        for (device, runs) in Dictionary(grouping: keys, by: \.device) {
            for run in PostgresBatchWriter.merge([], adding: runs.map(\.sequence)) {
                var (first, last) = (run.lowerBound, run.upperBound)
                // A range that starts right after this run joins it. None can follow a run that ends at Int64.max (a
                // device may send that sequence; the validator allows it), and `last + 1` would trap there.
                if last < Int64.max {
                    let next = last + 1
                    let following: Int64? = try {
                        try after.bind([.integer(device), .integer(next)])
                        defer { after.reset() }
                        return try after.step() ? after.int64(0) : nil
                    }()
                    if let following {
                        try remove.run([.integer(device), .integer(next)])
                        last = following
                    }
                }
                // A range that ends right before (or overlaps) this run takes it in.
                try before.bind([.integer(device), .integer(first)])
                let preceding: (Int64, Int64)? = try before.step() ? (before.int64(0), before.int64(1)) : nil
                before.reset()
                if let (start, end) = preceding, end >= first - 1 {
                    first = start
                    try extend.run([.integer(max(end, last)), .integer(device), .integer(start)])
                } else {
                    try insert.run([.integer(device), .integer(first), .integer(last)])
                }
            }
        }
    }

    /// The newest raw cut-off a retention run applied (`retention_cutoff`): every reading retention removed is older.
    /// Nil when no run has recorded one.
    static func retentionCutoff(in db: CachedConnection) throws -> Timestamp? {
        try db.queryInt("SELECT raw_us FROM retention_cutoff WHERE id = 1").map(Timestamp.init(microseconds:))
    }

    /// Which of `sequences` of the device retention deleted after they were stored (`retired_sequences`). The device's
    /// ranges are disjoint (merged as they are recorded): those that can hold one of `sequences` are read once, from the
    /// highest down to the first that ends below the lowest, rather than one lookup per sequence (a backlog's batch
    /// arrives below the device's highest stored sequence, so every one of its readings comes here).
    static func retiredSequences(_ sequences: [Int64], device: Int64, in db: CachedConnection) throws -> Set<Int64> {
        guard let lowest = sequences.min(), let highest = sequences.max() else { return [] }
        let find = try db.statement(
            "SELECT first_sequence, last_sequence FROM retired_sequences WHERE device_id = ? AND first_sequence <= ? ORDER BY first_sequence DESC")
        try find.bind([.integer(device), .integer(highest)])
        defer { find.reset() }
        var ranges: [ClosedRange<Int64>] = []
        while try find.step() {
            let (first, last) = (find.int64(0), find.int64(1))
            if last < lowest { break }
            if first <= last { ranges.append(first...last) }
        }
        guard !ranges.isEmpty else { return [] }
        ranges.reverse()
        var retired: Set<Int64> = []
        for sequence in sequences {
            // The last range starting at or below the sequence is the only one that can hold it.
            var (low, high) = (0, ranges.count)
            while low < high {
                let middle = (low + high) / 2
                if ranges[middle].lowerBound <= sequence { low = middle + 1 } else { high = middle }
            }
            if low > 0, ranges[low - 1].contains(sequence) { retired.insert(sequence) }
        }
        return retired
    }
}
