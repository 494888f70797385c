@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("The real agent on GPIO event files", .serialized)
struct GPIOAgentTests {
    /// `farmgate agent` with `backend = "events"`: a float switch's changes appended to its events file while the agent
    /// runs are each stored at their edge's time; a pulse count continues from its stored value after a restart.
    @Test("Changes appended to an events file are stored at their edge times; the count survives a restart")
    func agentStoresChanges() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-agent", in: URL(fileURLWithPath: "/tmp"))
        let floatEvents = try scratch.write("float.events", "level 0\nnow 100\n")
        let countEvents = try scratch.write("count.events", "level 0\nnow 100\nrise 100.1\nfall 100.2\nrise 100.3\nnow 100.4\n")
        let buffer = scratch.file("buffer.sqlite")
        let socket = scratch.file("control.sock")
        let configuration = try scratch.write(
            "agent.toml",
            """
            [device]
            id = "gpio-site"
            [buffer]
            path = "\(buffer)"
            commit_interval = "100ms"
            [control]
            socket = "\(socket)"
            [clock]
            check = false

            [[sensor]]
            id = "tank1.float"
            driver = "gpio"
            quantity = "state"
            interval = "1h"
            line = 17
            debounce = "10ms"
            backend = "events"
            events_file = "\(floatEvents)"

            [[sensor]]
            id = "loop.pulses"
            driver = "gpio"
            quantity = "count"
            interval = "200ms"
            line = 27
            backend = "events"
            events_file = "\(countEvents)"
            """)

