import FarmgateWire
import Logging
import PostgresNIO

/// The batches of one group commit (``PostgresGroupCommit``), written in one transaction with a fixed number of
/// statements whatever the group's size:
///
/// 1. lock the group's device rows (`FOR NO KEY UPDATE`, in id order, so that two groups never deadlock) and read the
///    registered sensors the batches name, in one statement: a device's batches are serialised, other devices' run
///    beside them in other groups. Not `FOR UPDATE`: that also waits for every `FOR KEY SHARE` a foreign-key check takes
///    on the device row (the alert engine's watermark upsert, a new sensor, a calibration), which made writes queue
///    behind the engine under load;
/// 2. register the sensors not found, up to `[limits] sensors_per_device` per device (a count, then `INSERT ... ON
///    CONFLICT DO NOTHING RETURNING`, then read again what another writer registered meanwhile);
/// 3. read the devices' stored sequence ranges around the batches (``PostgresSchema``: the authority on what was ever
///    stored, across partitions and after retention);
/// 4. read the stored chunks of sequences inside those ranges, and compare (duplicate or `sequence_conflict`), batch by
///    batch in arrival order, so that a batch sees what an earlier one of the same device stored in this group; a
///    sequence whose chunk retention removed is judged by `retention_cutoff` (one more statement, only then);
/// 5. in one statement: insert the new readings as chunks (``PostgresReadingChunk``), merge their sequences into the
///    ranges, raise `highest_sequence`, upsert `latest`, merge the rollups and notify the other instances.
///
/// With `BEGIN` and `COMMIT` that is five round trips for a group whose sensors are registered and whose sequences are
/// new (the first statement also sets the timeout), one more when some were stored before and must be compared, two
/// or three more when a sensor is new.
///
/// A batch whose own statements fail (a device deleted meanwhile, a server-side refusal of its data) is reported
/// through ``MemberFailure`` so that the group commits without it (``PostgresGroupCommit`` retries the others); a
/// failure of the connection or the transaction fails the group.
struct PostgresBatchWriter {
    /// One batch of the group.
    struct Member: Sendable {
        var batch: Batch
        var device: DeviceIdentity
        var receivedAt: Timestamp
    }

    /// The batch at `index` cannot be written; the others can be, without it.
    struct MemberFailure: Error {
        var index: Int
        var error: any Error
    }

    let connection: PostgresConnection
    /// The transaction's `statement_timeout` in milliseconds, set by its first statement (the device locks); nil for none.
    var statementTimeout: Int64?
    /// How many sensors one device may register (`[limits] sensors_per_device`).
    var sensorLimit: Int = IngestConfiguration.Limits.defaultSensorsPerDevice
    let logger: Logger

    private struct Candidate {
        var reading: Reading
        var sequence: Int64
        var sensorRow: Int64
        var resolution: Resolution?
        /// The quantity the batch declares for the reading's sensor.
        var quantity: Quantity?
    }

    private struct StoredRow {
        var sensorRow: Int64
        var timestamp: Int64
        var value: Double
        var flags: Int16
    }

    /// What one member brings after its sensors were looked up.
    private struct Prepared {
        var slots: BatchSensorSlots
        var seen: [SensorID: Quantity] = [:]
        var names: [Int64: String] = [:]
        var rejected: [RejectedReading] = []
        var candidates: [Candidate] = []
    }

    private struct SensorKey: Hashable {
        var device: Int64
        var name: String
    }

