import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Testing

@testable import FarmgateAgent

// MARK: Helpers

/// Collects what the buffer logs, so tests can check that a condition was reported.
private final class LogRecorder: Sendable {
    struct Entry: Sendable {
        let level: Logger.Level
        let message: String
        let metadata: Logger.Metadata
    }
    private let storage = Mutex<[Entry]>([])
    var entries: [Entry] { storage.withLock { $0 } }
    func record(_ entry: Entry) { storage.withLock { $0.append(entry) } }

    var logger: Logger {
        Logger(label: "test.buffer") { _ in RecordingHandler(recorder: self) }
    }
}

private struct RecordingHandler: LogHandler {
    let recorder: LogRecorder
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { _, new in new }
        recorder.record(.init(level: event.level, message: event.message.description, metadata: merged))
    }
}

private let quietLogger = Logger(label: "test.buffer.quiet") { _ in SwiftLogNoOpLogHandler() }

private func sensor(_ name: String) throws -> SensorID { try SensorID(name) }

private func openBuffer(
    _ scratch: Scratch, quota: Int64 = 512 << 20, whenFull: BufferFullPolicy = .dropOldest,
    commitInterval: Duration = .seconds(1), logger: Logger = quietLogger
) throws -> ReadingBuffer {
    try ReadingBuffer(
        configuration: BufferConfiguration(
            path: scratch.file("buffer/buffer.sqlite"), commitInterval: commitInterval, quotaBytes: quota, whenFull: whenFull),
        logger: logger)
}

/// `count` samples of `sensor`, one per second from `start` seconds.
private func series(_ sensor: SensorID, count: Int, start: Int = 0, value: (Int) -> Double = { 6 + Double($0 % 100) / 100 }) -> [Sample] {
    (0..<count).map { index in
        Sample(sensor: sensor, timestamp: Timestamp(microseconds: Int64(start + index) * 1_000_000), value: value(index))
    }
}

private func allPending(_ buffer: ReadingBuffer) async throws -> [Reading] {
    try await buffer.pending(limit: 10_000_000, from: .oldest)
}

private func register(_ buffer: ReadingBuffer, _ names: String...) async throws {
    try await buffer.register(names.map { SensorDescriptor(id: try SensorID($0), quantity: .ph) })
}

// MARK: Tests

