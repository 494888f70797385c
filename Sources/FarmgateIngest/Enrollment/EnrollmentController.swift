import FarmgateSupport
import FarmgateWire
import Foundation
import Hummingbird
import Logging
import Prometheus

/// `POST /v1/enroll`: exchanges a one-time enrollment token (`Authorization: Bearer fge_…`) for a device key.
///
/// - Every attempt, good or bad, takes a token from its client address's bucket (``Settings/burst`` at once, then
///   ``Settings/perSecond``): the endpoint creates credentials, so it is limited before the store is asked anything.
/// - A token works once, until it expires (410 `token_expired`) or is revoked (410 `token_revoked`, by
///   `farmgate-ingest enroll-token revoke`). The device is created, or, when it exists, given a new key (its old key
///   stops working; sensors and readings are kept); the answer says which (``EnrollmentAnswer/Action``).
/// - If the answer is lost, the same token presented again within ``Settings/graceWindow`` of the exchange gets the same
///   key again (`"repeated": true`), never a second device or another key; after the window it is 410 `token_used`.
/// - A site that names its `[device] id` and holds a token for another device is refused 409 `device_mismatch`, and the
///   token stays unused.
/// - The log says who enrolled what: farm, device, client address, token id and action; never a key or a token secret.
///
/// Metric: `farmgate_ingest_enrollments_total{result}` with `result` one of ``Result``.
struct EnrollmentController: Sendable {
    /// How the endpoint is limited. Not in the configuration file: the defaults fit any ingest (enrolling is rare).
    struct Settings: Sendable {
        /// How long after an exchange the same token gets the same answer again. Default 10 minutes.
        var graceWindow: Duration = .seconds(600)
        /// Attempts one client address may make at once. Default 10.
        var burst: Int = 10
        /// Attempts per second one client address may make once its burst is spent. Default 0.1 (one every 10 s).
        var perSecond: Double = 0.1
    }

    /// The bounded label of `farmgate_ingest_enrollments_total`.
    enum Result: String, CaseIterable {
        case created, rotated, repeated
        case invalid, expired, used, revoked, mismatch
        case rateLimited = "rate_limited"
    }

    let store: any EnrollmentStore & CredentialStore
    let settings: Settings
    let limiter: KeyedRateLimiter<ClientAddress>
    let counters: [Result: Counter]
    let now: @Sendable () -> Timestamp
    let logger: Logger

    init(
        store: any EnrollmentStore & CredentialStore, settings: Settings = Settings(), registry: PrometheusCollectorRegistry,
        now: @escaping @Sendable () -> Timestamp, logger: Logger
    ) {
        self.store = store
        self.settings = settings
        self.limiter = KeyedRateLimiter(rate: settings.perSecond, burst: settings.burst, policy: "enroll")
        let name = MetricNameDescriptor(
            namespace: "farmgate_ingest", metricName: "enrollments", unitName: "total",
            helpText: "Enrollment token exchanges, by result.")
        var counters: [Result: Counter] = [:]
        for result in Result.allCases { counters[result] = registry.makeCounter(descriptor: name, labels: [("result", result.rawValue)]) }
        self.counters = counters
        self.now = now
        self.logger = logger
    }

    func addRoutes(to router: Router<IngestRequestContext>) {
        router.post(RouterPath(EnrollmentProtocol.path)) { request, context in
            try await self.enroll(request, client: context.clientAddress)
        }
    }

