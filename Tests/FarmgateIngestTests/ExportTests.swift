import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

@Suite("Export")
struct ExportTests {
    /// d2 before d1 in time, to show the order is (device name, sequence), not arrival.
    func seed(_ fixture: Fixture) async throws {
        let d1 = try await fixture.identity(device: "d1")
        let d2 = try await fixture.identity(device: "d2")
        let e1 = try await fixture.identity(farm: "f2", device: "e1")
        _ = try await fixture.store.store(try phBatch(device: "d2", sequences: [2, 1]), for: d2, receivedAt: testNow)
        let temp = try sensorID("tank1.temp")
        let start = Timestamp(microseconds: testNow.microseconds - 3_600_000_000)
        var batch = try phBatch(device: "d1", sequences: [3, 1], value: 6.42)
        batch.sensors.append(SensorDescriptor(id: temp, quantity: .temperature))
        batch.readings.append(
            Reading(sensor: temp, sequence: 2, timestamp: Timestamp(microseconds: start.microseconds + 2_500_000), value: 21, quality: [.heartbeat]))
        _ = try await fixture.store.store(batch, for: d1, receivedAt: testNow)
        _ = try await fixture.store.store(try phBatch(device: "e1", sequences: 1...5), for: e1, receivedAt: testNow)
    }

    @Test("CSV has a header and every reading in (device, sequence) order")
    func csv() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await seed(fixture)
        var text = ""
        let count = try await IngestAdmin(store: fixture.store).export(farm: "f1", format: .csv) { text += $0 }
        #expect(count == 5)
        #expect(
            text == """
                device,sensor,sequence,timestamp,value,flags
                d1,tank1.ph,1,2025-12-31T23:00:01Z,6.42,
                d1,tank1.temp,2,2025-12-31T23:00:02.500000Z,21,heartbeat
                d1,tank1.ph,3,2025-12-31T23:00:03Z,6.42,
                d2,tank1.ph,1,2025-12-31T23:00:01Z,6.5,
                d2,tank1.ph,2,2025-12-31T23:00:02Z,6.5,

                """)
    }

    @Test("JSON lines: one parseable object per reading, same order")
    func jsonl() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await seed(fixture)
        var text = ""
        try await IngestAdmin(store: fixture.store).export(farm: "f1", format: .jsonl) { text += $0 }
        struct Line: Decodable, Equatable {
            var device: String
            var sensor: String
            var sequence: UInt64
            var timestamp: String
            var value: Double
            var flags: [String]
        }
        let lines = try text.split(separator: "\n").map { try JSONDecoder().decode(Line.self, from: Data($0.utf8)) }
        #expect(lines.map { "\($0.device)/\($0.sequence)" } == ["d1/1", "d1/2", "d1/3", "d2/1", "d2/2"])
        #expect(lines[1] == Line(device: "d1", sensor: "tank1.temp", sequence: 2, timestamp: "2025-12-31T23:00:02.500000Z", value: 21, flags: ["heartbeat"]))
    }

    @Test("export streams in pages: every reading once, whatever the page size", arguments: [1, 2, 7, 1000])
    func paging(pageSize: Int) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let d1 = try await fixture.identity(device: "d1")
        _ = try await fixture.store.store(try phBatch(sequences: 1...20), for: d1, receivedAt: testNow)
        var writes = 0
        var lines: [Substring] = []
        let count = try await IngestAdmin(store: fixture.store).export(farm: "f1", format: .csv, pageSize: pageSize) { piece in
            writes += 1
            lines += piece.split(separator: "\n")
        }
        #expect(count == 20)
        #expect(lines.dropFirst().map { $0.split(separator: ",")[2] } == (1...20).map { Substring(String($0)) })
        #expect(writes == 1 + (20 + pageSize - 1) / pageSize)
    }

    @Test("exporting an unknown farm fails clearly")
    func unknownFarm() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        await #expect(throws: IngestStoreError.notFound("farm 'nope'")) {
            try await IngestAdmin(store: fixture.store).export(farm: "nope", format: .csv) { _ in }
        }
    }
}
