@testable import FarmgateAgent
import FarmgateSupport
import FarmgateWire
import FarmgateTestSupport
import Foundation
import Logging
import Synchronization
import Testing

/// Collects what the sampler stores.
final class CollectingSink: SampleSink {
    let samples = Mutex<[Sample]>([])
    func append(_ new: [Sample]) async throws { samples.withLock { $0.append(contentsOf: new) } }
}

/// A driver that fails on every read, as an unplugged probe would.
struct BrokenDriver: SensorDriver {
    func read() async throws(SensorError) -> SensorValue { throw SensorError(.disconnected, "no such device /dev/ttyUSB9") }
}

/// A driver whose read takes `delay` (calling `started` when it begins) and returns `value`.
struct DelayedDriver: SensorDriver {
    let delay: Duration
    let value: Double
    let started: @Sendable () -> Void
    func read() async throws(SensorError) -> SensorValue {
        started()
        try? await Task.sleep(for: delay)
        return SensorValue(value)
    }
}

/// A driver whose read number `slow` (from 0) takes `delay`, the others none.
final class SlowReadDriver: SensorDriver {
    let slow: Int
    let delay: Duration
    let count = Mutex(0)
    init(slow: Int, delay: Duration) {
        self.slow = slow
        self.delay = delay
    }
    func read() async throws(SensorError) -> SensorValue {
        let index = count.withLock { value in
            defer { value += 1 }
            return value
        }
        if index == slow { try? await Task.sleep(for: delay) }
        return SensorValue(1400)
    }
}

/// A driver that reads at once and whose close never ends (a port stuck in the kernel).
struct HangingCloseDriver: SensorDriver {
    func read() async throws(SensorError) -> SensorValue { SensorValue(6.1) }
    func close() async { try? await Task.sleep(for: .seconds(60)) }
}

func sensorConfiguration(_ id: String, quantity: Quantity, interval: String = "100ms", extra: String = "") throws -> SensorConfiguration {
    let text = """
        [device]
        id = "t"
        [[sensor]]
        id = "\(id)"
        driver = "simulated"
        quantity = "\(quantity.rawValue)"
        interval = "\(interval)"
        latency = "0ms"
        \(extra.contains("fault_rate") ? "" : "fault_rate = 0")
        \(extra)
        """
    let configuration = try AgentConfiguration.parse(ConfigDocument.parse(text, file: "test.toml"))
    return try #require(configuration.sensors.first)
}

@Suite("Sampler")
struct SamplerTests {
    @Test("Each sensor is read on its own interval; a broken one does not stop the others")
    func schedules() async throws {
        let fast = try sensorConfiguration("tank1.ph", quantity: .ph, interval: "100ms")
        let slow = try sensorConfiguration("tank1.ec", quantity: .electricalConductivity, interval: "300ms")
        let broken = try sensorConfiguration("tank1.temp", quantity: .temperature, interval: "100ms")
        let sink = CollectingSink()
        let board = SensorStatusBoard(sensors: [fast, slow, broken])
        let logger = Logger(label: "test")
        let sampler = Sampler(
            sensors: [
                .init(configuration: fast, driver: try SimulatedDriver(configuration: fast, logger: logger)),
                .init(configuration: slow, driver: try SimulatedDriver(configuration: slow, logger: logger)),
                .init(configuration: broken, driver: BrokenDriver()),
            ],
            sink: sink, board: board, clock: WallClock(checkSynchronization: false), logger: logger)
        let task = Task { try await sampler.run() }
        try await Task.sleep(for: .milliseconds(1_250))
        task.cancel()
        _ = try? await task.value

        let samples = sink.samples.withLock { $0 }
        let fastCount = samples.filter { $0.sensor == fast.id }.count
        let slowCount = samples.filter { $0.sensor == slow.id }.count
        #expect((9...14).contains(fastCount), "fast sensor read \(fastCount) times in 1.25 s")
        #expect((3...6).contains(slowCount), "slow sensor read \(slowCount) times in 1.25 s")
        #expect(!samples.contains { $0.sensor == broken.id })
        // Millisecond timestamps, increasing per sensor.
        #expect(samples.allSatisfy { $0.timestamp.microseconds % 1000 == 0 })
        let fastTimes = samples.filter { $0.sensor == fast.id }.map(\.timestamp)
        #expect(fastTimes == fastTimes.sorted())
        // pH values look like pH.
        #expect(samples.filter { $0.sensor == fast.id }.allSatisfy { (5.0...7.0).contains($0.value) })

        let statuses = board.snapshot()
        #expect(statuses.map(\.id) == ["tank1.ph", "tank1.ec", "tank1.temp"])
        let brokenStatus = try #require(statuses.last)
        #expect(brokenStatus.consecutiveErrors >= 9)
        #expect(brokenStatus.lastError?.contains("/dev/ttyUSB9") == true)
        #expect(statuses.first?.lastValue != nil)
    }

