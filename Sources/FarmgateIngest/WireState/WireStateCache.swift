public import FarmgateWire
import Logging
import Synchronization

/// The state stateful frames (format version 4) are decoded against, per device: the sensor tables it declared and its
/// newest reading per sensor, kept in memory in front of the store (``WireStateStore``) so that a live device costs no
/// query per batch.
///
/// How it stays right:
/// - **Tables** never change once declared (a table is named by the hash of its contents), so a table in memory is
///   always right; one missing from memory is looked up in the store, where every instance puts the tables declared to it.
/// - **Newest readings** follow this instance's commits (``committed(_:)``, through the ``CommitFeed`` before the receipt
///   is sent). Another instance's commits are not heard: a frame whose context checksum differs from the memory's makes
///   the controller ask again with `reload`, which reads the store's `latest` rows. Only when those differ too is the
///   frame answered `stale_context`. So memory may be stale, never wrong in a way that decodes a reading.
///
/// - **A resent frame**: the context before this instance's last commit for the device is kept too
///   (``contextBeforeLastCommit(device:)``), so that a frame sent again after its answer was lost decodes.
///
/// Memory: about 100 bytes per sensor of each device seen since start (twice that for the sensors of its last commit),
/// and per device at most ``maxTablesPerDevice``
/// tables (the store's bound, ``WireStateStore/maxSensorTablesPerDevice``; the least recently used goes first, and is
/// read from the store again if it is named later), so that a device declaring a new table with every frame cannot grow
/// memory; past ``maxDevices`` devices the least recently used half is dropped (and read from the store again when they
/// come back).
public final class WireStateCache: CommitObserver, Sendable {
    struct Device: Sendable {
        /// By hash: the table and when it was last used (the cache's clock).
        var tables: [UInt64: (table: SensorTable, lastUsed: UInt64)] = [:]
        /// nil until read from the store: commits are merged only into a context that was loaded.
        var context: [SensorID: ContextReading]?
        /// What the last commit that changed ``context`` replaced, per sensor it changed (nil: the sensor had no reading):
        /// ``context`` with these put back is the context before that commit.
        var replaced: [SensorID: ContextReading?] = [:]
        var lastUsed: UInt64 = 0
    }

    struct State: Sendable {
        var devices: [Int64: Device] = [:]
        var clock: UInt64 = 0
    }

    let store: any WireStateStore
    let maxDevices: Int
    /// The most tables kept in memory per device.
    let maxTablesPerDevice: Int
    let logger: Logger
    private let state = Mutex(State())

    public init(store: any WireStateStore, maxDevices: Int = 20_000, logger: Logger) {
        self.store = store
        self.maxDevices = max(1, maxDevices)
        self.maxTablesPerDevice = max(1, type(of: store).maxSensorTablesPerDevice)
        self.logger = logger
    }

    /// The table `hash` of `device`, from memory or the store; nil when the device never declared it.
    public func table(device: DeviceIdentity, hash: UInt64) async throws -> SensorTable? {
        if let table = touch(device.rowID, { $0.useTable(hash, clock: $1) }) { return table }
        guard let encoded = try await store.sensorTable(deviceRowID: device.rowID, hash: hash) else { return nil }
        let table: SensorTable
        do { table = try SensorTable(encoded: encoded) } catch {
            // Written by a newer ingest that knows more quantities, or damaged: the device declares it again.
            logger.warning(
                "a stored sensor table cannot be read; the device will be asked to declare it again",
                metadata: ["device.id": "\(device.device)", "table.hash": "\(hash)", "error": "\(error)"])
            return nil
        }
        guard table.hash == hash else { return nil }
        let limit = maxTablesPerDevice
        touch(device.rowID) { $0.keepTable(table, clock: $1, limit: limit) }
        return table
    }

    /// Keeps a declared table: in the store first (durable), then in memory. Call it only once the frame that declared
    /// the table decoded: a frame that fails leaves nothing behind.
    public func remember(_ table: SensorTable, device: DeviceIdentity) async throws {
        if touch(device.rowID, { $0.useTable(table.hash, clock: $1) }) != nil { return }
        try await store.rememberSensorTable(deviceRowID: device.rowID, hash: table.hash, encoded: table.encoded)
        let limit = maxTablesPerDevice
        touch(device.rowID) { $0.keepTable(table, clock: $1, limit: limit) }
    }

