import AsyncHTTPClient
import FarmgateSupport
import FarmgateWire
import Foundation
public import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization

/// Posts webhook notifications with AsyncHTTPClient: non-blocking I/O on the NIO event loops the ingest already runs,
/// so that a receiver that hangs holds no thread, only its connection until ``NotifyConfiguration/requestTimeout``.
///
/// That one limit covers the whole exchange: connecting, the request, the response head and its body.
/// AsyncHTTPClient's own deadline ends when the head arrives, so without a limit of its own a receiver that answers
/// `200` and then trickles its body, or never ends it, would hold the delivery (its receiver's `per_receiver` slot,
/// one of `max_in_flight`, and a graceful stop) for ever. The body is read up to ``bodyExcerptLimit``, the excerpt
/// `last_error` keeps; the connection is then closed rather than drained.
///
/// The status line is the receiver's answer: a 2xx head is a delivery even when its body does not end within the
/// limit (the receiver said it took the notification; sending it again could only repeat it). Redirects are not
/// followed and a 3xx is permanent (a notification is posted where the receiver says, or fails visibly). TLS is
/// verified against the system CAs or ``NotifyConfiguration/caFile``; a certificate that does not verify (another CA,
/// expired, not for the host name) is permanent too: it does not fix itself in the hour the retries last, and the
/// dead letter says what is wrong at once.
public final class WebhookSender: Sendable {
    /// How much of a response body is read: only an excerpt is kept, for `last_error`.
    static let bodyExcerptLimit = 4096

    private let client: HTTPClient
    private let timeout: Duration

