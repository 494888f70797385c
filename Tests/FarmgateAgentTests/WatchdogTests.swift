@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

/// A driver whose read never returns and ignores cancellation: a blocking read in a driver that hangs for good, the case
/// the sampler's own read timeout cannot end.
final class WedgedDriver: SensorDriver {
    private let waiting = Mutex<[CheckedContinuation<Void, Never>]>([])

    func read() async throws(SensorError) -> SensorValue {
        await withCheckedContinuation { continuation in waiting.withLock { $0.append(continuation) } }
        throw SensorError(.timeout, "released by the test")
    }

    func release() {
        for continuation in waiting.withLock({ value in defer { value.removeAll() }; return value }) { continuation.resume() }
    }
}

/// The systemd watchdog's gate: pings only while every component beats on time.
///
/// Why not a stuck component inside the real binary: nothing the agent can be given from outside wedges a loop for good
/// (reads time out, requests time out, commits fail and are retried), and a hook that wedges one on demand would be code
/// in the daemon that exists only for tests. So the real components are tested here, in process: a real `Sampler` with a
/// driver that hangs, and the real `AgentSupervisor` speaking the real protocol to a socket, with a heartbeat the test
/// stops; the real binaries' pings (rate, READY, STATUS, STOPPING) are tested in `SystemdNotifyTests`.
@Suite("Watchdog")
struct WatchdogTests {
    /// A component's loop as the test plays it: beats `heartbeat` every `interval` while `on` says so, until cancelled.
    static func beating(_ heartbeat: Heartbeat, every interval: Duration, while on: @escaping @Sendable () -> Bool = { true }) -> Task<Void, Never> {
        Task {
            while !Task.isCancelled {
                if on() { heartbeat.beat(within: .zero) }
                try? await Task.sleep(for: interval)
            }
        }
    }

    /// A status of an agent with `pending` readings, no upload and no sensor.
    static func status(pending: Int) -> AgentStatus {
        AgentStatus(
            device: "t", version: "test", pid: 1, startedAt: Timestamp.now(), now: Timestamp.now(), clockSynchronized: true,
            buffer: BufferStatistics(
                pending: pending, oldestPending: nil, uncommitted: 0, quarantined: 0, dropped: 0, duplicatesIgnored: 0, lastSequence: UInt64(pending),
                usedBytes: 0, quotaBytes: 1),
            upload: nil, uploadEndpoint: nil, sensors: [], recentQuarantine: [])
    }

    @Test("The gate waits for every component to start, then finds the late ones by name; on time again, alive again")
    func gate() {
        let sampler = Heartbeat(component: "sampler")
        let uploader = Heartbeat(component: "uploader")
        let gate = WatchdogGate(heartbeats: [sampler, uploader])
        #expect(gate.verdict() == .starting(["sampler", "uploader"]))
        sampler.start()
        #expect(gate.verdict() == .starting(["uploader"]))
        let now = ContinuousClock.now
        sampler.beat("tank1.ph", within: .seconds(10))
        sampler.beat("tank1.ec", within: .seconds(1))
        uploader.beat(within: .seconds(30))
        #expect(gate.verdict(at: now) == .alive)
        // Past tank1.ec's deadline (1 s + the margin) but within the others'.
        #expect(gate.verdict(at: now + .seconds(1) + Heartbeat.margin + .milliseconds(100)) == .stale(["sampler tank1.ec"]))
        #expect(gate.verdict(at: now + .seconds(40)) == .stale(["sampler tank1.ec", "sampler tank1.ph", "uploader"]))
        sampler.beat("tank1.ec", within: .seconds(60))
        #expect(gate.verdict(at: now + .seconds(5)) == .alive)
        sampler.end("tank1.ph")
        #expect(gate.verdict(at: now + .seconds(20)) == .alive)
    }

