import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
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
}
