import FarmgateSupport
import FarmgateTestSupport
import Synchronization
import Testing

@Suite("Shared timer")
struct SharedTimerTests {
    /// Records when each action ran.
    final class Firings: Sendable {
        let fired = Mutex<[(Int, ContinuousClock.Instant)]>([])
        func record(_ index: Int) { fired.withLock { $0.append((index, .now)) } }
        var order: [Int] { fired.withLock { $0.map(\.0) } }
        func time(of index: Int) -> ContinuousClock.Instant? { fired.withLock { $0.first { $0.0 == index }?.1 } }
    }

    @Test("actions run at or after their deadline, in deadline order; cancelled ones never run")
    func order() async throws {
        let timer = SharedTimer(name: "test-timer")
        let firings = Firings()
        let start = ContinuousClock.now
        let offsets = [300, 100, 200, 100, 400]
        var tokens: [SharedTimer.Token] = []
        for (index, milliseconds) in offsets.enumerated() {
            tokens.append(timer.schedule(at: start + .milliseconds(milliseconds)) { firings.record(index) })
        }
        timer.cancel(tokens[4])
        #expect(await eventually(timeout: .seconds(30)) { firings.order.count == 4 })
        // Equal deadlines keep the order they were scheduled in.
        #expect(firings.order == [1, 3, 2, 0])
        for (index, milliseconds) in offsets.enumerated().dropLast() {
            let time = try #require(firings.time(of: index))
            #expect(time - start >= .milliseconds(milliseconds), "action \(index) ran \(time - start) after the start")
        }
        try await Task.sleep(for: .milliseconds(300))
        #expect(firings.order.count == 4, "the cancelled action ran")
        #expect(timer.pending == 0)
    }

    @Test("an earlier deadline scheduled while the thread waits for a later one wakes it; a past one runs at once")
    func earlierDeadlineWakesTheThread() async throws {
        let timer = SharedTimer(name: "test-timer")
        let firings = Firings()
        let start = ContinuousClock.now
        timer.schedule(at: start + .seconds(60)) { firings.record(0) }
        try await Task.sleep(for: .milliseconds(50))  // the thread now waits for the minute
        timer.schedule(at: start + .milliseconds(100)) { firings.record(1) }
        #expect(await eventually(timeout: .seconds(30)) { firings.order == [1] }, "the thread slept through an earlier deadline")
        timer.schedule(at: start - .seconds(1)) { firings.record(2) }
        #expect(await eventually(timeout: .seconds(30)) { firings.order == [1, 2] })
        #expect(timer.pending == 1)
    }

    @Test("sleep(until:) returns at the deadline, and throws CancellationError as soon as the task is cancelled")
    func sleepAndCancellation() async throws {
        let timer = SharedTimer(name: "test-timer")
        let start = ContinuousClock.now
        try await timer.sleep(until: start + .milliseconds(150))
        #expect(ContinuousClock.now - start >= .milliseconds(150))
        try await timer.sleep(until: start)  // a past instant returns at once

        let sleeper = Task { try await timer.sleep(for: .seconds(60)) }
        try await Task.sleep(for: .milliseconds(50))
        let cancelled = ContinuousClock.now
        sleeper.cancel()
        await #expect(throws: CancellationError.self) { try await sleeper.value }
        #expect(ContinuousClock.now - cancelled < .seconds(5))
        // The cancelled sleep left nothing behind, and an already-cancelled task does not sleep at all.
        #expect(await eventually(timeout: .seconds(30)) { timer.pending == 0 })
        let early = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            try await timer.sleep(for: .seconds(60))
        }
        await #expect(throws: CancellationError.self) { try await early.value }
    }

    @Test("many sleepers on one instant all wake, from the shared timer, and deadlines still expire through it")
    func manySleepersAndDeadlines() async throws {
        let deadline = ContinuousClock.now + .milliseconds(200)
        let woke = await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<50 {
                group.addTask {
                    (try? await SharedTimer.shared.sleep(until: deadline)) != nil && ContinuousClock.now >= deadline
                }
            }
            return await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        #expect(woke == 50)
        // withDeadline runs on it: a body that finishes first wins, one that does not is abandoned at the deadline.
        #expect(await withDeadline(.seconds(5)) { 7 } == 7)
        let started = ContinuousClock.now
        let abandoned: Int? = await withDeadline(.milliseconds(100)) {
            try? await Task.sleep(for: .seconds(30))
            return 1
        }
        #expect(abandoned == nil)
        #expect(ContinuousClock.now - started < .seconds(10))
    }
}
