import FarmgateSupport
public import FarmgateWire
import Foundation
public import Logging
import ServiceLifecycle

/// The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so that a committed batch survives power loss.
///
/// One writer connection and one reader connection, each on a ``DedicatedThread`` of its own: every `sqlite3_*` call
/// runs there, never on the Swift concurrency pool. Writes are serialised by the writer thread; reads run beside them
/// on a WAL snapshot.
///
/// ```swift
/// let store = try SQLiteIngestStore(path: "/var/lib/farmgate-ingest/ingest.sqlite", logger: logger)
/// try await store.migrate()
/// ```
public final class SQLiteIngestStore: IngestStore {
    /// The database file.
    public let path: String
    /// How many sensors one device may register (`[limits] sensors_per_device`); readings of more are refused.
    public let sensorsPerDevice: Int
    let writer: ThreadOwned<CachedConnection>
    let reader: ThreadOwned<CachedConnection>
    let logger: Logger
    /// Whether the file at ``path`` is still the one open, and whether the last upload's commit found the disk full.
    let health: SQLiteStoreHealth

    /// Opens (creating when missing, with its directory) the database at `path`. Does not migrate: call ``migrate()``.
    ///
    /// - Parameter busyTimeoutMilliseconds: how long a statement waits for another process's lock (an admin command
    ///   writing at the same time) before failing.
    /// - Parameter sensorsPerDevice: ``IngestConfiguration/Limits/sensorsPerDevice``.
    /// - Throws: ``SQLiteError`` when the file cannot be opened or is not a database, or ``FileSystem/Failure`` when its
    ///   directory cannot be created.
    public init(
        path: String, busyTimeoutMilliseconds: Int32 = 5_000, sensorsPerDevice: Int = IngestConfiguration.Limits.defaultSensorsPerDevice,
        logger: Logger
    ) throws {
        self.sensorsPerDevice = sensorsPerDevice
        if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
            try FileSystem.createDirectories(String(path[..<slash]))
        }
        self.path = path
        self.logger = logger
        let health = SQLiteStoreHealth(path: path, logger: logger)
        self.health = health
        self.writer = try ThreadOwned(name: "ingest-sqlite-writer") {
            let connection = try SQLiteConnection(path: path, mode: .readWriteCreate, busyTimeoutMilliseconds: busyTimeoutMilliseconds)
            // Beside a retention run of another process, which leaves the lock free only between its transactions.
            connection.retryBusyLockEveryMillisecond()
            try connection.execute("PRAGMA journal_mode=WAL")
            try connection.execute("PRAGMA synchronous=FULL")
            try connection.execute("PRAGMA foreign_keys=ON")
            // The file SQLite opened (links resolved), beside which it keeps the WAL.
            let file = try connection.query("PRAGMA database_list").first { $0.count > 2 && $0[1].string == "main" }?[2].string
            health.recordOpened(databaseFile: file ?? "")
            return CachedConnection(connection)
        }
        self.reader = try ThreadOwned(name: "ingest-sqlite-reader") {
            let connection = try SQLiteConnection(path: path, mode: .readWrite, busyTimeoutMilliseconds: busyTimeoutMilliseconds)
            connection.retryBusyLockEveryMillisecond()
            try connection.execute("PRAGMA query_only=ON")
            return CachedConnection(connection)
        }
    }

    /// Closes both connections and ends their threads. Later calls throw. Safe to call more than once.
    public func close() {
        reader.close()
        writer.close()
    }

    /// The store's part in the ingest's `ServiceGroup`: it answers from `init` on (its threads are its own), waits for
    /// the group's graceful shutdown, which comes after the HTTP server's (services stop in reverse order), and closes.
    public func run() async throws {
        try? await gracefulShutdown()
        close()
    }

    // MARK: Schema

    @discardableResult
    public func migrate() async throws -> [AppliedMigration] {
        let applied = try await writer.withValue { db throws -> [AppliedMigration] in
            // A store already at this version is not written at all: read-only admin commands (`export`, the lists)
            // migrate first and must not wait for, then fail on, another process's long write transaction. A read in
            // WAL mode takes no lock a writer holds.
            if let current = try? db.connection.queryInt("SELECT max(version) FROM schema_migrations"), Int(current) == SQLiteSchema.currentVersion {
                return []
            }
            try db.connection.execute(SQLiteSchema.bookkeeping)
            return try db.connection.transaction { () throws -> [AppliedMigration] in
                let current = Int(try db.connection.queryInt("SELECT max(version) FROM schema_migrations") ?? 0)
                guard current <= SQLiteSchema.currentVersion else {
                    throw SQLiteIngestStoreError.schemaTooNew(found: current, known: SQLiteSchema.currentVersion)
                }
                var applied: [AppliedMigration] = []
                for migration in SQLiteSchema.migrations where migration.version > current {
                    try db.connection.execute(migration.sql)
                    try db.connection.query(
                        "INSERT INTO schema_migrations(version, name, applied_at_us) VALUES (?, ?, ?)",
                        [.integer(Int64(migration.version)), .text(migration.name), .integer(Timestamp.now().microseconds)])
                    applied.append(AppliedMigration(version: migration.version, name: migration.name))
                }
                return applied
            }
        }
        for migration in applied {
            logger.info("applied schema migration", metadata: ["store.migration.version": "\(migration.version)", "store.migration.name": "\(migration.name)"])
        }
        return applied
    }

    /// Also throws when the store's file was removed or replaced (``SQLiteIngestStoreError/fileReplaced(path:problem:)``)
    /// or the last commit of an upload failed for a full disk (``SQLiteIngestStoreError/diskFull(path:)``): the query
    /// would still answer, from the open file, while no upload can be stored.
    public func ping() async throws {
        let health = self.health
        _ = try await reader.withValue { db in
            try health.checkFiles()
            if health.diskFull { throw SQLiteIngestStoreError.diskFull(path: health.path) }
            try db.withStatement("SELECT max(version) FROM schema_migrations") { statement in
                _ = try statement.step()
            }
        }
    }

    // MARK: Ingest

    public func store(_ batch: Batch, for device: DeviceIdentity, receivedAt: Timestamp) async throws -> StoreOutcome {
        let sensorLimit = sensorsPerDevice
        return try await commitUpload { db in
            let outcome = try SQLiteIngestStore.store(batch, device: device, receivedAt: receivedAt, sensorLimit: sensorLimit, in: db)
            try SQLiteIngestStore.rollups(outcome.fresh, in: db)
            return outcome
        }
    }

    /// Runs `body` in one transaction on the writer thread, for what an upload is answered on (its readings, its
    /// calibration events). Refused at once when the store's file is known to be gone; after the commit, before the
    /// answer, checks that the file at ``path`` is still the one written (``SQLiteStoreHealth/checkFiles()``): a commit
    /// into a removed file is not durable, and its upload must not be acknowledged. Notes whether the commit failed for
    /// a full disk, which `/readyz` reports until one succeeds.
    func commitUpload<T: Sendable>(_ body: @escaping @Sendable (CachedConnection) throws -> T) async throws -> T {
        let health = self.health
        return try await writer.withValue { db in
            try health.refuseIfLost()
            let result: T
            do {
                result = try db.connection.transaction { try body(db) }
            } catch {
                health.committed(failure: error)
                throw error
            }
            health.committed(failure: nil)
            try health.checkFiles()
            return result
        }
    }

    private static func store(
        _ batch: Batch, device: DeviceIdentity, receivedAt: Timestamp, sensorLimit: Int, in db: CachedConnection
    ) throws -> StoreOutcome {
        let slots = BatchSensorSlots(batch.readings)
        var sensorRows: [SensorID: Int64] = [:]
        var overLimit: Set<SensorID> = []
        var resolutions: [SensorID: Resolution] = [:]
        var conflicts: [SensorID: (registered: String, sent: Quantity)] = [:]
        var seenInBatch: [SensorID: Quantity] = [:]

        // One statement per sensor, safe with several writers (another process, an admin command): the row is created
        // or, when it exists, its resolution follows the batch's (only while the quantity agrees), and either way its
        // id and registered quantity come back. Never select-then-insert, which two writers can interleave.
        let registerSensor = try db.statement(
            """
            INSERT INTO sensors(device_id, name, quantity, resolution_numerator, resolution_denominator, first_seen_us)
            VALUES (?, ?, ?, ?, ?, ?)
            ON CONFLICT (device_id, name) DO UPDATE SET
                resolution_numerator = CASE WHEN sensors.quantity = excluded.quantity
                    THEN excluded.resolution_numerator ELSE sensors.resolution_numerator END,
                resolution_denominator = CASE WHEN sensors.quantity = excluded.quantity
                    THEN excluded.resolution_denominator ELSE sensors.resolution_denominator END
            RETURNING id, quantity
            """)

        // `[limits] sensors_per_device`: the device's sensors are counted once per batch (an index range); only a batch
        // whose sensors could take the device past the limit asks which of them are new. The writer is the only one
        // registering sensors (the transaction holds the database's write lock), so the count cannot change meanwhile.
        var registered = try db.withStatement("SELECT count(*) FROM sensors WHERE device_id = ?", [.integer(device.rowID)]) { statement in
            try statement.step() ? Int(statement.int64(0)) : 0
        }
        let mayPassLimit = registered + slots.count > sensorLimit
        for descriptor in batch.sensors where slots.uses(descriptor.id) {
            if let earlier = seenInBatch[descriptor.id] {
                if earlier != descriptor.quantity { conflicts[descriptor.id] = (earlier.rawValue, descriptor.quantity) }
                continue
            }
            seenInBatch[descriptor.id] = descriptor.quantity
            if mayPassLimit {
                let exists = try db.withStatement(
                    "SELECT 1 FROM sensors WHERE device_id = ? AND name = ?", [.integer(device.rowID), .text(descriptor.id.rawValue)]
                ) { try $0.step() }
                if !exists {
                    guard registered < sensorLimit else {
                        overLimit.insert(descriptor.id)
                        continue
                    }
                    registered += 1
                }
            }
            resolutions[descriptor.id] = descriptor.resolution
            try registerSensor.bind([
                .integer(device.rowID), .text(descriptor.id.rawValue), .text(descriptor.quantity.rawValue),
                .integer(Int64(descriptor.resolution.numerator)), .integer(Int64(descriptor.resolution.denominator)),
                .integer(receivedAt.microseconds),
            ])
            guard try registerSensor.step() else {
                registerSensor.reset()
                throw IngestStoreError.corrupt("registering sensor '\(descriptor.id)' returned no row")
            }
            let rowID = registerSensor.int64(0)
            let quantity = registerSensor.text(1)
            _ = try registerSensor.step()  // SQLITE_DONE: the statement has finished
            registerSensor.reset()
            if quantity != descriptor.quantity.rawValue {
                conflicts[descriptor.id] = (quantity, descriptor.quantity)
                continue
            }
            sensorRows[descriptor.id] = rowID
        }

        let placements = slots.placements(conflicts: conflicts, sensorRows: sensorRows, overLimit: overLimit, sensorLimit: sensorLimit)
        let slotQuantities = slots.sensors.map { seenInBatch[$0] }
        let slotResolutions = slots.sensors.map { resolutions[$0] }

        // The device and the time received are bound once; each reading binds the other five (no array per reading).
        let insertReading = try db.statement(
            """
            INSERT INTO readings(device_id, sequence, sensor_id, timestamp_us, value, flags, received_at_us)
            VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (device_id, sequence) DO NOTHING
            """)
        try insertReading.bind([.integer(device.rowID), .null, .null, .null, .null, .null, .integer(receivedAt.microseconds)])
        var accepted = 0
        var fresh: [CommittedReading] = []
        fresh.reserveCapacity(batch.readings.count)
        var rejected: [RejectedReading] = []
        var newest: [(sensorRow: Int64, reading: Reading)?] = Array(repeating: nil, count: slots.count)
        var highestAccepted: Int64?
        /// Inserts one reading; false when its (device, sequence) is already stored.
        func insert(_ candidate: StoredCandidate) throws -> Bool {
            let reading = candidate.reading
            try insertReading.bind(.integer(candidate.sequence), at: 2)
            try insertReading.bind(.integer(candidate.sensorRow), at: 3)
            try insertReading.bind(.integer(reading.timestamp.microseconds), at: 4)
            try insertReading.bind(.real(reading.value), at: 5)
            try insertReading.bind(.integer(Int64(reading.quality.rawValue)), at: 6)
            while try insertReading.step() {}
            insertReading.reset()
            guard db.connection.changes == 1 else { return false }
            accepted += 1
            if let quantity = slotQuantities[candidate.slot] {
                fresh.append(CommittedReading(reading, sensorRowID: candidate.sensorRow, quantity: quantity))
            }
            highestAccepted = max(highestAccepted ?? candidate.sequence, candidate.sequence)
            if let current = newest[candidate.slot], (current.reading.timestamp, current.reading.sequence) >= (reading.timestamp, reading.sequence) {
                return true
            }
            newest[candidate.slot] = (candidate.sensorRow, reading)
            return true
        }
        // Sequences above the device's highest stored one are new: inserted at once. Those at or below it were most
        // likely sent before (a batch sent again after a lost acknowledgement): they are looked up first, many at a time,
        // and only those not found are inserted, so that a batch of duplicates costs range scans and no failed inserts.
        let highestStored = try db.withStatement("SELECT highest_sequence FROM devices WHERE id = ?", [.integer(device.rowID)]) { statement in
            try statement.step() && !statement.isNull(0) ? statement.int64(0) : -1
        }
        var maybeStored: [StoredCandidate] = []
        // Readings an insert found already stored (the same sequence twice in one batch): compared afterwards.
        var alreadyStored: [StoredCandidate] = []
        for (reading, slot) in zip(batch.readings, slots.ofReading) {
            let sequence: Int64
            let sensorRow: Int64
            switch ReadingPlacement(reading, sensor: placements[slot]) {
            case .refuse(let refusal):
                rejected.append(refusal)
                continue
            case .place(let placed, let row):
                (sequence, sensorRow) = (placed, row)
            }
            let candidate = StoredCandidate(reading: reading, sequence: sequence, sensorRow: sensorRow, slot: slot, resolution: slotResolutions[slot])
            if sequence <= highestStored {
                maybeStored.append(candidate)
            } else if try !insert(candidate) {
                alreadyStored.append(candidate)
            }
        }
        var (duplicates, sequenceConflicts, notStored) = try compare(maybeStored, device: device, in: db)
        // Stored once and since deleted by retention: a reading older than the cut-off that removed it is a duplicate,
        // never stored (and rolled up) a second time; a newer one cannot be the removed reading: a sequence_conflict.
        let retired = try retiredSequences(notStored.map(\.sequence), device: device.rowID, in: db)
        if !retired.isEmpty {
            let cutoff = try retentionCutoff(in: db)
            for candidate in notStored where retired.contains(candidate.sequence) {
                if let refusal = SequenceComparison.retired(candidate.reading, removedBefore: cutoff) {
                    sequenceConflicts.append(refusal)
                } else {
                    duplicates += 1
                }
            }
            notStored.removeAll { retired.contains($0.sequence) }
        }
        for candidate in notStored where try !insert(candidate) {
            alreadyStored.append(candidate)
        }
        let (moreDuplicates, moreConflicts, lost) = try compare(alreadyStored, device: device, in: db)
        if let candidate = lost.first {
            // Refused by the insert and yet not stored: cannot happen inside one transaction; never count it silently.
            throw IngestStoreError.corrupt("sequence \(candidate.sequence) of device \(device.device) was refused but is not stored")
        }
        duplicates += moreDuplicates
        sequenceConflicts += moreConflicts
        rejected += sequenceConflicts

        if let highestAccepted {
            // In the same transaction as the readings: the device's high-water mark never lags what is stored, and
            // nothing that deletes readings (retention) can lower it.
            try db.statement("UPDATE devices SET highest_sequence = max(coalesce(highest_sequence, -1), ?) WHERE id = ?")
                .run([.integer(highestAccepted), .integer(device.rowID)])
        }

        let upsertLatest = try db.statement(
            """
            INSERT INTO latest(sensor_id, sequence, timestamp_us, value, flags) VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (sensor_id) DO UPDATE SET
                sequence = excluded.sequence, timestamp_us = excluded.timestamp_us, value = excluded.value, flags = excluded.flags
            WHERE excluded.timestamp_us > latest.timestamp_us
                OR (excluded.timestamp_us = latest.timestamp_us AND excluded.sequence > latest.sequence)
            """)
        for case let (sensorRow, reading)? in newest {
            try upsertLatest.run([
                .integer(sensorRow), .integer(Int64(reading.sequence)), .integer(reading.timestamp.microseconds), .real(reading.value),
                .integer(Int64(reading.quality.rawValue)),
            ])
        }
        return StoreOutcome(accepted: accepted, duplicates: duplicates, rejected: rejected, fresh: fresh)
    }

    /// A reading whose (device, sequence) was already stored when the batch tried to insert it.
    private struct StoredCandidate {
        var reading: Reading
        var sequence: Int64
        var sensorRow: Int64
        /// The sensor's slot among the batch's distinct sensors.
        var slot: Int
        var resolution: Resolution?
    }

    /// The widest gap between two already-stored sequences that one range query still covers: a batch sent again is
    /// usually one run of consecutive sequences, read with a single ordered range scan; sparse ones are cut into several
    /// scans, so that at most this many unrelated rows are stepped over per reading.
    private static let comparisonGap: Int64 = 32

    /// Compares readings whose sequence may already be stored with the stored rows, by ordered range scans over the
    /// primary key rather than one query per reading, so that a batch sent twice stays cheap: the same sensor,
    /// timestamp, value in whole steps of the sensor's resolution and flags make a duplicate; anything else is a
    /// `sequence_conflict`. Readings whose sequence is not stored come back in `notStored`, in sequence order.
    private static func compare(_ candidates: [StoredCandidate], device: DeviceIdentity, in db: CachedConnection) throws -> (
        duplicates: Int, conflicts: [RejectedReading], notStored: [StoredCandidate]
    ) {
        guard !candidates.isEmpty else { return (0, [], []) }
        // A backlog batch comes in sequence order: then it is not copied to be sorted.
        let ascending = zip(candidates, candidates.dropFirst()).allSatisfy { $0.sequence <= $1.sequence }
        let sorted = ascending ? candidates : candidates.sorted { $0.sequence < $1.sequence }
        let scan = try db.statement(
            "SELECT sequence, sensor_id, timestamp_us, value, flags FROM readings WHERE device_id = ? AND sequence >= ? AND sequence <= ? ORDER BY sequence")
        var duplicates = 0
        var conflicts: [RejectedReading] = []
        var notStored: [StoredCandidate] = []
        var first = 0
        while first < sorted.count {
            var last = first
            while last + 1 < sorted.count, sorted[last + 1].sequence - sorted[last].sequence <= comparisonGap { last += 1 }
            try scan.bind([.integer(device.rowID), .integer(sorted[first].sequence), .integer(sorted[last].sequence)])
            var next = first
            do {
                defer { scan.reset() }
                while next <= last, try scan.step() {
                    let sequence = scan.int64(0)
                    while next <= last, sorted[next].sequence < sequence {
                        notStored.append(sorted[next])
                        next += 1
                    }
                    guard next <= last, sorted[next].sequence == sequence else { continue }
                    let stored = StoredRow(sensorRow: scan.int64(1), timestamp: scan.int64(2), value: scan.double(3), flags: scan.int64(4))
                    // The same sequence may come more than once in one batch: each is compared with the stored row.
                    while next <= last, sorted[next].sequence == sequence {
                        let candidate = sorted[next]
                        next += 1
                        if stored.matches(candidate) {
                            duplicates += 1
                            continue
                        }
                        let differences = try Self.differences(candidate, stored: stored, in: db)
                        conflicts.append(SequenceComparison.conflict(candidate.reading, differences: differences))
                    }
                }
            }
            if next <= last { notStored += sorted[next...last] }
            first = last + 1
        }
        return (duplicates, conflicts, notStored)
    }

    /// A stored reading as the comparison reads it.
    private struct StoredRow {
        var sensorRow: Int64
        var timestamp: Int64
        var value: Double
        var flags: Int64

        /// Whether `candidate` is the same reading: same sensor, timestamp and flags, and the same value in whole steps
        /// of the resolution (the stored double and a re-sent one may differ in their last bits, from another encoder or
        /// JSON text, while meaning the same value).
        func matches(_ candidate: StoredCandidate) -> Bool {
            let reading = candidate.reading
            guard sensorRow == candidate.sensorRow, timestamp == reading.timestamp.microseconds, flags == Int64(reading.quality.rawValue)
            else { return false }
            return SequenceComparison.sameValue(value, reading.value, at: candidate.resolution)
        }
    }

    /// What differs between `candidate` and the stored row, each as "field (stored X, sent Y)".
    private static func differences(_ candidate: StoredCandidate, stored: StoredRow, in db: CachedConnection) throws -> [String] {
        var storedSensor: String?
        if stored.sensorRow != candidate.sensorRow {
            storedSensor = try db.withStatement("SELECT name FROM sensors WHERE id = ?", [.integer(stored.sensorRow)]) { statement in
                try statement.step() ? statement.text(0) : "#\(stored.sensorRow)"
            }
        }
        return SequenceComparison.differences(
            candidate.reading, resolution: candidate.resolution, storedSensor: storedSensor, storedTimestamp: stored.timestamp,
            storedValue: stored.value, storedFlags: QualityFlags(rawValue: UInt16(truncatingIfNeeded: stored.flags)))
    }

    public func highestSequence(device: DeviceIdentity) async throws -> UInt64? {
        try await reader.withValue { db in
            try db.withStatement("SELECT highest_sequence FROM devices WHERE id = ?", [.integer(device.rowID)]) { statement throws -> UInt64? in
                guard try statement.step() else { throw IngestStoreError.notFound("device '\(device.device)' in farm '\(device.farm)'") }
                return statement.isNull(0) ? nil : UInt64(clamping: statement.int64(0))
            }
        }
    }

    // MARK: Credentials

    public func deviceCredential(keyID: String) async throws -> DeviceCredential? {
        try await reader.withValue { db in
            try db.withStatement(
                """
                SELECT f.id, f.name, d.id, d.name, d.secret_sha256, d.revoked
                FROM devices d JOIN farms f ON f.id = d.farm_id WHERE d.key_id = ?
                """, [.text(keyID)]
            ) { statement throws -> DeviceCredential? in
                guard try statement.step() else { return nil }
                let identity = DeviceIdentity(
                    farmID: statement.int64(0), farm: statement.text(1), rowID: statement.int64(2), device: try deviceID(statement.text(3)))
                return DeviceCredential(identity: identity, secretHash: statement.blob(4), revoked: statement.int64(5) != 0)
            }
        }
    }

    public func readTokenCredential(keyID: String) async throws -> ReadTokenCredential? {
        try await reader.withValue { db in
            try db.withStatement(
                "SELECT f.id, f.name, t.role, t.secret_sha256, t.revoked FROM read_tokens t JOIN farms f ON f.id = t.farm_id WHERE t.key_id = ?",
                [.text(keyID)]
            ) { statement throws -> ReadTokenCredential? in
                guard try statement.step() else { return nil }
                guard let role = ReadRole(rawValue: statement.text(2)) else { throw IngestStoreError.corrupt("read token role '\(statement.text(2))'") }
                return ReadTokenCredential(
                    farm: FarmRecord(id: statement.int64(0), name: statement.text(1)), role: role, secretHash: statement.blob(3),
                    revoked: statement.int64(4) != 0)
            }
        }
    }

    // MARK: Administration

    public func createFarm(name: String, createdAt: Timestamp) async throws -> FarmRecord {
        try await writer.withValue { db in
            do {
                try db.connection.query("INSERT INTO farms(name, created_at_us) VALUES (?, ?)", [.text(name), .integer(createdAt.microseconds)])
            } catch let error as SQLiteError where error.isConstraint {
                throw IngestStoreError.alreadyExists("farm '\(name)'")
            }
            return FarmRecord(id: db.connection.lastInsertRowID, name: name)
        }
    }

    public func farm(named name: String) async throws -> FarmRecord? {
        try await reader.withValue { db in
            try db.withStatement("SELECT id, name FROM farms WHERE name = ?", [.text(name)]) { statement throws -> FarmRecord? in
                guard try statement.step() else { return nil }
                return FarmRecord(id: statement.int64(0), name: statement.text(1))
            }
        }
    }

    public func createDevice(farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], createdAt: Timestamp) async throws
        -> DeviceIdentity
    {
        try await writer.withValue { db in
            try db.connection.transaction { () throws -> DeviceIdentity in
                guard let farmID = try db.connection.queryInt("SELECT id FROM farms WHERE name = ?", [.text(farm)]) else {
                    throw IngestStoreError.notFound("farm '\(farm)'")
                }
                if try db.connection.queryInt("SELECT id FROM devices WHERE farm_id = ? AND name = ?", [.integer(farmID), .text(device.rawValue)]) != nil {
                    throw IngestStoreError.alreadyExists("device '\(device)' in farm '\(farm)'")
                }
                do {
                    try db.connection.query(
                        "INSERT INTO devices(farm_id, name, key_id, secret_sha256, created_at_us) VALUES (?, ?, ?, ?, ?)",
                        [.integer(farmID), .text(device.rawValue), .text(keyID), .blob(secretHash), .integer(createdAt.microseconds)])
                } catch let error as SQLiteError where error.isConstraint {
                    throw IngestStoreError.alreadyExists("API key id '\(keyID)'")
                }
                return DeviceIdentity(farmID: farmID, farm: farm, rowID: db.connection.lastInsertRowID, device: device)
            }
        }
    }

    @discardableResult
    public func revokeDevice(farm: String, device: DeviceID, revokedAt: Timestamp) async throws -> Bool {
        try await writer.withValue { db in
            // The one writer connection: nothing changes the row between the two statements.
            let arguments: [SQLiteValue] = [.text(device.rawValue), .text(farm)]
            let match = "name = ? AND farm_id = (SELECT id FROM farms WHERE name = ?)"
            guard let revoked = try db.connection.queryInt("SELECT revoked FROM devices WHERE \(match)", arguments) else {
                throw IngestStoreError.notFound("device '\(device)' in farm '\(farm)'")
            }
            guard revoked == 0 else { return false }
            try db.connection.query("UPDATE devices SET revoked = 1, revoked_at_us = ? WHERE \(match)", [.integer(revokedAt.microseconds)] + arguments)
            return true
        }
    }

    public func rotateDeviceKey(farm: String, device: DeviceID, keyID: String, secretHash: [UInt8], rotatedAt: Timestamp) async throws {
        try await writer.withValue { db in
            do {
                try db.connection.query(
                    """
                    UPDATE devices SET key_id = ?, secret_sha256 = ?, revoked = 0, revoked_at_us = NULL
                    WHERE name = ? AND farm_id = (SELECT id FROM farms WHERE name = ?)
                    """, [.text(keyID), .blob(secretHash), .text(device.rawValue), .text(farm)])
            } catch let error as SQLiteError where error.isConstraint {
                throw IngestStoreError.alreadyExists("API key id '\(keyID)'")
            }
            guard db.connection.changes == 1 else { throw IngestStoreError.notFound("device '\(device)' in farm '\(farm)'") }
        }
    }

    public func createReadToken(farm: String, role: ReadRole, keyID: String, secretHash: [UInt8], createdAt: Timestamp) async throws {
        try await writer.withValue { db in
            guard let farmID = try db.connection.queryInt("SELECT id FROM farms WHERE name = ?", [.text(farm)]) else {
                throw IngestStoreError.notFound("farm '\(farm)'")
            }
            do {
                try db.connection.query(
                    "INSERT INTO read_tokens(farm_id, role, key_id, secret_sha256, created_at_us) VALUES (?, ?, ?, ?, ?)",
                    [.integer(farmID), .text(role.rawValue), .text(keyID), .blob(secretHash), .integer(createdAt.microseconds)])
            } catch let error as SQLiteError where error.isConstraint {
                throw IngestStoreError.alreadyExists("token id '\(keyID)'")
            }
        }
    }

    // MARK: Reading

    public func latestReadings(farmID: Int64) async throws -> [LatestReading] {
        try await reader.withValue { db in
            try db.withStatement(
                """
                SELECT d.name, s.quantity, \(Self.latestColumns)
                FROM latest l JOIN sensors s ON s.id = l.sensor_id JOIN devices d ON d.id = s.device_id
                WHERE d.farm_id = ? ORDER BY d.name, s.name
                """, [.integer(farmID)]
            ) { statement throws -> [LatestReading] in
                var rows: [LatestReading] = []
                while try statement.step() {
                    rows.append(
                        try Self.latestRow(statement, from: 2).latestReading(device: try deviceID(statement.text(0)), quantity: try quantity(statement.text(1))))
                }
                return rows
            }
        }
    }

    /// The columns ``latestRow(_:from:)`` reads, in its order, from `latest l JOIN sensors s`.
    static let latestColumns = "s.name, l.sequence, l.timestamp_us, l.value, l.flags"

    /// The `latest` row whose ``latestColumns`` start at column `first` of `statement`'s current row.
    static func latestRow(_ statement: SQLiteStatement, from first: Int32) -> LatestRow {
        LatestRow(
            sensor: statement.text(first), sequence: statement.int64(first + 1), timestamp: statement.int64(first + 2),
            value: statement.double(first + 3), flags: statement.int64(first + 4))
    }

    public func sensor(farmID: Int64, device: DeviceID, sensor: SensorID) async throws -> SensorRecord? {
        try await reader.withValue { db in
            try db.withStatement(
                """
                SELECT s.id, s.quantity FROM sensors s JOIN devices d ON d.id = s.device_id
                WHERE d.farm_id = ? AND d.name = ? AND s.name = ?
                """, [.integer(farmID), .text(device.rawValue), .text(sensor.rawValue)]
            ) { statement throws -> SensorRecord? in
                guard try statement.step() else { return nil }
                return SensorRecord(rowID: statement.int64(0), device: device, sensor: sensor, quantity: try quantity(statement.text(1)))
            }
        }
    }

    public func readings(sensorRowID: Int64, from: Timestamp?, to: Timestamp?, limit: Int) async throws -> [StoredReading] {
        try await reader.withValue { db in
            try db.withStatement(
                """
                SELECT sequence, timestamp_us, value, flags FROM readings
                WHERE sensor_id = ? AND timestamp_us >= ? AND timestamp_us < ?
                ORDER BY timestamp_us, sequence LIMIT ?
                """,
                [
                    .integer(sensorRowID), .integer(from?.microseconds ?? Int64.min), .integer(to?.microseconds ?? Int64.max),
                    .integer(Int64(limit)),
                ]
            ) { statement throws -> [StoredReading] in
                var rows: [StoredReading] = []
                while try statement.step() {
                    rows.append(
                        StoredReading(
                            sequence: UInt64(clamping: statement.int64(0)), timestamp: Timestamp(microseconds: statement.int64(1)),
                            value: statement.double(2), quality: QualityFlags(rawValue: UInt16(truncatingIfNeeded: statement.int64(3)))))
                }
                return rows
            }
        }
    }

    public func devices(farmID: Int64) async throws -> [DeviceIdentity] {
        try await reader.withValue { db in
            try db.withStatement(
                "SELECT f.name, d.id, d.name FROM devices d JOIN farms f ON f.id = d.farm_id WHERE d.farm_id = ? ORDER BY d.name",
                [.integer(farmID)]
            ) { statement throws -> [DeviceIdentity] in
                var rows: [DeviceIdentity] = []
                while try statement.step() {
                    rows.append(DeviceIdentity(farmID: farmID, farm: statement.text(0), rowID: statement.int64(1), device: try deviceID(statement.text(2))))
                }
                return rows
            }
        }
    }

    public func farms() async throws -> [FarmRecord] {
        try await reader.withValue { db in
            try db.withStatement("SELECT id, name FROM farms ORDER BY name", []) { statement throws -> [FarmRecord] in
                var rows: [FarmRecord] = []
                while try statement.step() { rows.append(FarmRecord(id: statement.int64(0), name: statement.text(1))) }
                return rows
            }
        }
    }

    public func readTokens(farm: String?) async throws -> [ReadTokenRecord] {
        try await reader.withValue { db in
            try db.withStatement(
                """
                SELECT t.key_id, f.name, t.role, t.created_at_us, t.revoked FROM read_tokens t JOIN farms f ON f.id = t.farm_id
                WHERE ?1 IS NULL OR f.name = ?1 ORDER BY t.created_at_us DESC, t.id DESC
                """, [farm.map { .text($0) } ?? .null]
            ) { statement throws -> [ReadTokenRecord] in
                var rows: [ReadTokenRecord] = []
                while try statement.step() {
                    guard let role = ReadRole(rawValue: statement.text(2)) else { throw IngestStoreError.corrupt("read token role '\(statement.text(2))'") }
                    rows.append(
                        ReadTokenRecord(
                            keyID: statement.text(0), farm: statement.text(1), role: role, createdAt: Timestamp(microseconds: statement.int64(3)),
                            revoked: statement.int64(4) != 0))
                }
                return rows
            }
        }
    }

    public func revokeReadToken(keyID: String) async throws -> Bool {
        try await writer.withValue { db in
            guard let revoked = try db.connection.queryInt("SELECT revoked FROM read_tokens WHERE key_id = ?", [.text(keyID)]) else {
                throw IngestStoreError.notFound("read token '\(keyID)'")
            }
            guard revoked == 0 else { return false }
            try db.connection.query("UPDATE read_tokens SET revoked = 1 WHERE key_id = ?", [.text(keyID)])
            return true
        }
    }

    public func exportPage(device: DeviceIdentity, afterSequence: UInt64?, limit: Int) async throws -> [ExportRow] {
        let after = afterSequence.map { Int64(clamping: $0) } ?? -1
        return try await reader.withValue { db in
            try db.withStatement(
                """
                SELECT s.name, r.sequence, r.timestamp_us, r.value, r.flags
                FROM readings r JOIN sensors s ON s.id = r.sensor_id
                WHERE r.device_id = ? AND r.sequence > ? ORDER BY r.sequence LIMIT ?
                """, [.integer(device.rowID), .integer(after), .integer(Int64(limit))]
            ) { statement throws -> [ExportRow] in
                var rows: [ExportRow] = []
                while try statement.step() {
                    rows.append(
                        ExportRow(
                            device: device.device, sensor: try sensorID(statement.text(0)), sequence: UInt64(clamping: statement.int64(1)),
                            timestamp: Timestamp(microseconds: statement.int64(2)), value: statement.double(3),
                            quality: QualityFlags(rawValue: UInt16(truncatingIfNeeded: statement.int64(4)))))
                }
                return rows
            }
        }
    }
}

