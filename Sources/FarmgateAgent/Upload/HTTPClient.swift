import CCurl
import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization

/// One header of a request or a response.
public struct HTTPHeader: Hashable, Sendable {
    public var name: String
    public var value: String

    public init(_ name: String, _ value: String) {
        self.name = name
        self.value = value
    }
}

/// What an HTTP server answered.
public struct HTTPResponse: Hashable, Sendable {
    /// The status code of the final response (interim 1xx responses are skipped).
    public var status: Int
    /// The headers of the final response, in the order received.
    public var headers: [HTTPHeader]
    /// The body, at most ``HTTPClient/Configuration/maxResponseBytes`` long.
    public var body: [UInt8]
    /// True when the server sent more than ``HTTPClient/Configuration/maxResponseBytes``; the rest was discarded.
    public var bodyTruncated: Bool
    /// The HTTP version the exchange used (`CURLINFO_HTTP_VERSION`): HTTP/2 over `https` when the server offers it by
    /// ALPN, else HTTP/1.1.
    public var httpVersion: HTTPVersion
    /// How many connections libcurl opened for this exchange (`CURLINFO_NUM_CONNECTS`): 0 when it reused the open one.
    public var newConnections: Int

    public init(
        status: Int, headers: [HTTPHeader], body: [UInt8], bodyTruncated: Bool = false, httpVersion: HTTPVersion = .http1_1, newConnections: Int = 0
    ) {
        self.status = status
        self.headers = headers
        self.body = body
        self.bodyTruncated = bodyTruncated
        self.httpVersion = httpVersion
        self.newConnections = newConnections
    }

    /// The value of the first header called `name` (compared case-insensitively), or nil.
    public func header(_ name: String) -> String? {
        headers.first { $0.name.lowercased() == name.lowercased() }?.value
    }
}

/// The HTTP version of an exchange.
public enum HTTPVersion: String, Hashable, Sendable {
    case http1_0 = "HTTP/1.0"
    case http1_1 = "HTTP/1.1"
    case http2 = "HTTP/2"
    case http3 = "HTTP/3"
    /// libcurl reported none (no response) or one this client does not know.
    case unknown

    init(curlValue: Int) {
        switch curlValue {
        case FG_CURL_HTTP_VERSION_1_0: self = .http1_0
        case FG_CURL_HTTP_VERSION_1_1: self = .http1_1
        case FG_CURL_HTTP_VERSION_2_0: self = .http2
        case FG_CURL_HTTP_VERSION_3: self = .http3
        default: self = .unknown
        }
    }
}

/// Why an HTTP exchange produced no response. ``description`` says what happened in words, with libcurl's detail.
public struct HTTPClientError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of failure it was.
    public enum Kind: String, Hashable, Sendable {
        /// Nobody accepted the connection (refused, unreachable, DNS failure).
        case connectFailed = "cannot connect"
        /// The connect timeout, the request timeout or the low-speed limit ran out.
        case timedOut = "timed out"
        /// The TLS handshake or the certificate check failed.
        case tls = "TLS failure"
        /// The request was abandoned because its task was cancelled.
        case cancelled = "cancelled"
        /// The client could not be set up (a CA file that cannot be read, an option libcurl refuses).
        case configuration = "configuration error"
        /// Anything else libcurl reported (connection reset mid-response, malformed response, ...).
        case transport = "transport error"
        /// The caller's check just before the request would have left (`beforeSending`) said it must not go; nothing of
        /// the request was sent.
        case withheld = "withheld before sending"
    }

    public var kind: Kind
    /// Whether the request may have reached the server although no answer came (a timeout, a connection lost after
    /// sending, a cancellation): what the server did with it is unknown. Not for a connection never made, a TLS handshake
    /// that failed, a request withheld or a client that could not be set up.
    public var mayHaveReachedServer: Bool {
        switch kind {
        case .connectFailed, .tls, .configuration, .withheld: false
        case .timedOut, .cancelled, .transport: true
        }
    }

    /// libcurl's `CURLcode`, or 0 when the error did not come from libcurl.
    public var curlCode: Int
    /// A short summary such as `connection refused` or `timed out`.
    public var summary: String
    /// libcurl's own message (`CURLOPT_ERRORBUFFER`, else `curl_easy_strerror`).
    public var detail: String

    public init(kind: Kind, curlCode: Int = 0, summary: String? = nil, detail: String) {
        self.kind = kind
        self.curlCode = curlCode
        self.summary = summary ?? kind.rawValue
        self.detail = detail
    }

    public var description: String { detail.isEmpty ? summary : "\(summary): \(detail)" }
}

