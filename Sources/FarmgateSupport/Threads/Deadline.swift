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
            // The shared timer, not a task sleeping beside the body: a deadline that does not expire (nearly all of
            // them) then costs no task and no wake-up of anyone (see SharedTimer).
            let timer = SharedTimer.shared.schedule(after: timeout) { shot.resume(nil) }
            Task {
                let value = await body()
                SharedTimer.shared.cancel(timer)
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
