@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Testing

/// A state input run by the ``StreamingSampler`` on a scripted line, with a wall clock fixed at `wall` (synchronised),
/// so that a change's stored time is exactly `wall − (script clock − edge time)`.
struct StreamedLine {
    let line: ScriptedLine
    let sink = CollectingSink()
    let clock: ManualClock
    let board: SensorStatusBoard
    let task: Task<Void, any Error>
    static let wall = Timestamp(microseconds: 1_800_000_000_000_000)

    init(_ keys: String, script: String, pollInterval: Duration = StreamingSampler.pollInterval) async throws {
        let configurations = try gpioSensors([("tank1.float", "state", keys)])
        line = try await ScriptedLine(configurations, script: script)
        clock = ManualClock(trueTime: Self.wall, offsetSeconds: 0)
        clock.state.withLock { $0.synchronized = true }
        board = SensorStatusBoard(sensors: configurations)
        let sampler = StreamingSampler(
            sensors: [.init(configuration: configurations[0], driver: line.drivers[0])], sink: sink, board: board, clock: WallClock(checkSynchronization: true, source: clock),
            logger: driverTestLogger, pollInterval: pollInterval)
        task = Task { try await sampler.run() }
    }

    /// (value, microseconds before `wall`, heartbeat) of every stored sample.
    var stored: [(value: Double, before: Int64, heartbeat: Bool)] {
        sink.samples.withLock { samples in
            samples.map { ($0.value, Self.wall.microseconds - $0.timestamp.microseconds, $0.quality.contains(.heartbeat)) }
        }
    }

    func stop() async {
        task.cancel()
        _ = try? await task.value
    }
}

@Suite("GPIO inputs stored on change", .serialized)
struct GPIOStreamingTests {
    @Test("Short pulses between polls are all stored, each at its edge's time; glitches shorter than the debounce are not")
    func shortPulses() async throws {
        // Polled only every 2 s: a read-based sampler would see at most one state per poll.
        let line = try await StreamedLine("line = 17\ndebounce = \"10ms\"\ninterval = \"10s\"", script: "level 0\nnow 100", pollInterval: .seconds(2))
        #expect(await eventually { line.stored.map(\.value) == [0] }, "the initial state is stored")
        // The script clock reads 101 while the edges are applied: each change is 101 − edge seconds old.
        try await line.line.feed(
            """
            now 101
            rise 100.100000
            fall 100.120000
            rise 100.400000
            fall 100.405000
            rise 100.409000
            fall 100.700250
            """)
        let stored = await eventually(timeout: .seconds(15)) { line.stored.count == 5 }
        #expect(stored, "\(line.stored)")
        let changes = Array(line.stored.dropFirst())
        // 100.405 to 100.409 low is a glitch: the state stays 1 until 100.700250.
        #expect(changes.map(\.value) == [1, 0, 1, 0])
        // The third change is stamped with the edge after which the line held high (100.409), not the first bounce.
        #expect(changes.map(\.before) == [900_000, 880_000, 591_000, 299_750])
        #expect(changes.allSatisfy { !$0.heartbeat })
        await line.stop()
    }

    @Test("Hundreds of changes between two polls are all stored, in order, none lost")
    func noneLost() async throws {
        let line = try await StreamedLine("line = 5\ndebounce = \"1ms\"", script: "level 0\nnow 10", pollInterval: .seconds(1))
        #expect(await eventually { line.stored.count == 1 })
        var script = "now 20\n"
        for index in 0..<300 {
            script += "\(index % 2 == 0 ? "rise" : "fall") \(seconds(11 + Double(index) * 0.005))\n"
        }
        try await line.line.feed(script)
        #expect(await eventually(timeout: .seconds(15)) { line.stored.count == 301 }, "\(line.stored.count) stored")
        let changes = line.stored.dropFirst()
        #expect(changes.map(\.value) == (0..<300).map { Double(1 - $0 % 2) })
        #expect(changes.map(\.before) == (0..<300).map { 9_000_000 - Int64($0) * 5_000 })
        await line.stop()
    }

