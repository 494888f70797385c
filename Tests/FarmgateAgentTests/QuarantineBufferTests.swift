import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

@testable import FarmgateAgent

/// Quarantine review on a real buffer file: migration 3, listing by pages, requeue, drop, and the quota trimming it last.
@Suite("Buffer quarantine")
struct QuarantineBufferTests {
    let quiet = Logger(label: "test.quarantine") { _ in SwiftLogNoOpLogHandler() }
    let ph: SensorID
    let ec: SensorID
    let base = Timestamp.now().microseconds - 86_400_000_000

    init() throws {
        ph = try SensorID("tank1.ph")
        ec = try SensorID("tank1.ec")
    }

    func open(_ scratch: Scratch, quota: Int64 = 512 << 20, logger: Logger? = nil) async throws -> ReadingBuffer {
        let path = scratch.file("buffer.sqlite")
        let logger = logger ?? quiet
        let buffer = try await runOffPool {
            try ReadingBuffer(configuration: BufferConfiguration(path: path, quotaBytes: quota, whenFull: .dropOldest), logger: logger)
        }
        try await buffer.register([SensorDescriptor(id: ph, quantity: .ph), SensorDescriptor(id: ec, quantity: .electricalConductivity)])
        return buffer
    }

    /// Commits `count` pH readings one second apart from `first` (seconds after `base`); returns their sequence numbers.
    func commit(_ buffer: ReadingBuffer, count: Int, first: Int = 0, sensor: SensorID? = nil) async throws -> [UInt64] {
        let before = try await buffer.statistics().lastSequence
        let samples = (0..<count).map { i in
            Sample(sensor: sensor ?? ph, timestamp: Timestamp(microseconds: base + Int64(first + i) * 1_000_000), value: 6.075 + Double(i % 7) / 100)
        }
        try await buffer.append(samples)
        let last = try await buffer.flush()
        return Array((before + 1)...last)
    }

    @Test("Migration 3 splits old reasons into code and message and adds the trimmed and dropped counters")
    func migrationBackfill() async throws {
        let scratch = try Scratch(prefix: "fg-q-mig")
        let path = scratch.file("buffer.sqlite")
        // A version-1 file as an older farmgate left it, with three quarantined readings.
        try await runOffPool {
            let connection = try SQLiteConnection(path: path, mode: .readWriteCreate, busyTimeoutMilliseconds: 1_000)
            try connection.execute("PRAGMA journal_mode = WAL")
            try connection.execute(BufferSchema.version1)
            try connection.query("INSERT INTO schema_version(version, applied_at) VALUES (1, 0)")
            for name in ["last_sequence", "dropped", "duplicates_ignored"] {
                try connection.query("INSERT INTO counters(name, value) VALUES (?, ?)", [.text(name), .integer(name == "last_sequence" ? 3 : 0)])
            }
            try connection.query(
                "INSERT INTO sensors(key, id, quantity, resolution_numerator, resolution_denominator) VALUES (1, 'tank1.ph', 'ph', 1, 100)")
            let reasons = [
                "timestamp_in_future: the timestamp is 2 days ahead: check the clock", "the buffer has no descriptor",
                "Not A Code: something",
            ]
            for (index, reason) in reasons.enumerated() {
                try connection.query(
                    "INSERT INTO quarantine(sequence, sensor, timestamp, steps, quality, reason, quarantined_at) VALUES (?, 1, ?, 608, 0, ?, 5)",
                    [.integer(Int64(index + 1)), .integer(base + Int64(index)), .text(reason)])
            }
        }
        let buffer = try await open(scratch)
        let rows = try await buffer.quarantinePage()
        #expect(rows.map(\.code) == ["timestamp_in_future", "unknown", "unknown"])
        #expect(rows.map(\.message) == ["the timestamp is 2 days ahead: check the clock", "the buffer has no descriptor", "Not A Code: something"])
        #expect(rows.first?.reason == "timestamp_in_future: the timestamp is 2 days ahead: check the clock")
        #expect(rows.first?.value == 6.08)
        #expect(rows.first?.resolution == "1/100")
        let statistics = try await buffer.statistics()
        #expect(statistics.quarantinedByCode == ["timestamp_in_future": 1, "unknown": 2])
        #expect(statistics.quarantineTrimmed == 0 && statistics.quarantineDropped == 0)
        try await buffer.close()
        // The Swift parser follows the same rule as the SQL backfill.
        #expect(QuarantineReason(parsing: "timestamp_in_future: x: y") == QuarantineReason(parsing: "timestamp_in_future: x: y"))
        #expect(QuarantineReason(parsing: "timestamp_in_future: x: y").message == "x: y")
        #expect(QuarantineReason(parsing: "Not A Code: something").code == "unknown")
        #expect(QuarantineReason(parsing: ": empty code").code == "unknown")
    }

