/// What a sensor measures, with the unit every value of it is in.
///
/// The raw value is the stable name used in JSON, configuration and the database; ``code`` is the stable byte used by the
/// binary codec. Never renumber a case: add new ones at the end.
public enum Quantity: String, CaseIterable, Hashable, Sendable, Codable {
    /// pH, dimensionless.
    case ph
    /// Electrical conductivity in µS/cm (as the Atlas EZO-EC reports it).
    case electricalConductivity = "ec"
    /// Temperature in °C.
    case temperature
    /// Oxidation-reduction potential in mV.
    case orp
    /// Dissolved oxygen in mg/L.
    case dissolvedOxygen = "do"
    /// A switch state, 0 or 1 (float switch, pump running).
    case state
    /// Flow rate in L/min.
    case flowRate = "flow"
    /// A pulse or event count.
    case count
    /// Total dissolved solids in ppm.
    case tds
    /// Relative humidity in %.
    case humidity
    /// Air pressure in hPa.
    case pressure
    /// Salinity in PSU (practical salinity units, PSS-78), as an Atlas EZO-EC circuit outputs it (`O,S,1`).
    case salinity
    /// Specific gravity (density relative to pure water), dimensionless, as an Atlas EZO-EC circuit outputs it
    /// (`O,SG,1`).
    case specificGravity = "specific_gravity"

    /// The stable byte used on the wire.
    public var code: UInt8 {
        switch self {
        case .ph: 1
        case .electricalConductivity: 2
        case .temperature: 3
        case .orp: 4
        case .dissolvedOxygen: 5
        case .state: 6
        case .flowRate: 7
        case .count: 8
        case .tds: 9
        case .humidity: 10
        case .pressure: 11
        case .salinity: 12
        case .specificGravity: 13
        }
    }

    /// The quantity with this wire byte, or nil.
    public init?(code: UInt8) {
        guard let match = Quantity.allCases.first(where: { $0.code == code }) else { return nil }
        self = match
    }

    /// The unit every value of this quantity is in.
    public var unit: String {
        switch self {
        case .ph: "pH"
        case .electricalConductivity: "µS/cm"
        case .temperature: "°C"
        case .orp: "mV"
        case .dissolvedOxygen: "mg/L"
        case .state: "state"
        case .flowRate: "L/min"
        case .count: "count"
        case .tds: "ppm"
        case .humidity: "%"
        case .pressure: "hPa"
        case .salinity: "PSU"
        case .specificGravity: "SG"
        }
    }

    /// The resolution a sensor of this quantity gets when its configuration names none.
    public var defaultResolution: Resolution {
        switch self {
        case .ph: .hundredth
        case .electricalConductivity: .tenth
        case .temperature: .sixteenth
        case .orp: .tenth
        case .dissolvedOxygen: .hundredth
        case .state, .count: .one
        case .flowRate: .hundredth
        case .tds: .one
        case .humidity: .tenth
        case .pressure: .tenth
        case .salinity: .hundredth
        case .specificGravity: .thousandth
        }
    }

    /// The coarsest resolution step a sensor of this quantity may have: a tenth of its ``plausibleRange``, or its default
    /// step when that is larger (a switch state, 0 or 1, steps by 1). Coarser, every value is rounded to one of a few
    /// steps, most to 0, and any two readings of a sequence compare as the same value.
    public var coarsestStep: Double {
        max((plausibleRange.upperBound - plausibleRange.lowerBound) / 10, defaultResolution.step)
    }

    /// Why `resolution` is too coarse for this quantity (see ``coarsestStep``); nil when it is fine.
    public func coarseResolutionProblem(_ resolution: Resolution) -> String? {
        guard resolution.step > coarsestStep else { return nil }
        let range = plausibleRange
        return "a step of \(Self.plain(resolution.step)) is coarser than a tenth of the whole range of \(rawValue) "
            + "(\(Self.plain(range.lowerBound)) to \(Self.plain(range.upperBound)) \(unit)): every value would be rounded to a multiple "
            + "of it, most to 0; give a step of at most \(Self.plain(coarsestStep)), such as the default \"\(Self.plain(defaultResolution.step))\""
    }

    /// A number as a person writes it: `16`, not `16.0`.
    static func plain(_ value: Double) -> String {
        if value.rounded() == value, value.magnitude < 1e15 { return "\(Int64(value))" }
        return "\(value)"
    }

