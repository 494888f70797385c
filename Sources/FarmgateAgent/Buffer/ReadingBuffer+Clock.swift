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
    /// Known boot keys by boot id.
    var bootKeys: [String: Int64] = [:]
    /// Prepared on first use: the uploader's queries that skip held readings.
    var oldestUnheld: SQLiteStatement?
    var newestUnheld: SQLiteStatement?
    var oldestUnheldTimestamp: SQLiteStatement?
    var countHeld: SQLiteStatement?
}

/// Where a sample goes in the `readings` table, after the clock's view of it.
struct ClockPlacement {
    var timestamp: Int64
    var quality: Int64
    var boot: SQLiteValue
    var boottime: SQLiteValue
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
        guard let key = clock.bootKey, clock.holdMicroseconds > 0, clock.bootEpoch == nil, clock.mayHold else { return nil }
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
            return ClockPlacement(
                timestamp: timestamp, quality: Int64(quality.rawValue), boot: .null, boottime: .null, distinct: false, holdable: false)
        }
        if key == clock.bootKey, let epoch = clock.bootEpoch {
            var corrected = quality
            corrected.remove(.clockUnsynchronized)
            corrected.insert(.clockCorrected)
            return ClockPlacement(
                timestamp: Self.wholeMilliseconds(boot.boottime &+ epoch), quality: Int64(corrected.rawValue), boot: .null,
                boottime: .null, distinct: true, holdable: false)
        }
        return ClockPlacement(
            timestamp: timestamp, quality: Int64(quality.rawValue), boot: .integer(key), boottime: .integer(boot.boottime),
            distinct: true, holdable: key == clock.bootKey)
    }

    static func wholeMilliseconds(_ microseconds: Int64) -> Int64 {
        WallClock.wholeMilliseconds(microseconds).microseconds
    }

    /// Takes in what the clock says now. The first time it says synchronised in this boot (and again after it lost and
    /// regained synchronisation), every uncorrected reading of this boot that the uploader has not seen yet gets its true
    /// time, in one transaction.
    func observeClock(_ observation: ClockObservation) throws -> ClockCorrection? {
        let reading = observation.reading
        if clock.bootID != reading.bootID {
            let key = try resolveBoots([reading.bootID])[reading.bootID]
            clock.bootID = reading.bootID
            clock.bootKey = key
            clock.bootEpoch = nil
            clock.mayHold = true
            // Boots no reading refers to any more are forgotten (the index on readings.boot answers this).
            if let key {
                _ = try write {
                    try connection.query(
                        "DELETE FROM boots WHERE key != ?1 AND NOT EXISTS (SELECT 1 FROM readings WHERE readings.boot = boots.key)",
                        [.integer(key)])
                }
                clock.bootKeys = clock.bootKeys.filter { $0.value == key }
            }
        }
        clock.holdMicroseconds = max(0, observation.hold.wholeMicroseconds)
        clock.boottimeNow = reading.boottime
        guard reading.synchronized else {
            if clock.bootEpoch != nil {
                clock.bootEpoch = nil
                clock.mayHold = true
            }
            return nil
        }
        guard clock.bootEpoch == nil, let key = clock.bootKey else { return nil }
        let epoch = reading.bootEpochMicroseconds
        let correction = try correctReadings(boot: key, epoch: epoch)
        clock.bootEpoch = epoch
        clock.mayHold = false
        return correction
    }

    /// Gives every reading of boot `key` the time `boottime + epoch` (whole milliseconds), flags it `clock_corrected` instead
    /// of `clock_unsynchronized`, and clears its boot stamp, in one transaction.
    ///
    /// The UNIQUE (sensor, timestamp) index: the readings being corrected are first parked at distinct negative timestamps,
    /// so that they never collide with each other's old, wrong times; then, in boot-time order, each takes its repaired time,
    /// or the next free millisecond of its sensor when another reading already has that time. Each is a distinct measurement
    /// (its own boot time), so none is dropped as a duplicate; a millisecond is far below what the repair itself is sure of
    /// (a read takes 300–900 ms, NTP's offset is known to a few ms), and the ingest keys readings by sequence, not by time.
    /// The search ends: a sensor has fewer readings than the buffer holds.
    func correctReadings(boot key: Int64, epoch: Int64) throws -> ClockCorrection {
        let rows = try connection.query(
            "SELECT sequence, boottime FROM readings WHERE boot = ? ORDER BY boottime, sequence", [.integer(key)])
        guard !rows.isEmpty else { return ClockCorrection(corrected: 0, shifted: 0, bootEpochMicroseconds: epoch) }
        let limit = pendingCount + 2
        return try write {
            try connection.query("UPDATE OR IGNORE readings SET timestamp = -sequence WHERE boot = ?", [.integer(key)])
            let update = try connection.prepare(
                """
                UPDATE OR IGNORE readings SET timestamp = ?2, quality = (quality & ~?3) | ?4, boot = NULL, boottime = NULL
                WHERE sequence = ?1
                """)
            var corrected = 0
            var shifted = 0
            for row in rows {
                guard row.count == 2, let sequence = row[0].int64, let boottime = row[1].int64 else { continue }
                var timestamp = Self.wholeMilliseconds(boottime &+ epoch)
                var attempts = 0
                while true {
                    try update.run([
                        .integer(sequence), .integer(timestamp), .integer(Int64(QualityFlags.clockUnsynchronized.rawValue)),
                        .integer(Int64(QualityFlags.clockCorrected.rawValue)),
                    ])
                    if connection.changes == 1 { break }
                    attempts += 1
                    guard attempts <= limit else {
                        throw BufferError("cannot find a free timestamp for reading \(sequence) while correcting the clock")
                    }
                    timestamp &+= 1000
                }
                corrected += 1
                if attempts > 0 { shifted += 1 }
            }
            return ClockCorrection(corrected: corrected, shifted: shifted, bootEpochMicroseconds: epoch)
        }
    }

    /// How many readings are held now (0 when nothing can be; then no query runs).
    func heldCount() throws -> Int {
        guard let hold = holdFilter else { return 0 }
        let statement = try clock.countHeld ?? connection.prepare(
            "SELECT count(*) FROM readings WHERE boot = ?1 AND (boottime > ?2 OR timestamp < ?3)")
        clock.countHeld = statement
        try statement.bind(hold.bindings)
        defer { statement.reset() }
        let count = try statement.step() ? Int(statement.int64(0)) : 0
        if count == 0, clock.bootEpoch == nil {
            // Nothing of this boot is waiting: stop asking until a commit stores an uncorrected reading of this boot again.
            if try connection.queryInt("SELECT count(*) FROM readings WHERE boot = ?", [.integer(hold.key)]) == 0 {
                clock.mayHold = false
            }
        }
        return count
    }

    /// The statement that reads a batch from `end` of the backlog, skipping held readings; binds the limit, then the filter.
    func unheldSelect(_ end: BacklogEnd) throws -> SQLiteStatement {
        let filter = "WHERE boot IS NULL OR boot != ?2 OR (boottime <= ?3 AND timestamp >= ?4)"
        switch end {
        case .oldest:
            let statement = try clock.oldestUnheld ?? connection.prepare(
                "SELECT sequence, sensor, timestamp, steps, quality, boot IS NOT NULL FROM readings \(filter) ORDER BY sequence LIMIT ?1")
            clock.oldestUnheld = statement
            return statement
        case .newest:
            let statement = try clock.newestUnheld ?? connection.prepare(
                "SELECT sequence, sensor, timestamp, steps, quality, boot IS NOT NULL FROM readings \(filter) ORDER BY sequence DESC LIMIT ?1")
            clock.newestUnheld = statement
            return statement
        }
    }

    /// Clears the boot stamp of readings handed to the uploader: from then on their content never changes, not even when the
    /// clock is set later in the same boot. The ingest may already hold them (a request whose answer was lost), and a
    /// re-sent reading that differs from the stored one is a `sequence_conflict`, not a duplicate.
    func freeze(_ sequences: [Int64]) throws {
        guard !sequences.isEmpty else { return }
        _ = try write {
            for sequence in sequences {
                try connection.query("UPDATE readings SET boot = NULL, boottime = NULL WHERE sequence = ?", [.integer(sequence)])
            }
        }
    }

    /// The timestamp of the oldest reading that is not held.
    func oldestUnheldTimestamp(_ hold: HoldFilter) throws -> Timestamp? {
        let statement = try clock.oldestUnheldTimestamp ?? connection.prepare(
            "SELECT timestamp FROM readings WHERE boot IS NULL OR boot != ?1 OR (boottime <= ?2 AND timestamp >= ?3) ORDER BY sequence LIMIT 1")
        clock.oldestUnheldTimestamp = statement
        try statement.bind(hold.bindings)
        defer { statement.reset() }
        return try statement.step() ? Timestamp(microseconds: statement.int64(0)) : nil
    }
}
