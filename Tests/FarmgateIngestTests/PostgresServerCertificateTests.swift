import FarmgateTestSupport
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import PostgresNIO
import Testing

@testable import FarmgateIngest

/// `verify-full` as libpq checks it (the certificate must name the host of the URL, not merely the address connected
/// to), and connection refusals named as what they are: a certificate that does not verify, a server without TLS, a
/// password the URL lacks, PgBouncer's "no such database".
@Suite struct PostgresServerCertificateTests {
    @Test("certificate names match a host by libpq's rules")
    func libpqNameRules() {
        let dns = PostgresCertificateNames(dnsNames: ["db.example", "*.farm.example"], ipAddresses: [[127, 0, 0, 1]], commonName: "other.example")
        #expect(dns.names(host: "db.example") && dns.names(host: "DB.Example"))
        #expect(dns.names(host: "a.farm.example"))
        #expect(!dns.names(host: "a.b.farm.example") && !dns.names(host: "farm.example") && !dns.names(host: ".farm.example"))
        // The common name does not count when there are DNS names; the IP address does not name a DNS host.
        #expect(!dns.names(host: "other.example"))
        #expect(!dns.names(host: "localhost"))
        #expect(dns.names(host: "127.0.0.1") && !dns.names(host: "127.0.0.2"))
        // No DNS names: the common name counts for a DNS host.
        let ipOnly = PostgresCertificateNames(dnsNames: [], ipAddresses: [[10, 0, 0, 5]], commonName: "db.example")
        #expect(ipOnly.names(host: "db.example") && !ipOnly.names(host: "10.0.0.6"))
        // A wildcard only as the whole leftmost label.
        #expect(!PostgresCertificateNames(dnsNames: ["d*.example"]).names(host: "db.example"))
        #expect(!PostgresCertificateNames(dnsNames: ["db.*.example"]).names(host: "db.farm.example"))
        let v6 = PostgresCertificateNames(ipAddresses: [PostgresCertificateNames.addressBytes("::1") ?? []])
        #expect(v6.names(host: "::1") && v6.description == "IP:::1")
    }

    @Test("the names of a real certificate: its DNS names, IP addresses and common name")
    func namesOfACertificate() async throws {
        let directory = try Scratch(prefix: "fg-pgcert")
        let certificates = try await TestCertificates.make(in: directory.path)
        let certificate = try #require(try NIOSSLCertificate.fromPEMFile(certificates.certificateFile).first)
        let names = PostgresCertificateNames(certificate)
        #expect(names.dnsNames == ["localhost"] && names.ipAddresses == [[127, 0, 0, 1]] && names.commonName == "127.0.0.1")
        #expect(names.description == "DNS:localhost, IP:127.0.0.1, CN=127.0.0.1")
        #expect(names.names(host: "localhost") && names.names(host: "127.0.0.1") && !names.names(host: "vm"))
    }

    static func tlsSettings() throws -> PostgresSettings {
        guard let url = ProcessInfo.processInfo.environment["FARMGATE_TEST_DATABASE_TLS_URL"], !url.isEmpty else { throw MissingTestDatabase() }
        var settings = try PostgresSettings(url: url)
        settings.connectTimeout = .seconds(3)
        settings.queryTimeout = .seconds(5)
        return settings
    }

    @Test(
        "verify-full refuses a certificate that does not name the URL's host, though it names the address connected to",
        .enabled(if: loopbackAlias != nil, "no other name for 127.0.0.1 in /etc/hosts"))
    func aHostTheCertificateDoesNotNameIsRefused() async throws {
        let alias = try #require(loopbackAlias)
        let settings = try Self.tlsSettings()
        #expect(await settings.probe(logger: testLogger) == .connected)
        #expect(await settings.checkServerCertificate() == .verified)
        var other = settings
        guard case .tcp(_, let port) = settings.endpoint else { throw MissingTestDatabase() }
        other.endpoint = .tcp(host: alias, port: port)
        let probe = await other.probe(logger: testLogger)
        guard case .misconfigured(let message) = probe else {
            Issue.record("a certificate for localhost and 127.0.0.1 was accepted for \(alias): \(probe)")
            return
        }
        #expect(message.contains("does not name the host name \(alias)") && message.contains("DNS:localhost, IP:127.0.0.1"), "\(message)")
        #expect(message.contains("reissue the certificate"), "\(message)")
        // The store refuses it before it uses the database, and its availability check does not take it for an outage.
        let store = try PostgresIngestStore(settings: other, logger: testLogger)
        _ = try await withRunning(store) { _ in
            await #expect(throws: PostgresStoreError.self) { try await store.migrate() }
        }
        let check = await other.unreachability(configuration: try other.connectionConfiguration(), logger: testLogger)
        #expect(check?.configuration == true && check?.reason.contains(alias) == true, "\(String(describing: check))")
    }

    @Test("a certificate that does not verify against the CA file is named as such, without BoringSSL's error stack")
    func aCertificateThatDoesNotVerify() async throws {
        var settings = try Self.tlsSettings()
        let directory = try Scratch(prefix: "fg-otherca")
        settings.caFile = try await TestCertificates.make(in: directory.path).caFile
        for probe in [await settings.probe(logger: testLogger), settings.classify(await Self.connectError(settings))] {
            guard case .misconfigured(let message) = probe else {
                Issue.record("a certificate from another CA was not named as such: \(probe)")
                continue
            }
            #expect(message.contains("does not verify against the CA file \(directory.path)/ca.pem"), "\(message)")
            #expect(!message.contains("BoringSSL") && !message.contains(".build") && !message.contains("handshake.cc"), "\(message)")
        }
        let check = await settings.unreachability(configuration: try settings.connectionConfiguration(), logger: testLogger)
        #expect(check?.configuration == true && check?.reason.contains("does not verify") == true, "\(String(describing: check))")
    }

