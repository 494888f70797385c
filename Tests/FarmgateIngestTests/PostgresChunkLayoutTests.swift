import FarmgateWire
import Foundation
import PostgresNIO
import Testing

@testable import FarmgateIngest

/// The chunked readings of PostgreSQL migration 5: a chunk never crosses a day (so retention drops whole days), lookups
/// of duplicates and conflicts find readings in whichever chunk holds them, reads page through chunks and answer
/// exactly what the flat layout answered, and the rows of migration 1 are converted.
@Suite struct PostgresChunkLayoutTests {
    /// A batch of `sensors` sensors (`tank1.s0`, `tank1.s1`, ... all pH), `count` readings numbered from `first`, taken
    /// in turn, one every `every` microseconds from `start`; values `base + index / 100` (steps of the 0.01 resolution).
    static func interleaved(
        device: String = "d1", sensors: Int, first: UInt64 = 1, count: Int, start: Int64, every: Int64, base: Double = 6,
        sequenceStep: UInt64 = 1, flags: (Int) -> QualityFlags = { _ in [] }
    ) throws -> Batch {
        let ids = try (0..<sensors).map { try sensorID("tank1.s\($0)") }
        let readings = (0..<count).map { index in
            Reading(
                sensor: ids[index % sensors], sequence: first + UInt64(index) * sequenceStep, timestamp: Timestamp(microseconds: start + Int64(index) * every),
                value: base + Double(index % 300) / 100, quality: flags(index))
        }
        return Batch(device: try deviceID(device), sensors: ids.map { SensorDescriptor(id: $0, quantity: .ph) }, readings: readings)
    }

    static func readingCount(_ settings: PostgresSettings, _ table: String) async throws -> Int {
        try await PostgresStoreTests.count(settings, "SELECT coalesce(sum(cardinality(reading_values)), 0)::int8 FROM \(table)")
    }

    @Test func aBatchAcrossMidnightGoesIntoBothDaysPartitionsAndReadsBackWhole() async throws {
        try await PostgresStoreTests.withStore { store, settings in
            let device = try await PostgresStoreTests.device(in: store)
            // 3 sensors, one reading a second from 50 s before midnight (testNow) to 50 s after.
            let batch = try Self.interleaved(sensors: 3, count: 100, start: testNow.microseconds - 50_000_000, every: 1_000_000)
            let first = try await store.store(batch, for: device, receivedAt: testNow)
            #expect(first.tally == Tally(accepted: 100, duplicates: 0, rejected: 0))
            #expect(try await Self.readingCount(settings, "readings_20251231") == 50)
            #expect(try await Self.readingCount(settings, "readings_20260101") == 50)
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM readings") == 6, "3 sensors × 2 days")
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM readings WHERE floor(first_ts / 86400e6) <> floor(last_ts / 86400e6)") == 0)
            // Export and the range query across midnight, in order, nothing lost.
            let exported = try await store.exportPage(device: device, afterSequence: nil, limit: 1000)
            #expect(exported.map(\.sequence) == Array(1...100))
            #expect(exported.map(\.value) == batch.readings.map(\.value))
            let farm = try #require(try await store.farm(named: "f1"))
            let sensor = try #require(try await store.sensor(farmID: farm.id, device: device.device, sensor: try sensorID("tank1.s1")))
            let range = try await store.readings(
                sensorRowID: sensor.rowID, from: Timestamp(microseconds: testNow.microseconds - 10_000_000),
                to: Timestamp(microseconds: testNow.microseconds + 10_000_000), limit: 1000)
            #expect(range.map(\.sequence) == Array(stride(from: 41, through: 60, by: 3)).map { UInt64($0) })
            // Sent again: all duplicates.
            let again = try await store.store(batch, for: device, receivedAt: testNow)
            #expect(again.tally == Tally(accepted: 0, duplicates: 100, rejected: 0))
        }
    }

