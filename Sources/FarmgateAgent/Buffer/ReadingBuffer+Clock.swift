import FarmgateSupport
import FarmgateWire

/// What the agent tells the buffer about the clock, about once a second (``ClockMonitor``).
public struct ClockObservation: Hashable, Sendable {
    /// The clocks at one instant.
    public var reading: ClockReading
    /// `[clock] hold_unsynchronized`: how long an unsynchronised reading of this boot is held back. Zero: never.
    public var hold: Duration

    public init(reading: ClockReading, hold: Duration) {
        self.reading = reading
        self.hold = hold
    }
}

/// What the buffer did when it learnt that the clock is synchronised.
public struct ClockCorrection: Hashable, Sendable, Codable {
    /// Readings of this boot whose time was repaired (flag `clock_corrected` instead of `clock_unsynchronized`).
    public var corrected: Int
    /// Of those, readings moved forward by a millisecond or more because their repaired time was already taken by another
    /// reading of the same sensor.
    public var shifted: Int
    /// realtime − boottime at synchronisation (microseconds): the true wall-clock time of the boot.
    public var bootEpochMicroseconds: Int64

    public init(corrected: Int, shifted: Int, bootEpochMicroseconds: Int64) {
        self.corrected = corrected
        self.shifted = shifted
        self.bootEpochMicroseconds = bootEpochMicroseconds
    }
}

/// What the buffer knows about the clock of the boot it runs in. Lives in ``BufferStore`` (its thread only).
struct BufferClockState {
    /// The current boot's key in `boots`, once ``BufferStore/observeClock(_:)`` was called.
    var bootID: String?
    var bootKey: Int64?
    /// CLOCK_BOOTTIME at the last observation (microseconds).
    var boottimeNow: Int64 = 0
    var holdMicroseconds: Int64 = 0
    /// realtime − boottime once the clock was seen synchronised in this boot: readings of this boot committed afterwards
    /// (taken just before, still in the memory queue) are corrected as they are stored.
    var bootEpoch: Int64?
    /// Whether uncorrected readings of this boot may be stored; cleared when a count finds none, so that a site whose clock
    /// is synchronised never pays for the held-reading queries.
    var mayHold = false
    /// A repair of this boot's readings is under way (``BufferStore/repairClockStep()``): the readings it has not reached
    /// yet are all held, whatever their age, so that none goes out with its old time between two steps.
    var repairing = false
    /// Known boot keys by boot id.
    var bootKeys: [String: Int64] = [:]
    /// Prepared on first use: the uploader's queries that skip held readings.
    var oldestUnheld: SQLiteStatement?
    var newestUnheld: SQLiteStatement?
    var oldestUnheldTimestamp: SQLiteStatement?
    var countHeld: SQLiteStatement?
    /// During a repair: the held readings as last counted, less what the steps since corrected, and when they were counted
    /// (see ``BufferStore/heldCount()``).
    var heldInRepair: (count: Int, countedAt: ContinuousClock.Instant)?
}

/// What a reading taken while the clock was not synchronised keeps, so that its time can be repaired: its boot, and how
/// far the wall clock was ahead of CLOCK_BOOTTIME when it was taken (its boot time is then `timestamp − offset`).
struct RepairStamp: Hashable {
    /// The boot's key in `boots`.
    var boot: Int64
    /// realtime − boottime (microseconds), as the run's first reading had it: the sampler stamps the boot time of the
    /// millisecond it stamps (``WallClock/stamp()``), so this is the clocks' offset to the microsecond, the same for
    /// every reading of a clock that is not stepped (within the microseconds between reading the two clocks).
    var offset: Int64

    init(boot: Int64, timestamp: Int64, boottime: Int64) {
        self.init(boot: boot, offset: timestamp &- boottime)
    }

    init(boot: Int64, offset: Int64) {
        self.boot = boot
        self.offset = offset
    }

    /// Two stamps this close (offsets within a millisecond) share a run: a clock slewed while unsynchronised drifts by
    /// microseconds a second, and a run then ends once its offset is a millisecond off. A repair is within that of what a
    /// boot time per reading gives, well inside what it is sure of (NTP's offset is known to a few milliseconds, a read
    /// takes hundreds); for a clock that is not slewed it is the same to the millisecond.
    func joins(_ run: RepairStamp) -> Bool {
        boot == run.boot && (offset &- run.offset).magnitude <= 1_000
    }
}

