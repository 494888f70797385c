@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

/// A scripted backend whose line holds back edges while `held`: the line's thread stops at its next wait for events
/// (``waiting`` says it got there), so that a test sees the driver while edges that happened are not yet applied, as
/// they are for a moment on a loaded machine.
final class HeldBackend: GPIOBackend {
    let inner: ScriptedGPIOBackend
    let held: Mutex<Bool>
    /// The line's thread is at a held wait.
    let waiting = Mutex(false)

    init(_ inner: ScriptedGPIOBackend, held: Bool) {
        self.inner = inner
        self.held = Mutex(held)
    }

    func open(_ request: GPIOLineRequest) throws(SensorError) -> any GPIOLine { HeldLine(try inner.open(request), backend: self) }
    func now() -> Int64 { inner.now() }
    func clockReading() -> (now: Int64, pending: Bool) { (inner.now(), inner.undelivered > 0) }
    func lookUp(chip: GPIOChipSelector, line: GPIOLineSelector) -> GPIOLineLookup { inner.lookUp(chip: chip, line: line) }

    /// Holds the line's thread at its next wait and returns once it is there (the edges it took before are applied).
    func hold() async -> Bool {
        held.withLock { $0 = true }
        waiting.withLock { $0 = false }
        return await eventually { self.waiting.withLock { $0 } }
    }

    func release() { held.withLock { $0 = false } }
}

private final class HeldLine: GPIOLine {
    let inner: any GPIOLine
    let backend: HeldBackend

    init(_ inner: any GPIOLine, backend: HeldBackend) {
        self.inner = inner
        self.backend = backend
    }

    func level() throws(SensorError) -> Int { try inner.level() }

    func waitForEvents(timeout: Duration) throws(SensorError) -> [GPIOEdgeEvent] {
        if backend.held.withLock({ $0 }) {
            backend.waiting.withLock { $0 = true }
            while backend.held.withLock({ $0 }) { usleep(1000) }
        }
        return try inner.waitForEvents(timeout: timeout)
    }
}

@Suite("GPIO switch state at start, replug and while edges are on their way", .serialized)
struct GPIOSwitchStateTests {
    @Test("Restarted, a switch whose level changed while the agent was down never reports the state before the stop as its state now")
    func changedWhileDown() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-h1")
        let file = try scratch.write("switch.events", "level 0\nnow 100\nrise 100\nnow 101\n")
        let positionFile = ScriptedGPIOBackend.positionFile(prefix: scratch.file("buffer.sqlite"), file: file)
        let configurations = try gpioSensors([
            ("tank1.level_ok", "state", "line = 40\ndebounce = \"50ms\"\nbackend = \"events\"\nevents_file = \"\(file)\"")
        ])
        // The agent runs: the switch is 1, and how far the file was delivered is remembered.
        let first = try GPIODriver(
            configuration: configurations[0], backend: ScriptedGPIOBackend(file: file, positionFile: positionFile), logger: driverTestLogger)
        #expect(await eventually { (try? await first.read().value) == 1 })
        #expect(await eventually { FileManager.default.fileExists(atPath: positionFile) })
        await first.close()

