@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

/// `driver = "gpio"` sensors from `[[sensor]]` bodies, through the real configuration parser.
func gpioSensors(_ sensors: [(id: String, quantity: String, keys: String)]) throws -> [SensorConfiguration] {
    var text = "[device]\nid = \"t\"\n"
    for sensor in sensors {
        text += """
            [[sensor]]
            id = "\(sensor.id)"
            driver = "gpio"
            quantity = "\(sensor.quantity)"
            \(sensor.keys)

            """
    }
    return try AgentConfiguration.parse(ConfigDocument.parse(text, file: "test.toml")).sensors
}

/// A line driven by the line-event protocol and the drivers reading it; waits until the line is requested.
struct ScriptedLine {
    let backend = ScriptedGPIOBackend()
    let drivers: [GPIODriver]

    init(_ configurations: [SensorConfiguration], script: String = "", countFile: String? = nil) async throws {
        try backend.feed(script)
        let backend = self.backend
        drivers = try configurations.map {
            try GPIODriver(configuration: $0, backend: backend, logger: driverTestLogger, countFile: countFile)
        }
        let drivers = self.drivers
        let requested = await eventually(timeout: .seconds(60)) {
            if case .failure(let error) = await readResult(drivers[0]), error.message.contains("not requested yet") { return false }
            return true
        }
        #expect(requested, "the watcher never requested the line")
    }

    /// Feeds protocol lines and waits until the line's thread has applied every edge.
    func feed(_ script: String) async throws {
        try backend.feed(script)
        let backend = self.backend
        let applied = await eventually(timeout: .seconds(60), every: .milliseconds(5)) { backend.undelivered == 0 }
        #expect(applied, "the watcher did not apply the edges")
    }

    func value(_ index: Int = 0) async throws -> Double {
        try await drivers[index].read().value
    }

    func close() async {
        for driver in drivers { await driver.close() }
    }
}

/// A time as the line-event protocol writes it (microseconds).
func seconds(_ value: Double) -> String { String(format: "%.6f", value) }

@Suite("GPIO line-event protocol")
struct GPIOScriptTests {
    @Test("Times are seconds with up to nine decimals, parsed exactly")
    func times() throws {
        #expect(try ScriptedGPIOBackend.time("1200.000123", line: "") == 1_200_000_123_000)
        #expect(try ScriptedGPIOBackend.time("7", line: "") == 7_000_000_000)
        #expect(try ScriptedGPIOBackend.time("0.000000001", line: "") == 1)
    }

    @Test(
        "Lines that mean nothing are refused, saying what is expected",
        arguments: ["wiggle 3", "rise", "rise abc", "rise -1", "rise 1.0000000001", "level 2", "now", "unplug now"])
    func refused(line: String) {
        let backend = ScriptedGPIOBackend()
        #expect(throws: ScriptedGPIOBackend.ScriptError.self) { try backend.feed(line) }
    }

    @Test("Comments, blank lines and the clock")
    func clock() throws {
        let backend = ScriptedGPIOBackend()
        try backend.feed("# a float switch\n\nlevel 1   # closed\nnow 10.5\nnow 3\n")
        #expect(backend.now() == 10_500_000_000)
    }
}

@Suite("GPIO monitor (debounce, pulses)")
struct GPIOLineMonitorTests {
    @Test("A state changes only once the line held its new level for the debounce time")
    func debounce() {
        var monitor = GPIOLineMonitor(mode: .input(debounce: 50_000_000), activeLow: false, physicalLevel: 0, at: 0)
        #expect(monitor.state(at: 0) == 0)
        for (index, time) in [10, 20, 30, 40].enumerated() {
            monitor.apply(GPIOEdgeEvent(index % 2 == 0 ? .rising : .falling, at: Int64(time) * 1_000_000))
        }
        #expect(monitor.state(at: 60_000_000) == 0)  // low since 40 ms: 20 ms is no change
        monitor.apply(GPIOEdgeEvent(.rising, at: 100_000_000))
        #expect(monitor.state(at: 149_000_000) == 0)
        #expect(monitor.state(at: 150_000_000) == 1)
        // A short glitch low does not count, but the level held before it does.
        monitor.apply(GPIOEdgeEvent(.falling, at: 200_000_000))
        monitor.apply(GPIOEdgeEvent(.rising, at: 210_000_000))
        #expect(monitor.state(at: 300_000_000) == 1)
    }

