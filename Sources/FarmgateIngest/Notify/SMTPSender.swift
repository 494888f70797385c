import CCurl
import FarmgateSupport
import Foundation

/// Sends e-mail through libcurl's SMTP: `smtp://host:port` with STARTTLS required (the connection is refused when the
/// server does not offer it, so no password or alert ever crosses the network in clear), or `smtps://` with TLS from
/// the first byte. AUTH (PLAIN, LOGIN, or what else the server offers and libcurl prefers) with the receiver's user
/// name and password, when it has them.
///
/// `curl_easy_perform` blocks: each message is sent on a thread of its own (``runOffPool(name:_:)``), never on the Swift
/// concurrency pool, with an easy handle created and freed there. A whole conversation is bounded by
/// ``NotifyConfiguration/requestTimeout``; cancelling the calling task aborts it within about a second.
public struct SMTPSender: Sendable {
    let connectTimeout: Duration
    let timeout: Duration
    let caFile: String?

    public init(configuration: NotifyConfiguration) {
        connectTimeout = configuration.connectTimeout
        timeout = configuration.requestTimeout
        caFile = configuration.caFile
    }

    /// Sends `message` through the server at `url` to each address of `envelope` (the message's recipients unless
    /// given), each in a transaction of its own (`MAIL FROM`, one `RCPT TO`, `DATA`) on one connection while the server
    /// keeps it: so a server's refusal of one address is that address's alone, and its reply says which.
    ///
    /// - Throws: ``DeliveryFailure``, its ``DeliveryFailure/reached`` the addresses of `envelope` that the server took
    ///   the message for before it failed. Not retryable for a refused login, a server without STARTTLS, a certificate
    ///   that does not verify, a permanent (5xx) SMTP answer, or addresses all refused for good; retryable for
    ///   everything else, a recipient refused for now (4xx: a full mailbox, greylisting) and a login or STARTTLS the
    ///   server turned down with a temporary reply included (`454 4.7.0 Temporary authentication failure`: its password
    ///   backend or TLS setup is down for the moment, which a retry outlasts). The whole send, every transaction, is
    ///   bounded by `request_timeout`.
    public func send(_ message: EmailMessage, envelope: [String]? = nil, url: String, username: String?, password: String?) async throws(DeliveryFailure) {
        guard SMTPCurlGlobal.initialized else { throw DeliveryFailure("curl_global_init failed", retryable: false) }
        let cancelled = AtomicFlag()
        let settings = self
        let recipients = envelope ?? message.recipients
        let outcome: Result<Void, DeliveryFailure>
        do {
            outcome = try await withTaskCancellationHandler {
                try await runOffPool(name: "farmgate-smtp") {
                    settings.perform(message, envelope: recipients, url: url, username: username, password: password, cancelled: cancelled)
                }
            } onCancel: {
                cancelled.set()
            }
        } catch {
            throw DeliveryFailure("cannot send mail: \(error)", retryable: true)
        }
        try outcome.get()
    }

    /// A recipient the server refused at `RCPT TO`, with its reply.
    private struct Refusal {
        var recipient: String
        var code: Int
        var reply: String
    }