    /// The physically plausible range; values outside it are rejected by the ingest as invalid.
    public var plausibleRange: ClosedRange<Double> {
        switch self {
        case .ph: -2...16
        case .electricalConductivity: 0...1_000_000
        case .temperature: -60...150
        case .orp: -2_000...2_000
        case .dissolvedOxygen: 0...100
        case .state: 0...1
        case .flowRate: 0...100_000
        // Below 2^53, where every integer is still a double of its own: a count written as 2^53 + 1 reads as 2^53, and
        // with 2^53 in range it was stored as that other value rather than refused (a tester, 2026-12-07).
        case .count: 0...Double((Int64(1) << 53) - 1)
        case .tds: 0...1_000_000
        case .humidity: 0...100
        case .pressure: 0...2_000
        // PSS-78 is defined up to 42 PSU (the EZO-EC reads 0–42); brines and salt lakes reach about 300.
        case .salinity: 0...300
        // Pure water near boiling is 0.958; saturated brine about 1.2; the EZO-EC reads 1.00–1.30.
        case .specificGravity: 0.9...1.5
        }
    }
}

/// The step between two representable values of a sensor, as a fraction `numerator / denominator`.
///
/// Values cross the wire as whole multiples of the step, so the codec is lossless at the declared resolution:
/// pH at 1/100, EC at 1/10 µS/cm, a DS18B20 at 1/16 °C.
public struct Resolution: Hashable, Sendable, CustomStringConvertible {
    public let numerator: UInt32
    public let denominator: UInt32

    /// The largest numerator or denominator accepted.
    public static let maxComponent: UInt32 = 1_000_000

    public static let one = Resolution(unchecked: 1, 1)
    public static let tenth = Resolution(unchecked: 1, 10)
    public static let hundredth = Resolution(unchecked: 1, 100)
    public static let thousandth = Resolution(unchecked: 1, 1000)
    public static let sixteenth = Resolution(unchecked: 1, 16)

    init(unchecked numerator: UInt32, _ denominator: UInt32) {
        self.numerator = numerator
        self.denominator = denominator
    }

    /// A resolution of `numerator / denominator`; both must be between 1 and ``maxComponent``.
    public init(numerator: UInt32, denominator: UInt32) throws(ResolutionError) {
        guard Self.accepts(numerator, denominator) else {
            throw ResolutionError(text: "\(numerator)/\(denominator)")
        }
        self.numerator = numerator
        self.denominator = denominator
    }

    /// Whether both parts are between 1 and ``maxComponent``.
    static func accepts(_ numerator: UInt32, _ denominator: UInt32) -> Bool {
        (1...Resolution.maxComponent).contains(numerator) && (1...Resolution.maxComponent).contains(denominator)
    }

    /// Parses `0.01`, `1/16`, `0.1` or `1`.
    public init(parsing text: String) throws(ResolutionError) {
        let trimmed = text.trimmingSpaces
        // Digits, one point or one slash: a sign would be read past (`UInt32("-0")` is 0), so -0.01 is refused, not 0.01.
        guard trimmed.unicodeScalars.allSatisfy({ ("0"..."9").contains($0) || $0 == "." || $0 == "/" || $0 == " " }) else {
            throw ResolutionError(text: text)
        }
        if let slash = trimmed.firstIndex(of: "/") {
            guard let n = UInt32(trimmed[..<slash].trimmingSpaces),
                let d = UInt32(trimmed[trimmed.index(after: slash)...].trimmingSpaces)
            else { throw ResolutionError(text: text) }
            // Checked here too, so that the error quotes what was written.
            guard Self.accepts(n, d) else { throw ResolutionError(text: text) }
            try self.init(numerator: n, denominator: d)
            return
        }
        // Decimal: digits with at most 6 fractional digits, e.g. 0.01 -> 1/100, 5 -> 5/1, 0.25 -> 25/100.
        let parts = trimmed.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count <= 2, let whole = UInt32(parts[0].isEmpty ? "0" : String(parts[0])) else {
            throw ResolutionError(text: text)
        }
        var numerator = UInt64(whole)
        var denominator: UInt64 = 1
        if parts.count == 2 {
            let fraction = parts[1]
            guard !fraction.isEmpty, fraction.count <= 6, let digits = UInt64(fraction) else { throw ResolutionError(text: text) }
            for _ in 0..<fraction.count { denominator *= 10 }
            numerator = numerator * denominator + digits
        }
        let divisor = gcd(numerator, denominator)
        guard divisor > 0 else { throw ResolutionError(text: text) }
        numerator /= divisor
        denominator /= divisor
        guard numerator <= UInt64(Resolution.maxComponent), denominator <= UInt64(Resolution.maxComponent),
            Self.accepts(UInt32(numerator), UInt32(denominator))
        else {
            throw ResolutionError(text: text)
        }
        try self.init(numerator: UInt32(numerator), denominator: UInt32(denominator))
    }

    /// The step as a floating-point number.
    public var step: Double { Double(numerator) / Double(denominator) }

    /// The whole number of steps closest to `value`, or nil when `value` is not finite or does not fit.
    public func quantize(_ value: Double) -> Int64? {
        guard value.isFinite else { return nil }
        let scaled = (value * Double(denominator) / Double(numerator)).rounded()
        guard scaled.magnitude < 9.0e15 else { return nil }  // exact in a Double, and in an Int64 after the multiply
        return Int64(scaled)
    }

