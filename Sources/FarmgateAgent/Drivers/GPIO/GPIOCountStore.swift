import FarmgateSupport
import FarmgateWire
import Logging
import Synchronization

/// Keeps a GPIO count sensor's running count across restarts of the agent, in `<buffer path>.gpio-count.<sensor id>`.
///
/// The count a read returns is what the file held when the agent started plus the pulses counted since. Before a read
/// returns a count that differs from the stored one, the new count is written to the file (temporary file, fsync,
/// rename, fsync of the directory, as the buffer's sequence sidecar), so that the file is never behind a count the
/// buffer may have committed: after a restart the count never goes back. A graceful stop or a reload reads the sensor
/// once more and stores the count again when the driver closes (``GPIODriver/close()``), so it loses no pulse; a restarted
/// agent continues from there, and counts no pulse twice. What a power cut or `kill -9` costs is the
/// pulses counted after the last read (at most one `interval` of flow) and those while the agent is down; both are
/// missing from the count, which continues from the last value read. Renaming the sensor starts a new count at 0.
final class GPIOCountStore: Sendable {
    let path: String
    private let logger: Logger
    private let state = Mutex(State())

    private struct State {
        /// The count when the agent started, once the file was read.
        var base: Int64?
        var lastStored: Int64?
    }

    /// The file for `sensor` beside the buffer at `prefix`.
    static func path(prefix: String, sensor: SensorID) -> String {
        "\(prefix).gpio-count.\(sensor.rawValue)"
    }

    init(path: String, logger: Logger) {
        self.path = path
        self.logger = logger
    }

    /// The running count for `pulses` counted by this driver (since the services started); stores it first when it changed.
    func total(pulsesSinceStart pulses: UInt64) async throws(SensorError) -> Int64 {
        let known = state.withLock { $0 }
        let sidecar = SequenceSidecar(path: path)
        let base: Int64
        if let stored = known.base {
            base = stored
        } else {
            let content: SequenceSidecar.Content
            do { content = try await runOffPool { sidecar.read() } } catch {
                throw SensorError(.fault, "cannot read the stored count \(path): \(error)")
            }
            switch content {
            case .absent: base = 0
            case .value(let value): base = value
            case .unreadable(let reason):
                throw SensorError(
                    .fault,
                    "the stored count \(path) is unreadable (\(reason)); fix it to hold the last count (one number) or delete it to restart the count at 0")
            }
            state.withLock { $0.base = base; $0.lastStored = base }
            if base > 0 { logger.info("Continuing the running count", metadata: ["count": "\(base)", "file": "\(path)"]) }
        }
        let (total, overflow) = base.addingReportingOverflow(Int64(clamping: pulses))
        guard !overflow else { throw SensorError(.fault, "the running count overflowed; delete \(path) to restart it at 0") }
        guard state.withLock({ $0.lastStored }) != total else { return total }
        do {
            try await runOffPool { try sidecar.store(total) }
        } catch {
            throw SensorError(.fault, "cannot store the running count (\(error)); check the disk and the permissions of \(path)")
        }
        state.withLock { $0.lastStored = total }
        return total
    }
}

extension SequenceSidecar {
    /// A one-number file at `path` (the GPIO running count uses the sidecar's format and durable write).
    init(path: String) {
        self.path = path
    }
}
