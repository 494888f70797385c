import FarmgateSupport
import Foundation
import Testing

@testable import farmgate_bench

#if canImport(Glibc)
import Glibc
#endif

/// The wire benchmark's proxy counts exactly the bytes that cross it, and splits off the TLS handshake where the record
/// headers say it ends. Real sockets on loopback; the "TLS" exchange is scripted records (types and lengths are all the
/// proxy reads), so the expected counts are known to the byte.
@Suite("ByteCountingProxy")
struct ByteCountingProxyTests {
    /// A listening socket on 127.0.0.1 whose single connection runs `script` on a thread of its own.
    final class ScriptedServer: Sendable {
        let port: Int
        private let listener: Int32

        init(_ script: @escaping @Sendable (Int32) -> Void) throws {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = ByteCountingProxy.loopback(port: 0)
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
            }
            guard fd >= 0, bound, listen(fd, 4) == 0 else { throw ProxyError("cannot listen") }
            listener = fd
            port = Int(UInt16(bigEndian: address.sin_port))
            Thread.detachNewThread {
                let connection = accept(fd, nil, nil)
                guard connection >= 0 else { return }
                script(connection)
                close(connection)
            }
        }

        deinit { close(listener) }
    }

    static func send(_ fd: Int32, _ bytes: [UInt8]) {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { return }
            sent += n
        }
    }

    /// Reads exactly `count` bytes (fewer only at the end of the stream).
    static func receive(_ fd: Int32, _ count: Int) -> [UInt8] {
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while bytes.count < count {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, min($0.count, count - bytes.count)) }
            guard n > 0 else { break }
            bytes += buffer[0..<n]
        }
        return bytes
    }

    /// A TLS record: 5-byte header, then `length` bytes.
    static func record(_ type: UInt8, _ length: Int) -> [UInt8] {
        [type, 3, 3, UInt8(length >> 8), UInt8(length & 0xFF)] + [UInt8](repeating: 0xAB, count: length)
    }

    /// Waits until the proxy saw the connection close on both sides.
    static func closed(_ proxy: ByteCountingProxy) async throws {
        for _ in 0..<500 where !(proxy.connections().first?.closed ?? false) { try await Task.sleep(for: .milliseconds(10)) }
    }

    @Test("counts a plain transfer to the byte in both directions, with no setup")
    func plainTransfer() async throws {
        let request = [UInt8]((0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) })
        let server = try ScriptedServer { fd in
            let got = Self.receive(fd, request.count)
            Self.send(fd, Array(got.prefix(33_333)))
        }
        let proxy = try ByteCountingProxy(targetPort: server.port)
        defer { proxy.stop() }
        let answer = try await runOffPool {
            let fd = try ByteCountingProxy.connect(port: proxy.port)
            defer { close(fd) }
            Self.send(fd, request)
            return Self.receive(fd, 1 << 20)
        }
        #expect(answer == Array(request.prefix(33_333)))
        try await Self.closed(proxy)
        let connections = proxy.connections()
        #expect(connections.count == 1)
        #expect(connections.first?.up == 100_000)
        #expect(connections.first?.down == 33_333)
        #expect(connections.first?.tls == false)
        #expect(connections.first?.setupUp == 0)
        #expect(connections.first?.closed == true)
        #expect(proxy.totals().total == 133_333)
    }

    @Test("splits a TLS 1.3-shaped exchange at the client's second application-data record")
    func tls13Handshake() async throws {
        // ClientHello; ServerHello, ChangeCipherSpec, encrypted handshake (type 23); client Finished (23), request (23);
        // response (23).
        let hello = Self.record(22, 300), serverFlight = Self.record(22, 90) + Self.record(20, 1) + Self.record(23, 1200)
        let finished = Self.record(23, 53), request = Self.record(23, 700), response = Self.record(23, 150)
        let server = try ScriptedServer { fd in
            _ = Self.receive(fd, hello.count)
            Self.send(fd, serverFlight)
            _ = Self.receive(fd, finished.count + request.count)
            Self.send(fd, response)
        }
        let proxy = try ByteCountingProxy(targetPort: server.port)
        defer { proxy.stop() }
        try await runOffPool {
            let fd = try ByteCountingProxy.connect(port: proxy.port)
            defer { close(fd) }
            Self.send(fd, hello)
            _ = Self.receive(fd, serverFlight.count)
            // Finished and the request in one write, split inside a record header: the boundary is found by offset.
            let rest = finished + request
            Self.send(fd, Array(rest.prefix(finished.count + 2)))
            Self.send(fd, Array(rest.dropFirst(finished.count + 2)))
            _ = Self.receive(fd, response.count)
        }
        try await Self.closed(proxy)
        let connection = try #require(proxy.connections().first)
        #expect(connection.tls == true)
        #expect(connection.up == hello.count + finished.count + request.count)
        #expect(connection.down == serverFlight.count + response.count)
        #expect(connection.setupUp == hello.count + finished.count)
        #expect(connection.setupDown == serverFlight.count)
    }

    @Test("splits a TLS 1.2-shaped exchange at the client's first application-data record")
    func tls12Handshake() async throws {
        let hello = Self.record(22, 200), serverFlight = Self.record(22, 1500)
        let clientFinish = Self.record(22, 70) + Self.record(20, 1) + Self.record(22, 40), serverFinish = Self.record(20, 1) + Self.record(22, 40)
        let request = Self.record(23, 500), response = Self.record(23, 80)
        let server = try ScriptedServer { fd in
            _ = Self.receive(fd, hello.count)
            Self.send(fd, serverFlight)
            _ = Self.receive(fd, clientFinish.count)
            Self.send(fd, serverFinish)
            _ = Self.receive(fd, request.count)
            Self.send(fd, response)
        }
        let proxy = try ByteCountingProxy(targetPort: server.port)
        defer { proxy.stop() }
        try await runOffPool {
            let fd = try ByteCountingProxy.connect(port: proxy.port)
            defer { close(fd) }
            Self.send(fd, hello)
            _ = Self.receive(fd, serverFlight.count)
            Self.send(fd, clientFinish)
            _ = Self.receive(fd, serverFinish.count)
            Self.send(fd, request)
            _ = Self.receive(fd, response.count)
        }
        try await Self.closed(proxy)
        let connection = try #require(proxy.connections().first)
        #expect(connection.setupUp == hello.count + clientFinish.count)
        #expect(connection.setupDown == serverFlight.count + serverFinish.count)
        #expect(connection.up == hello.count + clientFinish.count + request.count)
        #expect(connection.down == serverFlight.count + serverFinish.count + response.count)
    }
}
