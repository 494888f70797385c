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