/// The readings one group commit stored, as runs of consecutive sequences with one stamp (or none: taken with the clock
/// set, or already corrected), for ``BufferStore/recordClockStamps(_:)``.
struct ClockStampRuns {
    struct Run {
        var first: Int64
        var last: Int64
        var stamp: RepairStamp?
    }

    private(set) var runs: [Run] = []

    /// A reading stored with `sequence` (ascending, one commit; a duplicate takes no sequence, so they follow each other):
    /// it extends the last run when its stamp joins that run's, or both have none.
    mutating func append(sequence: Int64, _ stamp: RepairStamp?) {
        if let last = runs.last, last.last &+ 1 == sequence {
            switch (stamp, last.stamp) {
            case (nil, nil):
                runs[runs.count - 1].last = sequence
                return
            case (let new?, let old?) where new.joins(old):
                runs[runs.count - 1].last = sequence
                return
            default:
                break
            }
        }
        runs.append(Run(first: sequence, last: sequence, stamp: stamp))
    }
}

/// A row of `clock_stamps`: readings `first...last` (those that exist) carry `stamp`.
struct StoredClockRun {
    var first: Int64
    var last: Int64
    var stamp: RepairStamp
}

/// Where a sample goes in the `readings` table, after the clock's view of it.
struct ClockPlacement {
    var timestamp: Int64
    var quality: Int64
    /// Set for a reading whose time may still be repaired (uncorrected, of this boot or of a boot not known yet).
    var stamp: RepairStamp?
    /// A reading with a boot stamp (still uncorrected, or corrected as it was stored) is a distinct measurement: when its
    /// timestamp is taken by another reading of the sensor it moves to the next free millisecond rather than be dropped as
    /// a duplicate.
    var distinct: Bool
    /// Uncorrected and of the current boot: may be held.
    var holdable: Bool
}

/// What is held: readings of boot `key` with a boot time after `cutoff`, or stamped before `plausible`.
struct HoldFilter {
    let key: Int64
    let cutoff: Int64
    let plausible: Int64

    /// 2000-01-01T00:00:00Z: the ingest refuses anything older for good, whatever its flags. A box that booted at 1970 (no
    /// RTC, no fake-hwclock) stamps its readings there: they are held as long as their boot lasts, since only a correction
    /// can make them acceptable.
    static let plausibleSince: Int64 = 946_684_800_000_000

    var bindings: [SQLiteValue] { [.integer(key), .integer(cutoff), .integer(plausible)] }
}

extension BufferStore {
    /// The uploader's hold filter; nil when nothing can be held (hold 0, clock synchronised, nothing of this boot stored).
    var holdFilter: HoldFilter? {
        guard let key = clock.bootKey else { return nil }
        // During a repair every reading of this boot still stamped is held: boottime > Int64.min holds for all of them.
        if clock.repairing { return HoldFilter(key: key, cutoff: .min, plausible: HoldFilter.plausibleSince) }
        guard clock.holdMicroseconds > 0, clock.bootEpoch == nil, clock.mayHold else { return nil }
        return HoldFilter(key: key, cutoff: clock.boottimeNow &- clock.holdMicroseconds, plausible: HoldFilter.plausibleSince)
    }

    /// The keys of `ids` in `boots`, inserting the unknown ones in a transaction of their own (before the commit that uses
    /// them, so that a rolled-back commit never leaves a cached key without its row).
    func resolveBoots(_ ids: Set<String>) throws -> [String: Int64] {
        let unknown = ids.subtracting(clock.bootKeys.keys)
        if !unknown.isEmpty {
            let now = Timestamp.now().microseconds
            var found: [String: Int64] = [:]
            try write {
                for id in unknown.sorted() {
                    try connection.query("INSERT OR IGNORE INTO boots(boot_id, first_seen) VALUES (?, ?)", [.text(id), .integer(now)])
                    if let key = try connection.queryInt("SELECT key FROM boots WHERE boot_id = ?", [.text(id)]) {
                        found[id] = key
                    }
                }
            }
            clock.bootKeys.merge(found) { _, new in new }
        }
        return clock.bootKeys.filter { ids.contains($0.key) }
    }