    @Test("An unchanged state is stored as a heartbeat every `heartbeat`; a change resets it")
    func heartbeat() async throws {
        let line = try await StreamedLine("line = 6\ndebounce = \"0ms\"\nheartbeat = \"1s\"", script: "level 1\nnow 10")
        #expect(await eventually(timeout: .seconds(15)) { line.stored.count >= 3 }, "\(line.stored)")
        let first = line.stored
        #expect(first.allSatisfy { $0.value == 1 })
        #expect(first.first?.heartbeat == false)
        #expect(first.dropFirst().allSatisfy { $0.heartbeat })
        try await line.line.feed("now 12\nfall 11")
        #expect(await eventually { line.stored.contains { $0.value == 0 && !$0.heartbeat } })
        #expect(await eventually(timeout: .seconds(15)) { line.stored.last.map { $0.value == 0 && $0.heartbeat } == true })
        await line.stop()
    }

    @Test("An unplugged chip is a failure on the status board, counted once per interval; replugged at another level, the change is stored")
    func unplugged() async throws {
        let line = try await StreamedLine("line = 9\ndebounce = \"0ms\"", script: "level 0\nnow 10")
        #expect(await eventually { line.stored.map(\.value) == [0] })
        try line.line.backend.feed("unplug")
        let board = line.board
        #expect(await eventually { board.snapshot()[0].lastError?.contains("unplugged its chip") == true }, "\(board.snapshot())")
        try await Task.sleep(for: .milliseconds(600))
        #expect(board.snapshot()[0].consecutiveErrors == 1, "not once per 100 ms poll: \(board.snapshot())")
        try line.line.backend.feed("replug\nlevel 1\nnow 20")
        #expect(await eventually(timeout: .seconds(15)) { line.stored.map(\.value) == [0, 1] }, "\(line.stored)")
        #expect(board.snapshot()[0].consecutiveErrors == 0)
        await line.stop()
    }

    @Test("A line that comes back at the same level has its state stored at once, not at the next heartbeat")
    func backAtSameLevel() async throws {
        let line = try await StreamedLine("line = 19\ndebounce = \"0ms\"", script: "level 0\nnow 10")
        #expect(await eventually { line.stored.map(\.value) == [0] })
        try line.line.backend.feed("unplug")
        let board = line.board
        #expect(await eventually { board.snapshot()[0].consecutiveErrors > 0 }, "\(board.snapshot())")
        try line.line.backend.feed("replug\nnow 20")
        // The default heartbeat is 15 minutes: only the recovery itself can store the state within seconds.
        #expect(await eventually(timeout: .seconds(5)) { line.stored.count == 2 }, "\(line.stored)")
        #expect(line.stored.last.map { $0.value == 0 && !$0.heartbeat } == true, "\(line.stored)")
        #expect(board.snapshot()[0].consecutiveErrors == 0, "\(board.snapshot())")
        await line.stop()
    }

    @Test("A heartbeat waits while a change is settling, so it never contradicts a change stored with an earlier time")
    func heartbeatWhileSettling() async throws {
        var monitor = GPIOLineMonitor(mode: .input(debounce: 50), activeLow: false, physicalLevel: 0, at: 0)
        monitor.apply(GPIOEdgeEvent(.rising, at: 100))
        #expect(monitor.state(at: 120) == 0)
        #expect(monitor.settling)
        #expect(monitor.takeChanges().isEmpty)
        #expect(monitor.state(at: 150) == 1)
        #expect(!monitor.settling)
        #expect(monitor.takeChanges() == [.init(state: 1, at: 100)])
        #expect(monitor.takeChanges().isEmpty, "a change is reported once")
    }

    @Test("The sampler leaves a streaming state input to the streaming sampler; flow and count are still read")
    func streamsOnlyStates() async throws {
        let configurations = try gpioSensors([
            ("a.state", "state", "line = 1"), ("a.flow", "flow", "line = 2\npulses_per_litre = 450"), ("a.count", "count", "line = 2"),
        ])
        let backend = ScriptedGPIOBackend()
        let drivers = try configurations.map { try GPIODriver(configuration: $0, backend: backend, logger: driverTestLogger) }
        #expect(drivers.map(\.streams) == [true, false, false])
        for driver in drivers { await driver.close() }
    }
}

