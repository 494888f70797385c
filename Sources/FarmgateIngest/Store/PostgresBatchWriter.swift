import FarmgateWire
import Logging
import PostgresNIO

/// One batch's write transaction on PostgreSQL: a fixed number of statements whatever the batch's size.
///
/// 1. lock the device row (`FOR UPDATE`): this device's batches are serialised, other devices' run beside it;
/// 2. register the batch's sensors (`INSERT ... ON CONFLICT DO NOTHING RETURNING`, plus the rows that already existed);
/// 3. read the device's stored sequence ranges around the batch (``PostgresSchema``: the authority on what was ever
///    stored, across partitions and after retention);
/// 4. read back the stored rows of sequences inside those ranges, compare (duplicate or `sequence_conflict`);
/// 5. insert the new readings from arrays (`unnest`), merge their sequences into the ranges, raise
///    `highest_sequence`, upsert `latest`.
struct PostgresBatchWriter {
    let connection: PostgresConnection
    let device: DeviceIdentity
    let receivedAt: Timestamp
    let logger: Logger

    private struct Candidate {
        var reading: Reading
        var sequence: Int64
        var sensorRow: Int64
        var resolution: Resolution?
    }

    private struct StoredRow {
        var sensorRow: Int64
        var timestamp: Int64
        var value: Double
        var flags: Int16
    }

