import FarmgateWire
import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// A calibration point an installer asks for: a named point and the reference value of the solution the probe sits in.
public struct CalibrationStep: Sendable, Hashable, Codable {
    public var point: String
    public var reference: Double?

    public init(point: String, reference: Double? = nil) {
        self.point = point
        self.reference = reference
    }

    /// `mid=7.00` → (mid, 7.0); `dry` → (dry, nil).
    public init(parsing text: String) throws(CalibrationError) {
        let parts = text.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
        let name = parts[0].lowercased().trimmingWhitespace()
        guard !name.isEmpty else { throw CalibrationError("a point needs a name, such as mid=7.00 or dry (got \"\(text.prefix(40))\")") }
        point = name
        if parts.count == 2 {
            guard let value = Double(parts[1].trimmingWhitespace()), value.isFinite else {
                throw CalibrationError("the reference value of point \(name) must be a number, such as \(name)=7.00 (got \"\(parts[1].prefix(40))\")")
            }
            reference = value
        } else {
            reference = nil
        }
    }

    public var description: String { reference.map { "\(point)=\(EZOCalibration.format($0))" } ?? point }
}

/// A calibration step refused before anything was sent to the circuit, with what to do instead.
public struct CalibrationError: Error, Sendable, Hashable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The datasheets' calibration rules per EZO circuit: which points exist, in which order they must be taken, which
/// reference values are plausible, and the command each one sends.
///
/// - pH: `Cal,mid,n` first (it clears the other points), then `Cal,low,n` (a reference below the mid point, at most
///   6.5), then `Cal,high,n` (above the mid point, at least 7.5); references 0 to 14.
/// - EC: `Cal,dry` first, then either `Cal,n` (single point) or `Cal,low,n` then `Cal,high,n` (high above low); µS/cm.
/// - RTD: `Cal,t` (°C, -126 to 1254), one point.
/// - ORP: `Cal,n` (mV, -1019.9 to 1019.9), one point.
/// - DO: `Cal` (in air) and `Cal,0` (zero-oxygen solution), in either order, each once.
public enum EZOCalibration {
    /// The points a circuit knows, in the order the guide takes them.
    public static func points(_ kind: EZOCircuitKind) -> [String] {
        switch kind {
        case .ph: ["mid", "low", "high"]
        case .ec: ["dry", "single", "low", "high"]
        case .rtd, .orp: ["single"]
        case .dissolvedOxygen: ["zero", "air"]
        }
    }

    /// What the guide calibrates when the installer names no point: the usual solutions of Atlas Scientific's kits.
    public static func defaultSteps(_ kind: EZOCircuitKind) -> [CalibrationStep] {
        switch kind {
        case .ph: [CalibrationStep(point: "mid", reference: 7.00), CalibrationStep(point: "low", reference: 4.00), CalibrationStep(point: "high", reference: 10.00)]
        case .ec: [CalibrationStep(point: "dry"), CalibrationStep(point: "low", reference: 12_880), CalibrationStep(point: "high", reference: 80_000)]
        case .rtd: []  // no default: the reference is whatever the installer's thermometer says
        case .orp: [CalibrationStep(point: "single", reference: 225)]
        case .dissolvedOxygen: [CalibrationStep(point: "air")]
        }
    }

    /// Whether the point needs a reference value.
    static func needsReference(_ kind: EZOCircuitKind, _ point: String) -> Bool {
        !(point == "dry" || point == "air" || point == "zero")
    }