    /// The whole number of steps closest to the decimal number `text` (a JSON number such as `-1.005` or `6.02e-1`),
    /// rounded half away from zero on its exact decimal value, as a person rounds what they wrote: `1.005` at 0.01 is
    /// 101 steps, where its nearest double (1.00499999999999989…) gives 100 through ``quantize(_:)``. nil when `text`
    /// is not such a number or has too many digits to compute exactly (over 30 significant ones, or an exponent that
    /// makes the product overflow 128 bits): ``quantize(_:)`` of its double then answers, which differs only on ties.
    public func quantize(decimal text: String) -> Int64? {
        var bytes = text.utf8[...]
        let negative = bytes.first == UInt8(ascii: "-")
        if negative || bytes.first == UInt8(ascii: "+") { bytes = bytes.dropFirst() }
        var mantissa: Int128 = 0
        var significant = 0
        var fractionDigits = 0
        var sawDigit = false
        var inFraction = false
        var exponent = 0
        while let byte = bytes.first {
            if byte == UInt8(ascii: ".") {
                guard !inFraction else { return nil }
                inFraction = true
            } else if (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) {
                sawDigit = true
                if mantissa != 0 || byte != UInt8(ascii: "0") {
                    significant += 1
                    guard significant <= 30 else { return nil }
                    mantissa = mantissa * 10 + Int128(byte - UInt8(ascii: "0"))
                }
                if inFraction { fractionDigits += 1 }
            } else if byte == UInt8(ascii: "e") || byte == UInt8(ascii: "E") {
                guard sawDigit, let parsed = Int(String(decoding: bytes.dropFirst(), as: UTF8.self)), (-400...400).contains(parsed) else { return nil }
                exponent = parsed
                bytes = bytes[bytes.endIndex...]
                break
            } else {
                return nil
            }
            bytes = bytes.dropFirst()
        }
        guard sawDigit else { return nil }
        guard mantissa != 0 else { return 0 }
        // value × denominator / numerator = mantissa × 10^power × denominator / numerator
        let power = exponent - fractionDigits
        func tenTo(_ count: Int) -> Int128? {
            var result: Int128 = 1
            for _ in 0..<count {
                let (next, overflow) = result.multipliedReportingOverflow(by: 10)
                guard !overflow else { return nil }
                result = next
            }
            return result
        }
        var (dividend, overflow) = mantissa.multipliedReportingOverflow(by: Int128(denominator))
        guard !overflow else { return nil }
        var divisor = Int128(numerator)
        if power >= 0 {
            guard let scale = tenTo(power) else { return nil }
            (dividend, overflow) = dividend.multipliedReportingOverflow(by: scale)
            guard !overflow else { return nil }
        } else {
            guard let scale = tenTo(-power) else { return nil }
            (divisor, overflow) = divisor.multipliedReportingOverflow(by: scale)
            guard !overflow else { return nil }
        }
        var steps = dividend / divisor
        // Half away from zero: the remainder against half the divisor, without overflow.
        if dividend % divisor >= divisor - dividend % divisor { steps += 1 }
        guard steps < 9_000_000_000_000_000 else { return nil }  // as quantize(_:): exact in a Double
        return Int64(negative ? -steps : steps)
    }

    /// The value of `count` steps.
    public func value(ofSteps count: Int64) -> Double {
        Double(count) * Double(numerator) / Double(denominator)
    }

    public var description: String { numerator == 1 && denominator == 1 ? "1" : "\(numerator)/\(denominator)" }
}

/// A resolution that is not a positive fraction with small enough parts.
public struct ResolutionError: Error, Hashable, Sendable, CustomStringConvertible {
    public let text: String
    public var description: String {
        "invalid resolution '\(text)': write it as a decimal step such as 0.01 or a fraction such as 1/16 (numerator and denominator 1 to \(Resolution.maxComponent))"
    }
}

func gcd(_ a: UInt64, _ b: UInt64) -> UInt64 {
    var (x, y) = (a, b)
    while y != 0 { (x, y) = (y, x % y) }
    return x
}

extension StringProtocol {
    /// Without the spaces and horizontal tabs around it (HTTP's optional whitespace, RFC 9110 §5.6.3; the blanks of a
    /// configuration line). By bytes: Foundation's `trimmingCharacters(in:)` bridges through NSString, and was the
    /// largest part of authenticating a read in the ingest.
    public var trimmingSpaces: String {
        let bytes = Substring(self).utf8
        guard let first = bytes.firstIndex(where: { $0 != 0x20 && $0 != 0x09 }), let last = bytes.lastIndex(where: { $0 != 0x20 && $0 != 0x09 })
        else { return "" }
        // Cut next to ASCII bytes, so both ends lie on character boundaries.
        return String(decoding: bytes[first...last], as: UTF8.self)
    }
}