    func store(_ batch: Batch) async throws -> StoreOutcome {
        let deviceRow = device.rowID
        // 1. The device lock.
        var locked = false
        for try await _ in try await connection.query("SELECT id FROM devices WHERE id = \(deviceRow) FOR UPDATE", logger: logger) { locked = true }
        guard locked else { throw IngestStoreError.notFound("device '\(device.device)' in farm '\(device.farm)'") }

        // 2. Sensors.
        let used = Set(batch.readings.map(\.sensor))
        var declared: [SensorDescriptor] = []
        var conflicts: [SensorID: (registered: String, sent: Quantity)] = [:]
        var seen: [SensorID: Quantity] = [:]
        for descriptor in batch.sensors where used.contains(descriptor.id) {
            if let earlier = seen[descriptor.id] {
                if earlier != descriptor.quantity { conflicts[descriptor.id] = (earlier.rawValue, descriptor.quantity) }
                continue
            }
            seen[descriptor.id] = descriptor.quantity
            declared.append(descriptor)
        }
        let registered = try await register(declared)
        var sensorRows: [SensorID: Int64] = [:]
        var resolutions: [SensorID: Resolution] = [:]
        for descriptor in declared {
            guard let row = registered[descriptor.id.rawValue] else {
                throw IngestStoreError.corrupt("sensor '\(descriptor.id)' was registered but cannot be read back")
            }
            if conflicts[descriptor.id] != nil { continue }
            if row.quantity != descriptor.quantity.rawValue {
                conflicts[descriptor.id] = (row.quantity, descriptor.quantity)
                continue
            }
            sensorRows[descriptor.id] = row.id
            resolutions[descriptor.id] = descriptor.resolution
        }

        // Readings the store refuses before looking at sequences.
        var rejected: [RejectedReading] = []
        var candidates: [Candidate] = []
        for reading in batch.readings {
            let sequence: Int64
            let sensorRow: Int64
            switch ReadingPlacement(reading, conflicts: conflicts, sensorRows: sensorRows) {
            case .refuse(let refusal):
                rejected.append(refusal)
                continue
            case .place(let placed, let row):
                (sequence, sensorRow) = (placed, row)
            }
            candidates.append(Candidate(reading: reading, sequence: sequence, sensorRow: sensorRow, resolution: resolutions[reading.sensor]))
        }
        guard let lowest = candidates.map(\.sequence).min(), let highest = candidates.map(\.sequence).max() else {
            return StoreOutcome(accepted: 0, duplicates: 0, rejected: rejected)
        }

        // 3. The stored ranges that touch the batch (adjacent ones too, to merge with).
        var ranges: [ClosedRange<Int64>] = []
        for try await (first, last) in try await connection.query(
            """
            SELECT first_sequence, last_sequence FROM stored_sequences
            WHERE device_id = \(deviceRow) AND last_sequence >= \(lowest == 0 ? 0 : lowest - 1) AND first_sequence <= \(highest == Int64.max ? highest : highest + 1)
            ORDER BY first_sequence
            """, logger: logger
        ).decode((Int64, Int64).self) {
            ranges.append(first...last)
        }
        func everStored(_ sequence: Int64) -> Bool {
            var low = 0
            var high = ranges.count - 1
            while low <= high {
                let middle = (low + high) / 2
                if ranges[middle].contains(sequence) { return true }
                if sequence < ranges[middle].lowerBound { high = middle - 1 } else { low = middle + 1 }
            }
            return false
        }

        // 4. Sort into new readings and ones to compare.
        var fresh: [Int64: Candidate] = [:]
        var freshOrder: [Int64] = []
        var toCompare: [Candidate] = []
        var inBatchRepeats: [Candidate] = []
        for candidate in candidates {
            if everStored(candidate.sequence) {
                toCompare.append(candidate)
            } else if fresh[candidate.sequence] != nil {
                inBatchRepeats.append(candidate)
            } else {
                fresh[candidate.sequence] = candidate
                freshOrder.append(candidate.sequence)
            }
        }
        var duplicates = 0
        var storedRows: [Int64: StoredRow] = [:]
        if !toCompare.isEmpty {
            let sequences = Array(Set(toCompare.map(\.sequence)))
            for try await (sequence, sensor, timestamp, value, flags) in try await connection.query(
                "SELECT sequence, sensor_id::int8, timestamp_us, value, flags FROM readings WHERE device_id = \(deviceRow) AND sequence = ANY(\(sequences))",
                logger: logger
            ).decode((Int64, Int64, Int64, Double, Int16).self) {
                storedRows[sequence] = StoredRow(sensorRow: sensor, timestamp: timestamp, value: value, flags: flags)
            }
        }
        var sensorNames: [Int64: String] = [:]
        for (id, descriptor) in declared.compactMap({ descriptor in sensorRows[descriptor.id].map { ($0, descriptor) } }) {
            sensorNames[id] = descriptor.id.rawValue
        }
        func judge(_ candidate: Candidate, against stored: StoredRow) async throws {
            let differences = try await self.differences(candidate, stored: stored, names: sensorNames)
            if differences.isEmpty {
                duplicates += 1
                return
            }
            rejected.append(SequenceComparison.conflict(candidate.reading, differences: differences))
        }
        for candidate in toCompare {
            if let stored = storedRows[candidate.sequence] {
                try await judge(candidate, against: stored)
            } else {
                // Stored and acknowledged once, its row since dropped with its partition (retention): a duplicate.
                duplicates += 1
            }
        }
        for candidate in inBatchRepeats {
            guard let first = fresh[candidate.sequence] else { continue }
            try await judge(
                candidate,
                against: StoredRow(
                    sensorRow: first.sensorRow, timestamp: first.reading.timestamp.microseconds, value: first.reading.value,
                    flags: Int16(bitPattern: first.reading.quality.rawValue)))
        }

        // 5. Insert the new readings and record their sequences.
        guard !freshOrder.isEmpty else { return StoreOutcome(accepted: 0, duplicates: duplicates, rejected: rejected) }
        let inserted = freshOrder.compactMap { fresh[$0] }
        let timestamps = inserted.map(\.reading.timestamp.microseconds)
        let sequences = inserted.map(\.sequence)
        let values = inserted.map(\.reading.value)
        let sensors = inserted.map(\.sensorRow)
        let flags = inserted.map { Int16(bitPattern: $0.reading.quality.rawValue) }
        try await connection.query(
            """
            INSERT INTO readings(timestamp_us, sequence, value, device_id, sensor_id, flags)
            SELECT t, s, v, \(deviceRow), k, f FROM unnest(\(timestamps)::int8[], \(sequences)::int8[], \(values)::float8[], \(sensors)::int8[], \(flags)::int2[]) AS u(t, s, v, k, f)
            """, logger: logger)

        let merged = Self.merge(ranges, adding: sequences)
        if !ranges.isEmpty {
            let firsts = ranges.map(\.lowerBound)
            try await connection.query(
                "DELETE FROM stored_sequences WHERE device_id = \(deviceRow) AND first_sequence = ANY(\(firsts))", logger: logger)
        }
        try await connection.query(
            """
            INSERT INTO stored_sequences(device_id, first_sequence, last_sequence)
            SELECT \(deviceRow), f, l FROM unnest(\(merged.map(\.lowerBound))::int8[], \(merged.map(\.upperBound))::int8[]) AS u(f, l)
            """, logger: logger)
        if let top = sequences.max() {
            try await connection.query(
                "UPDATE devices SET highest_sequence = greatest(coalesce(highest_sequence, -1), \(top)) WHERE id = \(deviceRow)", logger: logger)
        }

        var newest: [Int64: Candidate] = [:]
        for candidate in inserted {
            if let current = newest[candidate.sensorRow],
                (current.reading.timestamp, current.sequence) >= (candidate.reading.timestamp, candidate.sequence)
            {
                continue
            }
            newest[candidate.sensorRow] = candidate
        }
        let latest = Array(newest.values)
        try await connection.query(
            """
            INSERT INTO latest(sensor_id, sequence, timestamp_us, value, flags)
            SELECT k, s, t, v, f FROM unnest(\(latest.map(\.sensorRow))::int8[], \(latest.map(\.sequence))::int8[], \(latest.map(\.reading.timestamp.microseconds))::int8[], \(latest.map(\.reading.value))::float8[], \(latest.map { Int16(bitPattern: $0.reading.quality.rawValue) })::int2[]) AS u(k, s, t, v, f)
            ON CONFLICT (sensor_id) DO UPDATE SET
                sequence = excluded.sequence, timestamp_us = excluded.timestamp_us, value = excluded.value, flags = excluded.flags
            WHERE excluded.timestamp_us > latest.timestamp_us
                OR (excluded.timestamp_us = latest.timestamp_us AND excluded.sequence > latest.sequence)
            """, logger: logger)
        let stored = inserted.compactMap { candidate in
            seen[candidate.reading.sensor].map { CommittedReading(candidate.reading, sensorRowID: candidate.sensorRow, quantity: $0) }
        }
        try await PostgresLatestNotice.send(on: connection, device: device, logger: logger)
        return StoreOutcome(accepted: inserted.count, duplicates: duplicates, rejected: rejected, fresh: stored)
    }

