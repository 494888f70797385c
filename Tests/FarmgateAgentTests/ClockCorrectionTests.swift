import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

@testable import FarmgateAgent

// MARK: An injectable clock

/// A clock a test drives: true time and boot time advance together; the wall clock is `offset` away from the truth until
/// ``synchronize()`` steps it, as NTP does on a Raspberry Pi without RTC.
final class ManualClock: ClockSource {
    struct State {
        var trueTime: Int64
        var offset: Int64
        var boottime: Int64
        var synchronized: Bool
        var bootID: String
    }

    let state: Mutex<State>

    /// Booted `uptime` seconds ago at `trueTime`, with a wall clock `offset` seconds off and not synchronised.
    init(trueTime: Timestamp, offsetSeconds: Int64, uptime: Double = 20, bootID: String = "boot-a") {
        state = Mutex(
            State(
                trueTime: trueTime.microseconds, offset: offsetSeconds * 1_000_000, boottime: Int64(uptime * 1_000_000),
                synchronized: false, bootID: bootID))
    }

    func read() -> ClockReading {
        state.withLock {
            ClockReading(
                realtime: Timestamp(microseconds: $0.trueTime + $0.offset), boottime: $0.boottime, synchronized: $0.synchronized,
                bootID: $0.bootID)
        }
    }

    /// The true time now.
    var trueTime: Timestamp { state.withLock { Timestamp(microseconds: $0.trueTime) } }

    func advance(seconds: Double) {
        let micro = Int64(seconds * 1_000_000)
        state.withLock {
            $0.trueTime += micro
            $0.boottime += micro
        }
    }

    /// NTP sets the clock: it steps to the true time and the kernel says synchronised.
    func synchronize() {
        state.withLock {
            $0.offset = 0
            $0.synchronized = true
        }
    }

    /// The box restarts: a new boot id, boot time from zero, the wall clock back at some wrong time.
    func reboot(bootID: String, offsetSeconds: Int64) {
        state.withLock {
            $0.bootID = bootID
            $0.boottime = 5_000_000
            $0.offset = offsetSeconds * 1_000_000
            $0.synchronized = false
        }
    }

    func observation(hold: Duration) -> ClockObservation { ClockObservation(reading: read(), hold: hold) }

    /// `count` samples taken from now on, one a second, round `sensors`, before the clock was set: flagged and
    /// boot-stamped as the sampler stamps them. The clock does not move.
    func unsynchronizedSamples(_ count: Int, sensors: [SensorID], value: Double = 6.5) -> [Sample] {
        let first = read()
        return (0..<count).map { index in
            let micros = Int64(index) * 1_000_000
            return Sample(
                sensor: sensors[index % sensors.count], timestamp: Timestamp(microseconds: first.realtime.microseconds + micros),
                value: value, quality: [.clockUnsynchronized], boot: BootStamp(bootID: first.bootID, boottime: first.boottime + micros))
        }
    }
}

/// A probe that always reads `value`.
private struct ConstantDriver: SensorDriver {
    let value: Double
    func read() async throws(SensorError) -> SensorValue { SensorValue(value) }
}

private let quiet = Logger(label: "test.clock") { _ in SwiftLogNoOpLogHandler() }
private let threeDays: Int64 = 3 * 86_400

