import FarmgateWire
import Hummingbird
import Logging

/// The read API, for a farm's read tokens:
/// - `GET /v1/farms/{farm}/latest?device=&sensor=&quantity=&limit=&cursor=`: the latest reading of every sensor of the
///   farm, or of one device, paginated (see ``LatestSelection``), from the ``LatestCache``;
/// - `GET /v1/farms/{farm}/devices/{device}/sensors/{sensor}/readings?from=&to=&limit=&resolution=`: one sensor's
///   readings in time order, raw or as rollup buckets (`resolution=raw|1m|1h|1d|auto`, default raw).
struct ReadController: Sendable {
    let store: any ReadingQueryStore
    /// Where `latest` answers come from (the store only on a farm's first read, or while the cache is off).
    let latestCache: LatestCache
    let gate: AuthenticationGate
    /// Per read token; see ``ReaderAuthMiddleware``.
    let rateLimiter: KeyedRateLimiter<String>
    let logger: Logger
    /// Raw readings' retention period (`[retention] raw`): `auto` does not pick raw readings for a span that starts
    /// before its cut-off.
    /// What retention keeps, for `resolution=auto` (nil: everything is kept).
    var retention: IngestConfiguration.Retention? = nil
    var now: @Sendable () -> Timestamp = { Timestamp.now() }

    /// The most readings one request returns.
    static let maxLimit = 10_000
    /// The number of readings returned when `limit` is absent.
    static let defaultLimit = 1_000

    func addRoutes(to router: Router<IngestRequestContext>) {
        let farms = router.group("/v1/farms/{farm}").add(middleware: ReaderAuthMiddleware(gate: gate, rateLimiter: rateLimiter))
        farms.get("latest") { request, context in try await self.latest(request, context: context) }
        farms.get("devices/{device}/sensors/{sensor}/readings") { request, context in try await self.readings(request, context: context) }
    }

    func latest(_ request: Request, context: IngestRequestContext) async throws -> Response {
        let farm = try requireFarm(context)
        let selection = try Self.latestSelection(request.uri.queryParameters)
        let store = self.store
        let body: ByteBuffer
        do {
            body = try await latestCache.page(farm: farm, selection: selection) { try await store.latestReadings(farmID: farm.id) }
        } catch {
            logger.storeFailure("store failed to read the latest readings", error: error)
            throw APIError.unavailable()
        }
        return jsonResponse(body: body)
    }

    /// The `latest` query: `device=ID`, `sensor=GLOB` (`*`, `?`), `quantity=Q`, `limit=1...10000` sensors per page,
    /// `cursor=` the previous page's `next`.
    static let globBytes = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-*?".utf8)

    /// The parameters `latest` takes.
    static let latestParameters = ["device", "sensor", "quantity", "limit", "cursor"]
    /// The parameters the range endpoint takes.
    static let readingsParameters = ["from", "to", "limit", "resolution"]

    /// Refuses a query that holds a parameter not in `known` (a misspelt `resolutoin=1h` would otherwise be ignored
    /// and the answer look right), or one given more than once (`limit=1&limit=2`: which one would be meant?), with
    /// 400 `invalid_parameter` naming it.
    static func checkParameters(_ query: Parameters, known: [String]) throws(APIError) {
        // An empty name (a trailing '&') names nothing. A read has a handful of parameters: compared pairwise, with no
        // set allocated on the hot path of `latest`.
        for (index, (name, _)) in query.enumerated() where !name.isEmpty {
            guard known.contains(where: { $0[...] == name }) else {
                throw APIError(
                    .badRequest, code: "invalid_parameter",
                    message: known.isEmpty
                        ? "unknown parameter '\(name.prefix(40))'; this endpoint takes no query parameters"
                        : "unknown parameter '\(name.prefix(40))'; this endpoint takes \(known.joined(separator: ", "))")
            }
            guard !query.prefix(index).contains(where: { $0.key == name }) else {
                throw APIError(.badRequest, code: "invalid_parameter", message: "parameter '\(name)' is given more than once; give it once")
            }
        }
    }

