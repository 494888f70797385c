import FarmgateWire

/// A reading before the buffer has committed it and given it a sequence number.
public struct Sample: Hashable, Sendable {
    public var sensor: SensorID
    public var timestamp: Timestamp
    public var value: Double
    public var quality: QualityFlags
    /// Set for a sample taken while the clock was not synchronised: what repairs its timestamp once it is (stored in the
    /// buffer only for such samples).
    public var boot: BootStamp?

    public init(sensor: SensorID, timestamp: Timestamp, value: Double, quality: QualityFlags = [], boot: BootStamp? = nil) {
        self.sensor = sensor
        self.timestamp = timestamp
        self.value = value
        self.quality = quality
        self.boot = boot
    }
}

/// What the buffer does when committing would take it past its disk quota.
public enum BufferFullPolicy: String, Sendable, Codable, CaseIterable {
    /// Delete the oldest unsent readings to make room (default: recent data matters most for a farm).
    case dropOldest = "drop_oldest"
    /// Keep the backlog and discard the incoming readings.
    case dropNewest = "drop_newest"
}

/// How the site buffer behaves. Every default is the one documented in the README.
public struct BufferConfiguration: Sendable, Hashable {
    /// The SQLite file. Default `/var/lib/farmgate/buffer.sqlite`.
    public var path: String
    /// Readings are committed together at most this often (group commit); a power loss loses at most this much. Default 1 s.
    public var commitInterval: Duration
    /// The most disk the buffer may use, in bytes. Default 512 MiB.
    public var quotaBytes: Int64
    /// What happens at the quota. Default ``BufferFullPolicy/dropOldest``.
    public var whenFull: BufferFullPolicy

    public init(
        path: String = "/var/lib/farmgate/buffer.sqlite",
        commitInterval: Duration = .seconds(1),
        quotaBytes: Int64 = 512 << 20,
        whenFull: BufferFullPolicy = .dropOldest
    ) {
        self.path = path
        self.commitInterval = commitInterval
        self.quotaBytes = quotaBytes
        self.whenFull = whenFull
    }
}

/// Which end of the backlog to take a batch from.
public enum BacklogEnd: Sendable {
    /// Lowest sequence numbers first: draining the backlog.
    case oldest
    /// Highest sequence numbers first: fresh readings after an outage.
    case newest
}

/// A reading the ingest refused for good, kept aside where an installer can see it.
public struct QuarantinedReading: Hashable, Sendable, Codable {
    public var sequence: UInt64
    public var sensor: String
    public var timestamp: Timestamp
    public var value: Double
    public var reason: String
    public var quarantinedAt: Timestamp

    public init(sequence: UInt64, sensor: String, timestamp: Timestamp, value: Double, reason: String, quarantinedAt: Timestamp) {
        self.sequence = sequence
        self.sensor = sensor
        self.timestamp = timestamp
        self.value = value
        self.reason = reason
        self.quarantinedAt = quarantinedAt
    }
}

/// The buffer's state, for `farmgate status` and metrics.
public struct BufferStatistics: Hashable, Sendable, Codable {
    /// Committed readings not yet acknowledged by the ingest that the uploader may send now (``held`` ones excluded).
    public var pending: Int
    /// Readings of this boot taken before the clock was synchronised, held back for `[clock] hold_unsynchronized` in the
    /// hope that the clock is set and their times repaired first. Not in ``pending``.
    public var held: Int
    /// The timestamp of the oldest pending reading.
    public var oldestPending: Timestamp?
    /// Readings waiting in memory for the next group commit.
    public var uncommitted: Int
    /// Readings in quarantine.
    public var quarantined: Int
    /// Readings discarded because the buffer was full, since the buffer file was created.
    public var dropped: Int64
    /// Samples not stored because the same sensor and timestamp was already buffered, since the file was created.
    public var duplicatesIgnored: Int64
    /// The last sequence number assigned.
    public var lastSequence: UInt64
    /// Bytes the buffer uses now (pages in use), and its quota.
    public var usedBytes: Int64
    public var quotaBytes: Int64

    public init(
        pending: Int, oldestPending: Timestamp?, uncommitted: Int, quarantined: Int, dropped: Int64, duplicatesIgnored: Int64,
        lastSequence: UInt64, usedBytes: Int64, quotaBytes: Int64, held: Int = 0
    ) {
        self.pending = pending
        self.held = held
        self.oldestPending = oldestPending
        self.uncommitted = uncommitted
        self.quarantined = quarantined
        self.dropped = dropped
        self.duplicatesIgnored = duplicatesIgnored
        self.lastSequence = lastSequence
        self.usedBytes = usedBytes
        self.quotaBytes = quotaBytes
    }
}

/// A pending reading that got a new sequence number (``PendingReadings/renumber(_:above:)``).
public struct SequenceRenumbering: Hashable, Sendable {
    public var old: UInt64
    public var new: UInt64

    public init(old: UInt64, new: UInt64) {
        self.old = old
        self.new = new
    }
}

/// What the uploader needs from the site buffer. ``ReadingBuffer`` is the implementation.
public protocol PendingReadings: Sendable {
    /// Up to `limit` committed, unacknowledged readings from one end of the backlog, in ascending sequence order (never
    /// held ones, see ``BufferStatistics/held``).
    func pending(limit: Int, from end: BacklogEnd) async throws -> [Reading]
    /// The descriptors of `sensors`, as registered with the buffer (they travel with every batch).
    func descriptors(for sensors: Set<SensorID>) async throws -> [SensorDescriptor]
    /// Deletes readings the ingest has durably stored (accepted or duplicate).
    func acknowledge(_ sequences: [UInt64]) async throws
    /// Raises the sequence counter so that the next reading is numbered above `sequence`; returns the previous last
    /// sequence, or nil when it was already at or above. Pending readings keep their numbers.
    @discardableResult func advanceSequence(past sequence: UInt64) async throws -> UInt64?
    /// Renumbers pending readings above max(`floor`, the last sequence), keeping their content, atomically with the counter.
    func renumber(_ sequences: [UInt64], above floor: UInt64) async throws -> [SequenceRenumbering]
    /// Moves readings the ingest refused for good out of the queue into quarantine, with the reason for each.
    func quarantine(_ reasons: [UInt64: String]) async throws
    /// Counts and ages, for deciding when to cut a batch and for status.
    func statistics() async throws -> BufferStatistics
    /// Commits what is queued now; returns the highest durable sequence. Used before the uploader's final flush.
    @discardableResult func flush() async throws -> UInt64
}
