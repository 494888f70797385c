import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Watches the block device that holds a directory and finds the stretches when it had requests in flight and completed
/// none: the disk, or the host behind a virtual one, not answering. Every `fdatasync` of a commit waits through such a
/// stretch, so all answers of that moment come late together.
///
/// Reads `/sys/dev/block/MAJOR:MINOR/stat` (reads and writes completed, requests in flight) every 10 ms on its own
/// thread. Prints nothing; `stop()` returns the stretches of at least `minimum`.
final class DiskStallSampler: Sendable {
    struct Stall {
        /// When the last request before the stretch completed.
        var start: ContinuousClock.Instant
        var duration: Duration
    }

    let device: String
    private let statPath: String
    private let minimum: Duration
    private let state = Mutex<(running: Bool, stalls: [Stall], finished: Bool)>((true, [], false))

    /// Nil when the directory's device has no statistics (tmpfs, overlay, a remote file system).
    init?(directory: String, minimum: Duration = .milliseconds(50)) {
        var info = stat()
        guard stat(directory, &info) == 0 else { return nil }
        let dev = UInt64(info.st_dev)
        // glibc's gnu_dev_major/gnu_dev_minor encoding.
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
        let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
        let path = "/sys/dev/block/\(major):\(minor)/stat"
        guard Self.read(path) != nil else { return nil }
        statPath = path
        self.minimum = minimum
        let name = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/sys/dev/block/\(major):\(minor)")).map { ($0 as NSString).lastPathComponent }
        device = name ?? "\(major):\(minor)"
    }

    /// (reads completed + writes completed, requests in flight), or nil.
    private static func read(_ path: String) -> (completed: UInt64, inFlight: UInt64)? {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
        let fields = text.split(separator: " ").compactMap { UInt64($0) }
        guard fields.count >= 9 else { return nil }
        return (fields[0] + fields[4], fields[8])
    }

    func start() {
        let thread = Thread { [self] in
            var lastCompleted = Self.read(statPath)?.completed ?? 0
            var lastChange = ContinuousClock.now
            var waiting = false
            while state.withLock({ $0.running }) {
                usleep(10_000)
                let now = ContinuousClock.now
                guard let sample = Self.read(statPath) else { continue }
                if sample.completed != lastCompleted {
                    // Something completed: a stretch that had requests waiting ends here.
                    if waiting, lastChange.duration(to: now) >= minimum {
                        let stall = Stall(start: lastChange, duration: lastChange.duration(to: now))
                        state.withLock { $0.stalls.append(stall) }
                    }
                    lastCompleted = sample.completed
                    lastChange = now
                    waiting = sample.inFlight > 0
                } else if sample.inFlight > 0 {
                    waiting = true
                } else {
                    // Idle, nothing waiting: not a stall.
                    waiting = false
                    lastChange = now
                }
            }
            // A stretch still open when sampling stops counts as far as it went.
            let end = ContinuousClock.now
            let open = waiting && lastChange.duration(to: end) >= minimum ? Stall(start: lastChange, duration: lastChange.duration(to: end)) : nil
            state.withLock { state in
                if let open { state.stalls.append(open) }
                state.finished = true
            }
        }
        thread.name = "bench-disk"
        thread.start()
    }

    /// Stops sampling and returns the stretches found.
    func stop() -> [Stall] {
        state.withLock { $0.running = false }
        while !state.withLock({ $0.finished }) { usleep(2_000) }
        return state.withLock { $0.stalls }
    }
}
