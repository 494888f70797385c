public import FarmgateWire
public import Hummingbird
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
public func buildApplication(
    configuration: IngestConfiguration,
    store: any IngestStore,
    registry: PrometheusCollectorRegistry,
    logger: Logger,
    now: @escaping @Sendable () -> Timestamp = { Timestamp.now() },
    credentialCacheTTL: Duration = .seconds(2)
) -> some ApplicationProtocol {
    let router = buildRouter(
        configuration: configuration, store: store, metrics: IngestMetrics(registry: registry), logger: logger, now: now,
        credentialCacheTTL: credentialCacheTTL)
    return Application(
        router: router,
        configuration: ApplicationConfiguration(
            address: .hostname(configuration.server.host, port: configuration.server.port), serverName: "farmgate-ingest"),
        logger: logger)
}

func buildRouter(
    configuration: IngestConfiguration,
    store: any IngestStore,
    metrics: IngestMetrics,
    logger: Logger,
    now: @escaping @Sendable () -> Timestamp,
    credentialCacheTTL: Duration
) -> Router<IngestRequestContext> {
    let router = Router(context: IngestRequestContext.self)
    // Middleware first: it wraps only routes added after it, and the not-found responder.
    router.add(middleware: RequestMetricsMiddleware(metrics: metrics))
    router.add(middleware: APIErrorMiddleware())

    let authenticator = Authenticator(store: store, cacheTTL: credentialCacheTTL)
    BatchController(
        store: store, authenticator: authenticator,
        rateLimiter: RateLimiter(rate: configuration.limits.requestsPerSecond, burst: configuration.limits.burst),
        validator: ReadingValidator(
            futureTolerance: configuration.limits.futureTolerance,
            unsynchronizedFutureLimit: configuration.limits.unsynchronizedFutureLimit),
        limits: configuration.limits,
        metrics: metrics, now: now, logger: logger
    ).addRoutes(to: router)
    ReadController(store: store, authenticator: authenticator, logger: logger).addRoutes(to: router)

    router.get("/healthz") { _, _ in
        jsonResponse(["status": "ok"])
    }
    router.get("/readyz") { _, _ in
        do {
            try await store.ping()
            return jsonResponse(["status": "ready"])
        } catch {
            logger.warning("readiness check failed", metadata: ["error": "\(error)"])
            throw APIError(
                .serviceUnavailable, code: "not_ready", message: "the store does not answer; check the storage path, disk and the ingest's log",
                headers: [.retryAfter: "5"])
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