@Suite("ReadingBuffer")
struct BufferTests {
    @Test("sequence numbers are gap-free, strictly increasing, and survive reopening and the deletion of every row")
    func sequencesAcrossReopen() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let ph = try sensor("tank1.ph")
        do {
            let buffer = try openBuffer(scratch)
            try await register(buffer, "tank1.ph")
            try await buffer.append(series(ph, count: 10))
            #expect(try await buffer.flush() == 10)
            try await buffer.append(series(ph, count: 5, start: 10))
            // close() commits what is queued.
            try await buffer.close()
        }
        do {
            let buffer = try openBuffer(scratch)
            #expect(try await buffer.statistics().lastSequence == 15)
            try await buffer.append(series(ph, count: 5, start: 15))
            #expect(try await buffer.flush() == 20)
            let readings = try await allPending(buffer)
            #expect(readings.map(\.sequence) == Array(1...20))
            #expect(readings.map(\.timestamp.microseconds) == (0..<20).map { Int64($0) * 1_000_000 })
            try await buffer.acknowledge(readings.map(\.sequence))
            #expect(try await buffer.statistics().pending == 0)
            try await buffer.close()
        }
        do {
            let buffer = try openBuffer(scratch)
            try await buffer.append(series(ph, count: 1, start: 100))
            #expect(try await buffer.flush() == 21, "the counter survives the deletion of every reading")
            #expect(try await allPending(buffer).map(\.sequence) == [21])
            try await buffer.close()
        }
        // The sidecar mirrors the high-water mark.
        let sidecar = try String(contentsOfFile: scratch.file("buffer/buffer.sqlite.seq"), encoding: .utf8)
        #expect(sidecar == "21\n")
    }

    @Test("a commit numbers its samples by timestamp, then natural sensor-id order, whatever order they were appended in: the order a frame predicts")
    func numberedInFrameOrder() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch)
        // Twelve sensors of one sampling phase, stamped in the same millisecond, appended as their reads ended.
        let ids = try (1...4).flatMap { tank in try ["ec", "ph", "temp"].map { try sensor("tank\(tank).\($0)") } }
        try await buffer.register(ids.map { SensorDescriptor(id: $0, quantity: $0.rawValue.hasSuffix("ph") ? .ph : $0.rawValue.hasSuffix("ec") ? .electricalConductivity : .temperature) })
        var generator = SystemRandomNumberGenerator()
        var appended: [Sample] = []
        for round in 0..<5 {
            let at = Timestamp(microseconds: 1_000_000 * Int64(5 - round))  // rounds appended newest first, too
            appended += ids.shuffled(using: &generator).map { Sample(sensor: $0, timestamp: at, value: 6.5) }
        }
        try await buffer.append(appended)
        try await buffer.flush()
        let readings = try await allPending(buffer)
        #expect(readings.count == 60)
        let expected = (1...5).flatMap { second in ids.map { ($0.rawValue, Int64(second) * 1_000_000) } }
        #expect(readings.map(\.sensor.rawValue) == expected.map(\.0), "\(readings.map(\.sensor.rawValue))")
        #expect(readings.map(\.timestamp.microseconds) == expected.map(\.1))
        #expect(naturalOrder("tank2.ec", "tank10.ec") && !naturalOrder("tank10.ec", "tank2.ec"))
        // What it is for: numbered as appended, the same readings cost a frame streams of sequence corrections.
        let batch = Batch(device: try DeviceID("site"), sensors: try await buffer.allDescriptors(), readings: readings)
        var shuffled = readings
        let sequences = readings.map(\.sequence).shuffled(using: &generator)
        for index in shuffled.indices { shuffled[index].sequence = sequences[index] }
        let inOrder = try BatchCodec.encode(batch)
        let asAppended = try BatchCodec.encode(Batch(device: batch.device, sensors: batch.sensors, readings: shuffled.sorted { $0.sequence < $1.sequence }))
        #expect(inOrder.count < asAppended.count, "\(inOrder.count) bytes numbered in frame order, \(asAppended.count) as appended")
        try await buffer.close()
    }

    @Test("values are stored at the sensor's resolution and read back as Readings with their flags")
    func valuesAtResolution() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch)
        let ph = try sensor("tank1.ph")
        let temperature = try sensor("tank1.temp")
        try await buffer.register([
            SensorDescriptor(id: ph, quantity: .ph), SensorDescriptor(id: temperature, quantity: .temperature),
        ])
        try await buffer.append([
            Sample(sensor: ph, timestamp: Timestamp(microseconds: 1), value: 6.123, quality: [.clockUnsynchronized]),
            Sample(sensor: temperature, timestamp: Timestamp(microseconds: 2), value: 21.53, quality: [.sensorFault, .outOfRange]),
        ])
        try await buffer.flush()
        let readings = try await allPending(buffer)
        #expect(readings.count == 2)
        #expect(readings.first?.value == 6.12)
        #expect(readings.first?.quality == [.clockUnsynchronized])
        #expect(readings.last?.value == 21.5)  // 1/16 °C steps: 21.53 -> 344/16
        #expect(readings.last?.quality == [.sensorFault, .outOfRange])
        let descriptors = try await buffer.descriptors(for: [ph, temperature])
        #expect(descriptors.map(\.id) == [ph, temperature])
        #expect(descriptors.last?.resolution == .sixteenth)
        try await buffer.close()
    }

    @Test("a sample already buffered with the same sensor and timestamp is stored once and counted, even after reopening")
    func deduplication() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let ph = try sensor("tank1.ph")
        let ec = try sensor("tank1.ec")
        do {
            let buffer = try openBuffer(scratch)
            try await register(buffer, "tank1.ph", "tank1.ec")
            let sample = Sample(sensor: ph, timestamp: Timestamp(microseconds: 1_000), value: 6.5)
            // Twice in one commit, again in a later commit; the same timestamp on another sensor is not a duplicate.
            try await buffer.append([sample, sample, Sample(sensor: ec, timestamp: Timestamp(microseconds: 1_000), value: 6.5)])
            #expect(try await buffer.flush() == 2)
            try await buffer.append([Sample(sensor: ph, timestamp: Timestamp(microseconds: 1_000), value: 7.0)])
            #expect(try await buffer.flush() == 2, "a duplicate consumes no sequence number")
            let statistics = try await buffer.statistics()
            #expect(statistics.duplicatesIgnored == 2)
            #expect(statistics.pending == 2)
            #expect(try await allPending(buffer).first { $0.sensor == ph }?.value == 6.5, "the first value is kept")
            try await buffer.close()
        }
        let buffer = try openBuffer(scratch)
        #expect(try await buffer.statistics().duplicatesIgnored == 2)
        // Once acknowledged, the same sensor and timestamp is no longer buffered and is stored again.
        let stored = try #require(try await allPending(buffer).first { $0.sensor == ph })
        try await buffer.acknowledge([stored.sequence])
        try await buffer.append([Sample(sensor: ph, timestamp: Timestamp(microseconds: 1_000), value: 6.5)])
        #expect(try await buffer.flush() == 3)
        try await buffer.close()
    }

    @Test("samples of unregistered sensors and unquantizable values are dropped, counted and logged, without a sequence number")
    func rejectedSamples() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let recorder = LogRecorder()
        let buffer = try openBuffer(scratch, logger: recorder.logger)
        try await register(buffer, "tank1.ph")
        let ph = try sensor("tank1.ph")
        try await buffer.append([
            Sample(sensor: try sensor("nobody"), timestamp: Timestamp(microseconds: 1), value: 1),
            Sample(sensor: ph, timestamp: Timestamp(microseconds: 2), value: .nan),
            Sample(sensor: ph, timestamp: Timestamp(microseconds: 3), value: .infinity),
            Sample(sensor: ph, timestamp: Timestamp(microseconds: 4), value: 1e300),
            Sample(sensor: ph, timestamp: Timestamp(microseconds: 5), value: 7),
        ])
        #expect(try await buffer.flush() == 1)
        #expect(buffer.rejectedSamples == 4)
        #expect(try await allPending(buffer).map(\.sequence) == [1])
        #expect(recorder.entries.contains { $0.level == .warning && $0.metadata["buffer.unregistered_sensor"] == "1" })
        try await buffer.close()
    }

    @Test("a value too large to store (a float of 1e30) is refused alone: the other samples of its commit are stored")
    func unstorableValueIsRefusedAlone() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let recorder = LogRecorder()
        let buffer = try openBuffer(scratch, logger: recorder.logger)
        try await buffer.register([
            SensorDescriptor(id: try sensor("tank1.ec"), quantity: .electricalConductivity),
            SensorDescriptor(id: try sensor("tank1.ph"), quantity: .ph),
        ])
        let ec = try sensor("tank1.ec")
        let ph = try sensor("tank1.ph")
        // 1e30 µS/cm at 1/10: 1e31 steps, past the 9e15 a reading can hold exactly (in SQLite and on the wire).
        try await buffer.append([
            Sample(sensor: ec, timestamp: Timestamp(microseconds: 1_000), value: 1413),
            Sample(sensor: ph, timestamp: Timestamp(microseconds: 1_000), value: 6.1),
            Sample(sensor: ec, timestamp: Timestamp(microseconds: 2_000), value: 1e30),
            Sample(sensor: ph, timestamp: Timestamp(microseconds: 2_000), value: 6.2),
            Sample(sensor: ec, timestamp: Timestamp(microseconds: 3_000), value: 1420),
        ])
        #expect(try await buffer.flush() == 4)
        #expect(buffer.rejectedSamples == 1)
        let stored = try await allPending(buffer)
        #expect(stored.map(\.value) == [1413, 6.1, 6.2, 1420])
        #expect(recorder.entries.contains { $0.level == .warning && $0.metadata["buffer.unquantizable_value"] == "1" && $0.metadata["sensor"] == "tank1.ec" })
        try await buffer.close()
    }

    @Test("pending reads either end of the backlog, always in ascending sequence order")
    func pendingFromBothEnds() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch)
        try await register(buffer, "tank1.ph")
        try await buffer.append(series(try sensor("tank1.ph"), count: 10))
        try await buffer.flush()
        #expect(try await buffer.pending(limit: 3, from: .oldest).map(\.sequence) == [1, 2, 3])
        #expect(try await buffer.pending(limit: 3, from: .newest).map(\.sequence) == [8, 9, 10])
        #expect(try await buffer.pending(limit: 0, from: .newest).isEmpty)
        #expect(try await buffer.pending(limit: 50, from: .newest).map(\.sequence) == Array(1...10))
        let statistics = try await buffer.statistics()
        #expect(statistics.pending == 10)
        #expect(statistics.oldestPending == Timestamp(microseconds: 0))
        #expect(statistics.uncommitted == 0)
        try await buffer.close()
    }

    @Test("acknowledge deletes exactly the given sequences, 1000 at a time quickly; unknown ones are ignored")
    func acknowledge() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch)
        try await register(buffer, "tank1.ph")
        try await buffer.append(series(try sensor("tank1.ph"), count: 1_500))
        try await buffer.flush()
        let clock = ContinuousClock()
        let started = clock.now
        let batch = try await buffer.pending(limit: 1_000, from: .oldest)
        try await buffer.acknowledge(batch.map(\.sequence) + [99_999, UInt64.max])
        let elapsed = started.duration(to: clock.now)
        // Bounded loosely: the first test pass shares two cores with CPU-bound suites (2.5 s seen there against a
        // 2 s bound); the speed itself is the benchmarks' to measure.
        #expect(elapsed < .seconds(10), "pending(1000) + acknowledge(1000) took \(elapsed)")
        let rest = try await allPending(buffer)
        #expect(rest.map(\.sequence) == Array(1_001...1_500))
        #expect(try await buffer.statistics().pending == 500)
        try await buffer.close()
        // The cached count agrees with the file.
        let reopened = try openBuffer(scratch)
        #expect(try await reopened.statistics().pending == 500)
        try await reopened.close()
    }

    @Test("quarantine moves readings aside with their reason; pending no longer returns them")
    func quarantine() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch)
        try await register(buffer, "tank1.ph")
        try await buffer.append(series(try sensor("tank1.ph"), count: 5))
        try await buffer.flush()
        try await buffer.quarantine([2: "value out of range", 4: "timestamp in the future", 77: "not pending"])
        #expect(try await allPending(buffer).map(\.sequence) == [1, 3, 5])
        let quarantined = try await buffer.quarantined(limit: 10)
        #expect(Set(quarantined.map(\.sequence)) == [2, 4])
        let two = try #require(quarantined.first { $0.sequence == 2 })
        #expect(two.reason == "value out of range")
        #expect(two.sensor == "tank1.ph")
        #expect(two.value == 6.01)
        #expect(two.timestamp == Timestamp(microseconds: 1_000_000))
        #expect(abs(two.quarantinedAt.microseconds - Int64(Date().timeIntervalSince1970 * 1_000_000)) < 60_000_000)
        let statistics = try await buffer.statistics()
        #expect(statistics.quarantined == 2)
        #expect(statistics.pending == 3)
        #expect(try await buffer.quarantined(limit: 1).count == 1)
        // Quarantined sequence numbers are never handed out again.
        try await buffer.append(series(try sensor("tank1.ph"), count: 1, start: 100))
        #expect(try await buffer.flush() == 6)
        try await buffer.close()
    }

    @Test("drop_oldest keeps the buffer under its quota by deleting the oldest readings, and counts them")
    func quotaDropOldest() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let recorder = LogRecorder()
        let quota: Int64 = 96 * 1024
        let total = 8_000
        do {
            let buffer = try openBuffer(scratch, quota: quota, whenFull: .dropOldest, logger: recorder.logger)
            try await register(buffer, "tank1.ph", "tank1.ec")
            for chunk in 0..<16 {
                let sensorName = chunk % 2 == 0 ? "tank1.ph" : "tank1.ec"
                try await buffer.append(series(try sensor(sensorName), count: total / 16, start: chunk * 1_000))
                try await buffer.flush()
                #expect(try await buffer.statistics().usedBytes <= quota)
            }
            let statistics = try await buffer.statistics()
            #expect(statistics.lastSequence == UInt64(total))
            #expect(statistics.dropped > 0)
            #expect(Int64(statistics.pending) + statistics.dropped == Int64(total), "every reading is either pending or counted")
            let pending = try await allPending(buffer)
            #expect(pending.last?.sequence == UInt64(total), "the newest readings are kept")
            #expect(pending.first?.sequence == UInt64(statistics.dropped) + 1, "the oldest readings went first")
            try await buffer.close()
        }
        #expect(recorder.entries.contains { $0.level == .warning && $0.metadata["buffer.policy"] == "drop_oldest" })
        let reopened = try openBuffer(scratch, quota: quota)
        let statistics = try await reopened.statistics()
        #expect(Int64(statistics.pending) + statistics.dropped == Int64(total), "the dropped counter is persisted")
        try await reopened.close()
    }

    @Test("drop_newest refuses incoming readings once the quota is reached, keeps the backlog, and counts them")
    func quotaDropNewest() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let quota: Int64 = 96 * 1024
        let buffer = try openBuffer(scratch, quota: quota, whenFull: .dropNewest)
        try await register(buffer, "tank1.ph")
        let ph = try sensor("tank1.ph")
        var appended = 0
        for chunk in 0..<16 {
            try await buffer.append(series(ph, count: 500, start: chunk * 1_000))
            appended += 500
            try await buffer.flush()
        }
        let statistics = try await buffer.statistics()
        #expect(statistics.dropped > 0)
        #expect(Int64(statistics.pending) + statistics.dropped == Int64(appended))
        #expect(statistics.lastSequence == UInt64(statistics.pending), "refused samples get no sequence number")
        #expect(statistics.usedBytes <= quota + 64 * 1024, "at most one commit over the quota")
        let pending = try await allPending(buffer)
        #expect(pending.first?.sequence == 1, "the backlog is kept")
        // Once the uploader frees space, new readings are taken again.
        try await buffer.acknowledge(pending.map(\.sequence))
        try await buffer.append(series(ph, count: 10, start: 100_000))
        #expect(try await buffer.flush() == statistics.lastSequence + 10)
        try await buffer.close()
    }

    @Test("a full disk keeps the samples queued and retries; nothing is lost once space returns")
    func diskFull() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch)
        try await register(buffer, "tank1.ph")
        let ph = try sensor("tank1.ph")
        try await buffer.append(series(ph, count: 10))
        try await buffer.flush()
        let pages = (try await buffer.statistics().usedBytes) / 4096
        try await buffer.limitPageCount(pages)
        try await buffer.append(series(ph, count: 5_000, start: 10))
        await #expect {
            try await buffer.flush()
        } throws: { error in
            (error as? SQLiteError)?.isDiskFull == true
        }
        #expect(try await buffer.statistics().uncommitted == 5_000)
        #expect(try await buffer.statistics().lastSequence == 10)
        try await buffer.limitPageCount(1 << 30)
        #expect(try await buffer.flush() == 5_010)
        #expect(try await allPending(buffer).map(\.sequence) == Array(1...5_010))
        try await buffer.close()
    }

    @Test("acknowledgements written without their own fsync reach the disk at the next window that has nothing to commit")
    func idleAcknowledgementsAreSynced() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch)
        try await register(buffer, "tank1.ph")
        let ph = try sensor("tank1.ph")
        try await buffer.append(series(ph, count: 500))
        try await buffer.flush()
        let path = scratch.file("buffer/buffer.sqlite")
        // A checkpoint now, so that the file holds everything committed; the acknowledgement then lives in the WAL only.
        _ = try await buffer.withStore { store in try store.connection.query("PRAGMA wal_checkpoint(TRUNCATE)") }
        try await buffer.acknowledge(try await allPending(buffer).map(\.sequence))
        let before = try Data(contentsOf: URL(fileURLWithPath: path))
        try await buffer.flush()  // nothing queued: a quiet window of the commit loop
        let after = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(before != after, "the acknowledgement was checkpointed (its WAL synced) although nothing was committed")
        // Once synced, a quiet window writes nothing.
        try await buffer.flush()
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == after)
        try await buffer.close()
    }

    @Test("drop_oldest on a disk that stays full: once half the memory queue waits, the oldest stored readings make room")
    func diskFullDropsOldestStored() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch, whenFull: .dropOldest)
        try await register(buffer, "tank1.ph")
        let ph = try sensor("tank1.ph")
        let backlog = 80_000
        try await buffer.append(series(ph, count: backlog))
        try await buffer.flush()
        // The disk is full: the file cannot grow by a page.
        try await buffer.limitPageCount((try await buffer.statistics().usedBytes) / 1024)
        // Below half the queue nothing stored is touched: the commit fails and the samples wait.
        try await buffer.append(series(ph, count: 1_000, start: backlog))
        await #expect(throws: (any Error).self) { try await buffer.flush() }
        #expect(try await buffer.statistics().pending == backlog)
        // Half the queue: the oldest stored readings go, the newest are committed.
        let waiting = ReadingBuffer.maximumQueuedSamples / 2
        try await buffer.append(series(ph, count: waiting - 1_000, start: backlog + 1_000))
        let last = try await buffer.flush()
        #expect(last == UInt64(backlog + waiting))
        let statistics = try await buffer.statistics()
        #expect(statistics.uncommitted == 0)
        // Each commit of at most 5,000 samples that makes room deletes its count, a tenth more and 256 (page slack).
        #expect(statistics.dropped > 0 && statistics.dropped <= Int64(waiting + waiting / 10 + 256 * (waiting / 5_000 + 1)))
        #expect(statistics.pending == backlog + waiting - Int(statistics.dropped))
        let pending = try await allPending(buffer)
        #expect(pending.last?.sequence == UInt64(backlog + waiting))
        #expect(pending.first?.sequence == UInt64(statistics.dropped) + 1, "the oldest went, nothing else")
        try await buffer.limitPageCount(1 << 30)
        try await buffer.close()
    }

    @Test("drop_oldest on a full disk deletes nothing when even the room it makes is not enough")
    func diskFullMakingRoomFailsWhole() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch, whenFull: .dropOldest)
        try await register(buffer, "tank1.ph")
        let ph = try sensor("tank1.ph")
        try await buffer.append(series(ph, count: 100))
        try await buffer.flush()
        try await buffer.limitPageCount((try await buffer.statistics().usedBytes) / 1024)
        // Half the queue waits; a hundred stored readings free far too little for it.
        try await buffer.append(series(ph, count: ReadingBuffer.maximumQueuedSamples / 2, start: 100))
        await #expect(throws: (any Error).self) { try await buffer.flush() }
        let statistics = try await buffer.statistics()
        #expect(statistics.pending == 100, "the stored readings stay: the failed commit deleted nothing")
        #expect(statistics.dropped == 0)
        #expect(statistics.uncommitted == ReadingBuffer.maximumQueuedSamples / 2)
        try await buffer.limitPageCount(1 << 30)
        #expect(try await buffer.flush() == UInt64(100 + ReadingBuffer.maximumQueuedSamples / 2))
        try await buffer.close()
    }

    @Test("past the in-memory cap while commits fail, the policy drops samples and they are counted")
    func memoryCap() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch, whenFull: .dropOldest)
        try await register(buffer, "tank1.ph")
        let ph = try sensor("tank1.ph")
        let cap = ReadingBuffer.maximumQueuedSamples
        try await buffer.append(series(ph, count: cap + 25))
        var statistics = try await buffer.statistics()
        #expect(statistics.uncommitted == cap)
        #expect(statistics.dropped == 25)
        try await buffer.flush()
        statistics = try await buffer.statistics()
        #expect(statistics.dropped == 25, "the in-memory drops are persisted with the next commit")
        #expect(try await buffer.pending(limit: 1, from: .oldest).first?.timestamp == Timestamp(microseconds: 25_000_000))
        try await buffer.close()
    }

    @Test("the group-commit loop commits every interval and flushes on cancellation")
    func commitLoop() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let commits = Mutex(0)
        let buffer = try ReadingBuffer(
            configuration: BufferConfiguration(path: scratch.file("buffer.sqlite"), commitInterval: .milliseconds(50)),
            logger: quietLogger, onCommit: { _ in commits.withLock { $0 += 1 } })
        try await register(buffer, "tank1.ph")
        let ph = try sensor("tank1.ph")
        let loop = Task { try await buffer.run() }
        try await buffer.append(series(ph, count: 3))
        // Generous: this suite runs in the pass with the CPU-bound property tests, which can hold both threads of the
        // concurrency pool (and so the loop's 50 ms sleep) for many seconds on a two-core CI machine.
        let deadline = ContinuousClock.now + .seconds(60)
        while try await buffer.statistics().pending < 3, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(try await buffer.statistics().pending == 3, "committed by the loop, without flush()")
        try await Task.sleep(for: .milliseconds(200))
        #expect(commits.withLock { $0 } == 1, "empty intervals commit nothing")
        try await buffer.append(series(ph, count: 4, start: 3))
        loop.cancel()
        try await loop.value
        #expect(try await buffer.statistics().pending == 7, "the loop flushed before returning")
        try await buffer.close()
    }

    @Test("graceful shutdown of the service group commits what is still queued")
    func gracefulShutdown() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        // An interval so long that only the shutdown can commit.
        let buffer = try openBuffer(scratch, commitInterval: .seconds(3_600))
        try await register(buffer, "tank1.ph")
        let group = ServiceGroup(services: [buffer], logger: quietLogger)
        let running = Task { try await group.run() }
        try await buffer.append(series(try sensor("tank1.ph"), count: 5))
        try await Task.sleep(for: .milliseconds(100))
        #expect(try await buffer.statistics().uncommitted == 5)
        await group.triggerGracefulShutdown()
        try await running.value
        let statistics = try await buffer.statistics()
        #expect(statistics.pending == 5)
        #expect(statistics.uncommitted == 0)
        try await buffer.close()
    }

    @Test("a re-registered sensor with a new resolution has its buffered readings converted; old sensors stay while referenced")
    func registration() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch)
        let ph = try sensor("tank1.ph")
        let old = try sensor("old.ph")
        try await buffer.register([SensorDescriptor(id: ph, quantity: .ph), SensorDescriptor(id: old, quantity: .ph)])
        try await buffer.append([
            Sample(sensor: ph, timestamp: Timestamp(microseconds: 1), value: 6.47),
            Sample(sensor: old, timestamp: Timestamp(microseconds: 1), value: 5.5),
        ])
        try await buffer.flush()
        // tank1.ph goes to 0.1 resolution; old.ph is no longer configured but has a pending reading.
        try await buffer.register([SensorDescriptor(id: ph, quantity: .ph, resolution: .tenth)])
        let readings = try await allPending(buffer)
        // One timestamp: numbered in natural id order, old.ph first.
        #expect(readings.map(\.value) == [5.5, 6.5])
        // Sorted by id: old.ph, tank1.ph.
        #expect(try await buffer.descriptors(for: [ph, old]).map(\.resolution) == [.hundredth, .tenth])
        // New samples of old.ph are rejected.
        try await buffer.append([Sample(sensor: old, timestamp: Timestamp(microseconds: 2), value: 5.5)])
        try await buffer.flush()
        #expect(buffer.rejectedSamples == 1)
        // Once its readings are gone, the next registration forgets it.
        try await buffer.acknowledge(readings.map(\.sequence))
        try await buffer.register([SensorDescriptor(id: ph, quantity: .ph, resolution: .tenth)])
        #expect(try await buffer.descriptors(for: [ph, old]).map(\.id) == [ph])
        try await buffer.close()
    }

    // Before the fix (a tester, 2026-12-06) the buffered pH readings of a sensor re-added as a temperature sensor went
    // up as temperatures (6.12 pH stored as 6.125 °C).
    @Test("a sensor's quantity does not change while the buffer holds readings of it taken as the old one (kept back, unsampled); once they are sent it does")
    func quantityChange() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let buffer = try openBuffer(scratch)
        let swap = try sensor("swap.x")
        try await buffer.register([SensorDescriptor(id: swap, quantity: .ph)])
        try await buffer.append([Sample(sensor: swap, timestamp: Timestamp(microseconds: 1_000_000), value: 6.12)])
        try await buffer.flush()
        let temperature = [SensorDescriptor(id: swap, quantity: .temperature)]
        #expect(try await buffer.quantityChanges(temperature) == [SensorQuantityChange(sensor: swap, buffered: .ph, configured: .temperature, readings: 1)])
        let kept = try await buffer.register(temperature)
        #expect(kept.map(\.sensor) == [swap])
        #expect(kept.first?.description.contains("quantity changed from ph to temperature, but the buffer still holds 1 reading of it") == true)
        // Nothing changed: the reading is still a pH one, and new samples (which would be temperatures) are refused.
        #expect(try await buffer.descriptors(for: [swap]).map(\.quantity) == [.ph])
        #expect(try await allPending(buffer).map(\.value) == [6.12])
        try await buffer.append([Sample(sensor: swap, timestamp: Timestamp(microseconds: 2_000_000), value: 21.5)])
        try await buffer.flush()
        #expect(buffer.rejectedSamples == 1)
        #expect(try await allPending(buffer).map(\.value) == [6.12])
        // Sent: the id is free for another quantity.
        try await buffer.acknowledge(try await allPending(buffer).map(\.sequence))
        #expect(try await buffer.quantityChanges(temperature).isEmpty)
        #expect(try await buffer.register(temperature).isEmpty)
        #expect(try await buffer.descriptors(for: [swap]).map(\.quantity) == [.temperature])
        try await buffer.close()
    }

    enum Damage: String, CaseIterable, Sendable {
        /// The whole file is random bytes: "file is not a database".
        case garbage
        /// The 100-byte header is overwritten.
        case header
        /// A b-tree page in the middle is overwritten; the header is intact and only quick_check notices.
        case page
    }

    @Test("a corrupt buffer is moved aside with a clear log line, and a fresh one starts above the old high-water mark",
          arguments: Damage.allCases)
    func corruptionRecovery(damage: Damage) async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let path = scratch.file("buffer/buffer.sqlite")
        let ph = try sensor("tank1.ph")
        do {
            let buffer = try openBuffer(scratch)
            try await register(buffer, "tank1.ph")
            try await buffer.append(series(ph, count: 3_000))
            #expect(try await buffer.flush() == 3_000)
            try await buffer.close()
        }
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        let size = try handle.seekToEnd()
        var generator = SystemRandomNumberGenerator()
        switch damage {
        case .garbage:
            try handle.seek(toOffset: 0)
            try handle.write(contentsOf: (0..<Int(size)).map { _ in UInt8.random(in: 0...255, using: &generator) })
        case .header:
            try handle.seek(toOffset: 0)
            try handle.write(contentsOf: (0..<100).map { _ in UInt8.random(in: 0...255, using: &generator) })
        case .page:
            // Page 4 onwards hold the readings table and its index; overwrite two of them.
            try handle.seek(toOffset: 4 * 4096)
            try handle.write(contentsOf: (0..<8192).map { _ in UInt8.random(in: 0...255, using: &generator) })
        }
        try handle.close()

        let recorder = LogRecorder()
        let buffer = try openBuffer(scratch, logger: recorder.logger)
        let names = scratch.names(in: "buffer")
        let moved = names.filter { $0.hasPrefix("buffer.sqlite.corrupt-") && !$0.hasSuffix("-wal") && !$0.hasSuffix("-shm") }
        #expect(moved.count == 1, "moved aside: \(names)")
        let movedPath = try #require(moved.first.map { scratch.file("buffer/\($0)") })
        #expect(FileManager.default.fileExists(atPath: movedPath))
        let logged = recorder.entries.first { $0.level == .error }
        #expect(logged?.metadata["buffer.path"] == "\(path)")
        #expect(logged?.metadata["buffer.moved_to"] == "\(movedPath)")

        // A fresh, healthy buffer whose sequence numbers are above everything the old file handed out.
        #expect(try await buffer.integrityProblems().isEmpty)
        #expect(try await buffer.statistics().pending == 0)
        try await register(buffer, "tank1.ph")
        try await buffer.append(series(ph, count: 2, start: 10_000))
        let last = try await buffer.flush()
        #expect(last == 3_000 + UInt64(ReadingBuffer.recoverySequenceGap) + 2)
        #expect(try await allPending(buffer).map(\.sequence) == [last - 1, last])
        try await buffer.close()
    }

    @Test("a deleted buffer file whose sidecar remains does not restart sequence numbers")
    func deletedFileKeepsSequences() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let ph = try sensor("tank1.ph")
        do {
            let buffer = try openBuffer(scratch)
            try await register(buffer, "tank1.ph")
            try await buffer.append(series(ph, count: 7))
            try await buffer.flush()
            try await buffer.close()
        }
        try FileManager.default.removeItem(atPath: scratch.file("buffer/buffer.sqlite"))
        let buffer = try openBuffer(scratch)
        try await register(buffer, "tank1.ph")
        try await buffer.append(series(ph, count: 1))
        #expect(try await buffer.flush() == 7 + UInt64(ReadingBuffer.recoverySequenceGap) + 1)
        try await buffer.close()
    }

    @Test("a file at the buffer's path that is not the agent's is refused and left as it is, not moved aside")
    func foreignFile() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let path = scratch.file("buffer/buffer.sqlite")
        try FileManager.default.createDirectory(atPath: scratch.file("buffer"), withIntermediateDirectories: true)
        #expect(FileManager.default.createFile(atPath: path, contents: Data("hello notes\n".utf8)))
        #expect {
            _ = try openBuffer(scratch)
        } throws: { error in
            error is BufferPathError && String(describing: error).contains("\(path) is not a SQLite database")
        }
        #expect(scratch.names(in: "buffer") == ["buffer.sqlite"])
        #expect(try String(contentsOfFile: path, encoding: .utf8) == "hello notes\n")
        // Another program's database: not put in WAL mode, not converted, not migrated.
        try FileManager.default.removeItem(atPath: path)
        try SQLiteConnection(path: path).execute("CREATE TABLE readings(sensor TEXT); INSERT INTO readings VALUES ('x')")
        #expect {
            _ = try openBuffer(scratch)
        } throws: { error in
            error is BufferPathError && String(describing: error).contains("is a SQLite database of another program (its tables: readings)")
        }
        let connection = try SQLiteConnection(path: path, mode: .readOnly)
        #expect(try connection.query("SELECT name FROM sqlite_master WHERE type = 'table'").compactMap { $0.first?.string } == ["readings"])
        #expect(try connection.queryInt("PRAGMA page_size") == 4096)
        #expect(try connection.query("PRAGMA journal_mode").first?.first?.string == "delete")
        // With the agent's own sidecar beside it (requireHeader false) the file is not opened at all: opening, even read
        // only, made SQLite open and (as root) fchown the -wal and -shm files, which blocked every command that loads
        // the configuration while the buffer's file system was frozen (a tester, 2026-12-07).
        #expect(SQLiteFileCheck.foreignFileProblem(path: path, ownTable: "schema_version", requireHeader: false) == nil)
        #expect(SQLiteFileCheck.foreignFileProblem(path: path, ownTable: "schema_version")?.contains("another program") == true)
    }

    @Test("a buffer written by a newer Farmgate is refused with a message, not moved aside")
    func newerSchema() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let path = scratch.file("buffer/buffer.sqlite")
        try await openBuffer(scratch).close()
        do {
            let connection = try SQLiteConnection(path: path)
            try connection.execute("INSERT INTO schema_version(version, applied_at) VALUES (99, 0)")
        }
        #expect {
            _ = try openBuffer(scratch)
        } throws: { error in
            String(describing: error).contains("schema version 99")
        }
        #expect(!scratch.names(in: "buffer").contains { $0.contains("corrupt") })
        #expect(scratch.names(in: "buffer").contains("buffer.sqlite"))
    }
}