    /// Writes `members`; returns one result per member, in order. Fails as a whole only for what no single batch caused.
    ///
    /// - Throws: ``MemberFailure`` naming the batch whose statements failed (the transaction is then unusable: the
    ///   caller rolls back and writes the others again), or the connection's error.
    func write(_ members: [Member]) async throws -> [Result<StoreOutcome, any Error>] {
        var results = [Result<StoreOutcome, any Error>?](repeating: nil, count: members.count)

        // What each batch declares (and uses), before anything is asked.
        var prepared: [Int: Prepared] = [:]
        var declaredByMember: [Int: [SensorDescriptor]] = [:]
        var conflictsByMember: [Int: [SensorID: (registered: String, sent: Quantity)]] = [:]
        var wanted: [SensorKey: SensorDescriptor] = [:]
        // The order sensors are first declared in (the group's batches in turn): past `sensors_per_device` the first
        // declared are taken, as the SQLite store takes them.
        var declarationOrder: [SensorKey: Int] = [:]
        for index in members.indices {
            let batch = members[index].batch
            var member = Prepared(slots: BatchSensorSlots(batch.readings))
            var declared: [SensorDescriptor] = []
            var conflicts: [SensorID: (registered: String, sent: Quantity)] = [:]
            for descriptor in batch.sensors where member.slots.uses(descriptor.id) {
                if let earlier = member.seen[descriptor.id] {
                    if earlier != descriptor.quantity { conflicts[descriptor.id] = (earlier.rawValue, descriptor.quantity) }
                    continue
                }
                member.seen[descriptor.id] = descriptor.quantity
                declared.append(descriptor)
                let key = SensorKey(device: members[index].device.rowID, name: descriptor.id.rawValue)
                wanted[key] = descriptor
                if declarationOrder[key] == nil { declarationOrder[key] = declarationOrder.count }
            }
            prepared[index] = member
            declaredByMember[index] = declared
            conflictsByMember[index] = conflicts
        }

        // 1. The device locks, in id order, with the registered sensors the batches name (one statement).
        let (present, known) = try await lockDevices(Array(Set(members.map(\.device.rowID))).sorted(), sensors: Array(wanted.keys))
        for (index, member) in members.enumerated() where !present.contains(member.device.rowID) {
            results[index] = .failure(IngestStoreError.notFound("device '\(member.device.device)' in farm '\(member.device.farm)'"))
        }
        let live = members.indices.filter { results[$0] == nil }

        // 2. Sensors not registered yet, for the whole group at once.
        let (registered, overLimit) = try await register(
            wanted.filter { present.contains($0.key.device) }, order: declarationOrder, known: known, receivedAt: members[live.first ?? 0].receivedAt)

        for index in live {
            guard var member = prepared[index], var conflicts = conflictsByMember[index] else { continue }
            let deviceRow = members[index].device.rowID
            var sensorRows: [SensorID: Int64] = [:]
            var resolutions: [SensorID: Resolution] = [:]
            var memberOverLimit: Set<SensorID> = []
            for descriptor in declaredByMember[index] ?? [] {
                let key = SensorKey(device: deviceRow, name: descriptor.id.rawValue)
                if overLimit.contains(key) {
                    memberOverLimit.insert(descriptor.id)
                    continue
                }
                guard let row = registered[key] else {
                    results[index] = .failure(IngestStoreError.corrupt("sensor '\(descriptor.id)' was registered but cannot be read back"))
                    break
                }
                if conflicts[descriptor.id] != nil { continue }
                if row.quantity != descriptor.quantity.rawValue {
                    conflicts[descriptor.id] = (row.quantity, descriptor.quantity)
                    continue
                }
                sensorRows[descriptor.id] = row.id
                resolutions[descriptor.id] = descriptor.resolution
                member.names[row.id] = descriptor.id.rawValue
            }
            guard results[index] == nil else { continue }
            let placements = member.slots.placements(conflicts: conflicts, sensorRows: sensorRows, overLimit: memberOverLimit, sensorLimit: sensorLimit)
            let quantities = member.slots.sensors.map { member.seen[$0] }
            let slotResolutions = member.slots.sensors.map { resolutions[$0] }
            member.candidates.reserveCapacity(members[index].batch.readings.count)
            for (reading, slot) in zip(members[index].batch.readings, member.slots.ofReading) {
                switch ReadingPlacement(reading, sensor: placements[slot]) {
                case .refuse(let refusal):
                    member.rejected.append(refusal)
                case .place(let sequence, let sensorRow):
                    member.candidates.append(
                        Candidate(reading: reading, sequence: sequence, sensorRow: sensorRow, resolution: slotResolutions[slot], quantity: quantities[slot]))
                }
            }
            prepared[index] = member
        }

        // 3. The stored ranges that touch the group's sequences (adjacent ones too, to merge with), per device.
        var bounds: [Int64: ClosedRange<Int64>] = [:]
        for index in live {
            guard let span = Self.span(of: prepared[index]?.candidates ?? [], where: { _ in true }) else { continue }
            let device = members[index].device.rowID
            bounds[device] = bounds[device].map { min($0.lowerBound, span.lowerBound)...max($0.upperBound, span.upperBound) } ?? span
        }
        var storedRanges: [Int64: [ClosedRange<Int64>]] = [:]
        if !bounds.isEmpty {
            let devices = Array(bounds.keys)
            let lows = devices.map { bounds[$0].map { $0.lowerBound == 0 ? 0 : $0.lowerBound - 1 } ?? 0 }
            let highs = devices.map { bounds[$0].map { $0.upperBound == Int64.max ? $0.upperBound : $0.upperBound + 1 } ?? 0 }
            for try await (device, first, last) in try await connection.query(
                """
                SELECT s.device_id::int8, s.first_sequence, s.last_sequence
                FROM stored_sequences s JOIN unnest(\(devices)::int8[], \(lows)::int8[], \(highs)::int8[]) AS u(d, lo, hi)
                    ON s.device_id = u.d AND s.last_sequence >= u.lo AND s.first_sequence <= u.hi
                ORDER BY 1, 2
                """, logger: logger
            ).decode((Int64, Int64, Int64).self) {
                storedRanges[device, default: []].append(first...last)
            }
        }

        // 4. The stored readings of sequences inside those ranges, to compare with.
        var toFetch: [Int64: ClosedRange<Int64>] = [:]
        for index in live {
            let device = members[index].device.rowID
            guard let deviceRanges = storedRanges[device],
                let span = Self.span(of: prepared[index]?.candidates ?? [], where: { Self.contains(deviceRanges, $0) })
            else { continue }
            toFetch[device] = toFetch[device].map { min($0.lowerBound, span.lowerBound)...max($0.upperBound, span.upperBound) } ?? span
        }
        var storedRows: [Int64: [Int64: StoredRow]] = [:]
        if !toFetch.isEmpty {
            let devices = Array(toFetch.keys)
            let lows = devices.map { toFetch[$0]?.lowerBound ?? 0 }
            let highs = devices.map { toFetch[$0]?.upperBound ?? 0 }
            for try await (device, sensor, firstSequence, firstTimestamp, sequenceOffsets, timeOffsets, values, flags) in try await connection.query(
                """
                SELECT r.device_id::int8, r.sensor_id::int8, r.first_sequence, r.first_ts, r.sequence_offsets, r.time_offsets, r.reading_values, r.flags
                FROM readings r JOIN unnest(\(devices)::int8[], \(lows)::int8[], \(highs)::int8[]) AS u(d, lo, hi)
                    ON r.device_id = u.d AND r.first_sequence >= u.lo - \(PostgresReadingChunk.maximumSequenceSpan) AND r.first_sequence <= u.hi
                    AND r.last_sequence >= u.lo
                """, logger: logger
            ).decode((Int64, Int64, Int64, Int64, [Int32], [Int32], [Double], [Int16]?).self) {
                let entries = try PostgresReadingChunk.entries(
                    firstSequence: firstSequence, firstTimestamp: firstTimestamp, sequenceOffsets: sequenceOffsets, timeOffsets: timeOffsets,
                    values: values, flags: flags)
                for entry in entries {
                    storedRows[device, default: [:]][entry.sequence] = StoredRow(
                        sensorRow: sensor, timestamp: entry.timestamp, value: entry.value, flags: entry.flags)
                }
            }
        }

        // 5. Sort each batch, in arrival order, into new readings, duplicates and conflicts.
        var ranges = storedRanges
        var storedInGroup: [Int64: [Int64: StoredRow]] = [:]
        // How many of the group's batches each device still has to come: what a batch stores is kept for comparison
        // only when a later batch of its device may repeat it (most groups hold one batch per device).
        var batchesToCome: [Int64: Int] = [:]
        for index in live where results[index] == nil { batchesToCome[members[index].device.rowID, default: 0] += 1 }
        var freshByMember: [Int: [Candidate]] = [:]
        // The newest raw cut-off retention applied, read once the group meets a sequence whose chunk is gone.
        var retentionCutoff: Timestamp?
        var retentionCutoffRead = false
        for index in live where results[index] == nil {
            guard let member = prepared[index] else { continue }
            let device = members[index].device.rowID
            var rejected = member.rejected
            // The readings to insert, in the batch's order, and (only when the batch's sequences do not ascend, as sites
            // send them, so that one may repeat) where each sequence's first one is.
            var inserted: [Candidate] = []
            inserted.reserveCapacity(member.candidates.count)
            let ascending = zip(member.candidates, member.candidates.dropFirst()).allSatisfy { $0.sequence < $1.sequence }
            var firstOf: [Int64: Int] = [:]
            var toCompare: [Candidate] = []
            var inBatchRepeats: [Candidate] = []
            let deviceRanges = ranges[device] ?? []
            for candidate in member.candidates {
                if Self.contains(deviceRanges, candidate.sequence) {
                    toCompare.append(candidate)
                } else if !ascending, firstOf[candidate.sequence] != nil {
                    inBatchRepeats.append(candidate)
                } else {
                    if !ascending { firstOf[candidate.sequence] = inserted.count }
                    inserted.append(candidate)
                }
            }
            var duplicates = 0
            do {
                for candidate in toCompare {
                    if let stored = storedInGroup[device]?[candidate.sequence] ?? storedRows[device]?[candidate.sequence] {
                        let differences = try await self.differences(candidate, stored: stored, names: member.names)
                        if differences.isEmpty {
                            duplicates += 1
                        } else {
                            rejected.append(SequenceComparison.conflict(candidate.reading, differences: differences, inThisBatch: false))
                        }
                    } else {
                        // Stored and acknowledged once, its chunk since dropped with its partition (retention): a
                        // duplicate when older than the cut-off that removed it, else another reading numbered alike.
                        if !retentionCutoffRead {
                            retentionCutoff = try await readRetentionCutoff()
                            retentionCutoffRead = true
                        }
                        if let refusal = SequenceComparison.retired(candidate.reading, removedBefore: retentionCutoff) {
                            rejected.append(refusal)
                        } else {
                            duplicates += 1
                        }
                    }
                }
                for candidate in inBatchRepeats {
                    guard let first = firstOf[candidate.sequence].map({ inserted[$0] }) else { continue }
                    let differences = try await self.differences(candidate, stored: Self.row(first), names: member.names)
                    if differences.isEmpty {
                        duplicates += 1
                    } else {
                        rejected.append(SequenceComparison.conflict(candidate.reading, differences: differences, inThisBatch: true))
                    }
                }
            } catch let error as PSQLError where Self.isCausedByData(error) {
                throw MemberFailure(index: index, error: error)
            }
            ranges[device] = Self.merge(ranges[device] ?? [], adding: inserted.map(\.sequence))
            batchesToCome[device, default: 1] -= 1
            if batchesToCome[device, default: 0] > 0 {
                for candidate in inserted { storedInGroup[device, default: [:]][candidate.sequence] = Self.row(candidate) }
            }
            freshByMember[index] = inserted
            let committed = inserted.compactMap { candidate in
                candidate.quantity.map { CommittedReading(candidate.reading, sensorRowID: candidate.sensorRow, quantity: $0) }
            }
            results[index] = .success(StoreOutcome(accepted: inserted.count, duplicates: duplicates, rejected: rejected, fresh: committed))
        }

        // 6. One statement for everything the group stored: readings, bookkeeping, rollups, notifications.
        let allFresh = live.compactMap { index in freshByMember[index].map { (members[index].device.rowID, $0) } }
        if allFresh.contains(where: { !$0.1.isEmpty }) {
            let changed = live.filter { freshByMember[$0]?.isEmpty == false }.map { members[$0].device }
            let committed = results.flatMap { result in (try? result?.get())?.fresh ?? [] }
            try await store(allFresh, committed: committed, storedRanges: storedRanges, ranges: ranges, changed: changed)
        }
        return results.map { $0 ?? .failure(IngestStoreError.corrupt("a batch of the group was neither written nor refused")) }
    }