    /// The SMTP conversations on the calling (dedicated) thread, one transaction per recipient on one easy handle (which
    /// keeps the connection between them).
    private func perform(_ message: EmailMessage, envelope: [String], url: String, username: String?, password: String?, cancelled: AtomicFlag) -> Result<
        Void, DeliveryFailure
    > {
        guard let handle = curl_easy_init() else { return .failure(DeliveryFailure("curl_easy_init failed", retryable: true)) }
        let errorBuffer = UnsafeMutablePointer<CChar>.allocate(capacity: fg_curl_error_size())
        errorBuffer.initialize(repeating: 0, count: fg_curl_error_size())
        let source = SMTPMessageSource(message.bytes, cancelled: cancelled)
        // Each transaction's one-address list; libcurl reads them until the handle is cleaned up.
        var lists: [UnsafeMutablePointer<curl_slist>] = []
        defer {
            curl_easy_cleanup(handle)
            for list in lists { curl_slist_free_all(list) }
            errorBuffer.deallocate()
        }
        let context = Unmanaged.passUnretained(source).toOpaque()
        var code = CURLE_OK
        func set(_ result: CURLcode) { if code == CURLE_OK { code = result } }
        set(fg_curl_setopt_long(handle, CURLOPT_NOSIGNAL, 1))
        set(fg_curl_setopt_pointer(handle, CURLOPT_ERRORBUFFER, errorBuffer))
        set(fg_curl_setopt_string(handle, CURLOPT_URL, url))
        set(fg_curl_setopt_string(handle, CURLOPT_PROTOCOLS_STR, "smtp,smtps"))
        set(fg_curl_setopt_long(handle, CURLOPT_USE_SSL, Int(CURLUSESSL_ALL.rawValue)))
        set(fg_curl_setopt_long(handle, CURLOPT_SSL_VERIFYPEER, 1))
        set(fg_curl_setopt_long(handle, CURLOPT_SSL_VERIFYHOST, 2))
        if let caFile { set(fg_curl_setopt_string(handle, CURLOPT_CAINFO, caFile)) }
        set(fg_curl_setopt_long(handle, CURLOPT_CONNECTTIMEOUT_MS, Int(connectTimeout.wholeMicroseconds / 1000)))
        // The QUIT libcurl sends when it closes the connection after a timeout waits for its reply under this alone
        // (libcurl's default: 120 s), not CURLOPT_TIMEOUT_MS: a server that took the body and went silent held a
        // delivery slot, and `serve`'s stop, for two minutes, and another instance took the claim over and sent the
        // message again. Whole seconds only (CURLOPT_SERVER_RESPONSE_TIMEOUT_MS is libcurl 8.6).
        set(fg_curl_setopt_long(handle, CURLOPT_SERVER_RESPONSE_TIMEOUT, max(1, Int((timeout.wholeMicroseconds + 999_999) / 1_000_000))))
        set(fg_curl_setopt_string(handle, CURLOPT_PROXY, ""))
        if let username, !username.isEmpty {
            set(fg_curl_setopt_string(handle, CURLOPT_USERNAME, username))
            set(fg_curl_setopt_string(handle, CURLOPT_PASSWORD, password ?? ""))
        }
        set(fg_curl_setopt_string(handle, CURLOPT_MAIL_FROM, "<\(message.from)>"))
        set(fg_curl_setopt_long(handle, CURLOPT_UPLOAD, 1))
        set(fg_curl_setopt_off(handle, CURLOPT_INFILESIZE_LARGE, curl_off_t(message.bytes.count)))
        set(
            fg_curl_setopt_read_function(handle) { buffer, size, count, context in
                guard let buffer, let context else { return 0 }
                return Unmanaged<SMTPMessageSource>.fromOpaque(context).takeUnretainedValue().read(into: buffer, capacity: size * count)
            })
        set(fg_curl_setopt_pointer(handle, CURLOPT_READDATA, context))
        // Every reply line of the server comes through the header callback (libcurl's pingpong protocols): the last one
        // with a refusal's code is the server's own words for it.
        set(
            fg_curl_setopt_header_function(handle) { buffer, size, count, context in
                guard let buffer, let context else { return 0 }
                Unmanaged<SMTPMessageSource>.fromOpaque(context).takeUnretainedValue().reply(UnsafeRawBufferPointer(start: buffer, count: size * count))
                return size * count
            })
        set(fg_curl_setopt_pointer(handle, CURLOPT_HEADERDATA, context))
        set(
            fg_curl_setopt_xferinfo_function(handle) { context, _, _, _, _ in
                guard let context else { return 0 }
                return Unmanaged<SMTPMessageSource>.fromOpaque(context).takeUnretainedValue().cancelled.isSet ? 1 : 0
            })
        set(fg_curl_setopt_pointer(handle, CURLOPT_XFERINFODATA, context))
        set(fg_curl_setopt_long(handle, CURLOPT_NOPROGRESS, 0))
        guard code == CURLE_OK else {
            return .failure(DeliveryFailure("libcurl refused an SMTP option: \(String(cString: curl_easy_strerror(code)))", retryable: false))
        }
        let server = SMTPSender.redacted(url)
        let deadline = ContinuousClock.now + timeout
        var reached: [String] = []
        var refusals: [Refusal] = []
        for recipient in envelope {
            let left = deadline - ContinuousClock.now
            guard left > .zero, !cancelled.isSet else {
                let failure = cancelled.isSet
                    ? DeliveryFailure("sending through \(server) was cancelled", retryable: true)
                    : DeliveryFailure("\(server) timed out after \(timeout) (before sending to \(recipient))", retryable: true)
                return .failure(failure.reaching(reached))
            }
            guard let list = curl_slist_append(nil, "<\(recipient)>") else {
                return .failure(DeliveryFailure("cannot allocate the recipient list", retryable: true).reaching(reached))
            }
            lists.append(list)
            code = CURLE_OK
            set(fg_curl_setopt_slist(handle, CURLOPT_MAIL_RCPT, list))
            set(fg_curl_setopt_long(handle, CURLOPT_TIMEOUT_MS, max(1, Int(left.wholeMicroseconds / 1000))))
            guard code == CURLE_OK else {
                return .failure(DeliveryFailure("libcurl refused an SMTP option: \(String(cString: curl_easy_strerror(code)))", retryable: false).reaching(reached))
            }
            source.rewind()
            errorBuffer[0] = 0
            let result = withExtendedLifetime(source) { curl_easy_perform(handle) }
            if result == CURLE_OK {
                reached.append(recipient)
                continue
            }
            var response = 0
            _ = fg_curl_getinfo_long(handle, CURLINFO_RESPONSE_CODE, &response)
            let detail = errorBuffer[0] != 0 ? String(cString: errorBuffer) : String(cString: curl_easy_strerror(result))
            // libcurl says "RCPT failed: <code>" for a refused RCPT TO; the message went to no one else in this
            // transaction, and the next recipient gets a transaction of its own.
            if result == CURLE_SEND_ERROR, detail.hasPrefix("RCPT failed"), (400..<600).contains(response) {
                refusals.append(Refusal(recipient: recipient, code: response, reply: source.lastReply(code: response)))
                continue
            }
            return .failure(failure(result, response: response, detail: detail, server: server).reaching(reached))
        }
        guard !refusals.isEmpty else { return .success(()) }
        let forGood = refusals.allSatisfy { (500..<600).contains($0.code) }
        let told = refusals.map { refusal in
            "\(refusal.recipient) (" + (refusal.reply.isEmpty ? "\(refusal.code)" : refusal.reply) + ")"
        }
        var text = "\(server) refused " + (refusals.count == 1 ? "the recipient " : "the recipients ") + told.joined(separator: ", ")
        if !reached.isEmpty { text += "; it took the message for " + reached.joined(separator: ", ") }
        text +=
            forGood
            ? "; check the address (`alert receiver update --email`), then `alert outbox retry` sends it to the recipients it has not reached"
            : "; it will be retried for the recipients it has not reached"
        return .failure(DeliveryFailure(text, retryable: !forGood, reached: reached))
    }

