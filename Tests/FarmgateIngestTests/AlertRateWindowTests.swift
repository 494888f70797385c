import FarmgateSupport
import FarmgateWire
import Testing

@testable import FarmgateIngest

/// The rate-of-change window keeps only its candidate extremes, in monotonic queues; these tests hold it against the
/// obvious implementation (every reading in a list, a pass over it for the spread) on random sequences of appends and
/// drops, and check that what it keeps stays small however many readings the window spans.
@Suite("Alert rate window against a brute-force oracle")
struct AlertRateWindowTests {
    /// The window as it was before the queues: readings in a list, the spread found by one pass.
    struct Oracle {
        var entries: [(time: Int64, value: Double)] = []
        mutating func append(_ time: Int64, _ value: Double) { entries.append((time, value)) }
        mutating func drop(before time: Int64) {
            let kept = entries.firstIndex { $0.time >= time } ?? entries.count
            entries.removeFirst(kept)
        }
        var spread: Double {
            guard let low = entries.map(\.value).min(), let high = entries.map(\.value).max() else { return 0 }
            return high - low
        }
    }

    @Test(
        "the spread equals the oracle's after every step of random appends and drops, and it keeps no more than the distinct values",
        arguments: [(seed: UInt64(1), ties: false), (2, true), (3, false), (4, true), (5, false), (6, true), (7, false), (8, true)])
    func randomSequences(seed: UInt64, ties: Bool) {
        var random = SplitMix64(seed: seed)
        var window = RateWindow()
        var oracle = Oracle()
        var time: Int64 = 0
        // Long enough to compact the buffers many times (compaction starts past 64 dropped readings).
        for step in 0..<20_000 {
            let roll = random.next() % 100
            if roll < 70 {
                // Readings arrive in time order, sometimes several at the same instant.
                time += Int64(random.next() % 4)
                // Few distinct values make equal values common (ties in the queues); otherwise any value, of any sign.
                let value = ties ? Double(random.next() % 5) : (Double(random.next() % 2_000_001) - 1_000_000) / 1000
                window.append(time, value)
                oracle.append(time, value)
            } else {
                // The engine drops before `reading time - window`; any cut-off, also one behind the last, must work.
                let back = Int64(random.next() % 120)
                let cut = random.next() % 10 == 0 ? time + 1 : time - back
                window.drop(before: cut)
                oracle.drop(before: cut)
            }
            #expect(window.spread == oracle.spread, "step \(step)")
            #expect(window.isEmpty == oracle.entries.isEmpty, "step \(step)")
            if step % 97 == 0 {
                #expect(window.kept <= 2 * Set(oracle.entries.map(\.value)).count, "step \(step)")
            }
        }
    }

    @Test("as the engine uses it: a 10-minute window over readings every 10 s, the spread of exactly the last 10 minutes")
    func slidingWindow() {
        var window = RateWindow()
        var oracle = Oracle()
        var random = SplitMix64(seed: 42)
        let length: Int64 = 600_000_000
        for index in 0..<5_000 {
            let at = Int64(index) * 10_000_000 + Int64(random.next() % 3_000)
            let value = 6 + Double(index % 97) / 100 - Double(random.next() % 50) / 1000
            window.append(at, value)
            window.drop(before: at - length)
            oracle.append(at, value)
            oracle.drop(before: at - length)
            #expect(window.spread == oracle.spread, "reading \(index)")
        }
        #expect(oracle.entries.count == 61)
        #expect(window.kept < 61)
    }

    @Test("empty, emptied and refilled windows")
    func emptyAndRefilled() {
        var window = RateWindow()
        #expect(window.spread == 0 && window.isEmpty)
        window.append(10, 5)
        #expect(window.spread == 0 && !window.isEmpty)
        window.append(20, 7.5)
        window.append(30, 6)
        #expect(window.spread == 2.5)
        window.drop(before: 21)
        #expect(window.spread == 0 && !window.isEmpty)
        window.drop(before: 1_000)
        #expect(window.spread == 0 && window.isEmpty)
        window.append(2_000, -3)
        window.append(2_001, 4)
        #expect(window.spread == 7)
        #expect(window == {
            var other = RateWindow()
            other.append(2_000, -3)
            other.append(2_001, 4)
            return other
        }())
    }
}

