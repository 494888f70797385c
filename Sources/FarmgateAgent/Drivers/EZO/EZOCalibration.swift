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
                // The value first: a wrong buffer is the more useful thing to hear, whatever the order.
                guard value <= 6.5 else {
                    throw CalibrationError("the low point must be an acid buffer (at most 6.5, usually 4.00), not \(format(value)); a low point above 7 would invert the probe's slope")
                }
                guard let mid = taken("mid") else {
                    throw CalibrationError("calibrate the mid point (pH 7.00) first: Cal,mid clears every other point, so a low point taken before it would be lost")
                }
                guard value < (mid.reference ?? 7) else {
                    throw CalibrationError("the low point must be an acid buffer below the mid point (at most 6.5, usually 4.00), not \(format(value)); a low point above 7 would invert the probe's slope")
                }
                return "Cal,low,\(format(value))"
            default:  // high
                guard value >= 7.5 else {
                    throw CalibrationError("the high point must be an alkaline buffer (at least 7.5, usually 10.00), not \(format(value))")
                }
                guard let mid = taken("mid") else {
                    throw CalibrationError("calibrate the mid point (pH 7.00) first, then the low point (4.00); the high point comes last")
                }
                guard taken("low") != nil else {
                    throw CalibrationError("calibrate the low point (pH 4.00) before the high point: the datasheet's order is mid, low, high")
                }
                guard value > (mid.reference ?? 7) else {
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

    /// The quantity a circuit is calibrated in: an EC circuit in µS/cm (its TDS, salinity and specific gravity are
    /// derived from EC and follow its calibration), the others in the one quantity they measure.
    public static func calibratedQuantity(_ kind: EZOCircuitKind) -> Quantity {
        switch kind {
        case .ph: .ph
        case .ec: .electricalConductivity
        case .rtd: .temperature
        case .orp: .orp
        case .dissolvedOxygen: .dissolvedOxygen
        }
    }

    /// How far a stable reading may be from a point's reference and still be the probe in that solution. Wide enough
    /// for a probe that was never calibrated (Atlas Scientific's own guidance: a new pH probe reads within a few tenths
    /// of the buffer, an EC probe's cell constant may be off by tens of percent), narrow enough to tell one buffer from
    /// another (pH 4, 7, 10 are 3 apart; the usual EC solutions an order of magnitude).
    public enum Plausibility {
        /// pH units between the stable reading and the buffer's value.
        public static let ph = 1.5
        /// The most an EC probe in air may read, µS/cm (a dry probe reads 0; a wet one a little).
        public static let dryEC = 100.0
        /// The factor an EC reading may be off its solution's value (either way).
        public static let ecFactor = 2.0
        /// °C between an RTD's reading and the thermometer's.
        public static let rtd = 5.0
        /// mV between an ORP reading and the solution's value.
        public static let orp = 100.0
        /// mg/L: a probe in zero-oxygen solution reads at most this (it falls to nearly 0 within minutes); one in air at
        /// least this (air holds the oxygen of saturated water, 6.9–14.6 mg/L between 35 and 0 °C at sea level, about
        /// 5 at 3,000 m; an uncalibrated probe is off by tens of percent, not down to this).
        public static let oxygenBoundary = 2.0
        /// mg/L: the most a probe in air may read (twice saturated water at 0 °C: more is no probe in air).
        public static let oxygenInAir = 30.0
    }

    /// Why the stable `reading` cannot be the probe in the solution of `step`, with the solution it seems to be in
    /// instead; nil when it is plausible.
    public static func implausibility(of reading: Double, for step: CalibrationStep, kind: EZOCircuitKind) -> String? {
        let shown = format(reading)
        switch kind {
        case .ph:
            guard let reference = step.reference, abs(reading - reference) > Plausibility.ph else { return nil }
            let buffers = [4.0, 7.0, 10.0]
            let nearest = buffers.min { abs($0 - reading) < abs($1 - reading) } ?? 7
            let seems = abs(nearest - reading) <= Plausibility.ph && nearest != reference
                ? "the probe seems to be in the pH \(format(nearest)) buffer, not the \(format(reference)) one"
                : "the probe seems to be in none of the usual buffers (4.00, 7.00, 10.00): a worn probe, or not in a buffer at all"
            return "the probe reads pH \(shown), more than \(format(Plausibility.ph)) from the \(step.point) point's \(format(reference)): \(seems); put it in the pH \(format(reference)) buffer (rinse it first) and wait for the readings to settle"
        case .ec:
            if step.point == "dry" {
                guard reading > Plausibility.dryEC else { return nil }
                return "the probe reads \(shown) µS/cm, but a dry probe reads about 0 (at most \(format(Plausibility.dryEC)) µS/cm): it seems to be \(Self.ecSolution(reading)); take it out, dry it, and try again"
            }
            guard let reference = step.reference, reference > 0 else { return nil }
            let ratio = reading / reference
            guard ratio < 1 / Plausibility.ecFactor || ratio > Plausibility.ecFactor else { return nil }
            return "the probe reads \(shown) µS/cm, more than \(format(Plausibility.ecFactor))× off the \(step.point) point's \(format(reference)) µS/cm (an uncalibrated probe is off by tens of percent, not that much): it seems to be \(Self.ecSolution(reading)); put it in the \(format(reference)) µS/cm solution and wait for the readings to settle"
        case .rtd:
            guard let reference = step.reference, abs(reading - reference) > Plausibility.rtd else { return nil }
            return "the probe reads \(shown) °C, more than \(format(Plausibility.rtd)) °C from the thermometer's \(format(reference)) °C: put the probe in the same water as the thermometer, let both settle, and give the temperature the thermometer reads"
        case .orp:
            guard let reference = step.reference, abs(reading - reference) > Plausibility.orp else { return nil }
            return "the probe reads \(shown) mV, more than \(format(Plausibility.orp)) mV from the solution's \(format(reference)) mV: it seems not to be in the \(format(reference)) mV solution (or the solution is spent); rinse it, put it in fresh solution and wait for the readings to settle"
        case .dissolvedOxygen:
            let boundary = format(Plausibility.oxygenBoundary)
            if step.point == "zero" {
                guard reading > Plausibility.oxygenBoundary else { return nil }
                return "the probe reads \(shown) mg/L, but in a zero dissolved-oxygen solution it reads nearly 0 (at most \(boundary) mg/L): it seems to be in air or in aerated water (about 9 mg/L at 20 °C); put it in the zero solution, stir away the bubbles and wait until the readings fall and settle (a few minutes)"
            }
            if reading < Plausibility.oxygenBoundary {
                return "the probe reads \(shown) mg/L, but in air it reads the oxygen of saturated water (about 9 mg/L at 20 °C, at least \(boundary)): it seems to be still in the zero solution or in water without oxygen; rinse it, shake off the drops, let it sit in the air and wait until the readings rise and settle"
            }
            guard reading > Plausibility.oxygenInAir else { return nil }
            return "the probe reads \(shown) mg/L, more than the \(format(Plausibility.oxygenInAir)) mg/L a probe in air can read (saturated water holds at most 14.6 mg/L): the probe or its membrane is faulty, or the circuit is not a dissolved-oxygen circuit reading mg/L; check the probe and `farmgate sensor read` it"
        }
    }

    /// Which of the usual conductivity solutions a reading looks like, for the installer.
    static func ecSolution(_ reading: Double) -> String {
        if reading <= Plausibility.dryEC { return "dry or in water without salts" }
        let solutions = [84.0, 1_413, 12_880, 80_000, 150_000]
        if let nearest = solutions.min(by: { abs(log($0 / reading)) < abs(log($1 / reading)) }), abs(log(nearest / reading)) <= log(Plausibility.ecFactor) {
            return "in the \(format(nearest)) µS/cm solution"
        }
        return "in none of the usual solutions (84, 1413, 12880, 80000 µS/cm)"
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