    @Test("A pulse counts once the line held it for the debounce time, at the edge that began the hold; flow windows split at the read time")
    func pulses() {
        var monitor = GPIOLineMonitor(mode: .pulses(edge: .rising, debounce: 1_000_000), activeLow: false, physicalLevel: 0, at: 0)
        monitor.apply(GPIOEdgeEvent(.rising, at: 10_000_000))
        monitor.apply(GPIOEdgeEvent(.falling, at: 10_200_000))
        monitor.apply(GPIOEdgeEvent(.rising, at: 10_500_000))  // bounce: the pulse is held from 10.5 ms
        #expect(monitor.pulses(at: 11_000_000) == 0, "held 0.5 ms only")
        #expect(monitor.pulses(at: 11_500_000) == 1)
        monitor.apply(GPIOEdgeEvent(.rising, at: 20_000_000))  // the fall between was lost: a pulse of its own
        monitor.apply(GPIOEdgeEvent(.rising, at: 2_000_000_000))
        #expect(monitor.pulses(at: 2_001_000_000) == 3)
        let first = monitor.takeFlowWindow(at: 1_000_000_000)
        #expect(first.pulses == 2 && first.seconds == 1)
        let second = monitor.takeFlowWindow(at: 3_000_000_000)
        #expect(second.pulses == 1 && second.seconds == 2)
    }

    // A tester, 2026-12-07: pulses appended to an events file while the agent was down (`kill -9`) were applied at the
    // line's request, stamped before it, and the first flow window (from the request to the first read, a tenth of a
    // second) held them all: 6,359 L/min stored for a real 6.
    @Test("Pulses stamped before the monitor started are counted but belong to no flow window")
    func pulsesBeforeTheStartAreNoFlow() {
        var monitor = GPIOLineMonitor(mode: .pulses(edge: .rising, debounce: 0), activeLow: false, physicalLevel: 0, at: 10_000_000_000)
        // 45 Hz for the 4 s before the request (the downtime's lines, applied at the request).
        for index in 0..<180 {
            let at = Int64(6_000_000_000) + Int64(index) * 22_222_222
            monitor.apply(GPIOEdgeEvent(.rising, at: at))
            monitor.apply(GPIOEdgeEvent(.falling, at: at + 5_000_000))
        }
        // Then 45 Hz after it, for 2 s.
        for index in 0..<90 {
            let at = Int64(10_000_000_000) + Int64(index) * 22_222_222 + 1
            monitor.apply(GPIOEdgeEvent(.rising, at: at))
            monitor.apply(GPIOEdgeEvent(.falling, at: at + 5_000_000))
        }
        #expect(monitor.pulses(at: 12_000_000_000) == 270, "the count keeps every pulse")
        let first = monitor.takeFlowWindow(at: 12_000_000_000)
        #expect(first.pulses == 90 && first.seconds == 2, "\(first)")
        // 45 pulses/s at 450 pulses per litre: 6 L/min, not thousands.
        #expect(Double(first.pulses) / 450 / (first.seconds / 60) == 6)
    }

    @Test("Active-low inverts levels and edges")
    func activeLow() {
        var state = GPIOLineMonitor(mode: .input(debounce: 0), activeLow: true, physicalLevel: 0, at: 0)
        #expect(state.state(at: 0) == 1)
        state.apply(GPIOEdgeEvent(.rising, at: 1))
        #expect(state.state(at: 2) == 0)
        var pulses = GPIOLineMonitor(mode: .pulses(edge: .rising, debounce: 0), activeLow: true, physicalLevel: 1, at: 0)
        pulses.apply(GPIOEdgeEvent(.rising, at: 1))
        #expect(pulses.totalPulses == 0)
        pulses.apply(GPIOEdgeEvent(.falling, at: 2))
        #expect(pulses.totalPulses == 1)
    }
}

@Suite("GPIO driver through the scripted backend", .serialized)
struct GPIODriverTests {
    @Test("A float switch reads its debounced state; active_low makes a closed switch 1")
    func floatSwitch() async throws {
        let configurations = try gpioSensors([
            ("tank1.level_low", "state", "chip = \"gpiochip0\"\nline = 17\nactive_low = true\ndebounce = \"50ms\"")
        ])
        let line = try await ScriptedLine(configurations, script: "level 1\nnow 100")
        #expect(try await line.value() == 0)  // physically high: the switch is open
        try await line.feed("fall 100.010\nrise 100.015\nfall 100.020\nnow 100.060")
        #expect(try await line.value() == 0)  // low for 40 ms only
        try await line.feed("now 100.075")
        #expect(try await line.value() == 1)
        await line.close()
    }