    /// - Throws: ``DeliveryFailure`` when the CA file cannot be loaded.
    public init(configuration: NotifyConfiguration, logger: Logger) throws {
        var tls = TLSConfiguration.makeClientConfiguration()
        if let roots = try Self.trustRoots(configuration) { tls.trustRoots = roots }
        var http = HTTPClient.Configuration(
            tlsConfiguration: tls, redirectConfiguration: .disallow,
            timeout: .init(connect: .nanoseconds(configuration.connectTimeout.wholeNanoseconds)), proxy: nil,
            decompression: .disabled)
        // A connection that cannot be made fails the attempt at once, with its own error: the outbox retries with its
        // backoff anyway, and AsyncHTTPClient's retrying until the connect timeout would turn a certificate that does
        // not verify (permanent) into a timeout (retried) whenever the request timeout struck first.
        http.connectionPool.retryConnectionEstablishment = false
        // Receivers on one host and port (several paths of one server) share AsyncHTTPClient's per-host pool, by default
        // 8 connections: hung receivers there held them all, and a healthy receiver's requests waited for a connection
        // until the connect timeout and went dead. The deliveries' own limits (per_receiver, max_in_flight) are the
        // bound: the pool never makes anyone wait.
        http.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = max(8, configuration.maxInFlight)
        client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: http, backgroundActivityLogger: logger)
        timeout = configuration.requestTimeout
    }

    /// The CAs of `[notify] ca_file`, or nil for the system's. Throws when the file holds no PEM certificate.
    @discardableResult
    static func trustRoots(_ configuration: NotifyConfiguration) throws(DeliveryFailure) -> NIOSSLTrustRoots? {
        guard let caFile = configuration.caFile else { return nil }
        do {
            let certificates = try NIOSSLCertificate.fromPEMFile(caFile)
            guard !certificates.isEmpty else { throw DeliveryFailure("no certificate", retryable: false) }
            return .certificates(certificates)
        } catch {
            throw DeliveryFailure("cannot load the CA file \(caFile) ([notify] ca_file): \(error); it must hold PEM certificates", retryable: false)
        }
    }

    /// Posts `body` to `url` with `headers`, within ``NotifyConfiguration/requestTimeout`` from start to end.
    ///
    /// - Returns: A short account of the 2xx answer (`HTTP 200`), saying so when its body did not end in time.
    /// - Throws: ``DeliveryFailure``: retryable for 5xx, 408, 425, 429 (with the `Retry-After` of a 429 or 503) and
    ///   every transport error (refused, reset, timed out); not retryable for a 3xx, other 4xx, and a TLS certificate
    ///   that does not verify.
    public func post(_ url: String, headers: [(String, String)], body: [UInt8]) async throws(DeliveryFailure) -> String {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        request.headers.replaceOrAdd(name: "Content-Type", value: "application/json")
        request.headers.replaceOrAdd(name: "User-Agent", value: "farmgate-ingest")
        request.body = .bytes(ByteBuffer(bytes: body))

        let progress = ExchangeProgress()
        let (result, ending) = await exchange(request, progress: progress)
        let receiver = Self.redacted(url)
        guard let answer = progress.answer else {
            // No head: the error says why, unless the limit or a stop cut the exchange short.
            if case .failure(let error) = result, let problem = Self.certificateProblem(error) {
                throw DeliveryFailure(
                    "the TLS certificate of \(receiver) does not verify (\(problem.what): \(error)); \(problem.fix), then `farmgate-ingest alert outbox retry`",
                    retryable: false)
            }
            switch ending {
            case .timedOut:
                throw DeliveryFailure("timed out after \(timeout) posting to \(receiver) (no answer)", retryable: true)
            case .cancelled:
                throw DeliveryFailure("posting to \(receiver) was cancelled (the ingest is stopping)", retryable: true)
            case .finished:
                break
            }
            switch result {
            case .failure(let error as HTTPClientError) where error == .deadlineExceeded || error == .readTimeout || error == .connectTimeout:
                throw DeliveryFailure("timed out after \(timeout) posting to \(receiver) (\(error))", retryable: true)
            case .failure(let error):
                throw DeliveryFailure("no answer from \(receiver): \(Self.transportProblem(error))", retryable: true)
            case .success, nil:
                throw DeliveryFailure("no answer from \(receiver)", retryable: true)
            }
        }

        var unfinished = ""
        if !answer.ended {
            switch (ending, result) {
            case (.timedOut, _): unfinished = "its body did not end within \(timeout)"
            case (.cancelled, _): unfinished = "its body was cut off: the ingest is stopping"
            case (.finished, .failure(let error)): unfinished = "its body broke off: \(error)"
            case (.finished, _): unfinished = "its body broke off"
            }
        }
        let status = answer.status
        if (200..<300).contains(status) {
            return "HTTP \(status)" + (unfinished.isEmpty ? "" : " (\(unfinished); the status counts)")
        }
        let excerpt = NotificationText.singleLine(String(decoding: answer.excerpt, as: UTF8.self).trimmingWhitespace()).prefix(300)
        var message = "HTTP \(status) from \(receiver)" + (excerpt.isEmpty ? "" : ": \(excerpt)") + (unfinished.isEmpty ? "" : " (\(unfinished))")
        if (300..<400).contains(status) {
            message += "; redirects are not followed: set the receiver's --webhook to the URL it redirects to"
        }
        let retryable = status >= 500 || [408, 425, 429].contains(status)
        let retryAfter = [429, 503].contains(status) ? answer.retryAfter.flatMap { WebhookRetryAfter.delay($0, now: .now()) } : nil
        throw DeliveryFailure(message, retryable: retryable, retryAfter: retryAfter)
    }

    /// How an exchange ended.
    private enum Ending: Sendable {
        case finished, timedOut, cancelled
    }

    /// Runs the exchange against the request timeout: returns how the exchange task ended (nil when it never ran) and
    /// whether the limit (or a stop) cut it short. Never takes longer than the timeout plus the moment a cancelled
    /// AsyncHTTPClient request takes to close its connection.
    private func exchange(_ request: HTTPClientRequest, progress: ExchangeProgress) async -> (Result<Void, any Error>?, Ending) {
        enum Event: Sendable {
            case exchanged(Result<Void, any Error>)
            case timer(cancelled: Bool)
        }
        let timeout = self.timeout
        let client = self.client
        return await withTaskGroup(of: Event.self) { group in
            group.addTask {
                do {
                    // AsyncHTTPClient's deadline, the same instant, gives its own error while the head is awaited.
                    let response = try await client.execute(request, deadline: .now() + .nanoseconds(timeout.wholeNanoseconds))
                    progress.head(status: Int(response.status.code), retryAfter: response.headers.first(name: "Retry-After"))
                    var excerpt: [UInt8] = []
                    for try await part in response.body {
                        excerpt += part.readableBytesView.prefix(Self.bodyExcerptLimit - excerpt.count)
                        progress.body(excerpt, ended: false)
                        // Leaving the loop drops the body: AsyncHTTPClient closes the connection instead of draining it.
                        if excerpt.count >= Self.bodyExcerptLimit { break }
                    }
                    progress.body(excerpt, ended: true)
                    return .exchanged(.success(()))
                } catch {
                    return .exchanged(.failure(error))
                }
            }
            group.addTask {
                try? await Task.sleep(for: timeout)
                return .timer(cancelled: Task.isCancelled)
            }
            var result: Result<Void, any Error>?
            var ending = Ending.finished
            for await event in group {
                switch event {
                case .exchanged(let outcome):
                    result = outcome
                    group.cancelAll()
                case .timer(let cancelled):
                    guard result == nil else { continue }
                    ending = cancelled ? .cancelled : .timedOut
                    group.cancelAll()
                }
            }
            return (result, ending)
        }
    }

    /// What is wrong with the receiver's certificate and what fixes it, when `error` is a failed verification of it;
    /// nil for any other error (a TLS handshake that failed for another reason is retried, like any transport error).
    static func certificateProblem(_ error: any Error) -> (what: String, fix: String)? {
        let renew = "renew or replace the receiver's certificate, or set [notify] ca_file to the CA it chains to"
        let rename = "give the receiver's --webhook a host name its certificate holds, or a certificate for this one"
        if let error = error as? NIOSSLExtraError {
            guard error == .failedToValidateHostname || error == .serverHostnameImpossibleToMatch else { return nil }
            return ("it is not for this host name", rename)
        }
        guard let error = error as? NIOSSLError else { return nil }
        switch error {
        case .handshakeFailed(let inner) where String(describing: inner).contains("CERTIFICATE_VERIFY_FAILED"):
            // BoringSSL's error stack says only that; the cause is one of these.
            return ("it is expired, not yet valid, self-signed or from a CA that is not trusted", renew)
        case .noCertificateToValidate:
            return ("the receiver presented none", renew)
        case .unableToValidateCertificate:
            return ("it cannot be checked against the host name", rename)
        default:
            return nil
        }
    }

    /// A transport error in words: NIO describes a refused connection as "connection reset (error set): Connection
    /// refused (errno: 111)", which sent people looking for a reset.
    static func transportProblem(_ error: any Error) -> String {
        if let error = error as? IOError {
            switch error.errnoCode {
            case ECONNREFUSED: return "connection refused (nothing listens there: is the receiver running, and is the port right?)"
            case ECONNRESET: return "the receiver reset the connection"
            case EHOSTUNREACH, ENETUNREACH: return "no route to the receiver's host (errno \(error.errnoCode))"
            case ETIMEDOUT: return "connecting timed out"
            default: return "\(error)"
            }
        }
        if let error = error as? NIOConnectionError {
            if let failure = error.connectionErrors.first { return transportProblem(failure.error) }
            if error.dnsAError != nil || error.dnsAAAAError != nil { return "the host name \(error.host) does not resolve" }
        }
        if let error = error as? HTTPClientError, error == .remoteConnectionClosed {
            return "the receiver closed the connection without answering"
        }
        return "\(error)"
    }

    /// Closes the client's connections.
    public func shutdown() async {
        try? await client.shutdown()
    }

    /// `scheme://host:port/…`: webhook paths and queries often hold a token (chat services), so they are never printed.
    static func redacted(_ url: String) -> String {
        AlertDeliveryAdmin.redactedURL(url)
    }
}

/// What a receiver has answered so far, shared by the exchange and the request timeout that may cut it short.
private final class ExchangeProgress: Sendable {
    struct Answer: Sendable {
        var status: Int
        var retryAfter: String?
        /// The start of the body, at most ``WebhookSender/bodyExcerptLimit`` bytes.
        var excerpt: [UInt8] = []
        /// Whether the body was read to its end (or to the excerpt's limit).
        var ended = false
    }

    private let state = Mutex<Answer?>(nil)

    /// Nil until the response head arrived.
    var answer: Answer? { state.withLock { $0 } }

    func head(status: Int, retryAfter: String?) {
        state.withLock { $0 = Answer(status: status, retryAfter: retryAfter) }
    }

    func body(_ excerpt: [UInt8], ended: Bool) {
        state.withLock { answer in
            answer?.excerpt = excerpt
            answer?.ended = ended
        }
    }
}
