import AsyncHTTPClient
import FarmgateSupport
import Foundation
public import Logging
import NIOCore
import NIOHTTP1
import NIOSSL

/// Posts webhook notifications with AsyncHTTPClient: non-blocking I/O on the NIO event loops the ingest already runs,
/// so that a receiver that hangs holds no thread, only its connection until ``NotifyConfiguration/requestTimeout``.
///
/// Redirects are not followed (a notification is posted where the receiver says, or fails visibly). TLS is verified
/// against the system CAs or ``NotifyConfiguration/caFile``. Response bodies are read up to 4 KiB, for the error message.
public final class WebhookSender: Sendable {
    private let client: HTTPClient
    private let timeout: Duration

    /// - Throws: ``DeliveryFailure`` when the CA file cannot be loaded.
    public init(configuration: NotifyConfiguration, logger: Logger) throws {
        var tls = TLSConfiguration.makeClientConfiguration()
        if let roots = try Self.trustRoots(configuration) { tls.trustRoots = roots }
        let http = HTTPClient.Configuration(
            tlsConfiguration: tls, redirectConfiguration: .disallow,
            timeout: .init(connect: .nanoseconds(Int64(configuration.connectTimeout.wholeMicroseconds) * 1000)), proxy: nil,
            decompression: .disabled)
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

    /// Posts `body` to `url` with `headers`; returns the status when it is 2xx.
    ///
    /// - Throws: ``DeliveryFailure``: retryable for 5xx, 408, 425, 429 and every transport error (refused, reset,
    ///   timed out); not retryable for other statuses.
    public func post(_ url: String, headers: [(String, String)], body: [UInt8]) async throws(DeliveryFailure) -> Int {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        for (name, value) in headers { request.headers.add(name: name, value: value) }
        request.headers.replaceOrAdd(name: "Content-Type", value: "application/json")
        request.headers.replaceOrAdd(name: "User-Agent", value: "farmgate-ingest")
        request.body = .bytes(ByteBuffer(bytes: body))
        let status: Int
        let retryAfter: String?
        var text = ""
        do {
            let response = try await client.execute(request, timeout: .nanoseconds(Int64(timeout.wholeMicroseconds) * 1000))
            status = Int(response.status.code)
            retryAfter = response.headers.first(name: "Retry-After")
            var collected = ByteBuffer()
            for try await var part in response.body {
                if collected.readableBytes < 4096 {
                    var slice = part.readSlice(length: min(part.readableBytes, 4096 - collected.readableBytes)) ?? ByteBuffer()
                    collected.writeBuffer(&slice)
                }
            }
            text = String(decoding: collected.readableBytesView, as: UTF8.self)
        } catch let error as HTTPClientError where error == .deadlineExceeded || error == .readTimeout || error == .connectTimeout {
            throw DeliveryFailure("timed out after \(timeout) posting to \(Self.redacted(url)) (\(error))", retryable: true)
        } catch {
            throw DeliveryFailure("no answer from \(Self.redacted(url)): \(error)", retryable: true)
        }
        guard (200..<300).contains(status) else {
            let retryable = status >= 500 || [408, 425, 429].contains(status)
            let detail = text.trimmingCharacters(in: .whitespacesAndNewlines).prefix(300)
            throw DeliveryFailure(
                "HTTP \(status) from \(Self.redacted(url))" + (detail.isEmpty ? "" : ": \(detail)"), retryable: retryable,
                retryAfter: retryAfter.flatMap { Int($0.trimmingCharacters(in: .whitespaces)) }.map { .seconds(max(0, $0)) })
        }
        return status
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
