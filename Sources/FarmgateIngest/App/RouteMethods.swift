import HTTPTypes

/// The methods each path of the API takes, so that a known path asked with another method is answered 405 with `Allow`
/// (the router alone says 404 "no such resource", which sends the user looking for a wrong path). Kept beside the
/// routes; `RouteMethodsTests` checks that each method listed reaches a route.
enum RouteMethods {
    /// Path patterns (`*` one segment) and their methods.
    static let table: [(pattern: [Substring], methods: [HTTPRequest.Method])] = [
        ("/v1/batches", [.post]), ("/v1/device", [.get]), ("/v1/enroll", [.post]),
        ("/healthz", [.get]), ("/readyz", [.get]), ("/metrics", [.get]),
        ("/v1/farms/*/latest", [.get]),
        ("/v1/farms/*/devices/*/sensors/*/readings", [.get]),
        ("/v1/farms/*/devices/*/sensors/*/calibrations", [.get]),
        ("/v1/farms/*/alerts", [.get]), ("/v1/farms/*/alerts/*/ack", [.post]),
        ("/v1/farms/*/alert-rules", [.get, .post]), ("/v1/farms/*/alert-rules/*", [.get, .put, .delete]),
        ("/v1/farms/*/silences", [.get, .post]), ("/v1/farms/*/silences/*", [.delete]),
    ].map { (pattern: $0.0.split(separator: "/"), methods: $0.1) }

    /// The methods the ingest knows: those HTTP defines (RFC 9110 §9.3, and PATCH of RFC 5789). A path asked with one
    /// it does not take is 405; any other method (`PROPFIND`, or `get`: methods are case-sensitive) is 501 on every path
    /// (RFC 9110 §9.1), since no resource of the ingest could take it.
    static let known: Set<HTTPRequest.Method> = [.get, .head, .post, .put, .delete, .connect, .options, .trace, .patch]

    /// The methods `path` takes; nil when no route has that path.
    static func methods(for path: String) -> [HTTPRequest.Method]? {
        guard let segments = segments(of: path) else { return nil }
        for route in table where route.pattern.count == segments.count {
            if zip(route.pattern, segments).allSatisfy({ $0 == "*" || $0 == $1 }) {
                // The router answers HEAD wherever it answers GET.
                return route.methods.flatMap { $0 == .get ? [.get, .head] : [$0] }
            }
        }
        return nil
    }

    /// Whether `path` names no route whatever the router makes of it: it has an empty segment (`//healthz`,
    /// `/v1//batches`), which the router would skip and so serve as another path.
    static func hasEmptySegment(_ path: String) -> Bool { segments(of: path) == nil }

    /// `path`'s segments after the leading slash, one trailing slash dropped (the router takes `POST /v1/batches/` as
    /// the path without it); nil when another segment is empty.
    private static func segments(of path: String) -> ArraySlice<Substring>? {
        var segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        if segments.count > 1, segments.last?.isEmpty == true { segments = segments.dropLast() }
        return segments.contains(where: \.isEmpty) && segments != [""] ? nil : segments
    }
}
