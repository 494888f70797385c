import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// Sequence numbers the ingest already holds (a site whose buffer and sidecar were lost), against the loopback ingest with
/// the real SQLite buffer: new readings are numbered above the ingest's highest, readings refused `sequence_conflict` are
/// renumbered and sent again, readings the ingest stored are never renumbered.
@Suite("Uploader: sequence conflicts never lose readings")
struct UploadSequenceTests {
    /// Readings of another life of the device, under `sequences`: other times and values than any the tests make.
    static func otherLife(_ sequences: ClosedRange<UInt64>) -> [Reading] {
        let sensor = TestBuffer.sensors[0].id
        let start = Timestamp.now().microseconds - 86_400_000_000
        return sequences.map { Reading(sensor: sensor, sequence: $0, timestamp: Timestamp(microseconds: start + Int64($0) * 1_000_000), value: 7.5) }
    }

    static func sidecar(_ data: TestBuffer) throws -> String {
        try String(contentsOf: data.directory.appendingPathComponent("buffer.sqlite.seq"), encoding: .utf8)
    }

    @Test func atStartNewReadingsAreNumberedAboveTheIngestsHighest() async throws {
        let data = try await TestBuffer(count: 0)
        let ingest = try FakeIngest(FakeIngest.Rules(preloaded: Self.otherLife(1...500)))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(await eventually { uploader.status().ingestHighestSequence == 500 })
            #expect(try await data.statistics().lastSequence == 500)
            #expect(try Self.sidecar(data) == "500\n", "the sidecar follows the counter")
            try await TestBuffer.append(count: 12, to: data.buffer)
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 12 })
            #expect(uploader.status().renumberedTotal == 0)
            #expect(uploader.status().duplicatesTotal == 0)
        }
        #expect(Set(ingest.log.stored.keys) == Set(501...512))
        #expect(ingest.log.conflicts == 0)
        #expect(ingest.deviceRequests.first?.headers["authorization"] == "Bearer \(FakeIngest.key)")
        #expect(ingest.deviceRequests.first?.path == IngestProtocol.deviceStatePath)
    }

    @Test func conflictingReadingsAreRenumberedAboveTheIngestsHighestAndStoredOnesNeverAre() async throws {
        let data = try await TestBuffer(count: 50)
        let ours = try await data.buffer.pending(limit: 100, from: .oldest)
        #expect(ours.map(\.sequence) == Array(1...50))
        // The ingest holds our first 20 (delivered before, the acknowledgement lost) and readings of another life under 21...300.
        let ingest = try FakeIngest(FakeIngest.Rules(preloaded: Array(ours[..<20]) + Self.otherLife(21...300)))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 30 })
            let status = uploader.status()
            #expect(status.renumberedTotal == 30)
            #expect(status.duplicatesTotal == 20, "the readings the ingest holds are duplicates, not renumbered")
            #expect(status.quarantinedTotal == 0)
            #expect(status.ingestHighestSequence == 300)
        }
        let log = ingest.log
        #expect(log.conflicts == 30)
        // Ours 1...20 stayed where they were; ours 21...50 are now 301...330, with their content.
        for (index, reading) in ours.enumerated() {
            let sequence = index < 20 ? reading.sequence : UInt64(281 + index)
            let stored = try #require(log.contents[sequence])
            #expect(stored.sensor == reading.sensor && stored.timestamp == reading.timestamp && abs(stored.value - reading.value) < 1e-9)
        }
        #expect(Set(log.stored.keys) == Set(Array(1...20) + Array(301...330)))
        #expect(try await data.statistics().lastSequence == 330)
        #expect(try Self.sidecar(data) == "330\n")
    }

    // Before the fix (a tester, 2026-12-06) one reading of another sender under sequence 2^63 - 1 made every device check
    // fail: the accepted format versions went unused, and the refused readings were retried in a loop for good.
    @Test func anIngestHoldingASequenceAboveAnyTheAgentNumbersQuarantinesTheConflictsAndKeepsUploading() async throws {
        let data = try await TestBuffer(count: 10)
        let huge = UInt64(Int64.max)
        let stray = Reading(sensor: TestBuffer.sensors[0].id, sequence: huge, timestamp: Timestamp(microseconds: Timestamp.now().microseconds - 3_600_000_000), value: 7.5)
        let ingest = try FakeIngest(FakeIngest.Rules(preloaded: Self.otherLife(1...5) + [stray]))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            // The uploader counts what the buffer did just after it: wait for both (CI run 118 read the status between).
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().quarantinedTotal == 5 })
            let status = uploader.status()
            #expect(status.ingestHighestSequence == huge, "the answer was taken")
            #expect(status.quarantinedTotal == 5 && status.uploadedTotal == 5, "\(status)")
            #expect(status.renumberedTotal == 0)
            // New readings keep their own numbers and are delivered.
            try await TestBuffer.append(count: 4, to: data.buffer)
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 9 })
        }
        #expect(try await data.statistics().quarantined == 5)
        #expect(try await data.statistics().lastSequence == 14)
        #expect(ingest.log.conflicts == 5)
    }

    @Test func anIngestThatCannotAnswerAtStartDelaysNoUploadAndIsAskedAgain() async throws {
        let data = try await TestBuffer(count: 20)
        let ingest = try FakeIngest(FakeIngest.Rules(deviceState: { index in index < 2 ? .reply(503) : nil }))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(try await eventually { try await data.statistics().pending == 0 })
            #expect(uploader.status().ingestHighestSequence == nil)
            #expect(await eventually(timeout: .seconds(15)) { uploader.status().ingestHighestSequence == 20 })
        }
        let asked = ingest.deviceRequests
        #expect(asked.count == 3)
        let firstBatch = try #require(ingest.requests.first)
        #expect(firstBatch.receivedAt < asked[1].receivedAt, "the batch did not wait for the device state")
        #expect((asked[1].receivedAt - asked[0].receivedAt).seconds >= 0.9, "asked again after a pause, not in a loop")
    }

    @Test func renumberingKeepsContentMovesTheCounterAndSurvivesReopening() async throws {
        let data = try await TestBuffer(count: 6)
        let before = try await data.buffer.pending(limit: 10, from: .oldest)
        let moved = try await data.buffer.renumber([2, 4, 99], above: 10)
        #expect(moved == [SequenceRenumbering(old: 2, new: 11), SequenceRenumbering(old: 4, new: 12)])
        let after = try await data.buffer.pending(limit: 10, from: .oldest)
        #expect(after.map(\.sequence) == [1, 3, 5, 6, 11, 12])
        for (old, new) in [(1, 4), (3, 5)] {
            var expected = before[old]
            expected.sequence = after[new].sequence
            #expect(after[new] == expected)
        }
        #expect(try await data.statistics().lastSequence == 12)
        #expect(try UploadSequenceTests.sidecar(data) == "12\n")

        #expect(try await data.buffer.advanceSequence(past: 5) == nil, "never lowers the counter")
        #expect(try await data.buffer.advanceSequence(past: 100) == 12)
        await #expect(throws: BufferError.self) { try await data.buffer.advanceSequence(past: UInt64.max) }
        try await TestBuffer.append(count: 1, to: data.buffer)
        #expect(try await data.statistics().lastSequence == 101)

        try await data.buffer.close()
        let path = data.directory.appendingPathComponent("buffer.sqlite").path
        let reopened = try ReadingBuffer(configuration: BufferConfiguration(path: path), logger: Logger(label: "test.buffer"))
        #expect(try await reopened.statistics().lastSequence == 101)
        #expect(try await reopened.pending(limit: 10, from: .oldest).map(\.sequence) == [1, 3, 5, 6, 11, 12, 101])
        try await reopened.close()
    }
}