    /// The failure of a transaction that ended other than by a refused recipient.
    private func failure(_ result: CURLcode, response: Int, detail: String, server: String) -> DeliveryFailure {
        // libcurl reports a refused AUTH or STARTTLS the same way whatever the server's reply; the reply's class says
        // whether it is for good (5xx) or for now (4xx). Other replies (250: STARTTLS not offered, no mechanism in
        // common) are the server's settings: permanent too.
        let temporary = (400..<500).contains(response)
        switch result {
        case CURLE_LOGIN_DENIED where temporary:
            return DeliveryFailure("\(server) turned the login down for now with \(response) (\(detail)); it will be retried", retryable: true)
        case CURLE_LOGIN_DENIED:
            return DeliveryFailure(
                "\(server) refused the login" + (response >= 400 ? " with \(response)" : "") + " (\(detail)); check the receiver's --username and password",
                retryable: false)
        case CURLE_USE_SSL_FAILED where temporary:
            return DeliveryFailure("\(server) turned STARTTLS down for now with \(response) (\(detail)); it will be retried", retryable: true)
        case CURLE_USE_SSL_FAILED where (500..<600).contains(response):
            return DeliveryFailure(
                "\(server) refused STARTTLS with \(response) (\(detail)); farmgate never sends mail in clear: fix the server's TLS, or use smtps://",
                retryable: false)
        case CURLE_USE_SSL_FAILED:
            return DeliveryFailure(
                "\(server) does not offer STARTTLS (\(detail)); farmgate never sends mail in clear: use a server with STARTTLS, or smtps://",
                retryable: false)
        case CURLE_PEER_FAILED_VERIFICATION, CURLE_SSL_CACERT_BADFILE:
            return DeliveryFailure("the TLS certificate of \(server) does not verify (\(detail)); fix it, or set [notify] ca_file", retryable: false)
        case CURLE_OPERATION_TIMEDOUT:
            return DeliveryFailure("\(server) timed out after \(timeout) (\(detail))", retryable: true)
        case CURLE_ABORTED_BY_CALLBACK:
            return DeliveryFailure("sending through \(server) was cancelled", retryable: true)
        default:
            if (500..<600).contains(response) {
                return DeliveryFailure("\(server) refused the message with \(response) (\(detail))", retryable: false)
            }
            return DeliveryFailure("cannot send through \(server): \(detail)" + (response > 0 ? " (last reply \(response))" : ""), retryable: true)
        }
    }

