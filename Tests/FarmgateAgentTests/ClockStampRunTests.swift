import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

@testable import FarmgateAgent

// How the buffer keeps what repairs the time of readings taken before the clock was set: runs in `clock_stamps`, one row
// per group commit and per request sent, instead of two columns and an index entry per reading rewritten as each request
// leaves. What is repaired, held and frozen is ClockCorrectionTests'; these check that the runs give the same answers and
// cost the SD card what they should.

private let quiet = Logger(label: "test.clock-runs") { _ in SwiftLogNoOpLogHandler() }

private func trueStart() throws -> Timestamp { try #require(RFC3339.parse("2026-12-01T08:00:00.000Z")) }

private func descriptor() throws -> SensorDescriptor {
    try SensorDescriptor(id: SensorID("tank1.ph"), quantity: .ph, resolution: Quantity.ph.defaultResolution)
}

/// The buffer's runs, ascending: (first, last, boot, offset).
private func runs(_ buffer: ReadingBuffer) async throws -> [[Int64]] {
    try await buffer.withStore { store in
        try store.connection.query("SELECT first, last, boot, clock_offset FROM clock_stamps ORDER BY first").map { $0.compactMap(\.int64) }
    }
}

/// Empties the WAL, so that its size afterwards says how many pages the next writes touched.
private func truncateWAL(_ buffer: ReadingBuffer) async throws {
    _ = try await buffer.withStore { store in try store.connection.query("PRAGMA wal_checkpoint(TRUNCATE)") }
}

/// Frames in the WAL (each one page written to the disk, plus its header).
private func walFrames(_ path: String, pageSize: Int) throws -> Int {
    let size = (try FileManager.default.attributesOfItem(atPath: path + "-wal")[.size] as? Int) ?? 0
    return size <= 32 ? 0 : (size - 32) / (pageSize + 24)
}

/// A buffer with one pH sensor registered, told of a clock `offsetSeconds` off and not synchronised.
private func unsynchronizedBuffer(
    _ path: String, offsetSeconds: Int64, hold: Duration
) async throws -> (ReadingBuffer, SensorDescriptor, ManualClock) {
    let buffer = try ReadingBuffer(configuration: BufferConfiguration(path: path), logger: quiet)
    let sensor = try descriptor()
    try await buffer.register([sensor])
    let clock = ManualClock(trueTime: try trueStart(), offsetSeconds: offsetSeconds)
    try await buffer.observeClock(clock.observation(hold: hold))
    return (buffer, sensor, clock)
}

@Suite("Clock stamp runs")
struct ClockStampRunTests {
    @Test("Unsynchronised readings cost a row per run, not per reading: a commit writes as much as a synchronised one, a request's freeze one page")
    func runsCostNoRowWrites() async throws {
        let scratch = try Scratch(prefix: "fg-runs")
        let path = scratch.file("buffer.sqlite")
        let (buffer, sensor, clock) = try await unsynchronizedBuffer(path, offsetSeconds: -86_400, hold: .zero)
        let pageSize = Int(try await buffer.withStore { store in try store.connection.queryInt("PRAGMA page_size") } ?? 0)
        let count = 2_000

        // The same number of readings taken with the clock set, for comparison.
        let synced = (0..<count).map { index in
            Sample(sensor: sensor.id, timestamp: Timestamp(microseconds: clock.trueTime.microseconds - 10_000_000_000 + Int64(index) * 1_000_000), value: 6.4)
        }
        try await truncateWAL(buffer)
        try await buffer.append(synced)
        try await buffer.flush()
        let syncedFrames = try walFrames(path, pageSize: pageSize)
        try await buffer.acknowledge(try await buffer.pending(limit: count, from: .oldest).map(\.sequence))

        // Two commits of unsynchronised readings, one run: it is extended, not repeated.
        try await truncateWAL(buffer)
        try await buffer.append(clock.unsynchronizedSamples(count, sensors: [sensor.id]))
        try await buffer.flush()
        let stampedFrames = try walFrames(path, pageSize: pageSize)
        #expect(stampedFrames <= syncedFrames + 1, "a stamped commit wrote \(stampedFrames) pages against \(syncedFrames)")
        var stored = try await runs(buffer)
        #expect(stored.count == 1)
        #expect(stored.first?[1] == Int64.max, "the newest run is open: the next commits join it")
        // The next commit joins the open run: nothing is written for its stamps.
        clock.advance(seconds: Double(count))
        let before = try await buffer.withStore { store in try store.connection.query("SELECT * FROM clock_stamps") }
        try await buffer.append(clock.unsynchronizedSamples(10, sensors: [sensor.id]))
        try await buffer.flush()
        #expect(try await buffer.withStore { store in try store.connection.query("SELECT * FROM clock_stamps") } == before)
        stored = try await runs(buffer)
        #expect(stored.count == 1)
        let unstamped = try await buffer.withStore { store in
            try store.connection.queryInt("SELECT count(*) FROM readings WHERE boot IS NOT NULL OR boottime IS NOT NULL")
        }
        #expect(unstamped == 0, "the readings themselves carry no stamp")

        // A request of 1,500 readings leaves: the run is shortened, no reading is rewritten.
        let request = try await buffer.pending(limit: 1_500, from: .oldest)
        #expect(request.count == 1_500 && request.allSatisfy { $0.quality == [.clockUnsynchronized] })
        try await truncateWAL(buffer)
        #expect(try buffer.freezeForSending(request.map(\.sequence)))
        let freezeFrames = try walFrames(path, pageSize: pageSize)
        #expect(freezeFrames <= 3, "freezing a request wrote \(freezeFrames) pages")
        stored = try await runs(buffer)
        #expect(stored.map { [$0[0], $0[1]] } == [[Int64(request.last?.sequence ?? 0) + 1, Int64.max]])

        // The clock is set: the frozen readings keep what was sent, the rest get their true time, one second apart.
        clock.synchronize()
        let correction = try #require(try await buffer.observeClock(clock.observation(hold: .zero)))
        #expect(correction.corrected == 510)
        let all = try await buffer.pending(limit: 3_000, from: .oldest)
        #expect(all.count == count + 10)
        #expect(zip(all.prefix(1_500), request).allSatisfy { $0 == $1 }, "sent content never changes")
        let repaired = Array(all.dropFirst(1_500))
        #expect(repaired.allSatisfy { $0.quality == [.clockCorrected] })
        let epoch = clock.read().bootEpochMicroseconds
        let firstBoottime = Int64(20_000_000)  // ManualClock's uptime at the first sample
        #expect(repaired.prefix(500).enumerated().allSatisfy { index, reading in
            reading.timestamp.microseconds == epoch + firstBoottime + Int64(1_500 + index) * 1_000_000
        })
        #expect(try await runs(buffer).isEmpty, "a finished repair leaves no run")
        try await buffer.close()
    }

    @Test("A wall clock stepped while unsynchronised starts a new run; the repair gives every reading its true time")
    func steppedClock() async throws {
        let scratch = try Scratch(prefix: "fg-runs")
        let (buffer, sensor, clock) = try await unsynchronizedBuffer(scratch.file("buffer.sqlite"), offsetSeconds: -7_200, hold: .seconds(900))
        let wall = WallClock(source: clock)
        var truths: [Int64] = []
        func take(_ value: Double) async throws {
            truths.append(clock.trueTime.microseconds)
            let stamp = wall.stamp()
            try await buffer.append([Sample(sensor: sensor.id, timestamp: stamp.timestamp, value: value, quality: .clockUnsynchronized, boot: stamp.boot)])
        }
        // Ten readings 10.0004 s apart: the offset the sampler's whole milliseconds show wanders within a millisecond.
        for index in 0..<10 {
            try await take(6.0 + Double(index) / 100)
            clock.advance(seconds: 10.000_4)
        }
        try await buffer.flush()
        // Someone sets the date by hand, an hour closer but still wrong and still unsynchronised (no NTP yet).
        clock.state.withLock { $0.offset += 3_600_000_000 }
        for index in 0..<5 {
            try await take(7.0 + Double(index) / 100)
            clock.advance(seconds: 10)
        }
        try await buffer.flush()
        let stored = try await runs(buffer)
        #expect(stored.count == 2, "one run per offset: \(stored)")
        #expect(stored.map { $0[0] } == [1, 11])
        #expect(stored.map { $0[1] } == [10, Int64.max], "the first closed where the stepped clock began, the second open")
        // A reading taken with the clock set closes the open run.
        try await buffer.append([Sample(sensor: sensor.id, timestamp: Timestamp(microseconds: clock.trueTime.microseconds - 1_000_000), value: 5.0)])
        try await buffer.flush()
        #expect(try await runs(buffer).map { $0[1] } == [10, 15])
        #expect(try await buffer.statistics().held == 15)

        clock.synchronize()
        #expect(try await buffer.observeClock(clock.observation(hold: .seconds(900)))?.corrected == 15)
        let readings = try await buffer.pending(limit: 100, from: .oldest).filter { $0.value != 5.0 }
        #expect(readings.count == 15)
        for (reading, truth) in zip(readings, truths) {
            #expect(abs(reading.timestamp.microseconds - truth) < 1_000, "\(reading.timestamp) vs true \(Timestamp(microseconds: truth))")
            #expect(reading.quality == [.clockCorrected])
        }
        try await buffer.close()
    }

    @Test("A wall clock a whole number of seconds off gives each reading the true millisecond it was taken, whatever the boot's microseconds")
    func exactToTheMillisecond() async throws {
        let scratch = try Scratch(prefix: "fg-runs")
        let buffer = try ReadingBuffer(configuration: BufferConfiguration(path: scratch.file("buffer.sqlite")), logger: quiet)
        let sensor = try descriptor()
        try await buffer.register([sensor])
        // Booted 20.0004 s before a true time with whole milliseconds: the true time of the boot is 0.6 ms past one, as
        // a real boot's is anything; the wall clock is three days and no microseconds behind (fake-hwclock, date -s).
        let clock = ManualClock(trueTime: try trueStart(), offsetSeconds: -259_200, uptime: 20.000_4)
        let wall = WallClock(source: clock)
        try await buffer.observeClock(clock.observation(hold: .seconds(900)))
        var truths: [Int64] = []
        for index in 0..<12 {
            truths.append(clock.trueTime.microseconds)
            let stamp = wall.stamp()
            try await buffer.append([
                Sample(sensor: sensor.id, timestamp: stamp.timestamp, value: 6.0 + Double(index) / 100, quality: .clockUnsynchronized, boot: stamp.boot)
            ])
            clock.advance(seconds: 1.000_3)
        }
        try await buffer.flush()
        #expect(try await runs(buffer).count == 1)
        clock.synchronize()
        #expect(try await buffer.observeClock(clock.observation(hold: .seconds(900)))?.corrected == 12)
        let readings = try await buffer.pending(limit: 100, from: .oldest)
        #expect(readings.map(\.timestamp) == truths.map { WallClock.wholeMilliseconds($0) })
        #expect(readings.allSatisfy { $0.quality == [.clockCorrected] })
        try await buffer.close()
    }

    @Test("Readings renumbered after a sequence_conflict leave the open run: their sent content stays, the rest is repaired")
    func renumberedLeaveTheOpenRun() async throws {
        let scratch = try Scratch(prefix: "fg-runs")
        let (buffer, sensor, clock) = try await unsynchronizedBuffer(scratch.file("buffer.sqlite"), offsetSeconds: -86_400, hold: .zero)
        try await buffer.append(clock.unsynchronizedSamples(10, sensors: [sensor.id]))
        try await buffer.flush()
        #expect(try await runs(buffer).map { [$0[0], $0[1]] } == [[1, Int64.max]])
        // Readings 1–5 leave; the ingest answers that it holds other content under those numbers: they are renumbered.
        #expect(try buffer.freezeForSending([1, 2, 3, 4, 5]))
        let moved = try await buffer.renumber([1, 2, 3, 4, 5], above: 100)
        #expect(moved.map(\.new) == [101, 102, 103, 104, 105])
        #expect(try await runs(buffer).map { [$0[0], $0[1]] } == [[6, 10]], "closed before the readings moved above it")
        // With a hold, only the five never sent are held; the renumbered ones are final.
        try await buffer.observeClock(clock.observation(hold: .seconds(900)))
        #expect(try await buffer.statistics().held == 5)
        #expect(try await buffer.pending(limit: 100, from: .oldest).map(\.sequence) == [101, 102, 103, 104, 105])
        clock.synchronize()
        #expect(try await buffer.observeClock(clock.observation(hold: .seconds(900)))?.corrected == 5)
        let all = try await buffer.pending(limit: 100, from: .oldest)
        #expect(all.filter { $0.sequence > 100 }.allSatisfy { $0.quality == [.clockUnsynchronized] })
        #expect(all.filter { $0.sequence <= 10 }.map(\.quality) == Array(repeating: [.clockCorrected], count: 5))
        // The next unsynchronised commit starts a run of its own.
        clock.state.withLock { $0.synchronized = false }
        try await buffer.observeClock(clock.observation(hold: .zero))
        try await buffer.append(clock.unsynchronizedSamples(3, sensors: [sensor.id], value: 6.6))
        try await buffer.flush()
        #expect(try await runs(buffer).map { [$0[0], $0[1]] } == [[106, Int64.max]])
        try await buffer.close()
    }

    @Test("A version-6 file's per-reading stamps become runs: split by other readings, boots and offsets, and repaired as before")
    func migratesVersion6() async throws {
        let scratch = try Scratch(prefix: "fg-runs")
        let path = scratch.file("buffer.sqlite")
        let start = try trueStart()
        let offset: Int64 = -86_400_000_000  // the wall clock a day behind
        // Boot "boot-a" started 20 s before `start` (true time); its readings were stamped a day early.
        let bootA = start.microseconds - 20_000_000
        func wrong(_ boottime: Int64) -> Int64 { (bootA + boottime + offset) / 1_000 * 1_000 }
        do {
            let connection = try SQLiteConnection(path: path)
            _ = try connection.query("PRAGMA journal_mode = WAL")
            try connection.transaction {
                for migration in BufferSchema.migrations where migration.version <= 6 {
                    try connection.execute(migration.sql)
                    try connection.query("INSERT INTO schema_version(version, applied_at) VALUES (?, 0)", [.integer(migration.version)])
                }
                try connection.query("INSERT INTO counters(name, value) VALUES ('last_sequence', 8), ('dropped', 0), ('duplicates_ignored', 0)")
                try connection.query(
                    "INSERT INTO sensors(key, id, quantity, resolution_numerator, resolution_denominator) VALUES (1, 'tank1.ph', 'ph', 1, 100)")
                try connection.query("INSERT INTO boots(key, boot_id, first_seen) VALUES (1, 'boot-a', 0), (2, 'boot-old', 0)")
                // (sequence, boot, boottime µs; nil: taken with the clock set)
                let rows: [(Int64, Int64?, Int64?)] = [
                    (1, 1, 20_000_300), (2, 1, 30_000_700), (3, 1, 40_000_100),  // one run
                    (4, nil, nil),  // taken with the clock set: the run stops
                    (5, 1, 60_000_000), (6, 1, 70_000_999),  // a second run, same offset
                    (7, 1, 80_000_000),  // stamped with another offset (a clock set by hand meanwhile): its own run
                    (8, 2, 10_000_000),  // an earlier boot
                ]
                for (sequence, boot, boottime) in rows {
                    var timestamp = boottime.map(wrong) ?? (start.microseconds + 50_000_000)
                    if sequence == 7 { timestamp += 3_600_000_000 }
                    try connection.query(
                        "INSERT INTO readings(sequence, sensor, timestamp, steps, quality, boot, boottime) VALUES (?, 1, ?, ?, ?, ?, ?)",
                        [.integer(sequence), .integer(timestamp), .integer(600 + sequence), .integer(boot == nil ? 0 : 1),
                         boot.map(SQLiteValue.integer) ?? .null, boottime.map(SQLiteValue.integer) ?? .null])
                }
            }
        }

        let buffer = try ReadingBuffer(configuration: BufferConfiguration(path: path), logger: quiet)
        #expect(try BufferSchema.version(of: SQLiteConnection(path: path)) == BufferSchema.currentVersion)
        let stored = try await runs(buffer)
        #expect(stored.map { Array($0.prefix(3)) } == [[1, 3, 1], [5, 6, 1], [7, 7, 1], [8, 8, 2]])
        // Each offset is `timestamp − boottime` rounded up to whole milliseconds.
        #expect(stored.first?[3] == bootA + offset)
        #expect(stored.dropFirst(2).first?[3] == bootA + offset + 3_600_000_000)
        let left = try await buffer.withStore { store in
            (try store.connection.queryInt("SELECT count(*) FROM readings WHERE boot IS NOT NULL OR boottime IS NOT NULL"),
             try store.connection.queryInt("SELECT count(*) FROM sqlite_master WHERE name = 'readings_boot'"))
        }
        #expect(left.0 == 0 && left.1 == 0)

        // The same boot, now synchronised: its six stamped readings get their true times; the earlier boot's does not.
        let descriptor = try descriptor()
        try await buffer.register([descriptor])
        let clock = ManualClock(trueTime: Timestamp(microseconds: bootA + 100_000_000), offsetSeconds: 0, uptime: 100, bootID: "boot-a")
        clock.synchronize()
        #expect(try await buffer.observeClock(clock.observation(hold: .seconds(900)))?.corrected == 6)
        let readings = try await buffer.pending(limit: 10, from: .oldest)
        let times = Dictionary(uniqueKeysWithValues: readings.map { ($0.sequence, $0.timestamp.microseconds) })
        for (sequence, boottime) in [(1, 20_000_300), (2, 30_000_700), (3, 40_000_100), (5, 60_000_000), (6, 70_000_999), (7, 80_000_000)] as [(UInt64, Int64)] {
            #expect(abs((times[sequence] ?? 0) - (bootA + boottime)) < 1_000, "reading \(sequence)")
        }
        #expect(readings.first { $0.sequence == 8 }?.quality == [.clockUnsynchronized], "an earlier boot's reading goes as it was")
        #expect(try await runs(buffer).isEmpty)
        #expect(try await buffer.integrityProblems().isEmpty)
        try await buffer.close()
    }
}
