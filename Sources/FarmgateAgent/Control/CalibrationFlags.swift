import FarmgateWire
import Synchronization

/// Which sensors are being calibrated: the sampler flags their readings `calibrating` (a probe in a buffer solution
/// reads the solution, not the tank).
///
/// Each mark expires: a CLI that died mid-calibration (a closed laptop, a lost SSH session) leaves the flag on for at
/// most ``idleLimit`` after its last command, never for good.
public final class CalibrationFlags: Sendable {
    /// How long a calibration may sit without a command from the CLI before its flag lapses.
    public let idleLimit: Duration
    private let marks = Mutex<[SensorID: ContinuousClock.Instant]>([:])

    public init(idleLimit: Duration = .seconds(900)) {
        self.idleLimit = idleLimit
    }

    /// Marks `sensor` as being calibrated from now until ``idleLimit`` from now.
    public func mark(_ sensor: SensorID) {
        let until = ContinuousClock.now + idleLimit
        marks.withLock { $0[sensor] = until }
    }

    public func clear(_ sensor: SensorID) {
        _ = marks.withLock { $0.removeValue(forKey: sensor) }
    }

    /// Whether readings of `sensor` taken now carry `calibrating`.
    public func contains(_ sensor: SensorID) -> Bool {
        let now = ContinuousClock.now
        return marks.withLock { marks in
            guard let until = marks[sensor] else { return false }
            if until < now {
                marks[sensor] = nil
                return false
            }
            return true
        }
    }
}
