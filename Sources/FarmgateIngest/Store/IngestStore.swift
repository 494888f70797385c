public import FarmgateWire

public import ServiceLifecycle

/// Where the ingest keeps farms, credentials and readings: one store that plays every role below, with a lifecycle.
///
/// The HTTP layer and the admin commands each ask for the narrowest role they use (``ReadingIngestStore`` for batches,
/// ``CredentialStore`` for authentication, ``ReadingQueryStore`` for the read API, ``AdministrationStore`` for the
/// commands, ``StoreMaintenance`` for `/readyz` and `migrate`), so that an implementation, or a test double for one
/// role, never has to know the others. ``SQLiteIngestStore`` (embedded, the default) and ``PostgresIngestStore``
/// (pooled, several instances) implement all of them and are checked by one conformance suite.
///
/// Roles added later (calibrations, alerting's outbox) are protocols of their own beside these, adopted by the stores
/// that keep them; `IngestStore` is only what every store must do to run the ingest.
///
/// The store is a `Service`: `serve` puts it first in its `ServiceGroup`, so that it starts before the HTTP server and
/// stops after it. ``SQLiteIngestStore`` answers before `run()` (its threads start in `init`); ``PostgresIngestStore``
/// needs `run()` to be running (its connection pool lives there), and runs its maintenance (partitions ahead) there.
///
/// Every method may block on disk or network in its implementation, never on the caller's thread: implementations run
/// their blocking calls on threads of their own, or do non-blocking I/O.
public protocol IngestStore: ReadingIngestStore, CredentialStore, AdministrationStore, ReadingQueryStore, StoreMaintenance, Service {}

/// The schema and health of a store.
public protocol StoreMaintenance: Sendable {
    /// Brings the schema up to date. Safe to call on every start and from several processes at once.
    ///
    /// - Returns: the migrations applied now (empty when the schema was already current).
    @discardableResult
    func migrate() async throws -> [AppliedMigration]

    /// Answers a trivial query; throws when the store cannot serve requests (used by `/readyz`).
    func ping() async throws
}

/// Where batches go: the write path of the delivery contract.
public protocol ReadingIngestStore: Sendable {
    /// Stores `batch` for `device` in one durable transaction and returns only after it committed.
    ///
    /// Idempotent on (device, sequence): a reading whose sequence is already stored for the device is compared with the
    /// stored one (sensor, timestamp, value in whole steps of the sensor's resolution, flags). The same reading is counted
    /// as a duplicate and not stored again; a different one is not stored and comes back in ``StoreOutcome/rejected``
    /// with the code `sequence_conflict` naming what differs (never as a duplicate: the site would delete it). Sensors
    /// are registered on first sight, safely when several writers register the same sensor at once (one
    /// `INSERT ... ON CONFLICT ... RETURNING`); a reading of a sensor that is already registered on this device with
    /// another quantity is not stored and comes back with the code `sensor_conflict`. In the same transaction the
    /// device's highest stored sequence (``highestSequence(device:)``) is raised. The caller has validated every
    /// reading and `batch.device == device.device`.
    func store(_ batch: Batch, for device: DeviceIdentity, receivedAt: Timestamp) async throws -> StoreOutcome

    /// The highest sequence ever stored for `device`, or nil when none was. Kept beside the device and raised by
    /// ``store(_:for:receivedAt:)`` in its transaction, so that deleting readings (retention) never lowers it: the
    /// agent numbers new readings above it (`GET /v1/device`).
    func highestSequence(device: DeviceIdentity) async throws -> UInt64?
}

/// Credentials, as authentication reads them.
public protocol CredentialStore: Sendable {
    /// The device credential with API key id `keyID`, revoked or not, or nil.
    func deviceCredential(keyID: String) async throws -> DeviceCredential?

    /// The read token with id `keyID`, or nil.
    func readTokenCredential(keyID: String) async throws -> ReadTokenCredential?
}

