import FarmgateWire
import Foundation
import Testing

@Suite("Ingest receipt")
struct IngestReceiptTests {
    @Test("identical rejections are grouped with their sequences as runs; counts add up; echoes are cut")
    func grouping() throws {
        let longSensor = String(repeating: "x", count: 250)
        var rejections = (1...100_000).map {
            RejectedReading(sequence: UInt64($0), sensor: longSensor, code: RejectionCode.unknownSensor, message: "sensor '\(longSensor)' is not declared")
        }
        rejections.append(RejectedReading(sequence: nil, sensor: "a", code: RejectionCode.invalidSequence, message: "seq: missing"))
        rejections.append(RejectedReading(sequence: 200_005, sensor: "a", code: RejectionCode.timestampInFuture, message: "ahead"))
        rejections.append(RejectedReading(sequence: 200_001, sensor: "a", code: RejectionCode.timestampInFuture, message: "ahead"))
        rejections.append(RejectedReading(sequence: 200_002, sensor: "a", code: RejectionCode.timestampInFuture, message: "ahead"))
        let receipt = IngestReceipt(accepted: 3, duplicates: 1, rejections: rejections)
        #expect(receipt.rejectedCount == 100_004)
        #expect(receipt.rejected.map(\.code) == [RejectionCode.unknownSensor, RejectionCode.invalidSequence, RejectionCode.timestampInFuture])
        #expect(receipt.rejected[0].sequences == [SequenceRun(first: 1, last: 100_000)])
        #expect(receipt.rejected[0].sensor.count == IngestReceipt.maxEchoedSensorLength)
        #expect(receipt.rejected[0].message.count <= IngestReceipt.maxMessageLength)
        #expect(receipt.rejected[1].sequences.isEmpty && receipt.rejected[1].count == 1)
        #expect(receipt.rejected[2].sequences == [SequenceRun(first: 200_001, last: 200_002), SequenceRun(first: 200_005, last: 200_005)])
        #expect(receipt.rejection(of: 50_000)?.code == RejectionCode.unknownSensor)
        #expect(receipt.rejection(of: 200_002)?.code == RejectionCode.timestampInFuture)
        #expect(receipt.rejection(of: 200_003) == nil)
        #expect(receipt.rejection(of: 0) == nil)

        // The answer stays small: 100,000 refusals of a 250-character sensor cost a few hundred bytes, not megabytes.
        let json = try JSONEncoder().encode(receipt)
        #expect(json.count < 1_500, "\(json.count) bytes")
        let text = String(decoding: json, as: UTF8.self)
        #expect(text.contains("[200001,200002]") && text.contains("200005]"))
        #expect(try JSONDecoder().decode(IngestReceipt.self, from: json) == receipt)
    }

    @Test("a run is a number or a pair; anything else is refused; a hostile huge run is never expanded")
    func runs() throws {
        let decoded = try JSONDecoder().decode(
            IngestReceipt.self,
            from: Data(#"{"accepted":0,"duplicates":0,"rejected":[{"code":"c","sensor":"s","message":"m","count":2,"sequences":[3,[0,18446744073709551615]]}]}"#.utf8))
        #expect(decoded.rejection(of: 12_345_678_901)?.code == "c")
        #expect(decoded.rejected[0].sequences[1].count == UInt64.max)
        #expect(throws: DecodingError.self) {
            try JSONDecoder().decode(
                IngestReceipt.self,
                from: Data(#"{"accepted":0,"duplicates":0,"rejected":[{"code":"c","sensor":"s","message":"m","count":1,"sequences":[[1,2,3]]}]}"#.utf8))
        }
    }
}