    /// How a sample with `timestamp`, `quality` and `boot` is stored.
    func placement(timestamp: Int64, quality: QualityFlags, boot: BootStamp?, bootKeys: [String: Int64]) -> ClockPlacement {
        guard let boot, let key = bootKeys[boot.bootID] else {
            // During a repair a reading not reached yet still has its old time, which a new reading may now have: the new
            // one moves to the next free millisecond rather than be dropped as a duplicate of it.
            return ClockPlacement(
                timestamp: timestamp, quality: Int64(quality.rawValue), stamp: nil, distinct: clock.repairing, holdable: false)
        }
        if key == clock.bootKey, let epoch = clock.bootEpoch {
            var corrected = quality
            corrected.remove(.clockUnsynchronized)
            corrected.insert(.clockCorrected)
            return ClockPlacement(
                timestamp: Self.wholeMilliseconds(boot.boottime &+ epoch), quality: Int64(corrected.rawValue), stamp: nil,
                distinct: true, holdable: false)
        }
        // A reading of an earlier boot can never be repaired nor held: it keeps no stamp.
        let repairable = clock.bootKey == nil || key == clock.bootKey
        return ClockPlacement(
            timestamp: timestamp, quality: Int64(quality.rawValue),
            stamp: repairable ? RepairStamp(boot: key, timestamp: timestamp, boottime: boot.boottime) : nil, distinct: true,
            holdable: key == clock.bootKey)
    }

    static func wholeMilliseconds(_ microseconds: Int64) -> Int64 {
        WallClock.wholeMilliseconds(microseconds).microseconds
    }

    /// Takes in what the clock says now. The first time it says synchronised in this boot (and again after it lost and
    /// regained synchronisation), the repair of every uncorrected reading of this boot that has not been sent yet starts:
    /// readings committed from now on are corrected as they are stored, those already stored are held until
    /// ``repairClockStep()`` reached them (the caller runs the steps, each its own job on the buffer's thread).
    ///
    /// - Returns: true when a repair started.
    func observeClock(_ observation: ClockObservation) throws -> Bool {
        let reading = observation.reading
        if clock.bootID != reading.bootID {
            let key = try resolveBoots([reading.bootID])[reading.bootID]
            clock.bootID = reading.bootID
            clock.bootKey = key
            clock.bootEpoch = nil
            clock.repairing = false
            clock.mayHold = true
            // The stamps of earlier boots are forgotten, and those boots with them: nothing repairs or holds a reading of
            // an earlier boot (its boot time counts from another start), so it goes up flagged as it is.
            if let key {
                if try connection.queryInt("SELECT count(*) FROM boots WHERE key != ?1", [.integer(key)]) ?? 0 > 0 {
                    try write {
                        try connection.query("DELETE FROM clock_stamps WHERE boot != ?1", [.integer(key)])
                        try connection.query("DELETE FROM boots WHERE key != ?1", [.integer(key)])
                    }
                }
                clock.bootKeys = clock.bootKeys.filter { $0.value == key }
            }
        }
        clock.holdMicroseconds = max(0, observation.hold.wholeMicroseconds)
        clock.boottimeNow = reading.boottime
        guard reading.synchronized else {
            if clock.bootEpoch != nil {
                clock.bootEpoch = nil
                clock.repairing = false
                clock.mayHold = true
            }
            return false
        }
        // A repair that a failed step or a stop interrupted goes on (with the epoch it started with).
        if clock.repairing { return true }
        guard clock.bootEpoch == nil, clock.bootKey != nil else { return false }
        clock.bootEpoch = reading.bootEpochMicroseconds
        clock.repairing = true
        clock.heldInRepair = nil
        clock.mayHold = false
        return true
    }

    /// The most readings one step of a clock repair corrects: one transaction of a few hundred milliseconds on a Raspberry
    /// Pi's SD card, so that group commits, the uploader and the watchdog's heartbeat go on between steps however long the
    /// boot ran unsynchronised (a week of 50 sensors at 1 Hz is 30 million readings; one transaction over them outlasted
    /// the watchdog, and the restart rolled it back).
    static let clockRepairStep = 5_000

