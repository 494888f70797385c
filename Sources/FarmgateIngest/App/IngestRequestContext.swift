public import Hummingbird
public import NIOCore
import FarmgateWire
import Foundation
import HTTPTypes
import Logging

/// Per-request state of the ingest: who the caller is, once a middleware has established it.
public struct IngestRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    /// The farm a verified read token gives access to (set by ``ReaderAuthMiddleware``).
    public var readerFarm: FarmRecord?
    /// The role of that read token (set with ``readerFarm``).
    public var readerRole: ReadRole?
    /// The client that per-address limits count against: the TCP peer, or behind a trusted proxy the address it
    /// forwarded (``ForwardedClientMiddleware``).
    public var clientAddress: ClientAddress
    /// The TCP peer.
    public var peerAddress: SocketAddress?

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.peerAddress = source.channel.remoteAddress
        self.clientAddress = ClientAddress(source.channel.remoteAddress)
    }
}

/// Answers every error as JSON ``APIErrorBody``: our ``APIError``s as they are, Hummingbird's `HTTPError`s (404 for an
/// unknown route) with a stable code, and anything else as 500 `internal_error` with the details only in the log. A
/// method the ingest does not know is 501 on any path (``RouteMethods/known``); a known one a path does not take, 405.
/// Paths and query names arrive with their escaped unreserved characters decoded (``RequestTargetNormalizer``).
struct APIErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let response = try await answer(request, context: context, next: next)
        // A HEAD answer carries the headers of what GET would have answered, an error's included, and no body.
        return request.method == .head ? response.createHeadResponse() : response
    }

    private func answer(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            guard RouteMethods.known.contains(request.method) else { throw APIError.methodNotImplemented(request.method.rawValue) }
            guard !RouteMethods.hasEmptySegment(request.uri.path) else {
                throw APIError(
                    .notFound, code: "not_found",
                    message: "\(request.uri.path) has an empty segment (two slashes in a row); see the HTTP API in the README for the paths the ingest serves")
            }
            return try await next(request, context)
        } catch {
            // A known path asked with a method it does not take: 405 with the ones it does, not "no such resource".
            if let http = error as? HTTPError, http.status == .notFound, let allowed = RouteMethods.methods(for: request.uri.path),
                !allowed.contains(request.method)
            {
                let names = allowed.map(\.rawValue).joined(separator: ", ")
                return try APIError(
                    .methodNotAllowed, code: "method_not_allowed",
                    message: "\(request.uri.path) takes \(names), not \(request.method.rawValue); see the HTTP API in the README",
                    headers: [.allow: names]
                ).response(from: request, context: context)
            }
            if let apiError = APIError.from(error) {
                return try apiError.response(from: request, context: context)
            }
            context.logger.error(
                "request failed", metadata: ["http.path": "\(request.uri.path)", "error": "\(String(reflecting: error))"])
            return try APIError(.internalServerError, code: "internal_error", message: "the ingest failed to answer; the details are in its log")
                .response(from: request, context: context)
        }
    }
}

/// Times every request into ``IngestMetrics`` by route template and status class.
struct RequestMetricsMiddleware<Context: RequestContext>: RouterMiddleware {
    let metrics: IngestMetrics

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        do {
            let response = try await next(request, context)
            metrics.request(route: context.endpointPath ?? "unmatched", status: response.status.code, duration: start.duration(to: .now))
            return response
        } catch {
            let status = (error as? any HTTPResponseError)?.status.code ?? 500
            metrics.request(route: context.endpointPath ?? "unmatched", status: status, duration: start.duration(to: .now))
            throw error
        }
    }
}