    @Test("Listing pages through the whole quarantine in sequence order, by code")
    func listPages() async throws {
        let scratch = try Scratch(prefix: "fg-q-list")
        let buffer = try await open(scratch)
        let sequences = try await commit(buffer, count: 2_500)
        var reasons: [UInt64: String] = [:]
        for (index, sequence) in sequences.enumerated() {
            reasons[sequence] = index % 5 == 0 ? "unknown_sensor: not declared" : "timestamp_in_future: \(index) s ahead"
        }
        try await buffer.quarantine(reasons)

        func all(code: String?) async throws -> (rows: [QuarantinedReading], pages: Int) {
            var rows: [QuarantinedReading] = []
            var after: UInt64 = 0
            var pages = 0
            while true {
                let page = try await buffer.quarantinePage(code: code, after: after, limit: 1_000)
                guard let last = page.last else { break }
                #expect(page.count <= 1_000)
                pages += 1
                rows += page
                after = last.sequence
            }
            return (rows, pages)
        }
        let everything = try await all(code: nil)
        #expect(everything.pages == 3)
        #expect(everything.rows.map(\.sequence) == sequences)
        let unknown = try await all(code: "unknown_sensor")
        #expect(unknown.rows.count == 500)
        #expect(unknown.rows.allSatisfy { $0.code == "unknown_sensor" && $0.message == "not declared" })
        #expect(try await buffer.quarantinePage(code: "no_such_code").isEmpty)
        // A limit above the page size is capped.
        #expect(try await buffer.quarantinePage(limit: 5_000).count == ReadingBuffer.maximumQuarantinePage)
        let statistics = try await buffer.statistics()
        #expect(statistics.quarantinedByCode == ["unknown_sensor": 500, "timestamp_in_future": 2_000])
        try await buffer.close()
    }

    @Test("Requeue puts readings back with their original sequence numbers; one equal to a pending reading stays in quarantine")
    func requeue() async throws {
        let scratch = try Scratch(prefix: "fg-q-req")
        let buffer = try await open(scratch)
        let sequences = try await commit(buffer, count: 10)
        let ecSequences = try await commit(buffer, count: 3, sensor: ec)
        try await buffer.quarantine(Dictionary(uniqueKeysWithValues: sequences.map { ($0, "timestamp_in_future: ahead") }))
        try await buffer.quarantine(Dictionary(uniqueKeysWithValues: ecSequences.map { ($0, "unknown_sensor: not declared") }))
        #expect(try await buffer.statistics().pending == 0)

        // A new reading with the sensor and timestamp of quarantined sequence 4 (say the clock repeated itself).
        try await buffer.append([Sample(sensor: ph, timestamp: Timestamp(microseconds: base + 3 * 1_000_000), value: 7.0)])
        let newer = try await buffer.flush()

        let outcome = try await buffer.requeue(.code("timestamp_in_future"))
        #expect(outcome.requeued == 9)
        #expect(outcome.conflicting == [sequences[3]])
        #expect(outcome.notFound.isEmpty)
        let pending = try await buffer.pending(limit: 100, from: .oldest)
        #expect(pending.map(\.sequence) == sequences.filter { $0 != sequences[3] } + [newer])
        #expect(pending.first?.value == 6.08, "the value at the sensor's resolution, as stored")
        var statistics = try await buffer.statistics()
        #expect(statistics.pending == 10 && statistics.quarantined == 4)
        #expect(statistics.quarantinedByCode == ["timestamp_in_future": 1, "unknown_sensor": 3])
        #expect(statistics.lastSequence == newer, "requeue assigns no new sequence numbers")

        // Once the pending one is delivered, the conflicting reading can be requeued too; unknown numbers are reported.
        try await buffer.acknowledge([newer])
        let second = try await buffer.requeue(.sequences([sequences[3], 999, ecSequences[0]]))
        #expect(second == RequeueOutcome(requeued: 2, conflicting: [], notFound: [999]))
        let all = try await buffer.requeue(.all)
        #expect(all.requeued == 2)
        try await buffer.close()

        // Durable: the reopened file agrees.
        let reopened = try await open(scratch)
        statistics = try await reopened.statistics()
        #expect(statistics.pending == 13 && statistics.quarantined == 0 && statistics.quarantinedByCode.isEmpty)
        #expect(try await reopened.pending(limit: 100, from: .oldest).map(\.sequence) == sequences + ecSequences)
        try await reopened.close()
    }

