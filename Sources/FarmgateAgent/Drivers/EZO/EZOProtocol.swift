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

/// The kinds of Atlas Scientific EZO circuit the driver reads, with their datasheet timings.
public enum EZOCircuitKind: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case ph = "pH"
    case ec = "EC"
    case rtd = "RTD"
    case orp = "ORP"
    case dissolvedOxygen = "DO"

    public var description: String { "EZO \(rawValue)" }

    /// The circuit type an `i` answer names (`?I,pH,2.16`): case-insensitive, `OR` is older ORP firmware, `D.O.` older DO.
    public init?(identity: String) {
        switch identity.uppercased().replacing(".", with: "") {
        case "PH": self = .ph
        case "EC": self = .ec
        case "RTD": self = .rtd
        case "ORP", "OR": self = .orp
        case "DO": self = .dissolvedOxygen
        default: return nil
        }
    }

    /// The circuit that measures `quantity` (EC circuits also give TDS, salinity and specific gravity).
    public init?(quantity: Quantity) {
        switch quantity {
        case .ph: self = .ph
        case .electricalConductivity, .tds, .salinity, .specificGravity: self = .ec
        case .temperature: self = .rtd
        case .orp: self = .orp
        case .dissolvedOxygen: self = .dissolvedOxygen
        default: return nil
        }
    }

    /// The values the circuit outputs at all (the datasheets' ranges): pH 0.001–14.000 (a pH circuit never answers
    /// 0.000), ORP −1019.9–1019.9 mV. A reading outside is no reading of this circuit. Nil where the quantity's
    /// plausible range is the only check (EC reads 0.00 dry; an RTD's −1023 is its own fault).
    public var outputRange: ClosedRange<Double>? {
        switch self {
        case .ph: 0.001...14
        case .orp: -1019.9...1019.9
        case .ec, .rtd, .dissolvedOxygen: nil
        }
    }

    /// ``outputRange`` as the datasheet writes it.
    var outputRangeText: String {
        switch self {
        case .ph: "pH 0.001–14.000"
        case .orp: "−1019.9 to 1019.9 mV"
        case .ec, .rtd, .dissolvedOxygen: "range"
        }
    }

    /// Whether `RT,<t>` (read with temperature compensation) exists on this circuit.
    public var compensates: Bool { self == .ph || self == .ec || self == .dissolvedOxygen }

    /// How long an `R` takes (feastorg/ezo-driver ezo_product.c; the RTD takes 600–1000 ms).
    public var readTime: Duration {
        switch self {
        case .ph, .orp: .milliseconds(900)
        case .ec, .dissolvedOxygen: .milliseconds(600)
        case .rtd: .milliseconds(1000)
        }
    }

    /// How long an `RT,<t>` takes.
    public var compensatedReadTime: Duration { .milliseconds(900) }

    /// How long any other command takes.
    public static let commandTime: Duration = .milliseconds(300)
}

/// The parameters an EZO EC circuit can output, in the order a reading lists them (`O,?` → `?O,EC,TDS,S,SG`).
public enum EZOOutput: String, Sendable, Hashable, CaseIterable, Comparable {
    case ec = "EC"
    case tds = "TDS"
    case salinity = "S"
    case specificGravity = "SG"

    public static func < (lhs: EZOOutput, rhs: EZOOutput) -> Bool {
        allCases.firstIndex(of: lhs) ?? 0 < allCases.firstIndex(of: rhs) ?? 0
    }

    /// The output that gives `quantity` on an EC circuit.
    public init?(quantity: Quantity) {
        switch quantity {
        case .electricalConductivity: self = .ec
        case .tds: self = .tds
        case .salinity: self = .salinity
        case .specificGravity: self = .specificGravity
        default: return nil
        }
    }
}

/// What one line from an EZO circuit means.
public enum EZOResponse: Sendable, Hashable {
    /// `*OK`: the command was done (response codes on).
    case ok
    /// `*ER`, `*OV`, `*UV`: the command failed.
    case error(EZOErrorCode)
    /// `*RS`, `*RE`, `*SL`, `*WA`, `*DONE`: something happened on the circuit.
    case event(EZOEvent)
    /// An answer or a reading (`?I,pH,2.16`, `9.560`, `1413,707`).
    case data(String)
    /// Bytes that are not a line of the protocol (noise, a wrong baud).
    case garbage([UInt8])

