import FarmgateWire
import Foundation
public import NIOCore

/// The reverse proxies (`[server] trusted_proxies`) whose `X-Forwarded-For` names the client that per-address limits
/// count against.
///
/// Behind nginx every TCP peer is nginx: without this, one client's failed authentications would put every client
/// behind the same proxy over the per-address limit. A request whose TCP peer is one of these exact addresses is
/// counted against the **last** address of its `X-Forwarded-For` (the one the trusted proxy wrote; the example nginx
/// configuration replaces the header with `$remote_addr`, so a client cannot inject one). From any other peer the
/// header is ignored: a client reaching the ingest directly cannot choose whom it is counted as. A header that does not
/// end in an IP address leaves the request counted against the proxy.
public struct TrustedProxies: Sendable, Hashable {
    /// IPv4 addresses as numbers, IPv6 addresses as their eight groups (IPv4-mapped IPv6 peers count as IPv4).
    private var v4: Set<UInt32> = []
    private var v6: Set<[UInt16]> = []

    public var isEmpty: Bool { v4.isEmpty && v6.isEmpty }

    /// No trusted proxy.
    public init() {}

    /// - Throws: ``TrustedProxiesError`` naming the first entry that is not an IP address.
    public init(_ addresses: [String]) throws(TrustedProxiesError) {
        for address in addresses {
            if let value = ClientAddress.ipv4(address) {
                v4.insert(value)
            } else if let groups = ClientAddress.ipv6(address) {
                v6.insert(groups)
            } else {
                throw TrustedProxiesError(entry: address)
            }
        }
    }

    /// Whether `peer` is one of the trusted proxies.
    public func trusts(_ peer: SocketAddress?) -> Bool {
        guard let peer, let text = peer.ipAddress else { return false }
        switch peer.protocol {
        case .inet:
            return ClientAddress.ipv4(text).map { v4.contains($0) } ?? false
        case .inet6:
            guard let groups = ClientAddress.ipv6(text) else { return false }
            if groups.prefix(5).allSatisfy({ $0 == 0 }), groups[5] == 0xFFFF {
                return v4.contains(UInt32(groups[6]) << 16 | UInt32(groups[7]))
            }
            return v6.contains(groups)
        default:
            return false
        }
    }

    /// The client a request counts against: the last `X-Forwarded-For` address when `peer` is trusted, else `peer`.
    public func client(peer: SocketAddress?, forwardedFor: String?) -> ClientAddress {
        let direct = ClientAddress(peer)
        guard trusts(peer), let header = forwardedFor,
            var last = header.split(separator: ",").last?.trimmingSpaces, !last.isEmpty
        else { return direct }
        // A quoted address ("192.0.2.7", as RFC 7239's Forwarded writes one), and an IPv4 address with a port
        // (192.0.2.7:51234, written by some proxies) name their client too.
        if last.count >= 2, last.hasPrefix("\""), last.hasSuffix("\"") { last = String(last.dropFirst().dropLast()) }
        if let value = ClientAddress.ipv4(last) ?? ClientAddress.ipv4(Self.withoutPort(last)) { return .v4(value) }
        // "[2001:db8::1]:port" and a plain IPv6 address alike.
        let bare = last.hasPrefix("[") ? String(last.dropFirst().prefix { $0 != "]" }) : last
        if let groups = ClientAddress.ipv6(bare) {
            if groups.prefix(5).allSatisfy({ $0 == 0 }), groups[5] == 0xFFFF { return .v4(UInt32(groups[6]) << 16 | UInt32(groups[7])) }
            return .v6Prefix(groups.prefix(4).reduce(0) { $0 << 16 | UInt64($1) })
        }
        return direct
    }

    /// `a.b.c.d:port` without `:port` (only for text with exactly one colon: an IPv6 address has more).
    static func withoutPort(_ text: String) -> Substring {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, UInt16(parts[1]) != nil else { return Substring(text) }
        return parts[0]
    }
}

/// An entry of `trusted_proxies` that is not an IP address.
public struct TrustedProxiesError: Error, Sendable, Hashable, CustomStringConvertible {
    public var entry: String
    public var description: String {
        "'\(entry.prefix(60))' is not an IP address; list the exact addresses your reverse proxies connect from, e.g. [\"127.0.0.1\", \"::1\"]"
    }
}
