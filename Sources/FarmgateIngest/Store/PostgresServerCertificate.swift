import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS

/// The names a server certificate holds, and whether one of them names a host as libpq's `verify-full` requires.
///
/// swift-nio-ssl's own host-name check (which postgres-nio's connections use) also accepts a certificate whose IP address
/// names the address the socket connected to, whatever host the URL names: a certificate for `127.0.0.1` passes for
/// `db.example` when that name resolves to `127.0.0.1`. libpq, which the README promises, checks the host as written:
///
/// - a DNS name is matched against the certificate's DNS names (`subjectAltName` dNSName entries), case-insensitively; a
///   wildcard is allowed only as the whole leftmost label (`*.example.com` names `db.example.com`, not
///   `a.db.example.com` nor `example.com`); the subject's common name counts only when there is no DNS name;
/// - an IP address is matched against the certificate's IP addresses; the common name counts only when there is none.
struct PostgresCertificateNames: Sendable, Hashable, CustomStringConvertible {
    var dnsNames: [String] = []
    /// Each 4 (IPv4) or 16 (IPv6) bytes.
    var ipAddresses: [[UInt8]] = []
    var commonName: String?

    /// Whether these names cover `host` (a DNS name or an IP address literal) by libpq's rules.
    func names(host: String) -> Bool {
        if let address = Self.addressBytes(host) {
            if ipAddresses.contains(address) { return true }
            guard ipAddresses.isEmpty, let commonName, let named = Self.addressBytes(commonName) else { return false }
            return named == address
        }
        if dnsNames.contains(where: { Self.name($0, matches: host) }) { return true }
        guard dnsNames.isEmpty, let commonName else { return false }
        return Self.name(commonName, matches: host)
    }

    /// `DNS:db.example, IP:10.0.0.5, CN=db` as far as present; "no names" when none.
    var description: String {
        let names = dnsNames.map { "DNS:\($0)" } + ipAddresses.map { "IP:\(Self.addressText($0))" } + (commonName.map { ["CN=\($0)"] } ?? [])
        return names.isEmpty ? "no names" : names.joined(separator: ", ")
    }

    /// libpq's comparison of one certificate name with a host name: equal ignoring case, or a leftmost wildcard label
    /// that stands for exactly one non-empty label.
    static func name(_ pattern: String, matches host: String) -> Bool {
        let pattern = pattern.lowercased()
        let host = host.lowercased()
        guard !pattern.contains("\0") else { return false }
        guard pattern.hasPrefix("*.") else { return pattern == host }
        let suffix = pattern.dropFirst()  // ".example.com"
        guard pattern.count >= 3, host.count >= pattern.count, host.hasSuffix(suffix) else { return false }
        let label = host.dropLast(suffix.count)
        return !label.isEmpty && !label.contains(".")
    }

    /// The bytes of an IPv4 or IPv6 address literal; nil for anything else (a DNS name).
    static func addressBytes(_ text: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 { return withUnsafeBytes(of: &v6) { Array($0) } }
        return nil
    }