    public init(line: EZOLine) {
        switch line {
        case .garbage(let bytes):
            self = .garbage(bytes)
        case .text(let text):
            let upper = text.uppercased()
            if upper == "*OK" {
                self = .ok
            } else if let code = EZOErrorCode(rawValue: upper) {
                self = .error(code)
            } else if let event = EZOEvent(rawValue: upper) {
                self = .event(event)
            } else if text.hasPrefix("*") {
                self = .garbage(Array(text.utf8))
            } else {
                self = .data(text)
            }
        }
    }
}

public enum EZOErrorCode: String, Sendable, Hashable {
    case unknownCommand = "*ER"
    case overVoltage = "*OV"
    case underVoltage = "*UV"

    /// What the installer should do about it.
    func explanation(command: String) -> String {
        switch self {
        case .unknownCommand:
            "the circuit refused '\(command)' (*ER): it does not know the command, or the line was garbled on the way"
        case .overVoltage:
            "the circuit reports over-voltage (*OV, VCC ≥ 5.5 V): check its power supply"
        case .underVoltage:
            "the circuit reports under-voltage (*UV, VCC ≤ 3.1 V): check its power supply and the cable length"
        }
    }

    /// What the installer is told when the circuit sent a supply code on its own, between commands: its readings are
    /// unreliable meanwhile, so `consequence` (no reading stored, a command not sent).
    func reportedOnItsOwn(consequence: String) -> String {
        switch self {
        case .unknownCommand:
            "the circuit sent *ER on its own (it received something that is no command): \(consequence); check the wiring"
        case .overVoltage:
            "the circuit reported over-voltage (*OV, VCC ≥ 5.5 V) on its own, between commands: its readings are unreliable, so \(consequence); check its power supply"
        case .underVoltage:
            "the circuit reported under-voltage (*UV, VCC ≤ 3.1 V) on its own, between commands: its readings are unreliable, so \(consequence); check its power supply and the cable length"
        }
    }
}

public enum EZOEvent: String, Sendable, Hashable {
    /// The circuit is resetting.
    case reset = "*RS"
    /// The circuit finished booting and is ready.
    case ready = "*RE"
    /// The circuit went to sleep.
    case sleep = "*SL"
    /// The circuit woke up.
    case woke = "*WA"
    /// A long operation finished.
    case done = "*DONE"

    /// Whether the circuit lost its session state (continuous mode, outputs): it must be initialised again.
    var restarts: Bool { self != .done }
}

/// One line from the circuit: printable text, or bytes that cannot be a line of the protocol.
public enum EZOLine: Sendable, Hashable {
    case text(String)
    case garbage([UInt8])
}

/// Cuts the byte stream from a circuit into lines. Lines end with a carriage return (a newline is accepted too); bytes
/// outside printable ASCII (but NUL and 0xFF before a line's text, see ``line(_:)``), or a line longer
/// than any EZO answer, make the line garbage. Incremental: any split of the
/// same bytes into chunks gives the same lines.
public struct EZOLineSplitter: Sendable {
    /// Longer than any answer the protocol has (`?Slope,99.7,100.3,-0.89` is 24).
    public static let maxLine = 64

    private var partial: [UInt8] = []
    private var overflowed = false

    public init() {}

    /// The bytes of a line begun but not finished.
    public var pending: [UInt8] { partial }

    public mutating func feed(_ bytes: some Sequence<UInt8>) -> [EZOLine] {
        var lines: [EZOLine] = []
        for byte in bytes {
            if byte == 0x0D || byte == 0x0A {
                if overflowed {
                    lines.append(.garbage(partial))
                } else if !partial.isEmpty {
                    lines.append(Self.line(partial))
                }
                partial.removeAll(keepingCapacity: true)
                overflowed = false
                continue
            }
            if partial.count < Self.maxLine {
                partial.append(byte)
            } else {
                overflowed = true
            }
        }
        return lines
    }

    /// Printable ASCII, the only bytes of a line of the protocol.
    static func isPrintable(_ byte: UInt8) -> Bool { byte >= 0x20 && byte < 0x7F }

    /// Forgets a line begun but not finished (before a new command: its end will never come) and returns its bytes.
    @discardableResult
    public mutating func discardPartial() -> [UInt8] {
        let dropped = partial
        partial.removeAll(keepingCapacity: true)
        overflowed = false
        return dropped
    }