    @Test("Through the sampler with deadband 0.5, a float switch is stored on change (plus heartbeat) only")
    func storedOnChange() async throws {
        let configurations = try gpioSensors([
            ("tank1.level_ok", "state", "line = 17\ndebounce = \"0ms\"\ninterval = \"100ms\"\ndeadband = 0.5\nheartbeat = \"1h\"")
        ])
        let line = try await ScriptedLine(configurations, script: "level 0\nnow 1")
        let sink = CollectingSink()
        let sampler = Sampler(
            sensors: [.init(configuration: configurations[0], driver: line.drivers[0])], sink: sink,
            board: SensorStatusBoard(sensors: configurations), clock: WallClock(checkSynchronization: false), logger: driverTestLogger)
        let task = Task { try await sampler.run() }
        let stored = { sink.samples.withLock { $0.map(\.value) } }
        #expect(await eventually { stored() == [0] })
        try await Task.sleep(for: .milliseconds(300))
        try await line.feed("rise 2\nnow 3")
        #expect(await eventually { stored() == [0, 1] })
        try await Task.sleep(for: .milliseconds(300))
        try await line.feed("fall 4\nnow 5")
        #expect(await eventually { stored() == [0, 1, 0] })
        try await Task.sleep(for: .milliseconds(300))
        task.cancel()
        _ = try? await task.value
        #expect(stored() == [0, 1, 0], "unchanged states in between were not stored")
    }

    @Test("A flow meter gives L/min over each interval from the pulse timestamps, and a count sensor the running count")
    func flowMeter() async throws {
        let configurations = try gpioSensors([
            ("loop.flow", "flow", "chip = 0\nline = \"GPIO27\"\npulses_per_litre = 450"),
            ("loop.pulses", "count", "chip = \"/dev/gpiochip0\"\nline = \"GPIO27\""),
        ])
        let line = try await ScriptedLine(configurations, script: "now 1000")
        #expect(line.drivers[0].watcher === line.drivers[1].watcher)
        // 450 pulses (1 L) in the first minute.
        var script = ""
        for index in 0..<450 { script += "rise \(seconds(1000 + Double(index) * 0.1 + 0.05))\nfall \(seconds(1000 + Double(index) * 0.1 + 0.08))\n" }
        try await line.feed(script + "now 1060")
        #expect(try await line.value(0) == 1)
        #expect(try await line.value(1) == 450)
        // 900 pulses (2 L) in the next 30 s: 4 L/min.
        script = ""
        for index in 0..<900 { script += "rise \(seconds(1060 + Double(index) / 30 + 0.01))\n" }
        try await line.feed(script + "now 1090")
        #expect(abs(try await line.value(0) - 4) < 1e-9)
        #expect(try await line.value(1) == 1350)
        try await line.feed("rise 1100\nnow 1150")
        #expect(abs(try await line.value(0) - 1.0 / 450) < 1e-9)
        await line.close()
    }

    // A tester, 2026-12-07: after a restart the sampler's first read came a tenth of a second after the line's request
    // and stored the rate of those few pulses (0.0 L/min for a real 6).
    @Test("The sampler's first flow window after a start stores nothing when it covers less than a second; the next gives the rate")
    func shortFirstFlowWindow() async throws {
        // The count sensor first: ScriptedLine reads its first driver to wait for the line, and a flow read would take
        // the first window.
        let line = try await ScriptedLine(
            try gpioSensors([("loop.pulses", "count", "line = 27"), ("loop.flow", "flow", "line = 27\npulses_per_litre = 450")]), script: "now 1000")
        try await line.feed("rise 1000.05\nfall 1000.06\nnow 1000.1")
        #expect(try await line.drivers[1].scheduledRead() == nil)
        // 45 pulses a second for 2 s: 6 L/min.
        var script = ""
        for index in 0..<90 { script += "rise \(seconds(1000.1 + Double(index) / 45 + 0.001))\nfall \(seconds(1000.1 + Double(index) / 45 + 0.005))\n" }
        try await line.feed(script + "now 1002.1")
        let rate = try #require(try await line.drivers[1].scheduledRead())
        #expect(abs(rate.value - 6) < 1e-9, "\(rate.value)")
        await line.close()
    }

    @Test("An unplugged chip reads disconnected; replugged, the line is requested again and the count kept")
    func unplug() async throws {
        let configurations = try gpioSensors([("loop.pulses", "count", "line = 4\nedge = \"falling\"")])
        let line = try await ScriptedLine(configurations, script: "level 1\nnow 5")
        try await line.feed("fall 5.1\nrise 5.2\nfall 5.3\nnow 5.4")  // a pulse counts once the line held it
        #expect(try await line.value() == 2)
        try line.backend.feed("unplug")
        let drivers = line.drivers
        let lost = await eventually(timeout: .seconds(60)) { await readResult(drivers[0]).failure?.kind == .disconnected }
        #expect(lost)
        try line.backend.feed("replug\nlevel 1")
        let back = await eventually(timeout: .seconds(60), every: .milliseconds(50)) { (try? await drivers[0].read().value) == 2 }
        #expect(back)
        try await line.feed("fall 7\nnow 7.1")
        #expect(try await line.value() == 3)
        await line.close()
    }