    /// Corrects the next ``clockRepairStep`` readings of the repair under way (see ``observeClock(_:)``), in one transaction:
    /// each gets the time `boot time + epoch` (whole milliseconds; its boot time is its timestamp less its run's offset,
    /// see ``RepairStamp``), the flag `clock_corrected` instead of `clock_unsynchronized`, and leaves its run in
    /// `clock_stamps`.
    ///
    /// The UNIQUE (timestamp, sensor) index: the step's readings are first parked at distinct negative timestamps, so that
    /// they never collide with each other's old, wrong times; then, in boot-time order, each takes its repaired time, or the
    /// next free millisecond of its sensor when another reading already has that time. Each is a distinct measurement (its
    /// own boot time), so none is dropped as a duplicate; a millisecond is far below what the repair itself is sure of (a
    /// read takes 300–900 ms, NTP's offset is known to a few ms), and the ingest keys readings by sequence, not by time.
    /// The search ends: a sensor has fewer readings than the buffer holds.
    ///
    /// A process that dies between steps keeps what the finished steps corrected; a restart in the same boot finds the
    /// rest still stamped and repairs it with the same epoch (the clock says the same boot started at the same time).
    ///
    /// - Returns: what this step corrected, and whether the repair is finished (then nothing of this boot is held for it).
    func repairClockStep() throws -> (step: ClockCorrection, finished: Bool) {
        guard clock.repairing, let key = clock.bootKey, let epoch = clock.bootEpoch else {
            return (ClockCorrection(corrected: 0, shifted: 0, bootEpochMicroseconds: clock.bootEpoch ?? 0), true)
        }
        // The step's readings, run after run in sequence order; what each run keeps once the step is done (nil: nothing).
        var rows: [(sequence: Int64, boottime: Int64)] = []
        var runsLeft: [(first: Int64, rest: (first: Int64, last: Int64)?)] = []
        var full = false
        let select = try connection.prepare("SELECT sequence, timestamp FROM readings WHERE sequence BETWEEN ?1 AND ?2 ORDER BY sequence LIMIT ?3")
        for run in try clockRuns("boot = ?1", [.integer(key)]) {
            let (first, last, offset) = (run.first, run.last, run.stamp.offset)
            if full { break }
            let room = Self.clockRepairStep - rows.count
            try select.bind([.integer(first), .integer(last), .integer(Int64(room))])
            var taken = 0
            var lastTaken = first
            while try select.step() {
                rows.append((select.int64(0), select.int64(1) &- offset))
                lastTaken = select.int64(0)
                taken += 1
            }
            select.reset()
            if taken == room {
                full = true
                runsLeft.append((first, lastTaken < last ? (lastTaken + 1, last) : nil))
            } else {
                runsLeft.append((first, nil))
            }
        }
        rows.sort { $0.boottime != $1.boottime ? $0.boottime < $1.boottime : $0.sequence < $1.sequence }
        let step = try write {
            let park = try connection.prepare("UPDATE OR IGNORE readings SET timestamp = -sequence WHERE sequence = ?")
            for row in rows { try park.run([.integer(row.sequence)]) }
            let update = try connection.prepare(
                "UPDATE OR IGNORE readings SET timestamp = ?2, quality = (quality & ~?3) | ?4 WHERE sequence = ?1")
            let limit = pendingCount + 2
            var corrected = 0
            var shifted = 0
            for row in rows {
                var timestamp = Self.wholeMilliseconds(row.boottime &+ epoch)
                var attempts = 0
                while true {
                    try update.run([
                        .integer(row.sequence), .integer(timestamp), .integer(Int64(QualityFlags.clockUnsynchronized.rawValue)),
                        .integer(Int64(QualityFlags.clockCorrected.rawValue)),
                    ])
                    if connection.changes == 1 { break }
                    attempts += 1
                    guard attempts <= limit else {
                        throw BufferError("cannot find a free timestamp for reading \(row.sequence) while correcting the clock")
                    }
                    timestamp &+= 1000
                }
                corrected += 1
                if attempts > 0 { shifted += 1 }
            }
            let delete = try connection.prepare("DELETE FROM clock_stamps WHERE first = ?")
            let move = try connection.prepare("UPDATE clock_stamps SET first = ?2, last = ?3 WHERE first = ?1")
            for run in runsLeft {
                if let rest = run.rest {
                    try move.run([.integer(run.first), .integer(rest.first), .integer(rest.last)])
                } else {
                    try delete.run([.integer(run.first)])
                }
            }
            return ClockCorrection(corrected: corrected, shifted: shifted, bootEpochMicroseconds: epoch)
        }
        let finished = !full
        if finished {
            clock.repairing = false
            clock.heldInRepair = nil
        } else if let counted = clock.heldInRepair {
            clock.heldInRepair = (max(0, counted.count - step.corrected), counted.countedAt)
        }
        return (step, finished)
    }

