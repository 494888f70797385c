import FarmgateSupport
import Synchronization

extension DedicatedThread {
    /// Runs `body` on this thread and waits at most `timeout` for its result; nil when the time ran out (or the caller
    /// was cancelled).
    ///
    /// A blocking call that hangs (a sysfs read on a stuck 1-Wire bus cannot be given a deadline of its own) is left to
    /// finish on the thread while the caller moves on, so that one stuck sensor never holds its sampling loop or the
    /// agent's shutdown. Jobs queued behind it wait; callers should not queue more while one is stuck.
    func run<T: Sendable>(timeout: Duration, _ body: @escaping @Sendable () -> T) async -> T? {
        let shot = OneShot<T>()
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<T?, Never>) in
                shot.install(continuation)
                let timer = Task {
                    // Cancelled: the result came first (resuming with nil here would turn it into a timeout).
                    do { try await Task.sleep(for: timeout) } catch { return }
                    shot.resume(nil)
                }
                Task {
                    let value = try? await self.run(body)
                    timer.cancel()
                    shot.resume(value)
                }
            }
        } onCancel: {
            shot.resume(nil)
        }
    }
}

/// A continuation resumed by whichever comes first: the result, the deadline or cancellation.
private final class OneShot<T: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<T?, Never>?
        var early: T??
    }
    private let state = Mutex(State())

    func install(_ continuation: CheckedContinuation<T?, Never>) {
        let early = state.withLock { state -> T?? in
            if let early = state.early { return early }
            state.continuation = continuation
            return nil
        }
        if let early { continuation.resume(returning: early) }
    }

    func resume(_ value: T?) {
        let continuation = state.withLock { state -> CheckedContinuation<T?, Never>? in
            if state.early != nil { return nil }
            state.early = .some(value)
            defer { state.continuation = nil }
            return state.continuation
        }
        continuation?.resume(returning: value)
    }
}