    @Test("backend = \"events\" follows a file of protocol lines, so the real agent runs without GPIO chips")
    func eventsFile() async throws {
        let scratch = try Scratch(prefix: "fg-gpio")
        let file = try scratch.write("line17.events", "level 0\nnow 50\n")
        let configurations = try gpioSensors([
            ("tank1.leak", "state", "line = 17\ndebounce = \"0ms\"\nbackend = \"events\"\nevents_file = \"\(file)\"")
        ])
        let driver = try GPIODriver(configuration: configurations[0], logger: driverTestLogger)
        let zero = await eventually { (try? await driver.read().value) == 0 }
        #expect(zero)
        let handle = try #require(FileHandle(forWritingAtPath: file))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data("rise 50.5\nnow 51\n".utf8))
        try handle.close()
        let one = await eventually { (try? await driver.read().value) == 1 }
        #expect(one)
        await driver.close()
    }

    @Test("An events file truncated or replaced is read again from its start; a line that means nothing is logged with its number and why")
    func eventsFileRewritten() async throws {
        let scratch = try Scratch(prefix: "fg-gpio")
        let file = try scratch.write("line18.events", "level 0\nnow 50\nrise 50.5\nnow 51\n")
        let configurations = try gpioSensors([
            ("tank1.leak", "state", "line = 18\ndebounce = \"0ms\"\nbackend = \"events\"\nevents_file = \"\(file)\"")
        ])
        let log = RecordedLog()
        let driver = try GPIODriver(configuration: configurations[0], logger: log.logger(label: "test.gpio"))
        #expect(await eventually { (try? await driver.read().value) == 1 })
        // Truncated in place and written again, shorter than what was read.
        let handle = try #require(FileHandle(forWritingAtPath: file))
        try handle.truncate(atOffset: 0)
        try handle.write(contentsOf: Data("fall 52\nnow 53\n".utf8))
        try handle.close()
        #expect(await eventually { (try? await driver.read().value) == 0 }, "the events written after the truncation were lost")
        // Replaced (another inode, as `mv` or an editor leaves it) by a longer file whose edge lies before where the old
        // file ended, with a line that means nothing.
        let replacement = try scratch.write("next.events", "rise 54\nwiggle 3\nnow 55\n# \(String(repeating: "-", count: 60))\n")
        #expect(rename(replacement, file) == 0)
        #expect(await eventually { (try? await driver.read().value) == 1 }, "the replaced file was not read from its start")
        let logged = await eventually {
            log.entries.contains {
                $0.message.contains("means nothing") && $0.metadata["line"] == "2" && $0.metadata["text"] == "wiggle 3"
                    && $0.metadata["reason"]?.description.contains("expected `rise SECONDS`") == true
                    && $0.metadata["events_file"]?.description == file
            }
        }
        #expect(logged, "\(log.entries)")
        #expect(log.entries.contains { $0.message.contains("truncated or replaced") })
        await driver.close()
    }

    @Test("A line whose chip vanished is requested again at most 5 s apart, however long the chip was away")
    func reopenBackoffCap() {
        var backoff = GPIOLineWatcher.reopenBackoff
        #expect(backoff.ceiling == .seconds(1))
        for _ in 0..<20 { backoff.recordFailure() }
        #expect(backoff.ceiling == .seconds(5))
    }

    @Test("The libgpiod backend links and says clearly that a chip does not exist")
    func libgpiodMissingChip() async throws {
        let backend = LibgpiodBackend()
        for chip in [GPIOChipSelector.number(4090)]
            + (FileManager.default.fileExists(atPath: "/dev/gpiochip0") ? [] : [.name("gpiochip0")])
        {
            do {
                _ = try backend.open(GPIOLineRequest(chip: chip, line: .offset(17)))
                Issue.record("\(chip) opened")
            } catch {
                #expect(error.kind == .disconnected)
                #expect(error.message.contains("GPIO chip \(chip) not found (/dev/\(chip) does not exist)"), "\(error)")
                #expect(error.message.contains("gpiodetect"))
            }
        }
        #expect(backend.now() > 0)
        // Through the driver: the sensor reads the same error instead of stopping the agent.
        let configurations = try gpioSensors([("tank1.float", "state", "chip = 4091\nline = 3")])
        let driver = try GPIODriver(configuration: configurations[0], logger: driverTestLogger)
        let reported = await eventually {
            await readResult(driver).failure?.message.contains("gpiochip4091 not found") == true
        }
        #expect(reported)
        await driver.close()
    }
}