    @Test("Drop deletes the selected readings for good, counts them and logs it")
    func drop() async throws {
        let scratch = try Scratch(prefix: "fg-q-drop")
        let recorder = MessageBox()
        let logger = Logger(label: "test.drop") { _ in MessageRecorder(box: recorder) }
        let buffer = try await open(scratch, logger: logger)
        let sequences = try await commit(buffer, count: 6)
        try await buffer.quarantine([
            sequences[0]: "out_of_range: too high", sequences[1]: "out_of_range: too high", sequences[2]: "unknown_sensor: x",
            sequences[3]: "unknown_sensor: x",
        ])
        #expect(try await buffer.dropQuarantined(.code("out_of_range")) == DropOutcome(dropped: 2, notFound: []))
        #expect(try await buffer.dropQuarantined(.sequences([sequences[2], sequences[4]])) == DropOutcome(dropped: 1, notFound: [sequences[4]]))
        #expect(recorder.messages.withLock { $0 }.contains { $0.contains("dropped for good") })
        var statistics = try await buffer.statistics()
        #expect(statistics.quarantined == 1 && statistics.quarantineDropped == 3 && statistics.pending == 2)
        try await buffer.close()
        let reopened = try await open(scratch)
        statistics = try await reopened.statistics()
        #expect(statistics.quarantineDropped == 3 && statistics.quarantinedByCode == ["unknown_sensor": 1])
        #expect(try await reopened.dropQuarantined(.all).dropped == 1)
        #expect(try await reopened.statistics().quarantineDropped == 4)
        try await reopened.close()
    }

    // Before the fix, `requeue --all` over a large quarantine was one transaction and one job on the buffer's thread: the
    // group commit waited behind all of it (the watchdog then killed the agent on a Pi), and nobody ever saw it half done.
    @Test("A large requeue runs in chunks that commits and status go between; outcome, counts and log stay exact")
    func largeRequeueRunsInChunks() async throws {
        let scratch = try Scratch(prefix: "fg-q-chunks")
        let log = RecordedLog()
        let buffer = try await open(scratch, logger: log.logger())
        // Six chunks of 5,000 (ReadingBuffer.quarantineChunkSize), and three readings of another code left alone.
        let count = 30_000
        let sequences = try await commit(buffer, count: count)
        let ecSequences = try await commit(buffer, count: 3, sensor: ec)
        try await buffer.quarantine(Dictionary(uniqueKeysWithValues: sequences.map { ($0, "timestamp_in_future: ahead") }))
        try await buffer.quarantine(Dictionary(uniqueKeysWithValues: ecSequences.map { ($0, "unknown_sensor: not declared") }))
        // Pending readings equal in sensor and timestamp to quarantined ones on both sides of chunk boundaries.
        let clashing = [4_999, 5_000, 25_001]
        try await buffer.append(clashing.map { Sample(sensor: ph, timestamp: Timestamp(microseconds: base + Int64($0) * 1_000_000), value: 7) })
        try await buffer.flush()

        let finished = Mutex(false)
        let requeue = Task {
            defer { finished.withLock { $0 = true } }
            return try await buffer.requeue(.code("timestamp_in_future"))
        }
        // Meanwhile the sampler's commits and `farmgate status` go on; what status sees shows whether it got in between.
        var seen: [Int] = []
        var sampled = 0
        while !finished.withLock({ $0 }) {
            try await buffer.append([Sample(sensor: ph, timestamp: Timestamp(microseconds: base + Int64(100_000 + sampled) * 1_000_000), value: 6)])
            try await buffer.flush()
            sampled += 1
            seen.append(try await buffer.statistics().quarantined)
        }
        let outcome = try await requeue.value
        #expect(outcome.requeued == count - clashing.count)
        #expect(outcome.conflicting == clashing.map { sequences[$0] }, "named in ascending order across chunks")
        #expect(outcome.notFound.isEmpty)
        let start = count + 3
        let end = clashing.count + 3
        #expect(seen.contains { $0 < start && $0 > end }, "status never ran between two chunks: \(Set(seen).sorted())")

        let statistics = try await buffer.statistics()
        #expect(statistics.quarantined == end)
        #expect(statistics.quarantinedByCode == ["timestamp_in_future": clashing.count, "unknown_sensor": 3])
        #expect(statistics.pending == count - clashing.count + clashing.count + sampled)
        let notices = log.entries.filter { $0.message.contains("requeued") }
        #expect(notices.count == 1, "one log line for the whole requeue: \(notices.map(\.message))")
        #expect(notices.first?.metadata["buffer.requeued"] == "\(count - clashing.count)")
        #expect(notices.first?.metadata["buffer.conflicting"] == "\(clashing.count)")
        try await buffer.close()

        // What the reopened file says agrees with what the buffer counted.
        let reopened = try await open(scratch)
        let again = try await reopened.statistics()
        #expect(again.quarantined == end && again.quarantinedByCode == statistics.quarantinedByCode && again.pending == statistics.pending)
        try await reopened.close()
    }

