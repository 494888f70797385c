import Synchronization

/// Runs `body` in a task of its own and waits for it at most `timeout` (or until the caller is cancelled); nil when it
/// did not finish in time.
///
/// The body is not cancelled: it runs on and its result is dropped. This is how a caller leaves a blocking call that
/// cannot be given a deadline of its own (a sysfs read on a stuck 1-Wire bus, a driver deaf to cancellation) without
/// being held by it: one stuck sensor never holds its sampling loop or the agent's shutdown.
public func withDeadline<T: Sendable>(_ timeout: Duration, _ body: @escaping @Sendable () async -> T) async -> T? {
    let shot = FirstResult<T>()
    return await withTaskCancellationHandler {
        await withCheckedContinuation { (continuation: CheckedContinuation<T?, Never>) in
            shot.install(continuation)
            let timer = Task {
                // Cancelled: the body finished first (and resumes with its value); resuming with nil here would turn
                // that result into a timeout.
                do { try await Task.sleep(for: timeout) } catch { return }
                shot.resume(nil)
            }
            Task {
                let value = await body()
                timer.cancel()
                shot.resume(value)
            }
        }
    } onCancel: {
        shot.resume(nil)
    }
}

/// A continuation resumed once, by whichever comes first: a result, a deadline (nil) or cancellation (nil).
private final class FirstResult<T: Sendable>: Sendable {
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