@Suite("Buffer page size conversion")
struct BufferPageSizeTests {
    /// Rebuilds the buffer file with `pageSize`-byte pages, as farmgate before 2026-12 created every buffer (4 KiB).
    private func rebuild(_ path: String, pageSize: Int) throws {
        let connection = try SQLiteConnection(path: path, mode: .readWrite, busyTimeoutMilliseconds: 1_000)
        #expect(try connection.query("PRAGMA journal_mode = DELETE").first?.first?.string == "delete")
        try connection.execute("PRAGMA page_size = \(pageSize)")
        try connection.execute("VACUUM")
        #expect(try connection.query("PRAGMA journal_mode = WAL").first?.first?.string == "wal")
        #expect(try connection.queryInt("PRAGMA page_size") == Int64(pageSize))
    }

    private func pageSize(_ path: String) throws -> Int64? {
        try SQLiteConnection(path: path, mode: .readOnly).queryInt("PRAGMA page_size")
    }

    /// A buffer with readings 101...500 pending (1...100 acknowledged), rebuilt with 4 KiB pages; returns what is pending.
    private func oldBuffer(_ scratch: Scratch) async throws -> [Reading] {
        let buffer = try openBuffer(scratch)
        try await register(buffer, "tank1.ph")
        try await buffer.append(series(try sensor("tank1.ph"), count: 500))
        #expect(try await buffer.flush() == 500)
        try await buffer.acknowledge(Array(1...100))
        let pending = try await allPending(buffer)
        try await buffer.close()
        try rebuild(scratch.file("buffer/buffer.sqlite"), pageSize: 4096)
        return pending
    }

