import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

@testable import FarmgateAgent

/// What the buffer does with its own files when they hold what it never writes (a hand edit, a bad block, a downgrade), and
/// how it reports that it cannot write: never a trap, never a queue blocked for good, never a silent failure.
@Suite("ReadingBuffer: damaged content and failing writes")
struct BufferDamageTests {
    static let logger = Logger(label: "test.buffer.damage") { _ in SwiftLogNoOpLogHandler() }
    static let ph = SensorDescriptor(id: constantSensorID("tank1.ph"), quantity: .ph)

    static func open(_ scratch: Scratch) throws -> ReadingBuffer {
        try ReadingBuffer(configuration: BufferConfiguration(path: scratch.file("buffer/buffer.sqlite")), logger: logger)
    }

    static func samples(_ count: Int, start: Int) -> [Sample] {
        (0..<count).map { Sample(sensor: ph.id, timestamp: Timestamp(microseconds: Int64(start + $0) * 1_000_000), value: 6.5) }
    }

    // Before the fix, `sidecar + recoverySequenceGap` trapped at open: the agent could not start.
    @Test func aSidecarPastAnyPlausibleSequenceIsIgnoredNotTrappedOn() async throws {
        let scratch = try Scratch(prefix: "fg-damage")
        try FileManager.default.createDirectory(atPath: scratch.file("buffer"), withIntermediateDirectories: true)
        _ = try scratch.write("buffer/buffer.sqlite.seq", "\(Int64.max)\n")
        let buffer = try Self.open(scratch)
        try await buffer.register([Self.ph])
        try await buffer.append(Self.samples(2, start: 0))
        #expect(try await buffer.flush() == 2, "a brand-new site: the implausible sidecar is not trusted")
        try await buffer.close()
        let sidecar = try String(contentsOfFile: scratch.file("buffer/buffer.sqlite.seq"), encoding: .utf8)
        #expect(sidecar == "2\n", "rewritten with the true high-water mark")
    }

    // Before the fix, `lastSequence + 1` trapped at every commit: a crash loop.
    @Test(arguments: ["UPDATE counters SET value = 9223372036854775807 WHERE name = 'last_sequence'",
                      "UPDATE readings SET sequence = 9223372036854775807 WHERE sequence = 3"])
    func aCounterOrRowPastAnyPlausibleSequenceDoesNotTrapTheCommit(damage: String) async throws {
        let scratch = try Scratch(prefix: "fg-damage")
        do {
            let buffer = try Self.open(scratch)
            try await buffer.register([Self.ph])
            try await buffer.append(Self.samples(3, start: 0))
            try await buffer.flush()
            try await buffer.close()
        }
        do {
            let connection = try SQLiteConnection(path: scratch.file("buffer/buffer.sqlite"), mode: .readWrite)
            try connection.execute(damage)
        }
        let buffer = try Self.open(scratch)
        try await buffer.register([Self.ph])
        try await buffer.append(Self.samples(2, start: 10))
        let last = try await buffer.flush()
        #expect(last < UInt64(BufferStore.maximumPlausibleSequence), "numbered from the plausible rows: \(last)")
        #expect(last >= 4)
        let pending = try await buffer.pending(limit: 10, from: .oldest)
        #expect(pending.count == 5, "nothing is lost: \(pending.map(\.sequence))")
        try await buffer.acknowledge(pending.map(\.sequence))
        #expect(try await buffer.statistics().pending == 0)
        try await buffer.close()
    }