    @Test func duplicatesAndConflictsAreFoundInWhicheverChunkHoldsThem() async throws {
        try await PostgresStoreTests.withStore { store, settings in
            let device = try await PostgresStoreTests.device(in: store)
            // 2 sensors, 6,000 readings 1 s apart with sequences 2 apart: each sensor's 3,000 readings span 6,000 s
            // and 12,000 sequences, so they are cut by time (30 min) and by sequence span (4,096) into many chunks.
            let start = testNow.microseconds - 7_000_000_000
            let original = try Self.interleaved(sensors: 2, count: 6_000, start: start, every: 1_000_000, sequenceStep: 2) { index in
                index % 7 == 0 ? .sensorFault : []
            }
            #expect(try await store.store(original, for: device, receivedAt: testNow).accepted == 6_000)
            let chunks = try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM readings")
            #expect(chunks >= 8, "expected the readings cut into several chunks per sensor, got \(chunks)")
            #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM readings WHERE flags IS NULL") == 0)

            // Re-cut: readings 1,000..<5,000 again, some changed (value, flags, timestamp), plus 10 new sequences in
            // the gaps (odd numbers were never used).
            var resent = Batch(device: original.device, sensors: original.sensors, readings: Array(original.readings[1_000..<5_000]))
            let changed = [1_000, 1_799, 1_800, 2_047, 2_048, 4_096, 4_999]
            for index in changed {
                resent.readings[index - 1_000].value += 0.5
            }
            resent.readings[2_500 - 1_000].quality = [.calibrating]
            resent.readings[3_000 - 1_000].timestamp = Timestamp(microseconds: resent.readings[2_000].timestamp.microseconds + 1)
            let gaps = (0..<10).map { index in
                Reading(
                    sensor: original.readings[index].sensor, sequence: UInt64(2_000 + 2 * index), timestamp: Timestamp(microseconds: start + Int64(index)),
                    value: 6)
            }
            resent.readings += gaps
            let outcome = try await store.store(resent, for: device, receivedAt: testNow)
            #expect(outcome.accepted == 10)
            #expect(outcome.duplicates == 4_000 - changed.count - 2)
            let expected = Set((changed + [2_500, 3_000]).map { original.readings[$0].sequence })
            #expect(Set(outcome.rejected.compactMap(\.sequence)) == expected)
            #expect(outcome.rejected.allSatisfy { $0.code == RejectionCode.sequenceConflict })
            #expect(outcome.rejected.contains { $0.message.contains("flags (stored none, sent calibrating)") })
            // Stored as first sent, the gap readings beside them.
            var exported: [ExportRow] = []
            var after: UInt64?
            while true {
                let page = try await store.exportPage(device: device, afterSequence: after, limit: 997)
                guard let last = page.last else { break }
                exported += page
                after = last.sequence
            }
            #expect(exported.count == 6_010)
            #expect(exported.map(\.sequence) == exported.map(\.sequence).sorted())
            let bySequence = Dictionary(uniqueKeysWithValues: exported.map { ($0.sequence, $0) })
            for reading in original.readings {
                let row = bySequence[reading.sequence]
                #expect(row?.value == reading.value && row?.timestamp == reading.timestamp && row?.quality == reading.quality)
            }
        }
    }

    @Test func rangeQueriesPageThroughChunksInTimeOrder() async throws {
        try await PostgresStoreTests.withStore { store, _ in
            let device = try await PostgresStoreTests.device(in: store)
            let start = testNow.microseconds - 20_000_000_000
            // Two batches of one sensor whose times interleave (a clock stepped back between them).
            let early = try Self.interleaved(sensors: 1, first: 1, count: 3_000, start: start, every: 4_000_000)
            let late = try Self.interleaved(sensors: 1, first: 10_001, count: 3_000, start: start + 2_000_000, every: 4_000_000)
            _ = try await store.store(early, for: device, receivedAt: testNow)
            _ = try await store.store(late, for: device, receivedAt: testNow)
            let farm = try #require(try await store.farm(named: "f1"))
            let sensor = try #require(try await store.sensor(farmID: farm.id, device: device.device, sensor: try sensorID("tank1.s0")))
            let all = (early.readings + late.readings).sorted { ($0.timestamp, $0.sequence) < ($1.timestamp, $1.sequence) }
            for (from, to, limit) in [
                (start, start + 1_000_000_000, 50), (start + 3_333_333_333, start + 9_000_000_000, 1_000), (start - 1, start + 30_000_000_000, 5_999),
                (start - 1, start + 30_000_000_000, 1), (start + 7, start + 30_000_000_000, 7), (start, start + 30_000_000_000, 333),
            ] {
                let answer = try await store.readings(
                    sensorRowID: sensor.rowID, from: Timestamp(microseconds: from), to: Timestamp(microseconds: to), limit: limit)
                let expected = all.filter { $0.timestamp.microseconds >= from && $0.timestamp.microseconds < to }.prefix(limit)
                #expect(answer.map(\.sequence) == expected.map(\.sequence), "from \(from) to \(to) limit \(limit)")
                #expect(answer.map(\.timestamp) == expected.map(\.timestamp))
            }
        }
    }