    /// The newest raw cut-off a retention run applied (`retention_cutoff`, see ``PostgresSchema``): every chunk
    /// retention dropped or deleted was older. Nil when no run has recorded one. Read after the chunks were (step 4),
    /// so a chunk that run removed is never missing without its cut-off: the run records it in the transaction that
    /// drops the chunk.
    private func readRetentionCutoff() async throws -> Timestamp? {
        try await PostgresIngestStore.appliedRawCutoff(on: connection, logger: logger)
    }

    /// Stores what the group brought for the first time with one statement, so that a group costs the same few round
    /// trips whatever it holds (on a busy machine each round trip is a chance to wait for a core while the transaction
    /// holds its device locks). Its parts, as data-modifying CTEs (all run, in one snapshot, on different rows):
    /// - the readings as chunks (``PostgresReadingChunk``): the chunks' scalar columns as arrays, their readings'
    ///   columns concatenated, each chunk taking its slice (`[start:end]`);
    /// - the bookkeeping: the new sequences merged into `stored_sequences`, `highest_sequence` raised, `latest` upserted;
    /// - the 1-minute, 1-hour and 1-day rollups of `committed` (partial aggregates computed here, one row per sensor
    ///   and bucket, merged with ``RollupSQL/merge(table:excluded:)``): duplicates never reach them, so nothing counts
    ///   twice, and a backlog days late merges into its old buckets. Rows go in (sensor, bucket) order; a sensor belongs
    ///   to one device, whose batches the device lock serialises, so two transactions never wait on the same rows;
    /// - one ``PostgresLatestNotice`` per changed device (`pg_notify` in the statement's final `SELECT`).
    private func store(
        _ fresh: [(device: Int64, readings: [Candidate])], committed: [CommittedReading], storedRanges: [Int64: [ClosedRange<Int64>]],
        ranges: [Int64: [ClosedRange<Int64>]], changed: [DeviceIdentity]
    ) async throws {
        let chunks = ChunkColumns(fresh)
        let book = Bookkeeping(fresh, storedRanges: storedRanges, ranges: ranges)
        let rollups = RollupColumns(committed)
        let notices = PostgresLatestNotice.payloads(changed)
        try await connection.query(
            """
            WITH chunks AS (
                INSERT INTO readings(first_ts, last_ts, first_sequence, last_sequence, device_id, sensor_id, sequence_offsets, time_offsets, reading_values, flags)
                SELECT u.ft, u.lt, u.fs, u.ls, u.d, u.k, (\(chunks.sequenceOffsets.postgresArray)::int4[])[u.a:u.b], (\(chunks.timeOffsets.postgresArray)::int4[])[u.a:u.b],
                    (\(chunks.values.postgresArray)::float8[])[u.a:u.b], CASE WHEN u.f THEN (\(chunks.flags.postgresArray)::int2[])[u.a:u.b] END
                FROM unnest(\(chunks.firstTimestamps.postgresArray)::int8[], \(chunks.lastTimestamps.postgresArray)::int8[], \(chunks.firstSequences.postgresArray)::int8[], \(chunks.lastSequences.postgresArray)::int8[],
                    \(chunks.devices.postgresArray)::int8[], \(chunks.sensors.postgresArray)::int8[], \(chunks.starts.postgresArray)::int4[], \(chunks.ends.postgresArray)::int4[], \(chunks.flagged.postgresArray)::bool[]) AS u(ft, lt, fs, ls, d, k, a, b, f)
            ), gone AS (
                DELETE FROM stored_sequences s USING unnest(\(book.goneDevices.postgresArray)::int8[], \(book.goneFirsts.postgresArray)::int8[]) AS u(d, f)
                WHERE s.device_id = u.d AND s.first_sequence = u.f
            ), ranges AS (
                INSERT INTO stored_sequences(device_id, first_sequence, last_sequence)
                SELECT d, f, l FROM unnest(\(book.keptDevices.postgresArray)::int8[], \(book.keptFirsts.postgresArray)::int8[], \(book.keptLasts.postgresArray)::int8[]) AS u(d, f, l)
                ON CONFLICT (device_id, first_sequence) DO UPDATE SET last_sequence = excluded.last_sequence
            ), highest AS (
                UPDATE devices d SET highest_sequence = greatest(coalesce(d.highest_sequence, -1), u.top)
                FROM unnest(\(book.highestDevices.postgresArray)::int8[], \(book.highestValues.postgresArray)::int8[]) AS u(id, top) WHERE d.id = u.id
            ), newest AS (
                INSERT INTO latest(sensor_id, sequence, timestamp_us, value, flags)
                SELECT k, s, t, v, f FROM unnest(\(book.latestSensors.postgresArray)::int8[], \(book.latestSequences.postgresArray)::int8[], \(book.latestTimes.postgresArray)::int8[], \(book.latestValues.postgresArray)::float8[], \(book.latestFlags.postgresArray)::int2[]) AS u(k, s, t, v, f)
                ON CONFLICT (sensor_id) DO UPDATE SET
                    sequence = excluded.sequence, timestamp_us = excluded.timestamp_us, value = excluded.value, flags = excluded.flags
                WHERE excluded.timestamp_us > latest.timestamp_us
                    OR (excluded.timestamp_us = latest.timestamp_us AND excluded.sequence > latest.sequence)
            ), partials AS (
                SELECT * FROM unnest(\(rollups.levels.postgresArray)::int2[], \(rollups.sensors.postgresArray)::int8[], \(rollups.buckets.postgresArray)::int8[], \(rollups.counts.postgresArray)::int8[],
                    \(rollups.valid.postgresArray)::int8[], \(rollups.sums.postgresArray)::float8[], \(rollups.mins.postgresArray)::float8[], \(rollups.maxes.postgresArray)::float8[], \(rollups.lastTimes.postgresArray)::int8[],
                    \(rollups.lastSequences.postgresArray)::int8[], \(rollups.lastValues.postgresArray)::float8[]) AS u(level, k, b, n, v, s, lo, hi, lt, ls, lv)
            ), \(unescaped: RollupColumns.inserts)
            SELECT count(pg_notify(\(PostgresLatestNotice.channel), p)) FROM unnest(\(notices)::text[]) AS u(p)
            """, logger: logger)
    }