    @Test("A sensor read that hangs for good does not stall the real sampler: its loop keeps beating, the sensor shows the timeout")
    func wedgedSampler() async throws {
        let healthy = try sensorConfiguration("tank1.ph", quantity: .ph, interval: "100ms")
        let wedged = try sensorConfiguration("tank1.ec", quantity: .electricalConductivity, interval: "100ms")
        let logger = Logger(label: "test")
        let driver = WedgedDriver()
        let board = SensorStatusBoard(sensors: [healthy, wedged])
        let sampler = Sampler(
            sensors: [
                .init(configuration: healthy, driver: try SimulatedDriver(configuration: healthy, logger: logger)),
                .init(configuration: wedged, driver: driver),
            ],
            sink: CollectingSink(), board: board, clock: WallClock(checkSynchronization: false), logger: logger)
        let gate = WatchdogGate(heartbeats: [sampler.heartbeat])
        let task = Task { try await sampler.run() }
        #expect(await eventually(timeout: .seconds(5)) { gate.verdict() == .alive })
        // The read timeout (5 s) passes and the hung read never returns: the sampler abandons it, reports a timeout and
        // goes on, so the watchdog keeps being fed (a restart would not unstick it any better than the next read does).
        let timedOut = await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
            board.snapshot().first { $0.id == "tank1.ec" }?.lastError?.contains("timeout") == true
        }
        #expect(timedOut, "\(board.snapshot())")
        let deadline = ContinuousClock.now + .seconds(3)
        while ContinuousClock.now < deadline {
            #expect(gate.verdict() == .alive)
            try await Task.sleep(for: .milliseconds(200))
        }
        driver.release()
        task.cancel()
        let releaser = Task {
            while !Task.isCancelled {
                driver.release()
                try? await Task.sleep(for: .milliseconds(50))
            }
        }
        _ = try? await task.value
        releaser.cancel()
    }

    @Test("The supervisor sends READY=1 once the control socket listens, pings while all beat, stops while one is late, resumes")
    func supervisorWithholdsPings() async throws {
        let dir = try Scratch(prefix: "fg-wd", in: URL(fileURLWithPath: "/tmp"))
        let listener = try NotifyListener(address: dir.file("notify.sock"))
        defer { listener.stop() }
        let logger = Logger(label: "test")
        let controlPath = dir.file("control.sock")
        let sampler = Heartbeat(component: "sampler")
        let uploader = Heartbeat(component: "uploader")
        sampler.beat(within: .seconds(600))
        let snapshot: @Sendable () async throws -> AgentStatus = { Self.status(pending: 42) }
        let supervisor = AgentSupervisor(
            notifier: SystemdNotifier(socketPath: listener.address, watchdogTimeout: .milliseconds(200)),
            gate: WatchdogGate(heartbeats: [sampler, uploader]), controlSocket: controlPath, snapshot: snapshot, logger: logger)
        let supervising = Task { try await supervisor.run() }
        // The uploader "loop": beats every 100 ms while `beating` is set.
        let beating = Mutex(true)
        let loop = Self.beating(uploader, every: .milliseconds(100)) { beating.withLock { $0 } }
        defer {
            supervising.cancel()
            loop.cancel()
        }
        try await Task.sleep(for: .milliseconds(500))
        #expect(listener.messages(with: "READY=1").isEmpty, "READY=1 before the control socket listens")
        let control = ControlServer(path: controlPath, logger: logger) { _ in Array("{\"ok\":true}\n".utf8) }
        let serving = Task { try await control.run() }
        defer { serving.cancel() }
        #expect(await eventually(timeout: .seconds(10)) { !listener.messages(with: "READY=1").isEmpty })
        #expect(listener.statusLines.first?.hasPrefix("42 pending, upload off, 0/0 sensors ok") == true, "\(listener.statusLines)")
        #expect(await eventually(timeout: .seconds(5)) { listener.messages(with: "WATCHDOG=1").count >= 5 })

        beating.withLock { $0 = false }
        let stoppedAt = ContinuousClock.now
        // Late after the 2 s margin: the pings stop and the status line names the component.
        #expect(await eventually(timeout: .seconds(10)) { listener.statusLines.last?.hasPrefix("STUCK: uploader") == true }, "\(listener.statusLines)")
        let countWhenStuck = listener.messages(with: "WATCHDOG=1").count
        try await Task.sleep(for: .seconds(1))
        #expect(listener.messages(with: "WATCHDOG=1").count == countWhenStuck, "pings went on while the uploader was late")
        let lastPing = try #require(listener.messages(with: "WATCHDOG=1").last)
        #expect(lastPing.at < stoppedAt + Heartbeat.margin + .milliseconds(500))

        beating.withLock { $0 = true }
        #expect(await eventually(timeout: .seconds(5)) { listener.messages(with: "WATCHDOG=1").count >= countWhenStuck + 3 })
        #expect(listener.statusLines.last?.hasPrefix("42 pending") == true)
    }
    // A tester, 2026-12-07: with the buffer's file system frozen, the pings stopped but nothing named the buffer: the
    // status refresh waited for the buffer's figures for ever, so the loop never got to the stale check.
    @Test("A status snapshot that never comes back (a buffer stuck on its disk) holds neither the pings nor the naming of the stuck component")
    func stuckSnapshot() async throws {
        let dir = try Scratch(prefix: "fg-wds", in: URL(fileURLWithPath: "/tmp"))
        let listener = try NotifyListener(address: dir.file("notify.sock"))
        defer { listener.stop() }
        let logger = Logger(label: "test")
        let controlPath = dir.file("control.sock")
        let buffer = Heartbeat(component: "buffer")
        let stuck = WedgedDriver()
        defer { stuck.release() }
        let asked = Mutex(0)
        let snapshot: @Sendable () async throws -> AgentStatus = {
            asked.withLock { $0 += 1 }
            _ = try? await stuck.read()
            throw CancellationError()
        }
        let supervisor = AgentSupervisor(
            notifier: SystemdNotifier(socketPath: listener.address, watchdogTimeout: .milliseconds(400)),
            gate: WatchdogGate(heartbeats: [buffer]), controlSocket: controlPath, snapshot: snapshot, logger: logger)
        let control = ControlServer(path: controlPath, logger: logger) { _ in Array("{\"ok\":true}\n".utf8) }
        let serving = Task { try await control.run() }
        let supervising = Task { try await supervisor.run() }
        let beating = Mutex(true)
        let loop = Self.beating(buffer, every: .milliseconds(100)) { beating.withLock { $0 } }
        defer {
            supervising.cancel()
            serving.cancel()
            loop.cancel()
        }
        #expect(await eventually(timeout: .seconds(10)) { !listener.messages(with: "READY=1").isEmpty })
        #expect(listener.statusLines.first?.contains("the buffer does not answer for its figures") == true, "\(listener.statusLines)")
        // The pings go on while the buffer's loop beats, whatever its figures do.
        #expect(await eventually(timeout: .seconds(10)) { listener.messages(with: "WATCHDOG=1").count >= 5 })
        beating.withLock { $0 = false }
        #expect(
            await eventually(timeout: .seconds(15)) { listener.statusLines.last?.hasPrefix("STUCK: buffer, the buffer does not answer") == true },
            "\(listener.statusLines)")
        // One snapshot is asked at a time: the first never came back, so no other was asked.
        #expect(asked.withLock { $0 } == 1)
    }
    // A tester, 2026-12-07: `farmgate status` asks the agent, whose answer waited for the stuck buffer's figures
    // past the CLI's 10 s, so all it said was that the agent did not answer.
    @Test("The control socket's status answer names a buffer that does not give its figures in time")
    func statusAnswerOfAStuckBuffer() async throws {
        let stuck = WedgedDriver()
        defer { stuck.release() }
        let started = ContinuousClock.now
        let answer = await AgentRuntime.statusAnswer({
            _ = try? await stuck.read()
            throw CancellationError()
        }, timeout: .milliseconds(300))
        #expect(ContinuousClock.now - started < .seconds(3))
        #expect(!answer.ok)
        #expect(answer.error?.hasPrefix("the buffer does not answer for its figures within 0.3 seconds: its disk may be stuck") == true, "\(answer.error ?? "")")
        let fine = await AgentRuntime.statusAnswer({ Self.status(pending: 7) }, timeout: .milliseconds(300))
        #expect(fine.ok && fine.status?.buffer.pending == 7)
    }

    // A tester, 2026-12-07: a NOTIFY_SOCKET nobody listens on was warned about at every ping, and "Told systemd the
    // agent is ready" was logged although READY=1 never got there.
    @Test("A notify socket nobody listens on is warned about once, and no readiness is claimed")
    func unreachableNotifySocket() async throws {
        let dir = try Scratch(prefix: "fg-wdn", in: URL(fileURLWithPath: "/tmp"))
        let log = RecordedLog()
        let logger = log.logger()
        let controlPath = dir.file("control.sock")
        let buffer = Heartbeat(component: "buffer")
        let snapshot: @Sendable () async throws -> AgentStatus = { Self.status(pending: 0) }
        let supervisor = AgentSupervisor(
            notifier: SystemdNotifier(socketPath: dir.file("nobody-listens.sock"), watchdogTimeout: .milliseconds(200)),
            gate: WatchdogGate(heartbeats: [buffer]), controlSocket: controlPath, snapshot: snapshot, logger: logger)
        let control = ControlServer(path: controlPath, logger: logger) { _ in Array("{\"ok\":true}\n".utf8) }
        let serving = Task { try await control.run() }
        let supervising = Task { try await supervisor.run() }
        let loop = Self.beating(buffer, every: .milliseconds(50))
        defer {
            supervising.cancel()
            serving.cancel()
            loop.cancel()
        }
        // Ten pings' worth of time (every 100 ms).
        #expect(await eventually(timeout: .seconds(10)) { log.entries.contains { $0.message.hasPrefix("Cannot notify systemd") } })
        try await Task.sleep(for: .seconds(1))
        #expect(log.entries.filter { $0.message.hasPrefix("Cannot notify systemd") }.count == 1, "\(log.entries.map(\.message))")
        #expect(!log.entries.contains { $0.message.hasPrefix("Told systemd the agent is ready") })
    }
}
