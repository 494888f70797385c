import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// A message the SMTP sink accepted.
public struct SMTPSinkMessage: Sendable, Hashable {
    /// The `MAIL FROM` address, without angle brackets.
    public var from: String
    /// The `RCPT TO` addresses, without angle brackets.
    public var recipients: [String]
    /// The DATA section as received, dot-stuffing undone, lines joined with CRLF.
    public var data: String
    /// Whether the conversation was in TLS (after STARTTLS) when the message was sent.
    public var tls: Bool
    /// The AUTH mechanism used (`PLAIN`, `LOGIN`), the user name and the password, when the client logged in.
    public var mechanism: String?
    public var username: String?
    public var password: String?
}

/// A small SMTP server on 127.0.0.1 for tests: EHLO, STARTTLS with a test certificate (NIOSSL), AUTH PLAIN and LOGIN,
/// MAIL/RCPT/DATA; it records each message and answers `250`. Real TLS and a real protocol, so that libcurl's SMTP
/// client is tested as it talks to a mail server.
///
/// Options make it misbehave: no STARTTLS on offer, a login refused, a recipient refused with a permanent error (or,
/// by ``deferRecipients(_:)``, a temporary one), a STARTTLS or AUTH turned down with a reply of the test's choosing.
public final class SMTPSink: Sendable {
    public struct Options: Sendable {
        /// Offer STARTTLS in the EHLO answer. Default true.
        public var offerSTARTTLS = true
        /// The AUTH mechanisms offered (after TLS). Default PLAIN and LOGIN.
        public var mechanisms = ["PLAIN", "LOGIN"]
        /// The only user name and password accepted; nil accepts any login.
        public var credentials: (username: String, password: String)?
        /// Recipients refused with `550`.
        public var refusedRecipients: Set<String> = []
        /// The reply to every `STARTTLS` instead of `220` (TLS does not start), such as
        /// `454 4.7.0 TLS not available due to temporary reason`. Default nil.
        public var startTLSReply: String?
        /// The reply to every `AUTH` instead of the exchange, such as `454 4.7.0 Temporary authentication failure`.
        /// Default nil.
        public var authReply: String?
        /// Take the message's body and never answer its final "." or anything after it (a server that stalls after the
        /// body). Default false.
        public var silentAfterData = false

        public init() {}
    }

    public let port: Int
    private let channel: any Channel
    private let recorder: Recorder

    /// Starts listening on an ephemeral port of 127.0.0.1 with the certificate and key (PEM files) for STARTTLS.
    public init(certificate: String, key: String, options: Options = Options()) async throws {
        let tls = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) }, privateKey: .privateKey(try NIOSSLPrivateKey(file: key, format: .pem)))
        let context = try NIOSSLContext(configuration: tls)
        let recorder = Recorder()
        self.recorder = recorder
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(SMTPSessionHandler(tls: context, options: options, recorder: recorder))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        port = channel.localAddress?.port ?? 0
    }

    /// `smtp://127.0.0.1:PORT`.
    public var url: String { "smtp://127.0.0.1:\(port)" }

    public var messages: [SMTPSinkMessage] { recorder.messages }

    /// The commands received, in order, across connections (AUTH arguments replaced by `***`).
    public var commands: [String] { recorder.commands }

    /// Refuses `recipients` at `RCPT TO` with `451 4.2.0 mailbox busy, try later` from now on (an empty set ends it).
    public func deferRecipients(_ recipients: Set<String>) { recorder.setDeferred(recipients) }

    /// Waits until at least `count` messages arrived, or `timeout` passed. Returns whether they did.
    public func waitForMessages(_ count: Int, timeout: Duration = .seconds(10)) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if recorder.messages.count >= count { return true }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return recorder.messages.count >= count
    }

    public func stop() async {
        try? await channel.close()
    }

    final class Recorder: Sendable {
        private let state = Mutex<(messages: [SMTPSinkMessage], commands: [String])>(([], []))
        private let deferredRecipients = Mutex<Set<String>>([])
        var messages: [SMTPSinkMessage] { state.withLock { $0.messages } }
        var commands: [String] { state.withLock { $0.commands } }
        var deferred: Set<String> { deferredRecipients.withLock { $0 } }
        func setDeferred(_ recipients: Set<String>) { deferredRecipients.withLock { $0 = recipients } }
        func record(_ message: SMTPSinkMessage) { state.withLock { $0.messages.append(message) } }
        func command(_ line: String) { state.withLock { $0.commands.append(line) } }
    }
}