/// An HTTP client over one libcurl easy handle, reused for every request so that the connection stays open (keep-alive).
///
/// Over `https` it asks for HTTP/2 by ALPN (``Configuration/http2``) and falls back to HTTP/1.1 when the server does not
/// offer it; over plain `http` it speaks HTTP/1.1. On HTTP/2 the headers that repeat from one request to the next
/// (path, authorization, content type, user agent) cost a byte or two each through HPACK. It adds no header of its own
/// beyond `Host`, `User-Agent` and `Content-Length` (no `Accept: */*`, no `Expect: 100-continue`, no made-up
/// `Content-Type`).
///
/// The handle lives on a thread of its own (``ThreadOwned``): `curl_easy_perform` blocks, and never runs on the Swift
/// concurrency pool. Requests run one at a time, in the order they were made.
///
/// TLS peer and host verification are always on, against the system CAs or ``Configuration/caFile``. Redirects are not
/// followed. Only `http` and `https` URLs are allowed.
///
/// Proxies: with ``Configuration/useProxyEnvironment`` (the default) libcurl honours the usual environment variables
/// `http_proxy` (lower case only), `https_proxy`/`HTTPS_PROXY`, `all_proxy` and `no_proxy`, so that a site behind a proxy
/// works the way `curl` does there. Set it to false to ignore them and always connect directly.
///
/// ```swift
/// let client = try HTTPClient(configuration: .init(), logger: logger)
/// let response = try await client.post("https://ingest.example.net/v1/batches", headers: [HTTPHeader("Content-Type", "application/json")], body: bytes)
/// ```
public final class HTTPClient: Sendable {
    /// How the client connects and how long it waits.
    public struct Configuration: Sendable, Hashable {
        /// The longest time to establish a connection, TLS handshake included. Default 10 s.
        public var connectTimeout: Duration
        /// The longest time a whole request may take, connecting included. Default 30 s.
        public var requestTimeout: Duration
        /// A PEM file of CA certificates to trust instead of the system CAs. Default nil: the system CAs.
        public var caFile: String?
        /// A transfer slower than ``lowSpeedLimit`` bytes per second for ``lowSpeedTime`` is abandoned as hanging,
        /// even before ``requestTimeout``. Defaults 1 byte/s and 20 s (or the request timeout, if that is shorter).
        public var lowSpeedLimit: Int
        public var lowSpeedTime: Duration
        /// Response bodies are cut at this many bytes (the rest is read and discarded). Default 1 MiB.
        public var maxResponseBytes: Int
        /// Whether libcurl honours the proxy environment variables (see ``HTTPClient``). Default true.
        public var useProxyEnvironment: Bool
        /// The `User-Agent` header. Default `farmgate`.
        public var userAgent: String
        /// Whether HTTP/2 is asked for over `https` (by ALPN; HTTP/1.1 when the server offers only that). False keeps
        /// HTTP/1.1 everywhere. Plain `http` is always HTTP/1.1. Default true.
        public var http2: Bool

        public init(
            connectTimeout: Duration = .seconds(10),
            requestTimeout: Duration = .seconds(30),
            caFile: String? = nil,
            lowSpeedLimit: Int = 1,
            lowSpeedTime: Duration = .seconds(20),
            maxResponseBytes: Int = 1 << 20,
            useProxyEnvironment: Bool = true,
            userAgent: String = "farmgate",
            http2: Bool = true
        ) {
            self.http2 = http2
            self.connectTimeout = connectTimeout
            self.requestTimeout = requestTimeout
            self.caFile = caFile
            self.lowSpeedLimit = lowSpeedLimit
            self.lowSpeedTime = lowSpeedTime
            self.maxResponseBytes = maxResponseBytes
            self.useProxyEnvironment = useProxyEnvironment
            self.userAgent = userAgent
        }
    }