    @Test("a buffer written with 4 KiB pages is converted to 1 KiB pages when opened, keeping every reading and its number")
    func converted() async throws {
        let scratch = try Scratch(prefix: "fg-pagesize")
        let path = scratch.file("buffer/buffer.sqlite")
        let before = try await oldBuffer(scratch)
        #expect(before.map(\.sequence) == Array(101...500))

        let recorder = LogRecorder()
        let buffer = try openBuffer(scratch, logger: recorder.logger)
        #expect(try await allPending(buffer) == before)
        #expect(try await buffer.statistics().lastSequence == 500)
        try await buffer.append(series(try sensor("tank1.ph"), count: 1, start: 1_000))
        #expect(try await buffer.flush() == 501, "numbering goes on after the conversion")
        try await buffer.close()
        #expect(try pageSize(path) == 1024)
        #expect(recorder.entries.contains { $0.level == .info && $0.message.contains("converted to 1024-byte pages") })
        // In WAL mode again, and healthy.
        let check = try SQLiteConnection(path: path, mode: .readWrite)
        #expect(try check.query("PRAGMA journal_mode").first?.first?.string == "wal")
        #expect(try check.integrityProblems(quick: false).isEmpty)
    }

    @Test("a file over the size limit keeps its pages and works; a later start under the limit converts it")
    func overTheLimit() async throws {
        let scratch = try Scratch(prefix: "fg-pagesize")
        let path = scratch.file("buffer/buffer.sqlite")
        let before = try await oldBuffer(scratch)
        let recorder = LogRecorder()
        do {
            let store = try BufferStore.open(path: path, pageConversionLimit: 0, logger: recorder.logger)
            #expect(try store.connection.queryInt("PRAGMA page_size") == 4096)
            #expect(try store.pending(limit: 1_000, from: .oldest) == before)
        }
        #expect(recorder.entries.contains { $0.level == .notice && $0.message.contains("keeps its 4096-byte pages for now") })
        let buffer = try openBuffer(scratch)
        #expect(try await allPending(buffer) == before)
        try await buffer.close()
        #expect(try pageSize(path) == 1024)
    }

    @Test("while another process holds the file, the conversion is skipped with a warning and the buffer opens as it was")
    func heldByAnotherProcess() async throws {
        let scratch = try Scratch(prefix: "fg-pagesize")
        let path = scratch.file("buffer/buffer.sqlite")
        let before = try await oldBuffer(scratch)
        // Another reader in the middle of a read transaction: WAL mode cannot be left under it.
        let reader = try SQLiteConnection(path: path, mode: .readOnly)
        try reader.execute("BEGIN")
        #expect(try reader.queryInt("SELECT count(*) FROM readings") == 400)
        let recorder = LogRecorder()
        do {
            let store = try BufferStore.open(path: path, logger: recorder.logger)
            #expect(try store.connection.queryInt("PRAGMA page_size") == 4096)
            #expect(try store.pending(limit: 1_000, from: .oldest) == before)
        }
        try reader.execute("COMMIT")
        #expect(recorder.entries.contains { $0.level == .warning && $0.message.contains("keeps its 4096-byte pages") })
        #expect(try pageSize(path) == 4096)
    }
}
