import FarmgateSupport

#if canImport(Glibc)
    import Glibc
#endif

/// Space held on the buffer's file system for the deletes that free space: `<buffer path>.reserve`, a file of
/// ``size(fileSystemBytes:)`` bytes (2 MiB on any file system of 16 MiB or more).
///
/// On a disk that something filled (the buffer itself during a long outage, a log, another program), SQLite cannot
/// delete either: a delete writes the pages it changes to the WAL first, and the WAL cannot grow. Without the reserve
/// the agent could then never delete the readings the ingest acknowledged, so it could never make room, and the same
/// batches went up again at every backoff for ever. When an acknowledgement's (or `drop_oldest`'s) delete fails with
/// `SQLITE_FULL` the buffer removes this file and tries once more: the delete fits in the space it gave back, and the
/// pages it frees take the next commits. Commits never use it (they wait, as documented, or drop by the policy).
/// The file is made again, at most once a minute, when the file system has room for it twice over.
///
/// Runs on the buffer's thread (blocking calls: `statvfs`, `posix_fallocate`).
struct BufferReserve {
    let path: String
    /// Whether the file is in place.
    private(set) var held: Bool
    private var lastAttempt: ContinuousClock.Instant?

    /// The most the reserve holds: room for a checkpoint of a full WAL (`wal_autocheckpoint` 1,000 frames of 1 KiB
    /// pages) and a delete.
    static let largest: Int64 = 2 << 20
    /// How often making it again is tried while it is missing.
    static let retryInterval: Duration = .seconds(60)

    init(bufferPath: String) {
        path = bufferPath + ".reserve"
        held = access(path, F_OK) == 0
    }

    /// 2 MiB, or an eighth of a small file system (at least 64 KiB).
    static func size(fileSystemBytes total: Int64) -> Int64 {
        min(largest, max(64 << 10, total / 8))
    }

    /// Makes the file when it is missing and the file system has room for it twice over; at most once per
    /// ``retryInterval`` unless `force`. Failures leave no file and are tried again later.
    mutating func ensure(force: Bool = false, now: ContinuousClock.Instant = .now) {
        guard !held else { return }
        if !force, let lastAttempt, lastAttempt.duration(to: now) < Self.retryInterval { return }
        lastAttempt = now
        var fs = statvfs()
        guard statvfs(directory, &fs) == 0 else { return }
        let unit = Int64(fs.f_frsize)
        let size = Self.size(fileSystemBytes: Int64(fs.f_blocks) * unit)
        guard Int64(fs.f_bavail) * unit >= 2 * size else { return }
        let fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC | O_TRUNC, 0o600)
        guard fd >= 0 else { return }
        defer { close(fd) }
        // Allocated without writing where the file system can (ext4, tmpfs): no wear on the SD card.
        var status = posix_fallocate(fd, 0, off_t(size))
        if status == EOPNOTSUPP || status == EINVAL {
            status = 0
            let zeros = [UInt8](repeating: 0, count: 64 << 10)
            var written: Int64 = 0
            while written < size {
                let n = zeros.withUnsafeBytes { write(fd, $0.baseAddress, Int(min(Int64(zeros.count), size - written))) }
                guard n > 0 else {
                    status = errno
                    break
                }
                written += Int64(n)
            }
        }
        if status == 0 {
            held = true
        } else {
            unlink(path)
        }
    }

    /// Whether the file system keeps the reserve's room free after `growth` more bytes, and has room for `transient`
    /// bytes more (WAL frames a checkpoint gives back for reuse). Always true while the reserve is held: then it is the
    /// room. While it is not (given back on a full disk, or never made for want of space), commits keep its room free
    /// (``BufferStore``): it is for the writes that make room, an acknowledgement's delete and the small write before a
    /// request leaves, and a commit that took it held every upload while the ingest was reachable.
    func leavesRoom(growth: Int64, transient: Int64) -> Bool {
        guard !held else { return true }
        var fs = statvfs()
        guard statvfs(directory, &fs) == 0 else { return true }
        let unit = Int64(fs.f_frsize)
        let available = Int64(fs.f_bavail) * unit
        return available - growth >= Self.size(fileSystemBytes: Int64(fs.f_blocks) * unit) && available >= growth + transient
    }

    private var directory: String {
        let parent = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        return parent.isEmpty ? (path.hasPrefix("/") ? "/" : ".") : parent
    }

    /// Removes the file; the bytes it gave back, or nil when it was not there.
    mutating func release() -> Int64? {
        guard held else { return nil }
        var info = stat()
        let size = stat(path, &info) == 0 ? Int64(info.st_size) : 0
        held = false
        lastAttempt = .now
        guard unlink(path) == 0 || errno == ENOENT else { return nil }
        return size
    }
}