    /// The chunk rows of `readings`, column by column, for ``store(_:committed:storedRanges:ranges:changed:)``.
    private struct ChunkColumns {
        var firstTimestamps: [Int64] = [], lastTimestamps: [Int64] = [], firstSequences: [Int64] = [], lastSequences: [Int64] = []
        var devices: [Int64] = [], sensors: [Int64] = [], starts: [Int32] = [], ends: [Int32] = [], flagged: [Bool] = []
        var sequenceOffsets: [Int32] = [], timeOffsets: [Int32] = [], values: [Double] = [], flags: [Int16] = []

        init(_ fresh: [(device: Int64, readings: [Candidate])]) {
            struct ChunkKey: Hashable {
                var device: Int64
                var sensor: Int64
            }
            var entries: [ChunkKey: [PostgresReadingChunk.Entry]] = [:]
            for (device, readings) in fresh {
                for candidate in readings {
                    entries[ChunkKey(device: device, sensor: candidate.sensorRow), default: []].append(
                        .init(
                            sequence: candidate.sequence, timestamp: candidate.reading.timestamp.microseconds, value: candidate.reading.value,
                            flags: Int16(bitPattern: candidate.reading.quality.rawValue)))
                }
            }
            for (key, list) in entries {
                for chunk in PostgresReadingChunk.cut(deviceRow: key.device, sensorRow: key.sensor, entries: list) {
                    firstTimestamps.append(chunk.firstTimestamp)
                    lastTimestamps.append(chunk.lastTimestamp)
                    firstSequences.append(chunk.firstSequence)
                    lastSequences.append(chunk.lastSequence)
                    devices.append(chunk.deviceRow)
                    sensors.append(chunk.sensorRow)
                    starts.append(Int32(values.count + 1))
                    sequenceOffsets += chunk.sequenceOffsets
                    timeOffsets += chunk.timeOffsets
                    values += chunk.values
                    let chunkFlags = chunk.flags
                    flagged.append(chunkFlags != nil)
                    flags += chunkFlags ?? Array(repeating: 0, count: chunk.entries.count)
                    ends.append(Int32(values.count))
                }
            }
        }
    }