    static func addressText(_ bytes: [UInt8]) -> String {
        if bytes.count == 4 { return bytes.map(String.init).joined(separator: ".") }
        guard bytes.count == 16 else { return bytes.map { String($0, radix: 16) }.joined(separator: ":") }
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let written = bytes.withUnsafeBytes { raw in inet_ntop(AF_INET6, raw.baseAddress, &buffer, socklen_t(buffer.count)) }
        guard written != nil else { return bytes.map { String($0, radix: 16) }.joined(separator: ":") }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The names `certificate` holds: its subjectAltName DNS names and IP addresses, and its subject's (first) common name.
    init(_ certificate: NIOSSLCertificate) {
        for name in certificate._subjectAlternativeNames() {
            switch name.nameType {
            case .dnsName: dnsNames.append(String(decoding: name.contents, as: UTF8.self))
            case .ipAddress where name.contents.count == 4 || name.contents.count == 16: ipAddresses.append(Array(name.contents))
            default: break
            }
        }
        commonName = (try? certificate.toDERBytes()).flatMap(Self.commonName(der:))
    }

    init(dnsNames: [String] = [], ipAddresses: [[UInt8]] = [], commonName: String? = nil) {
        self.dnsNames = dnsNames
        self.ipAddresses = ipAddresses
        self.commonName = commonName
    }

    /// The first common name (2.5.4.3) of a DER certificate's subject; nil when there is none or the DER is not a
    /// certificate. (swift-nio-ssl keeps its own reader of it internal.)
    static func commonName(der: [UInt8]) -> String? {
        var outer = DERReader(der[...])
        guard let certificate = outer.next(), certificate.tag == 0x30 else { return nil }
        var certificateFields = DERReader(certificate.body)
        guard let tbs = certificateFields.next(), tbs.tag == 0x30 else { return nil }
        var fields = DERReader(tbs.body)
        guard var field = fields.next() else { return nil }
        if field.tag == 0xA0 {  // [0] version
            guard let serial = fields.next() else { return nil }
            field = serial
        }
        // serial (field), then signature algorithm, issuer, validity, subject.
        for _ in 0..<3 { guard fields.next() != nil else { return nil } }
        guard let subject = fields.next(), subject.tag == 0x30 else { return nil }
        var names = DERReader(subject.body)
        while let set = names.next() {
            guard set.tag == 0x31 else { return nil }
            var attributes = DERReader(set.body)
            while let attribute = attributes.next() {
                guard attribute.tag == 0x30 else { return nil }
                var parts = DERReader(attribute.body)
                guard let type = parts.next(), let value = parts.next() else { return nil }
                guard type.tag == 0x06, Array(type.body) == [0x55, 0x04, 0x03] else { continue }
                if value.tag == 0x1E {  // BMPString: UTF-16BE
                    let units = stride(from: value.body.startIndex, to: value.body.endIndex - 1, by: 2).map {
                        UInt16(value.body[$0]) << 8 | UInt16(value.body[$0 + 1])
                    }
                    return String(decoding: units, as: UTF16.self)
                }
                return String(decoding: value.body, as: UTF8.self)
            }
        }
        return nil
    }

    /// Tag-length-value items of DER, one after another; nil at the end or at anything malformed.
    struct DERReader {
        var bytes: ArraySlice<UInt8>

        init(_ bytes: ArraySlice<UInt8>) { self.bytes = bytes }

        mutating func next() -> (tag: UInt8, body: ArraySlice<UInt8>)? {
            var index = bytes.startIndex
            guard index < bytes.endIndex else { return nil }
            let tag = bytes[index]
            index += 1
            guard index < bytes.endIndex else { return nil }
            let first = bytes[index]
            index += 1
            var length = 0
            if first < 0x80 {
                length = Int(first)
            } else {
                let count = Int(first & 0x7F)
                guard (1...4).contains(count), bytes.endIndex - index >= count else { return nil }
                for _ in 0..<count {
                    length = length << 8 | Int(bytes[index])
                    index += 1
                }
            }
            guard length >= 0, bytes.endIndex - index >= length else { return nil }
            let body = bytes[index..<(index + length)]
            bytes = bytes[(index + length)...]
            return (tag, body)
        }
    }
}

/// What the server's TLS looked like to ``PostgresSettings/checkServerCertificate(logger:)``.
enum PostgresServerCertificateCheck: Sendable, Hashable {
    /// The certificate verified against the trusted CAs and names the host.
    case verified
    /// The certificate verified against the trusted CAs but names another host: what to tell the operator.
    case wrongHost(String)
    /// The server answered, and its TLS cannot be used with these settings (no TLS offered, a certificate that does not
    /// verify): what to tell the operator.
    case refused(String)
    /// No answer to judge (a connection error, no answer in time): the connection attempt that follows says what.
    case noAnswer(String)
}

extension PostgresSettings {
    /// For `verify-full` over TCP: connects to the server, asks for TLS as libpq does (SSLRequest), completes the
    /// handshake with the CA check, and checks the host name of the URL against the certificate's names by libpq's rules
    /// (``PostgresCertificateNames``); nil for other settings (nothing to check). Bounded by `connect_timeout`.
    ///
    /// postgres-nio makes its TLS handler itself, without a hook for the host-name check, and swift-nio-ssl's check
    /// also accepts an IP address of the certificate that equals the connected address. This runs beside it, before
    /// the store uses the database (at start, and before a new pool after an outage).
    func checkServerCertificate() async -> PostgresServerCertificateCheck? {
        guard tls == .verifyFull, case .tcp(let host, let port) = endpoint else { return nil }
        var configuration = TLSConfiguration.makeClientConfiguration()
        // The chain is checked by BoringSSL; the host name by libpq's rules below.
        configuration.certificateVerification = .noHostnameVerification
        if let caFile {
            do {
                configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile))
            } catch {
                return .refused("the CA file \(caFile) holds no PEM certificate")
            }
        }
        let context: NIOSSLContext
        do {
            context = try NIOSSLContext(configuration: configuration)
        } catch {
            return .refused("cannot make a TLS context: \(Self.tlsReason(error))")
        }
        let answer: PostgresTLSAnswer
        do {
            answer = try await Self.askForTLS(host: host, port: port, context: context, limit: connectTimeout)
        } catch let error as PostgresTLSAnswer.NoAnswer {
            return .noAnswer(error.description)
        } catch {
            if Self.isHandshakeFailure(error) { return .refused(describeTLSFailure(error)) }
            return .noAnswer("\(error)")
        }
        switch answer {
        case .notOffered:
            return .refused(tlsNotOffered)
        case .certificate(let names):
            if names.names(host: host) { return .verified }
            let hostKind = PostgresCertificateNames.addressBytes(host) == nil ? "host name" : "IP address"
            return .wrongHost(
                "the server's certificate does not name the \(hostKind) \(host) of the URL (it names \(names)); connect with a host name the "
                    + "certificate names, or reissue the certificate with \(hostKind == "host name" ? "DNS" : "IP"):\(host) in its subjectAltName")
        }
    }

    /// What the operator is told when the server offers no TLS and the settings require it.
    var tlsNotOffered: String {
        "the server does not offer TLS, and tls = \"\(tls.rawValue)\" (or sslmode=\(tls.rawValue) in the URL) requires it; turn on ssl in the "
            + "server (or PgBouncer's client_tls_sslmode), or set tls = \"prefer\" on a network you trust"
    }

    /// A handshake failure in words, without BoringSSL's error stack and its build paths.
    func describeTLSFailure(_ error: any Error) -> String {
        let reason = Self.tlsReason(error)
        if reason == "CERTIFICATE_VERIFY_FAILED" {
            let trusted = caFile.map { "the CA file \($0)" } ?? "the system's CAs (set ca_file, or sslrootcert in the URL, to the CA that signed it)"
            return "the server's certificate does not verify against \(trusted): not signed by it, expired or not yet valid"
        }
        return "the TLS handshake with the server failed: \(reason)"
    }

    /// Whether `error` is a TLS handshake that failed (the server answered; its TLS is the problem).
    static func isHandshakeFailure(_ error: any Error) -> Bool {
        if let error = error as? NIOSSLError, case .handshakeFailed = error { return true }
        return false
    }

    /// BoringSSL's reason (`CERTIFICATE_VERIFY_FAILED`) from an error stack like `error:1000007d:SSL
    /// routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED at /path/handshake.cc:320`, else the error as text.
    static func tlsReason(_ error: any Error) -> String {
        let text = "\(error)"
        guard let range = text.range(of: #"error:[0-9a-fA-F]+:[^:\]]*:[^:\]]*:[A-Z0-9_]+"#, options: .regularExpression) else {
            if let error = error as? NIOSSLError, case .handshakeFailed(.sslError(let stack)) = error, stack.isEmpty { return "handshake failed" }
            return text
        }
        return String(text[range].split(separator: ":").last ?? "")
    }

    /// Opens a TCP connection, sends PostgreSQL's SSLRequest and, when the server answers `S`, completes a TLS handshake
    /// with `context`: the certificate's names, or that the server declined (`N`). Bounded by `limit` throughout.
    private static func askForTLS(host: String, port: Int, context: NIOSSLContext, limit: Duration) async throws -> PostgresTLSAnswer {
        let eventLoop = MultiThreadedEventLoopGroup.singleton.next()
        let promise = eventLoop.makePromise(of: PostgresTLSAnswer.self)
        // SNI takes names only.
        let serverName = PostgresCertificateNames.addressBytes(host) == nil ? host : nil
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(TimeAmount(limit))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(SSLRequestHandler(context: context, serverName: serverName, answer: promise))
                }
            }
        let timeout = eventLoop.scheduleTask(in: TimeAmount(limit)) {
            promise.fail(PostgresTLSAnswer.NoAnswer(description: "no answer within connect_timeout (\(limit))"))
        }
        defer { timeout.cancel() }
        let channel: any Channel
        do {
            channel = try await bootstrap.connect(host: host, port: port).get()
        } catch {
            promise.fail(error)
            throw PostgresTLSAnswer.NoAnswer(description: "\(error)")
        }
        defer { channel.close(promise: nil) }
        return try await promise.futureResult.get()
    }
}

