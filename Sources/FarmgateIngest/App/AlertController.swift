import FarmgateSupport
import FarmgateWire
import Foundation
import Hummingbird
import Logging
import NIOCore

/// The alert API of a farm, behind its read tokens (``ReaderAuthMiddleware``). Viewers read; writes need an admin token
/// of the farm (`farmgate-ingest token create --role admin`):
/// - `GET /v1/farms/{farm}/alerts?recent=24h&limit=500`: active alerts and those that changed recently, with their history;
/// - `POST /v1/farms/{farm}/alerts/{id}/ack` (admin), body optional `{"by": "..."}`;
/// - `GET /v1/farms/{farm}/alert-rules`, `GET .../alert-rules/{name}`;
/// - `POST /v1/farms/{farm}/alert-rules` (admin, 201; 409 when the name is taken), `PUT .../alert-rules/{name}` (admin,
///   creates or replaces), `DELETE .../alert-rules/{name}` (admin);
/// - `GET /v1/farms/{farm}/silences`, `POST /v1/farms/{farm}/silences` (admin) `{"matchers": {...}, "ends_at": RFC 3339
///   | "duration": "2h", "comment", "created_by"}`, `DELETE .../silences/{id}` (admin).
struct AlertController: Sendable {
    let admin: AlertAdmin
    let gate: AuthenticationGate
    let rateLimiter: KeyedRateLimiter<String>
    let now: @Sendable () -> Timestamp
    let logger: Logger

    /// The largest rule or silence body taken.
    static let maxBodyBytes = 64 * 1024

    struct RulesAnswer: Encodable {
        var farm: String
        var rules: [AlertRuleSpec]
    }

    struct AlertsAnswer: Encodable {
        var farm: String
        var alerts: [AlertView]
        /// True when the list stopped at `limit`: more alerts may exist (changed longer ago, such as ones firing for
        /// long), as the readings API's `truncated` says of its pages (a tester, 2026-12-07: nothing said so).
        var truncated: Bool
    }

    struct SilencesAnswer: Encodable {
        var farm: String
        var silences: [AlertSilence]
    }

    struct SilenceBody: Decodable {
        var matchers: [String: String]?
        var endsAt: String?
        var duration: String?
        var comment: String?
        var createdBy: String?

        enum CodingKeys: String, CodingKey {
            case matchers, duration, comment
            case endsAt = "ends_at"
            case createdBy = "created_by"
        }
    }

    struct AckBody: Decodable {
        var by: String?
    }

    /// Checks a JSON body strictly (``StrictJSON``: every member once per object) and that its members are among
    /// `allowed`: `Codable` would keep one of a repeated member and ignore one it does not know, and a body
    /// `{"by": "a", "by": "b"}` or `{"duraton": "2h"}` must not be taken for something it does not say. Returns the
    /// top-level members.
    @discardableResult
    static func checkMembers(_ body: ByteBuffer, allowed: Set<String>, code: String) throws(APIError) -> [String] {
        let members: [String]?
        do {
            members = try StrictJSON.topLevelMembers(Array(buffer: body))
        } catch {
            throw APIError(.badRequest, code: code, message: error.description)
        }
        guard let members else { throw APIError(.badRequest, code: code, message: "the body must be a JSON object") }
        if let unknown = members.first(where: { !allowed.contains($0) }) {
            throw APIError(
                .badRequest, code: code,
                message: "\(unknown.prefix(64)): is not a member of this body; its members are \(allowed.sorted().joined(separator: ", "))")
        }
        return members
    }

    func addRoutes(to router: Router<IngestRequestContext>) {
        let farms = router.group("/v1/farms/{farm}").add(middleware: ReaderAuthMiddleware(gate: gate, rateLimiter: rateLimiter))
        // Every route refuses query parameters it does not take (400 invalid_parameter naming them), as the read
        // endpoints do: `?recnet=7d` answered with the default day would look right and be wrong.
        farms.get("alerts", use: Self.taking(["recent", "limit"]) { try await self.alerts($0, context: $1) })
        farms.post("alerts/{id}/ack", use: Self.taking { try await self.acknowledge($0, context: $1) })
        farms.get("alert-rules", use: Self.taking { try await self.rules(context: $1) })
        farms.get("alert-rules/{name}", use: Self.taking { try await self.rule(context: $1) })
        farms.post("alert-rules", use: Self.taking { try await self.putRule($0, context: $1, name: nil) })
        farms.put("alert-rules/{name}", use: Self.taking { try await self.putRule($0, context: $1, name: $1.parameters.decoded("name") ?? "") })
        farms.delete("alert-rules/{name}", use: Self.taking { try await self.removeRule(context: $1) })
        farms.get("silences", use: Self.taking { try await self.silences(context: $1) })
        farms.post("silences", use: Self.taking { try await self.addSilence($0, context: $1) })
        farms.delete("silences/{id}", use: Self.taking { try await self.removeSilence(context: $1) })
    }

