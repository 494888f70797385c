import FarmgateWire
import Foundation
import NIOCore
import Testing

@testable import FarmgateIngest

/// The range query's hand-written JSON (``RangeAnswer``), read back by Foundation's parsers.
@Suite("Range answer JSON")
struct RangeAnswerTests {
    struct Document: Decodable {
        struct Reading: Decodable, Equatable {
            var flags: [String]
            var sequence: UInt64
            var timestamp: String
            var value: Double?
        }
        struct Bucket: Decodable, Equatable {
            var count: Int
            var faults: Int
            var last: Double?
            var last_timestamp: String?
            var max: Double?
            var mean: Double?
            var min: Double?
            var start: String
        }
        var buckets: [Bucket]?
        var device: String
        var farm: String
        var from: String?
        var limit: Int
        var quantity: String
        var readings: [Reading]?
        var resolution: String
        var sensor: String
        var to: String?
        var truncated: Bool
        var unit: String
    }

    func answer(_ content: RangeAnswer.Content, from: Timestamp? = nil, to: Timestamp? = nil, farm: String = "f1") -> RangeAnswer {
        RangeAnswer(
            farm: farm, device: "d1", sensor: "tank1.ec", quantity: "ec", unit: "µS/cm", from: from, to: to, limit: 10_000,
            resolution: { if case .readings = content { return "raw" } else { return "1m" } }(), content: content)
    }

    func bytes(_ answer: RangeAnswer) -> [UInt8] {
        var body = answer.json
        return body.readBytes(length: body.readableBytes) ?? []
    }

    @Test("raw readings: every field, flags by name, exact large sequences, the shortest round-trip numbers")
    func readings() throws {
        let readings = [
            StoredReading(sequence: 1, timestamp: Timestamp(microseconds: 1_795_424_530_123_456), value: 1412.5, quality: []),
            StoredReading(sequence: (1 << 60) + 1, timestamp: Timestamp(microseconds: 0), value: 1e-05, quality: [.outOfRange, .compensated]),
            StoredReading(sequence: 3, timestamp: Timestamp(microseconds: -1), value: -0.1, quality: QualityFlags(rawValue: 1 << 15)),
        ]
        let from = Timestamp(microseconds: -86_400_000_000)
        let data = Data(bytes(answer(.readings(readings), from: from, to: nil)))
        let document = try JSONDecoder().decode(Document.self, from: data)
        #expect(document.buckets == nil && document.to == nil)
        #expect(document.from == "1969-12-31T00:00:00Z" && document.limit == 10_000 && document.resolution == "raw")
        #expect(document.unit == "µS/cm" && document.quantity == "ec" && document.sensor == "tank1.ec" && document.device == "d1")
        #expect(
            document.readings == [
                .init(flags: [], sequence: 1, timestamp: "2026-11-23T09:02:10.123456Z", value: 1412.5),
                .init(flags: flagNames([.outOfRange, .compensated]), sequence: (1 << 60) + 1, timestamp: "1970-01-01T00:00:00Z", value: 1e-05),
                .init(flags: ["bit15"], sequence: 3, timestamp: "1969-12-31T23:59:59.999999Z", value: -0.1),
            ])
    }

    @Test("buckets: statistics omitted when every reading was faulted, the answer's keys in sorted order")
    func buckets() throws {
        let full = RollupPoint(start: 1_795_424_520_000_000, count: 6, validCount: 5, sum: 31.0, min: 6.0, max: 6.5, lastTimestamp: 1_795_424_570_000_000, last: 6.25)
        let faulted = RollupPoint(start: 1_795_424_580_000_000, count: 2, validCount: 0, sum: 0, min: nil, max: nil, lastTimestamp: nil, last: nil)
        let body = bytes(answer(.buckets([full, faulted]), from: Timestamp(microseconds: 1_795_424_520_000_000), to: Timestamp(microseconds: 1_795_424_640_000_000)))
        let document = try JSONDecoder().decode(Document.self, from: Data(body))
        #expect(document.readings == nil && document.resolution == "1m")
        #expect(document.from == "2026-11-23T09:02:00Z" && document.to == "2026-11-23T09:04:00Z")
        #expect(
            document.buckets == [
                .init(count: 6, faults: 1, last: 6.25, last_timestamp: "2026-11-23T09:02:50Z", max: 6.5, mean: 6.2, min: 6.0, start: "2026-11-23T09:02:00Z"),
                .init(count: 2, faults: 2, last: nil, last_timestamp: nil, max: nil, mean: nil, min: nil, start: "2026-11-23T09:03:00Z"),
            ])
        // Absent, not null: the faulted bucket names only its count, faults and start.
        let text = String(decoding: body, as: UTF8.self)
        #expect(text.contains(#"{"count":2,"faults":2,"start":"2026-11-23T09:03:00Z"}"#))
        // Keys sorted, as the JSONEncoder this replaced wrote them.
        let object = try #require(try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any])
        let keys = ["buckets", "device", "farm", "from", "limit", "quantity", "resolution", "sensor", "to", "truncated", "unit"]
        #expect(object.keys.sorted() == keys)
        let positions = keys.compactMap { text.range(of: "\"\($0)\":")?.lowerBound }
        #expect(positions.count == keys.count && positions == positions.sorted())
    }

    @Test("an empty answer, a value that is not finite, and text that needs escaping stay valid JSON")
    func edges() throws {
        let empty = try JSONDecoder().decode(Document.self, from: Data(bytes(answer(.buckets([])))))
        #expect(empty.buckets == [] && empty.from == nil && empty.to == nil && !empty.truncated)
        var cut = answer(.buckets([]))
        cut.truncated = true
        #expect(try JSONDecoder().decode(Document.self, from: Data(bytes(cut))).truncated)
        let odd = StoredReading(sequence: 9, timestamp: Timestamp(microseconds: 5), value: .nan, quality: [])
        let body = bytes(answer(.readings([odd]), farm: "a\"b\\c\nd\u{01}"))
        let document = try JSONDecoder().decode(Document.self, from: Data(body))
        #expect(document.farm == "a\"b\\c\nd\u{01}")
        #expect(document.readings?.first?.value == nil && document.readings?.first?.sequence == 9)
    }
}