        // Stopped, the line goes low (the switch is 0); the restarted agent's line holds that edge back for a moment.
        let handle = try #require(FileHandle(forWritingAtPath: file))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data("fall 110\nnow 111\n".utf8))
        try handle.close()
        let backend = HeldBackend(ScriptedGPIOBackend(file: file, positionFile: positionFile), held: true)
        defer { backend.release() }
        let driver = try GPIODriver(configuration: configurations[0], backend: backend, logger: driverTestLogger)
        #expect(await eventually { backend.waiting.withLock { $0 } }, "the line was never requested")
        // A state reported now is stored now: 1 would be newer than the change to 0 made at 110.
        let early = try? await driver.poll()
        #expect(early?.current?.value != 1, "the state before the stop was reported as the state now: \(String(describing: early))")
        #expect(early?.values.isEmpty != false)
        backend.release()
        var update = StreamedUpdate(current: nil)
        #expect(await eventually {
            if let polled = try? await driver.poll(), !polled.values.isEmpty { update = polled }
            return !update.values.isEmpty
        })
        #expect(update.values.map(\.value.value) == [0])
        #expect(update.values.first?.age == .seconds(1), "the change is stamped at its edge (110, with the clock at 111)")
        #expect(update.current?.value == 0)
        await driver.close()
    }

    @Test("While edges are on their way to the switch's monitor, a poll reports no current state (a heartbeat would contradict them)")
    func edgesOnTheirWay() async throws {
        let configurations = try gpioSensors([("tank1.float", "state", "line = 41\ndebounce = \"0ms\"")])
        let scripted = ScriptedGPIOBackend()
        try scripted.feed("level 1\nnow 10")
        let backend = HeldBackend(scripted, held: false)
        defer { backend.release() }
        let driver = try GPIODriver(configuration: configurations[0], backend: backend, logger: driverTestLogger)
        #expect(await eventually { (try? await driver.read().value) == 1 })
        #expect(try await driver.poll().current?.value == 1)
        #expect(await backend.hold())
        try scripted.feed("fall 19\nnow 20")
        let polled = try await driver.poll()
        #expect(polled.current == nil, "the state before the edge at 19 was reported as the state at 20: \(polled)")
        backend.release()
        var change: [StreamedValue] = []
        #expect(await eventually {
            change += (try? await driver.poll().values) ?? []
            return !change.isEmpty
        })
        #expect(change.map(\.value.value) == [0])
        #expect(change.first?.age == .seconds(1))
        await driver.close()
    }

    @Test("A switch replugged at another level than it was unplugged at is stored and read at once, without another event")
    func replugChangedLevel() async throws {
        let line = try await StreamedLine("line = 42\nactive_low = true\ndebounce = \"50ms\"", script: "level 0\nnow 15")
        #expect(await eventually { line.stored.map(\.value) == [1] }, "\(line.stored)")
        try line.line.backend.feed("unplug\nnow 16")
        let board = line.board
        #expect(await eventually { board.snapshot()[0].consecutiveErrors > 0 }, "\(board.snapshot())")
        // The clock moves no more after the replug: only the replug itself can make the new state known.
        try line.line.backend.feed("level 1\nnow 17\nreplug\nnow 18")
        #expect(await eventually(timeout: .seconds(10)) { line.stored.count == 2 }, "\(line.stored)")
        #expect(line.stored.last.map { $0.value == 0 && !$0.heartbeat } == true, "\(line.stored)")
        #expect(board.snapshot()[0].consecutiveErrors == 0, "\(board.snapshot())")
        #expect(try await line.line.value() == 0)
        await line.stop()
    }
}

@Suite("GPIO pulse debounce", .serialized)
struct GPIOPulseDebounceTests {
    @Test("A pulse counts once the line held it for the debounce time: spikes and bounce on either edge add none")
    func settledPulses() async throws {
        let configurations = try gpioSensors([("loop.pulses", "count", "line = 43")])  // debounce 1 ms
        let line = try await ScriptedLine(configurations, script: "level 0\nnow 10")
        // 20 spikes of 0.2 ms.
        var script = ""
        for index in 0..<20 {
            let start = 10 + Double(index) * 0.05
            script += "rise \(seconds(start))\nfall \(seconds(start + 0.0002))\n"
        }
        try await line.feed(script + "now 11")
        #expect(try await line.value() == 0, "spikes shorter than the debounce were counted")
        // 20 pulses of 2 ms, each with 0.1 ms of bounce on the release, and 20 with bounce on the press.
        script = ""
        for index in 0..<20 {
            let start = 20 + Double(index) * 0.05
            script += "rise \(seconds(start))\nfall \(seconds(start + 0.002))\nrise \(seconds(start + 0.0021))\nfall \(seconds(start + 0.0022))\n"
        }
        for index in 0..<20 {
            let start = 30 + Double(index) * 0.05
            script += "rise \(seconds(start))\nfall \(seconds(start + 0.0001))\nrise \(seconds(start + 0.0002))\nfall \(seconds(start + 0.003))\n"
        }
        try await line.feed(script + "now 32")
        #expect(try await line.value() == 40)
        await line.close()
    }
}

