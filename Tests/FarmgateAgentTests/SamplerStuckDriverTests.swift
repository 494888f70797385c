@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import ServiceLifecycle
import Synchronization
import Testing

/// A driver whose read blocks its thread forever (a serial read without a deadline, a hung sysfs file): the read never
/// returns, and `close`, queued behind it on the same thread, never runs either.
final class ThreadStuckDriver: SensorDriver {
    let thread = DedicatedThread(name: "stuck-driver")
    let release = DispatchSemaphore(value: 0)
    let started = Mutex(0)

    func read() async throws(SensorError) -> SensorValue {
        started.withLock { $0 += 1 }
        let release = self.release
        _ = try? await thread.run { release.wait() }
        throw SensorError(.fault, "released")
    }

    func close() async {
        _ = try? await thread.run {}
    }

    /// Lets the blocked thread finish (at the end of a test).
    func unblock() {
        for _ in 0..<8 { release.signal() }
        thread.shutdown()
    }
}

/// A driver whose read awaits something that never comes and ignores cancellation.
final class CancellationDeafDriver: SensorDriver {
    private let waiting = Mutex<[CheckedContinuation<Void, Never>]>([])
    let started = Mutex(0)

    func read() async throws(SensorError) -> SensorValue {
        started.withLock { $0 += 1 }
        await withCheckedContinuation { continuation in waiting.withLock { $0.append(continuation) } }
        return SensorValue(1)
    }

    func unblock() {
        for continuation in waiting.withLock({ $0 }) { continuation.resume() }
        waiting.withLock { $0.removeAll() }
    }
}

@Suite("Sampler with stuck drivers", .serialized)
struct SamplerStuckDriverTests {
    @Test("A read blocked on a thread or deaf to cancellation is abandoned: others keep their schedule, no pile-up, prompt shutdown")
    func stuckDrivers() async throws {
        let good = try sensorConfiguration("tank1.ph", quantity: .ph, interval: "100ms")
        let blocked = try sensorConfiguration("tank1.ec", quantity: .electricalConductivity, interval: "100ms")
        let deaf = try sensorConfiguration("tank1.temp", quantity: .temperature, interval: "100ms")
        let stuck = ThreadStuckDriver()
        let deafDriver = CancellationDeafDriver()
        defer {
            stuck.unblock()
            deafDriver.unblock()
        }
        let sink = CollectingSink()
        let board = SensorStatusBoard(sensors: [good, blocked, deaf])
        let logger = Logger(label: "test")
        let sampler = Sampler(
            sensors: [
                .init(configuration: good, driver: try SimulatedDriver(configuration: good, logger: logger)),
                .init(configuration: blocked, driver: stuck),
                .init(configuration: deaf, driver: deafDriver),
            ],
            sink: sink, board: board, clock: WallClock(checkSynchronization: false), closeTimeout: .seconds(1), logger: logger)
        let group = ServiceGroup(services: [sampler], logger: logger)
        let running = Task { try await group.run() }

        // The stuck reads time out after 5 s (the minimum) and show as timeouts; the good sensor never stops.
        let timedOut = await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
            let statuses = board.snapshot()
            return statuses[1].lastError?.hasPrefix("timeout") == true && statuses[2].lastError?.hasPrefix("timeout") == true
        }
        #expect(timedOut, "\(board.snapshot().map { $0.lastError ?? "-" })")
        let before = sink.samples.withLock { $0.filter { $0.sensor == good.id }.count }
        try await Task.sleep(for: .seconds(2))
        let after = sink.samples.withLock { $0.filter { $0.sensor == good.id }.count }
        // 20 ticks in 2 s; allow for a loaded machine.
        #expect(after - before >= 10, "the good sensor read \(after - before) times in 2 s beside the stuck ones")
        // Later reads of the stuck sensors are refused while the first still runs: one blocked read each, never more.
        #expect(stuck.started.withLock { $0 } == 1)
        #expect(deafDriver.started.withLock { $0 } == 1)
        let statuses = board.snapshot()
        #expect(statuses[1].lastError?.contains("has not finished") == true, "\(statuses[1].lastError ?? "-")")
        #expect(statuses[1].consecutiveErrors >= 10, "refused reads are reported at the sensor's schedule")

