import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A TCP proxy on 127.0.0.1 that forwards every connection to a target port on loopback and counts the bytes it forwards
/// in each direction, per connection. Plain threads with blocking reads and writes (two per connection, one per
/// direction): the benchmark's figures must not depend on an event loop it shares with the server it measures.
///
/// What crosses it is what would cross a metered link: TCP payload, TLS records included. Not counted: TCP/IP headers
/// (40–60 bytes per segment, which depend on how the kernel segments, and which a metered LTE plan counts too, so the
/// figures here are a lower bound for what the carrier bills).
///
/// **Connection setup.** Each connection's bytes are split at the first *application request*: `setupUp` is what the
/// client sent before the first byte of its first application-data record, `setupDown` is what the server had sent when
/// that record reached the proxy. The boundary is found by reading the TLS record headers (5 bytes: type, version,
/// length) of both directions, not by timing:
/// - TLS 1.3 encrypts the rest of the handshake after ServerHello in records of type 23 (application data), so the
///   server sends type-23 records before the client's first one; the client's first type-23 record is then its Finished,
///   and the request starts with its second.
/// - TLS 1.2 sends no type-23 record before the handshake ends (Finished is type 22): the client's first type-23 record
///   is the request.
/// TLS 1.3 session tickets, which the server sends after the client's Finished, fall after the boundary and count as the
/// first exchange's bytes, not as setup. A connection whose first byte is not a TLS handshake record (0x16) is plain
/// TCP: its setup is 0 bytes.
final class ByteCountingProxy: Sendable {
    /// The figures of one proxied connection.
    struct Connection: Sendable {
        /// Client → server bytes (the upload direction) and server → client bytes.
        var up = 0
        var down = 0
        /// TLS handshake bytes, before the first application request (see the type's documentation); nil while the
        /// handshake is not over.
        var setupUp: Int?
        var setupDown: Int?
        /// Whether the client began with a TLS handshake record.
        var tls: Bool?
        var closed = false

        fileprivate var client = RecordScanner()
        fileprivate var server = RecordScanner()
        fileprivate var clientApplicationRecords = 0
        fileprivate var serverSentApplicationRecord = false
    }

    /// The sums over all connections so far.
    struct Totals: Sendable {
        var up = 0
        var down = 0
        var setupUp = 0
        var setupDown = 0
        var connections = 0

        var total: Int { up + down }
        static func - (a: Totals, b: Totals) -> Totals {
            Totals(up: a.up - b.up, down: a.down - b.down, setupUp: a.setupUp - b.setupUp, setupDown: a.setupDown - b.setupDown, connections: a.connections - b.connections)
        }
    }

    private struct State: Sendable {
        var connections: [Connection] = []
        var sockets: Set<Int32> = []
        var stopped = false
    }

    /// The port the proxy listens on (127.0.0.1).
    let port: Int
    let targetPort: Int
    private let listener: Int32
    private let state = Mutex(State())

    /// Listens on 127.0.0.1 on a port of the kernel's choice and starts accepting.
    init(targetPort: Int) throws {
        self.targetPort = targetPort
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ProxyError("cannot create a socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = Self.loopback(port: 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound, listen(fd, 64) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw ProxyError("cannot listen on 127.0.0.1: \(reason)")
        }
        listener = fd
        port = Int(UInt16(bigEndian: address.sin_port))
        Thread.detachNewThread { [self] in acceptLoop() }
    }

    /// Every connection so far, in the order accepted.
    func connections() -> [Connection] { state.withLock { $0.connections } }

    func totals() -> Totals {
        state.withLock { state in
            var totals = Totals()
            for connection in state.connections {
                totals.up += connection.up
                totals.down += connection.down
                totals.setupUp += connection.setupUp ?? 0
                totals.setupDown += connection.setupDown ?? 0
            }
            totals.connections = state.connections.count
            return totals
        }
    }

