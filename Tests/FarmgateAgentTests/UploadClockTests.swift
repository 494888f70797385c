import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// `count` readings of this boot of `clock`, one a second, taken before the clock was set, committed; the clock moves past
/// them.
private func appendUnsynchronized(_ count: Int, to buffer: ReadingBuffer, clock: ManualClock) async throws {
    try await buffer.append(clock.unsynchronizedSamples(count, sensors: TestBuffer.sensors.map(\.id)))
    try await buffer.flush()
    clock.advance(seconds: Double(count))
}

@Suite("Uploader and the clock repair")
struct UploadClockTests {
    @Test("Readings past the hold that never left the box (no network) are still repaired once the clock is set")
    func outageKeepsTheRepair() async throws {
        let data = try await TestBuffer(count: 0)
        let clock = ManualClock(trueTime: .now(), offsetSeconds: -86_400)
        // hold_unsynchronized = 0: nothing is held, the uploader tries to send them at once.
        try await data.buffer.observeClock(clock.observation(hold: .zero))
        try await appendUnsynchronized(30, to: data.buffer, clock: clock)

        let port = try freePort()  // nobody listens: every attempt fails to connect, as with the LTE link down
        try await withUploader(source: data.buffer, configuration: uploadConfiguration("http://127.0.0.1:\(port)", batchMaxReadings: 10))
        { uploader throws in
            #expect(await eventually(timeout: .seconds(30)) { uploader.status().consecutiveFailures >= 3 })
        }
        #expect(try await data.statistics().pending == 30)

        // NTP and the link come back: every reading gets its true time before it goes.
        clock.synchronize()
        let correction = try await data.buffer.observeClock(clock.observation(hold: .zero))
        #expect(correction?.corrected == 30)
        let ingest = try FakeIngest()
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, batchMaxReadings: 10)) { _ throws in
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
        let stored = ingest.log.contents.values
        #expect(stored.count == 30)
        #expect(stored.allSatisfy { $0.quality == [.clockCorrected] })
        #expect(ingest.log.conflicts == 0)
    }

    @Test("A request that reached the ingest makes its readings final: its answer lost, they go again unchanged after the repair")
    func sentReadingsStayAsSent() async throws {
        let data = try await TestBuffer(count: 0)
        let clock = ManualClock(trueTime: .now(), offsetSeconds: -86_400)
        try await data.buffer.observeClock(clock.observation(hold: .zero))
        try await appendUnsynchronized(10, to: data.buffer, clock: clock)
        // The ingest stores the first request, then the connection drops before its answer.
        let gate = Gate()
        let ingest = try FakeIngest(FakeIngest.Rules(script: { index, batch in gate.isOpen ? nil : .close }))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, batchMaxReadings: 10)) { _ throws in
            #expect(await ingest.waitForBatches(1))
        }
        #expect(try await data.statistics().pending == 10)
        clock.synchronize()
        #expect(try await data.buffer.observeClock(clock.observation(hold: .zero))?.corrected == 0, "they may be stored already")
        gate.release()
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, batchMaxReadings: 10)) { _ throws in
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
        #expect(ingest.log.conflicts == 0)
        #expect(ingest.log.contents.values.allSatisfy { $0.quality == [.clockUnsynchronized] })
    }
}