    /// `handler`, after refusing a query parameter not in `known` (or given twice).
    static func taking(
        _ known: [String] = [], _ handler: @escaping @Sendable (Request, IngestRequestContext) async throws -> Response
    ) -> @Sendable (Request, IngestRequestContext) async throws -> Response {
        { request, context in
            try only(known, request)
            return try await handler(request, context)
        }
    }

    static func only(_ known: [String], _ request: Request) throws(APIError) {
        try ReadController.checkParameters(request.uri.queryParameters, known: known)
    }

    // MARK: Alerts

    func alerts(_ request: Request, context: IngestRequestContext) async throws -> Response {
        let farm = try requireFarm(context)
        let query = request.uri.queryParameters
        var recent = Duration.seconds(86_400)
        if let text = query.get("recent") {
            guard let parsed = ConfigTable.parseDuration(text), parsed <= .seconds(366 * 86_400) else {
                throw APIError(.badRequest, code: "invalid_parameter", message: "recent '\(text.prefix(40))' must be a duration such as 1h, 24h or 7d (at most 366d)")
            }
            recent = parsed
        }
        var limit = 500
        if let text = query.get("limit") {
            guard let value = Int(text), (1...5_000).contains(value) else {
                throw APIError(.badRequest, code: "invalid_parameter", message: "limit '\(text.prefix(40))' must be a whole number from 1 to 5000 (default 500)")
            }
            limit = value
        }
        let views = try await storeCall("read alerts") { try await admin.alerts(farm: farm.name, recent: recent, limit: limit, now: now()) }
        return jsonResponse(AlertsAnswer(farm: farm.name, alerts: views, truncated: views.count == limit))
    }

    func acknowledge(_ request: Request, context: IngestRequestContext) async throws -> Response {
        let farm = try requireAdmin(context)
        guard let text = context.parameters.decoded("id"), let id = Int64(text) else {
            throw APIError(.badRequest, code: "invalid_parameter", message: "the alert id must be a whole number, as GET /v1/farms/\(farm.name)/alerts lists them")
        }
        let body = try await collect(request)
        var by = "api"
        if body.readableBytes > 0 {
            try Self.checkMembers(body, allowed: ["by"], code: "invalid_body")
            guard let decoded = try? JSONDecoder().decode(AckBody.self, from: Data(Array(buffer: body))) else {
                throw APIError(.badRequest, code: "invalid_body", message: "the body must be empty or {\"by\": \"who acknowledges\"}")
            }
            by = String((decoded.by ?? by).prefix(200))
        }
        try await storeCall("acknowledge an alert") { try await admin.acknowledge(farm: farm.name, alertID: id, by: by) }
        return jsonResponse(["acknowledged": id])
    }

    // MARK: Rules

    func rules(context: IngestRequestContext) async throws -> Response {
        let farm = try requireFarm(context)
        let rules = try await storeCall("read alert rules") { try await admin.rules(farm: farm.name) }
        return jsonResponse(RulesAnswer(farm: farm.name, rules: rules.map(AlertRuleSpec.init)))
    }

    func rule(context: IngestRequestContext) async throws -> Response {
        let farm = try requireFarm(context)
        let name = context.parameters.decoded("name") ?? ""
        let rule = try await storeCall("read an alert rule") { try await admin.rule(farm: farm.name, name: name) }
        return jsonResponse(AlertRuleSpec(rule))
    }