extension AlertRateWindowTests {
    @Test("windows that share buffers, hold equal readings, or differ are told apart")
    func sameReadings() {
        var first = RateWindow()
        for index in 0..<200 { first.append(Int64(index), Double(index % 7)) }
        first.drop(before: 120)
        let shared = first
        #expect(shared.holdsSameReadings(as: first))
        var rebuilt = RateWindow()
        for index in 120..<200 { rebuilt.append(Int64(index), Double(index % 7)) }
        #expect(rebuilt.holdsSameReadings(as: first) && first.holdsSameReadings(as: rebuilt))
        var moved = shared
        moved.append(200, 3)
        #expect(!moved.holdsSameReadings(as: first) && !first.holdsSameReadings(as: moved))
        #expect(RateWindow().holdsSameReadings(as: RateWindow()))
    }
}

extension AlertRateWindowTests {
    @Test("a window spanning a million readings keeps a handful for a steady or noisy value, one per distinct value for a drift")
    func keepsOnlyCandidates() {
        var steady = RateWindow()
        var noisy = RateWindow()
        var drifting = RateWindow()
        var random = SplitMix64(seed: 9)
        var lowest = Double.infinity
        var highest = -Double.infinity
        for index in 0..<1_000_000 {
            let at = Int64(index) * 1_000_000
            steady.append(at, 6.5)
            let value = 6 + Double(random.next() % 1_000) / 1_000
            lowest = min(lowest, value)
            highest = max(highest, value)
            noisy.append(at, value)
            // A slow rise of 0.01 per 10,000 readings: 100 distinct values.
            drifting.append(at, 20 + Double(index / 10_000) / 100)
        }
        #expect(steady.kept == 2 && steady.spread == 0)
        #expect(noisy.kept < 100, "kept \(noisy.kept)")
        #expect(noisy.spread == highest - lowest)
        #expect(drifting.kept <= 101, "kept \(drifting.kept)")
        #expect(abs(drifting.spread - 0.99) < 1e-9)
        // The drift's lowest candidates go as the window moves on: what is left rises from the new front.
        drifting.drop(before: 500_000 * 1_000_000)
        #expect(abs(drifting.spread - 0.49) < 1e-9)
        #expect(drifting.kept <= 51)
    }
}

extension AlertRateWindowTests {
    @Test("a window rebuilt from the store takes every reading, also two of one microsecond on either side of a page")
    func rebuiltWindowTakesReadingsAcrossPages() async throws {
        try await withFreshStore(.sqlite) { store in
            guard let alerts = store as? any IngestStore & AlertStore else { throw IngestStoreError.notFound("alerting") }
            let device = try await StoreConformanceTests.device(in: store)
            let sensor = try sensorID("tank1.ph")
            let start = testNow.microseconds - 7_200_000_000
            // 5,000 readings a second apart at pH 6; the 5,001st has the 5,000th's microsecond (a later sequence) and pH 9.
            var readings = (0..<5_000).map { index in
                Reading(sensor: sensor, sequence: UInt64(index + 1), timestamp: Timestamp(microseconds: start + Int64(index) * 1_000_000), value: 6)
            }
            readings.append(Reading(sensor: sensor, sequence: 5_001, timestamp: readings[4_999].timestamp, value: 9))
            readings.append(Reading(sensor: sensor, sequence: 5_002, timestamp: Timestamp(microseconds: start + 5_000_000_000), value: 6))
            _ = try await store.store(Batch(device: device.device, sensors: [SensorDescriptor(id: sensor, quantity: .ph)], readings: readings), for: device, receivedAt: testNow)
            let farm = try #require(try await store.farm(named: "f1"))
            let record = try #require(try await store.sensor(farmID: farm.id, device: device.device, sensor: sensor))
            let rule = try spec("ph-swing", "rate_of_change") { $0.quantity = "ph"; $0.threshold = 0.5; $0.window = "3h" }.validated()
            let memories = try await AlertEngine.memories(of: [rule], sensorRowID: record.rowID, before: testNow, store: alerts)
            #expect(memories.first?.window.spread == 3, "the reading of pH 9 on the next page was missed")
        }
    }
}