@Suite("GPIO reads at start, one-off and at stop", .serialized)
struct GPIOReadTimingTests {
    @Test("A read right after the driver is made waits for the line's request instead of failing")
    func readAtOnce() async throws {
        let configurations = try gpioSensors([("a.count", "count", "line = 31"), ("a.state", "state", "line = 32")])
        for configuration in configurations {
            let backend = ScriptedGPIOBackend()
            try backend.feed("level 1\nnow 10")
            let driver = try GPIODriver(configuration: configuration, backend: backend, logger: driverTestLogger)
            let result = await SensorReadContext.$oneOff.withValue(true) { await readResult(driver) }
            #expect(result.failure == nil, "\(configuration.id): \(result)")
            await driver.close()
        }
    }

    @Test("A one-off flow read counts over a window of its own and leaves the sampler's window whole")
    func oneOffFlow() async throws {
        let configurations = try gpioSensors([("a.flow", "flow", "line = 33\npulses_per_litre = 450")])
        let line = try await ScriptedLine(configurations, script: "level 0\nnow 10")
        let backend = line.backend
        let feeder = Task {
            try await Task.sleep(for: .milliseconds(300))
            try backend.feed("rise 10.1\nrise 10.2\nrise 10.3\nnow 11")
        }
        let oneOff = await SensorReadContext.$oneOff.withValue(true) { await readResult(line.drivers[0]) }
        try await feeder.value
        // 3 pulses in 1 s of the line's clock at 450 pulses per litre: 0.4 L/min.
        #expect((try? oneOff.get()).map { abs($0.value - 0.4) < 1e-9 } == true, "\(oneOff)")
        let sampled = try await line.value()
        #expect(abs(sampled - 0.4) < 1e-9, "the sampler's window lost the pulses: \(sampled)")
        await line.close()
    }

    @Test("Flow and count sensors are read once more when the sampler stops; a count stores what came after at close")
    func readAtStop() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-stop")
        let file = scratch.file("buffer.sqlite.gpio-count.loop.pulses")
        let configurations = try gpioSensors([("loop.pulses", "count", "line = 34\ninterval = \"1h\"")])
        let line = try await ScriptedLine(configurations, script: "level 0\nnow 10", countFile: file)
        let sink = CollectingSink()
        let sampler = Sampler(
            sensors: [.init(configuration: configurations[0], driver: line.drivers[0])], sink: sink,
            board: SensorStatusBoard(sensors: configurations), clock: WallClock(checkSynchronization: false),
            logger: driverTestLogger)
        let group = ServiceGroup(services: [sampler], logger: driverTestLogger)
        let running = Task { try await group.run() }
        #expect(await eventually { sink.samples.withLock { $0.count } == 1 })
        try await line.feed("rise 10.1\nrise 10.2\nnow 11")
        await group.triggerGracefulShutdown()
        try await running.value
        #expect(sink.samples.withLock { $0.map(\.value) } == [0, 2], "the pulses since the last read were not stored at stop")
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "2\n")
    }

    @Test("A sampler with no sensor to poll runs until it is stopped, instead of returning (which stopped the agent)")
    func nothingToPoll() async throws {
        let sampler = Sampler(
            sensors: [], sink: CollectingSink(), board: SensorStatusBoard(sensors: []),
            clock: WallClock(checkSynchronization: false), logger: driverTestLogger)
        let finished = Mutex(false)
        let group = ServiceGroup(services: [sampler], logger: driverTestLogger)
        let running = Task {
            try await group.run()
            finished.withLock { $0 = true }
        }
        try await Task.sleep(for: .milliseconds(500))
        #expect(!finished.withLock { $0 }, "the sampler returned at once")
        await group.triggerGracefulShutdown()
        try await running.value
    }
}