    func enroll(_ request: Request, client: ClientAddress) async throws(APIError) -> Response {
        let limit = limiter.acquire(client)
        if limit.isLimited {
            count(.rateLimited)
            logger.notice("enrollment attempts limited", metadata: ["client.address": "\(client)"])
            throw APIError(
                .tooManyRequests, code: EnrollmentErrorCode.rateLimited,
                message: "too many enrollment attempts from this address; retry after \(limit.retryAfterSeconds) s",
                headers: limit.headers)
        }
        let token = try bearerToken(request)
        try ReadController.checkParameters(request.uri.queryParameters, known: [])
        let wanted = try await requestedDevice(request)
        let record: EnrollmentTokenRecord
        do {
            guard let found = try await store.enrollmentToken(keyID: token.keyID), constantTimeEquals(found.secretHash, token.secretHash) else {
                count(.invalid)
                logger.notice("enrollment with an unknown token", metadata: ["client.address": "\(client)", "enroll.token": "\(token.keyID)"])
                throw Self.invalid("this enrollment token is not known here; check that it was copied whole and that the URL is the ingest that made it")
            }
            record = found
        } catch let error as APIError {
            throw error
        } catch {
            throw unavailable(error)
        }
        let at = now()
        if let revokedAt = record.revokedAt { throw revoked(record, at: revokedAt, client: client) }
        // Before the repeat of a used token's answer too: a site configured for another device must not be given
        // this device's key, whether the token is fresh or was used a moment ago.
        if let wanted, wanted != record.device.rawValue {
            count(.mismatch)
            logger.notice(
                "enrollment refused: the site names another device",
                metadata: [
                    "device.farm": "\(record.farm)", "device.id": "\(record.device)", "enroll.requested_device": "\(wanted)",
                    "client.address": "\(client)", "enroll.token": "\(record.keyID)",
                ])
            let state = record.usedAt == nil ? "the token was not used" : "nothing was given"
            throw APIError(
                .conflict, code: EnrollmentErrorCode.deviceMismatch,
                message:
                    "this token is for device '\(record.device)' of farm '\(record.farm)', but the site's configuration says [device] id = \"\(wanted)\"; \(state). Ask for a token for '\(wanted)', or set [device] id = \"\(record.device)\"")
        }
        if record.usedAt != nil { return try await repeatOrRefuse(record, token: token, client: client, at: at) }
        guard record.expiresAt > at else { throw expired(record, client: client) }
        for attempt in 1...5 {
            let key = APIKey.generate(kind: .device)
            do {
                let sealed = try EnrollmentSeal.seal(key.text, with: token)
                let outcome = try await store.redeemEnrollmentToken(
                    rowID: record.rowID, farmID: record.farmID, device: record.device, deviceKeyID: key.keyID, deviceSecretHash: key.secretHash,
                    sealedKey: sealed, client: "\(client)", at: at)
                switch outcome {
                case .redeemed(let identity, let action):
                    count(action == .created ? .created : .rotated)
                    logger.info(
                        "device enrolled",
                        metadata: [
                            "device.farm": "\(identity.farm)", "device.id": "\(identity.device)", "enroll.action": "\(action.rawValue)",
                            "client.address": "\(client)", "enroll.token": "\(record.keyID)", "device.key_id": "\(key.keyID)",
                        ])
                    return jsonResponse(
                        EnrollmentAnswer(farm: record.farm, device: record.device.rawValue, key: key.text, action: action, repeated: false))
                case .notRedeemable:
                    // Another exchange of the same token won (an agent that retried at once), or it expired or was
                    // revoked meanwhile.
                    let again = try await store.enrollmentToken(keyID: token.keyID)
                    if let again, let revokedAt = again.revokedAt { throw revoked(again, at: revokedAt, client: client) }
                    guard let again, again.usedAt != nil else { throw expired(record, client: client) }
                    return try await repeatOrRefuse(again, token: token, client: client, at: at)
                }
            } catch IngestStoreError.alreadyExists(let what) where what.hasPrefix("API key id") && attempt < 5 {
                continue
            } catch let error as APIError {
                throw error
            } catch {
                throw unavailable(error)
            }
        }
        throw unavailable(IngestStoreError.alreadyExists("API key id"))
    }

    /// A used token: the same answer again within the grace window, else 410 `token_used`.
    private func repeatOrRefuse(_ record: EnrollmentTokenRecord, token: APIKey, client: ClientAddress, at: Timestamp) async throws(APIError) -> Response {
        let grace = settings.graceWindow.wholeMicroseconds
        if let usedAt = record.usedAt, at.microseconds - usedAt.microseconds <= grace, let sealed = record.sealedKey,
            let action = record.action, let key = EnrollmentSeal.open(sealed, with: token), try await stillCurrent(key, of: record)
        {
            count(.repeated)
            logger.notice(
                "enrollment answered again (the first answer was lost)",
                metadata: [
                    "device.farm": "\(record.farm)", "device.id": "\(record.device)", "client.address": "\(client)",
                    "enroll.token": "\(record.keyID)", "enroll.first_client": "\(record.usedBy ?? "unknown")",
                ])
            return jsonResponse(EnrollmentAnswer(farm: record.farm, device: record.device.rawValue, key: key, action: action, repeated: true))
        }
        // Past the window: nothing needs the sealed key any more.
        do {
            try await store.forgetSealedEnrollmentKeys(usedBefore: Timestamp(microseconds: at.microseconds - grace))
        } catch {
            logger.warning("cannot forget the sealed keys of used enrollment tokens", metadata: ["error": "\(error)"])
        }
        count(.used)
        let when = record.usedAt.map { RFC3339.format($0) } ?? "earlier"
        logger.notice(
            "enrollment refused: token already used",
            metadata: [
                "device.farm": "\(record.farm)", "device.id": "\(record.device)", "client.address": "\(client)",
                "enroll.token": "\(record.keyID)", "enroll.used_at": "\(when)", "enroll.first_client": "\(record.usedBy ?? "unknown")",
            ])
        throw APIError(
            .gone, code: EnrollmentErrorCode.tokenUsed,
            message:
                "this enrollment token was already used at \(when) from \(record.usedBy ?? "another address") (device '\(record.device)' of farm '\(record.farm)'); a token works once. Make a new one with `farmgate-ingest enroll-token create --farm \(record.farm) --device \(record.device)`")
    }