/// Requires a read token (`Authorization: Bearer fgr_...`) for the farm named in the path, and limits each token's rate.
///
/// Every answer past authentication carries the read policy's rate-limit headers (see ``RateLimitStatus``); over the
/// limit the answer is 429 `rate_limited` with `Retry-After`, before the store is asked anything.
struct ReaderAuthMiddleware: RouterMiddleware {
    typealias Context = IngestRequestContext
    let gate: AuthenticationGate
    /// Per read token (its key id).
    let rateLimiter: KeyedRateLimiter<String>

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let (farm, role, keyID) = try await gate.reader(request, client: context.clientAddress)
        guard let wanted = context.parameters.decoded("farm"), wanted == farm.name else {
            throw APIError(.forbidden, code: "forbidden", message: "this read token belongs to another farm; use a token of the farm in the path")
        }
        let status = rateLimiter.acquire(keyID)
        if status.isLimited {
            throw APIError(
                .tooManyRequests, code: "rate_limited",
                message:
                    "this read token makes more than \(rateLimiter.rate) requests per second (burst \(rateLimiter.burst)); retry after \(status.retryAfterSeconds) s, and poll less often or ask for more per request",
                headers: status.headers)
        }
        var context = context
        context.readerFarm = farm
        context.readerRole = role
        var response = try await next(request, context)
        status.add(to: &response.headers)
        return response
    }
}

/// The API key in `Authorization: Bearer ...`, or a 401 that says what is missing.
/// The header a device key may come in instead of `Authorization: Bearer` (``IngestProtocol/deviceKeyHeader``).
let deviceKeyField = HTTPField.Name(IngestProtocol.deviceKeyHeader) ?? .authorization

/// The key of `request`: `Authorization: Bearer <key>`, or for a device key also `Farmgate-Key: <key>`.
func bearerKey(_ request: Request, expected kind: APIKey.Kind) throws(APIError) -> APIKey {
    try bearerKey(request.headers, expected: kind)
}

/// The key in `headers` (see ``bearerKey(_:expected:)``).
func bearerKey(_ headers: HTTPFields, expected kind: APIKey.Kind) throws(APIError) -> APIKey {
    let what = kind == .device ? "a device key (fgd_...)" : "a read token (fgr_...)"
    // Two fields of one name read as one value joined by a comma, which is no key: say what is wrong instead.
    for name in kind == .device ? [HTTPField.Name.authorization, deviceKeyField] : [.authorization] {
        let count = headers[fields: name].count
        guard count < 2 else {
            throw APIError.unauthorized("the request has \(count) \(name.rawName) headers; send the key in exactly one")
        }
    }
    let text: String
    if kind == .device, headers[.authorization] == nil, let header = headers[deviceKeyField] {
        // The agent's form on a metered link (IngestProtocol.deviceKeyHeader): HPACK indexes it, Authorization it never does.
        text = header.trimmingSpaces
    } else {
        guard let header = headers[.authorization] else {
            throw APIError.unauthorized("send `Authorization: Bearer <key>` with \(what)")
        }
        let parts = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].utf8.count == 6, parts[0].lowercased() == "bearer" else {
            throw APIError.unauthorized("the Authorization header must be `Bearer <key>` with \(what)")
        }
        text = parts[1].trimmingSpaces
    }
    guard let key = APIKey(parsing: text) else {
        throw APIError.unauthorized("the bearer key is not in the form fgd_<keyid>_<secret> or fgr_<keyid>_<secret>; copy it exactly as it was printed")
    }
    guard key.kind == kind else {
        throw APIError.unauthorized(
            kind == .device
                ? "this is a read token; uploads and the device endpoints (/v1/batches, /v1/device) need a device key from `farmgate-ingest device create`"
                : "this is a device key; reading needs a read token from `farmgate-ingest token create`")
    }
    return key
}

extension Parameters {
    /// The path parameter `name` with its percent-escapes decoded (RFC 3986 §2.1: `%2D` is `-`), as a client that escapes
    /// every path segment sends it; as written when an escape is not one (`%zz`) or not UTF-8, so that the identifier's
    /// own check names it. The router itself does not decode path segments.
    func decoded(_ name: String) -> String? {
        guard let raw = get(name) else { return nil }
        guard raw.utf8.contains(UInt8(ascii: "%")) else { return raw }
        return raw.removingPercentEncoding ?? raw
    }
}