    @Test("Ticks a slow read ran past are skipped and said so: counted in status and metrics, one warning (rate-limited)")
    func skippedReadsAreReported() async throws {
        let slow = try sensorConfiguration("bus.slow", quantity: .ph, interval: "100ms")
        let sink = CollectingSink()
        let board = SensorStatusBoard(sensors: [slow])
        let log = RecordedLog()
        let sampler = Sampler(
            sensors: [.init(configuration: slow, driver: DelayedDriver(delay: .milliseconds(250), value: 6.5, started: {}))],
            sink: sink, board: board, clock: WallClock(checkSynchronization: false), logger: log.logger())
        let task = Task { try await sampler.run() }
        try await Task.sleep(for: .milliseconds(1_100))
        task.cancel()
        _ = try? await task.value

        let status = try #require(board.snapshot().first)
        // About 4 reads of 250 ms in 1.1 s at a 100 ms interval: 2 ticks skipped after each.
        let skipped = try #require(status.skippedReads)
        #expect(skipped >= 4, "\(skipped) skipped reads counted")
        let warnings = log.entries.filter { $0.level == .warning && $0.message.contains("scheduled reads skipped") }
        #expect(warnings.count == 1, "\(warnings.map(\.message))")
        #expect(warnings.first?.metadata["sensor"] == "bus.slow")
        var agent = TextfileMetricsTests.status()
        agent.sensors = [status]
        let metrics = TextfileMetrics.render(agent, writtenBytes: nil)
        #expect(agent.humanReadable().contains("\(skipped) scheduled reads skipped"), "\(agent.humanReadable())")
        #expect(metrics.contains("farmgate_driver_skipped_reads_total{driver=\"simulated\"} \(skipped)"), "\(metrics)")
    }