    /// A line is text when it is printable ASCII after any NUL or 0xFF bytes at its start: what a UART reads while the
    /// line is held low or settles at power-up and wake-up, before the circuit's first byte. Any other byte outside
    /// printable ASCII makes the line garbage: random noise can end in digits, and a byte lost inside a reading would
    /// change its value.
    static func line(_ bytes: [UInt8]) -> EZOLine {
        let text = bytes.drop { $0 == 0x00 || $0 == 0xFF }
        guard !text.isEmpty, text.allSatisfy(isPrintable) else { return .garbage(bytes) }
        return .text(String(decoding: text, as: UTF8.self))
    }
}

/// Parsers for the answers the driver asks for.
public enum EZOParse {
    /// `?I,pH,2.16` → (pH, "2.16"); nil when the line is no identity answer. The type may be a kind this driver does not
    /// know (returned as text).
    public static func identity(_ text: String) -> (type: String, firmware: String)? {
        let fields = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard fields.count >= 3, fields[0].uppercased() == "?I" else { return nil }
        return (fields[1], fields[2])
    }

    /// A reading: comma-separated decimal numbers (`9.560`, `1413,707`); nil when any field is not a plain decimal.
    public static func reading(_ text: String) -> [Double]? {
        let fields = text.split(separator: ",", omittingEmptySubsequences: false)
        guard !fields.isEmpty else { return nil }
        var values: [Double] = []
        for field in fields {
            let trimmed = field.trimmingWhitespace()
            var body = Substring(trimmed)
            if body.hasPrefix("-") { body = body.dropFirst() }
            let dots = body.filter { $0 == "." }.count
            // A circuit writes a digit before and after the point and no leading zero before another digit: `.7`, `7.`
            // or `07.00` is what a reading that lost a byte on the way looks like (`6.7xx`, `17.0`), not a reading.
            guard !body.isEmpty, dots <= 1, body.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
                body.first?.isNumber == true, body.last?.isNumber == true, !(body.first == "0" && body.count > 1 && body.dropFirst().first != "."),
                let value = Double(trimmed), value.isFinite
            else { return nil }
            values.append(value)
        }
        return values
    }

    /// `?O,EC,TDS` → [.ec, .tds]; `?O,No output` → []; nil when the line is no output answer.
    public static func outputs(_ text: String) -> Set<EZOOutput>? {
        outputFields(text).map { Set($0.compactMap { EZOOutput(rawValue: $0) }) }
    }

    /// A DO circuit's outputs, upper case: `?O,mg,%` → ["MG", "%"]; `?O,No output` → []; nil when the line is no output
    /// answer.
    public static func oxygenOutputs(_ text: String) -> Set<String>? {
        outputFields(text).map { Set($0.filter { $0 == "MG" || $0 == "%" }) }
    }

    /// The fields of an answer to `O,?`, upper case, after its prefix: `?O,` as the UART sections of the datasheets
    /// write it, or `?,O,`, which the DO datasheet gives (and some firmware sends); nil for any other line.
    static func outputFields(_ text: String) -> [String]? {
        let fields = text.split(separator: ",").map { String($0).trimmingWhitespace().uppercased() }
        if fields.first == "?O" { return Array(fields.dropFirst()) }
        if fields.count >= 2, fields[0] == "?", fields[1] == "O" { return Array(fields.dropFirst(2)) }
        return nil
    }

    /// An RTD circuit's scale, lower case: `?S,c` → "c" (`c`, `k`, `f`); nil when the line is no answer to `S,?`.
    public static func scale(_ text: String) -> String? {
        let fields = text.split(separator: ",", omittingEmptySubsequences: false).map { String($0).trimmingWhitespace() }
        guard fields.count == 2, fields[0].uppercased() == "?S" else { return nil }
        let scale = fields[1].lowercased()
        return ["c", "k", "f"].contains(scale) ? scale : nil
    }

    /// `?C,0` → false, `?C,1` (or `?C,n`, a reading every n seconds on newer firmware) → true; nil when the line is no
    /// answer to `C,?`.
    public static func continuous(_ text: String) -> Bool? {
        let fields = text.split(separator: ",", omittingEmptySubsequences: false).map { String($0).trimmingWhitespace() }
        guard fields.count == 2, fields[0].uppercased() == "?C", let every = Int(fields[1]), every >= 0 else { return nil }
        return every != 0
    }

    /// `?*OK,1` → true; nil when the line is no answer to `*OK,?`.
    public static func responseCodes(_ text: String) -> Bool? {
        let upper = text.uppercased()
        guard upper.hasPrefix("?*OK,") else { return nil }
        return upper.hasSuffix("1")
    }
}
