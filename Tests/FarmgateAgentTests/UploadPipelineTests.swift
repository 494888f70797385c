import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

/// Draining a backlog, the readings of an acknowledged batch are deleted while the next request is in flight (see
/// ``Uploader/DeferredAcknowledgement``): the next batch is read around them first.
/// In the timed pass (Makefile `TIMED_SUITES`): like the uploader's other loopback suites, it waits on a drain that the
/// untimed pass's CPU-bound suites can starve for tens of seconds on two cores.
@Suite("Upload: a backlog's acknowledged readings are deleted while the next request is in flight")
struct UploadPipelineTests {
    /// The real buffer, logging what the uploader reads and deletes, in order; the acknowledgement numbered `failing`
    /// (from 0) fails once.
    final class RecordingSource: PendingReadings {
        enum Event: Equatable {
            case read([UInt64], excluded: ClosedRange<UInt64>?)
            case acknowledge([UInt64])
        }

        let base: ReadingBuffer
        let failing: Int?
        let events = Mutex<[Event]>([])
        private let acknowledgements = Atomic<Int>(0)

        init(_ base: ReadingBuffer, failing: Int? = nil) {
            self.base = base
            self.failing = failing
        }

        func pending(limit: Int, from end: BacklogEnd, excluding excluded: ClosedRange<UInt64>?) async throws -> [Reading] {
            let readings = try await base.pending(limit: limit, from: end, excluding: excluded)
            events.withLock { $0.append(.read(readings.map(\.sequence), excluded: excluded)) }
            return readings
        }
        func acknowledge(_ sequences: [UInt64]) async throws {
            if acknowledgements.add(1, ordering: .sequentiallyConsistent).oldValue == failing {
                throw BufferError("injected: the disk refused the deletion")
            }
            try await base.acknowledge(sequences)
            events.withLock { $0.append(.acknowledge(sequences)) }
        }
        func advanceSequence(past sequence: UInt64) async throws -> UInt64? { try await base.advanceSequence(past: sequence) }
        func renumber(_ sequences: [UInt64], above floor: UInt64) async throws -> [SequenceRenumbering] {
            try await base.renumber(sequences, above: floor)
        }
        func descriptors(for sensors: Set<SensorID>) async throws -> [SensorDescriptor] { try await base.descriptors(for: sensors) }
        func quarantine(_ reasons: [UInt64: String]) async throws { try await base.quarantine(reasons) }
        func statistics() async throws -> BufferStatistics { try await base.statistics() }
        func flush() async throws -> UInt64 { try await base.flush() }

        var reads: [(index: Int, sequences: [UInt64], excluded: ClosedRange<UInt64>?)] {
            events.withLock { events in
                events.enumerated().compactMap { index, event in
                    if case .read(let sequences, let excluded) = event { (index, sequences, excluded) } else { nil }
                }
            }
        }
        var acknowledged: [(index: Int, sequences: [UInt64])] {
            events.withLock { events in
                events.enumerated().compactMap { index, event in
                    if case .acknowledge(let sequences) = event { (index, sequences) } else { nil }
                }
            }
        }
    }

    @Test func theNextBatchIsReadAroundTheAcknowledgedOnesBeforeTheyAreDeleted() async throws {
        // Four rounds of a live batch (100) and a backlog batch (400), a live batch, then a backlog batch that would reach
        // into that live batch, acknowledged and not yet deleted, if it were not read around it: 150 left besides it.
        let data = try await TestBuffer(count: 2250)
        let source = RecordingSource(data.buffer)
        let ingest = try FakeIngest()
        let configuration = uploadConfiguration(ingest.url, batchMaxReadings: 100, backlogBatchMaxReadings: 400)
        try await withUploader(source: source, configuration: configuration) { uploader throws in
            #expect(try await eventually(timeout: .seconds(60)) { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 2250 })
        }
        // Exactly once: every reading stored, none sent twice.
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences))
        #expect(ingest.log.stored.values.allSatisfy { $0 == 1 })
        #expect(ingest.log.duplicates == 0)

        let reads = source.reads
        let acknowledged = source.acknowledged
        var seen: Set<UInt64> = []
        for read in reads {
            if let excluded = read.excluded { #expect(!read.sequences.contains(where: excluded.contains), "read inside the range left out") }
            let twice = seen.intersection(read.sequences)
            #expect(twice.isEmpty, "\(twice.count) readings read twice, the lowest \(twice.min() ?? 0)")
            seen.formUnion(read.sequences)
        }
        // Read ahead: a batch read around acknowledged readings before their deletion ran, and exactly those deleted next.
        var readAhead = 0
        for read in reads {
            guard let excluded = read.excluded else { continue }
            let deletion = try #require(acknowledged.first { $0.sequences.first == excluded.lowerBound })
            #expect(deletion.sequences.last == excluded.upperBound)
            if deletion.index > read.index { readAhead += 1 }
        }
        #expect(readAhead >= 4, "the backlog's deletions ran after the next batch was read (\(readAhead) did)")
        let last = try #require(reads.last)
        #expect(last.sequences.count == 150 && last.excluded != nil, "the last backlog batch, read around the live one before it")
    }

    @Test func aDeferredDeletionThatFailsLosesNothingAndIsReported() async throws {
        let data = try await TestBuffer(count: 2000)
        // The second deletion is deferred (the first batch's is too): it fails while the third request is in flight.
        let source = RecordingSource(data.buffer, failing: 1)
        let ingest = try FakeIngest()
        let configuration = uploadConfiguration(ingest.url, batchMaxReadings: 100, backlogBatchMaxReadings: 400)
        try await withUploader(source: source, configuration: configuration) { uploader throws in
            #expect(try await eventually(timeout: .seconds(60)) { try await data.statistics().pending == 0 })
            #expect(uploader.status().failuresTotal?["buffer"] == 1, "the failed deletion counts as a buffer failure")
            // Each reading counted once as taken by the ingest, accepted or (sent again) a duplicate.
            #expect(uploader.status().uploadedTotal + uploader.status().duplicatesTotal >= 2000)
        }
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences))
        // The readings whose deletion failed stayed pending and went again: the ingest answered them as duplicates (and
        // the request in flight meanwhile, whose answer was not read).
        #expect(ingest.log.duplicates >= 400)
    }
}