    /// The hashes of the device's tables in memory (for tests).
    func tablesInMemory(deviceRowID: Int64) -> Set<UInt64> {
        state.withLock { $0.devices[deviceRowID].map { Set($0.tables.keys) } ?? [] }
    }

    /// The newest reading per sensor of `device`: from memory, or (first use, or `reload`) from the store.
    public func context(device: DeviceIdentity, reload: Bool = false) async throws -> [SensorID: ContextReading] {
        if !reload, let context = touch(device.rowID, { entry, _ in entry.context }) { return context }
        let loaded = try await store.contextReadings(deviceRowID: device.rowID)
        return touch(device.rowID) { entry, _ in
            // Commits that landed while the store was read are merged in: the newest by (timestamp, sequence) wins.
            var merged = loaded
            for (sensor, reading) in entry.context ?? [:] where merged[sensor].map({ reading.isNewer(than: $0) }) ?? true {
                merged[sensor] = reading
            }
            entry.context = merged
            return merged
        }
    }

    /// The device's context as it was before the last commit of this instance that changed it (the newest readings that
    /// commit replaced put back); nil when no such commit is in memory. A sender whose answer was lost (a timeout, a
    /// connection closed after the commit, an HTTP client that sent the request again on a new connection) sends the
    /// same frame again, predicting from exactly this: decoded against it, its readings are duplicates, where a 409
    /// `stale_context` would cost the device the whole context in the answer. Any context whose checksum the frame
    /// matches is the one the sender encoded against, so decoding against it is as safe as against the current one.
    public func contextBeforeLastCommit(device: DeviceIdentity) -> [SensorID: ContextReading]? {
        touch(device.rowID) { entry, _ in
            guard var context = entry.context, !entry.replaced.isEmpty else { return nil }
            for (sensor, reading) in entry.replaced { context[sensor] = reading }
            return context
        }
    }

    public func committed(_ batch: CommittedBatch) {
        state.withLock { state in
            guard var entry = state.devices[batch.device.rowID], var context = entry.context else { return }
            var replaced: [SensorID: ContextReading?] = [:]
            for reading in batch.readings {
                let candidate = ContextReading(sequence: reading.sequence, timestamp: reading.timestamp, value: reading.value)
                let current = context[reading.sensor]
                if let current, !candidate.isNewer(than: current) { continue }
                if replaced.index(forKey: reading.sensor) == nil { replaced[reading.sensor] = .some(current) }
                context[reading.sensor] = candidate
            }
            entry.context = context
            // A commit of duplicates only (the answer to it may be the one lost) keeps what the last real change replaced.
            if !replaced.isEmpty { entry.replaced = replaced }
            state.devices[batch.device.rowID] = entry
        }
    }

    /// Devices held in memory (for tests and metrics).
    public var deviceCount: Int { state.withLock { $0.devices.count } }

    /// Runs `body` on the device's entry (created if absent) and the clock under the lock, marking it used, and evicts
    /// the least recently used half when there are too many devices.
    @discardableResult
    private func touch<T>(_ rowID: Int64, _ body: (inout Device, UInt64) -> T) -> T {
        state.withLock { state in
            state.clock += 1
            var entry = state.devices[rowID] ?? Device()
            entry.lastUsed = state.clock
            let result = body(&entry, state.clock)
            state.devices[rowID] = entry
            if state.devices.count > maxDevices {
                let keep = state.devices.sorted { $0.value.lastUsed > $1.value.lastUsed }.prefix(maxDevices / 2 + 1)
                state.devices = Dictionary(uniqueKeysWithValues: keep.map { ($0.key, $0.value) })
            }
            return result
        }
    }
}

extension WireStateCache.Device {
    /// The table `hash`, marked used at `clock`; nil when it is not in memory.
    mutating func useTable(_ hash: UInt64, clock: UInt64) -> SensorTable? {
        guard let held = tables[hash] else { return nil }
        tables[hash] = (held.table, clock)
        return held.table
    }

    /// Keeps `table`, used at `clock`; past `limit` tables the least recently used goes (at most `limit` + 1 to look at).
    mutating func keepTable(_ table: SensorTable, clock: UInt64, limit: Int) {
        tables[table.hash] = (table, clock)
        while tables.count > limit, let oldest = tables.min(by: { $0.value.lastUsed < $1.value.lastUsed })?.key {
            tables[oldest] = nil
        }
    }
}