    /// Checks `step` against the points already taken in this session and returns the command to send.
    /// - Throws: ``CalibrationError`` naming why the step is out of order or implausible, and what to do.
    public static func command(for step: CalibrationStep, kind: EZOCircuitKind, after done: [CalibrationStep]) throws(CalibrationError) -> String {
        let known = points(kind)
        guard known.contains(step.point) else {
            throw CalibrationError("an \(kind) circuit has no point \"\(step.point)\"; its points are \(known.joined(separator: ", "))")
        }
        if done.contains(where: { $0.point == step.point }) {
            throw CalibrationError("point \(step.point) was already taken in this calibration; finish it, or abort and start again")
        }
        let reference: Double?
        if needsReference(kind, step.point) {
            guard let value = step.reference else {
                throw CalibrationError("point \(step.point) needs the solution's reference value, e.g. \(example(kind, step.point))")
            }
            reference = value
        } else {
            guard step.reference == nil else {
                throw CalibrationError("point \(step.point) takes no reference value (write just \(step.point))")
            }
            reference = nil
        }
        func taken(_ point: String) -> CalibrationStep? { done.first { $0.point == point } }
        switch kind {
        case .ph:
            let value = reference ?? 7
            guard (0...14).contains(value) else {
                throw CalibrationError("pH \(format(value)) is outside the pH scale (0 to 14): check the value on the buffer solution's bottle")
            }
            switch step.point {
            case "mid":
                guard (6...8).contains(value) else {
                    throw CalibrationError("the mid point must be a neutral buffer (6 to 8, usually 7.00), not \(format(value))")
                }
                return "Cal,mid,\(format(value))"
            case "low":
                guard let mid = taken("mid") else {
                    throw CalibrationError("calibrate the mid point (pH 7.00) first: Cal,mid clears every other point, so a low point taken before it would be lost")
                }
                guard value <= 6.5, value < (mid.reference ?? 7) else {
                    throw CalibrationError("the low point must be an acid buffer below the mid point (at most 6.5, usually 4.00), not \(format(value)); a low point above 7 would invert the probe's slope")
                }
                return "Cal,low,\(format(value))"
            default:  // high
                guard let mid = taken("mid") else {
                    throw CalibrationError("calibrate the mid point (pH 7.00) first, then the low point (4.00); the high point comes last")
                }
                guard taken("low") != nil else {
                    throw CalibrationError("calibrate the low point (pH 4.00) before the high point: the datasheet's order is mid, low, high")
                }
                guard value >= 7.5, value > (mid.reference ?? 7) else {
                    throw CalibrationError("the high point must be an alkaline buffer above the mid point (at least 7.5, usually 10.00), not \(format(value))")
                }
                return "Cal,high,\(format(value))"
            }
        case .ec:
            if step.point == "dry" { return "Cal,dry" }
            guard taken("dry") != nil else {
                throw CalibrationError("calibrate dry first (the probe out of any liquid, dried): the circuit needs its zero before a solution")
            }
            let value = reference ?? 0
            guard value > 0, value <= 500_000 else {
                throw CalibrationError("an EC calibration solution is above 0 and at most 500000 µS/cm (got \(format(value))); check the value on the bottle, in µS/cm")
            }
            switch step.point {
            case "single":
                guard taken("low") == nil else {
                    throw CalibrationError("a single-point calibration cannot follow a low point: take the high point, or abort and start again")
                }
                return "Cal,\(format(value))"
            case "low":
                guard taken("single") == nil else {
                    throw CalibrationError("this calibration already took a single point; abort and start again for a two-point calibration")
                }
                return "Cal,low,\(format(value))"
            default:  // high
                guard let low = taken("low"), let lowValue = low.reference else {
                    throw CalibrationError("take the low point before the high point (e.g. low=12880, then high=80000)")
                }
                guard value > lowValue else {
                    throw CalibrationError("the high point (\(format(value)) µS/cm) must be above the low point (\(format(lowValue)) µS/cm)")
                }
                return "Cal,high,\(format(value))"
            }
        case .rtd:
            let value = reference ?? 0
            guard (-126...1254).contains(value) else {
                throw CalibrationError("an RTD reference must be between -126 and 1254 °C (got \(format(value))): give the temperature a trusted thermometer reads")
            }
            return "Cal,\(format(value))"
        case .orp:
            let value = reference ?? 0
            guard (-1019.9...1019.9).contains(value) else {
                throw CalibrationError("an ORP reference must be between -1019.9 and 1019.9 mV (got \(format(value))); Atlas Scientific's solution is 225 mV")
            }
            return "Cal,\(format(value))"
        case .dissolvedOxygen:
            return step.point == "air" ? "Cal" : "Cal,0"
        }
    }

    static func example(_ kind: EZOCircuitKind, _ point: String) -> String {
        switch (kind, point) {
        case (.ph, "mid"): "mid=7.00"
        case (.ph, "low"): "low=4.00"
        case (.ph, _): "high=10.00"
        case (.ec, "low"): "low=12880"
        case (.ec, "high"): "high=80000"
        case (.ec, _): "single=1413"
        case (.rtd, _): "single=100.0"
        default: "single=225"
        }
    }

    /// Two decimals, trailing zeros kept for pH-like values (`7.00`), plain for large ones (`12880`). A value no
    /// calibration uses (a typo, a circuit's garbled slope) is shown as it is rather than converted.
    public static func format(_ value: Double) -> String {
        guard value.isFinite, abs(value) < 1e15 else { return "\(value)" }
        if value == value.rounded(), abs(value) >= 100 { return String(Int64(value)) }
        let hundredths = Int64((value * 100).rounded())
        let sign = hundredths < 0 ? "-" : ""
        let magnitude = abs(hundredths)
        let fraction = magnitude % 100
        return "\(sign)\(magnitude / 100).\(fraction < 10 ? "0" : "")\(fraction)"
    }

    /// `?Cal,2` → 2; nil when the line is no answer to `Cal,?`.
    public static func parseCalibrated(_ text: String) -> Int? {
        let fields = text.split(separator: ",").map(String.init)
        guard fields.count == 2, fields[0].uppercased() == "?CAL", let points = Int(fields[1]), (0...8).contains(points) else { return nil }
        return points
    }

    /// `?Slope,99.7,100.3,-0.89` → the slope; the offset is absent on older firmware. Nil when the line is no answer to
    /// `Slope,?`.
    public static func parseSlope(_ text: String) -> CalibrationEvent.Slope? {
        let fields = text.split(separator: ",").map(String.init)
        guard fields.count == 3 || fields.count == 4, fields[0].uppercased() == "?SLOPE", let acid = Double(fields[1]), let base = Double(fields[2]),
            acid.isFinite, base.isFinite
        else { return nil }
        var offset: Double?
        if fields.count == 4 {
            guard let value = Double(fields[3]), value.isFinite else { return nil }
            offset = value
        }
        return CalibrationEvent.Slope(acidPercent: acid, basePercent: base, offsetMillivolts: offset)
    }

    /// The installer's warning for a pH slope outside 85–105 %, or nil when it is healthy.
    public static func slopeWarning(_ slope: CalibrationEvent.Slope) -> String? {
        let healthy = 85.0...105.0
        var sides: [String] = []
        if !healthy.contains(slope.acidPercent) { sides.append("acid side \(format(slope.acidPercent)) %") }
        if !healthy.contains(slope.basePercent) { sides.append("base side \(format(slope.basePercent)) %") }
        guard !sides.isEmpty else { return nil }
        return "the probe's slope is outside 85–105 % of the ideal (\(sides.joined(separator: ", "))): clean the probe (soak it in cleaning solution, rinse) and calibrate again; if it stays outside, replace the probe"
    }
}