    func putRule(_ request: Request, context: IngestRequestContext, name: String?) async throws -> Response {
        let farm = try requireAdmin(context)
        let body = try await collect(request)
        var spec: AlertRuleSpec
        do {
            spec = try AlertRuleSpec.parseJSON(Array(buffer: body))
        } catch {
            throw invalidRule(error)
        }
        if let name {
            if let named = spec.name, named != name {
                throw APIError(.badRequest, code: "invalid_rule", message: "name: '\(named.prefix(64))' differs from the name in the path ('\(name.prefix(64))')")
            }
            spec.name = name
        }
        let rule: AlertRule
        do {
            rule = try spec.validated()
        } catch {
            throw invalidRule(error)
        }
        try await storeCall("store an alert rule") { try await admin.putRule(farm: farm.name, rule, replace: name != nil) }
        return jsonResponse(AlertRuleSpec(rule), status: name == nil ? .created : .ok)
    }

    func removeRule(context: IngestRequestContext) async throws -> Response {
        let farm = try requireAdmin(context)
        let name = context.parameters.decoded("name") ?? ""
        try await storeCall("remove an alert rule") { try await admin.removeRule(farm: farm.name, name: name) }
        return Response(status: .noContent)
    }

    // MARK: Silences

    func silences(context: IngestRequestContext) async throws -> Response {
        let farm = try requireFarm(context)
        let silences = try await storeCall("read silences") { try await admin.silences(farm: farm.name, now: now()) }
        return jsonResponse(SilencesAnswer(farm: farm.name, silences: silences))
    }

    func addSilence(_ request: Request, context: IngestRequestContext) async throws -> Response {
        let farm = try requireAdmin(context)
        let body = try await collect(request)
        let decoded: SilenceBody
        let members = try Self.checkMembers(body, allowed: ["matchers", "ends_at", "duration", "comment", "created_by"], code: "invalid_silence")
        if members.contains("ends_at"), members.contains("duration") {
            throw APIError(.badRequest, code: "invalid_silence", message: "ends_at and duration: give one of them, not both")
        }
        do {
            decoded = try JSONDecoder().decode(SilenceBody.self, from: Data(Array(buffer: body)))
        } catch {
            throw APIError(
                .badRequest, code: "invalid_silence",
                message: "the body must be {\"matchers\": {\"alertname\": \"ph-*\"}, \"ends_at\": \"2026-01-01T12:00:00Z\" or \"duration\": \"2h\", \"comment\": \"...\"}")
        }
        let current = now()
        let until: Timestamp
        if let text = decoded.endsAt {
            guard let parsed = RFC3339.parse(text) else {
                throw APIError(.badRequest, code: "invalid_silence", message: "ends_at: '\(text.prefix(60))' is not an RFC 3339 time such as 2026-01-31T12:00:00Z")
            }
            guard parsed > current else {
                throw APIError(
                    .badRequest, code: "invalid_silence",
                    message: "ends_at: \(RFC3339.format(parsed)) is already past (it is \(RFC3339.format(current)) now); give a later time, or a duration")
            }
            until = parsed
        } else if let text = decoded.duration {
            guard let parsed = ConfigTable.parseDuration(text) else {
                throw APIError(.badRequest, code: "invalid_silence", message: "duration: '\(text.prefix(40))' must be a duration such as 30m, 2h or 7d")
            }
            guard parsed > .zero, parsed <= AlertAdmin.longestSilence else {
                throw APIError(
                    .badRequest, code: "invalid_silence", message: "duration: '\(text.prefix(40))' must be longer than 0s and at most 366d")
            }
            until = Timestamp(microseconds: current.microseconds + parsed.wholeMicroseconds)
        } else {
            throw APIError(.badRequest, code: "invalid_silence", message: "ends_at or duration is required: how long the silence lasts")
        }
        let id: Int64
        do {
            id = try await admin.addSilence(
                farm: farm.name, matchers: decoded.matchers ?? [:], until: until, comment: String((decoded.comment ?? "").prefix(1000)),
                by: String((decoded.createdBy ?? "api").prefix(200)), now: current)
        } catch let error as AlertRuleError {
            throw APIError(.badRequest, code: "invalid_silence", message: error.description)
        } catch {
            logger.storeFailure("store failed to add a silence", error: error)
            throw APIError.unavailable(error)
        }
        return jsonResponse(["id": id], status: .created)
    }

