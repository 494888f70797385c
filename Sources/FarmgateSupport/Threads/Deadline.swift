import Synchronization

/// Runs `body` in a task of its own and waits for it at most `timeout` (or until the caller is cancelled, then at most
/// `graceOnCancel` more, never past `timeout`); nil when it did not finish in time.
///
/// The body is not cancelled: it runs on and its result is dropped. This is how a caller leaves a blocking call that
/// cannot be given a deadline of its own (a sysfs read on a stuck 1-Wire bus, a driver deaf to cancellation) without
/// being held by it: one stuck sensor never holds its sampling loop or the agent's shutdown. A grace lets a stopping
/// caller keep the result of a call that was about to finish (a sensor read in flight when the agent is stopped, whose
/// side effects, such as a stored pulse count, already happened).
public func withDeadline<T: Sendable>(
    _ timeout: Duration, graceOnCancel grace: Duration = .zero, _ body: @escaping @Sendable () async -> T
) async -> T? {
    let shot = OnceContinuation<T?>()
    // Nothing here throws: every racer resumes with a value (nil for the deadline and for cancellation).
    let result = try? await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T?, any Error>) in
            shot.install(continuation)
            // The shared timer, not a task sleeping beside the body: a deadline that does not expire (nearly all of
            // them) then costs no task and no wake-up of anyone (see SharedTimer).
            let timer = SharedTimer.shared.schedule(after: timeout) { shot.resume(with: .success(nil)) }
            shot.onResume { SharedTimer.shared.cancel(timer) }
            Task { shot.resume(with: .success(await body())) }
        }
    } onCancel: {
        guard grace > .zero else { return shot.resume(with: .success(nil)) }
        let timer = SharedTimer.shared.schedule(after: grace) { shot.resume(with: .success(nil)) }
        shot.onResume { SharedTimer.shared.cancel(timer) }
    }
    return result ?? nil
}