    // Before the fix, one failing moment anywhere in a large drop or requeue undid all of it, and a stop midway (the
    // watchdog's kill) did the same: the job could never finish.
    @Test("A requeue or drop stopped midway keeps the chunks it finished, says so, and a repeat finishes the rest",
          arguments: ["requeue", "drop"])
    func stoppedMidwayKeepsFinishedChunks(operation: String) async throws {
        let scratch = try Scratch(prefix: "fg-q-midway")
        let log = RecordedLog()
        let buffer = try await open(scratch, logger: log.logger())
        let count = 12_000
        let sequences = try await commit(buffer, count: count)
        try await buffer.quarantine(
            Dictionary(uniqueKeysWithValues: sequences.enumerated().map { ($1, $0 % 2 == 0 ? "out_of_range: high" : "unknown_sensor: x") }))
        // Something fails in the middle (here a trigger: the disk, or the agent's stop, in real life).
        let failing = sequences[7_500]
        try await buffer.withStore { store in
            try store.connection.execute(
                "CREATE TEMP TRIGGER fail_midway BEFORE DELETE ON quarantine WHEN old.sequence = \(failing) BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
        }
        let unknown: UInt64 = 999_999_999
        let selection = QuarantineSelection.sequences(sequences + [unknown])
        do {
            if operation == "requeue" { _ = try await buffer.requeue(selection) } else { _ = try await buffer.dropQuarantined(selection) }
            Issue.record("the injected failure did not stop the \(operation)")
        } catch {
            #expect("\(error)".contains("injected failure"), "\(error)")
            #expect("\(error)".contains("run the \(operation) again"), "says that the rest can be finished: \(error)")
        }
        var statistics = try await buffer.statistics()
        let done = count - statistics.quarantined
        #expect(done > 0 && done < count, "the chunks before the failure stay done; the failing one is undone whole: \(done)")
        #expect(statistics.quarantinedByCode.values.reduce(0, +) == statistics.quarantined)
        if operation == "requeue" {
            #expect(statistics.pending == done)
        } else {
            #expect(statistics.quarantineDropped == Int64(done) && statistics.pending == 0)
        }
        #expect(log.entries.contains { $0.metadata["buffer.unfinished"] != nil }, "what was done before the failure is logged")
        try await buffer.close()

        // Durable as counted; the repeat finishes the rest and names what was already gone.
        let reopened = try await open(scratch)
        #expect(try await reopened.statistics().quarantined == statistics.quarantined)
        if operation == "requeue" {
            let rest = try await reopened.requeue(selection)
            #expect(rest.requeued == count - done && rest.conflicting.isEmpty)
            #expect(rest.notFound == Array(sequences.prefix(done)) + [unknown])
        } else {
            let rest = try await reopened.dropQuarantined(selection)
            #expect(rest.dropped == count - done)
            #expect(rest.notFound == Array(sequences.prefix(done)) + [unknown])
        }
        statistics = try await reopened.statistics()
        #expect(statistics.quarantined == 0 && statistics.quarantinedByCode.isEmpty)
        #expect(statistics.pending == (operation == "requeue" ? count : 0))
        #expect(statistics.quarantineDropped == (operation == "requeue" ? 0 : Int64(count)))
        try await reopened.close()
    }

    @Test("A requeue starts no further chunk once the commit loop has ended (the agent stops or reloads)")
    func requeueEndsWithTheCommitLoop() async throws {
        let scratch = try Scratch(prefix: "fg-q-ending")
        let buffer = try await open(scratch)
        let count = 60_000
        let sequences = try await commit(buffer, count: count)
        try await buffer.quarantine(Dictionary(uniqueKeysWithValues: sequences.map { ($0, "timestamp_in_future: ahead") }))
        let loop = Task { try await buffer.run() }
        let requeue = Task { try await buffer.requeue(.all) }
        let started = try await eventually(timeout: .seconds(20), every: .milliseconds(1)) {
            try await buffer.statistics().quarantined < count
        }
        #expect(started)
        loop.cancel()
        try await loop.value
        do {
            let outcome = try await requeue.value
            Issue.record("the requeue went on after the commit loop ended: \(outcome.requeued) requeued")
        } catch {
            #expect("\(error)".contains("stopping") && "\(error)".contains("run the requeue again"), "\(error)")
        }
        let statistics = try await buffer.statistics()
        #expect(statistics.quarantined > 0 && statistics.pending == count - statistics.quarantined)
        try await buffer.close()
    }

    @Test("drop_oldest trims pending readings first and quarantine only when no pending reading is left, counted apart")
    func quotaTrimsQuarantineLast() async throws {
        let scratch = try Scratch(prefix: "fg-q-quota")
        // Build the state with room to spare: 1,000 quarantined readings, then 8,000 pending.
        var buffer = try await open(scratch)
        let quarantined = try await commit(buffer, count: 1_000)
        try await buffer.quarantine(Dictionary(uniqueKeysWithValues: quarantined.map { ($0, "timestamp_in_future: ahead") }))
        let quarantineBytes = try await buffer.statistics().usedBytes
        _ = try await commit(buffer, count: 8_000, first: 10_000)
        let totalBytes = try await buffer.statistics().usedBytes
        try await buffer.close()
        #expect(totalBytes > quarantineBytes * 2)

        // 1. A quota whose 90 % lies between the two: deleting pending readings is enough; quarantine is untouched.
        let target = (quarantineBytes + totalBytes) / 2
        buffer = try await open(scratch, quota: target * 10 / 9)
        _ = try await commit(buffer, count: 1, first: 50_000)
        var statistics = try await buffer.statistics()
        #expect(statistics.dropped > 0 && statistics.pending > 0)
        #expect(statistics.quarantined == 1_000 && statistics.quarantineTrimmed == 0)
        try await buffer.close()

        // 2. A quota below what quarantine alone takes: every pending reading goes, then the oldest quarantined ones.
        buffer = try await open(scratch, quota: quarantineBytes / 2)
        _ = try await commit(buffer, count: 1, first: 60_000)
        statistics = try await buffer.statistics()
        #expect(statistics.pending == 0)
        #expect(statistics.quarantineTrimmed > 0)
        #expect(statistics.quarantined + Int(statistics.quarantineTrimmed) == 1_000)
        #expect(statistics.quarantinedByCode["timestamp_in_future"] == statistics.quarantined)
        #expect(statistics.usedBytes <= quarantineBytes / 2)
        let survivors = try await buffer.quarantinePage(limit: 1_000).map(\.sequence)
        #expect(survivors == Array(quarantined.suffix(survivors.count)), "the oldest quarantined readings go first")
        try await buffer.close()

        // Persisted.
        buffer = try await open(scratch)
        #expect(try await buffer.statistics().quarantineTrimmed == statistics.quarantineTrimmed)
        try await buffer.close()
    }

    @Test("The sequence sidecar is written to a temporary file, renamed over the old one, and its directory fsynced")
    func sidecarRenamed() throws {
        let scratch = try Scratch(prefix: "fg-q-seq")
        let sidecar = SequenceSidecar(bufferPath: scratch.file("buffer.sqlite"))
        try sidecar.store(41)
        try sidecar.store(42)
        #expect(sidecar.read() == .value(42))
        #expect(scratch.names() == ["buffer.sqlite.seq"], "no temporary file left behind")
        try SequenceSidecar.syncDirectory(of: scratch.file("buffer.sqlite.seq"))
        // A directory that cannot be opened is reported, not ignored.
        #expect(throws: SidecarError.self) { try SequenceSidecar.syncDirectory(of: scratch.file("missing/buffer.sqlite.seq")) }
        // A relative path syncs the working directory.
        try SequenceSidecar.syncDirectory(of: "buffer.sqlite.seq")
    }
}

private final class MessageBox: Sendable {
    let messages = Mutex<[String]>([])
}

/// Records log messages.
private struct MessageRecorder: LogHandler {
    let box: MessageBox
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) { box.messages.withLock { $0.append(event.message.description) } }
}