    private let handle: ThreadOwned<CurlEasy>
    private let logger: Logger

    /// Creates the easy handle and sets every option that does not change between requests.
    /// - Throws: ``HTTPClientError`` of kind ``HTTPClientError/Kind/configuration`` when libcurl cannot be initialised,
    ///   the CA file cannot be read, or libcurl refuses an option.
    public init(configuration: Configuration, logger: Logger) throws(HTTPClientError) {
        self.logger = logger
        guard CurlGlobal.initialized else {
            throw HTTPClientError(kind: .configuration, detail: "curl_global_init failed")
        }
        if let caFile = configuration.caFile {
            guard FileSystem.isFile(caFile) else {
                throw HTTPClientError(
                    kind: .configuration, summary: "CA file not found",
                    detail: "\(caFile) does not exist; give a PEM file of CA certificates, or none to use the system CAs")
            }
            guard FileManager.default.isReadableFile(atPath: caFile) else {
                throw HTTPClientError(kind: .configuration, summary: "CA file not readable", detail: "cannot read \(caFile) (check its permissions)")
            }
        }
        do {
            handle = try ThreadOwned(name: "farmgate-http") { try CurlEasy(configuration: configuration, logger: logger) }
        } catch let error as HTTPClientError {
            throw error
        } catch {
            throw HTTPClientError(kind: .configuration, detail: "\(error)")
        }
    }

    /// Sends a `POST` and waits for the complete response.
    ///
    /// Cancelling the calling task abandons the request within about a second.
    /// - Parameters:
    ///   - url: An absolute `http` or `https` URL.
    ///   - headers: Request headers; `Content-Length` is set from `body`.
    ///   - body: The request body.
    ///   - beforeSending: Called on the client's thread once the connection is up (TCP and TLS), just before the request is
    ///     sent; false withholds the request (``HTTPClientError/Kind/withheld``). A request that fails before this point
    ///     (no route, DNS, refused, TLS) never calls it: nothing of it can have reached the server.
    /// - Returns: The final response, whatever its status.
    /// - Throws: ``HTTPClientError`` when no response arrived (connection, TLS, timeout, cancellation).
    public func post(
        _ url: String, headers: [HTTPHeader], body: [UInt8], beforeSending: (@Sendable () -> Bool)? = nil
    ) async throws(HTTPClientError) -> HTTPResponse {
        try await perform(url, headers: headers, body: body, beforeSending: beforeSending)
    }

    /// Sends a `GET` and waits for the complete response, on the same connection as the posts.
    ///
    /// Cancelling the calling task abandons the request within about a second.
    /// - Parameters:
    ///   - url: An absolute `http` or `https` URL.
    ///   - headers: Request headers.
    /// - Returns: The final response, whatever its status.
    /// - Throws: ``HTTPClientError`` when no response arrived (connection, TLS, timeout, cancellation).
    public func get(_ url: String, headers: [HTTPHeader]) async throws(HTTPClientError) -> HTTPResponse {
        try await perform(url, headers: headers, body: nil)
    }

    /// A `POST` of `body`, or a `GET` when `body` is nil.
    private func perform(
        _ url: String, headers: [HTTPHeader], body: [UInt8]?, beforeSending: (@Sendable () -> Bool)? = nil
    ) async throws(HTTPClientError) -> HTTPResponse {
        let cancelled = CancelFlag()
        let outcome: Result<HTTPResponse, HTTPClientError>
        do {
            outcome = try await withTaskCancellationHandler {
                try await handle.withValue { easy in
                    easy.perform(url: url, headers: headers, body: body, cancelled: cancelled, beforeSending: beforeSending)
                }
            } onCancel: {
                cancelled.set()
            }
        } catch {
            throw HTTPClientError(kind: .transport, detail: "\(error)")
        }
        switch outcome {
        case .success(let response):
            logger.trace("HTTP response", metadata: ["http.url": "\(url)", "http.status": "\(response.status)"])
            return response
        case .failure(let error):
            throw error
        }
    }