    func removeSilence(context: IngestRequestContext) async throws -> Response {
        let farm = try requireAdmin(context)
        guard let text = context.parameters.decoded("id"), let id = Int64(text) else {
            throw APIError(.badRequest, code: "invalid_parameter", message: "the silence id must be a whole number, as GET /v1/farms/\(farm.name)/silences lists them")
        }
        try await storeCall("remove a silence") { try await admin.removeSilence(farm: farm.name, id: id) }
        return Response(status: .noContent)
    }

    // MARK: Plumbing

    private func requireFarm(_ context: IngestRequestContext) throws(APIError) -> FarmRecord {
        guard let farm = context.readerFarm else { throw APIError.unauthorized("send `Authorization: Bearer <key>` with a read token (fgr_...)") }
        return farm
    }

    private func requireAdmin(_ context: IngestRequestContext) throws(APIError) -> FarmRecord {
        let farm = try requireFarm(context)
        guard context.readerRole == .admin else {
            throw APIError(
                .forbidden, code: "forbidden",
                message: "this token may only read; changing alert rules, silences and acknowledgements needs an admin token of the farm (`farmgate-ingest token create --farm \(farm.name) --role admin`)")
        }
        return farm
    }

    private func collect(_ request: Request) async throws(APIError) -> ByteBuffer {
        try Self.checkJSONBody(request)
        return try await Self.collect(request.body)
    }

    /// Refuses a body that is not plain JSON, before it is read: 415 `unsupported_media_type` for a `Content-Type` other
    /// than `application/json` (or a `+json` type; none at all is taken as JSON), 415 `unsupported_encoding` for a
    /// `Content-Encoding` other than `identity`, since these small bodies are never compressed.
    static func checkJSONBody(_ request: Request) throws(APIError) {
        if let raw = request.headers[.contentType] {
            let mediaType = BatchController.mediaType(of: raw)
            guard mediaType == "application/json" || (mediaType.hasPrefix("application/") && mediaType.hasSuffix("+json")) else {
                throw APIError(
                    .unsupportedMediaType, code: "unsupported_media_type",
                    message: "Content-Type '\(raw.prefix(100))' is not accepted here; send the body as JSON with Content-Type: application/json")
            }
        }
        if let raw = request.headers[.contentEncoding], !["", "identity"].contains(raw.trimmingSpaces.lowercased()) {
            throw APIError(
                .unsupportedMediaType, code: "unsupported_encoding",
                message: "Content-Encoding '\(raw.prefix(100))' is not accepted here; send the JSON body uncompressed")
        }
    }

    /// The whole body, at most ``maxBodyBytes``: larger is 413; a body that cannot be read in full (a stream reset or cut
    /// mid-body) is 400 `incomplete_body`, as for batches, not 413, which would tell the client to send less.
    static func collect(_ body: RequestBody) async throws(APIError) -> ByteBuffer {
        do {
            return try await body.collect(upTo: maxBodyBytes)
        } catch is NIOTooManyBytesError {
            throw APIError(.contentTooLarge, code: "payload_too_large", message: "the body is larger than \(maxBodyBytes) bytes; send one rule or silence at a time")
        } catch {
            throw APIError(
                .badRequest, code: IngestErrorCode.incompleteBody,
                message: "the request body could not be read in full (\(error)); it was probably cut in transit: send it again")
        }
    }

    private func invalidRule(_ error: AlertRuleError) -> APIError {
        APIError(.badRequest, code: "invalid_rule", message: error.description)
    }

    /// Runs a store call: a field ``AlertAdmin`` refuses becomes 400 `invalid_body` naming it, not found 404, a taken name
    /// 409, anything else 503 with the details in the log.
    @discardableResult
    private func storeCall<T: Sendable>(_ what: String, _ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as AlertRuleError {
            throw APIError(.badRequest, code: "invalid_body", message: error.description)
        } catch IngestStoreError.notFound(let thing) {
            throw APIError(.notFound, code: "not_found", message: "\(thing) does not exist")
        } catch IngestStoreError.alreadyExists(let thing) {
            throw APIError(.conflict, code: "already_exists", message: "\(thing) already exists; PUT /v1/farms/{farm}/alert-rules/{name} replaces it")
        } catch {
            logger.storeFailure("store failed", error: error, metadata: ["alert.operation": "\(what)"])
            throw APIError.unavailable(error)
        }
    }
}