    /// What postgres-nio's own connection throws with `settings` (the TLS check of ``PostgresSettings/probe(logger:)``
    /// comes first and answers before it).
    static func connectError(_ settings: PostgresSettings) async -> any Error {
        do {
            let connection = try await PostgresConnection.connect(configuration: try settings.connectionConfiguration(), id: 1, logger: testLogger)
            try? await connection.close()
            return CancellationError()
        } catch {
            return error
        }
    }

    @Test("a server without TLS under require or verify-full, and a password the URL lacks, are named with the fix")
    func noTLSAndNoPassword() async throws {
        try await FakePostgres.with(.asksForPassword) { port in
            var settings = PostgresSettings(endpoint: .tcp(host: "127.0.0.1", port: port), username: "farmgate", database: "farmgate", tls: .require)
            settings.connectTimeout = .seconds(3)
            for mode in [PostgresSettings.TLSMode.require, .verifyFull] {
                settings.tls = mode
                let probe = await settings.probe(logger: testLogger)
                #expect(probe.configurationProblem?.contains("the server does not offer TLS, and tls = \"\(mode.rawValue)\"") == true, "\(probe)")
            }
            settings.tls = .disable
            let probe = await settings.probe(logger: testLogger)
            #expect(probe.configurationProblem?.contains("the server asks user farmgate for a password and the URL has none") == true, "\(probe)")
        }
    }

    @Test("PgBouncer's 08P01 \"no such database\" is a refusal named at once, not an outage")
    func pgBouncerNoSuchDatabase() async throws {
        #expect(PostgresProbe.isFinal(sqlState: "08P01", message: "no such database: nodb"))
        #expect(!PostgresProbe.isFinal(sqlState: "08P01", message: "pgbouncer cannot connect to server"))
        try await FakePostgres.with(.noSuchDatabase) { port in
            var settings = PostgresSettings(endpoint: .tcp(host: "127.0.0.1", port: port), username: "farmgate", database: "nodb", tls: .disable)
            // Named at once, not after connect_timeout: well inside it even on a loaded machine (10.3 s once, with two
            // busy loops beside the first pass).
            settings.connectTimeout = .seconds(90)
            let started = ContinuousClock.now
            let probe = await settings.probe(logger: testLogger)
            #expect(probe == .refused(sqlState: "08P01", message: "no such database: nodb"), "\(probe)")
            #expect(started.duration(to: .now) < .seconds(30))
        }
    }
}

/// A TCP server that speaks just enough of PostgreSQL's protocol: declines TLS (`N`), and answers a startup message by
/// asking for an MD5 password, or with PgBouncer's `08P01 no such database`.
enum FakePostgres {
    enum Behaviour: Sendable { case asksForPassword, noSuchDatabase }

    static func with(_ behaviour: Behaviour, _ body: (Int) async throws -> Void) async throws {
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Handler(behaviour: behaviour)) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        defer { channel.close(promise: nil) }
        let port = try #require(channel.localAddress?.port)
        try await body(port)
    }

    final class Handler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let behaviour: Behaviour
        var pending = ByteBuffer()

        init(behaviour: Behaviour) { self.behaviour = behaviour }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            var incoming = unwrapInboundIn(data)
            pending.writeBuffer(&incoming)
            while let length = pending.getInteger(at: pending.readerIndex, as: Int32.self), length >= 8, pending.readableBytes >= Int(length),
                let code = pending.getInteger(at: pending.readerIndex + 4, as: Int32.self)
            {
                pending.moveReaderIndex(forwardBy: Int(length))
                var answer = context.channel.allocator.buffer(capacity: 64)
                if code == 80_877_103 {
                    answer.writeInteger(UInt8(ascii: "N"))
                } else if behaviour == .asksForPassword {
                    // AuthenticationMD5Password with a salt.
                    answer.writeInteger(UInt8(ascii: "R"))
                    answer.writeInteger(Int32(12))
                    answer.writeInteger(Int32(5))
                    answer.writeInteger(UInt32(0x0102_0304))
                } else {
                    var fields = context.channel.allocator.buffer(capacity: 64)
                    let fieldValues: [(UInt8, String)] = [
                        (UInt8(ascii: "S"), "FATAL"), (UInt8(ascii: "V"), "FATAL"), (UInt8(ascii: "C"), "08P01"), (UInt8(ascii: "M"), "no such database: nodb"),
                    ]
                    for (type, value) in fieldValues {
                        fields.writeInteger(type)
                        fields.writeString(value)
                        fields.writeInteger(UInt8(0))
                    }
                    fields.writeInteger(UInt8(0))
                    answer.writeInteger(UInt8(ascii: "E"))
                    answer.writeInteger(Int32(4 + fields.readableBytes))
                    answer.writeBuffer(&fields)
                    context.writeAndFlush(NIOAny(answer), promise: nil)
                    context.close(promise: nil)
                    return
                }
                context.writeAndFlush(NIOAny(answer), promise: nil)
            }
        }
    }
}