    @Test("Sensors of one interval start on at most four phases of it, sensor i on phase i % 4, so that they wake together")
    func phases() async throws {
        #expect(Sampler.phaseSlots(50) == 4)
        #expect(Sampler.phaseSlots(3) == 3)
        #expect(Sampler.phaseSlots(0) == 1)
        let configurations = try (0..<8).map { try sensorConfiguration("tank\($0).ph", quantity: .ph, interval: "1s") }
        let logger = Logger(label: "test")
        let sink = CollectingSink()
        let sampler = Sampler(
            sensors: try configurations.map { .init(configuration: $0, driver: try SimulatedDriver(configuration: $0, logger: logger)) },
            sink: sink, board: SensorStatusBoard(sensors: configurations), clock: WallClock(checkSynchronization: false), logger: logger)
        let task = Task { try await sampler.run() }
        let complete = await eventually(timeout: .seconds(10)) { Set(sink.samples.withLock { $0.map(\.sensor) }).count == 8 }
        task.cancel()
        _ = try? await task.value
        #expect(complete)
        let samples = sink.samples.withLock { $0 }
        let first = try configurations.map { configuration in
            try #require(samples.first { $0.sensor == configuration.id }).timestamp.microseconds
        }
        // Phases are 250 ms apart: sensors 4 apart share one, neighbours do not.
        for index in 0..<4 {
            #expect(abs(first[index + 4] - first[index]) < 100_000, "sensors \(index) and \(index + 4) share a phase")
            if index < 3 { #expect(first[index + 1] - first[index] > 150_000, "sensors \(index) and \(index + 1) are on different phases") }
        }
    }

    @Test("Out-of-range values are flagged, not dropped; deadband suppresses repeats")
    func flagsAndDeadband() async throws {
        let flagged = try sensorConfiguration("tank1.ec", quantity: .electricalConductivity, extra: "expected_max = 100")
        let banded = try sensorConfiguration("tank2.ph", quantity: .ph, extra: "deadband = 5.0\nheartbeat = \"1h\"")
        let sink = CollectingSink()
        let board = SensorStatusBoard(sensors: [flagged, banded])
        let logger = Logger(label: "test")
        let sampler = Sampler(
            sensors: [
                .init(configuration: flagged, driver: try SimulatedDriver(configuration: flagged, logger: logger)),
                .init(configuration: banded, driver: try SimulatedDriver(configuration: banded, logger: logger)),
            ],
            sink: sink, board: board, clock: WallClock(checkSynchronization: false), logger: logger)
        let task = Task { try await sampler.run() }
        try await Task.sleep(for: .milliseconds(700))
        task.cancel()
        _ = try? await task.value
        let samples = sink.samples.withLock { $0 }
        let ec = samples.filter { $0.sensor == flagged.id }
        #expect(ec.count >= 4)
        #expect(ec.allSatisfy { $0.quality.contains(.outOfRange) })
        // pH never moves by 5: only the first reading is stored, the rest are counted as suppressed.
        #expect(samples.filter { $0.sensor == banded.id }.count == 1)
        #expect((board.snapshot().last?.suppressed ?? 0) >= 3)
    }

    @Test("A read in flight when the sampler stops is stored if it ends within the grace; a stuck one is left behind")
    func stopDuringRead() async throws {
        let quick = try sensorConfiguration("loop.pulses", quantity: .count, interval: "1s")
        let stuck = try sensorConfiguration("tank1.temp", quantity: .temperature, interval: "1s")
        let started = Mutex(Set<String>())
        let sink = CollectingSink()
        let sampler = Sampler(
            sensors: [
                // The stuck sensor on the first phase, the quick one half an interval later: both are reading at once.
                .init(configuration: stuck, driver: DelayedDriver(delay: .seconds(60), value: 20) { started.withLock { _ = $0.insert("stuck") } }),
                .init(configuration: quick, driver: DelayedDriver(delay: .milliseconds(400), value: 3) { started.withLock { _ = $0.insert("quick") } }),
            ],
            sink: sink, board: SensorStatusBoard(sensors: [stuck, quick]), clock: WallClock(checkSynchronization: false),
            closeTimeout: .milliseconds(100), logger: Logger(label: "test"))
        let task = Task { try await sampler.run() }
        #expect(await eventually(timeout: .seconds(10), every: .milliseconds(5)) { started.withLock { $0.count == 2 } })
        let stop = ContinuousClock.now
        task.cancel()
        _ = try? await task.value
        let took = ContinuousClock.now - stop
        // The quick read's value was stored although the stop came while it ran; the stuck one did not hold the stop
        // past the grace (plus the drivers' close timeout).
        #expect(sink.samples.withLock { $0.map(\.sensor.rawValue) } == ["loop.pulses"])
        #expect(sink.samples.withLock { $0.first?.value } == 3)
        #expect(took < Sampler.stoppingReadGrace + .seconds(1), "the stop took \(took)")
    }

    // Before the fix (a tester, 2026-12-06) the warning named the sensors busy reading, `stuck=[]` when the driver that
    // hung was in its close.
    @Test("A driver that does not close in time is named in the stop's warning, and does not hold the stop")
    func stuckClose() async throws {
        let hanging = try sensorConfiguration("tank1.ph", quantity: .ph, interval: "1s")
        let fine = try sensorConfiguration("tank1.ec", quantity: .electricalConductivity, interval: "1s")
        let logs = LogRecorder()
        let sampler = Sampler(
            sensors: [.init(configuration: hanging, driver: HangingCloseDriver()), .init(configuration: fine, driver: BrokenDriver())],
            sink: CollectingSink(), board: SensorStatusBoard(sensors: [hanging, fine]), clock: WallClock(checkSynchronization: false),
            closeTimeout: .milliseconds(100), logger: logs.logger())
        let task = Task { try await sampler.run() }
        try await Task.sleep(for: .milliseconds(200))
        let stop = ContinuousClock.now
        task.cancel()
        _ = try? await task.value
        #expect(ContinuousClock.now - stop < .seconds(5))
        let warning = logs.all.filter { $0.contains("did not close in time") }
        #expect(warning.count == 1 && warning.first?.contains("stuck=tank1.ph ") == true, "\(logs.all)")
    }

    // Before the fix (a tester, 2026-12-06) every EZO sensor with an interval of 2–3 s logged "scheduled reads skipped" at
    // each start, and status showed it for the whole run: the first read sets the circuit up.
    @Test("A slow first read (the device's setup) skips ticks without counting them; a slow later read counts", arguments: [0, 2])
    func slowFirstRead(slowRead: Int) async throws {
        let configuration = try sensorConfiguration("tank1.ec", quantity: .electricalConductivity, interval: "100ms")
        let board = SensorStatusBoard(sensors: [configuration])
        let sampler = Sampler(
            sensors: [.init(configuration: configuration, driver: SlowReadDriver(slow: slowRead, delay: .milliseconds(350)))],
            sink: CollectingSink(), board: board, clock: WallClock(checkSynchronization: false), logger: Logger(label: "test"))
        let task = Task { try await sampler.run() }
        try await Task.sleep(for: .milliseconds(1_000))
        task.cancel()
        _ = try? await task.value
        let skipped = board.snapshot().first?.skippedReads ?? 0
        if slowRead == 0 {
            #expect(skipped == 0, "the setup read counted \(skipped) skipped reads")
        } else {
            #expect(skipped >= 3, "a slow third read counted \(skipped) skipped reads")
        }
    }

    @Test("The simulated driver is reproducible from its seed and fails at its fault rate")
    func simulated() throws {
        let a = try SimulatedDriver(configuration: try sensorConfiguration("x", quantity: .ph, extra: "seed = 7"), logger: Logger(label: "t"))
        let b = try SimulatedDriver(configuration: try sensorConfiguration("x", quantity: .ph, extra: "seed = 7"), logger: Logger(label: "t"))
        for second in 0..<50 {
            let t = 1_790_000_000 + Double(second) * 10
            let first = try a.value(at: t)
            let second = try b.value(at: t)
            #expect(first == second)
        }
        let flaky = try SimulatedDriver(
            configuration: try sensorConfiguration("y", quantity: .ph, extra: "fault_rate = 0.5\nseed = 1"), logger: Logger(label: "t"))
        var failures = 0
        for second in 0..<400 {
            do { _ = try flaky.value(at: 1_790_000_000 + Double(second)) } catch { failures += 1 }
        }
        #expect((140...260).contains(failures), "\(failures) failures of 400 at fault_rate 0.5")
    }
}

@Suite("Control socket")
struct ControlSocketTests {
    @Test("Answers requests, replaces a stale socket, refuses to run twice")
    func roundTrip() async throws {
        let dir = "/tmp/fg-ctl-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/run/control.sock"
        // A stale socket left by a killed agent: bound, then closed without unlinking it.
        try FileManager.default.createDirectory(atPath: dir + "/run", withIntermediateDirectories: true)
        try Self.leaveStaleSocket(at: path)

        let logger = Logger(label: "test")
        let server = ControlServer(path: path, logger: logger) { request in
            Array("{\"ok\":true,\"error\":\"echo \(request.command)\"}".utf8)
        }
        let task = Task { try await server.run() }
        let up = await waitFor { FileManager.default.fileExists(atPath: path) && (try? ControlClient.send(.init(command: "ping"), to: path)) != nil }
        #expect(up)

        let answer = try ControlClient.send(ControlRequest(command: "status"), to: path)
        #expect(String(decoding: answer, as: UTF8.self) == "{\"ok\":true,\"error\":\"echo status\"}")
        // Owner and group only.
        let mode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int
        #expect(mode.map { $0 & 0o007 } == 0)

        // A second agent on the same socket is refused with a clear message.
        let second = ControlServer(path: path, logger: logger) { _ in [] }
        await #expect(throws: ControlSocketError.self) { try await second.run() }

        task.cancel()
        _ = try? await task.value
        // Once stopped, the CLI gets a message that says what to check.
        do {
            _ = try ControlClient.send(ControlRequest(command: "status"), to: path)
            Issue.record("the stopped agent still answered")
        } catch {
            #expect("\(error)".contains("Is `farmgate agent` running?"))
        }
    }