    // Before the fix, undecodable rows were skipped but stayed pending: eight of them blocked every later event for good.
    @Test func undecodableCalibrationRowsAreQuarantinedAndNoLongerBlockTheQueue() async throws {
        let scratch = try Scratch(prefix: "fg-damage")
        let buffer = try Self.open(scratch)
        try await buffer.register([Self.ph])
        try await buffer.recordCalibration(UploadCalibrationTests.event(1))
        do {
            let connection = try SQLiteConnection(path: scratch.file("buffer/buffer.sqlite"), mode: .readWrite, busyTimeoutMilliseconds: 5_000)
            for n in 0..<(Uploader.maxEventsPerBatch + 1) {
                try connection.query(
                    "INSERT INTO calibrations(id, sensor, time, event, recorded_at) VALUES (?1, 'tank1.ph', 0, ?2, 0)",
                    [.text("bad-\(n)"), .text(n == 0 ? "{\"written_by\":\"a newer farmgate\"}" : "not json")])
            }
        }
        try await buffer.recordCalibration(UploadCalibrationTests.event(2))
        // The oldest good event comes first; then the bad rows are set aside and the next good one is reached.
        let first = try await buffer.pendingCalibrations(limit: 1)
        #expect(first.map(\.id) == ["cal-test-1"])
        try await buffer.acknowledgeCalibrations(first.map(\.id))
        let next = try await buffer.pendingCalibrations(limit: Uploader.maxEventsPerBatch)
        #expect(next.map(\.id) == ["cal-test-2"])
        try await buffer.acknowledgeCalibrations(next.map(\.id))
        let statistics = try await buffer.statistics()
        #expect(statistics.pendingCalibrations == 0)
        #expect(statistics.quarantinedCalibrations == Uploader.maxEventsPerBatch + 1, "kept, visibly, for an installer")
        // An installer can drop them by their code.
        #expect(try await buffer.dropQuarantinedCalibrations(code: "undecodable_event") == Uploader.maxEventsPerBatch + 1)
        try await buffer.close()
    }

    @Test func aFailedCommitIsCountedAndShownWithItsError() async throws {
        let scratch = try Scratch(prefix: "fg-damage")
        let buffer = try Self.open(scratch)
        try await buffer.register([Self.ph])
        try await buffer.append(Self.samples(10, start: 0))
        try await buffer.flush()
        #expect(try await buffer.statistics().errors == nil)
        try await buffer.limitPageCount((try await buffer.statistics().usedBytes) / 1024)
        try await buffer.append(Self.samples(5_000, start: 10))
        await #expect(throws: (any Error).self) { try await buffer.flush() }
        let errors = try #require(try await buffer.statistics().errors)
        #expect(errors.commit == 1)
        #expect(errors.acknowledge == 0)
        #expect(errors.last?.operation == "commit")
        #expect(errors.last?.message.contains("full") == true, "\(errors.last?.message ?? "nil")")
        try await buffer.limitPageCount(1 << 30)
        try await buffer.flush()
        try await buffer.close()
    }

    /// Where a running buffer first meets the damage: its own group commit, or a read (the uploader's).
    enum Discovery: String, CaseIterable, Sendable {
        case commit
        case read
    }

    /// Damages the buffer at `path` under its running owner: the root pages of the readings table and its indexes are
    /// overwritten with bytes no b-tree page has, as a bad SD card block would leave them. First the WAL is checkpointed
    /// into the file and restarted, which also makes the owner's connection drop its page cache at its next transaction,
    /// so that it reads the damaged pages from the disk.
    static func damageUnderOwner(_ path: String) throws {
        let pageSize: Int64
        let roots: [Int64]
        do {
            let connection = try SQLiteConnection(path: path, mode: .readWrite, busyTimeoutMilliseconds: 5_000)
            pageSize = try connection.queryInt("PRAGMA page_size") ?? 1024
            roots = try connection.query("SELECT rootpage FROM sqlite_master WHERE tbl_name = 'readings' AND rootpage > 1")
                .compactMap { $0.first?.int64 }
            let checkpoint = try connection.query("PRAGMA wal_checkpoint(TRUNCATE)")
            #expect(checkpoint.first?.first?.int64 == 0, "the checkpoint was not blocked: \(checkpoint)")
        }
        #expect(roots.count >= 2, "the table and its index: \(roots)")
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        for root in roots {
            try handle.seek(toOffset: UInt64((root - 1) * pageSize))
            try handle.write(contentsOf: [UInt8](repeating: 0xFF, count: Int(pageSize)))
        }
        try handle.synchronize()
        try handle.close()
    }

