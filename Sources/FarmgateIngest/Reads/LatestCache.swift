public import FarmgateWire
import NIOCore
import Synchronization

/// The latest reading of every sensor, per farm, in memory: what `GET /v1/farms/{farm}/latest` answers from.
///
/// How it stays right:
/// - **Filled from the store** on a farm's first read (one `latestReadings(farmID:)` query, shared by every reader that
///   arrives while it runs).
/// - **This instance's commits** arrive through the ``CommitFeed`` (``committed(_:)``) right after each commit, before
///   the receipt is sent; commits that land while the farm is being filled are kept and merged with what the fill read.
/// - **Other instances' commits** (PostgreSQL): ``PostgresLatestListener`` hears a notification per committed device,
///   sent inside the write transaction and so delivered when the commit is visible. It marks the device stale at once
///   (``markStale(farmID:device:)``): from then on no read serves that device from memory until the listener has read the
///   device's rows again (``refreshed(farmID:device:readings:token:)``) or a reader reloaded the farm. When the listening
///   connection is lost, ``invalidateAll()`` empties the cache and turns it off (every read goes to the store) until
///   the listener listens again and calls ``enable()``.
///
/// Every merge keeps, per sensor, the reading with the greatest (timestamp, sequence), the rule of the stores' `latest`
/// table, so the order in which a fill, a commit and a refresh arrive never matters.
///
/// Each reading's JSON is encoded once when it enters the cache; a device's whole answer is kept encoded until the device
/// changes, so that the hot read (one device, no filter) costs a lookup and a reference count.
///
/// Memory: about 250 bytes per sensor of each farm read since start (a 200-device farm of 50 sensors: 2.5 MB).
public final class LatestCache: CommitObserver, Sendable {
    struct Entry: Sendable {
        var reading: LatestReading
        /// The reading as one JSON object of the answer's `sensors` array.
        var json: [UInt8]
    }

    struct Device: Sendable {
        var sensors: [SensorID: Entry] = [:]
        /// The sensor ids in byte order, rebuilt after a sensor appears.
        var order: [SensorID]?
        /// The device's whole first page, unfiltered, while nothing changed.
        var answer: ByteBuffer?
        /// Non-zero while another instance committed readings of this device that this cache may not hold yet: the token
        /// of the newest such notification.
        var staleToken: UInt64 = 0
    }

    struct Farm: Sendable {
        var devices: [DeviceID: Device] = [:]
        var order: [DeviceID]?
        var loaded = false
        /// The fill (or reload) in flight, shared by the readers that wait for it.
        var load: Task<[LatestReading], any Error>?
        /// ``State/staleCounter`` when ``load`` began: marks up to it are covered by what it reads.
        var loadCovers: UInt64 = 0
    }

    struct State: Sendable {
        var enabled: Bool
        /// Raised by ``invalidateAll()``: a fill begun before is thrown away.
        var epoch: UInt64 = 0
        var farms: [Int64: Farm] = [:]
        var staleCounter: UInt64 = 0
    }

    private let state: Mutex<State>
    /// How long a read waits for stale devices to be refreshed before it reloads the farm from the store itself.
    let staleWait: Duration

    /// - Parameters:
    ///   - enabled: whether reads may be served from memory from the start. `serve` on PostgreSQL starts it disabled and
    ///     its listener enables it once it listens; on SQLite (one instance, every commit through the feed) it is on.
    ///   - staleWait: see ``staleWait``.
    public init(enabled: Bool = true, staleWait: Duration = .milliseconds(500)) {
        state = Mutex(State(enabled: enabled))
        self.staleWait = staleWait
    }

    // MARK: Reads