    /// Releases the handle (closing its connections) and stops its thread. Later requests throw.
    public func close() {
        handle.close()
    }
}

/// `curl_global_init` runs once per process, before the first handle; a `static let` is initialised exactly once, thread-safely.
private enum CurlGlobal {
    static let initialized: Bool = fg_curl_global_init_default() == CURLE_OK
}

/// Set from any thread when the task awaiting a request is cancelled; read by the progress callback on the curl thread.
private final class CancelFlag: Sendable {
    private let value = Atomic<Bool>(false)
    func set() { value.store(true, ordering: .relaxed) }
    var isSet: Bool { value.load(ordering: .relaxed) }
}

/// What the callbacks of one transfer collect. Lives as long as its ``CurlEasy`` and is reached from the C callbacks through
/// the `*DATA` pointers, unretained.
private final class Exchange {
    var headers: [HTTPHeader] = []
    var body: [UInt8] = []
    var truncated = false
    var maxBody: Int
    var cancelled: CancelFlag?
    var beforeSending: (@Sendable () -> Bool)?
    /// `beforeSending` answered false for this transfer.
    var withheld = false

    init(maxBody: Int) { self.maxBody = maxBody }

    func reset(cancelled: CancelFlag, beforeSending: (@Sendable () -> Bool)?) {
        headers = []
        body = []
        truncated = false
        self.cancelled = cancelled
        self.beforeSending = beforeSending
        withheld = false
    }

    /// The connection is up and the request about to go: whether it may.
    func mayStart() -> Bool {
        guard let beforeSending else { return true }
        if beforeSending() { return true }
        withheld = true
        return false
    }

    func appendBody(_ bytes: UnsafeRawBufferPointer) {
        let room = maxBody - body.count
        if bytes.count <= room {
            body.append(contentsOf: bytes)
        } else {
            if room > 0 { body.append(contentsOf: bytes.prefix(room)) }
            truncated = true
        }
    }

    func headerLine(_ bytes: UnsafeRawBufferPointer) {
        var line = String(decoding: bytes, as: UTF8.self)
        while let last = line.last, last == "\r\n" || last == "\n" || last == "\r" { line.removeLast() }
        if line.hasPrefix("HTTP/") {
            // A new status line: an interim (1xx) response or the final one starts here. Keep only the last block.
            headers = []
            return
        }
        guard let colon = line.firstIndex(of: ":") else { return }
        let name = String(line[..<colon]).trimmingWhitespace()
        let value = String(line[line.index(after: colon)...]).trimmingWhitespace()
        if !name.isEmpty, headers.count < 200 { headers.append(HTTPHeader(name, value)) }
    }
}

/// A libcurl easy handle with the options that never change set once. Touched only on its ``ThreadOwned`` thread.
private final class CurlEasy {
    let handle: UnsafeMutableRawPointer
    let errorBuffer: UnsafeMutablePointer<CChar>
    let exchange: Exchange
    let logger: Logger

    init(configuration: HTTPClient.Configuration, logger: Logger) throws(HTTPClientError) {
        guard let handle = curl_easy_init() else {
            throw HTTPClientError(kind: .configuration, detail: "curl_easy_init failed")
        }
        self.handle = handle
        self.logger = logger
        let errorSize = fg_curl_error_size()
        errorBuffer = .allocate(capacity: errorSize)
        errorBuffer.initialize(repeating: 0, count: errorSize)
        exchange = Exchange(maxBody: max(0, configuration.maxResponseBytes))
        try configure(configuration)
    }

    deinit {
        curl_easy_cleanup(handle)
        errorBuffer.deallocate()
    }

    private func check(_ code: CURLcode, _ option: String) throws(HTTPClientError) {
        guard code == CURLE_OK else {
            throw HTTPClientError(
                kind: .configuration, curlCode: Int(code.rawValue),
                detail: "libcurl refused \(option): \(String(cString: curl_easy_strerror(code)))")
        }
    }

