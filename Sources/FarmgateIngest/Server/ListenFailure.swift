import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Why `serve` could not listen, said in the terms of the configuration: the socket layer's own text
/// (`bind(descriptor:ptr:bytes:): Address already in use) (errno: 98)`) names neither the address nor the key to change.
public struct ListenFailure: Error, CustomStringConvertible {
    public let description: String
    /// 75 when another process holds the port (it may be free later), 78 when the configuration names an address this
    /// machine does not have or a host that does not resolve.
    public let exitCode: Int32

    /// The failure `error` is, when it is one of listening on `host`:`port`; nil for any other error.
    public init?(_ error: any Error, host: String, port: Int) {
        let address = "\(host.contains(":") ? "[\(host)]" : host):\(port)"
        if let io = error as? IOError {
            switch io.errnoCode {
            case EADDRINUSE:
                description = "cannot listen on \(address): another process holds the port (another farmgate-ingest serve, or another server); stop it, or set [server] port to a free one"
                exitCode = 75
            case EADDRNOTAVAIL:
                description = "cannot listen on \(address): this machine has no such address; set [server] host to one of its addresses (0.0.0.0 or :: for all of them)"
                exitCode = 78
            case EACCES:
                description = "cannot listen on \(address): permission denied (ports below 1024 need privileges); set [server] port to 1024 or above, or put a proxy in front"
                exitCode = 78
            default:
                return nil
            }
            return
        }
        if error is SocketAddressError || error is SocketAddressError.UnknownHost {
            description = "cannot listen on \(address): the host does not resolve to an address of this machine; set [server] host to an address (such as 127.0.0.1, 0.0.0.0 or ::), written without brackets"
            exitCode = 78
            return
        }
        return nil
    }
}
