import Synchronization

/// A throwing continuation resumed once, by whichever of several racers comes first (a result, a deadline, the
/// caller's cancellation); the others are dropped. A resume that comes before ``install(_:)`` is kept and delivered
/// there. Cleanups registered with ``onResume(_:)`` (cancel the losing timer or task) run once it is resumed.
public final class OnceContinuation<Value: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<Value, any Error>?
        var result: Result<Value, any Error>?
        var cleanups: [@Sendable () -> Void] = []
    }
    private let state = Mutex(State())

    public init() {}

    /// Installs the continuation; resumes it at once when a result came first.
    public func install(_ continuation: CheckedContinuation<Value, any Error>) {
        let early = state.withLock { state -> Result<Value, any Error>? in
            if let result = state.result { return result }
            state.continuation = continuation
            return nil
        }
        if let early { continuation.resume(with: early) }
    }

    /// Runs `cleanup` once the continuation is resumed (at once if it already was).
    public func onResume(_ cleanup: @escaping @Sendable () -> Void) {
        let resumed = state.withLock { state -> Bool in
            if state.result != nil { return true }
            state.cleanups.append(cleanup)
            return false
        }
        if resumed { cleanup() }
    }

    /// The first result wins; later ones are dropped.
    public func resume(with result: Result<Value, any Error>) {
        let (continuation, cleanups) = state.withLock { state -> (CheckedContinuation<Value, any Error>?, [@Sendable () -> Void]) in
            guard state.result == nil else { return (nil, []) }
            state.result = result
            defer {
                state.continuation = nil
                state.cleanups = []
            }
            return (state.continuation, state.cleanups)
        }
        for cleanup in cleanups { cleanup() }
        continuation?.resume(with: result)
    }
}

/// Runs each of `bodies` in an unstructured task of its own and returns (or throws) as soon as the first of them ends,
/// with its outcome; the others are then cancelled and not waited for. A task group waits for every child, so one child
/// that never notices its cancellation (a query on a connection a database restart left silent) would hold it for
/// ever; here it is left behind, cancelled. Cancelling the caller answers it at once with `CancellationError`.
public func firstToEnd(_ bodies: [@Sendable () async throws -> Void]) async throws {
    let answer = OnceContinuation<Void>()
    try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            answer.install(continuation)
            let running = bodies.map { body in
                Task {
                    do {
                        try await body()
                        answer.resume(with: .success(()))
                    } catch {
                        answer.resume(with: .failure(error))
                    }
                }
            }
            answer.onResume { for task in running { task.cancel() } }
        }
    } onCancel: {
        answer.resume(with: .failure(CancellationError()))
    }
}