/// Problems specific to the SQLite store.
public enum SQLiteIngestStoreError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The file was migrated by a newer `farmgate-ingest`.
    case schemaTooNew(found: Int, known: Int)
    /// The retention run's lock file (`<path>.retention.lock`) cannot be opened or locked.
    case lockUnusable(lockPath: String, reason: String)
    /// The database at `path`, or its WAL, was removed or replaced while the store had it open (`problem` says which):
    /// what is committed goes into a file that is gone at the next start. See ``SQLiteStoreHealth``.
    case fileReplaced(path: String, problem: String)
    /// The last commit of an upload failed because the disk of the store at `path` is full (`SQLITE_FULL`).
    case diskFull(path: String)

    public var description: String {
        switch self {
        case .schemaTooNew(let found, let known):
            "the database schema is at version \(found), newer than this farmgate-ingest knows (\(known)); run a newer farmgate-ingest"
        case .lockUnusable(let lockPath, let reason):
            "cannot lock \(lockPath): \(reason)"
        case .fileReplaced(_, let problem):
            "the store file was removed or replaced while the ingest ran (\(problem)); nothing can be stored durably until farmgate-ingest serve is restarted"
        case .diskFull(let path):
            "the disk of the store \(path) is full: the last write of an upload failed (SQLITE_FULL); free space on its file system"
        }
    }
}