        // Graceful shutdown does not wait for the stuck reads (nor for the stuck driver's close) beyond its bound.
        let stopping = ContinuousClock.now
        await group.triggerGracefulShutdown()
        try await running.value
        let took = ContinuousClock.now - stopping
        #expect(took < .seconds(3), "shutdown took \(took)")
    }

    @Test("Sampler.read: a timed-out read leaves the gate closed until it ends, then the sensor reads again")
    func gateReopens() async throws {
        let deafDriver = CancellationDeafDriver()
        let gate = ReadGate()
        let first = await Sampler.read(deafDriver, timeout: .milliseconds(200), gate: gate)
        #expect(first.failureKind == .timeout)
        let refused = await Sampler.read(deafDriver, timeout: .milliseconds(200), gate: gate)
        guard case .failure(let error) = refused else {
            Issue.record("a second read started while the first was stuck")
            return
        }
        #expect(error.message.contains("has not finished"))
        #expect(deafDriver.started.withLock { $0 } == 1)
        deafDriver.unblock()
        let reopened = await eventually(timeout: .seconds(5)) { !gate.isBusy }
        #expect(reopened)
        // The abandoned read's late value was dropped; the next read starts (and gets stuck again, as this driver does).
        let second = Task { await Sampler.read(deafDriver, timeout: .seconds(5), gate: gate) }
        let restarted = await eventually(timeout: .seconds(5)) { deafDriver.started.withLock { $0 } == 2 }
        #expect(restarted)
        deafDriver.unblock()
        let value = await second.value
        #expect((try? value.get())?.value == 1)
    }

    // Found by a black-box tester: a read that never ends fails its sensor for good; the message must say a restart is
    // what clears it once the read is stuck for much longer than its timeout.
    @Test("Sampler.read: a read stuck for over 10 × its timeout says that only restarting the agent clears it")
    func stuckForGoodSaysRestart() async throws {
        let deafDriver = CancellationDeafDriver()
        let gate = ReadGate()
        #expect(await Sampler.read(deafDriver, timeout: .milliseconds(100), gate: gate).failureKind == .timeout)
        guard case .failure(let early) = await Sampler.read(deafDriver, timeout: .milliseconds(100), gate: gate) else {
            Issue.record("a second read started while the first was stuck")
            return
        }
        #expect(early.message.contains("has not finished") && !early.message.contains("systemctl restart"), "\(early.message)")
        try await Task.sleep(for: .milliseconds(1_000))
        guard case .failure(let late) = await Sampler.read(deafDriver, timeout: .milliseconds(100), gate: gate) else {
            Issue.record("a read started while the first was stuck")
            return
        }
        #expect(late.kind == .timeout)
        #expect(late.message.contains("only restarting the agent (systemctl restart farmgate) clears this"), "\(late.message)")
        deafDriver.unblock()
        #expect(await eventually(timeout: .seconds(5)) { !gate.isBusy })
    }

    @Test("A result that comes before the deadline is never mistaken for a timeout (the timer's cancellation is no deadline)")
    func resultBeatsTimer() async {
        var timeouts = 0
        for index in 0..<500 {
            if await withDeadline(.seconds(30), { index }) != index { timeouts += 1 }
        }
        #expect(timeouts == 0)
    }

    @Test("A cancelled caller gets its answer at once while the driver's read runs on")
    func cancellation() async throws {
        let stuck = ThreadStuckDriver()
        defer { stuck.unblock() }
        let task = Task { await Sampler.read(stuck, timeout: .seconds(60)) }
        _ = await eventually(timeout: .seconds(5)) { stuck.started.withLock { $0 } == 1 }
        let start = ContinuousClock.now
        task.cancel()
        let outcome = await task.value
        #expect(ContinuousClock.now - start < .seconds(2))
        #expect(outcome.failureKind == .timeout)
    }
}

extension Result where Failure == SensorError {
    var failureKind: SensorError.Kind? {
        if case .failure(let error) = self { return error.kind }
        return nil
    }
}