    /// Whether the key an exchange gave is still the device's: a rotation, a revocation or another token since then
    /// replaced it, and repeating it would hand the site a key that is refused.
    private func stillCurrent(_ key: String, of record: EnrollmentTokenRecord) async throws(APIError) -> Bool {
        guard let parsed = APIKey(parsing: key) else { return false }
        do {
            guard let credential = try await store.deviceCredential(keyID: parsed.keyID) else { return false }
            return !credential.revoked && credential.identity.device == record.device && credential.identity.farm == record.farm
        } catch {
            throw unavailable(error)
        }
    }

    private func expired(_ record: EnrollmentTokenRecord, client: ClientAddress) -> APIError {
        count(.expired)
        logger.notice(
            "enrollment refused: token expired",
            metadata: [
                "device.farm": "\(record.farm)", "device.id": "\(record.device)", "client.address": "\(client)", "enroll.token": "\(record.keyID)",
            ])
        return APIError(
            .gone, code: EnrollmentErrorCode.tokenExpired,
            message:
                "this enrollment token expired at \(RFC3339.format(record.expiresAt)); make a new one with `farmgate-ingest enroll-token create --farm \(record.farm) --device \(record.device)` (longer with --ttl)")
    }

    private func revoked(_ record: EnrollmentTokenRecord, at revokedAt: Timestamp, client: ClientAddress) -> APIError {
        count(.revoked)
        logger.notice(
            "enrollment refused: token revoked",
            metadata: [
                "device.farm": "\(record.farm)", "device.id": "\(record.device)", "client.address": "\(client)", "enroll.token": "\(record.keyID)",
                "enroll.revoked_at": "\(RFC3339.format(revokedAt))",
            ])
        return APIError(
            .gone, code: EnrollmentErrorCode.tokenRevoked,
            message:
                "this enrollment token was revoked at \(RFC3339.format(revokedAt)) and no longer works; make a new one with `farmgate-ingest enroll-token create --farm \(record.farm) --device \(record.device)`")
    }

    private func unavailable(_ error: any Error) -> APIError {
        logger.storeFailure("store failed during an enrollment", error: error)
        return APIError.unavailable()
    }

    private func count(_ result: Result) { counters[result]?.increment() }

    /// The token in `Authorization: Bearer fge_…`, or 401 `invalid_token` saying what is missing.
    private func bearerToken(_ request: Request) throws(APIError) -> APIKey {
        guard let header = request.headers[.authorization] else {
            count(.invalid)
            throw Self.invalid("send `Authorization: Bearer fge_…` with the enrollment token from `farmgate-ingest enroll-token create`")
        }
        let parts = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "bearer", let key = APIKey(parsing: parts[1].trimmingSpaces),
            key.kind == .enrollment
        else {
            count(.invalid)
            throw Self.invalid("the bearer value is not an enrollment token (fge_<id>_<secret>); copy it exactly as `farmgate-ingest enroll-token create` printed it")
        }
        return key
    }

    /// The `device` of an optional JSON body ``EnrollmentRequest`` (at most 4 KiB).
    private func requestedDevice(_ request: Request) async throws(APIError) -> String? {
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: 4096)
        } catch {
            throw APIError(
                .contentTooLarge, code: "payload_too_large", message: "the body of an enrollment is at most 4 KiB of JSON: {\"device\": \"<id>\"}")
        }
        guard buffer.readableBytes > 0 else { return nil }
        let example = "JSON such as {\"device\": \"greenhouse-1\"} (or an empty body)"
        let members: [String]?
        do {
            members = try StrictJSON.topLevelMembers(Array(buffer.readableBytesView))
        } catch {
            throw APIError(.badRequest, code: "bad_request", message: "the body of an enrollment: \(error.description)")
        }
        guard members != nil else {
            throw APIError(.badRequest, code: "bad_request", message: "the body of an enrollment must be a JSON object: \(example)")
        }
        // The document is an object of valid JSON: the only way left to fail is a `device` that is not a string.
        guard let request = try? JSONDecoder().decode(EnrollmentRequest.self, from: Data(buffer.readableBytesView)) else {
            throw APIError(.badRequest, code: "bad_request", message: "the body of an enrollment: 'device' must be a string; send \(example)")
        }
        guard let wanted = request.device else { return nil }
        // The id the site's configuration names: one that is no device id can match no token.
        do { _ = try DeviceID(wanted) } catch {
            throw APIError(.badRequest, code: "bad_request", message: "the body of an enrollment: 'device' is no device id: \(error.description)")
        }
        return wanted
    }

    private static func invalid(_ message: String) -> APIError {
        APIError(.unauthorized, code: EnrollmentErrorCode.invalidToken, message: message, headers: [.wwwAuthenticate: "Bearer"])
    }
}