    @Test func afterADroppedPartitionAResentBatchAcrossMidnightIsDuplicateWhereGoneAndComparedWhereKept() async throws {
        try await PostgresStoreTests.withStore { store, settings in
            let device = try await PostgresStoreTests.device(in: store)
            let batch = try Self.interleaved(sensors: 2, count: 100, start: testNow.microseconds - 50_000_000, every: 1_000_000)
            #expect(try await store.store(batch, for: device, receivedAt: testNow).accepted == 100)
            try await adminQuery(settings, "DROP TABLE readings_20251231")
            // Changed in both halves: before midnight nothing is left to compare (a duplicate), after it a conflict.
            var resent = batch
            resent.readings[10].value += 1
            resent.readings[90].value += 1
            let outcome = try await store.store(resent, for: device, receivedAt: testNow)
            #expect(outcome.tally == Tally(accepted: 0, duplicates: 99, rejected: 1))
            #expect(outcome.rejected.first?.sequence == 91)
            #expect(try await Self.readingCount(settings, "readings") == 50)
        }
    }

    @Test func migrationFiveConvertsTheRowsOfMigrationOne() async throws {
        try await withTestDatabase { settings in
            // The schema as migrations 1 and 2 left it, with readings in the flat layout.
            try await postgresSchema(migratedTo: 2, settings)
            try await adminQuery(settings, "SELECT farmgate_create_partitions('2025-12-31', 2)")
            try await adminQuery(settings, "INSERT INTO farms(name, created_at_us) VALUES ('f1', 0)")
            try await adminQuery(settings, "INSERT INTO devices(farm_id, name, key_id, secret_sha256, created_at_us, highest_sequence) VALUES (1, 'd1', 'kd1', '\\x01', 0, 10000)")
            try await adminQuery(settings, "INSERT INTO sensors(device_id, name, quantity, resolution_numerator, resolution_denominator, first_seen_us) VALUES (1, 'tank1.ph', 'ph', 1, 100, 0), (1, 'tank1.ec', 'ec', 1, 1, 0)")
            try await adminQuery(settings, "INSERT INTO stored_sequences VALUES (1, 1, 10000)")
            // 10,000 readings over 2 days and one far in the future (the default partition), one in 13 flagged.
            try await adminQuery(
                settings,
                """
                INSERT INTO readings(timestamp_us, sequence, value, device_id, sensor_id, flags)
                SELECT \(testNow.microseconds) - 86400000000 + i::int8 * 17000000, i, 6 + (i % 100) / 100.0, 1, 1 + i % 2, CASE WHEN i % 13 = 0 THEN 2 ELSE 0 END
                FROM generate_series(1, 9999) i
                UNION ALL SELECT \(testNow.microseconds) + 40 * 86400000000, 10000, 7.5, 1, 1, 0
                """)
            let store = try PostgresIngestStore(settings: settings, logger: testLogger)
            try await withRunning(store) { _ in
                let applied = try await store.migrate()
                #expect(applied.map(\.version) == PostgresSchema.migrations.map(\.version).filter { $0 > 2 })
                #expect(try await PostgresChunkLayoutTests.readingCount(settings, "readings") == 10_000)
                #expect(try await PostgresChunkLayoutTests.readingCount(settings, "readings_default") == 1)
                #expect(try await PostgresChunkLayoutTests.readingCount(settings, "readings_20251231") > 0)
                #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM pg_class WHERE relname LIKE 'readings_v1%'") == 0)
                #expect(try await PostgresStoreTests.count(settings, "SELECT count(*)::int8 FROM reading_rows WHERE flags = 2") == 9_999 / 13)
                guard let device = try await store.deviceCredential(keyID: "kd1")?.identity else {
                    Issue.record("the device did not survive the migration")
                    return
                }
                var sequences: [UInt64] = []
                var after: UInt64?
                while true {
                    let page = try await store.exportPage(device: device, afterSequence: after, limit: 3_000)
                    guard let last = page.last else { break }
                    sequences += page.map(\.sequence)
                    after = last.sequence
                }
                #expect(sequences == Array(1...10_000))
                // The converted rows are compared like any other: the same reading is a duplicate, another value a conflict.
                let ph = try sensorID("tank1.ph")
                let same = Reading(sensor: ph, sequence: 2, timestamp: Timestamp(microseconds: testNow.microseconds - 86_400_000_000 + 34_000_000), value: 6.02)
                var other = same
                other.sequence = 4
                other.timestamp = Timestamp(microseconds: testNow.microseconds - 86_400_000_000 + 68_000_000)
                let batch = Batch(device: device.device, sensors: [SensorDescriptor(id: ph, quantity: .ph)], readings: [same, other])
                let outcome = try await store.store(batch, for: device, receivedAt: testNow)
                #expect(outcome.duplicates == 1)
                #expect(outcome.rejected.map(\.sequence) == [4])
            }
        }
    }