    /// The sequence ranges that went or changed, each device's highest sequence and each sensor's newest reading.
    private struct Bookkeeping {
        var goneDevices: [Int64] = [], goneFirsts: [Int64] = []
        var keptDevices: [Int64] = [], keptFirsts: [Int64] = [], keptLasts: [Int64] = []
        var highestDevices: [Int64] = [], highestValues: [Int64] = []
        var latestSensors: [Int64] = [], latestSequences: [Int64] = [], latestTimes: [Int64] = [], latestValues: [Double] = []
        var latestFlags: [Int16] = []

        init(_ fresh: [(device: Int64, readings: [Candidate])], storedRanges: [Int64: [ClosedRange<Int64>]], ranges: [Int64: [ClosedRange<Int64>]]) {
            var highest: [Int64: Int64] = [:]
            var newest: [Int64: Candidate] = [:]
            for (device, readings) in fresh {
                if let top = readings.lazy.map(\.sequence).max() { highest[device] = max(highest[device] ?? top, top) }
                for candidate in readings {
                    if let current = newest[candidate.sensorRow],
                        (current.reading.timestamp, current.sequence) >= (candidate.reading.timestamp, candidate.sequence)
                    {
                        continue
                    }
                    newest[candidate.sensorRow] = candidate
                }
            }
            for device in highest.keys {
                let before = storedRanges[device] ?? []
                let after = ranges[device] ?? []
                let afterFirsts = Set(after.map(\.lowerBound))
                for range in before where !afterFirsts.contains(range.lowerBound) {
                    goneDevices.append(device)
                    goneFirsts.append(range.lowerBound)
                }
                let unchanged = Set(before.map { [$0.lowerBound, $0.upperBound] })
                for range in after where !unchanged.contains([range.lowerBound, range.upperBound]) {
                    keptDevices.append(device)
                    keptFirsts.append(range.lowerBound)
                    keptLasts.append(range.upperBound)
                }
            }
            highestDevices = Array(highest.keys)
            highestValues = highestDevices.map { highest[$0] ?? 0 }
            let latest = Array(newest.values)
            latestSensors = latest.map(\.sensorRow)
            latestSequences = latest.map(\.sequence)
            latestTimes = latest.map(\.reading.timestamp.microseconds)
            latestValues = latest.map(\.reading.value)
            latestFlags = latest.map { Int16(bitPattern: $0.reading.quality.rawValue) }
        }
    }