    /// The answer to one `latest` request of `farm`, from memory when the cache is on, else straight from `load`.
    ///
    /// - Parameter load: the store's latest readings of the whole farm.
    public func page(
        farm: FarmRecord, selection: LatestSelection, load: @escaping @Sendable () async throws -> [LatestReading]
    ) async throws -> ByteBuffer {
        let started = ContinuousClock.now
        while true {
            let action: ReadAction = state.withLock { state in
                guard state.enabled else { return .bypass }
                var entry = state.farms[farm.id] ?? Farm()
                defer { state.farms[farm.id] = entry }
                if let task = entry.load { return .wait(task, state.epoch) }
                if !entry.loaded || (selection.touchesStale(entry) && started.duration(to: .now) > staleWait) {
                    // First use, or stale devices that the listener has not refreshed in time: read the farm again.
                    entry.loadCovers = state.staleCounter
                    let task = Task { try await load() }
                    entry.load = task
                    return .wait(task, state.epoch)
                }
                if selection.touchesStale(entry) { return .sleep }
                return .answer(LatestPageBuilder.page(of: &entry, farm: farm.name, selection: selection))
            }
            switch action {
            case .answer(let body):
                return body
            case .bypass:
                var entry = Farm()
                for reading in try await load() { Self.merge(reading, json: nil, into: &entry) }
                return LatestPageBuilder.page(of: &entry, farm: farm.name, selection: selection)
            case .sleep:
                try await Task.sleep(for: .milliseconds(1))
            case .wait(let task, let epoch):
                do {
                    let rows = try await task.value
                    install(rows, farmID: farm.id, task: task, epoch: epoch)
                } catch {
                    forget(task, farmID: farm.id)
                    throw error
                }
            }
        }
    }

    /// The answer to one `latest` request when memory holds it now: the cache on, the farm loaded with no fill in flight,
    /// and no device of the selection stale. Otherwise nil, and the read goes through ``page(farm:selection:load:)``.
    /// Never waits and never starts a fill: the event loop answers with it (``LatestFastPath``).
    func cachedPage(farm: FarmRecord, selection: LatestSelection) -> ByteBuffer? {
        state.withLock { state in
            guard state.enabled, var entry = state.farms[farm.id], entry.loaded, entry.load == nil, !selection.touchesStale(entry) else {
                return nil
            }
            defer { state.farms[farm.id] = entry }
            return LatestPageBuilder.page(of: &entry, farm: farm.name, selection: selection)
        }
    }

    private enum ReadAction {
        case answer(ByteBuffer)
        case bypass
        case sleep
        case wait(Task<[LatestReading], any Error>, UInt64)
    }

    private func install(_ rows: [LatestReading], farmID: Int64, task: Task<[LatestReading], any Error>, epoch: UInt64) {
        // Encoded outside the lock; merged under it.
        let encoded = rows.map { Entry(reading: $0, json: LatestPageBuilder.json($0)) }
        state.withLock { state in
            guard state.epoch == epoch, var entry = state.farms[farmID], entry.load == task else { return }
            for item in encoded { Self.merge(item.reading, json: item.json, into: &entry) }
            for (id, device) in entry.devices where device.staleToken != 0 && device.staleToken <= entry.loadCovers {
                entry.devices[id]?.staleToken = 0
            }
            entry.loaded = true
            entry.load = nil
            state.farms[farmID] = entry
        }
    }

    private func forget(_ task: Task<[LatestReading], any Error>, farmID: Int64) {
        state.withLock { state in
            guard var entry = state.farms[farmID], entry.load == task else { return }
            entry.load = nil
            // Never loaded: nothing in it may be served; the next reader fills it again.
            if entry.loaded { state.farms[farmID] = entry } else { state.farms[farmID] = nil }
        }
    }

    // MARK: This instance's commits

    public func committed(_ batch: CommittedBatch) {
        // The newest reading per sensor of the batch, encoded before taking the lock.
        var newest: [Int64: CommittedReading] = [:]
        for reading in batch.readings {
            if let current = newest[reading.sensorRowID], (current.timestamp, current.sequence) >= (reading.timestamp, reading.sequence) { continue }
            newest[reading.sensorRowID] = reading
        }
        let entries = newest.values.map { reading in
            let latest = LatestReading(
                device: batch.device.device, sensor: reading.sensor, quantity: reading.quantity, sequence: reading.sequence, timestamp: reading.timestamp,
                value: reading.value, quality: reading.quality)
            return Entry(reading: latest, json: LatestPageBuilder.json(latest))
        }
        state.withLock { state in
            guard state.enabled, var entry = state.farms[batch.device.farmID] else { return }
            for item in entries { Self.merge(item.reading, json: item.json, into: &entry) }
            state.farms[batch.device.farmID] = entry
        }
    }

    // MARK: Other instances' commits

