public import FarmgateWire
public import Hummingbird
import HummingbirdCore
public import Logging
public import Prometheus

/// Assembles the ingest's HTTP application: routes, middleware and their dependencies. `serve` and the tests call this
/// same builder with their own store and registry.
///
/// ```swift
/// let registry = PrometheusCollectorRegistry()
/// let app = buildApplication(configuration: configuration, store: store, registry: registry, logger: logger)
/// try await app.runService()
/// ```
///
/// - Parameters:
///   - configuration: where to listen and the request limits.
///   - store: where batches go and reads come from.
///   - registry: the Prometheus registry that `GET /metrics` renders; the ingest registers its metrics in it.
///   - logger: the application's logger.
///   - now: the wall clock used to judge timestamps (tests pass a fixed one).
///   - credentialCacheTTL: how long a verified credential is trusted before the store is asked again; a revocation
///     takes effect within this time. Default 2 seconds.
///   - commits: told of what each commit stored for the first time (the alert engine, rollups); `latest` is added to it.
///   - latest: the latest-value cache `GET /v1/farms/{farm}/latest` answers from. On by default (one instance on
///     SQLite); `serve` on PostgreSQL passes one that its ``PostgresLatestListener`` turns on once it hears every
///     instance's commits.
///   - certificates: with `configuration.server.tls`, the certificate the server serves, which `serve` reloads on
///     SIGHUP; nil to serve `configuration.server.tls` as it is. Unused without TLS.
///   - onServerRunning: called once the server listens (`serve` tells systemd `READY=1` there).
///
/// The server enforces `[server]`'s connection limits (``LimitedHTTP1Channel``, or ``LimitedTLSChannel`` with
/// `tls_certificate` and `tls_key`, which also serves HTTP/2). To keep `max_connections` below what
/// the process can hold, this raises the process's soft `RLIMIT_NOFILE` towards its hard limit and, if that is still too
/// low, lowers the cap and logs a warning saying how to raise the limit.
public func buildApplication(
    configuration: IngestConfiguration,
    store: any IngestStore,
    registry: PrometheusCollectorRegistry,
    logger: Logger,
    now: @escaping @Sendable () -> Timestamp = { Timestamp.now() },
    credentialCacheTTL: Duration = .seconds(2),
    commits: CommitFeed = CommitFeed(),
    latest: LatestCache = LatestCache(),
    certificates: ServerCertificates? = nil,
    onServerRunning: @escaping @Sendable () async -> Void = {}
) -> some ApplicationProtocol {
    let metrics = IngestMetrics(registry: registry)
    let requestLimits = configuration.limits
    let authenticator = Authenticator(store: store, cacheTTL: credentialCacheTTL, negativeCacheTTL: requestLimits.unknownKeyCacheTTL)
    let failures = FailedAuthenticationLimiter(rate: requestLimits.authFailuresPerSecond, burst: requestLimits.authFailureBurst)
    let readLimiter = KeyedRateLimiter<String>(rate: requestLimits.readRequestsPerSecond, burst: requestLimits.readBurst, policy: "read")
    let trustedProxies = (try? TrustedProxies(configuration.server.trustedProxies)) ?? TrustedProxies()
    let router = buildRouter(
        configuration: configuration, store: store, metrics: metrics, logger: logger, now: now,
        gate: AuthenticationGate(authenticator: authenticator, failures: failures, logger: logger), readLimiter: readLimiter,
        trustedProxies: trustedProxies, commits: CommitFeed(commits.observers + [latest]), latest: latest)
    // Behind a trusted proxy the client address comes from a header the router's middleware reads: no fast path there.
    let fastPath =
        trustedProxies.isEmpty
        ? LatestFastPath(authenticator: authenticator, failures: failures, rateLimiter: readLimiter, cache: latest, metrics: metrics) : nil
    var limits = ConnectionLimits(server: configuration.server)
    if let fitting = FileDescriptorLimit.fit(connections: limits.maxConnections), fitting < limits.maxConnections {
        logger.warning(
            "the open-file limit is too low for [server] max_connections; serving fewer connections",
            metadata: [
                "server.max_connections": "\(limits.maxConnections)", "server.effective_max_connections": "\(fitting)",
                "hint": "raise LimitNOFILE in the systemd unit (or ulimit -n) above max_connections + \(ConnectionLimits.refusalHeadroom + FileDescriptorLimit.reserved)",
            ])
        limits.maxConnections = fitting
    }
    let connectionLimits = limits
    let connections = ConnectionCounter()
    let server: HTTPServerBuilder
    if let tls = configuration.server.tls {
        let http2 = configuration.server.http2
        logger.info(
            "serving HTTPS", metadata: ["server.protocols": "\(http2 ? "h2, http/1.1" : "http/1.1")", "server.tls_certificate": "\(tls.certificateFile)"])
        // A pair BoringSSL refuses (the configuration's check makes that unlikely) fails the server's start below.
        let served = certificates ?? (try? ServerCertificates(tls: tls, http2: http2))
        served?.observe { metrics.tlsCertificate($0) }
        server = HTTPServerBuilder { responder in
            LimitedTLSChannel(
                responder: responder, certificates: try served ?? ServerCertificates(tls: tls, http2: http2), limits: connectionLimits,
                connections: connections, metrics: metrics, fastPath: fastPath)
        }
    } else {
        server = HTTPServerBuilder { responder in
            LimitedHTTP1Channel(responder: responder, limits: connectionLimits, connections: connections, metrics: metrics, fastPath: fastPath)
        }
    }
    return Application(
        router: router,
        server: server,
        // No server name: a `Server` header on every response carries nothing the agent uses (bytes on a metered link).
        configuration: ApplicationConfiguration(
            address: .hostname(configuration.server.host, port: configuration.server.port),
            availableConnectionsDelegate: MaximumAvailableConnections(connectionLimits.maxConnections + ConnectionLimits.refusalHeadroom, logger: logger)),
        onServerRunning: { _ in await onServerRunning() },
        logger: logger)
}

