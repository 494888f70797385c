import FarmgateWire
import Foundation
import Testing

@testable import FarmgateAgent

/// What `farmgate status` shows: values as the buffer stores them, quarantine counts by code.
@Suite("Status display")
struct StatusDisplayTests {
    @Test("A sensor's last value is shown at its resolution (6.08 where the driver read 6.075), 1/16 °C with four places")
    func valuesAtResolution() throws {
        let ph = try sensorConfiguration("tank1.ph", quantity: .ph)
        let temperature = try sensorConfiguration("tank1.temp", quantity: .temperature, extra: "resolution = \"1/16\"")
        let board = SensorStatusBoard(sensors: [ph, temperature])
        board.recordSuccess(ph.id, value: 6.075, at: Timestamp(microseconds: 1_000_000), stored: true)
        board.recordSuccess(temperature.id, value: 20.07, at: Timestamp(microseconds: 1_000_000), stored: true)
        let snapshot = board.snapshot()
        #expect(snapshot.map(\.lastValue) == [6.08, 20.0625])
        #expect(snapshot.map(\.resolution) == ["1/100", "1/16"])

        let text = status(sensors: snapshot, buffer: statistics()).humanReadable()
        #expect(text.contains("6.08 "), "\(text)")
        #expect(!text.contains("6.075"), "\(text)")
        #expect(text.contains("20.0625 "), "\(text)")
        #expect(Resolution.tenth.decimalPlaces == 1 && Resolution.one.decimalPlaces == 0 && Resolution.sixteenth.decimalPlaces == 4)
        #expect(try Resolution(parsing: "1/3").decimalPlaces == 6)
        #expect(try Resolution(parsing: "5").decimalPlaces == 0)
    }

    @Test("Status shows quarantine counts by code and what was trimmed or dropped, in text and JSON")
    func quarantineCounts() throws {
        var buffer = statistics()
        buffer.quarantined = 5
        buffer.quarantinedByCode = ["unknown_sensor": 1, "timestamp_in_future": 4]
        buffer.quarantineTrimmed = 7
        buffer.quarantineDropped = 2
        let value = status(sensors: [], buffer: buffer)
        #expect(value.humanReadable().contains("Quarantine 5 readings: timestamp_in_future 4, unknown_sensor 1; 7 trimmed (quota), 2 dropped by an installer"))
        let json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(value)) as? [String: Any]
        let decoded = json?["buffer"] as? [String: Any]
        #expect(decoded?["quarantinedByCode"] as? [String: Int] == ["unknown_sensor": 1, "timestamp_in_future": 4])
        #expect(decoded?["quarantineTrimmed"] as? Int == 7)
    }

    @Test("Status shows the buffer's last failed write, its age and the failures by operation; none while it writes fine")
    func bufferErrors() throws {
        #expect(!status(sensors: [], buffer: statistics()).humanReadable().contains("BUFFER ERROR"))
        var buffer = statistics()
        buffer.errors = BufferErrors(
            commit: 1, acknowledge: 12,
            last: BufferFailure(operation: "acknowledge", message: "attempt to write a readonly database", at: Timestamp(microseconds: 0)))
        let value = status(sensors: [], buffer: buffer)
        #expect(
            value.humanReadable().contains(
                "BUFFER ERROR 2s ago (acknowledge): attempt to write a readonly database; 1 commit and 12 acknowledge failures since the buffer was opened"),
            "\(value.humanReadable())")
        // systemctl status's line leads with it for an hour; before any error, and after that hour, it does not.
        #expect(AgentStatusLine.render(value).hasPrefix("BUFFER ERROR 2s ago (acknowledge): attempt to write a readonly database, 0 pending"))
        #expect(!AgentStatusLine.render(status(sensors: [], buffer: statistics())).contains("BUFFER ERROR"))
        var later = value
        later.now = Timestamp(microseconds: 3_601_000_000)
        #expect(!AgentStatusLine.render(later).contains("BUFFER ERROR"), "\(AgentStatusLine.render(later))")
        let json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(value)) as? [String: Any]
        let errors = (json?["buffer"] as? [String: Any])?["errors"] as? [String: Any]
        #expect(errors?["acknowledge"] as? Int == 12)
        #expect((errors?["last"] as? [String: Any])?["operation"] as? String == "acknowledge")
    }

    @Test("status --json names oldestPending, null while nothing is pending, and its JSON reads back the same")
    func oldestPendingIsNullWhenNothingIsPending() throws {
        let idle = status(sensors: [], buffer: statistics())
        let json = try JSONSerialization.jsonObject(with: JSONEncoder().encode(idle)) as? [String: Any]
        let buffer = try #require(json?["buffer"] as? [String: Any])
        #expect(buffer.keys.contains("oldestPending") && buffer["oldestPending"] is NSNull, "\(buffer)")
        #expect(buffer["pending"] as? Int == 0 && buffer["quotaBytes"] as? Int == 1 << 20)
        #expect(!buffer.keys.contains("pendingCalibrations"), "absent counts stay absent")

        var busy = statistics()
        busy.pending = 3
        busy.oldestPending = Timestamp(microseconds: 1_000_000)
        busy.pendingCalibrations = 2
        busy.quarantinedByCode = ["out_of_range": 4]
        busy.errors = BufferErrors(commit: 1)
        (busy.held, busy.quarantineTrimmed, busy.quarantineDropped, busy.quarantinedCalibrations) = (5, 6, 7, 8)
        (busy.uncommitted, busy.quarantined, busy.dropped, busy.duplicatesIgnored, busy.lastSequence) = (9, 10, 11, 12, 13)
        let decoded = try JSONDecoder().decode(BufferStatistics.self, from: JSONEncoder().encode(busy))
        #expect(decoded == busy)
    }

    func statistics() -> BufferStatistics {
        BufferStatistics(
            pending: 0, oldestPending: nil, uncommitted: 0, quarantined: 0, dropped: 0, duplicatesIgnored: 0, lastSequence: 0,
            usedBytes: 4096, quotaBytes: 1 << 20)
    }

    func status(sensors: [SensorStatus], buffer: BufferStatistics) -> AgentStatus {
        AgentStatus(
            device: "site", version: "test", pid: 1, startedAt: Timestamp(microseconds: 0), now: Timestamp(microseconds: 2_000_000),
            clockSynchronized: true, buffer: buffer, upload: nil, uploadEndpoint: nil, sensors: sensors, recentQuarantine: [])
    }
}