/// What the server answered to an SSLRequest.
enum PostgresTLSAnswer: Sendable {
    case notOffered
    case certificate(PostgresCertificateNames)

    struct NoAnswer: Error, CustomStringConvertible {
        let description: String
    }
}

/// Sends the SSLRequest when the connection opens, reads the server's one-byte answer, and on `S` puts a TLS client
/// handler in front of itself; answers with the peer certificate's names once the handshake completes.
private final class SSLRequestHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let context: NIOSSLContext
    private let serverName: String?
    private let answer: EventLoopPromise<PostgresTLSAnswer>
    private var asked = false

    init(context: NIOSSLContext, serverName: String?, answer: EventLoopPromise<PostgresTLSAnswer>) {
        self.context = context
        self.serverName = serverName
        self.answer = answer
    }

    func channelActive(context: ChannelHandlerContext) {
        var request = context.channel.allocator.buffer(capacity: 8)
        request.writeInteger(Int32(8))
        request.writeInteger(Int32(80_877_103))
        context.writeAndFlush(NIOAny(request), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !asked else { return }
        var buffer = unwrapInboundIn(data)
        guard let byte = buffer.readInteger(as: UInt8.self) else { return }
        asked = true
        switch byte {
        case UInt8(ascii: "S"):
            do {
                let handler = try NIOSSLClientHandler(context: self.context, serverHostname: serverName)
                try context.pipeline.syncOperations.addHandler(handler, position: .before(self))
            } catch {
                answer.fail(error)
                context.close(promise: nil)
            }
        case UInt8(ascii: "N"):
            answer.succeed(.notOffered)
        default:
            answer.fail(PostgresTLSAnswer.NoAnswer(description: "the server answered the TLS request with neither S nor N: not PostgreSQL?"))
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? TLSUserEvent, case .handshakeCompleted = event {
            if let certificate = try? context.pipeline.syncOperations.nioSSL_peerCertificate() {
                answer.succeed(.certificate(PostgresCertificateNames(certificate)))
            } else {
                answer.fail(PostgresTLSAnswer.NoAnswer(description: "the server sent no certificate"))
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        answer.fail(error)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        answer.fail(PostgresTLSAnswer.NoAnswer(description: "the server closed the connection during the TLS request"))
        context.fireChannelInactive()
    }
}