    /// The partial aggregates of every rollup level, column by column, each row with its level's index in
    /// `RollupLevel.allCases`; ``inserts`` merges them from the statement's `partials`.
    private struct RollupColumns {
        /// One CTE per level: `INSERT INTO rollups_<level> ... SELECT FROM partials WHERE level = <index> ON CONFLICT ...`
        /// (statistics only from valid readings, NULL when none was).
        static let inserts = RollupLevel.allCases.enumerated().map { index, level in
            """
            rollup_\(index) AS (
                INSERT INTO \(level.table) (sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_sequence, last_value)
                SELECT k, b, n, v, s, CASE WHEN v > 0 THEN lo END, CASE WHEN v > 0 THEN hi END, CASE WHEN v > 0 THEN lt END,
                    CASE WHEN v > 0 THEN ls END, CASE WHEN v > 0 THEN lv END
                FROM partials WHERE level = \(index)
                \(RollupSQL.merge(table: level.table))
            )
            """
        }.joined(separator: ", ")

        var levels: [Int16] = [], sensors: [Int64] = [], buckets: [Int64] = [], counts: [Int64] = [], valid: [Int64] = []
        var sums: [Double] = [], mins: [Double] = [], maxes: [Double] = [], lastTimes: [Int64] = [], lastSequences: [Int64] = []
        var lastValues: [Double] = []

        init(_ readings: [CommittedReading]) {
            for (index, partials) in RollupPartial.partialsByLevel(of: readings).enumerated() {
                for partial in partials {
                    levels.append(Int16(index))
                    sensors.append(partial.sensorRowID)
                    buckets.append(partial.bucket)
                    counts.append(partial.count)
                    valid.append(partial.validCount)
                    sums.append(partial.sum)
                    mins.append(partial.min)
                    maxes.append(partial.max)
                    lastTimes.append(partial.lastTimestamp)
                    lastSequences.append(partial.lastSequence)
                    lastValues.append(partial.lastValue)
                }
            }
        }
    }

    /// A registered sensor as the lock statement read it.
    private struct KnownSensor {
        var id: Int64
        var quantity: String
        var numerator: Int64
        var denominator: Int64
    }