/// One SMTP conversation. Lines end in CRLF; the handler splits them itself and keeps state between reads.
private final class SMTPSessionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase {
        case command
        case data
        case authPlain
        case authLoginUser
        case authLoginPassword(String)
    }

    let tls: NIOSSLContext
    let options: SMTPSink.Options
    let recorder: SMTPSink.Recorder
    var buffer = ByteBuffer()
    var phase = Phase.command
    /// Set once the body was taken in ``SMTPSink/Options/silentAfterData`` mode.
    var silent = false
    var inTLS = false
    var from: String?
    var recipients: [String] = []
    var dataLines: [String] = []
    var login: (mechanism: String, username: String, password: String)?

    init(tls: NIOSSLContext, options: SMTPSink.Options, recorder: SMTPSink.Recorder) {
        self.tls = tls
        self.options = options
        self.recorder = recorder
    }

    func channelActive(context: ChannelHandlerContext) {
        reply(context, "220 farmgate-test-sink ESMTP")
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        buffer.writeBuffer(&incoming)
        while true {
            let view = buffer.readableBytesView
            guard let end = view.firstRange(of: [13, 10]) else { break }
            let length = end.lowerBound - view.startIndex
            let line = buffer.readString(length: length) ?? ""
            buffer.moveReaderIndex(forwardBy: 2)
            handle(line, context: context)
        }
    }

    private func reply(_ context: ChannelHandlerContext, _ text: String) {
        context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: text + "\r\n")), promise: nil)
    }

    private func handle(_ line: String, context: ChannelHandlerContext) {
        // Stalled (``SMTPSink/Options/silentAfterData``): nothing is answered any more, QUIT included.
        if silent { return }
        switch phase {
        case .data:
            if line == "." {
                phase = .command
                recorder.record(
                    SMTPSinkMessage(
                        from: from ?? "", recipients: recipients, data: dataLines.joined(separator: "\r\n"), tls: inTLS, mechanism: login?.mechanism,
                        username: login?.username, password: login?.password))
                dataLines = []
                if options.silentAfterData {
                    silent = true
                    return
                }
                reply(context, "250 2.0.0 queued")
            } else {
                dataLines.append(line.hasPrefix(".") ? String(line.dropFirst()) : line)
            }
            return
        case .authPlain:
            phase = .command
            finishPlain(line, context: context)
            return
        case .authLoginUser:
            phase = .authLoginPassword(decode(line))
            reply(context, "334 UGFzc3dvcmQ6")
            return
        case .authLoginPassword(let username):
            phase = .command
            finishLogin(mechanism: "LOGIN", username: username, password: decode(line), context: context)
            return
        case .command:
            break
        }
        let verb = line.split(separator: " ", maxSplits: 1).first.map { $0.uppercased() } ?? ""
        recorder.command(verb == "AUTH" ? "AUTH " + (line.split(separator: " ").dropFirst().first.map(String.init) ?? "") + " ***" : line)
        switch verb {
        case "EHLO", "HELO":
            var lines = ["250-farmgate-test-sink"]
            if options.offerSTARTTLS, !inTLS { lines.append("250-STARTTLS") }
            if inTLS || !options.offerSTARTTLS, !options.mechanisms.isEmpty { lines.append("250-AUTH " + options.mechanisms.joined(separator: " ")) }
            lines.append("250 8BITMIME")
            reply(context, lines.joined(separator: "\r\n"))
        case "STARTTLS":
            guard options.offerSTARTTLS, !inTLS else { return reply(context, "502 5.5.1 not offered") }
            if let answer = options.startTLSReply { return reply(context, answer) }
            reply(context, "220 2.0.0 ready to start TLS")
            inTLS = true
            try? context.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls), position: .first)
        case "AUTH":
            let parts = line.split(separator: " ").map(String.init)
            let mechanism = parts.count > 1 ? parts[1].uppercased() : ""
            guard options.mechanisms.contains(mechanism) else { return reply(context, "504 5.5.4 mechanism not offered") }
            if let answer = options.authReply { return reply(context, answer) }
            if mechanism == "PLAIN" {
                if parts.count > 2 { finishPlain(parts[2], context: context) } else {
                    phase = .authPlain
                    reply(context, "334 ")
                }
            } else {
                if parts.count > 2 {
                    phase = .authLoginPassword(decode(parts[2]))
                    reply(context, "334 UGFzc3dvcmQ6")
                } else {
                    phase = .authLoginUser
                    reply(context, "334 VXNlcm5hbWU6")
                }
            }
        case "MAIL":
            from = address(line)
            recipients = []
            reply(context, "250 2.1.0 ok")
        case "RCPT":
            let recipient = address(line)
            if options.refusedRecipients.contains(recipient) { return reply(context, "550 5.1.1 no such user") }
            if recorder.deferred.contains(recipient) { return reply(context, "451 4.2.0 mailbox busy, try later") }
            recipients.append(recipient)
            reply(context, "250 2.1.5 ok")
        case "DATA":
            guard from != nil, !recipients.isEmpty else { return reply(context, "503 5.5.1 need MAIL and RCPT first") }
            phase = .data
            reply(context, "354 end with <CRLF>.<CRLF>")
        case "RSET":
            from = nil
            recipients = []
            reply(context, "250 ok")
        case "NOOP":
            reply(context, "250 ok")
        case "QUIT":
            reply(context, "221 bye")
            context.close(promise: nil)
        default:
            reply(context, "500 5.5.2 unknown command")
        }
    }

    private func finishPlain(_ encoded: String, context: ChannelHandlerContext) {
        let parts = decode(encoded).split(separator: "\u{0}", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 3 else { return reply(context, "501 5.5.2 malformed PLAIN") }
        finishLogin(mechanism: "PLAIN", username: parts[1], password: parts[2], context: context)
    }

    private func finishLogin(mechanism: String, username: String, password: String, context: ChannelHandlerContext) {
        if let credentials = options.credentials, credentials.username != username || credentials.password != password {
            return reply(context, "535 5.7.8 authentication failed")
        }
        login = (mechanism, username, password)
        reply(context, "235 2.7.0 authenticated")
    }

    private func decode(_ text: String) -> String {
        Data(base64Encoded: text.trimmingCharacters(in: .whitespaces)).map { String(decoding: $0, as: UTF8.self) } ?? ""
    }

    private func address(_ line: String) -> String {
        guard let open = line.firstIndex(of: "<"), let close = line.lastIndex(of: ">"), open < close else { return "" }
        return String(line[line.index(after: open)..<close])
    }
}