    /// `clock_stamps.last` of the open run: the newest run, which the readings committed after it join as long as they
    /// carry a joining stamp, so that a site whose clock stays unsynchronised writes nothing for them at its commits.
    static let openRunEnd = Int64.max

    /// Records the runs of a group commit's stamped readings, in the commit's transaction. Readings that join the open
    /// run (see ``openRunEnd``) write nothing; any other reading closes it (its last reading is then the one before),
    /// and the commit's last run, when stamped, is left open.
    func recordClockStamps(_ stamps: ClockStampRuns) throws {
        var runs = stamps.runs[...]
        guard let head = runs.first else { return }
        if let open = try openClockRun() {
            if let stamp = head.stamp, stamp.joins(open.stamp) {
                runs.removeFirst()
                guard !runs.isEmpty else { return }
                try closeOpenClockRun(open, at: head.last)
            } else {
                try closeOpenClockRun(open, at: head.first &- 1)
            }
        }
        let tail = runs.last?.first
        for run in runs {
            guard let stamp = run.stamp else { continue }
            try connection.query(
                "INSERT INTO clock_stamps(first, last, boot, clock_offset) VALUES (?, ?, ?, ?)",
                [.integer(run.first), .integer(run.first == tail ? Self.openRunEnd : run.last), .integer(stamp.boot), .integer(stamp.offset)])
        }
    }

    /// The open run, if there is one.
    func openClockRun() throws -> StoredClockRun? {
        try clockRuns("last = ?1", [.integer(Self.openRunEnd)]).first
    }

    /// The rows of `clock_stamps` that meet `condition`, in the order of their first reading.
    func clockRuns(_ condition: String, _ bindings: [SQLiteValue]) throws -> [StoredClockRun] {
        try connection.query("SELECT first, last, boot, clock_offset FROM clock_stamps WHERE \(condition) ORDER BY first", bindings)
            .compactMap { row in
                guard row.count == 4, let first = row[0].int64, let last = row[1].int64, let boot = row[2].int64,
                    let offset = row[3].int64
                else { return nil }
                return StoredClockRun(first: first, last: last, stamp: RepairStamp(boot: boot, offset: offset))
            }
    }

    /// Ends the open run at `last` (deletes it when that is before its first reading).
    func closeOpenClockRun(_ open: StoredClockRun, at last: Int64) throws {
        if last < open.first {
            try connection.query("DELETE FROM clock_stamps WHERE first = ?", [.integer(open.first)])
        } else {
            try connection.query("UPDATE clock_stamps SET last = ?2 WHERE first = ?1", [.integer(open.first), .integer(last)])
        }
    }

    /// Ends the open run at the last sequence assigned, before readings are moved above it (``renumber(_:above:)``).
    func closeOpenClockRun() throws {
        if let open = try openClockRun() { try closeOpenClockRun(open, at: lastSequence) }
    }

    /// How often a repair counts its held readings again; between two counts each step takes off what it corrected.
    static let heldRecountInterval: Duration = .seconds(30)