/// What the admin commands change and export.
public protocol AdministrationStore: Sendable {
    /// Creates a farm. Throws ``IngestStoreError/alreadyExists(_:)`` when the name is taken.
    func createFarm(name: String, createdAt: Timestamp) async throws -> FarmRecord

    /// The farm named `name`, or nil.
    func farm(named name: String) async throws -> FarmRecord?

    /// Registers a device in `farm` with the hash of its API key secret. Throws ``IngestStoreError/notFound(_:)`` for an
    /// unknown farm and ``IngestStoreError/alreadyExists(_:)`` when the device exists or the key id is taken.
    func createDevice(farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], createdAt: Timestamp) async throws
        -> DeviceIdentity

    /// Marks the device revoked: its key stops working. Returns false when it was revoked already (its revocation time
    /// is kept). Throws ``IngestStoreError/notFound(_:)`` when farm or device is unknown.
    @discardableResult
    func revokeDevice(farm: String, device: DeviceID, revokedAt: Timestamp) async throws -> Bool

    /// Replaces the device's key with a new one (the old key stops matching at once in the store) and lifts a
    /// revocation. Throws ``IngestStoreError/notFound(_:)`` when farm or device is unknown and
    /// ``IngestStoreError/alreadyExists(_:)`` when the key id is taken.
    func rotateDeviceKey(farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], rotatedAt: Timestamp) async throws

    /// Registers a read token of `role` for `farm`. Throws ``IngestStoreError/notFound(_:)`` for an unknown farm and
    /// ``IngestStoreError/alreadyExists(_:)`` when the key id is taken.
    func createReadToken(farm: String, role: ReadRole, keyID: String, secretHash: [UInt8], createdAt: Timestamp) async throws

    /// The devices of the farm ordered by name.
    func devices(farmID: Int64) async throws -> [DeviceIdentity]

    /// Every farm, ordered by name.
    func farms() async throws -> [FarmRecord]

    /// The read tokens of `farm` (every farm's when nil), newest first: never their secrets, which are not stored.
    func readTokens(farm: String?) async throws -> [ReadTokenRecord]

    /// Revokes the read token `keyID`: requests with it are refused from then on (within the credential cache's
    /// seconds). Returns false when it was revoked already. Throws ``IngestStoreError/notFound(_:)`` for an unknown id.
    func revokeReadToken(keyID: String) async throws -> Bool

    /// Up to `limit` readings of one device with a sequence above `afterSequence`, in sequence order, for streaming exports.
    func exportPage(device: DeviceIdentity, afterSequence: UInt64?, limit: Int) async throws -> [ExportRow]
}

/// What the read API reads.
public protocol ReadingQueryStore: Sendable {
    /// The latest reading of every sensor of every device of the farm (by timestamp), ordered by device then sensor.
    func latestReadings(farmID: Int64) async throws -> [LatestReading]

    /// The sensor `sensor` of `device` in the farm, or nil when either is unknown.
    func sensor(farmID: Int64, device: DeviceID, sensor: SensorID) async throws -> SensorRecord?

    /// Readings of one sensor with `from <= timestamp < to`, in time order (then sequence), at most `limit`.
    func readings(sensorRowID: Int64, from: Timestamp?, to: Timestamp?, limit: Int) async throws -> [StoredReading]

    /// One sensor's rollup buckets at `level` that overlap `from <= t < to` (the first one may start before `from`), in
    /// time order, at most `limit`. See ``RollupLevel`` for what a bucket holds.
    func rollups(sensorRowID: Int64, level: RollupLevel, from: Timestamp?, to: Timestamp?, limit: Int) async throws -> [RollupPoint]

    /// How many readings of the sensor were stored in the whole hours inside `from..<to`, from the hourly rollups (cheap,
    /// whatever the span): a lower bound of its readings there, by which `resolution=auto` rules raw readings out without
    /// reading them (``ReadResolution/decideAuto(from:to:keptFrom:storedAtLeast:raw:)``). Readings since deleted by
    /// retention still count; hourly rollups retention removed do not.
    func storedReadingCount(sensorRowID: Int64, from: Timestamp, to: Timestamp) async throws -> Int

