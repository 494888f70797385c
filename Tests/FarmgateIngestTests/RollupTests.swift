import FarmgateWire
import Testing

@testable import FarmgateIngest

/// Rollups at 1 minute, 1 hour and 1 day, kept by the write transaction, on SQLite and PostgreSQL alike.
@Suite struct RollupTests {
    /// 2025-10-01T00:00:00Z: three months before ``testNow``.
    static let monthsAgo = Timestamp(microseconds: testNow.microseconds - 92 * 86_400_000_000)

    @Test(arguments: StoreKind.allCases)
    func threeMonthsWithALateBacklogAndDuplicatesRollUpExactlyAsTheRawReadings(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await StoreConformanceTests.device(in: store)
            let data = SyntheticMonths(start: Self.monthsAgo, days: 92)
            // Days 40 to 45 arrive last, after everything newer: a site that was cut off and sends its backlog late.
            let lateRange = Self.monthsAgo.microseconds + 40 * 86_400_000_000..<Self.monthsAgo.microseconds + 46 * 86_400_000_000
            let onTime = data.readings.filter { !lateRange.contains($0.timestamp.microseconds) }
            let late = data.readings.filter { lateRange.contains($0.timestamp.microseconds) }
            for batch in try SyntheticMonths.batches(onTime) {
                #expect(try await store.store(batch, for: device, receivedAt: testNow).accepted == batch.readings.count)
            }
            let sensors = try await syntheticSensorRows(store, device: device)
            // Before the backlog: its days have no buckets.
            let dayBefore = try await allRollups(store, sensor: sensors.ph, level: .day)
            #expect(dayBefore.count == 92 - 6)
            for batch in try SyntheticMonths.batches(late, size: 700) {
                #expect(try await store.store(batch, for: device, receivedAt: testNow).accepted == batch.readings.count)
            }
            // Sent again, re-cut and mixed with nothing new: duplicates, which must not count twice.
            for batch in try SyntheticMonths.batches(Array(data.readings[3_000..<9_000]), size: 1_500) {
                #expect(try await store.store(batch, for: device, receivedAt: testNow).duplicates == batch.readings.count)
            }
            for level in RollupLevel.allCases {
                for (sensor, row) in [(SyntheticMonths.ph, sensors.ph), (SyntheticMonths.temp, sensors.temp)] {
                    try await expectRollups(store, sensor: row, level: level, ExpectedBucket.of(data.readings, sensor: sensor, level: level))
                }
            }
        }
    }

    @Test(arguments: StoreKind.allCases)
    func faultedReadingsAreCountedButLeftOutOfTheStatistics(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await StoreConformanceTests.device(in: store)
            let minute = RollupLevel.minute.bucket(of: testNow.microseconds - 3_600_000_000)
            func reading(_ sequence: UInt64, second: Int64, _ value: Double, faulted: Bool = false) -> Reading {
                Reading(
                    sensor: SyntheticMonths.ph, sequence: sequence, timestamp: Timestamp(microseconds: minute + second * 1_000_000), value: value,
                    quality: faulted ? [.sensorFault] : [])
            }
            let deviceID = try deviceID("d1")
            // Minute 1: 6.0, 6.4, a faulted 14.0 (latest, but not the last valid value); minute 2: faulted only.
            let batch = Batch(
                device: deviceID, sensors: SyntheticMonths.descriptors,
                readings: [reading(1, second: 10, 6.4), reading(2, second: 5, 6.0), reading(3, second: 50, 14, faulted: true),
                    reading(4, second: 70, 0.5, faulted: true), reading(5, second: 80, 0.7, faulted: true)])
            _ = try await store.store(batch, for: device, receivedAt: testNow)
            let sensor = try #require(try await store.sensor(farmID: device.farmID, device: device.device, sensor: SyntheticMonths.ph)).rowID
            let points = try await allRollups(store, sensor: sensor, level: .minute)
            #expect(points.count == 2)
            let first = try #require(points.first)
            #expect(first.count == 3 && first.validCount == 2)
            #expect(first.min == 6.0 && first.max == 6.4 && first.last == 6.4)
            #expect(first.lastTimestamp?.microseconds == minute + 10_000_000)
            #expect(abs((first.mean ?? 0) - 6.2) < 1e-12)
            let second = try #require(points.last)
            #expect(second.count == 2 && second.validCount == 0)
            #expect(second.min == nil && second.max == nil && second.mean == nil && second.last == nil && second.lastTimestamp == nil)
            // A valid reading later in the faulted minute, then an earlier one: the statistics start, last stays latest.
            _ = try await store.store(
                Batch(device: deviceID, sensors: SyntheticMonths.descriptors, readings: [reading(7, second: 100, 6.9), reading(6, second: 90, 7.1)]),
                for: device, receivedAt: testNow)
            let merged = try #require(try await allRollups(store, sensor: sensor, level: .minute).last)
            #expect(merged.count == 4 && merged.validCount == 2)
            #expect(merged.min == 6.9 && merged.max == 7.1 && merged.last == 6.9)
            let hour = try #require(try await allRollups(store, sensor: sensor, level: .hour).first)
            #expect(hour.count == 7 && hour.validCount == 4 && hour.min == 6.0 && hour.max == 7.1 && hour.last == 6.9)
        }
    }

    @Test func autoPicksTheFinestLevelThatKeepsTheAnswerUnderTwoThousandPoints() async throws {
        let from = Timestamp(microseconds: testNow.microseconds - 86_400_000_000)
        /// `stored` readings in the span, of which the hourly rollups of whole hours still count `counted` (all of them by
        /// default).
        func decide(
            days: Int64, stored: Int, counted: Int? = nil, keptFrom: Timestamp? = nil, minutesFrom: Timestamp? = nil, hoursFrom: Timestamp? = nil
        ) async -> ReadResolution.Resolved {
            let decided = await ReadResolution.decideAuto(
                from: Timestamp(microseconds: testNow.microseconds - days * 86_400_000_000), to: testNow,
                keptFrom: { resolution in
                    switch resolution {
                    case .raw: keptFrom
                    case .rollup(.minute): minutesFrom
                    case .rollup(.hour): hoursFrom
                    case .rollup(.day): nil
                    }
                },
                storedAtLeast: { counted ?? stored }, raw: { Array(0..<min(stored, $0)) })
            // Raw readings come with the decision, all of them.
            if decided.resolved == .raw { #expect(decided.rows.count == stored) } else { #expect(decided.rows.isEmpty) }
            return decided.resolved
        }
        #expect(await decide(days: 1, stored: 1_440) == .raw)
        #expect(await decide(days: 1, stored: 8_640) == .rollup(.minute))
        #expect(await decide(days: 7, stored: 60_480) == .rollup(.hour))
        #expect(await decide(days: 83, stored: 100_000) == .rollup(.hour))
        #expect(await decide(days: 84, stored: 100_000) == .rollup(.day))
        #expect(await decide(days: 3_650, stored: 10_000_000) == .rollup(.day))
        // Few readings, but raw ones are gone from part of the span: rollups.
        #expect(await decide(days: 1, stored: 96, keptFrom: testNow) == .rollup(.minute))
        #expect(await decide(days: 1, stored: 96, keptFrom: from) == .raw)
        // 1-minute rollups are gone from the span (older than rollup_1m): hourly ones, then daily ones.
        #expect(await decide(days: 1, stored: 8_640, keptFrom: testNow, minutesFrom: testNow) == .rollup(.hour))
        #expect(await decide(days: 1, stored: 8_640, keptFrom: testNow, minutesFrom: from) == .rollup(.minute))
        #expect(await decide(days: 1, stored: 8_640, keptFrom: testNow, minutesFrom: testNow, hoursFrom: testNow) == .rollup(.day))
        // The hourly rollups count less than is there (the span's partial hours, or rollups retention removed): the raw
        // readings themselves decide.
        #expect(await decide(days: 1, stored: 2_000, counted: 0) == .raw)
        #expect(await decide(days: 1, stored: 2_001, counted: 0) == .rollup(.minute))
        #expect(await decide(days: 30, stored: 17_280, counted: 0, minutesFrom: testNow) == .rollup(.hour))
        // Buckets are counted as the answer holds them, the partial ones at the ends too: 2,000 hours from half past
        // an hour touch 2,001 hourly buckets, so days.
        let halfPast = Timestamp(microseconds: RollupLevel.hour.bucket(of: testNow.microseconds) - 3_000 * 3_600_000_000 + 1_800_000_000)
        let thousands = Timestamp(microseconds: halfPast.microseconds + 2_000 * 3_600_000_000)
        #expect(ReadResolution.buckets(of: .hour, from: halfPast, to: thousands) == 2_001)
        #expect(ReadResolution.buckets(of: .hour, from: halfPast, to: Timestamp(microseconds: thousands.microseconds - 1_800_000_000)) == 2_000)
        let edge = await ReadResolution.decideAuto(
            from: halfPast, to: thousands, keptFrom: { _ in nil }, storedAtLeast: { 1_000_000 }, raw: { Array(0..<$0) })
        #expect(edge.resolved == .rollup(.day))
        // A smaller target (the request's limit): the level that holds the span in that many points.
        let small = await ReadResolution.decideAuto(
            from: Timestamp(microseconds: testNow.microseconds - 86_400_000_000), to: testNow, target: 50, keptFrom: { _ in nil },
            storedAtLeast: { 96 }, raw: { Array(0..<min(96, $0)) })
        #expect(small.resolved == .rollup(.hour) && small.rows.isEmpty)
    }

    @Test(
        "the hourly count behind auto counts only the hours wholly inside the span, on both stores",
        arguments: StoreKind.allCases)
    func storedReadingCountTakesWholeHours(kind: StoreKind) async throws {
        try await withFreshStore(kind) { store in
            let device = try await StoreConformanceTests.device(in: store)
            // One reading every 2 s from 10:00 to 12:00 UTC of the day before testNow: 1,800 an hour.
            let start = Timestamp(microseconds: RollupLevel.day.bucket(of: testNow.microseconds) - 86_400_000_000 + 10 * 3_600_000_000)
            let sensor = try sensorID("tank1.ph")
            let readings = (0..<3_600).map { index in
                Reading(sensor: sensor, sequence: UInt64(index + 1), timestamp: Timestamp(microseconds: start.microseconds + Int64(index) * 2_000_000), value: 6)
            }
            for chunk in stride(from: 0, to: readings.count, by: 1_000) {
                let batch = Batch(
                    device: device.device, sensors: [SensorDescriptor(id: sensor, quantity: .ph)], readings: Array(readings[chunk..<min(chunk + 1_000, readings.count)]))
                _ = try await store.store(batch, for: device, receivedAt: testNow)
            }
            let record = try #require(try await store.sensor(farmID: device.farmID, device: device.device, sensor: sensor))
            func count(_ fromMinutes: Int64, _ toMinutes: Int64) async throws -> Int {
                try await store.storedReadingCount(
                    sensorRowID: record.rowID, from: Timestamp(microseconds: start.microseconds + fromMinutes * 60_000_000),
                    to: Timestamp(microseconds: start.microseconds + toMinutes * 60_000_000))
            }
            #expect(try await count(0, 120) == 3_600)
            #expect(try await count(0, 60) == 1_800)
            // 10:45-11:15 holds 900 readings and no whole hour: nothing counted (it was 3,600: both hours it touches).
            #expect(try await count(45, 75) == 0)
            #expect(try await count(30, 120) == 1_800)
            #expect(try await count(-60, 61) == 1_800)
        }
    }
}