    @Test("A command run while the agent reopens its control socket (a reload) waits for it instead of saying the agent is not running")
    func waitsForTheSocketToReopen() async throws {
        let scratch = try Scratch(prefix: "fg-ctl", in: URL(fileURLWithPath: "/tmp"))
        let path = scratch.file("control.sock")
        // Refused at first (nobody listens), as between a reload's stop and its start.
        try Self.leaveStaleSocket(at: path)
        let server = ControlServer(path: path, logger: Logger(label: "test")) { request in
            Array("{\"ok\":true,\"error\":\"echo \(request.command)\"}".utf8)
        }
        let task = Task {
            try await Task.sleep(for: .milliseconds(800))
            try await server.run()
        }
        let asked = ContinuousClock.now
        let answer = try await runOffPool { try ControlClient.send(ControlRequest(command: "status"), to: path, settling: ControlClient.cliSettling) }
        #expect(String(decoding: answer, as: UTF8.self) == "{\"ok\":true,\"error\":\"echo status\"}")
        #expect(asked.duration(to: .now) >= .milliseconds(700))
        task.cancel()
        _ = try? await task.value
        // No socket at all and nobody coming: the message that says what to check, once the wait is over.
        #expect(!FileManager.default.fileExists(atPath: path))
        let again = ContinuousClock.now
        do {
            _ = try await runOffPool { try ControlClient.send(ControlRequest(command: "status"), to: path, settling: .milliseconds(500)) }
            Issue.record("a stopped agent answered")
        } catch {
            #expect("\(error)".contains("no such socket") && "\(error)".contains("Is `farmgate agent` running?"), "\(error)")
        }
        #expect(again.duration(to: .now) >= .milliseconds(450))
    }