    static func latestSelection(_ query: Parameters) throws(APIError) -> LatestSelection {
        try checkParameters(query, known: latestParameters)
        var selection = LatestSelection()
        if let text = query.get("device") {
            do { selection.device = try DeviceID(text) } catch { throw APIError(.badRequest, code: "invalid_parameter", message: "device: \(error.description)") }
        }
        if let pattern = query.get("sensor") {
            guard !pattern.isEmpty, pattern.utf8.count <= 128,
                pattern.utf8.allSatisfy({ Self.globBytes.contains($0) })
            else {
                throw APIError(
                    .badRequest, code: "invalid_parameter",
                    message: "sensor '\(pattern.prefix(60))' must be a sensor id or a glob of one (A-Z a-z 0-9 . _ - with * for any run and ? for one character), at most 128 characters, e.g. tank1.* or *.ph")
            }
            selection.sensorPattern = pattern
        }
        if let text = query.get("quantity") {
            guard let quantity = Quantity(rawValue: text) else {
                throw APIError(
                    .badRequest, code: "invalid_parameter",
                    message: "quantity '\(text.prefix(40))' is not one of \(Quantity.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            selection.quantity = quantity
        }
        if let text = query.get("limit") {
            guard let value = Int(text), (1...LatestSelection.maxLimit).contains(value) else {
                throw APIError(
                    .badRequest, code: "invalid_parameter",
                    message: "limit '\(text.prefix(40))' must be a whole number of sensors from 1 to \(LatestSelection.maxLimit) (default \(LatestSelection.defaultLimit))")
            }
            selection.limit = value
        }
        if let text = query.get("cursor") {
            guard let cursor = LatestCursor(text: text) else {
                throw APIError(
                    .badRequest, code: "invalid_parameter",
                    message: "cursor '\(text.prefix(40))' is not one this ingest wrote; pass the previous page's \"next\" exactly, or leave cursor out for the first page")
            }
            selection.after = cursor
        }
        return selection
    }

    func readings(_ request: Request, context: IngestRequestContext) async throws -> Response {
        let farm = try requireFarm(context)
        let device: DeviceID
        let sensor: SensorID
        do {
            device = try DeviceID(context.parameters.decoded("device") ?? "")
            sensor = try SensorID(context.parameters.decoded("sensor") ?? "")
        } catch {
            throw APIError(.badRequest, code: "invalid_parameter", message: error.description)
        }
        let query = request.uri.queryParameters
        try Self.checkParameters(query, known: Self.readingsParameters)
        let from = try timestampParameter(query.get("from"), name: "from")
        let to = try timestampParameter(query.get("to"), name: "to")
        if let from, let to, from >= to {
            throw APIError(.badRequest, code: "invalid_parameter", message: "from must be earlier than to (from is inclusive, to exclusive)")
        }
        let requested = try resolutionParameter(query.get("resolution"))
        // `auto` answers at most about 2,000 points unless asked for fewer (its level is then picked for that many).
        var limit = switch requested {
        case .raw: ReadController.defaultLimit
        case .auto: ReadResolution.autoTargetPoints
        default: ReadController.maxLimit
        }
        if let text = query.get("limit") {
            guard let value = Int(text), (1...ReadController.maxLimit).contains(value) else {
                throw APIError(
                    .badRequest, code: "invalid_parameter",
                    message: "limit '\(text.prefix(40))' must be a whole number from 1 to \(ReadController.maxLimit) (default \(ReadController.defaultLimit))")
            }
            limit = value
        }
        let record: SensorRecord?
        var rows: [StoredReading] = []
        var points: [RollupPoint] = []
        var resolved = ReadResolution.Resolved.raw
        var (queryFrom, queryTo) = (from, to)
        var autoSpan: (from: Timestamp, to: Timestamp)?
        var truncated = false
        var nextFrom: Timestamp?
        if requested == .auto {
            // `auto` reads a closed span: up to now when `to` is absent, the day before `to` when `from` is.
            let end = to ?? now()
            let start = from ?? Timestamp(microseconds: max(Self.representable.lowerBound, end.microseconds - ReadResolution.autoDefaultSpan))
            guard start < end else {
                throw APIError(
                    .badRequest, code: "invalid_parameter",
                    message: "from (\(start)) must be earlier than to, which is now (\(end)) when absent, for resolution=auto")
            }
            (queryFrom, queryTo) = (start, end)
            autoSpan = (start, end)
        }
        do {
            record = try await store.sensor(farmID: farm.id, device: device, sensor: sensor)
            if let record {
                switch requested {
                case .raw: resolved = .raw
                case .minute: resolved = .rollup(.minute)
                case .hour: resolved = .rollup(.hour)
                case .day: resolved = .rollup(.day)
                case .auto:
                    let (start, end) = autoSpan ?? (Timestamp(microseconds: 0), now())
                    let store = self.store
                    let (retention, at) = (self.retention, now())
                    // Raw readings are kept from the later of the configured period's cut-off and the one a run
                    // applied: a `raw` raised since brings nothing back.
                    let applied = try await store.appliedRawCutoff()
                    let appliedRollups = try await store.appliedRollupCutoffs()
                    let decided = try await ReadResolution.decideAuto(
                        from: start, to: end, target: min(limit, ReadResolution.autoTargetPoints),
                        keptFrom: { resolution in
                            switch resolution {
                            case .raw:
                                let configured = retention.flatMap { IngestConfiguration.Retention.cutoff($0.raw, now: at) }
                                return [configured, applied].compactMap { $0 }.max()
                            case .rollup(let level):
                                // The same for a level: what a run removed stays removed, whatever the period now.
                                let configured = retention.flatMap { IngestConfiguration.Retention.cutoff($0.period(of: level), now: at) }
                                return [configured, appliedRollups[level]].compactMap { $0 }.max()
                            }
                        },
                        storedAtLeast: { try await store.storedReadingCount(sensorRowID: record.rowID, from: start, to: end) },
                        raw: { try await store.readings(sensorRowID: record.rowID, from: start, to: end, limit: $0) })
                    resolved = decided.resolved
                    rows = decided.rows
                }
                // One more than the limit says whether the span holds more (`truncated`).
                switch resolved {
                case .raw where requested == .auto: break
                case .raw: rows = try await store.readings(sensorRowID: record.rowID, from: queryFrom, to: queryTo, limit: limit + 1)
                case .rollup(let level): points = try await store.rollups(sensorRowID: record.rowID, level: level, from: queryFrom, to: queryTo, limit: limit + 1)
                }
                if rows.count > limit {
                    (rows, truncated) = try await wholeInstants(rows, limit: limit, sensorRowID: record.rowID, to: queryTo)
                    nextFrom = truncated ? rows.last.map { Timestamp(microseconds: $0.timestamp.microseconds + 1) } : nil
                } else if points.count > limit, case .rollup(let level) = resolved {
                    truncated = true
                    points.removeLast(points.count - limit)
                    nextFrom = points.last.map { Timestamp(microseconds: $0.start.microseconds + level.width) }
                }
            }
        } catch {
            logger.storeFailure("store failed to read readings", error: error)
            throw APIError.unavailable()
        }
        guard let record else {
            throw APIError(
                .notFound, code: "not_found",
                message: "farm '\(farm.name)' has no sensor '\(sensor)' on device '\(device)'; GET /v1/farms/\(farm.name)/latest lists the sensors")
        }
        let answer = RangeAnswer(
            farm: farm.name, device: device.rawValue, sensor: sensor.rawValue, quantity: record.quantity.rawValue, unit: record.quantity.unit,
            from: queryFrom, to: queryTo, limit: limit, resolution: resolved.name,
            content: resolved == .raw ? .readings(rows) : .buckets(points), truncated: truncated, nextFrom: nextFrom)
        return jsonResponse(body: answer.json)
    }

    /// The most readings of an instant one answer holds when more than `limit` share the page's first instant.
    static let maxInstantReadings = 100_000

    /// The page of `rows` (more than `limit`, in time then sequence order): the oldest `limit`, without the readings of
    /// the last instant when the next reading shares it, so that a client asking again from just after the page's last
    /// timestamp (`next_from`) misses none of an instant's readings (the ingest stores several readings of a sensor at
    /// one instant when their sequences differ). When the first instant alone holds more than `limit`, the page is
    /// every reading of that instant (up to ``maxInstantReadings``), and `more` says whether the span (up to `to`)
    /// holds anything after it, so that the last page of a span is never said to be truncated.
    private func wholeInstants(_ rows: [StoredReading], limit: Int, sensorRowID: Int64, to: Timestamp?) async throws -> (page: [StoredReading], more: Bool) {
        let last = rows[limit - 1].timestamp
        guard rows[limit].timestamp == last else { return (Array(rows.prefix(limit)), true) }
        let whole = rows.prefix(limit).prefix { $0.timestamp != last }
        if !whole.isEmpty { return (Array(whole), true) }
        let after = Timestamp(microseconds: last.microseconds + 1)
        let instant = try await store.readings(sensorRowID: sensorRowID, from: last, to: after, limit: Self.maxInstantReadings + 1)
        if instant.count > Self.maxInstantReadings { return (Array(instant.prefix(Self.maxInstantReadings)), true) }
        let later = try await store.readings(sensorRowID: sensorRowID, from: after, to: to, limit: 1)
        return (instant, !later.isEmpty)
    }

    private func requireFarm(_ context: IngestRequestContext) throws(APIError) -> FarmRecord {
        guard let farm = context.readerFarm else { throw APIError.unauthorized("send `Authorization: Bearer <key>` with a read token (fgr_...)") }
        return farm
    }

    private func resolutionParameter(_ text: String?) throws(APIError) -> ReadResolution {
        guard let text else { return .raw }
        guard let resolution = ReadResolution(rawValue: text) else {
            throw APIError(
                .badRequest, code: "invalid_parameter",
                message: "resolution '\(text.prefix(40))' is not one of \(ReadResolution.accepted) (raw readings, 1-minute, hourly or daily rollups, or auto to pick by span)")
        }
        return resolution
    }

    private func timestampParameter(_ text: String?, name: String) throws(APIError) -> Timestamp? {
        guard let text else { return nil }
        // Rounded up past a fraction finer than the stored microseconds: `from` inclusive and `to` exclusive, as written.
        guard let timestamp = RFC3339.parse(text, roundingUp: true) else {
            if RFC3339.isOutOfRange(text) {
                throw APIError(
                    .badRequest, code: "invalid_parameter",
                    message: "\(name) '\(text.prefix(60))' is outside the years 0001-9999 UTC once its offset is applied; those are the instants the API can name")
            }
            throw APIError(
                .badRequest, code: "invalid_parameter",
                message: "\(name) '\(text.prefix(60))' is not an RFC 3339 timestamp; write it like 2026-01-31T12:00:00Z (percent-encode a '+' offset as %2B)")
        }
        // An offset can carry a valid text out of RFC 3339's years (0000-01-01T00:00:00+23:59 is in year 0, and the
        // answer would echo it as -0001-12-31T00:01:00Z).
        guard Self.representable.contains(timestamp.microseconds) else {
            throw APIError(
                .badRequest, code: "invalid_parameter",
                message: "\(name) '\(text.prefix(60))' is \(timestamp.microseconds < Self.representable.lowerBound ? "before" : "after") the years 0001-9999 UTC, which are the instants the API can name")
        }
        return timestamp
    }

    /// The instants RFC 3339 can write in UTC: 0001-01-01T00:00:00Z up to 10000-01-01T00:00:00Z (excluded), in
    /// microseconds since 1970.
    static let representable: Range<Int64> = -62_135_596_800_000_000 ..< 253_402_300_800_000_000
}

/// The names of the flags set in `quality`, in bit order; bits without a name appear as `bit<N>`.
public func flagNames(_ quality: QualityFlags) -> [String] {
    var names: [String] = []
    var known: UInt16 = 0
    for (flag, name) in QualityFlags.names {
        known |= flag.rawValue
        if quality.contains(flag) { names.append(name) }
    }
    let unknown = quality.rawValue & ~known
    if unknown != 0 {
        for bit in 0..<16 where unknown & (1 << bit) != 0 { names.append("bit\(bit)") }
    }
    return names
}