@Suite("GPIO events files", .serialized)
struct GPIOEventsFileTests {
    @Test("A replaced events file is a new clock: flow readings go on from it, even when it starts again at 0")
    func replacedClock() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-m3")
        let file = try scratch.write("flow.events", "level 0\nnow 100\n")
        let configurations = try gpioSensors([
            ("loop.flow", "flow", "line = 44\npulses_per_litre = 450\nbackend = \"events\"\nevents_file = \"\(file)\""),
            ("loop.pulses", "count", "line = 44\nbackend = \"events\"\nevents_file = \"\(file)\""),
        ])
        let flow = try GPIODriver(configuration: configurations[0], logger: driverTestLogger)
        let count = try GPIODriver(configuration: configurations[1], logger: driverTestLogger)
        // Each driver watches the line on a thread of its own: both must have requested it (the flow window starts at 100)
        // before the clock moves, or the flow driver's window starts at 140 under load and no time ever passes on it.
        _ = await readResult(count)
        _ = await readResult(flow)
        let handle = try #require(FileHandle(forWritingAtPath: file))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data("now 140\n".utf8))
        try handle.close()
        let noFlow = await eventually { (try? await flow.read().value) == 0 }
        let last = await readResult(flow)
        #expect(noFlow, "no flow over the old file's clock: \(last)")
        // Replaced by a file whose clock starts at 0: 45 pulses in 6 s, 1 L/min at 450 pulses per litre.
        var script = "level 0\nnow 0\n"
        for index in 0..<45 { script += "rise \(seconds(Double(index) * 0.1 + 0.05))\nfall \(seconds(Double(index) * 0.1 + 0.08))\n" }
        let replacement = try scratch.write("next.events", script + "now 6\n")
        #expect(rename(replacement, file) == 0)
        #expect(await eventually { (try? await count.read().value) == 45 })
        let result = await readResult(flow)
        #expect((try? result.get()).map { abs($0.value - 1) < 1e-9 } == true, "\(result)")
        await count.close()
        await flow.close()
    }

    /// On an events file's clock, which moves only with its lines, the sampler's first read of a flow meter after a start
    /// came at the time the line was requested: it covered no time and was counted as a failed read (a black-box tester,
    /// 2026-12-06).
    @Test("A flow meter's first read after a start that covers no time only begins its window: no reading, no failure; the next gives the rate")
    func firstFlowWindow() async throws {
        let configurations = try gpioSensors([("loop.flow", "flow", "line = 45\npulses_per_litre = 450")])
        let backend = ScriptedGPIOBackend()
        try backend.feed("level 0\nnow 100")
        let driver = try GPIODriver(configuration: configurations[0], backend: backend, logger: driverTestLogger)
        #expect(await eventually { driver.watcher.tried }, "the watcher never requested the line")
        let sink = CollectingSink()
        let board = SensorStatusBoard(sensors: configurations)
        let sampler = Sampler(
            sensors: [.init(configuration: configurations[0], driver: driver)], sink: sink, board: board,
            clock: WallClock(checkSynchronization: false), logger: driverTestLogger)
        let sensor = try #require(sampler.sensors.first)
        var gate = Deadband(deadband: 0, heartbeat: .seconds(900))

        await sampler.sampleOnce(sensor, gate: &gate)
        let first = try #require(board.snapshot().first)
        #expect(first.readsFailed == 0 && first.lastError == nil, "the first read was counted as failed: \(first.lastError ?? "")")
        #expect(first.readsOK == 0 && sink.samples.withLock { $0.isEmpty }, "a flow over no time was stored")

        // 45 pulses in the 6 s after the window began: 1 L/min at 450 pulses per litre.
        var script = ""
        for index in 0..<45 { script += "rise \(seconds(100.05 + Double(index) * 0.1))\nfall \(seconds(100.08 + Double(index) * 0.1))\n" }
        try backend.feed(script + "now 106")
        #expect(await eventually { backend.undelivered == 0 }, "the watcher did not apply the edges")
        await sampler.sampleOnce(sensor, gate: &gate)
        let rates = sink.samples.withLock { $0.map(\.value) }
        #expect(rates.count == 1 && rates.first.map { abs($0 - 1) < 1e-9 } == true, "\(rates)")
        let second = try #require(board.snapshot().first)
        #expect(second.readsOK == 1 && second.readsFailed == 0, "\(second)")
        await driver.close()
    }

    @Test("A switch whose events file does not exist is not readable, saying which file, until the file appears")
    func missingFile() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-m4")
        let file = scratch.file("none.events")
        let configurations = try gpioSensors([
            ("tank1.sw2", "state", "line = 11\nactive_low = true\nbackend = \"events\"\nevents_file = \"\(file)\"")
        ])
        let driver = try GPIODriver(configuration: configurations[0], logger: driverTestLogger)
        let result = await readResult(driver)
        #expect(result.failure?.kind == .disconnected, "\(result)")
        #expect(result.failure?.message.contains("the events file \(file) does not exist") == true, "\(result)")
        #expect((try? await driver.poll()).map { $0.current == nil && $0.values.isEmpty } != false, "a state was reported")
        _ = try scratch.write("none.events", "level 1\nnow 5\n")
        #expect(await eventually(timeout: .seconds(15)) { (try? await driver.read().value) == 0 }, "the file was not picked up")
        await driver.close()
    }
}