    // A tester, 2026-12-07: `farmgate status --socket /etc/hostname` said "a stale socket: the agent is not running".
    @Test("A client given a path that is not a socket says so, not that the agent stopped")
    func clientGivenAFileOrDirectory() async throws {
        let scratch = try Scratch(prefix: "fg-ctl", in: URL(fileURLWithPath: "/tmp"))
        let notes = try scratch.write("notes.txt", "the installer's notes\n")
        for (path, kind) in [(notes, "a regular file"), (scratch.path, "a directory")] {
            do {
                _ = try await runOffPool { try ControlClient.send(ControlRequest(command: "status"), to: path, settling: .zero) }
                Issue.record("\(path) answered")
            } catch {
                #expect("\(error)".contains("\(path): that is \(kind), not a socket"), "\(error)")
                #expect(!"\(error)".contains("stale socket"), "\(error)")
            }
        }
    }

    @Test("A file at the socket path that is not a socket is left alone, and the agent says so")
    func refusesToReplaceAFile() async throws {
        let scratch = try Scratch(prefix: "fg-ctl", in: URL(fileURLWithPath: "/tmp"))
        let logger = Logger(label: "test")
        let notes = try scratch.write("notes.txt", "the installer's notes\n")
        try FileManager.default.createSymbolicLink(atPath: scratch.file("link.sock"), withDestinationPath: notes)
        try FileManager.default.createDirectory(atPath: scratch.file("dir.sock"), withIntermediateDirectories: false)
        for (name, kind) in [("notes.txt", "a regular file"), ("link.sock", "a symbolic link"), ("dir.sock", "a directory")] {
            let path = scratch.file(name)
            let server = ControlServer(path: path, logger: logger) { _ in [] }
            // Bounded: a server that replaced the file would run (and listen) until cancelled.
            let outcome = await withTaskGroup(of: Result<Void, any Error>?.self) { group in
                group.addTask {
                    do { return .success(try await server.run()) } catch { return .failure(error) }
                }
                group.addTask {
                    try? await Task.sleep(for: .seconds(5))
                    return nil
                }
                let first = await group.next() ?? nil
                group.cancelAll()
                return first
            }
            guard case .failure(let error)? = outcome, let failure = error as? ControlSocketError else {
                Issue.record("the control server did not refuse \(name) (\(kind)): \(String(describing: outcome))")
                continue
            }
            #expect(failure.description.contains("\(path) exists and is not a socket (it is \(kind))"), "\(failure)")
            #expect(failure.description.contains("set [control] socket to a path of its own"), "\(failure)")
        }
        #expect(try String(contentsOfFile: notes, encoding: .utf8) == "the installer's notes\n")
        #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: scratch.file("link.sock"))) == notes)
        #expect(FileSystem.isDirectory(scratch.file("dir.sock")))
    }