    // Before the fix the commit loop logged the failure and retried it every interval for ever, beating its heartbeat all
    // the while: systemd never restarted the agent, and only a restart recovers a damaged buffer.
    @Test(arguments: Discovery.allCases)
    func aFileDamagedWhileRunningEndsTheCommitLoopSoThatARestartRecoversIt(discovery: Discovery) async throws {
        let scratch = try Scratch(prefix: "fg-damage")
        let path = scratch.file("buffer/buffer.sqlite")
        let log = RecordedLog()
        let logger = log.logger(label: "test.buffer.damage.run")
        let buffer = try ReadingBuffer(configuration: BufferConfiguration(path: path, commitInterval: .milliseconds(50)), logger: logger)
        try await buffer.register([Self.ph])
        try await buffer.append(Self.samples(3_000, start: 0))
        let committed = try await buffer.flush()
        let ended = Mutex<String?>(nil)
        let loop = Task {
            do {
                try await buffer.run()
                ended.withLock { $0 = "returned without an error" }
            } catch {
                ended.withLock { $0 = "\(error)" }
            }
        }
        defer { loop.cancel() }

        try Self.damageUnderOwner(path)
        switch discovery {
        case .commit:
            try await buffer.append(Self.samples(5, start: 10_000))
        case .read:
            await #expect(throws: SQLiteError.self) { try await buffer.pending(limit: 10, from: .oldest) }
        }
        // The loop notices at its next 50 ms tick; the bound is for the first pass of `make test`, whose CPU-bound
        // property suites have held both threads of the concurrency pool for more than 10 s on two cores (the loop's
        // wake-up and this wait's own polls both wait for a thread).
        let stopped = await eventually(timeout: .seconds(90)) { ended.withLock { $0 } != nil }
        #expect(stopped, "the commit loop goes on over a damaged file; its log: \(log.entries.map { "\($0.level) \($0.message) \($0.metadata)" })")
        guard stopped, let error = ended.withLock({ $0 }) else { return }
        #expect(error.contains(path) && error.contains("corrupt") && error.contains("restart"), "\(error)")

        // Said once, naming the file and where it went; the file is moved aside as at start, the sidecar is current.
        let reports = log.entries.filter { $0.message.contains("corrupt") }
        #expect(reports.count == 1, "\(reports.map(\.message))")
        #expect(reports.first?.level == .critical)
        #expect(reports.first?.metadata["buffer.path"] == "\(path)")
        let moved = scratch.names(in: "buffer").filter { $0.hasPrefix("buffer.sqlite.corrupt-") && !$0.hasSuffix("-wal") && !$0.hasSuffix("-shm") }
        #expect(moved.count == 1, "\(scratch.names(in: "buffer"))")
        #expect(reports.first?.metadata["buffer.moved_to"] == moved.first.map { "\(scratch.file("buffer/\($0)"))" })
        #expect(!FileManager.default.fileExists(atPath: path))
        let sidecar = try String(contentsOfFile: path + ".seq", encoding: .utf8)
        #expect(sidecar == "\(committed)\n")
        await #expect(throws: BufferError.closed) { try await buffer.pending(limit: 1, from: .oldest) }

        // What the restart does: a fresh buffer, numbered above everything the damaged one handed out.
        let restarted = try Self.open(scratch)
        try await restarted.register([Self.ph])
        try await restarted.append(Self.samples(1, start: 20_000))
        #expect(try await restarted.flush() == committed + UInt64(ReadingBuffer.recoverySequenceGap) + 1)
        #expect(try await restarted.integrityProblems().isEmpty)
        try await restarted.close()
    }
}