    @Test func chunksNeverCrossADayNorPassTheirLimits() throws {
        var entries: [PostgresReadingChunk.Entry] = []
        var generator = SystemRandomNumberGenerator()
        for index in 0..<20_000 {
            entries.append(
                .init(
                    sequence: Int64(index * 3 + Int.random(in: 0...2, using: &generator)),
                    timestamp: testNow.microseconds + Int64.random(in: -200_000_000_000...200_000_000_000, using: &generator), value: 1, flags: 0))
        }
        let unique = Dictionary(entries.map { ($0.sequence, $0) }, uniquingKeysWith: { first, _ in first })
        let chunks = PostgresReadingChunk.cut(deviceRow: 1, sensorRow: 2, entries: Array(unique.values))
        #expect(chunks.reduce(0) { $0 + $1.entries.count } == unique.count)
        for chunk in chunks {
            #expect(PostgresReadingChunk.day(of: chunk.firstTimestamp) == PostgresReadingChunk.day(of: chunk.lastTimestamp))
            #expect(chunk.lastSequence - chunk.firstSequence <= PostgresReadingChunk.maximumSequenceSpan)
            #expect(chunk.lastTimestamp - chunk.firstTimestamp <= PostgresReadingChunk.maximumTimeSpan)
            #expect(chunk.entries.count <= PostgresReadingChunk.maximumCount)
            #expect(chunk.entries.map(\.sequence) == chunk.entries.map(\.sequence).sorted())
            let rebuilt = try PostgresReadingChunk.entries(
                firstSequence: chunk.firstSequence, firstTimestamp: chunk.firstTimestamp, sequenceOffsets: chunk.sequenceOffsets,
                timeOffsets: chunk.timeOffsets, values: chunk.values, flags: chunk.flags)
            #expect(rebuilt == chunk.entries)
        }
        #expect(PostgresReadingChunk.day(of: -1) == -1)
        #expect(PostgresReadingChunk.day(of: 0) == 0)
    }

    @Test func pagedReadsAskForFewChunksFirstThenWhatTheRestNeeds() {
        var one = ChunkPaging(limit: 1)
        #expect(one.size == 8)
        var many = ChunkPaging(limit: 10_000)
        #expect(many.size == 64)
        // Small chunks (10 readings): the next page asks for what the rest needs, a quarter more, at most limit / 8.
        many.read(chunks: 64, readings: 640, known: 600)
        #expect(many.size == 1_175)
        many.read(chunks: 1_175, readings: 11_750, known: 9_990)
        #expect(many.size == 8)
        // Full chunks: never past the ceiling.
        var full = ChunkPaging(limit: 100_000)
        full.read(chunks: 64, readings: 64, known: 0)
        #expect(full.size == 12_500)
        one.read(chunks: 8, readings: 8_192, known: 0)
        #expect(one.size == 8)
    }
}