    private func configure(_ configuration: HTTPClient.Configuration) throws(HTTPClientError) {
        let h = handle
        try check(fg_curl_setopt_long(h, CURLOPT_NOSIGNAL, 1), "CURLOPT_NOSIGNAL")
        try check(fg_curl_setopt_pointer(h, CURLOPT_ERRORBUFFER, errorBuffer), "CURLOPT_ERRORBUFFER")
        try check(fg_curl_setopt_long(h, CURLOPT_TCP_KEEPALIVE, 1), "CURLOPT_TCP_KEEPALIVE")
        try check(fg_curl_setopt_long(h, CURLOPT_TCP_KEEPIDLE, 30), "CURLOPT_TCP_KEEPIDLE")
        try check(fg_curl_setopt_long(h, CURLOPT_TCP_KEEPINTVL, 15), "CURLOPT_TCP_KEEPINTVL")
        try check(fg_curl_setopt_long(h, CURLOPT_CONNECTTIMEOUT_MS, milliseconds(configuration.connectTimeout)), "CURLOPT_CONNECTTIMEOUT_MS")
        try check(fg_curl_setopt_long(h, CURLOPT_TIMEOUT_MS, milliseconds(configuration.requestTimeout)), "CURLOPT_TIMEOUT_MS")
        let lowSpeedSeconds = max(1, min(configuration.lowSpeedTime, configuration.requestTimeout).components.seconds)
        try check(fg_curl_setopt_long(h, CURLOPT_LOW_SPEED_LIMIT, max(1, configuration.lowSpeedLimit)), "CURLOPT_LOW_SPEED_LIMIT")
        try check(fg_curl_setopt_long(h, CURLOPT_LOW_SPEED_TIME, Int(lowSpeedSeconds)), "CURLOPT_LOW_SPEED_TIME")
        try check(fg_curl_setopt_long(h, CURLOPT_SSL_VERIFYPEER, 1), "CURLOPT_SSL_VERIFYPEER")
        try check(fg_curl_setopt_long(h, CURLOPT_SSL_VERIFYHOST, 2), "CURLOPT_SSL_VERIFYHOST")
        if let caFile = configuration.caFile {
            try check(fg_curl_setopt_string(h, CURLOPT_CAINFO, caFile), "CURLOPT_CAINFO")
        }
        try check(fg_curl_setopt_long(h, CURLOPT_FOLLOWLOCATION, 0), "CURLOPT_FOLLOWLOCATION")
        try check(fg_curl_setopt_string(h, CURLOPT_PROTOCOLS_STR, "http,https"), "CURLOPT_PROTOCOLS_STR")
        if !configuration.useProxyEnvironment {
            // An empty proxy string disables every proxy, including those named by the environment.
            try check(fg_curl_setopt_string(h, CURLOPT_PROXY, ""), "CURLOPT_PROXY")
        }
        try check(fg_curl_setopt_string(h, CURLOPT_USERAGENT, configuration.userAgent), "CURLOPT_USERAGENT")
        try check(
            fg_curl_setopt_long(h, CURLOPT_HTTP_VERSION, configuration.http2 ? FG_CURL_HTTP_VERSION_2TLS : FG_CURL_HTTP_VERSION_1_1),
            "CURLOPT_HTTP_VERSION")

        let context = Unmanaged.passUnretained(exchange).toOpaque()
        try check(
            fg_curl_setopt_write_function(h, CURLOPT_WRITEFUNCTION) { data, size, count, context in
                guard let context else { return 0 }
                let total = size * count
                guard let data, total > 0 else { return total }
                Unmanaged<Exchange>.fromOpaque(context).takeUnretainedValue().appendBody(UnsafeRawBufferPointer(start: data, count: total))
                return total
            }, "CURLOPT_WRITEFUNCTION")
        try check(fg_curl_setopt_pointer(h, CURLOPT_WRITEDATA, context), "CURLOPT_WRITEDATA")
        try check(
            fg_curl_setopt_header_function(h) { data, size, count, context in
                guard let context else { return 0 }
                let total = size * count
                guard let data, total > 0 else { return total }
                Unmanaged<Exchange>.fromOpaque(context).takeUnretainedValue().headerLine(UnsafeRawBufferPointer(start: data, count: total))
                return total
            }, "CURLOPT_HEADERFUNCTION")
        try check(fg_curl_setopt_pointer(h, CURLOPT_HEADERDATA, context), "CURLOPT_HEADERDATA")
        try check(
            fg_curl_setopt_xferinfo_function(h) { context, _, _, _, _ in
                // Non-zero aborts the transfer with CURLE_ABORTED_BY_CALLBACK.
                guard let context else { return 0 }
                return Unmanaged<Exchange>.fromOpaque(context).takeUnretainedValue().cancelled?.isSet == true ? 1 : 0
            }, "CURLOPT_XFERINFOFUNCTION")
        try check(fg_curl_setopt_pointer(h, CURLOPT_XFERINFODATA, context), "CURLOPT_XFERINFODATA")
        try check(fg_curl_setopt_long(h, CURLOPT_NOPROGRESS, 0), "CURLOPT_NOPROGRESS")
        try check(
            fg_curl_setopt_prereq_function(h) { context, _, _, _, _ in
                // CURL_PREREQFUNC_OK is 0, CURL_PREREQFUNC_ABORT 1.
                guard let context else { return 0 }
                return Unmanaged<Exchange>.fromOpaque(context).takeUnretainedValue().mayStart() ? 0 : 1
            }, "CURLOPT_PREREQFUNCTION")
        try check(fg_curl_setopt_pointer(h, CURLOPT_PREREQDATA, context), "CURLOPT_PREREQDATA")
    }

