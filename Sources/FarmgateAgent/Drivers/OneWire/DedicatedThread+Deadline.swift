import FarmgateSupport

extension DedicatedThread {
    /// Runs `body` on this thread and waits at most `timeout` for its result; nil when the time ran out (or the caller
    /// was cancelled).
    ///
    /// A blocking call that hangs (a sysfs read on a stuck 1-Wire bus cannot be given a deadline of its own) is left to
    /// finish on the thread while the caller moves on, so that one stuck sensor never holds its sampling loop or the
    /// agent's shutdown. Jobs queued behind it wait; callers should not queue more while one is stuck.
    func run<T: Sendable>(timeout: Duration, _ body: @escaping @Sendable () -> T) async -> T? {
        await withDeadline(timeout) { try? await self.run(body) } ?? nil
    }
}
