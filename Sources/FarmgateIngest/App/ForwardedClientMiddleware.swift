import HTTPTypes
import Hummingbird

/// Behind a trusted reverse proxy (`[server] trusted_proxies`), counts the request against the client the proxy names
/// in `X-Forwarded-For` instead of the proxy itself; see ``TrustedProxies``. Added before every route, so that the
/// per-address limit of failed authentications sees each real client.
struct ForwardedClientMiddleware: RouterMiddleware {
    typealias Context = IngestRequestContext
    let proxies: TrustedProxies

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        context.clientAddress = proxies.client(peer: context.peerAddress, forwardedFor: request.headers[.xForwardedFor])
        return try await next(request, context)
    }
}

extension HTTPField.Name {
    /// (Never nil: a valid field name.)
    static let xForwardedFor = HTTPField.Name("X-Forwarded-For") ?? .via
}
