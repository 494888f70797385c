import Dispatch
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One read at a time per 1-Wire bus master, in the agent rather than in the kernel's queue.
///
/// A w1-therm read of a parasite-powered probe holds the kernel's bus lock for the whole conversion (750 ms at 12
/// bits), so reads of the probes on one bus queue in the kernel. Issued all at once, each waited there against its own
/// `read_timeout`: with eight probes the later ones timed out, stayed blocked in the kernel, and held the bus for the
/// next round too, so that almost no reading was stored. Here a read waits for its bus in the agent and its
/// `read_timeout` starts when it has the bus.
final class W1BusGate: Sendable {
    /// Held by the read that has the bus: a binary semaphore (taken on the reading sensor's own thread, given back
    /// when its blocking read returns, however long after its caller gave up).
    private let semaphore = DispatchSemaphore(value: 1)

    /// The read that has the bus: its probe, since when, and its `read_timeout`, so that a read waiting for the bus can
    /// name what holds it (after a reload, the old services' read stuck in the kernel holds it for the new ones).
    struct Holder: Sendable {
        var address: String
        var since: ContinuousClock.Instant
        var timeout: Duration
    }
    private let holder = Mutex<Holder?>(nil)

    /// Blocks the calling (dedicated) thread until the bus is free, and takes it for a read of `address`.
    func take(for address: String, timeout: Duration) {
        semaphore.wait()
        holder.withLock { $0 = Holder(address: address, since: .now, timeout: timeout) }
    }

    /// Gives the bus back.
    func give() {
        holder.withLock { $0 = nil }
        semaphore.signal()
    }

    /// What holds the bus now, in words for a read that waits for it: which probe's read, for how long, and, past 10 ×
    /// its `read_timeout`, that only a restart clears it. Empty when nothing holds it.
    func heldBy() -> String {
        guard let holder = holder.withLock({ $0 }) else { return "" }
        let elapsed = ContinuousClock.now - holder.since
        return "; a read of \(holder.address) has held the bus for \(Int(elapsed / .seconds(1))) s"
            + SensorError.stuckForGood(elapsed: elapsed, timeout: holder.timeout)
    }

    private static let gates = Mutex<[String: W1BusGate]>([:])

    /// The gate of the bus the device directory `directory` is on: the directory its sysfs link resolves into
    /// (`/sys/devices/w1_bus_master1`), else the directory that lists it (a tree without links: one bus).
    static func forDevice(_ directory: String, root: String) -> W1BusGate {
        let bus = Self.busDirectory(directory) ?? root
        return gates.withLock { gates in
            if let gate = gates[bus] { return gate }
            let gate = W1BusGate()
            gates[bus] = gate
            return gate
        }
    }

    /// The parent of `directory` after its links are resolved; nil when it does not resolve.
    static func busDirectory(_ directory: String) -> String? {
        guard let resolved = realpath(directory, nil) else { return nil }
        defer { free(resolved) }
        let path = String(cString: resolved)
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return nil }
        return String(path[..<slash])
    }
}
