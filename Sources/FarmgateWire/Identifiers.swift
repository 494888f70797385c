/// Identifiers that cross the wire: a device (one gateway) and a sensor (unique on its device).
///
/// Both are short ASCII names so they fit in file names, URLs, metric-free log metadata and SQL without quoting:
/// 1 to 64 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or digit. `tank1.ph`, `greenhouse-2`.

/// Why a string was refused as an identifier.
public struct IdentifierError: Error, Hashable, Sendable, CustomStringConvertible {
    public let kind: String
    public let value: String
    public let problem: String

    public var description: String {
        "invalid \(kind) '\(value)': \(problem) (use 1 to \(identifierMaxLength) characters of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
    }
}

/// The longest identifier accepted, in bytes.
public let identifierMaxLength = 64

@inline(__always)
private func isIdentifierByte(_ byte: UInt8) -> Bool {
    switch byte {
    case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
        return true
    case UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"):
        return true
    default:
        return false
    }
}

func validateIdentifier(_ value: String, kind: String) throws(IdentifierError) {
    let bytes = Array(value.utf8)
    guard !bytes.isEmpty else { throw IdentifierError(kind: kind, value: value, problem: "it is empty") }
    guard bytes.count <= identifierMaxLength else {
        throw IdentifierError(kind: kind, value: String(value.prefix(80)), problem: "it is \(bytes.count) bytes long")
    }
    guard isIdentifierByte(bytes[0]), bytes[0] != UInt8(ascii: "."), bytes[0] != UInt8(ascii: "_"), bytes[0] != UInt8(ascii: "-")
    else { throw IdentifierError(kind: kind, value: value, problem: "it must start with a letter or digit") }
    if let bad = bytes.first(where: { !isIdentifierByte($0) }) {
        let shown = bad >= 0x20 && bad < 0x7F ? "'\(Character(Unicode.Scalar(bad)))'" : "byte 0x\(String(bad, radix: 16))"
        throw IdentifierError(kind: kind, value: value, problem: "it contains \(shown)")
    }
}

/// The identifier of a sensor, unique on its device, e.g. `tank1.ph`.
public struct SensorID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: String

    /// Validates `rawValue`; see the type's documentation for what is allowed.
    public init(_ rawValue: String) throws(IdentifierError) {
        try validateIdentifier(rawValue, kind: "sensor id")
        self.rawValue = rawValue
    }

    public var description: String { rawValue }
    public static func < (lhs: SensorID, rhs: SensorID) -> Bool { lhs.rawValue.utf8.lexicographicallyPrecedes(rhs.rawValue.utf8) }
}

/// The identifier of a device (one site gateway), unique in its farm, e.g. `greenhouse-2`.
public struct DeviceID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: String

    /// Validates `rawValue`; see ``SensorID`` for what is allowed.
    public init(_ rawValue: String) throws(IdentifierError) {
        try validateIdentifier(rawValue, kind: "device id")
        self.rawValue = rawValue
    }

    public var description: String { rawValue }
    public static func < (lhs: DeviceID, rhs: DeviceID) -> Bool { lhs.rawValue.utf8.lexicographicallyPrecedes(rhs.rawValue.utf8) }
}

extension SensorID: Codable {
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let raw = try container.decode(String.self)
        do { try self.init(raw) } catch {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: error.description)
        }
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(rawValue)
    }
}

extension DeviceID: Codable {
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let raw = try container.decode(String.self)
        do { try self.init(raw) } catch {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: error.description)
        }
    }
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(rawValue)
    }
}