    /// The newest raw cut-off a retention run applied (every raw reading older is gone), or nil when none ran. It can
    /// be later than the configured `raw` period's: retention ran with a shorter one, since raised.
    func appliedRawCutoff() async throws -> Timestamp?

    /// The newest cut-off a retention run applied to each rollup level (every bucket of the level older is gone); a
    /// level no run removed anything of is absent.
    func appliedRollupCutoffs() async throws -> [RollupLevel: Timestamp]
}

/// A migration that ``StoreMaintenance/migrate()`` applied.
public struct AppliedMigration: Sendable, Hashable {
    /// The schema version it produces.
    public var version: Int
    /// What it does, for the log.
    public var name: String

    public init(version: Int, name: String) {
        self.version = version
        self.name = name
    }
}

/// The outcome of ``ReadingIngestStore/store(_:for:receivedAt:)``: counts for the readings the store saw, `rejected` holding
/// only what the store itself refuses (`sensor_conflict`, `sequence_conflict`); the controller adds the validator's and
/// groups them into the ``IngestReceipt``.
public struct StoreOutcome: Sendable, Hashable {
    public var accepted: Int
    public var duplicates: Int
    public var rejected: [RejectedReading]
    /// The readings this transaction stored for the first time (`fresh.count == accepted`), in batch order: what the
    /// commit hands to whatever follows it (rollups, the latest cache, the alert engine). Never duplicates, never refused ones.
    public var fresh: [CommittedReading]

    public init(accepted: Int, duplicates: Int, rejected: [RejectedReading], fresh: [CommittedReading] = []) {
        self.accepted = accepted
        self.duplicates = duplicates
        self.rejected = rejected
        self.fresh = fresh
    }
}

/// A reading a commit stored for the first time: the site's reading plus its sensor's row id and quantity in the store.
public struct CommittedReading: Sendable, Hashable {
    /// The store's row id of the sensor (`sensors.id`), unique across devices.
    public var sensorRowID: Int64
    public var sensor: SensorID
    public var quantity: Quantity
    public var sequence: UInt64
    public var timestamp: Timestamp
    public var value: Double
    public var quality: QualityFlags

    public init(sensorRowID: Int64, sensor: SensorID, quantity: Quantity, sequence: UInt64, timestamp: Timestamp, value: Double, quality: QualityFlags) {
        self.sensorRowID = sensorRowID
        self.sensor = sensor
        self.quantity = quantity
        self.sequence = sequence
        self.timestamp = timestamp
        self.value = value
        self.quality = quality
    }

    public init(_ reading: Reading, sensorRowID: Int64, quantity: Quantity) {
        self.init(
            sensorRowID: sensorRowID, sensor: reading.sensor, quantity: quantity, sequence: reading.sequence, timestamp: reading.timestamp,
            value: reading.value, quality: reading.quality)
    }
}

/// A farm, the tenant that owns devices and read tokens.
public struct FarmRecord: Sendable, Hashable {
    public var id: Int64
    public var name: String

    public init(id: Int64, name: String) {
        self.id = id
        self.name = name
    }
}

/// Who a device is: the row ids the store uses and the names people use.
public struct DeviceIdentity: Sendable, Hashable {
    public var farmID: Int64
    public var farm: String
    public var rowID: Int64
    public var device: DeviceID

    public init(farmID: Int64, farm: String, rowID: Int64, device: DeviceID) {
        self.farmID = farmID
        self.farm = farm
        self.rowID = rowID
        self.device = device
    }
}

/// A device's stored credential: never the secret, only its SHA-256.
public struct DeviceCredential: Sendable, Hashable {
    public var identity: DeviceIdentity
    public var secretHash: [UInt8]
    public var revoked: Bool

