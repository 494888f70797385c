#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Synchronization

/// A thread of its own for blocking C calls (`sqlite3_step`, `curl_easy_perform`, `read(2)` on a serial port), so that they
/// never occupy the Swift concurrency pool.
///
/// Jobs run one at a time, in the order they were submitted. The thread ends when the object is released or
/// ``shutdown()`` is called, after finishing the jobs already queued.
public final class DedicatedThread: Sendable {
    private let queue: JobQueue
    public let name: String

    public init(name: String) {
        self.name = name
        let queue = JobQueue()
        self.queue = queue
        let started = startOSThread(name: name, stackSize: 1 << 20) {
            while let job = queue.next() { job() }
        }
        // Without a thread no job can run: refuse them at once rather than let callers wait forever.
        if !started { queue.close() }
    }

    deinit {
        queue.close()
    }

    /// Runs `body` on this thread and returns its result to the awaiting task.
    public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            let accepted = queue.submit {
                continuation.resume(with: Result { try body() })
            }
            if !accepted { continuation.resume(throwing: DedicatedThreadError.shutDown(name)) }
        }
    }

    /// Runs `body` on this thread and blocks the caller until it finishes. For synchronous callers outside the
    /// concurrency pool (command-line tools, `deinit`); never call it from the thread itself.
    public func runBlocking<T>(_ body: @escaping @Sendable () throws -> T) throws -> T {
        let done = DispatchSemaphore(value: 0)
        let slot = ResultSlot<T>()
        let accepted = queue.submit {
            slot.value = Result { try body() }
            done.signal()
        }
        guard accepted else { throw DedicatedThreadError.shutDown(name) }
        done.wait()
        guard let outcome = slot.value else { throw DedicatedThreadError.shutDown(name) }
        return try outcome.get()
    }

    /// Stops accepting jobs; the thread ends once the queued ones have run.
    public func shutdown() {
        queue.close()
    }
}

public enum DedicatedThreadError: Error, CustomStringConvertible {
    case shutDown(String)
    public var description: String {
        switch self {
        case .shutDown(let name): "the \(name) thread has shut down"
        }
    }
}

/// Carries the result of a blocking job back to the caller, which waits on a semaphore until it is set.
private final class ResultSlot<T>: @unchecked Sendable {
    // @unchecked: written once on the worker before `signal()`, read once by the caller after `wait()`;
    // the semaphore orders the two accesses.
    var value: Result<T, any Error>?
}

private final class JobQueue: Sendable {
    private struct State {
        var jobs: [@Sendable () -> Void] = []
        var head = 0
        var closed = false
    }
    private let state = Mutex(State())
    private let available = DispatchSemaphore(value: 0)

    func submit(_ job: @escaping @Sendable () -> Void) -> Bool {
        let accepted = state.withLock { state -> Bool in
            guard !state.closed else { return false }
            state.jobs.append(job)
            return true
        }
        if accepted { available.signal() }
        return accepted
    }

    func close() {
        state.withLock { $0.closed = true }
        available.signal()
    }

    /// The next job, or nil once the queue is closed and drained. Blocks while there is none.
    func next() -> (@Sendable () -> Void)? {
        while true {
            available.wait()
            let job = state.withLock { state -> (@Sendable () -> Void)?? in
                if state.head < state.jobs.count {
                    let job = state.jobs[state.head]
                    state.head += 1
                    if state.head > 64, state.head * 2 > state.jobs.count {
                        state.jobs.removeFirst(state.head)
                        state.head = 0
                    }
                    return .some(job)
                }
                return state.closed ? .some(nil) : nil
            }
            switch job {
            case .some(.some(let job)): return job
            case .some(.none):
                available.signal()  // let any other waiter see the close too
                return nil
            case .none: continue
            }
        }
    }
}

/// A value that lives on one ``DedicatedThread`` and is only ever touched there: an `SQLiteConnection`, a `CURL*`.
///
/// The value is created on the thread and released on the thread. Callers reach it with ``withValue(_:)`` from async code,
/// or ``withValueBlocking(_:)`` from synchronous code.
public final class ThreadOwned<Value>: Sendable {
    private let thread: DedicatedThread
    private let box: Box

    // @unchecked: `value` is read and written only by jobs running on `thread`, which run one at a time.
    private final class Box: @unchecked Sendable {
        var value: Value?
    }

    /// Creates the value on a new thread named `name`.
    public init(name: String, make: @escaping @Sendable () throws -> Value) throws {
        let thread = DedicatedThread(name: name)
        let box = Box()
        self.thread = thread
        self.box = box
        try thread.runBlocking { box.value = try make() }
    }

    deinit { close() }

    /// Runs `body` with the value, on its thread.
    public func withValue<T: Sendable>(_ body: @escaping @Sendable (Value) throws -> T) async throws -> T {
        let box = self.box
        let name = thread.name
        return try await thread.run {
            guard let value = box.value else { throw DedicatedThreadError.shutDown(name) }
            return try body(value)
        }
    }

    /// Runs `body` with the value, on its thread, blocking the caller.
    public func withValueBlocking<T>(_ body: @escaping @Sendable (Value) throws -> T) throws -> T {
        let box = self.box
        let name = thread.name
        return try thread.runBlocking {
            guard let value = box.value else { throw DedicatedThreadError.shutDown(name) }
            return try body(value)
        }
    }

    /// Releases the value on its thread (closing a database checkpoints and can take a while) without blocking the
    /// caller, then stops the thread. Later calls throw ``DedicatedThreadError/shutDown(_:)``.
    public func release() async {
        let box = self.box
        _ = try? await thread.run { box.value = nil }
        thread.shutdown()
    }

    /// Releases the value on its thread and stops the thread, blocking the caller. Later calls throw.
    public func close() {
        let box = self.box
        _ = try? thread.runBlocking { box.value = nil }
        thread.shutdown()
    }
}

/// Runs `body` on a thread of its own and awaits its result: for one-off blocking work (opening and checking a database,
/// waiting for a child process) that must not occupy one of the Swift concurrency pool's few threads.
public func runOffPool<T: Sendable>(name: String = "farmgate-blocking", _ body: @escaping @Sendable () throws -> T) async throws -> T {
    let thread = DedicatedThread(name: name)
    defer { thread.shutdown() }
    return try await thread.run(body)
}
