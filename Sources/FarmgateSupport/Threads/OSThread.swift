import CLinux
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Starts a detached POSIX thread named `name` (as `top -H` and `/proc/PID/task/*/comm` show it; at most 15 bytes are
/// kept) with a stack of `stackSize` bytes, running `body` once. Foundation's `Thread` without Foundation.
/// Returns false when the system refuses a thread (EAGAIN under a tight `TasksMax=`).
@discardableResult
public func startOSThread(name: String, stackSize: Int = 1 << 20, _ body: @escaping @Sendable () -> Void) -> Bool {
    final class Start {
        let name: String
        let body: @Sendable () -> Void
        init(name: String, body: @escaping @Sendable () -> Void) { self.name = name; self.body = body }
    }
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    defer { pthread_attr_destroy(&attributes) }
    pthread_attr_setstacksize(&attributes, max(stackSize, Int(PTHREAD_STACK_MIN)))
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    let start = Unmanaged.passRetained(Start(name: name, body: body)).toOpaque()
    var thread = pthread_t()
    let result = pthread_create(&thread, &attributes, { context in
        guard let context else { return nil }
        let start = Unmanaged<Start>.fromOpaque(context).takeRetainedValue()
        _ = fg_set_thread_name(start.name)
        start.body()
        return nil
    }, start)
    if result != 0 {
        Unmanaged<Start>.fromOpaque(start).release()
        return false
    }
    return true
}

/// Blocks the calling thread for `duration` (never call it on the Swift concurrency pool). Foundation's
/// `Thread.sleep(forTimeInterval:)` without Foundation; resumes after signals until the time has passed.
public func sleepBlocking(_ duration: Duration) {
    guard duration > .zero else { return }
    let (seconds, attoseconds) = duration.components
    var request = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0, errno == EINTR { request = remaining }
}
