import HTTPTypes
import HummingbirdCore
import NIOCore

/// `GET /v1/farms/{farm}/latest` answered where the request was read, on the connection's event loop, when everything
/// the answer needs is already in memory: the read token's credential cached and fresh, the client not over its
/// failed-authentication limit, the token's farm the one in the path, a valid query, the page in the ``LatestCache``
/// and a token left in the read limiter. Then the answer is exactly the router's (same body, `Content-Type` and
/// rate-limit headers, counted in the same request metric), without the hop to a task and back.
///
/// In every other case (any error to answer, a first read that fills the cache, a stale device, a credential to look
/// up, `Connection: close`, a request with a body, a trusted proxy in front) ``answer(_:farmName:client:memo:)`` returns nil and the
/// request goes to the router unchanged, which answers it as it always did.
final class LatestFastPath: Sendable {
    let authenticator: Authenticator
    let failures: FailedAuthenticationLimiter
    let rateLimiter: KeyedRateLimiter<String>
    let cache: LatestCache
    let metrics: IngestMetrics

    /// The route's template, as the router reports it to ``RequestMetricsMiddleware``.
    static let route = "/v1/farms/{farm}/latest"

    init(authenticator: Authenticator, failures: FailedAuthenticationLimiter, rateLimiter: KeyedRateLimiter<String>, cache: LatestCache, metrics: IngestMetrics) {
        self.authenticator = authenticator
        self.failures = failures
        self.rateLimiter = rateLimiter
        self.cache = cache
        self.metrics = metrics
    }

    /// What one connection's requests share, kept by its ``LatestFastPathHandler``: the last read token parsed, with its
    /// hash (a client sends the same `Authorization` on every request of a connection).
    struct ConnectionMemo {
        var authorization: String?
        var key: APIKey?
        var secretHash: [UInt8] = []
    }

    /// The farm segment of `path` when it is `/v1/farms/{farm}/latest[?query]` with a plain farm segment; cheap enough
    /// to run on every request head.
    static func farmSegment(of path: String) -> Substring? {
        let prefix = "/v1/farms/".utf8, suffix = "/latest".utf8
        let bytes = path.utf8
        let end = bytes.firstIndex(of: UInt8(ascii: "?")) ?? bytes.endIndex
        let route = bytes[..<end]
        guard route.count > prefix.count + suffix.count, route.starts(with: prefix), route.reversed().starts(with: suffix.reversed()) else {
            return nil
        }
        let farm = route.dropFirst(prefix.count).dropLast(suffix.count)
        // A percent-escape or another segment: the router decides.
        guard !farm.contains(where: { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "%") }) else { return nil }
        return Substring(farm)
    }

    /// The farm segment when `request` may be answered here: a GET of the route without `Connection: close`.
    static func candidate(_ request: HTTPRequest) -> Substring? {
        guard request.method == .get, let path = request.path, let farm = farmSegment(of: path) else { return nil }
        if let connection = request.headerFields[.connection], connection.lowercased().contains("close") { return nil }
        return farm
    }

    /// The answer to a ``candidate(_:)`` request of `farmName`, or nil for the router to answer (see the type's
    /// description).
    ///
    /// - Parameter client: the connection's peer, as the router's failed-authentication limit counts it.
    func answer(_ request: HTTPRequest, farmName: Substring, client: ClientAddress, memo: inout ConnectionMemo) -> (HTTPResponse, ByteBuffer)? {
        let started = ContinuousClock.now
        guard let path = request.path, let authorization = request.headerFields[.authorization] else { return nil }
        if authorization != memo.authorization || memo.key == nil {
            // Read tokens come only in `Authorization`, so the same header is the same key.
            guard let key = try? bearerKey(request.headerFields, expected: .readToken) else { return nil }
            memo = ConnectionMemo(authorization: authorization, key: key, secretHash: key.secretHash)
        }
        guard let key = memo.key, (try? failures.admit(client, now: started)) != nil,
            let (farm, _) = authenticator.cachedReader(key, secretHash: memo.secretHash), farm.name == farmName,
            let selection = try? ReadController.latestSelection(URI(path).queryParameters),
            let body = cache.cachedPage(farm: farm, selection: selection)
        else { return nil }
        let limit = rateLimiter.acquire(key.keyID, now: started)
        guard !limit.isLimited else { return nil }
        var fields = HTTPFields()
        fields[.contentType] = jsonContentType
        limit.add(to: &fields)
        fields[.contentLength] = String(body.readableBytes)
        metrics.request(route: Self.route, status: 200, duration: started.duration(to: .now))
        metrics.latestAnsweredOnEventLoop()
        return (HTTPResponse(status: .ok, headerFields: fields), body)
    }
}
