import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Ports this test process has handed out: never twice.
private let handedOut = Mutex<Set<Int>>([])

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server a test starts later (often another process).
///
/// Two things used to take such a port before its server bound it, and made a test talk to another test's ingest
/// (a 401 for a key it never had, then `Address already in use`): another test of this process given the same port,
/// and an outgoing connection whose local port the kernel picked from its ephemeral range. So each port is handed out
/// once per process and chosen below the ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), where the kernel
/// never puts an outgoing connection; where that range leaves no room below it, the kernel picks as before.
public func freePort() throws -> Int {
    let ephemeralStart = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8))
        .flatMap { $0.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).first.flatMap { Int($0) } } ?? 0
    if ephemeralStart >= 12_000 {
        for _ in 0..<500 {
            let port = Int.random(in: 10_000..<ephemeralStart)
            guard handedOut.withLock({ $0.insert(port).inserted }) else { continue }
            if (try? bindLoopback(port: port)) != nil { return port }
        }
    }
    for _ in 0..<100 {
        let port = try bindLoopback(port: 0)
        if handedOut.withLock({ $0.insert(port).inserted }) { return port }
    }
    throw POSIXError(.EADDRINUSE)
}

/// Binds a TCP socket to 127.0.0.1:`port` (0: one the kernel picks) with `SO_REUSEADDR`, as servers do, closes it, and
/// returns the port it had.
private func bindLoopback(port: Int) throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw POSIXError(.EMFILE) }
    defer { close(fd) }
    var one: Int32 = 1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = UInt16(port).bigEndian
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard bound == 0 else { throw POSIXError(.EADDRINUSE) }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    return Int(UInt16(bigEndian: address.sin_port))
}