    /// Registers `descriptors` on the device and returns every one's (id, registered quantity) by name. New sensors are
    /// inserted with `ON CONFLICT DO NOTHING RETURNING`; existing ones are read after that insert (never before, so two
    /// writers cannot both decide to insert), and their resolution follows the batch's while the quantity agrees.
    private func register(_ descriptors: [SensorDescriptor]) async throws -> [String: (id: Int64, quantity: String)] {
        guard !descriptors.isEmpty else { return [:] }
        let names = descriptors.map(\.id.rawValue)
        let quantities = descriptors.map(\.quantity.rawValue)
        let numerators = descriptors.map { Int64($0.resolution.numerator) }
        let denominators = descriptors.map { Int64($0.resolution.denominator) }
        var found: [String: (id: Int64, quantity: String)] = [:]
        for try await (id, name, quantity) in try await connection.query(
            """
            INSERT INTO sensors(device_id, name, quantity, resolution_numerator, resolution_denominator, first_seen_us)
            SELECT \(device.rowID), n, q, rn, rd, \(receivedAt.microseconds)
            FROM unnest(\(names)::text[], \(quantities)::text[], \(numerators)::int8[], \(denominators)::int8[]) AS u(n, q, rn, rd)
            ON CONFLICT (device_id, name) DO NOTHING
            RETURNING id::int8, name, quantity
            """, logger: logger
        ).decode((Int64, String, String).self) {
            found[name] = (id, quantity)
        }
        let existing = names.filter { found[$0] == nil }
        guard !existing.isEmpty else { return found }
        for try await (id, name, quantity) in try await connection.query(
            """
            UPDATE sensors s SET resolution_numerator = u.rn, resolution_denominator = u.rd
            FROM unnest(\(names)::text[], \(quantities)::text[], \(numerators)::int8[], \(denominators)::int8[]) AS u(n, q, rn, rd)
            WHERE s.device_id = \(device.rowID) AND s.name = u.n AND s.quantity = u.q
                AND (s.resolution_numerator, s.resolution_denominator) <> (u.rn, u.rd)
            RETURNING s.id::int8, s.name, s.quantity
            """, logger: logger
        ).decode((Int64, String, String).self) where found[name] == nil {
            found[name] = (id, quantity)
        }
        let unread = names.filter { found[$0] == nil }
        guard !unread.isEmpty else { return found }
        for try await (id, name, quantity) in try await connection.query(
            "SELECT id::int8, name, quantity FROM sensors WHERE device_id = \(device.rowID) AND name = ANY(\(unread))", logger: logger
        ).decode((Int64, String, String).self) {
            found[name] = (id, quantity)
        }
        return found
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