@Suite("GPIO running count across restarts", .serialized)
struct GPIOCountPersistenceTests {
    @Test("A count continues from the stored count after a restart, which is written before a read returns it")
    func continues() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-count")
        let file = scratch.file("buffer.sqlite.gpio-count.loop.pulses")
        let configurations = try gpioSensors([("loop.pulses", "count", "line = 27")])
        var line = try await countLine(configurations, file: file)
        try await line.feed("rise 10.1\nrise 10.2\nnow 11")
        #expect(try await line.value() == 2)
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "2\n")
        await line.close()

        // The agent restarts: a new line (its pulses start at 0 again), the same file.
        line = try await countLine(configurations, file: file)
        #expect(try await line.value() == 2)
        try await line.feed("rise 20.1\nnow 21")
        #expect(try await line.value() == 3)
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "3\n")
        await line.close()
    }

    @Test("An unreadable stored count is a sensor fault saying how to fix it, never a count that goes back to 0")
    func unreadable() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-count")
        let file = try scratch.write("count", "twelve\n")
        let configurations = try gpioSensors([("loop.pulses", "count", "line = 28")])
        let line = try await countLine(configurations, file: file)
        let result = await readResult(line.drivers[0])
        #expect(result.failure?.kind == .fault)
        #expect(result.failure?.message.contains("delete it to restart the count at 0") == true, "\(result)")
        await line.close()
    }

    func countLine(_ configurations: [SensorConfiguration], file: String) async throws -> ScriptedLine {
        try await ScriptedLine(configurations, script: "level 0\nnow 10", countFile: file)
    }
}

@Suite("GPIO lines resolved at config check")
struct GPIOLineCheckTests {
    @Test("One line by number in one sensor and by name in another is refused once the chip names it")
    func sameLineTwoWays() throws {
        let scratch = try Scratch(prefix: "fg-gpio-check")
        let file = try scratch.write("chip.events", "name 17 GPIO17\nname 27 GPIO27\n")
        let sensors = try gpioSensors([
            ("tank1.low", "state", "line = 17\nbackend = \"events\"\nevents_file = \"\(file)\""),
            ("tank1.high", "state", "line = \"GPIO27\"\nbackend = \"events\"\nevents_file = \"\(file)\""),
            ("tank1.leak", "state", "line = \"GPIO17\"\nbackend = \"events\"\nevents_file = \"\(file)\""),
        ])
        do {
            _ = try GPIODriver.checkLinesOnChips(sensors)
            Issue.record("GPIO17 and 17 were not found to be one line")
        } catch {
            #expect(error.description.contains("sensor \"tank1.leak\": line: GPIO line gpiochip0:17"), "\(error)")
            #expect(error.description.contains("(written gpiochip0:GPIO17 here) is already used by sensor \"tank1.low\""), "\(error)")
        }
        // Without the third sensor the lines differ: each resolved line is reported.
        let notes = try GPIODriver.checkLinesOnChips(Array(sensors.prefix(2)))
        #expect(notes == ["sensor tank1.low: GPIO line gpiochip0:17 found", "sensor tank1.high: GPIO line gpiochip0:GPIO27 is gpiochip0:27"])
    }

    @Test("A line name the chip does not have is a located error")
    func unknownName() throws {
        let scratch = try Scratch(prefix: "fg-gpio-check")
        let file = try scratch.write("chip.events", "name 17 GPIO17\n")
        let sensors = try gpioSensors([("tank1.low", "state", "line = \"GPIO71\"\nbackend = \"events\"\nevents_file = \"\(file)\"")])
        do {
            _ = try GPIODriver.checkLinesOnChips(sensors)
            Issue.record("GPIO71 was resolved")
        } catch {
            #expect(error.description.contains("sensor \"tank1.low\": line: gpiochip0 has no line named \"GPIO71\" (the event script names: 17=GPIO17)"), "\(error)")
        }
    }

    @Test("Without the chip the check is skipped, and says so for each sensor")
    func skipped() throws {
        let sensors = try gpioSensors([("tank1.low", "state", "chip = 4093\nline = 17"), ("tank1.high", "state", "chip = 4093\nline = \"GPIO17\"")])
        let notes = try GPIODriver.checkLinesOnChips(sensors)
        #expect(notes.count == 2)
        #expect(notes.allSatisfy { $0.contains("GPIO line check skipped: GPIO chip gpiochip4093 not found") }, "\(notes)")
        #expect(LibgpiodBackend().lookUp(chip: .number(4093), line: .offset(1)) != .found(chip: "gpiochip4093", offset: 1))
    }
}
