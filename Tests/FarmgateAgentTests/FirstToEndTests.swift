import FarmgateSupport
import Synchronization
import Testing

/// `firstToEnd` (the `latest` listener's following and probing): the first body to end decides, and a body that never
/// notices its cancellation (a query on a connection a database restart left silent) does not hold the caller.
@Suite("firstToEnd")
struct FirstToEndTests {
    struct Ended: Error, Equatable { var which: Int }

    @Test("the first body to end decides, with its error; a body that ignores cancellation is left behind, not waited for")
    func firstDecides() async throws {
        // A body that ends only when the test lets it (after the assertions), cancelled or not: what a task group would
        // wait for.
        let parked = Parked()
        let ignored = Mutex(false)
        // Should firstToEnd wait for it (a regression), the test ends anyway, failing below.
        let backstop = Task {
            try await Task.sleep(for: .seconds(120))
            parked.release()
        }
        await #expect(throws: Ended(which: 2)) {
            try await firstToEnd([
                {
                    await parked.wait()
                    ignored.withLock { $0 = true }
                },
                {
                    try await Task.sleep(for: .milliseconds(50))
                    throw Ended(which: 2)
                },
                {
                    try await Task.sleep(for: .seconds(60))
                    throw Ended(which: 3)
                },
            ])
        }
        #expect(!ignored.withLock { $0 }, "firstToEnd waited for the body that ignores cancellation")
        parked.release()
        backstop.cancel()
        // A body that ends first without an error: the caller returns.
        try await firstToEnd([{ try await Task.sleep(for: .seconds(60)) }, {}])
    }

    @Test("cancelling the caller answers it at once, whatever its bodies do")
    func cancellation() async throws {
        let parked = Parked()
        let task = Task {
            try await firstToEnd([{ await parked.wait() }])
        }
        try await Task.sleep(for: .milliseconds(50))
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        parked.release()
    }

    /// A wait that ignores cancellation and ends only at ``release()``.
    final class Parked: Sendable {
        private let state = Mutex<(continuation: CheckedContinuation<Void, Never>?, released: Bool)>((nil, false))

        func wait() async {
            await withCheckedContinuation { continuation in
                let now = state.withLock { state -> Bool in
                    if state.released { return true }
                    state.continuation = continuation
                    return false
                }
                if now { continuation.resume() }
            }
        }

        func release() {
            let continuation = state.withLock { state in
                state.released = true
                defer { state.continuation = nil }
                return state.continuation
            }
            continuation?.resume()
        }
    }
}