        // First run: the float switch is read once, then three changes are appended, each shorter than any interval.
        let log = scratch.file("agent.log")
        var process = try startAgent(configuration, log: log)
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }  // never left running by a test that stops early
        let readOnce = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            await sensorStatus(socket, "tank1.float")?.lastValue == 0
        }
        #expect(readOnce, "the agent never stored the switch's state: \(agentLog(log))")
        let handle = try #require(FileHandle(forWritingAtPath: floatEvents))
        try handle.seekToEnd()
        try handle.write(contentsOf: Data("rise 100.200\nfall 100.250\nrise 100.400\nnow 101\n".utf8))
        try handle.close()
        let changed = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            await sensorStatus(socket, "tank1.float").map { $0.lastValue == 1 && $0.readsOK >= 4 } == true
        }
        #expect(changed, "the changes were not stored: \(agentLog(log))")
        let counted = await eventually(timeout: .seconds(30)) {
            (try? String(contentsOfFile: buffer + ".gpio-count.loop.pulses", encoding: .utf8)) == "2\n"
        }
        #expect(counted)
        try await stop(process, log: log)

        var readings = try await buffered(buffer)
        let float = readings.filter { $0.sensor.rawValue == "tank1.float" }
        #expect(float.map(\.value) == [0, 1, 0, 1], "\(float)")
        if float.count == 4 {
            // The changes keep the spacing of their edges exactly: 50 ms, then 150 ms.
            #expect(float[2].timestamp.microseconds - float[1].timestamp.microseconds == 50_000)
            #expect(float[3].timestamp.microseconds - float[2].timestamp.microseconds == 150_000)
            #expect(float.dropFirst().allSatisfy { !$0.quality.contains(.heartbeat) })
            // On the wall clock (the script's edges are placed by their age against its own clock, as the kernel's are).
            #expect(abs(float[1].timestamp.microseconds - Timestamp.now().microseconds) < 60_000_000)
        }
        #expect(readings.filter { $0.sensor.rawValue == "loop.pulses" }.last?.value == 2)

        // Second run: a fresh events file (the lines' own counts start at 0 again) with one pulse, a new file as `mv`
        // leaves it (an events file rewritten in place to a longer text is taken for the old one grown: README, GPIO).
        try Data("level 0\nnow 200\nrise 200.1\nnow 201\n".utf8).write(to: URL(fileURLWithPath: countEvents), options: .atomic)
        try Data("level 1\nnow 200\n".utf8).write(to: URL(fileURLWithPath: floatEvents), options: .atomic)
        process = try startAgent(configuration, log: log)
        let continued = await eventually(timeout: .seconds(30)) {
            (try? String(contentsOfFile: buffer + ".gpio-count.loop.pulses", encoding: .utf8)) == "3\n"
        }
        #expect(continued, "the count did not continue from 2: \(agentLog(log))")
        try await stop(process, log: log)
        readings = try await buffered(buffer)
        let counts = readings.filter { $0.sensor.rawValue == "loop.pulses" }.map(\.value)
        #expect(counts.last == 3)
        #expect(zip(counts, counts.dropFirst()).allSatisfy { $0 <= $1 }, "the count never goes back: \(counts)")
    }

    /// A site of float switches only: the sampler has nothing to poll, yet the agent runs (it exited at once, the
    /// sampler's service having returned), and `farmgate sensor read` reads a switch through it (the agent's
    /// `sensor.read` knew only the polled sensors).
    @Test("An agent whose only sensors are switches runs, and reads a switch for `farmgate sensor read`")
    func onlySwitches() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-switches", in: URL(fileURLWithPath: "/tmp"))
        let events = try scratch.write("leak.events", "level 1\nnow 100\n")
        let socket = scratch.file("control.sock")
        let configuration = try scratch.write(
            "agent.toml",
            """
            [device]
            id = "gpio-site"
            [buffer]
            path = "\(scratch.file("buffer.sqlite"))"
            [control]
            socket = "\(socket)"
            [clock]
            check = false

            [[sensor]]
            id = "floor.leak"
            driver = "gpio"
            quantity = "state"
            line = 22
            debounce = "10ms"
            backend = "events"
            events_file = "\(events)"
            """)
        let log = scratch.file("agent.log")
        let process = try startAgent(configuration, log: log)
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }  // never left running by a test that stops early
        let stored = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            await sensorStatus(socket, "floor.leak")?.lastValue == 1
        }
        #expect(stored, "the switch's state was never stored: \(agentLog(log))")
        try await Task.sleep(for: .seconds(1))
        #expect(process.isRunning, "the agent stopped: \(agentLog(log))")
        let read = try await farmgateCLI(["sensor", "read", "floor.leak", "-c", configuration, "--json"])
        #expect(read.status == 0, "\(read.output)")
        #expect(read.output.contains("\"via\":\"agent\""), "\(read.output)")
        #expect(read.output.contains("\"value\":1"), "\(read.output)")
        if process.isRunning { try await stop(process, log: log) }
    }

    /// Pulses counted after the last scheduled read are kept by a graceful stop and by a reload (both lost them: the
    /// count went on from the last read), and a restarted agent resumes its events file where it left it instead of
    /// counting every pulse in it again (and storing a switch's old changes again).
    @Test("A stop and a reload keep the pulses since the last read; a restart does not replay the events file")
    func stopReloadRestart() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-keep", in: URL(fileURLWithPath: "/tmp"))
        let pulses = try scratch.write("flow.events", "level 0\nnow 100\n")
        let float = try scratch.write("float.events", "level 0\nnow 100\n")
        let buffer = scratch.file("buffer.sqlite")
        let socket = scratch.file("control.sock")
        let countFile = buffer + ".gpio-count.loop.pulses"
        let configuration = try scratch.write(
            "agent.toml",
            """
            [device]
            id = "gpio-site"
            [buffer]
            path = "\(buffer)"
            commit_interval = "100ms"
            [control]
            socket = "\(socket)"
            [clock]
            check = false

            [[sensor]]
            id = "loop.pulses"
            driver = "gpio"
            quantity = "count"
            interval = "1h"
            line = 27
            backend = "events"
            events_file = "\(pulses)"

            [[sensor]]
            id = "tank1.float"
            driver = "gpio"
            quantity = "state"
            line = 17
            debounce = "10ms"
            backend = "events"
            events_file = "\(float)"
            """)
        func append(_ file: String, _ text: String) throws {
            let handle = try #require(FileHandle(forWritingAtPath: file))
            try handle.seekToEnd()
            try handle.write(contentsOf: Data(text.utf8))
            try handle.close()
        }
        func storedCount() -> String? { try? String(contentsOfFile: countFile, encoding: .utf8) }
        let log = scratch.file("agent.log")
        var process = try startAgent(configuration, log: log)
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }  // never left running by a test that stops early
        let firstRead = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            await sensorStatus(socket, "loop.pulses")?.readsOK == 1
        }
        #expect(firstRead, "\(agentLog(log))")
        // Three pulses after the first (and, with a 1 h interval, only scheduled) read; then a reload.
        try append(pulses, "rise 100.1\nfall 100.15\nrise 100.2\nfall 100.25\nrise 100.3\nnow 101\n")
        try append(float, "rise 100.5\nnow 101\n")
        #expect(await eventually(timeout: .seconds(10)) { await sensorStatus(socket, "tank1.float")?.lastValue == 1 })
        try await Task.sleep(for: .milliseconds(500))
        kill(process.processIdentifier, SIGHUP)
        let reloaded = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            // Counters carry on across the reload: the first read, and the reload's read at the stop or the new services' first.
            let count = await sensorStatus(socket, "loop.pulses")
            return (count?.readsOK ?? 0) >= 2 && storedCount() == "3\n"
        }
        #expect(reloaded, "the reload lost the pulses since the last read: count file \(storedCount() ?? "none"): \(agentLog(log))")
        // Two more, then SIGTERM.
        try append(pulses, "rise 101.1\nfall 101.15\nrise 101.2\nnow 102\n")
        try await Task.sleep(for: .milliseconds(500))
        try await stop(process, log: log)
        #expect(storedCount() == "5\n", "the stop lost the pulses since the last read: \(storedCount() ?? "none")")
        var readings = try await buffered(buffer)
        var counts = readings.filter { $0.sensor.rawValue == "loop.pulses" }.map(\.value)
        #expect(counts.last == 5, "\(counts)")
        #expect(zip(counts, counts.dropFirst()).allSatisfy { $0 <= $1 }, "the count never goes back: \(counts)")

        // A restart with nothing new in the files: the count stays, the switch's change is not stored again.
        process = try startAgent(configuration, log: log)
        let running = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            let count = await sensorStatus(socket, "loop.pulses")
            let state = await sensorStatus(socket, "tank1.float")
            return count?.readsOK == 1 && state?.lastValue != nil
        }
        #expect(running, "\(agentLog(log))")
        try await Task.sleep(for: .milliseconds(500))
        try await stop(process, log: log)
        #expect(storedCount() == "5\n", "the restart counted the events file's pulses again: \(storedCount() ?? "none")")
        readings = try await buffered(buffer)
        counts = readings.filter { $0.sensor.rawValue == "loop.pulses" }.map(\.value)
        #expect(counts.max() == 5, "\(counts)")
        // The switch's start state (0, stamped now) and its change (1, stamped by the events file's clock, which reads 1970
        // here): a commit numbers readings by time, so compare them as a set, and the change's time must appear once.
        let switchReadings = readings.filter { $0.sensor.rawValue == "tank1.float" }
        let states = switchReadings.map(\.value)
        #expect(states.filter { $0 == 0 }.count == 1 && states.contains(1), "\(states)")
        // A replayed change would be a duplicate of the pending one (same sensor and time), counted by the buffer.
        let store = try ReadingBuffer(configuration: BufferConfiguration(path: buffer), logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
        let ignored = try await store.statistics().duplicatesIgnored
        try await store.close()
        #expect(ignored == 0, "the switch's old change was stored again: \(switchReadings)")
    }

    @Test("`farmgate config check`, the agent's start and `sensor add` resolve line names on the chip and refuse one line used twice; without the chip it says the check was skipped")
    func configCheck() async throws {
        let scratch = try Scratch(prefix: "fg-gpio-check", in: URL(fileURLWithPath: "/tmp"))
        let chip = try scratch.write("chip.events", "name 17 GPIO17\n")
        func configuration(_ events: String, second line: String) throws -> String {
            try scratch.write(
                "agent.toml",
                """
                [device]
                id = "gpio-site"
                [buffer]
                path = "\(scratch.file("buffer.sqlite"))"

                [[sensor]]
                id = "tank1.low"
                driver = "gpio"
                quantity = "state"
                line = 17
                backend = "events"
                events_file = "\(events)"

                [[sensor]]
                id = "tank1.leak"
                driver = "gpio"
                quantity = "state"
                line = \(line)
                backend = "events"
                events_file = "\(events)"
                """)
        }
        var path = try configuration(chip, second: "\"GPIO17\"")
        var result = try await farmgateCLI(["config", "check", "-c", path])
        #expect(result.status == 78, "\(result.output)")
        #expect(result.output.contains("\(path):"), "\(result.output)")
        #expect(
            result.output.contains("sensor \"tank1.leak\": line: GPIO line gpiochip0:17 (events \(chip)) (written gpiochip0:GPIO17 here) is already used by sensor \"tank1.low\""),
            "\(result.output)")

        // The agent refuses to start with it, and `sensor add` to write it (a tester, 2026-12-07: the agent started,
        // and the two sensors on one line stored wrong flows; `sensor add` wrote what config check then refused).
        result = try await farmgateCLI(["agent", "-c", path])
        #expect(result.status == 78, "\(result.output)")
        #expect(result.output.contains("is already used by sensor \"tank1.low\""), "\(result.output)")
        path = try configuration(chip, second: "27")
        let before = try String(contentsOfFile: path, encoding: .utf8)
        for (line, says) in [("GPIO17", "is already used by sensor \"tank1.low\""), ("GPIO99", "has no line named \"GPIO99\"")] {
            let added = try await farmgateCLI(
                ["sensor", "add", "tank1.extra", "driver=gpio", "quantity=state", "line=\(line)", "backend=events", "events_file=\(chip)", "-c", path])
            #expect(added.status == 64 && added.output.contains(says) && added.output.contains("nothing was written"), "\(added.output)")
            #expect(try String(contentsOfFile: path, encoding: .utf8) == before)
        }

        // The same file spelt another way (`//`, `..`, a link) is the same chip, whatever `chip` says (a tester,
        // 2026-12-07: two sensors on one line that way).
        try FileManager.default.createSymbolicLink(atPath: scratch.file("link.events"), withDestinationPath: chip)
        for spelling in [chip.replacingOccurrences(of: "/chip.events", with: "//chip.events"), scratch.file("link.events"),
                         chip.replacingOccurrences(of: "/chip.events", with: "/../\(URL(fileURLWithPath: scratch.path).lastPathComponent)/chip.events")] {
            let text = try String(contentsOfFile: try configuration(chip, second: "27"), encoding: .utf8)
            let twice = try scratch.write(
                "twice.toml",
                text + "\n[[sensor]]\nid = \"tank1.other\"\ndriver = \"gpio\"\nquantity = \"state\"\nchip = \"gpiochip1\"\nline = \"GPIO17\"\nbackend = \"events\"\nevents_file = \"\(spelling)\"\n")
            let checked = try await farmgateCLI(["config", "check", "-c", twice])
            #expect(checked.status == 78 && checked.output.contains("is already used by sensor \"tank1.low\""), "\(spelling): \(checked.output)")
        }
        // A directory as events file is no chip, as a missing file is: never a line at level 0 (a tester, 2026-12-07).
        try FileManager.default.createDirectory(atPath: scratch.file("dir.events"), withIntermediateDirectories: true)
        path = try configuration(scratch.file("dir.events"), second: "27")
        result = try await farmgateCLI(["sensor", "read", "tank1.low", "-c", path])
        #expect(result.status == 1 && result.output.contains("is a directory"), "\(result.output)")

        path = try configuration(scratch.file("absent.events"), second: "\"GPIO17\"")
        result = try await farmgateCLI(["config", "check", "-c", path])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("gpio        sensor tank1.leak: GPIO line check skipped: the events file"), "\(result.output)")
    }

    func farmgateCLI(_ arguments: [String]) async throws -> (status: Int32, output: String) {
        let binary = builtExecutable("farmgate", environmentOverride: "FARMGATE_BINARY")
        return try await runProgram(binary, arguments)
    }

    func startAgent(_ configuration: String, log: String) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: builtExecutable("farmgate", environmentOverride: "FARMGATE_BINARY"))
        process.arguments = ["agent", "-c", configuration]
        if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        try handle.seekToEnd()
        process.standardError = handle
        process.standardOutput = handle
        try process.run()
        return process
    }

    func stop(_ process: Process, log: String) async throws {
        kill(process.processIdentifier, SIGTERM)
        let exited = await eventually(timeout: .seconds(20)) { !process.isRunning }
        #expect(exited)
        if !exited { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\(agentLog(log))")
    }

    func buffered(_ path: String) async throws -> [Reading] {
        let store = try ReadingBuffer(
            configuration: BufferConfiguration(path: path), logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
        let readings = try await store.pending(limit: 100_000, from: .oldest)
        try await store.close()
        return readings
    }

    func agentLog(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

    /// One sensor's line of `farmgate status`, through the control socket (nil while the agent does not answer).
    func sensorStatus(_ socket: String, _ sensor: String) async -> SensorStatus? {
        let answer = try? await runOffPool(name: "test-status") {
            try ControlClient.send(ControlRequest(command: "status"), to: socket, timeoutSeconds: 5)
        }
        guard let answer, let decoded = try? JSONDecoder().decode(ControlAnswer.self, from: Data(answer)) else { return nil }
        return decoded.status?.sensors.first { $0.id == sensor }
    }
}