    public init(identity: DeviceIdentity, secretHash: [UInt8], revoked: Bool) {
        self.identity = identity
        self.secretHash = secretHash
        self.revoked = revoked
    }
}

/// What a read token may do.
public enum ReadRole: String, Sendable, Hashable, CaseIterable {
    /// Reads every reading of its farm, and its alerts and alert rules.
    case viewer
    /// Everything a viewer does, and manages the farm's alert rules and silences and acknowledges alerts.
    case admin
}

/// A read token's stored credential.
/// A read token as the administration lists it.
public struct ReadTokenRecord: Sendable, Hashable {
    public var keyID: String
    public var farm: String
    public var role: ReadRole
    public var createdAt: Timestamp
    public var revoked: Bool

    public init(keyID: String, farm: String, role: ReadRole, createdAt: Timestamp, revoked: Bool) {
        self.keyID = keyID
        self.farm = farm
        self.role = role
        self.createdAt = createdAt
        self.revoked = revoked
    }
}

public struct ReadTokenCredential: Sendable, Hashable {
    public var farm: FarmRecord
    public var role: ReadRole
    public var secretHash: [UInt8]
    public var revoked: Bool

    public init(farm: FarmRecord, role: ReadRole, secretHash: [UInt8], revoked: Bool) {
        self.farm = farm
        self.role = role
        self.secretHash = secretHash
        self.revoked = revoked
    }
}

/// A registered sensor.
public struct SensorRecord: Sendable, Hashable {
    public var rowID: Int64
    public var device: DeviceID
    public var sensor: SensorID
    public var quantity: Quantity

    public init(rowID: Int64, device: DeviceID, sensor: SensorID, quantity: Quantity) {
        self.rowID = rowID
        self.device = device
        self.sensor = sensor
        self.quantity = quantity
    }
}

/// The latest reading of one sensor.
public struct LatestReading: Sendable, Hashable {
    public var device: DeviceID
    public var sensor: SensorID
    public var quantity: Quantity
    public var sequence: UInt64
    public var timestamp: Timestamp
    public var value: Double
    public var quality: QualityFlags

    public init(device: DeviceID, sensor: SensorID, quantity: Quantity, sequence: UInt64, timestamp: Timestamp, value: Double, quality: QualityFlags) {
        self.device = device
        self.sensor = sensor
        self.quantity = quantity
        self.sequence = sequence
        self.timestamp = timestamp
        self.value = value
        self.quality = quality
    }
}

/// One stored reading of a known sensor.
public struct StoredReading: Sendable, Hashable {
    public var sequence: UInt64
    public var timestamp: Timestamp
    public var value: Double
    public var quality: QualityFlags

    public init(sequence: UInt64, timestamp: Timestamp, value: Double, quality: QualityFlags) {
        self.sequence = sequence
        self.timestamp = timestamp
        self.value = value
        self.quality = quality
    }
}

/// One reading as exported.
public struct ExportRow: Sendable, Hashable {
    public var device: DeviceID
    public var sensor: SensorID
    public var sequence: UInt64
    public var timestamp: Timestamp
    public var value: Double
    public var quality: QualityFlags

    public init(device: DeviceID, sensor: SensorID, sequence: UInt64, timestamp: Timestamp, value: Double, quality: QualityFlags) {
        self.device = device
        self.sensor = sensor
        self.sequence = sequence
        self.timestamp = timestamp
        self.value = value
        self.quality = quality
    }
}

/// A failure of an ``IngestStore`` that callers act on.
public enum IngestStoreError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The named thing does not exist.
    case notFound(String)
    /// The named thing already exists.
    case alreadyExists(String)
    /// Stored data could not be read back (a value outside what the schema allows).
    case corrupt(String)

    public var description: String {
        switch self {
        case .notFound(let what): "\(what) does not exist"
        case .alreadyExists(let what): "\(what) already exists"
        case .corrupt(let what): "stored data is damaged: \(what)"
        }
    }
}
