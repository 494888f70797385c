#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// One finished calibration of one sensor: which points were calibrated against which reference values, what the
/// circuit reported afterwards, and when. It travels beside the readings (format version 3) so that the ingest can tell
/// when a probe was last calibrated and how healthy it was.
///
/// `id` is chosen by the site when the calibration finishes and never changes: the ingest stores an event once per
/// (device, id), so a re-sent event is a duplicate, never a second calibration.
public struct CalibrationEvent: Codable, Sendable, Hashable {
    /// One calibrated point.
    public struct Point: Codable, Sendable, Hashable {
        /// The circuit's name for the point: `mid`, `low`, `high` (pH, EC), `dry` (EC), `single` (EC, RTD, ORP),
        /// `air`, `zero` (DO).
        public var name: String
        /// The reference value of the solution (pH 7.00, 1413 µS/cm, 100.0 °C, 225 mV); nil for `dry`, `air`, `zero`.
        public var reference: Double?
        /// When the circuit took the point.
        public var at: Timestamp
        /// The last reading before the point was taken (what the probe read in the solution), when there was one.
        public var reading: Double?

        public init(name: String, reference: Double?, at: Timestamp, reading: Double? = nil) {
            self.name = name
            self.reference = reference
            self.at = at
            self.reading = reading
        }
    }

    /// A pH probe's slope as `Slope,?` reports it: percent of the ideal (Nernst) slope on the acid and base sides, and
    /// the zero offset in millivolts.
    public struct Slope: Codable, Sendable, Hashable {
        public var acidPercent: Double
        public var basePercent: Double
        public var offsetMillivolts: Double?

        public init(acidPercent: Double, basePercent: Double, offsetMillivolts: Double?) {
            self.acidPercent = acidPercent
            self.basePercent = basePercent
            self.offsetMillivolts = offsetMillivolts
        }

        enum CodingKeys: String, CodingKey {
            case acidPercent = "acid_percent"
            case basePercent = "base_percent"
            case offsetMillivolts = "offset_mv"
        }
    }

    /// Unique per device: a UUID chosen by the site (1 to 64 of `A-Za-z0-9-_`).
    public var id: String
    public var sensor: SensorID
    /// When the calibration finished.
    public var time: Timestamp
    /// The circuit (`pH`, `EC`, `RTD`, `ORP`, `DO`).
    public var circuit: String
    /// The circuit's firmware version (`i`), when known.
    public var firmware: String?
    public var points: [Point]
    /// How many points the circuit says it holds afterwards (`Cal,?`), when it answered.
    public var calibratedPoints: Int?
    /// pH only.
    public var slope: Slope?

    public init(
        id: String, sensor: SensorID, time: Timestamp, circuit: String, firmware: String?, points: [Point],
        calibratedPoints: Int?, slope: Slope?
    ) {
        self.id = id
        self.sensor = sensor
        self.time = time
        self.circuit = circuit
        self.firmware = firmware
        self.points = points
        self.calibratedPoints = calibratedPoints
        self.slope = slope
    }

    enum CodingKeys: String, CodingKey {
        case id, sensor, time, circuit, firmware, points, slope
        case calibratedPoints = "calibrated_points"
    }

    /// Whether `id` is a usable event id (1 to 64 of `A-Za-z0-9-_`).
    public static func isValidID(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= 64
            && id.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x2D || $0 == 0x5F }
    }

    /// The points the circuit should hold after this calibration: every point taken but `dry` (an EC circuit's dry
    /// point sets its zero and is not counted by `Cal,?`).
    public var pointsExpected: Int { points.filter { $0.name.lowercased() != "dry" }.count }

    /// Whether the circuit kept the calibration: it said (`Cal,?`) it holds at least the points taken, or did not say.
    /// An event of a circuit that holds fewer (points sent but not done: lost on the way, refused without response
    /// codes to tell) is a record of what the circuit holds, not a calibration: `calibration_overdue` does not count it.
    public var keptByCircuit: Bool {
        guard let held = calibratedPoints else { return true }
        return held >= pointsExpected
    }

    /// The most points one event may carry (EC dry/low/high is three; pH mid/low/high three).
    public static let maximumPoints = 8
}

/// The ingest's answer about the calibration events of a batch (``IngestReceipt/calibrations``).
public struct CalibrationReceipt: Codable, Hashable, Sendable {
    /// Events stored now for the first time.
    public var accepted: Int
    /// Events whose (device, id) was already stored.
    public var duplicates: Int

    public init(accepted: Int, duplicates: Int) {
        self.accepted = accepted
        self.duplicates = duplicates
    }
}