func buildRouter(
    configuration: IngestConfiguration,
    store: any IngestStore,
    metrics: IngestMetrics,
    logger: Logger,
    now: @escaping @Sendable () -> Timestamp,
    gate: AuthenticationGate,
    readLimiter: KeyedRateLimiter<String>,
    trustedProxies: TrustedProxies,
    commits: CommitFeed,
    latest: LatestCache
) -> Router<IngestRequestContext> {
    // HEAD on every GET route (RFC 9110 §9.3.2): the GET's status and headers, Content-Length included, without the body.
    let router = Router(context: IngestRequestContext.self, options: .autoGenerateHeadEndpoints)
    // Middleware first: it wraps only routes added after it, and the not-found responder.
    router.add(middleware: RequestMetricsMiddleware(metrics: metrics))
    router.add(middleware: APIErrorMiddleware())
    if !trustedProxies.isEmpty {
        router.add(middleware: ForwardedClientMiddleware(proxies: trustedProxies))
    }

    let limits = configuration.limits
    let wireState = (store as? any WireStateStore).map { WireStateCache(store: $0, logger: logger) }
    let commits = CommitFeed(commits.observers + [wireState].compactMap { $0 })
    BatchController(
        store: store, gate: gate,
        rateLimiter: RateLimiter(rate: limits.requestsPerSecond, burst: limits.burst, policy: "device"),
        uploadsInFlight: UploadsInFlight(limit: limits.uploadsInFlight),
        validator: ReadingValidator(futureTolerance: limits.futureTolerance, unsynchronizedFutureLimit: limits.unsynchronizedFutureLimit),
        limits: limits,
        metrics: metrics, commits: commits, wireState: wireState, now: now, logger: logger
    ).addRoutes(to: router)
    ReadController(
        store: store, latestCache: latest, gate: gate, rateLimiter: readLimiter, logger: logger, retention: configuration.retention, now: now
    ).addRoutes(to: router)
    if let calibrations = store as? any CalibrationStore {
        CalibrationController(store: store, calibrations: calibrations, gate: gate, rateLimiter: readLimiter, logger: logger).addRoutes(to: router)
    }
    if let enrollment = store as? any EnrollmentStore & CredentialStore {
        EnrollmentController(store: enrollment, registry: metrics.registry, now: now, logger: logger).addRoutes(to: router)
    }
    if let alerts = store as? any AdministrationStore & AlertStore {
        AlertController(admin: AlertAdmin(store: alerts), gate: gate, rateLimiter: readLimiter, now: now, logger: logger).addRoutes(to: router)
    }

    // A parameter these do not take is refused, as on every route: a probe's `?verbose=1` must not look honoured.
    router.get("/healthz") { request, _ in
        try ReadController.checkParameters(request.uri.queryParameters, known: [])
        return jsonResponse(["status": "ok"])
    }
    let notReadyAdvice = configuration.storage.postgres == nil
        ? "the store does not answer; check the storage path, disk and the ingest's log"
        : "the store does not answer; check that PostgreSQL runs and is reachable at [storage] url, and the ingest's log"
    router.get("/readyz") { request, _ in
        try ReadController.checkParameters(request.uri.queryParameters, known: [])
        do {
            try await store.ping()
            return jsonResponse(["status": "ready"])
        } catch {
            logger.storeFailure("readiness check failed", level: .warning, error: error)
            // The SQLite store's own reason when it has one (its file removed, its disk full): the store answers queries
            // then, and the general advice would send the operator looking elsewhere.
            let message: String =
                switch error {
                case let error as SQLiteIngestStoreError: error.description
                default: notReadyAdvice
                }
            throw APIError(.serviceUnavailable, code: "not_ready", message: message, headers: [.retryAfter: "5"])
        }
    }
    let registry = metrics.registry
    router.get("/metrics") { _, _ in
        Response(
            status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: registry.emitToBuffer())))
    }
    return router
}
