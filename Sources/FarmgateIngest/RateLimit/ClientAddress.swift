public import NIOCore
import Foundation

/// The client a per-address limit counts against: an IPv4 address, or the /64 prefix of an IPv6 address.
///
/// An IPv6 client is counted by its /64 because one host usually holds a whole /64 and could otherwise take a new
/// address for every request. The address is the TCP peer's: behind a reverse proxy every client is the proxy, so put
/// the proxy's own limits in front (the ingest does not trust `X-Forwarded-For`, which any client can write).
public enum ClientAddress: Hashable, Sendable, CustomStringConvertible {
    case v4(UInt32)
    case v6Prefix(UInt64)
    /// No IP peer (a Unix socket, or the in-process test client): all such clients share one bucket.
    case unknown

    /// The client of `address`.
    public init(_ address: SocketAddress?) {
        guard let address, let text = address.ipAddress else {
            self = .unknown
            return
        }
        switch address.protocol {
        case .inet:
            self = Self.ipv4(text).map { .v4($0) } ?? .unknown
        case .inet6:
            guard let groups = Self.ipv6(text) else {
                self = .unknown
                return
            }
            // An IPv4-mapped address (::ffff:a.b.c.d) is that IPv4 client.
            if groups.prefix(5).allSatisfy({ $0 == 0 }), groups[5] == 0xFFFF {
                self = .v4(UInt32(groups[6]) << 16 | UInt32(groups[7]))
            } else {
                self = .v6Prefix(groups.prefix(4).reduce(0) { $0 << 16 | UInt64($1) })
            }
        default:
            self = .unknown
        }
    }

    /// `a.b.c.d` as a number, or nil.
    static func ipv4(_ text: some StringProtocol) -> UInt32? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            guard let byte = UInt8(part) else { return nil }
            value = value << 8 | UInt32(byte)
        }
        return value
    }

    /// The eight groups of an IPv6 address in text form (with `::`, a zone, or a dotted IPv4 tail), or nil.
    static func ipv6(_ text: String) -> [UInt16]? {
        let address = text.split(separator: "%", maxSplits: 1).first.map(String.init) ?? text
        func groups(_ part: Substring) -> [UInt16]? {
            guard !part.isEmpty else { return [] }
            var result: [UInt16] = []
            for piece in part.split(separator: ":", omittingEmptySubsequences: false) {
                if piece.contains(".") {
                    guard let v4 = ipv4(piece) else { return nil }
                    result += [UInt16(v4 >> 16), UInt16(v4 & 0xFFFF)]
                } else {
                    guard piece.count <= 4, let group = UInt16(piece, radix: 16) else { return nil }
                    result.append(group)
                }
            }
            return result
        }
        let halves = address.components(separatedBy: "::")
        switch halves.count {
        case 1:
            guard let all = groups(Substring(address)), all.count == 8 else { return nil }
            return all
        case 2:
            guard let head = groups(Substring(halves[0])), let tail = groups(Substring(halves[1])), head.count + tail.count <= 7 else { return nil }
            return head + Array(repeating: 0, count: 8 - head.count - tail.count) + tail
        default:
            return nil
        }
    }

    public var description: String {
        switch self {
        case .v4(let address):
            return "\(address >> 24).\(address >> 16 & 0xFF).\(address >> 8 & 0xFF).\(address & 0xFF)"
        case .v6Prefix(let prefix):
            let groups = (0..<4).map { String(prefix >> (48 - 16 * UInt64($0)) & 0xFFFF, radix: 16) }
            return groups.joined(separator: ":") + "::/64"
        case .unknown:
            return "unknown"
        }
    }
}