    /// `smtp://host:port` without user information.
    static func redacted(_ url: String) -> String {
        guard var components = URLComponents(string: url) else { return "the SMTP server" }
        components.user = nil
        components.password = nil
        return components.string ?? "the SMTP server"
    }
}

/// `curl_global_init` once per process before the first handle (the agent's HTTPClient has its own, in another module;
/// libcurl counts the calls).
private enum SMTPCurlGlobal {
    static let initialized: Bool = fg_curl_global_init_default() == CURLE_OK
}

/// The message's bytes handed to libcurl's read callback, and the server's last reply from its header callback; used
/// only on the sending thread.
private final class SMTPMessageSource {
    let bytes: [UInt8]
    var offset = 0
    let cancelled: AtomicFlag

    init(_ bytes: [UInt8], cancelled: AtomicFlag) {
        self.bytes = bytes
        self.cancelled = cancelled
    }

    /// The server's last reply lines of this transaction, printable ASCII, at most 200 characters each.
    private var replies: [String] = []

    /// From the start again, for the next recipient's transaction.
    func rewind() {
        offset = 0
        replies = []
    }

    func reply(_ line: UnsafeRawBufferPointer) {
        let text = String(decoding: line.prefix(400).filter { (32..<127).contains($0) }, as: UTF8.self)
        guard !text.trimmingCharacters(in: .whitespaces).isEmpty else { return }
        replies.append(String(text.prefix(200)))
        if replies.count > 16 { replies.removeFirst() }
    }

    /// The last reply line with `code`: the refusal's own words, not the `221` of the QUIT libcurl sends after it.
    func lastReply(code: Int) -> String {
        replies.last { $0.hasPrefix("\(code)") } ?? ""
    }

    func read(into buffer: UnsafeMutablePointer<CChar>, capacity: Int) -> Int {
        let count = min(capacity, bytes.count - offset)
        guard count > 0 else { return 0 }
        bytes.withUnsafeBytes { source in
            UnsafeMutableRawBufferPointer(start: buffer, count: count).copyMemory(from: UnsafeRawBufferPointer(rebasing: source[offset..<(offset + count)]))
        }
        offset += count
        return count
    }
}

extension DeliveryFailure {
    /// The failure with `recipients` added to what it reached.
    func reaching(_ recipients: [String]) -> DeliveryFailure {
        var failure = self
        failure.reached = recipients + failure.reached.filter { !recipients.contains($0) }
        return failure
    }
}