    /// Binds a Unix socket at `path` and closes it without unlinking, as an agent killed with SIGKILL leaves it.
    // A tester, 2026-12-07: a peer on the socket writing a byte every few seconds held `status` for over a minute (each
    // read had its own timeout, the answer none).
    @Test("A peer that trickles bytes and never ends its line is given up on within the timeout")
    func tricklingPeer() async throws {
        let dir = "/tmp/fg-ctl-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let path = dir + "/control.sock"
        var address = try UnixSocket.address(path)
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #expect(listener >= 0)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(bound == 0 && listen(listener, 4) == 0)
        let stop = Mutex(false)
        let peer = Thread {
            let client = accept(listener, nil, nil)
            guard client >= 0 else { return }
            while !stop.withLock({ $0 }) {
                _ = send(client, "{", 1, Int32(MSG_NOSIGNAL))
                usleep(100_000)
            }
            close(client)
        }
        peer.start()
        defer {
            stop.withLock { $0 = true }
            close(listener)
        }
        let started = ContinuousClock.now
        let outcome = try await runOffPool { () -> String in
            do {
                _ = try ControlClient.send(ControlRequest(command: "status"), to: path, timeoutSeconds: 1)
                return "answered"
            } catch {
                return "\(error)"
            }
        }
        let took = started.duration(to: .now)
        #expect(outcome.contains("did not answer on \(path) within 1 s"), "\(outcome)")
        #expect(took < .seconds(5), "took \(took)")
    }

    static func leaveStaleSocket(at path: String) throws {
        var address = try UnixSocket.address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #expect(fd >= 0)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        close(fd)
        #expect(rc == 0, "cannot bind \(path)")
    }

    func waitFor(_ condition: () -> Bool) async -> Bool {
        for _ in 0..<100 {
            if condition() { return true }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return false
    }
}

/// The real agent stopped by SIGSTOP for longer than its sensors' interval: every sensor wakes long past its ticks at
/// once. The skipped reads are the agent's own delay, not a slow bus (the warning blamed the bus, a black-box tester
/// 2026-12-06), and they are not counted as reads that ran past their interval.
@Suite("Sampler: the agent stopped", .serialized)
struct SamplerStoppedAgentTests {
    @Test("Reads skipped while the agent was stopped (SIGSTOP) are said to be that, not blamed on the sensors or the bus")
    func stoppedAgent() async throws {
        let scratch = try Scratch(prefix: "fg-sigstop", in: URL(fileURLWithPath: "/tmp"))
        let config = try scratch.write("agent.toml", ConfigurationReloadTests.configuration(sensors: ["tank1.ph", "tank2.ph"], interval: "500ms"))
        let socket = scratch.file("control.sock")
        let (process, log) = try ConfigurationReloadTests.startAgent(config: config, in: scratch)
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        let agentLog: @Sendable () -> String = { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
        try await ConfigurationReloadTests.requireSampling(socket, log: agentLog)

        // Stopped for six intervals: every sensor wakes five ticks late, at once.
        #expect(kill(process.processIdentifier, SIGSTOP) == 0)
        try await Task.sleep(for: .seconds(3))
        #expect(kill(process.processIdentifier, SIGCONT) == 0)
        let before = await ConfigurationReloadTests.status(socket)?.buffer.lastSequence ?? 0
        let sampling = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            (await ConfigurationReloadTests.status(socket)?.buffer.lastSequence ?? 0) >= before + 6
        }
        #expect(sampling, "the agent did not sample again: \(agentLog())")
        let warned = await eventually(timeout: .seconds(10)) { agentLog().contains("the agent was not running") }
        #expect(warned, "no warning that the agent was not running: \(agentLog())")
        #expect(!agentLog().contains("Sensor reads take longer than its interval"), "the bus was blamed: \(agentLog())")
        let sensors = await ConfigurationReloadTests.status(socket)?.sensors ?? []
        #expect(sensors.count == 2 && sensors.allSatisfy { ($0.skippedReads ?? 0) == 0 }, "\(sensors.map { ($0.id, $0.skippedReads ?? -1) })")

        kill(process.processIdentifier, SIGTERM)
        #expect(await eventually(timeout: .seconds(20)) { !process.isRunning })
    }
}