/// A connection with the statements it has compiled, reused across calls. Lives on one thread (see ``ThreadOwned``).
final class CachedConnection {
    let connection: SQLiteConnection
    private var statements: [String: SQLiteStatement] = [:]

    init(_ connection: SQLiteConnection) {
        self.connection = connection
    }

    /// The compiled statement for `sql`, compiled on first use.
    func statement(_ sql: String) throws(SQLiteError) -> SQLiteStatement {
        if let statement = statements[sql] { return statement }
        let statement = try connection.prepare(sql)
        statements[sql] = statement
        return statement
    }

    /// Binds `values` to the cached statement for `sql`, runs `body` with it and resets it afterwards, so that no read
    /// snapshot stays open between calls.
    func withStatement<T>(_ sql: String, _ values: [SQLiteValue] = [], _ body: (SQLiteStatement) throws -> T) throws -> T {
        let statement = try statement(sql)
        try statement.bind(values)
        defer { statement.reset() }
        return try body(statement)
    }

    /// Runs the cached statement for `sql` with `values` bound and returns every row. For statements that run often
    /// (compiling one costs more than running it); `sql` must not vary with the values, or the cache grows with it.
    @discardableResult
    func query(_ sql: String, _ values: [SQLiteValue] = []) throws -> [[SQLiteValue]] {
        try withStatement(sql, values) { statement in
            var rows: [[SQLiteValue]] = []
            while try statement.step() { rows.append(statement.row()) }
            return rows
        }
    }

    /// Runs the cached statement for `sql` and returns the first column of its first row as an integer, or nil.
    func queryInt(_ sql: String, _ values: [SQLiteValue] = []) throws -> Int64? {
        try withStatement(sql, values) { statement in
            guard try statement.step() else { return nil }
            return statement.isNull(0) ? nil : statement.int64(0)
        }
    }
}

private func deviceID(_ text: String) throws -> DeviceID {
    do { return try DeviceID(text) } catch { throw IngestStoreError.corrupt(error.description) }
}

private func sensorID(_ text: String) throws -> SensorID {
    do { return try SensorID(text) } catch { throw IngestStoreError.corrupt(error.description) }
}

private func quantity(_ text: String) throws -> Quantity {
    guard let quantity = Quantity(rawValue: text) else { throw IngestStoreError.corrupt("quantity '\(text)'") }
    return quantity
}