    /// How many readings are held now (0 when nothing can be; then no query runs).
    ///
    /// During a repair every stamped reading of the boot is held, millions after a week without a clock, and the count
    /// walks all of them: the uploader asks at every poll, and counting at each would take most of the buffer's thread
    /// from the repair's steps. So a repair counts once per ``heldRecountInterval`` and takes each step's corrections off
    /// the count in between (readings deleted meanwhile, by an acknowledgement or the quota, are caught at the next count).
    func heldCount() throws -> Int {
        guard let hold = holdFilter else {
            clock.heldInRepair = nil
            return 0
        }
        if clock.repairing, let counted = clock.heldInRepair, ContinuousClock.now - counted.countedAt < Self.heldRecountInterval {
            return counted.count
        }
        // Run by run, through the time index: a held reading of a run is one taken after the cutoff (its timestamp after
        // cutoff + offset) or stamped before 2000, so the count reads the index entries of the recent readings (the last
        // `hold_unsynchronized` of them), not every stamped reading: the uploader asks before each batch, and a day
        // without a clock is millions of them.
        let statement = try clock.countHeld ?? connection.prepare(
            """
            SELECT (SELECT count(*) FROM readings INDEXED BY readings_timestamp_sensor
                    WHERE timestamp > ?1 AND sequence BETWEEN ?3 AND ?4)
                + (SELECT count(*) FROM readings INDEXED BY readings_timestamp_sensor
                    WHERE timestamp < ?2 AND timestamp <= ?1 AND sequence BETWEEN ?3 AND ?4)
            """)
        clock.countHeld = statement
        var count = 0
        for run in try clockRuns("boot = ?1", [.integer(hold.key)]) {
            let (sum, overflow) = hold.cutoff.addingReportingOverflow(run.stamp.offset)
            let after = overflow ? (run.stamp.offset < 0 ? Int64.min : Int64.max) : sum
            try statement.bind([.integer(after), .integer(hold.plausible), .integer(run.first), .integer(run.last)])
            defer { statement.reset() }
            if try statement.step() { count += Int(statement.int64(0)) }
        }
        clock.heldInRepair = clock.repairing ? (count, ContinuousClock.now) : nil
        if count == 0, clock.bootEpoch == nil {
            // Nothing of this boot is waiting: stop asking until a commit stores an uncorrected reading of this boot again.
            // Closed runs whose readings are all gone (acknowledged, dropped by the quota) go with it: best effort, a full
            // disk must not fail the statistics the uploader polls (they are left for the next time).
            let stamped = try connection.queryInt(
                """
                SELECT count(*) FROM clock_stamps s
                WHERE s.boot = ?1 AND EXISTS (SELECT 1 FROM readings WHERE sequence BETWEEN s.first AND s.last)
                """, [.integer(hold.key)])
            if stamped == 0 {
                clock.mayHold = false
                let closed = "FROM clock_stamps WHERE boot = ?1 AND last != ?2"
                let bindings: [SQLiteValue] = [.integer(hold.key), .integer(Self.openRunEnd)]
                if try connection.queryInt("SELECT count(*) \(closed)", bindings) ?? 0 > 0 {
                    _ = try? write { try connection.query("DELETE \(closed)", bindings) }
                }
            }
        }
        return count
    }

    /// The condition on a row of `readings` that it is not held (``HoldFilter``), with the filter's bindings at these
    /// parameter numbers: not in a run of the boot, or in one and taken (`timestamp − offset`) before the cutoff and
    /// stamped after 2000. The run of a reading is the one that starts last at or before it (two lookups in a small
    /// table, by its primary key).
    static func unheld(key: Int, cutoff: Int, plausible: Int) -> String {
        """
        NOT EXISTS (SELECT 1 FROM clock_stamps s
            WHERE s.first = (SELECT max(first) FROM clock_stamps WHERE first <= readings.sequence)
                AND s.last >= readings.sequence AND s.boot = ?\(key)
                AND (readings.timestamp - s.clock_offset > ?\(cutoff) OR readings.timestamp < ?\(plausible)))
        """
    }

    /// The statement that reads a batch from `end` of the backlog, skipping held readings; binds the limit, then the filter,
    /// then the bounds of the sequences left out (see ``pending(limit:from:excluding:)``).
    func unheldSelect(_ end: BacklogEnd) throws -> SQLiteStatement {
        let filter = "WHERE sequence NOT BETWEEN ?5 AND ?6 AND \(Self.unheld(key: 2, cutoff: 3, plausible: 4))"
        switch end {
        case .oldest:
            let statement = try clock.oldestUnheld ?? connection.prepare(
                "SELECT sequence, sensor, timestamp, steps, quality FROM readings \(filter) ORDER BY sequence LIMIT ?1")
            clock.oldestUnheld = statement
            return statement
        case .newest:
            let statement = try clock.newestUnheld ?? connection.prepare(
                "SELECT sequence, sensor, timestamp, steps, quality FROM readings \(filter) ORDER BY sequence DESC LIMIT ?1")
            clock.newestUnheld = statement
            return statement
        }
    }