    /// One exchange: a `POST` of `body`, or a `GET` when `body` is nil.
    func perform(
        url: String, headers: [HTTPHeader], body: [UInt8]?, cancelled: CancelFlag, beforeSending: (@Sendable () -> Bool)?
    ) -> Result<HTTPResponse, HTTPClientError> {
        let h = handle
        exchange.reset(cancelled: cancelled, beforeSending: beforeSending)
        // The check holds the buffer: released with the request, not kept until the next one.
        defer { exchange.beforeSending = nil }
        errorBuffer[0] = 0
        guard !cancelled.isSet else { return .failure(HTTPClientError(kind: .cancelled, detail: "the request was cancelled")) }

        var list: UnsafeMutablePointer<curl_slist>?
        for header in headers {
            list = curl_slist_append(list, "\(header.name): \(header.value)")
        }
        // No "Expect: 100-continue" round trip before the body, and no "Accept: */*", which says nothing (unless the caller
        // sets them).
        list = curl_slist_append(list, "Expect:")
        // Nor the "Content-Type: application/x-www-form-urlencoded" libcurl gives a POST without one, which would be false.
        for name in ["Accept", "Content-Type"] where !headers.contains(where: { $0.name.lowercased() == name.lowercased() }) {
            list = curl_slist_append(list, "\(name):")
        }
        defer {
            _ = fg_curl_setopt_slist(h, CURLOPT_HTTPHEADER, nil)
            curl_slist_free_all(list)
        }

        var setupCode = fg_curl_setopt_string(h, CURLOPT_URL, url)
        if setupCode == CURLE_OK { setupCode = fg_curl_setopt_slist(h, CURLOPT_HTTPHEADER, list) }
        let code: CURLcode
        if let body {
            if setupCode == CURLE_OK { setupCode = fg_curl_setopt_long(h, CURLOPT_POST, 1) }
            if setupCode == CURLE_OK { setupCode = fg_curl_setopt_off(h, CURLOPT_POSTFIELDSIZE_LARGE, curl_off_t(body.count)) }
            guard setupCode == CURLE_OK else { return .failure(failure(setupCode)) }
            // POSTFIELDS must not be NULL (libcurl would then read the body from stdin): an empty body points at one unused byte.
            let bytes = body.isEmpty ? [0] : body
            code = bytes.withUnsafeBytes { raw -> CURLcode in
                _ = fg_curl_setopt_pointer(h, CURLOPT_POSTFIELDS, UnsafeMutableRawPointer(mutating: raw.baseAddress))
                defer { _ = fg_curl_setopt_pointer(h, CURLOPT_POSTFIELDS, nil) }
                return curl_easy_perform(h)
            }
        } else {
            // HTTPGET undoes the POST of an earlier request on this handle.
            if setupCode == CURLE_OK { setupCode = fg_curl_setopt_long(h, CURLOPT_HTTPGET, 1) }
            guard setupCode == CURLE_OK else { return .failure(failure(setupCode)) }
            code = curl_easy_perform(h)
        }
        guard code == CURLE_OK else {
            if exchange.withheld {
                return .failure(HTTPClientError(kind: .withheld, curlCode: Int(code.rawValue), detail: "the request was withheld before it was sent"))
            }
            return .failure(failure(code))
        }

        var status = 0
        _ = fg_curl_getinfo_long(h, CURLINFO_RESPONSE_CODE, &status)
        var version = 0
        _ = fg_curl_getinfo_long(h, CURLINFO_HTTP_VERSION, &version)
        var connects = 0
        _ = fg_curl_getinfo_long(h, CURLINFO_NUM_CONNECTS, &connects)
        return .success(
            HTTPResponse(
                status: status, headers: exchange.headers, body: exchange.body, bodyTruncated: exchange.truncated,
                httpVersion: HTTPVersion(curlValue: version), newConnections: connects))
    }