    /// Locks `devices` (`FOR NO KEY UPDATE`, in id order, so that two groups never deadlock) and reads the registered
    /// sensors among `sensors`, in one statement that also sets the transaction's timeouts. Returns the devices that
    /// exist and the sensors found.
    ///
    /// The timeouts (``statementTimeout``, both `SET LOCAL`): `statement_timeout` for the statements after this one
    /// (a statement's own is armed when it starts), and `lock_timeout`, which PostgreSQL reads when a lock wait begins,
    /// so it bounds this statement's wait for a device another transaction holds: `settings` is a relation of the
    /// locking query, evaluated before its first row is locked. A wait past it fails the group (`55P03`), as a
    /// statement timeout would, rather than holding a pooled connection after the caller gave up.
    ///
    /// The sensors are read in the statement's snapshot, which may predate the wait for a lock: a sensor another group
    /// registered meanwhile is then missing here, and ``register(_:known:receivedAt:)`` finds it after its insert
    /// conflicts. Sensors are never deleted, so what is found here exists.
    private func lockDevices(_ devices: [Int64], sensors: [SensorKey]) async throws -> (present: Set<Int64>, known: [SensorKey: KnownSensor]) {
        // Digits only (an integer), so it can be written into the statement.
        let setting = statementTimeout.map { "set_config('statement_timeout', '\($0)', true), set_config('lock_timeout', '\($0)', true)" } ?? "'', ''"
        var present = Set<Int64>()
        var known: [SensorKey: KnownSensor] = [:]
        for try await (device, id, name, quantity, numerator, denominator) in try await connection.query(
            """
            WITH settings AS MATERIALIZED (SELECT \(unescaped: setting)),
            locked AS MATERIALIZED (
                SELECT d.id FROM devices d CROSS JOIN settings WHERE d.id = ANY(\(devices)) ORDER BY d.id FOR NO KEY UPDATE OF d
            )
            SELECT l.id::int8, s.id::int8, s.name, s.quantity, s.resolution_numerator, s.resolution_denominator
            FROM locked l
            LEFT JOIN (sensors s JOIN unnest(\(sensors.map(\.device))::int8[], \(sensors.map(\.name))::text[]) AS u(d, n) ON s.device_id = u.d AND s.name = u.n)
                ON s.device_id = l.id
            """, logger: logger
        ).decode((Int64, Int64?, String?, String?, Int64?, Int64?).self) {
            present.insert(device)
            if let id, let name, let quantity, let numerator, let denominator {
                known[SensorKey(device: device, name: name)] = KnownSensor(id: id, quantity: quantity, numerator: numerator, denominator: denominator)
            }
        }
        return (present, known)
    }

    /// Registers the `wanted` sensors that are not `known` (by device and name); returns every one's id and registered
    /// quantity, and the new ones not registered because their device has ``sensorLimit`` sensors already. New sensors
    /// are inserted with `ON CONFLICT DO NOTHING RETURNING` and whatever another writer registered meanwhile is read
    /// after that insert; an existing sensor's resolution follows the batch's while the quantity agrees. Past the limit
    /// the new sensors are taken in `order` (their first declaration in the group).
    private func register(
        _ wanted: [SensorKey: SensorDescriptor], order: [SensorKey: Int], known: [SensorKey: KnownSensor], receivedAt: Timestamp
    ) async throws -> (found: [SensorKey: (id: Int64, quantity: String)], overLimit: Set<SensorKey>) {
        guard !wanted.isEmpty else { return ([:], []) }
        var found: [SensorKey: (id: Int64, quantity: String)] = [:]
        var resolutionChanged: [SensorKey] = []
        let keys = Array(wanted.keys)
        for key in keys {
            guard let sensor = known[key] else { continue }
            found[key] = (sensor.id, sensor.quantity)
            if let descriptor = wanted[key], descriptor.quantity.rawValue == sensor.quantity,
                (Int64(descriptor.resolution.numerator), Int64(descriptor.resolution.denominator)) != (sensor.numerator, sensor.denominator)
            {
                resolutionChanged.append(key)
            }
        }
        if !resolutionChanged.isEmpty {
            let descriptors = resolutionChanged.compactMap { wanted[$0] }
            try await connection.query(
                """
                UPDATE sensors s SET resolution_numerator = u.rn, resolution_denominator = u.rd
                FROM unnest(\(resolutionChanged.map(\.device))::int8[], \(resolutionChanged.map(\.name))::text[], \(descriptors.map { Int64($0.resolution.numerator) })::int8[], \(descriptors.map { Int64($0.resolution.denominator) })::int8[]) AS u(d, n, rn, rd)
                WHERE s.device_id = u.d AND s.name = u.n
                """, logger: logger)
        }
        var missing = keys.filter { found[$0] == nil }
        guard !missing.isEmpty else { return (found, []) }
        // `[limits] sensors_per_device`, counted only when a sensor is new (one more round trip). The devices are locked
        // by this transaction, so no other batch registers sensors of theirs meanwhile. Past the limit the new sensors
        // are taken in the order the batches declare them (a tester, 2026-12-07: in name order here, in declaration
        // order on SQLite, so the two stores kept different sensors of one batch).
        var counts: [Int64: Int] = [:]
        let devices = Array(Set(missing.map(\.device))).sorted()
        for try await (device, count) in try await connection.query(
            "SELECT device_id::int8, count(*)::int8 FROM sensors WHERE device_id = ANY(\(devices)) GROUP BY device_id", logger: logger
        ).decode((Int64, Int64).self) {
            counts[device] = Int(count)
        }
        var overLimit = Set<SensorKey>()
        missing = missing.sorted { (order[$0] ?? .max, $0.name) < (order[$1] ?? .max, $1.name) }.filter { key in
            let count = counts[key.device, default: 0]
            guard count < sensorLimit else {
                overLimit.insert(key)
                return false
            }
            counts[key.device] = count + 1
            return true
        }
        guard !missing.isEmpty else { return (found, overLimit) }
        let descriptors = missing.compactMap { wanted[$0] }
        for try await (id, device, name, quantity) in try await connection.query(
            """
            INSERT INTO sensors(device_id, name, quantity, resolution_numerator, resolution_denominator, first_seen_us)
            SELECT d, n, q, rn, rd, \(receivedAt.microseconds)
            FROM unnest(\(missing.map(\.device))::int8[], \(missing.map(\.name))::text[], \(descriptors.map(\.quantity.rawValue))::text[], \(descriptors.map { Int64($0.resolution.numerator) })::int8[], \(descriptors.map { Int64($0.resolution.denominator) })::int8[]) AS u(d, n, q, rn, rd)
            ON CONFLICT (device_id, name) DO NOTHING
            RETURNING id::int8, device_id::int8, name, quantity
            """, logger: logger
        ).decode((Int64, Int64, String, String).self) {
            found[SensorKey(device: device, name: name)] = (id, quantity)
        }
        let unread = missing.filter { found[$0] == nil }
        guard !unread.isEmpty else { return (found, overLimit) }
        for try await (id, device, name, quantity) in try await connection.query(
            """
            SELECT s.id::int8, s.device_id::int8, s.name, s.quantity
            FROM sensors s JOIN unnest(\(unread.map(\.device))::int8[], \(unread.map(\.name))::text[]) AS u(d, n) ON s.device_id = u.d AND s.name = u.n
            """, logger: logger
        ).decode((Int64, Int64, String, String).self) {
            found[SensorKey(device: device, name: name)] = (id, quantity)
        }
        return (found, overLimit)
    }

