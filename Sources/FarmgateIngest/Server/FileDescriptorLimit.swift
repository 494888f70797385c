#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The process's limit on open file descriptors (`RLIMIT_NOFILE`), which bounds how many connections it can hold.
///
/// systemd starts services with a soft limit of 1024 and a much higher hard limit; a process may raise its own soft
/// limit up to the hard one (as nginx's `worker_rlimit_nofile` and Go's runtime do). Without that, a connection cap of
/// 4096 would be a promise the process cannot keep: accept would fail with EMFILE at about a thousand, and every
/// client, `/healthz` too, would stop being answered.
enum FileDescriptorLimit {
    /// Descriptors kept for what is not a connection: the listening socket, the store's database, WAL and shm files,
    /// standard streams, the event loops' epoll and event fds, and some slack.
    static let reserved = 128

    /// Raises the soft limit towards the hard limit so that `connections` plus ``reserved`` fit, and returns how many
    /// connections fit under the soft limit now in force (`connections` when they all do). Nil when the limit cannot
    /// be read.
    /// `RLIM_INFINITY` (all bits set; the C macro's `-1` does not import as an unsigned value).
    private static let infinity = rlim_t.max

    static func fit(connections: Int) -> Int? {
        var limit = rlimit()
        guard getrlimit(resourceNoFile, &limit) == 0 else { return nil }
        let wanted = rlim_t(connections + ConnectionLimits.refusalHeadroom + reserved)
        if limit.rlim_cur != infinity, limit.rlim_cur < wanted {
            var raised = limit
            raised.rlim_cur = limit.rlim_max == infinity ? wanted : min(wanted, limit.rlim_max)
            if setrlimit(resourceNoFile, &raised) == 0 { limit = raised }
        }
        if limit.rlim_cur == infinity || limit.rlim_cur >= wanted { return connections }
        return max(1, Int(limit.rlim_cur) - ConnectionLimits.refusalHeadroom - reserved)
    }

    #if canImport(Glibc)
    private static var resourceNoFile: __rlimit_resource_t { __rlimit_resource_t(UInt32(RLIMIT_NOFILE.rawValue)) }
    #else
    private static var resourceNoFile: Int32 { RLIMIT_NOFILE }
    #endif
}