    private func failure(_ code: CURLcode) -> HTTPClientError {
        let buffered = String(cString: errorBuffer)
        let detail = buffered.isEmpty ? String(cString: curl_easy_strerror(code)) : buffered
        var osErrno = 0
        _ = fg_curl_getinfo_long(handle, CURLINFO_OS_ERRNO, &osErrno)
        let kind: HTTPClientError.Kind
        var summary: String?
        switch code {
        case CURLE_COULDNT_CONNECT, CURLE_COULDNT_RESOLVE_HOST, CURLE_COULDNT_RESOLVE_PROXY:
            kind = .connectFailed
            if osErrno == Int(ECONNREFUSED) { summary = "connection refused" }
        case CURLE_OPERATION_TIMEDOUT:
            kind = .timedOut
        case CURLE_SSL_CONNECT_ERROR, CURLE_PEER_FAILED_VERIFICATION, CURLE_SSL_CACERT_BADFILE, CURLE_SSL_CERTPROBLEM,
            CURLE_SSL_CIPHER, CURLE_SSL_ENGINE_NOTFOUND, CURLE_SSL_ISSUER_ERROR, CURLE_SSL_CRL_BADFILE, CURLE_SSL_PINNEDPUBKEYNOTMATCH,
            CURLE_SSL_INVALIDCERTSTATUS, CURLE_SSL_SHUTDOWN_FAILED, CURLE_SSL_CLIENTCERT:
            kind = .tls
        case CURLE_ABORTED_BY_CALLBACK:
            kind = .cancelled
        case CURLE_UNSUPPORTED_PROTOCOL where detail.contains("HTTP/0.9"):
            // The configuration holds only http(s) URLs: this is the peer answering something that is not HTTP (another
            // service on the port, a broken proxy), not a setting to fix.
            kind = .transport
            summary = "the answer is not HTTP (another service on that port, or a proxy in the way?)"
        case CURLE_UNSUPPORTED_PROTOCOL, CURLE_URL_MALFORMAT:
            kind = .configuration
        default:
            kind = .transport
            if osErrno == Int(ECONNRESET) { summary = "connection reset" }
        }
        logger.debug(
            "HTTP transfer failed",
            metadata: ["curl.code": "\(code.rawValue)", "curl.message": "\(detail)", "os.errno": "\(osErrno)"])
        return HTTPClientError(kind: kind, curlCode: Int(code.rawValue), summary: summary, detail: detail)
    }
}

private func milliseconds(_ duration: Duration) -> Int {
    let (seconds, attoseconds) = duration.components
    let (ms, overflow) = seconds.multipliedReportingOverflow(by: 1000)
    guard !overflow, seconds >= 0 else { return seconds < 0 ? 1 : Int.max }
    return max(1, Int(ms + attoseconds / 1_000_000_000_000_000))
}