    /// What differs between `candidate` and the stored row, each as "field (stored X, sent Y)"; empty for the same
    /// reading (same sensor, timestamp and flags, the same value in whole steps of the sensor's resolution).
    private func differences(_ candidate: Candidate, stored: StoredRow, names: [Int64: String]) async throws -> [String] {
        var storedSensor: String?
        if stored.sensorRow != candidate.sensorRow {
            storedSensor = names[stored.sensorRow]
            if storedSensor == nil {
                for try await found in try await connection.query("SELECT name FROM sensors WHERE id = \(stored.sensorRow)", logger: logger).decode(String.self) {
                    storedSensor = found
                }
            }
            storedSensor = storedSensor ?? "#\(stored.sensorRow)"
        }
        return SequenceComparison.differences(
            candidate.reading, resolution: candidate.resolution, storedSensor: storedSensor, storedTimestamp: stored.timestamp,
            storedValue: stored.value, storedFlags: QualityFlags(rawValue: UInt16(bitPattern: stored.flags)))
    }

    private static func row(_ candidate: Candidate) -> StoredRow {
        StoredRow(
            sensorRow: candidate.sensorRow, timestamp: candidate.reading.timestamp.microseconds, value: candidate.reading.value,
            flags: Int16(bitPattern: candidate.reading.quality.rawValue))
    }

    /// The lowest through the highest sequence of the candidates that pass `included`; nil when none does.
    private static func span(of candidates: [Candidate], where included: (Int64) -> Bool) -> ClosedRange<Int64>? {
        var low = Int64.max
        var high = Int64.min
        for candidate in candidates where included(candidate.sequence) {
            low = min(low, candidate.sequence)
            high = max(high, candidate.sequence)
        }
        return low <= high ? low...high : nil
    }

    /// Whether `sequence` lies in one of `ranges` (sorted, disjoint).
    static func contains(_ ranges: [ClosedRange<Int64>], _ sequence: Int64) -> Bool {
        var low = 0
        var high = ranges.count - 1
        while low <= high {
            let middle = (low + high) / 2
            if ranges[middle].contains(sequence) { return true }
            if sequence < ranges[middle].lowerBound { high = middle - 1 } else { low = middle + 1 }
        }
        return false
    }

    /// Whether the server refused a statement because of the data it was given (the batch's fault, so the group goes on
    /// without it), rather than because of the connection, the server's state or a timeout (the group's fault).
    static func isCausedByData(_ error: PSQLError) -> Bool {
        guard let state = error.serverInfo?[.sqlState] else { return false }
        // 08 connection, 40 rollback (serialization, deadlock), 53 resources, 54 limits, 55 object state,
        // 57 operator intervention (statement_timeout, shutdown), 58 system, XX internal.
        return !["08", "40", "53", "54", "55", "57", "58", "XX"].contains(String(state.prefix(2)))
    }

    /// `ranges` (sorted, disjoint) with `sequences` added, adjacent and overlapping ranges joined.
    static func merge(_ ranges: [ClosedRange<Int64>], adding sequences: [Int64]) -> [ClosedRange<Int64>] {
        var all = ranges + sequences.map { $0...$0 }
        all.sort { $0.lowerBound < $1.lowerBound }
        var merged: [ClosedRange<Int64>] = []
        for range in all {
            if let last = merged.last, last.upperBound == Int64.max || range.lowerBound <= last.upperBound + 1 {
                merged[merged.count - 1] = last.lowerBound...max(last.upperBound, range.upperBound)
            } else {
                merged.append(range)
            }
        }
        return merged
    }
}