    /// Marks `device` stale after another instance committed readings of it. Returns the mark's token for
    /// ``refreshed(farmID:device:readings:token:)``, or nil when the cache holds nothing of the farm (a later fill reads
    /// the store after the commit: nothing to refresh).
    public func markStale(farmID: Int64, device: DeviceID) -> UInt64? {
        state.withLock { state in
            guard state.enabled, var entry = state.farms[farmID] else { return nil }
            state.staleCounter += 1
            // A device the farm's kept device order does not know yet: the order is built again, or farm-wide pages
            // would never list it (``merge`` only clears the order for a device it has not seen).
            if entry.devices[device] == nil { entry.order = nil }
            entry.devices[device, default: Device()].staleToken = state.staleCounter
            state.farms[farmID] = entry
            return state.staleCounter
        }
    }

    /// Merges `readings` of `device`, read from the store after the notification with `token` was received, and clears the
    /// device's stale mark unless a newer notification came meanwhile.
    public func refreshed(farmID: Int64, device: DeviceID, readings: [LatestReading], token: UInt64) {
        let encoded = readings.map { Entry(reading: $0, json: LatestPageBuilder.json($0)) }
        state.withLock { state in
            guard state.enabled, var entry = state.farms[farmID] else { return }
            for item in encoded where item.reading.device == device { Self.merge(item.reading, json: item.json, into: &entry) }
            if let stale = entry.devices[device]?.staleToken, stale != 0, stale <= token {
                entry.devices[device]?.staleToken = 0
            }
            state.farms[farmID] = entry
        }
    }

    /// Forgets everything and serves every read from the store until ``enable()``: the listening connection is gone, so
    /// other instances' commits can no longer be heard.
    public func invalidateAll() {
        state.withLock { state in
            state.enabled = false
            state.epoch += 1
            state.farms = [:]
        }
    }

    /// Serves from memory again (filled anew on each farm's next read). Call only while commits of every instance are heard.
    public func enable() {
        state.withLock { state in
            state.epoch += 1
            state.farms = [:]
            state.enabled = true
        }
    }

    /// Whether reads are served from memory.
    public var isEnabled: Bool { state.withLock { $0.enabled } }

    // MARK: Merging

    /// Keeps `reading` if it is newer (timestamp, then sequence) than what the farm holds for its sensor.
    static func merge(_ reading: LatestReading, json: [UInt8]?, into farm: inout Farm) {
        if farm.devices[reading.device] == nil { farm.order = nil }
        var device = farm.devices[reading.device] ?? Device()
        if let current = device.sensors[reading.sensor] {
            guard (reading.timestamp, reading.sequence) > (current.reading.timestamp, current.reading.sequence) else { return }
        } else {
            device.order = nil
        }
        device.sensors[reading.sensor] = Entry(reading: reading, json: json ?? LatestPageBuilder.json(reading))
        device.answer = nil
        farm.devices[reading.device] = device
    }
}

/// What one `latest` request asks for: `device`, `sensor` (a glob), `quantity`, `cursor`, `limit`.
public struct LatestSelection: Sendable, Hashable {
    public var device: DeviceID?
    /// A glob over sensor ids: `*` any run of characters, `?` one character.
    public var sensorPattern: String?
    public var quantity: Quantity?
    /// Only sensors after this (device, sensor) position, in byte order: the `next` of the previous page.
    public var after: LatestCursor?
    public var limit: Int

    /// The most sensors one page holds, and the default.
    public static let maxLimit = 10_000
    public static let defaultLimit = 1_000

    public init(device: DeviceID? = nil, sensorPattern: String? = nil, quantity: Quantity? = nil, after: LatestCursor? = nil, limit: Int = defaultLimit) {
        self.device = device
        self.sensorPattern = sensorPattern
        self.quantity = quantity
        self.after = after
        self.limit = limit
    }

    var isUnfiltered: Bool { sensorPattern == nil && quantity == nil }

    func touchesStale(_ farm: LatestCache.Farm) -> Bool {
        if let device { return farm.devices[device]?.staleToken ?? 0 != 0 }
        return farm.devices.values.contains { $0.staleToken != 0 }
    }

    func includes(_ reading: LatestReading) -> Bool {
        if let quantity, reading.quantity != quantity { return false }
        if let sensorPattern, !Glob.matches(sensorPattern, reading.sensor.rawValue) { return false }
        return true
    }
}
