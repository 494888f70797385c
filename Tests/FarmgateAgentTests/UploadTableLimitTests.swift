import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

@testable import FarmgateAgent

/// A stateful frame's sensor table holds every configured sensor and those of the readings sent, at most
/// ``SensorTable/maxSensors``. Past it (4,096 configured and a renamed one with readings still pending) a batch goes as
/// a self-contained frame instead of being unencodable, which quarantined every reading.
@Suite("Upload: a sensor table past its limit")
struct UploadTableLimitTests {
    /// The real buffer, with `extra` more configured sensors than it holds.
    struct CrowdedSource: PendingReadings {
        let base: ReadingBuffer
        let extra: [SensorDescriptor]

        func pending(limit: Int, from end: BacklogEnd, excluding excluded: ClosedRange<UInt64>?) async throws -> [Reading] {
            try await base.pending(limit: limit, from: end, excluding: excluded)
        }
        func advanceSequence(past sequence: UInt64) async throws -> UInt64? { try await base.advanceSequence(past: sequence) }
        func renumber(_ sequences: [UInt64], above floor: UInt64) async throws -> [SequenceRenumbering] {
            try await base.renumber(sequences, above: floor)
        }
        func descriptors(for sensors: Set<SensorID>) async throws -> [SensorDescriptor] { try await base.descriptors(for: sensors) }
        func allDescriptors() async throws -> [SensorDescriptor] { try await base.allDescriptors() + extra }
        func acknowledge(_ sequences: [UInt64]) async throws { try await base.acknowledge(sequences) }
        func quarantine(_ reasons: [UInt64: String]) async throws { try await base.quarantine(reasons) }
        func statistics() async throws -> BufferStatistics { try await base.statistics() }
        func flush() async throws -> UInt64 { try await base.flush() }
    }

    static func configured(_ count: Int) -> [SensorDescriptor] {
        (0..<count).map { SensorDescriptor(id: constantSensorID("bed\($0).temp"), quantity: .temperature) }
    }

    @Test("within the limit a stateful frame; past it a self-contained frame with the same readings", arguments: [false, true])
    func pastTheLimitGoesSelfContained(past: Bool) async throws {
        let data = try await TestBuffer(count: 12)
        // The buffer's three sensors plus these: 4,096 in all, or 4,097.
        let extra = Self.configured(SensorTable.maxSensors - TestBuffer.sensors.count + (past ? 1 : 0))
        let uploader = try Uploader(
            device: testDevice, source: CrowdedSource(base: data.buffer, extra: extra), configuration: uploadConfiguration("http://127.0.0.1:9"),
            logger: Logger(label: "test.upload"))
        let readings = try await data.buffer.pending(limit: 100, from: .oldest)
        let encoding = await uploader.encode(readings[...], events: [], format: .binary, session: WireSession())
        guard case .encoded(let bytes, let frame) = encoding else {
            Issue.record("not encoded: \(encoding)")
            return
        }
        if past {
            #expect(frame == nil, "a stateful frame past the table's limit")
            let batch = try BatchCodec.decode(bytes)
            #expect(batch.readings.map(\.sequence) == readings.map(\.sequence))
            #expect(Set(batch.sensors.map(\.id)) == Set(TestBuffer.sensors.map(\.id)))
        } else {
            #expect(frame != nil, "within the limit the frame is stateful")
        }
    }
}