    /// Makes the content of readings about to be sent final, just before their request leaves (the uploader calls it once
    /// the connection to the ingest is up, see ``PendingReadings/freezeForSending(_:)``): they leave their runs in
    /// `clock_stamps`, so that no later clock repair changes them. The ingest may from then on hold them (a request whose
    /// answer is lost), and a re-sent reading that differs from the stored one is a `sequence_conflict`, not a duplicate.
    /// A reading whose request never left the box (no network, no DNS) keeps its stamp and is repaired once the clock is
    /// set.
    ///
    /// What is written is the runs, not the readings: usually one row shortened, whatever the request's size.
    ///
    /// - Parameter sequences: the readings of the request sent flagged `clock_unsynchronized` (only those can change).
    /// - Returns: false when one of them was repaired since the uploader read it: the request carries an old time and must
    ///   not go; the uploader reads the readings again. A reading no longer pending (acknowledged meanwhile) changes nothing.
    func freezeForSending(_ sequences: [UInt64]) throws -> Bool {
        let wanted = Set(sequences.compactMap { Int64(exactly: $0) }).sorted()
        guard let low = wanted.first, let high = wanted.last else { return true }
        let select = try connection.prepare("SELECT quality FROM readings WHERE sequence = ?")
        var flagged: [Int64] = []
        for sequence in wanted {
            try select.bind([.integer(sequence)])
            defer { select.reset() }
            guard try select.step() else { continue }
            let quality = QualityFlags(rawValue: UInt16(truncatingIfNeeded: select.int64(0)))
            guard quality.contains(.clockUnsynchronized) else { return false }
            flagged.append(sequence)
        }
        guard !flagged.isEmpty else { return true }
        // The runs that may hold them: from the one that starts last at or before the lowest.
        let runs = try clockRuns(
            "first >= coalesce((SELECT max(first) FROM clock_stamps WHERE first <= ?1), ?1) AND first <= ?2",
            [.integer(low), .integer(high)])
        let exists = try connection.prepare("SELECT 1 FROM readings WHERE sequence BETWEEN ?1 AND ?2 LIMIT 1")
        func holdsAReading(_ first: Int64, _ last: Int64) throws -> Bool {
            try exists.bind([.integer(first), .integer(last)])
            defer { exists.reset() }
            return try exists.step()
        }
        var changes: [(first: Int64, stamp: RepairStamp, pieces: [(first: Int64, last: Int64)])] = []
        for run in runs {
            let (first, last) = (run.first, run.last)
            // Only runs of the current boot can still be repaired (an earlier boot's are forgotten when the boot is seen).
            guard clock.bootKey == nil || run.stamp.boot == clock.bootKey else { continue }
            let inside = flagged.filter { $0 >= first && $0 <= last }
            guard !inside.isEmpty else { continue }
            // The clock is known and the repair has not reached them yet: they must not go with their old time.
            if clock.bootEpoch != nil { return false }
            // What is left of the run: the stretches between the readings sent that still hold a reading.
            // The open run keeps its open end, readings or not: the next commits join it.
            var pieces: [(first: Int64, last: Int64)] = []
            var start = first
            for sequence in inside {
                if sequence > start, try holdsAReading(start, sequence - 1) { pieces.append((start, sequence - 1)) }
                start = sequence &+ 1
            }
            if last == Self.openRunEnd {
                pieces.append((start, last))
            } else if start <= last, try holdsAReading(start, last) {
                pieces.append((start, last))
            }
            changes.append((first, run.stamp, pieces))
        }
        guard !changes.isEmpty else { return true }
        // On a full disk this write would hold the very upload whose acknowledgement makes room (seen by a tester: no
        // batch left for 30 s after an outage that filled the disk): it may use the reserve, as deletes do.
        _ = try makingRoomOnFullDisk("the readings about to be sent can be made final and sent") {
            try write {
                let delete = try connection.prepare("DELETE FROM clock_stamps WHERE first = ?")
                let insert = try connection.prepare("INSERT INTO clock_stamps(first, last, boot, clock_offset) VALUES (?, ?, ?, ?)")
                for change in changes {
                    try delete.run([.integer(change.first)])
                    for piece in change.pieces {
                        try insert.run([
                            .integer(piece.first), .integer(piece.last), .integer(change.stamp.boot), .integer(change.stamp.offset),
                        ])
                    }
                }
            }
        }
        return true
    }

    /// The timestamp of the oldest reading that is not held.
    func oldestUnheldTimestamp(_ hold: HoldFilter) throws -> Timestamp? {
        let statement = try clock.oldestUnheldTimestamp ?? connection.prepare(
            "SELECT timestamp FROM readings WHERE \(Self.unheld(key: 1, cutoff: 2, plausible: 3)) ORDER BY sequence LIMIT 1")
        clock.oldestUnheldTimestamp = statement
        try statement.bind(hold.bindings)
        defer { statement.reset() }
        return try statement.step() ? Timestamp(microseconds: statement.int64(0)) : nil
    }
}
