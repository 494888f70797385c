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
    /// Readings are committed together at most this often (group commit), each commit fsynced; a power cut or `kill -9`
    /// loses at most the readings of the window not yet committed. Default 10 s: every commit rewrites the last pages of
    /// the table and of its index whole, so the window sets what the buffer costs the SD card (50 sensors at 1 Hz, release
    /// agent, /proc write_bytes: 82 bytes per reading with 10 s, 124 with 5 s; see README "SD-card wear"). At the usual
    /// sensor intervals of 10 s or more, a 10 s window holds at most one reading per sensor.
    public var commitInterval: Duration
    /// The most disk the buffer may use, in bytes. Default 512 MiB.
    public var quotaBytes: Int64
    /// What happens at the quota. Default ``BufferFullPolicy/dropOldest``.
    public var whenFull: BufferFullPolicy

    public init(
        path: String = "/var/lib/farmgate/buffer.sqlite",
        commitInterval: Duration = .seconds(10),
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

/// A reading the ingest refused for good, kept aside where an installer can see, requeue or drop it.
public struct QuarantinedReading: Hashable, Sendable, Codable {
    public var sequence: UInt64
    public var sensor: String
    public var timestamp: Timestamp
    /// The value at the sensor's resolution, as stored.
    public var value: Double
    /// The whole reason, `code: message` as the ingest (or the agent) gave it.
    public var reason: String
    public var quarantinedAt: Timestamp
    /// The stable code of the reason (`timestamp_in_future`, `encoding_failed`, ...; `unknown` when the reason has none).
    public var code: String
    /// The reason without its code.
    public var message: String
    public var quality: QualityFlags
    /// The sensor's resolution (`1/100`), nil when the buffer no longer knows the sensor.
    public var resolution: String?

    public init(
        sequence: UInt64, sensor: String, timestamp: Timestamp, value: Double, reason: String, quarantinedAt: Timestamp,
        code: String? = nil, message: String? = nil, quality: QualityFlags = [], resolution: String? = nil
    ) {
        let parsed = code != nil && message != nil ? QuarantineReason(code: code ?? "", message: message ?? "") : QuarantineReason(parsing: reason)
        self.sequence = sequence
        self.sensor = sensor
        self.timestamp = timestamp
        self.value = value
        self.reason = reason
        self.quarantinedAt = quarantinedAt
        self.code = code ?? parsed.code
        self.message = message ?? parsed.message
        self.quality = quality
        self.resolution = resolution
    }
}

/// A quarantine reason split into its stable code and its message.
public struct QuarantineReason: Hashable, Sendable {
    /// The code of a reason that does not start with one.
    public static let unknownCode = "unknown"

    public var code: String
    public var message: String

    public init(code: String, message: String) {
        self.code = code
        self.message = message
    }

    /// Splits `code: message`. The text before the first `": "` is the code when it is 1 to 64 characters of `a-z`, `0-9`
    /// and `_` (the form of every ingest code); otherwise the code is ``unknownCode`` and the message is the whole text.
    /// Buffer migration 3 backfills old rows with the same rule, in SQL.
    public init(parsing reason: String) {
        if let separator = reason.firstRange(of: ": "), Self.isCode(reason[..<separator.lowerBound]) {
            code = String(reason[..<separator.lowerBound])
            message = String(reason[separator.upperBound...])
        } else {
            code = Self.unknownCode
            message = reason
        }
    }

    /// Whether `text` has the form of a reason code: 1 to 64 characters of `a-z`, `0-9` and `_`.
    public static func isCode(_ text: some StringProtocol) -> Bool {
        (1...64).contains(text.utf8.count) && text.utf8.allSatisfy { (0x61...0x7A).contains($0) || (0x30...0x39).contains($0) || $0 == 0x5F }
    }
}

/// Which quarantined readings a requeue or drop applies to. An installer must name one: nothing applies to all by default.
public enum QuarantineSelection: Hashable, Sendable {
    /// Every quarantined reading.
    case all
    /// The readings whose reason has this code.
    case code(String)
    /// The readings with these sequence numbers.
    case sequences([UInt64])
}

/// What a requeue did.
public struct RequeueOutcome: Hashable, Sendable, Codable {
    /// Readings moved back into the queue with their original sequence numbers.
    public var requeued: Int
    /// Readings left in quarantine because a pending reading has the same sensor and timestamp (the buffer holds one
    /// reading per sensor and timestamp). Requeue them again once that reading is delivered, or drop them.
    public var conflicting: [UInt64]
    /// Requested sequence numbers that are not in quarantine.
    public var notFound: [UInt64]
    /// Quarantined calibration events sent again (selections `all` and `code` only); nil when none.
    public var calibrations: Int?

    public init(requeued: Int, conflicting: [UInt64], notFound: [UInt64]) {
        self.requeued = requeued
        self.conflicting = conflicting
        self.notFound = notFound
    }
}

/// What a drop did.
public struct DropOutcome: Hashable, Sendable, Codable {
    /// Readings deleted from quarantine for good.
    public var dropped: Int
    /// Requested sequence numbers that are not in quarantine.
    public var notFound: [UInt64]
    /// Quarantined calibration events deleted (selections `all` and `code` only); nil when none.
    public var calibrations: Int?

    public init(dropped: Int, notFound: [UInt64]) {
        self.dropped = dropped
        self.notFound = notFound
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
    /// Readings in quarantine by the code of their reason.
    public var quarantinedByCode: [String: Int]
    /// Quarantined readings deleted by the quota policy (only once no pending reading was left), since the file was created.
    public var quarantineTrimmed: Int64
    /// Quarantined readings deleted by an installer (`farmgate quarantine drop`), since the file was created.
    public var quarantineDropped: Int64
    /// Readings discarded because the buffer was full, since the buffer file was created.
    public var dropped: Int64
    /// Samples not stored because the same sensor and timestamp was already buffered, since the file was created.
    public var duplicatesIgnored: Int64
    /// The last sequence number assigned.
    public var lastSequence: UInt64
    /// Bytes the buffer uses now (pages in use), and its quota.
    public var usedBytes: Int64
    public var quotaBytes: Int64
    /// Calibration events waiting for the ingest to acknowledge them (nil from a source that does not keep them).
    public var pendingCalibrations: Int?
    /// Calibration events the ingest refused for good, kept aside (nil from a source that does not keep them).
    public var quarantinedCalibrations: Int?
    /// The buffer's failed writes since it was opened; nil while none failed (and from an agent before they were counted).
    public var errors: BufferErrors?

    public init(
        pending: Int, oldestPending: Timestamp?, uncommitted: Int, quarantined: Int, dropped: Int64, duplicatesIgnored: Int64,
        lastSequence: UInt64, usedBytes: Int64, quotaBytes: Int64, quarantinedByCode: [String: Int] = [:],
        quarantineTrimmed: Int64 = 0, quarantineDropped: Int64 = 0, held: Int = 0, pendingCalibrations: Int? = nil,
        quarantinedCalibrations: Int? = nil
    ) {
        self.pendingCalibrations = pendingCalibrations
        self.quarantinedCalibrations = quarantinedCalibrations
        self.quarantinedByCode = quarantinedByCode
        self.quarantineTrimmed = quarantineTrimmed
        self.quarantineDropped = quarantineDropped
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

    /// As synthesised, except that `oldestPending` is always present: `null` when nothing is pending, so that a script
    /// reading `farmgate status --json` finds the key either way. The optional counts stay absent when their source
    /// does not keep them.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(pending, forKey: .pending)
        try container.encode(held, forKey: .held)
        try container.encode(oldestPending, forKey: .oldestPending)
        try container.encode(uncommitted, forKey: .uncommitted)
        try container.encode(quarantined, forKey: .quarantined)
        try container.encode(quarantinedByCode, forKey: .quarantinedByCode)
        try container.encode(quarantineTrimmed, forKey: .quarantineTrimmed)
        try container.encode(quarantineDropped, forKey: .quarantineDropped)
        try container.encode(dropped, forKey: .dropped)
        try container.encode(duplicatesIgnored, forKey: .duplicatesIgnored)
        try container.encode(lastSequence, forKey: .lastSequence)
        try container.encode(usedBytes, forKey: .usedBytes)
        try container.encode(quotaBytes, forKey: .quotaBytes)
        try container.encodeIfPresent(pendingCalibrations, forKey: .pendingCalibrations)
        try container.encodeIfPresent(quarantinedCalibrations, forKey: .quarantinedCalibrations)
        try container.encodeIfPresent(errors, forKey: .errors)
    }
}

/// What the buffer writes, as its failures are counted (a bounded label of `farmgate_agent_buffer_errors_total`).
public enum BufferOperation: String, Hashable, Sendable, Codable, CaseIterable {
    /// The group commit that stores new readings.
    case commit
    /// Recording what the ingest answered: deleting acknowledged readings and calibration events, moving refused ones to
    /// quarantine, renumbering after `sequence_conflict`. While it fails, the same batch goes again after each backoff.
    case acknowledge
}

/// Failed buffer writes since the buffer was opened (at start, or by a reload), and the last one: a read-only remount, a
/// full disk or an I/O error shows here, in `farmgate status` and in the metrics file, not only in the log.
public struct BufferErrors: Hashable, Sendable, Codable {
    /// Failed group commits (the samples stay queued in memory and are committed again).
    public var commit: Int64 = 0
    /// Failed acknowledgements (see ``BufferOperation/acknowledge``).
    public var acknowledge: Int64 = 0
    /// The most recent failure.
    public var last: BufferFailure?

    public init(commit: Int64 = 0, acknowledge: Int64 = 0, last: BufferFailure? = nil) {
        self.commit = commit
        self.acknowledge = acknowledge
        self.last = last
    }

    /// The count of `operation`.
    public func count(_ operation: BufferOperation) -> Int64 {
        switch operation {
        case .commit: commit
        case .acknowledge: acknowledge
        }
    }

    /// Counts a failure of `operation` and makes it the last one.
    mutating func record(_ operation: BufferOperation, message: String, at time: Timestamp) {
        switch operation {
        case .commit: commit += 1
        case .acknowledge: acknowledge += 1
        }
        last = BufferFailure(operation: operation.rawValue, message: message, at: time)
    }
}

/// One failed buffer write: what was being done, the error, and when.
public struct BufferFailure: Hashable, Sendable, Codable {
    /// A ``BufferOperation`` raw value (`commit`, `acknowledge`).
    public var operation: String
    public var message: String
    public var at: Timestamp

    public init(operation: String, message: String, at: Timestamp) {
        self.operation = operation
        self.message = message
        self.at = at
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
    /// held ones, see ``BufferStatistics/held``), leaving out those numbered within `excluded`: the uploader's readings
    /// whose acknowledgement it has yet to delete (see ``Uploader``).
    func pending(limit: Int, from end: BacklogEnd, excluding excluded: ClosedRange<UInt64>?) async throws -> [Reading]
    /// The descriptors of `sensors`, as registered with the buffer (they travel with every batch).
    func descriptors(for sensors: Set<SensorID>) async throws -> [SensorDescriptor]
    /// Every configured sensor (the sensor table of stateful frames, with the sensors of the readings sent). Default:
    /// none, the table is then the sensors of the readings sent.
    func allDescriptors() async throws -> [SensorDescriptor]
    /// Deletes readings the ingest has durably stored (accepted or duplicate).
    func acknowledge(_ sequences: [UInt64]) async throws
    /// Raises the sequence counter so that the next reading is numbered above `sequence`; returns the previous last
    /// sequence, or nil when it was already at or above. Pending readings keep their numbers.
    @discardableResult func advanceSequence(past sequence: UInt64) async throws -> UInt64?
    /// Renumbers pending readings above max(`floor`, the last sequence), keeping their content, atomically with the counter.
    func renumber(_ sequences: [UInt64], above floor: UInt64) async throws -> [SequenceRenumbering]
    /// Called on the HTTP client's thread once the connection is up, just before a request carrying `sequences` (its
    /// readings flagged `clock_unsynchronized`) is sent: makes their content final (a later clock repair leaves them as
    /// they are) and answers whether they are still what ``pending(limit:from:)`` returned (false: one was repaired
    /// meanwhile, the request must not go). Blocks that thread; never called on the concurrency pool. Default: nothing
    /// changes content, true.
    func freezeForSending(_ sequences: [UInt64]) throws -> Bool
    /// Moves readings the ingest refused for good out of the queue into quarantine, with the reason for each.
    func quarantine(_ reasons: [UInt64: String]) async throws
    /// Counts and ages, for deciding when to cut a batch and for status.
    func statistics() async throws -> BufferStatistics
    /// Commits what is queued now; returns the highest durable sequence. Used before the uploader's final flush.
    @discardableResult func flush() async throws -> UInt64
    /// Up to `limit` calibration events not yet acknowledged by the ingest, oldest first.
    func pendingCalibrations(limit: Int) async throws -> [CalibrationEvent]
    /// Deletes calibration events the ingest counted in a receipt (stored or already had).
    func acknowledgeCalibrations(_ ids: [String]) async throws
    /// Keeps calibration events the ingest refused for good aside (never sent again), with the reason for each by id.
    func quarantineCalibrations(_ reasons: [String: String]) async throws
}

extension PendingReadings {
    /// Up to `limit` committed, unacknowledged readings from one end of the backlog, leaving none out.
    public func pending(limit: Int, from end: BacklogEnd) async throws -> [Reading] {
        try await pending(limit: limit, from: end, excluding: nil)
    }
    /// A source that keeps no calibration events (a test's) has none to send.
    public func allDescriptors() async throws -> [SensorDescriptor] { [] }
    public func freezeForSending(_ sequences: [UInt64]) throws -> Bool { true }
    public func pendingCalibrations(limit: Int) async throws -> [CalibrationEvent] { [] }
    public func acknowledgeCalibrations(_ ids: [String]) async throws {}
    public func quarantineCalibrations(_ reasons: [String: String]) async throws {}
}

/// A calibration event the ingest refused for good (``PendingReadings/quarantineCalibrations(_:)``).
public struct QuarantinedCalibration: Hashable, Sendable, Codable {
    public var event: CalibrationEvent
    /// The stable code of the refusal (`malformed_batch`, ...; `unknown` when the reason has none).
    public var code: String
    /// The refusal without its code.
    public var message: String
    public var quarantinedAt: Timestamp

    public init(event: CalibrationEvent, code: String, message: String, quarantinedAt: Timestamp) {
        self.event = event
        self.code = code
        self.message = message
        self.quarantinedAt = quarantinedAt
    }

    enum CodingKeys: String, CodingKey {
        case event, code, message
        case quarantinedAt = "quarantined_at"
    }
}

/// A sensor configured with another quantity than the readings of it the buffer still holds (a pH probe's id reused
/// for a temperature sensor before its backlog was sent). Registering it would send those readings as the new quantity,
/// so a reload refuses the configuration (keeping the running one), and at start the sensor is kept back, unsampled,
/// until they are sent.
public struct SensorQuantityChange: Error, Sendable, Hashable, CustomStringConvertible {
    public let sensor: SensorID
    public let buffered: Quantity
    public let configured: Quantity
    public let readings: Int64

    public var description: String {
        "sensor \"\(sensor)\": quantity changed from \(buffered.rawValue) to \(configured.rawValue), but the buffer still holds \(readings) "
            + "reading\(readings == 1 ? "" : "s") of it taken as \(buffered.rawValue), which would go up as \(configured.rawValue): give the "
            + "new sensor another id (the ingest keeps an id bound to its first quantity), or put quantity = \"\(buffered.rawValue)\" back until they are sent (farmgate status: 0 pending; "
            + "quarantined ones: farmgate quarantine drop --sequence …)"
    }
}