private func trueStart() throws -> Timestamp { try #require(RFC3339.parse("2026-12-01T08:00:00.000Z")) }

private func openBuffer(_ scratch: Scratch) throws -> ReadingBuffer {
    try ReadingBuffer(configuration: BufferConfiguration(path: scratch.file("buffer.sqlite")), logger: quiet)
}

/// Reads `sensor` once through the real sampler, stamped by `clock`.
private func sample(_ sampler: Sampler, _ sensor: Sampler.Sensor) async {
    var gate = Deadband(deadband: 0, heartbeat: .seconds(900))
    await sampler.sampleOnce(sensor, gate: &gate)
}

private func phSensor() throws -> Sampler.Sensor {
    // A long interval, hence a long read deadline (the interval, at least 5 s): these tests run beside CPU-bound
    // property tests that can hold the concurrency pool's threads for seconds, and a read abandoned at its deadline
    // would be a reading missing from their counts. The reads are driven by hand; the interval schedules nothing.
    let configuration = try sensorConfiguration("tank1.ph", quantity: .ph, interval: "10m")
    return Sampler.Sensor(configuration: configuration, driver: ConstantDriver(value: 6.02))
}

/// A buffer (hold 0) holding `count` readings of one pH sensor taken one a second on a clock three days behind, not yet
/// synchronised; the clock has moved past them.
private func unsynchronizedBuffer(_ scratch: Scratch, count: Int) async throws -> (ReadingBuffer, Sampler.Sensor, ManualClock) {
    let buffer = try openBuffer(scratch)
    let sensor = try phSensor()
    let clock = ManualClock(trueTime: try trueStart(), offsetSeconds: -threeDays)
    try await buffer.register([sensor.configuration.descriptor])
    try await buffer.observeClock(clock.observation(hold: .zero))
    try await buffer.append(clock.unsynchronizedSamples(count, sensors: [sensor.configuration.id]))
    try await buffer.flush()
    clock.advance(seconds: Double(count))
    return (buffer, sensor, clock)
}

// MARK: Tests

@Suite("Clock correction")
struct ClockCorrectionTests {
    @Test("Readings taken before the clock is set are held, then corrected to their true time when it is set in the same boot")
    func correctionWithinABoot() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let buffer = try openBuffer(scratch)
        let sensor = try phSensor()
        try await buffer.register([sensor.configuration.descriptor])
        let start = try trueStart()
        let clock = ManualClock(trueTime: start, offsetSeconds: -threeDays)
        let sampler = Sampler(sensors: [sensor], sink: buffer, board: SensorStatusBoard(sensors: [sensor.configuration]),
            clock: WallClock(source: clock), logger: quiet)
        try await buffer.observeClock(clock.observation(hold: .seconds(900)))

        // Five readings 10 s apart, stamped three days behind.
        var trueTimes: [Timestamp] = []
        for _ in 0..<5 {
            trueTimes.append(clock.trueTime)
            await sample(sampler, sensor)
            clock.advance(seconds: 10.000_4)
        }
        try await buffer.flush()
        try await buffer.observeClock(clock.observation(hold: .seconds(900)))
        var statistics = try await buffer.statistics()
        #expect(statistics.held == 5)
        #expect(statistics.pending == 0, "held readings must not count as pending: the uploader would poll for nothing")
        #expect(try await buffer.pending(limit: 100, from: .oldest).isEmpty)
        #expect(try await buffer.pending(limit: 100, from: .newest).isEmpty)

        // One more is read just before NTP sets the clock, and is still in the memory queue when the buffer learns of it.
        trueTimes.append(clock.trueTime)
        await sample(sampler, sensor)
        clock.advance(seconds: 0.5)
        clock.synchronize()
        let correction = try #require(try await buffer.observeClock(clock.observation(hold: .seconds(900))))
        #expect(correction.corrected == 5)
        #expect(correction.shifted == 0)
        try await buffer.flush()  // the queued one is corrected as it is stored

        statistics = try await buffer.statistics()
        #expect(statistics.held == 0)
        #expect(statistics.pending == 6)
        let readings = try await buffer.pending(limit: 100, from: .oldest)
        #expect(readings.count == 6)
        for (reading, truth) in zip(readings, trueTimes) {
            // Stamped at whole milliseconds from the boot clock: within a millisecond of the truth.
            #expect(abs(reading.timestamp.microseconds - truth.microseconds) < 1_000, "\(reading.timestamp) vs true \(truth)")
            #expect(reading.quality.contains(.clockCorrected))
            #expect(!reading.quality.contains(.clockUnsynchronized))
            #expect(reading.timestamp.microseconds % 1_000 == 0)
        }

        // Readings taken after synchronisation carry neither flag nor boot stamp.
        await sample(sampler, sensor)
        try await buffer.flush()
        let last = try #require(try await buffer.pending(limit: 1, from: .newest).first)
        #expect(last.quality.isEmpty)
        try await buffer.close()
    }

    @Test("Readings of an earlier boot are never corrected with a later boot's clock: they go up flagged, not held")
    func noCorrectionAcrossBoots() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let buffer = try openBuffer(scratch)
        let sensor = try phSensor()
        try await buffer.register([sensor.configuration.descriptor])
        let clock = ManualClock(trueTime: try trueStart(), offsetSeconds: -threeDays, bootID: "boot-a")
        let sampler = Sampler(sensors: [sensor], sink: buffer, board: SensorStatusBoard(sensors: [sensor.configuration]),
            clock: WallClock(source: clock), logger: quiet)
        try await buffer.observeClock(clock.observation(hold: .seconds(900)))
        var wrongTimes: [Timestamp] = []
        for _ in 0..<3 {
            wrongTimes.append(clock.read().realtime)
            await sample(sampler, sensor)
            clock.advance(seconds: 10)
        }
        try await buffer.flush()
        #expect(try await buffer.statistics().held == 3)

        // Power cut; the box boots again (boot time restarts near zero) and NTP sets the clock in the new boot.
        try await buffer.close()
        let reopened = try openBuffer(scratch)
        clock.advance(seconds: 3_600)
        clock.reboot(bootID: "boot-b", offsetSeconds: -threeDays)
        try await reopened.observeClock(clock.observation(hold: .seconds(900)))
        var statistics = try await reopened.statistics()
        #expect(statistics.held == 0, "an earlier boot's readings can never be repaired: holding them gains nothing")
        #expect(statistics.pending == 3)
        clock.synchronize()
        let correction = try await reopened.observeClock(clock.observation(hold: .seconds(900)))
        #expect(correction?.corrected == 0)
        let readings = try await reopened.pending(limit: 10, from: .oldest)
        #expect(readings.map(\.timestamp) == wrongTimes.map { WallClock.wholeMilliseconds($0.microseconds) })
        #expect(readings.allSatisfy { $0.quality == [.clockUnsynchronized] })
        statistics = try await reopened.statistics()
        #expect(statistics.pending == 3)
        try await reopened.close()
    }

    @Test("Held for hold_unsynchronized by the boot clock, then released flagged clock_unsynchronized; 0 s holds nothing")
    func holdThenRelease() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let buffer = try openBuffer(scratch)
        let sensor = try phSensor()
        try await buffer.register([sensor.configuration.descriptor])
        let clock = ManualClock(trueTime: try trueStart(), offsetSeconds: -threeDays)
        let sampler = Sampler(sensors: [sensor], sink: buffer, board: SensorStatusBoard(sensors: [sensor.configuration]),
            clock: WallClock(source: clock), logger: quiet)
        let hold = Duration.seconds(60)
        try await buffer.observeClock(clock.observation(hold: hold))
        var wrongTimes: [Timestamp] = []
        for _ in 0..<5 {  // boot times 20, 30, 40, 50, 60 s
            wrongTimes.append(WallClock.wholeMilliseconds(clock.read().realtime.microseconds))
            await sample(sampler, sensor)
            clock.advance(seconds: 10)
        }
        try await buffer.flush()

        // Boot time 90 s: the readings taken at 20 and 30 s are older than the hold.
        clock.advance(seconds: 20)
        try await buffer.observeClock(clock.observation(hold: hold))
        var statistics = try await buffer.statistics()
        #expect(statistics.held == 3)
        #expect(statistics.pending == 2)
        #expect(statistics.oldestPending == wrongTimes[0])
        var released = try await buffer.pending(limit: 100, from: .newest)
        #expect(released.map(\.timestamp) == Array(wrongTimes[0..<2]))
        #expect(released.allSatisfy { $0.quality.contains(.clockUnsynchronized) && !$0.quality.contains(.clockCorrected) })

        // The uploader sends and acknowledges them; the held ones stay.
        try await buffer.acknowledge(released.map(\.sequence))
        statistics = try await buffer.statistics()
        #expect(statistics.pending == 0)
        #expect(statistics.held == 3)

        // Boot time 200 s: everything is past the hold and goes up flagged.
        clock.advance(seconds: 110)
        try await buffer.observeClock(clock.observation(hold: hold))
        statistics = try await buffer.statistics()
        #expect(statistics.held == 0)
        #expect(statistics.pending == 3)
        #expect(statistics.oldestPending == wrongTimes[2])

        // NTP now sets the clock before the uploader took them: they are still repaired.
        clock.synchronize()
        let correction = try await buffer.observeClock(clock.observation(hold: hold))
        #expect(correction?.corrected == 3)
        released = try await buffer.pending(limit: 100, from: .oldest)
        #expect(released.count == 3)
        #expect(released.allSatisfy { $0.quality == [.clockCorrected] })

        // With hold_unsynchronized = 0 nothing is ever held. A reading whose request left (the uploader's freezeForSending,
        // once the connection was up) never changes afterwards: the ingest may hold it already, and a re-sent reading that
        // differs is a sequence conflict. One the uploader read but never sent (no network: the connection failed) is
        // still repaired.
        clock.reboot(bootID: "boot-b", offsetSeconds: -threeDays)
        try await buffer.observeClock(clock.observation(hold: .zero))
        for _ in 0..<3 {
            await sample(sampler, sensor)
            clock.advance(seconds: 10)
        }
        try await buffer.flush()
        statistics = try await buffer.statistics()
        #expect(statistics.held == 0)
        #expect(statistics.pending == 6)
        let handedOut = try await buffer.pending(limit: 3, from: .newest)
        #expect(handedOut.count == 3)
        #expect(handedOut.allSatisfy { $0.quality == [.clockUnsynchronized] })
        #expect(try buffer.freezeForSending([handedOut[2].sequence]), "sent")
        clock.synchronize()
        #expect(
            try await buffer.observeClock(clock.observation(hold: .zero))?.corrected == 2, "the two read by the uploader but never sent")
        let after = try await buffer.pending(limit: 100, from: .oldest)
        #expect(after.count == 6)
        #expect(after.last == handedOut[2], "the one sent is as it was sent")
        #expect(after.dropLast().suffix(2).allSatisfy { $0.quality == [.clockCorrected] })
        #expect(after.dropLast().suffix(2).map(\.sequence) == handedOut.prefix(2).map(\.sequence))
        // A request still carrying the old version of a repaired reading must not go; one already final may go again.
        #expect(try buffer.freezeForSending([handedOut[0].sequence]) == false)
        #expect(try buffer.freezeForSending([handedOut[2].sequence]))
        try await buffer.close()
    }

    @Test("A box that booted at 1970 keeps its readings of this boot held past the hold: the ingest would refuse them for good")
    func bootedAt1970() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let buffer = try openBuffer(scratch)
        let sensor = try phSensor()
        try await buffer.register([sensor.configuration.descriptor])
        let start = try trueStart()
        let clock = ManualClock(trueTime: start, offsetSeconds: -start.microseconds / 1_000_000)  // 1970-01-01 at boot + 20 s
        let sampler = Sampler(sensors: [sensor], sink: buffer, board: SensorStatusBoard(sensors: [sensor.configuration]),
            clock: WallClock(source: clock), logger: quiet)
        try await buffer.observeClock(clock.observation(hold: .seconds(60)))
        for _ in 0..<3 {
            await sample(sampler, sensor)
            clock.advance(seconds: 10)
        }
        try await buffer.flush()
        clock.advance(seconds: 3_600)  // an hour without network: far past the hold
        try await buffer.observeClock(clock.observation(hold: .seconds(60)))
        var statistics = try await buffer.statistics()
        #expect(statistics.held == 3)
        #expect(statistics.pending == 0)
        #expect(try await buffer.pending(limit: 10, from: .oldest).isEmpty)

        clock.synchronize()
        #expect(try await buffer.observeClock(clock.observation(hold: .seconds(60)))?.corrected == 3)
        let readings = try await buffer.pending(limit: 10, from: .oldest)
        #expect(readings.map(\.timestamp.microseconds) == [0, 10, 20].map { start.microseconds + Int64($0) * 1_000_000 })
        #expect(readings.allSatisfy { $0.quality == [.clockCorrected] })

        // In a later boot nothing can repair them any more: they go (and the ingest says why it refuses them).
        clock.reboot(bootID: "boot-b", offsetSeconds: -start.microseconds / 1_000_000)
        await sample(sampler, sensor)
        try await buffer.flush()
        clock.reboot(bootID: "boot-c", offsetSeconds: 0)
        try await buffer.observeClock(clock.observation(hold: .seconds(60)))
        statistics = try await buffer.statistics()
        #expect(statistics.held == 0)
        #expect(statistics.pending == 4)
        try await buffer.close()
    }

    @Test("A corrected time already taken by a reading of the same sensor moves to the next free millisecond; none is dropped")
    func collisions() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let buffer = try openBuffer(scratch)
        let sensor = try phSensor()
        let id = sensor.configuration.id
        try await buffer.register([sensor.configuration.descriptor])
        let start = try trueStart()
        let clock = ManualClock(trueTime: start, offsetSeconds: -10)
        try await buffer.observeClock(clock.observation(hold: .seconds(900)))
        let boot = clock.read()
        func unsynchronized(_ boottime: Int64, stampedAt: Timestamp, value: Double) -> Sample {
            Sample(
                sensor: id, timestamp: stampedAt, value: value, quality: .clockUnsynchronized,
                boot: BootStamp(bootID: boot.bootID, boottime: boottime))
        }
        let epoch = start.microseconds - boot.boottime  // the true time of the boot
        let t1 = 30_000_000 as Int64  // boot time 30 s
        let trueT1 = Timestamp(microseconds: epoch + t1)
        try await buffer.append([
            // A synchronised reading (from an earlier boot, say) already holds the true time of the first one.
            Sample(sensor: id, timestamp: trueT1, value: 6.5),
            // Two readings whose repaired times fall in the same millisecond.
            unsynchronized(t1, stampedAt: Timestamp(microseconds: trueT1.microseconds - 10_000_000), value: 6.1),
            unsynchronized(t1 + 300, stampedAt: Timestamp(microseconds: trueT1.microseconds - 9_999_000), value: 6.2),
            // One whose wrong time is exactly the repaired time of another: parking makes room, nothing moves.
            unsynchronized(t1 + 10_000_000, stampedAt: Timestamp(microseconds: trueT1.microseconds + 20_000_000), value: 6.3),
            unsynchronized(t1 + 20_000_000, stampedAt: Timestamp(microseconds: trueT1.microseconds + 10_000_000), value: 6.4),
        ])
        try await buffer.flush()
        #expect(try await buffer.statistics().duplicatesIgnored == 0)

        clock.synchronize()
        let correction = try #require(try await buffer.observeClock(clock.observation(hold: .seconds(900))))
        #expect(correction.corrected == 4)
        #expect(correction.shifted == 2)
        let readings = try await buffer.pending(limit: 100, from: .oldest)
        #expect(readings.count == 5)
        let byValue = Dictionary(uniqueKeysWithValues: readings.map { ($0.value, $0) })
        #expect(byValue[6.5]?.timestamp == trueT1)
        #expect(byValue[6.5]?.quality == [])
        #expect(byValue[6.1]?.timestamp.microseconds == trueT1.microseconds + 1_000)
        #expect(byValue[6.2]?.timestamp.microseconds == trueT1.microseconds + 2_000)
        #expect(byValue[6.3]?.timestamp.microseconds == trueT1.microseconds + 10_000_000)
        #expect(byValue[6.4]?.timestamp.microseconds == trueT1.microseconds + 20_000_000)
        #expect(readings.filter { $0.value != 6.5 }.allSatisfy { $0.quality == [.clockCorrected] })

        // A reading corrected as it is stored collides too: it moves, it is not counted as a duplicate.
        try await buffer.append([unsynchronized(t1 + 20_000_000, stampedAt: trueT1, value: 6.6)])
        try await buffer.flush()
        let statistics = try await buffer.statistics()
        #expect(statistics.pending == 6)
        #expect(statistics.duplicatesIgnored == 0)
        let stored = try #require(try await buffer.pending(limit: 1, from: .newest).first)
        #expect(stored.timestamp.microseconds == trueT1.microseconds + 20_001_000)
        #expect(stored.quality == [.clockCorrected])
        #expect(try await buffer.integrityProblems().isEmpty)
        try await buffer.close()
    }

    @Test("A long unsynchronised boot is repaired in steps: the rest is held meanwhile, commits go between steps, a restart resumes")
    func steppedRepair() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        var buffer: ReadingBuffer? = try openBuffer(scratch)
        let sensor = try phSensor()
        let start = try trueStart()
        let clock = ManualClock(trueTime: start, offsetSeconds: -threeDays)
        try await buffer?.register([sensor.configuration.descriptor])
        try await buffer?.observeClock(clock.observation(hold: .seconds(60)))
        // Two and a half steps of readings of this boot, one a second, stamped three days early.
        let count = BufferStore.clockRepairStep * 5 / 2
        let first = clock.read()
        try await buffer?.append(clock.unsynchronizedSamples(count, sensors: [sensor.configuration.id]))
        try await buffer?.flush()
        clock.advance(seconds: Double(count) + 3_600)  // past the hold: the uploader may read them, unrepaired
        try await buffer?.observeClock(clock.observation(hold: .seconds(60)))
        #expect(try await buffer?.statistics().held == 0)
        clock.synchronize()

        // One step by hand, as the buffer's own loop takes them: the readings it has not reached are held, whatever
        // their age, and a commit goes between two steps.
        let started = try await buffer?.withStore { store in try store.observeClock(clock.observation(hold: .seconds(60))) }
        #expect(started == true)
        #expect(try await buffer?.statistics().held == count, "counted once at the repair's start")
        let step = try #require(try await buffer?.withStore { store in try store.repairClockStep() })
        #expect(step.step.corrected == BufferStore.clockRepairStep)
        #expect(!step.finished)
        var statistics = try #require(try await buffer?.statistics())
        #expect(statistics.held == count - BufferStore.clockRepairStep)
        let released = try #require(try await buffer?.pending(limit: count, from: .oldest))
        #expect(released.count == BufferStore.clockRepairStep)
        #expect(released.allSatisfy { $0.quality == [.clockCorrected] })
        #expect(released.first?.timestamp == WallClock.wholeMilliseconds(first.boottime + clock.read().bootEpochMicroseconds))
        #expect(released.first?.timestamp.microseconds == start.microseconds, "the true time of the first reading")
        await sample(Sampler(sensors: [sensor], sink: try #require(buffer), board: SensorStatusBoard(sensors: [sensor.configuration]),
            clock: WallClock(source: clock), logger: quiet), sensor)
        try await buffer?.flush()
        #expect(try await buffer?.statistics().pending == BufferStore.clockRepairStep + 1, "committed between steps, corrected as stored")

        // The agent stops between two steps (a restart by the watchdog, an upgrade): what the finished step corrected
        // stays, the rest is still stamped and is repaired when the same boot's clock is seen synchronised again.
        try await buffer?.close()
        buffer = nil
        let reopened = try openBuffer(scratch)
        let correction = try #require(try await reopened.observeClock(clock.observation(hold: .seconds(60))))
        #expect(correction.corrected == count - BufferStore.clockRepairStep)
        statistics = try await reopened.statistics()
        #expect(statistics.held == 0)
        #expect(statistics.pending == count + 1)
        let all = try await reopened.pending(limit: count + 1, from: .oldest)
        #expect(all.prefix(count).allSatisfy { $0.quality == [.clockCorrected] })
        #expect(all.last?.quality == [], "taken with the clock set")
        let times = all.prefix(count).map(\.timestamp.microseconds)
        #expect(times == (0..<Int64(count)).map { times[0] + $0 * 1_000_000 }, "one epoch for the whole boot")
        #expect(Set(all.map(\.timestamp)).count == count + 1)
        try await reopened.close()
    }

    @Test("Once the clock is known, a reading the repair has not reached cannot go with its old time; an interrupted repair resumes")
    func repairBeforeSend() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let count = BufferStore.clockRepairStep * 3 / 2
        let (buffer, sensor, clock) = try await unsynchronizedBuffer(scratch, count: count)
        // The uploader reads the newest readings (hold 0: nothing is held) and connects; meanwhile NTP sets the clock and
        // the repair starts at the oldest.
        let handedOut = try await buffer.pending(limit: 10, from: .newest)
        #expect(handedOut.count == 10 && handedOut.allSatisfy { $0.quality == [.clockUnsynchronized] })
        clock.synchronize()
        #expect(try await buffer.withStore { store in try store.observeClock(clock.observation(hold: .zero)) })
        #expect(try await buffer.withStore { store in try store.repairClockStep().finished } == false)
        #expect(try buffer.freezeForSending(handedOut.map(\.sequence)) == false, "the request must not go with the old times")
        // A sample taken now whose millisecond equals an unrepaired reading's old time is kept, not dropped as a duplicate.
        let unrepaired = try #require(handedOut.last)
        try await buffer.append([Sample(sensor: sensor.configuration.id, timestamp: unrepaired.timestamp, value: 7.0)])
        try await buffer.flush()
        #expect(try await buffer.statistics().duplicatesIgnored == 0)
        // The repair was cut short (a failed step, a stop): the next observation resumes it.
        let resumed = try #require(try await buffer.observeClock(clock.observation(hold: .zero)))
        #expect(resumed.corrected == count - BufferStore.clockRepairStep)
        let all = try await buffer.pending(limit: count + 10, from: .oldest)
        #expect(all.count == count + 1)
        #expect(all.prefix(count).allSatisfy { $0.quality == [.clockCorrected] })
        #expect(try buffer.freezeForSending(handedOut.map(\.sequence)) == false, "repaired since read: read them again")
        try await buffer.close()
    }

    @Test("The agent's first observation starts a due repair without running it: the readings wait held for the next one")
    func firstObservationOnlyStartsTheRepair() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let (buffer, _, clock) = try await unsynchronizedBuffer(scratch, count: 20)
        clock.synchronize()
        #expect(try await buffer.observeClock(clock.observation(hold: .zero), repair: false) == nil)
        #expect(try await buffer.statistics().held == 20, "held, not sent with their old time")
        #expect(try await buffer.pending(limit: 100, from: .oldest).isEmpty)
        #expect(try await buffer.observeClock(clock.observation(hold: .zero))?.corrected == 20)
        #expect(try await buffer.pending(limit: 100, from: .oldest).allSatisfy { $0.quality == [.clockCorrected] })
        try await buffer.close()
    }

    @Test("A version-1 buffer file is migrated to version 2 and its readings survive")
    func migratesVersion1() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let path = scratch.file("buffer.sqlite")
        let start = try trueStart()
        // A buffer as farmgate wrote it before schema version 2.
        do {
            let connection = try SQLiteConnection(path: path)
            _ = try connection.query("PRAGMA journal_mode = WAL")
            try connection.transaction {
                try connection.execute(BufferSchema.version1)
                try connection.query("INSERT INTO schema_version(version, applied_at) VALUES (1, 0)")
                try connection.query("INSERT INTO counters(name, value) VALUES ('last_sequence', 3), ('dropped', 2), ('duplicates_ignored', 1)")
                try connection.query(
                    "INSERT INTO sensors(key, id, quantity, resolution_numerator, resolution_denominator) VALUES (1, 'tank1.ph', 'ph', 1, 100)")
                for sequence in 1...3 {
                    try connection.query(
                        "INSERT INTO readings(sequence, sensor, timestamp, steps, quality) VALUES (?, 1, ?, ?, ?)",
                        [.integer(Int64(sequence)), .integer(start.microseconds + Int64(sequence) * 10_000_000), .integer(600 + Int64(sequence)),
                         .integer(sequence == 2 ? 1 : 0)])
                }
            }
        }
        #expect(try BufferSchema.version(of: SQLiteConnection(path: path)) == 1)

        let buffer = try openBuffer(scratch)
        let version = try BufferSchema.version(of: SQLiteConnection(path: path))
        #expect(version == BufferSchema.currentVersion)
        #expect(BufferSchema.currentVersion >= 2)
        var statistics = try await buffer.statistics()
        #expect(statistics.pending == 3)
        #expect(statistics.lastSequence == 3)
        #expect(statistics.dropped == 2)
        #expect(statistics.duplicatesIgnored == 1)
        let readings = try await buffer.pending(limit: 10, from: .oldest)
        #expect(readings.map(\.sequence) == [1, 2, 3])
        #expect(readings.map(\.value) == [6.01, 6.02, 6.03])
        #expect(readings.map(\.timestamp.microseconds) == (1...3).map { start.microseconds + Int64($0) * 10_000_000 })
        // A version-1 reading flagged unsynchronised has no boot stamp: it can never be repaired, so it is never held.
        #expect(readings[1].quality == [.clockUnsynchronized])

        // The migrated file takes boot-stamped readings, held as any.
        let descriptor = try SensorDescriptor(id: SensorID("tank1.ph"), quantity: .ph, resolution: Quantity.ph.defaultResolution)
        try await buffer.register([descriptor])
        let clock = ManualClock(trueTime: start, offsetSeconds: -threeDays)
        try await buffer.observeClock(clock.observation(hold: .seconds(900)))
        let stamp = WallClock(source: clock).stamp()
        try await buffer.append([
            Sample(sensor: descriptor.id, timestamp: stamp.timestamp, value: 6.04, quality: .clockUnsynchronized, boot: stamp.boot)
        ])
        #expect(try await buffer.flush() == 4)
        statistics = try await buffer.statistics()
        #expect(statistics.pending == 3)
        #expect(statistics.held == 1)
        #expect(try await buffer.integrityProblems().isEmpty)
        try await buffer.close()

        // Opening again applies nothing twice.
        let again = try openBuffer(scratch)
        #expect(try await again.statistics().lastSequence == 4)
        try await again.close()
        #expect(try SQLiteConnection(path: path).queryInt("SELECT count(*) FROM schema_version") == BufferSchema.currentVersion)
    }

    @Test("The clock monitor tells the buffer, corrects once and reports how far the clock was set")
    func monitorReports() async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let buffer = try openBuffer(scratch)
        let sensor = try phSensor()
        try await buffer.register([sensor.configuration.descriptor])
        let clock = ManualClock(trueTime: try trueStart(), offsetSeconds: -threeDays)
        let monitor = ClockMonitor(source: clock, observer: buffer, hold: .seconds(600), logger: quiet)
        let sampler = Sampler(sensors: [sensor], sink: buffer, board: SensorStatusBoard(sensors: [sensor.configuration]),
            clock: WallClock(source: clock), logger: quiet)
        #expect(monitor.status() == nil)
        await monitor.poll()
        for _ in 0..<4 {
            await sample(sampler, sensor)
            clock.advance(seconds: 1)
        }
        try await buffer.flush()
        await monitor.poll()
        var status = try #require(monitor.status())
        #expect(!status.synchronized)
        #expect(status.bootID == "boot-a")
        #expect(status.holdSeconds == 600)
        #expect(try await buffer.statistics().held == 4)

        clock.synchronize()
        await monitor.poll()
        await monitor.poll()
        status = try #require(monitor.status())
        #expect(status.synchronized)
        let correction = try #require(status.lastCorrection)
        #expect(correction.corrected == 4)
        #expect(abs((correction.stepSeconds ?? 0) - Double(threeDays)) < 0.01)
        #expect(try await buffer.statistics().pending == 4)

        // What `farmgate status` prints.
        let statistics = try await buffer.statistics()
        let agent = AgentStatus(
            device: "d", version: "test", pid: 1, startedAt: clock.trueTime, now: clock.trueTime, clockSynchronized: true, clock: status,
            buffer: statistics, upload: nil, uploadEndpoint: nil, sensors: [], recentQuarantine: [])
        let text = agent.humanReadable()
        #expect(text.contains("Clock     synchronised"))
        #expect(text.contains("corrected 4 readings taken before it was set"))
        #expect(status.correctedTotal == 4)
        #expect(text.contains("clock set forward by 3d 0h"))
        try await buffer.close()
    }

    // Found by a soak tester: with `hold_unsynchronized = "0s"` the start-up warning still said readings were held back.
    @Test("The clock warning says readings are held only when hold_unsynchronized holds them", arguments: [600, 0])
    func warningTellsTheHold(holdSeconds: Int) async throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let buffer = try openBuffer(scratch)
        let clock = ManualClock(trueTime: try trueStart(), offsetSeconds: -threeDays)
        let recorder = LogRecorder()
        let monitor = ClockMonitor(source: clock, observer: buffer, hold: .seconds(holdSeconds), logger: recorder.logger())
        await monitor.poll()
        let warning = try #require(recorder.all.first { $0.hasPrefix("warning Clock not synchronised") })
        #expect(warning.contains("held back") == (holdSeconds > 0), "\(warning)")
        #expect(warning.contains("sent at once") == (holdSeconds == 0), "\(warning)")
        try await buffer.close()
    }

    @Test("The test hook file sets the synchronised state and a wall-clock offset; an unreadable file keeps the last state")
    func testHookFile() throws {
        let scratch = try Scratch(prefix: "fg-clock")
        let file = try scratch.write("clock.json", #"{"synchronized": false, "offset_seconds": -259200}"#)
        let source = SystemClockSource(checkSynchronization: true, testHookPath: file, logger: quiet)
        var reading = source.read()
        #expect(!reading.synchronized)
        let behind = Timestamp.now().microseconds - reading.realtime.microseconds
        #expect(abs(behind - 259_200_000_000) < 5_000_000)
        #expect(reading.bootID.count >= 8)
        #expect(reading.boottime > 0)

        _ = try scratch.write("clock.json", #"{"synchronized": true}"#)
        source.refresh()
        reading = source.read()
        #expect(reading.synchronized)
        #expect(abs(Timestamp.now().microseconds - reading.realtime.microseconds) < 5_000_000)

        _ = try scratch.write("clock.json", "not json")
        source.refresh()
        #expect(source.read().synchronized)
        _ = try scratch.write("clock.json", #"{"synchronized": false, "offset_seconds": 1e300}"#)
        source.refresh()
        #expect(source.read().synchronized, "an absurd offset is refused, not trapped on")

        _ = try scratch.write("clock.json", #"{"synchronized": false, "boot_id": "another-boot"}"#)
        source.refresh()
        #expect(source.read().bootID == "another-boot")
        // [clock] check = false: always synchronised, whatever the hook says.
        #expect(SystemClockSource(checkSynchronization: false, testHookPath: file, logger: quiet).read().synchronized)
    }

    @Test("[clock] hold_unsynchronized: default 15 min, 0 s allowed, located errors")
    func configuration() throws {
        func parse(_ clock: String) throws -> AgentConfiguration {
            let text = """
                [device]
                id = "t"
                [clock]
                \(clock)
                [[sensor]]
                id = "tank1.ph"
                driver = "simulated"
                quantity = "ph"
                """
            return try AgentConfiguration.parse(ConfigDocument.parse(text, file: "agent.toml"))
        }
        #expect(try parse("").holdUnsynchronized == .seconds(900))
        #expect(try parse(#"hold_unsynchronized = "0s""#).holdUnsynchronized == .zero)
        #expect(try parse(#"hold_unsynchronized = "2h""#).holdUnsynchronized == .seconds(7_200))
        do {
            _ = try parse(#"hold_unsynchronized = "30d""#)
            Issue.record("a 30-day hold was accepted")
        } catch {
            #expect("\(error)".contains("agent.toml:4"), "\(error)")
            #expect("\(error)".contains("hold_unsynchronized"), "\(error)")
        }
    }
}
