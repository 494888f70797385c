import Synchronization

/// How many uploads each device has in flight (authenticated, body being read, decoded or stored), capped per device.
///
/// The token bucket bounds how often a device may post, not how many of its posts run at once: with a burst of 40, one
/// device key could hold 40 uploads open, each buffering up to `max_body_bytes` and its decompressed copies
/// (`max_decompressed_bytes`), about 1.6 GB at the defaults. The agent sends one batch at a time and waits for its
/// answer, so a cap of a few costs a well-behaved sender nothing and bounds what one key can make the ingest hold.
///
/// Memory: one entry per device with an upload in flight, removed when its last upload ends.
final class UploadsInFlight: Sendable {
    /// The most uploads one device may have in flight.
    let limit: Int
    private let counts = Mutex<[Int64: Int]>([:])

    init(limit: Int) {
        self.limit = max(1, limit)
    }

    /// Takes a slot for `device`; false when it already has ``limit`` uploads in flight. Every true must be followed by
    /// one ``leave(_:)``.
    func enter(_ device: Int64) -> Bool {
        let limit = self.limit
        return counts.withLock { counts in
            let current = counts[device, default: 0]
            guard current < limit else { return false }
            counts[device] = current + 1
            return true
        }
    }

    /// Gives back a slot taken by ``enter(_:)``.
    func leave(_ device: Int64) {
        counts.withLock { counts in
            let remaining = counts[device, default: 0] - 1
            counts[device] = remaining > 0 ? remaining : nil
        }
    }

    /// The device's uploads in flight (for tests).
    func count(_ device: Int64) -> Int {
        counts.withLock { $0[device, default: 0] }
    }
}