    /// Stops accepting and cuts every open connection.
    func stop() {
        let sockets = state.withLock { state in
            state.stopped = true
            return state.sockets
        }
        shutdown(listener, Int32(SHUT_RDWR))
        for fd in sockets { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                break
            }
            guard let server = try? Self.connect(port: targetPort) else {
                close(client)
                continue
            }
            for fd in [client, server] {
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            let index: Int? = state.withLock { state in
                guard !state.stopped else { return nil }
                state.connections.append(Connection())
                state.sockets.formUnion([client, server])
                return state.connections.count - 1
            }
            guard let index else {
                close(client)
                close(server)
                break
            }
            let finished = Atomic<Int>(0)
            let pump: @Sendable (Int32, Int32, Bool) -> Void = { [self] from, to, upward in
                forward(from: from, to: to, connection: index, upward: upward)
                if finished.add(1, ordering: .acquiringAndReleasing).newValue == 2 {
                    state.withLock { state in
                        state.connections[index].closed = true
                        state.sockets.subtract([client, server])
                    }
                    close(client)
                    close(server)
                }
            }
            Thread.detachNewThread { pump(client, server, true) }
            Thread.detachNewThread { pump(server, client, false) }
        }
        close(listener)
    }

    /// Copies one direction until its reader sees the end (or an error), then half-closes the other side.
    private func forward(from: Int32, to: Int32, connection index: Int, upward: Bool) {
        let size = 1 << 16
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 1)
        defer { buffer.deallocate() }
        outer: while true {
            let count = read(from, buffer.baseAddress, size)
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { break }
            // Counted before it is forwarded: the peer cannot answer bytes it has not received, so the other direction's
            // counter never runs ahead of the bytes that caused it.
            let chunk = UnsafeRawBufferPointer(rebasing: buffer[0..<count])
            state.withLock { state in Self.account(chunk, upward: upward, in: &state.connections[index]) }
            var sent = 0
            while sent < count {
                let written = write(to, buffer.baseAddress.map { $0 + sent }, count - sent)
                if written < 0, errno == EINTR { continue }
                guard written > 0 else { break outer }
                sent += written
            }
        }
        shutdown(to, Int32(SHUT_WR))
        shutdown(from, Int32(SHUT_RD))
    }

    /// Adds a chunk to a connection's counters and moves the setup boundary (see the type's documentation).
    private static func account(_ chunk: UnsafeRawBufferPointer, upward: Bool, in connection: inout Connection) {
        if upward {
            if connection.tls == nil, let first = chunk.first {
                connection.tls = first == 0x16
                if first != 0x16 {
                    connection.setupUp = 0
                    connection.setupDown = 0
                }
            }
            let base = connection.up
            connection.up += chunk.count
            guard connection.tls == true, connection.setupUp == nil else { return }
            var boundary: Int?
            var scanner = connection.client
            var applicationRecords = connection.clientApplicationRecords
            let tls13 = connection.serverSentApplicationRecord
            scanner.feed(chunk) { type, offset in
                guard type == 23, boundary == nil else { return }
                applicationRecords += 1
                if applicationRecords == (tls13 ? 2 : 1) { boundary = base + offset }
            }
            connection.client = scanner
            connection.clientApplicationRecords = applicationRecords
            if let boundary {
                connection.setupUp = boundary
                connection.setupDown = connection.down
            }
        } else {
            connection.down += chunk.count
            guard connection.tls == true, !connection.serverSentApplicationRecord, connection.clientApplicationRecords == 0 else { return }
            var scanner = connection.server
            var sawApplication = false
            scanner.feed(chunk) { type, _ in if type == 23 { sawApplication = true } }
            connection.server = scanner
            connection.serverSentApplicationRecord = sawApplication
        }
    }

    static func loopback(port: Int) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        return address
    }

    /// A blocking TCP connection to 127.0.0.1:port.
    static func connect(port: Int) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ProxyError("cannot create a socket") }
        var address = loopback(port: port)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        guard connected else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw ProxyError("cannot connect to 127.0.0.1:\(port): \(reason)")
        }
        return fd
    }
}

/// Follows TLS record boundaries in one direction of a byte stream: a record is a 5-byte header (content type, version,
/// length) and `length` bytes.
struct RecordScanner: Sendable {
    private var header: [UInt8] = []
    private var remaining = 0

    /// Reports the content type and the offset within `bytes` of every record that starts in this chunk.
    mutating func feed(_ bytes: UnsafeRawBufferPointer, _ onRecord: (UInt8, Int) -> Void) {
        var index = 0
        while index < bytes.count {
            if remaining > 0 {
                let take = min(remaining, bytes.count - index)
                remaining -= take
                index += take
                continue
            }
            if header.isEmpty { onRecord(bytes[index], index) }
            header.append(bytes[index])
            index += 1
            if header.count == 5 {
                remaining = Int(header[3]) << 8 | Int(header[4])
                header = []
            }
        }
    }
}

struct ProxyError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
