import FarmgateWire
import Foundation
import Hummingbird
import Logging
import NIOCore

/// `POST /v1/batches`: authenticates the device, bounds and decodes the body, validates readings one by one, stores them
/// in one durable transaction and answers with an ``IngestReceipt``.
struct BatchController: Sendable {
    let store: any ReadingIngestStore
    let gate: AuthenticationGate
    let rateLimiter: RateLimiter
    /// Each device's uploads in flight, capped at `limits.uploadsInFlight`.
    let uploadsInFlight: UploadsInFlight
    let validator: ReadingValidator
    let limits: IngestConfiguration.Limits
    let metrics: IngestMetrics
    /// Told of what each commit stored for the first time (the latest cache, the alert engine).
    let commits: CommitFeed
    /// The tables and newest readings stateful frames (format version 4) are decoded against; nil when the store keeps
    /// none (version 4 is then answered 415 like any version this ingest does not read).
    let wireState: WireStateCache?
    let now: @Sendable () -> Timestamp
    let logger: Logger

    enum BodyFormat { case binary, json }
    enum BodyEncoding: String { case identity, gzip, zstd }

    func addRoutes(to router: Router<IngestRequestContext>) {
        router.post(RouterPath(IngestProtocol.batchesPath)) { request, context in
            try await self.post(request, context: context)
        }
        router.get(RouterPath(IngestProtocol.deviceStatePath)) { request, context in
            try await self.deviceState(request, client: context.clientAddress)
        }
    }

    func post(_ request: Request, context: IngestRequestContext) async throws -> Response {
        do {
            let (receipt, device) = try await ingest(request, client: context.clientAddress)
            metrics.batch(.stored)
            metrics.readings(accepted: receipt.accepted, duplicates: receipt.duplicates, rejected: receipt.rejectedCount)
            logger.debug(
                "batch stored",
                metadata: [
                    "device.farm": "\(device.farm)", "device.id": "\(device.device)", "batch.accepted": "\(receipt.accepted)",
                    "batch.duplicates": "\(receipt.duplicates)", "batch.rejected": "\(receipt.rejectedCount)",
                ])
            if Self.acceptsCompactReceipt(request), let compact = receipt.compact {
                return Response(
                    status: .ok, headers: [.contentType: IngestProtocol.compactReceiptMediaType],
                    body: ResponseBody(byteBuffer: ByteBuffer(bytes: compact)))
            }
            return jsonResponse(receipt)
        } catch {
            metrics.batch(Self.result(for: error.status))
            throw error
        }
    }

    /// Whether the request's `Accept` asks for the compact receipt (``IngestProtocol/compactReceiptMediaType``): listed
    /// with a weight above 0 (`;q=0` is "not acceptable", RFC 9110) and at least that of JSON (`application/json`,
    /// `application/*` or `*/*`); on a tie, as the agent sends both, the compact one.
    static func acceptsCompactReceipt(_ request: Request) -> Bool {
        var compact = 0.0, json = 0.0
        for value in request.headers[values: .accept] {
            for range in value.split(separator: ",") {
                let parts = range.split(separator: ";")
                guard let type = parts.first?.trimmingSpaces.lowercased() else { continue }
                var weight = 1.0
                for parameter in parts.dropFirst() {
                    let pair = parameter.split(separator: "=", maxSplits: 1)
                    if pair.count == 2, pair[0].trimmingSpaces.lowercased() == "q" {
                        weight = Double(pair[1].trimmingSpaces).map { min(max($0, 0), 1) } ?? 0
                    }
                }
                switch type {
                case IngestProtocol.compactReceiptMediaType: compact = max(compact, weight)
                case "application/json", "application/*", "*/*": json = max(json, weight)
                default: break
                }
            }
        }
        return compact > 0 && compact >= json
    }

    /// `Retry-After` of a 429 for too many uploads in flight: an upload of the device is answered within seconds.
    static let inFlightRetryAfterSeconds = 1

    static func result(for status: HTTPResponse.Status) -> IngestMetrics.BatchResult {
        switch status.code {
        case 401: .unauthorized
        case 403: .forbidden
        case 409: .staleState
        case 413: .tooLarge
        case 415: .unsupported
        case 429: .rateLimited
        case 503: .unavailable
        default: .malformed
        }
    }

    private func ingest(_ request: Request, client: ClientAddress) async throws(APIError) -> (IngestReceipt, DeviceIdentity) {
        // 1. Who is it? (An address over its limit of failed authentications is refused here, before the store.)
        let device = try await gate.device(request, client: client)
        // A parameter the route does not take (`?dry_run=true`) must not look honoured while the batch is stored.
        try ReadController.checkParameters(request.uri.queryParameters, known: [])

        // 2. What is it?
        let format = try Self.format(of: request)
        let encoding = try Self.encoding(of: request)

        // 3. May it?
        let limit = rateLimiter.acquire(device.rowID)
        if limit.isLimited {
            throw APIError(
                .tooManyRequests, code: "rate_limited",
                message: "this device posts more than \(rateLimiter.rate) batches per second (burst \(rateLimiter.burst)); retry after \(limit.retryAfterSeconds) s and send larger batches less often",
                headers: limit.headers)
        }
        // A device's uploads at once are bounded too: each holds its body and decompressed copies until it is answered.
        guard uploadsInFlight.enter(device.rowID) else {
            // Its own policy: the device's bucket may have requests left, and its headers would tell the client to go on.
            let wait = Duration.seconds(Self.inFlightRetryAfterSeconds)
            let headers = RateLimitStatus(
                policy: "in_flight", limit: uploadsInFlight.limit, window: wait, remaining: 0, reset: wait, retryAfter: wait
            ).headers
            throw APIError(
                .tooManyRequests, code: "rate_limited",
                message: "this device already has \(uploadsInFlight.limit) uploads in flight, the most the ingest takes at once from one device; wait for their answers, then retry after \(Self.inFlightRetryAfterSeconds) s (send one batch at a time, as the agent does)",
                headers: headers)
        }
        defer { uploadsInFlight.leave(device.rowID) }

        // 4. Bounded body.
        let bytes = try await readBody(request, encoding: encoding)
        // A body that arrived whole and empty is not one "cut in transit" (which the sender would retry for ever).
        guard !bytes.isEmpty else {
            throw APIError(
                .badRequest, code: IngestErrorCode.malformedBatch,
                message: "the request has an empty body: send a batch (JSON, or the binary format) in it")
        }

        // 5. Decode.
        let batchLimits = BatchLimits(maxReadings: limits.maxReadingsPerBatch, maxDecompressedBytes: limits.maxDecompressedBytes)
        let batch: Batch
        var preRejected: [RejectedReading] = []
        var calibrations: [CalibrationEvent] = []
        var eventStore: (any CalibrationStore)?
        do {
            switch format {
            case .binary where bytes.count > 3 && bytes[3] == BatchCodec.statefulFormatVersion && wireState != nil:
                let frame = try await decodeStateful(bytes, device: device, limits: batchLimits)
                batch = frame.batch
                if let calibrationStore = store as? any CalibrationStore {
                    (calibrations, eventStore) = (frame.calibrations, calibrationStore)
                } else if !frame.calibrations.isEmpty {
                    throw BatchDecodingError("the frame carries calibration events, which this ingest's store does not keep")
                }
            case .binary:
                if let calibrationStore = store as? any CalibrationStore {
                    let frame = try BatchCodec.decodeFrame(bytes, limits: batchLimits)
                    batch = frame.batch
                    (calibrations, eventStore) = (frame.calibrations, calibrationStore)
                } else {
                    batch = try BatchCodec.decode(bytes, limits: batchLimits)
                }
            case .json:
                let decoded = try BatchJSON.decode(bytes, limits: batchLimits)
                (batch, preRejected) = (decoded.batch, decoded.rejected)
                // A store that keeps no calibrations ignores the member (as an older ingest skips it): the receipt then
                // has no calibrations count and the sender keeps its events.
                if let calibrationStore = store as? any CalibrationStore {
                    (calibrations, eventStore) = (decoded.calibrations, calibrationStore)
                }
            }
        } catch let error as BatchDecodingError {
            throw decodingError(error, format: format, limits: limits)
        } catch let error as APIError {
            throw error
        } catch {
            logger.storeFailure("store failed to read the state of a stateful frame", error: error, metadata: ["device.id": "\(device.device)"])
            throw APIError.unavailable(error)
        }
        guard batch.device == device.device else {
            throw APIError(
                .forbidden, code: IngestErrorCode.deviceMismatch,
                message: "the batch is from device '\(batch.device)' but the key belongs to device '\(device.device)'; each device must upload with its own key")
        }
        if let problem = Self.coarseResolution(in: batch.sensors) { throw problem }

        // Calibration events are taken whole or the batch is refused (the receipt has no place for a refused event); the
        // agent then sends the readings without them and quarantines the event. Times need the ingest's clock, so they
        // are checked here rather than in the decoder.
        let current = now()
        if let problem = calibrations.lazy.compactMap({ validator.problem(of: $0, now: current) }).first {
            throw APIError(
                .badRequest, code: IngestErrorCode.malformedBatch,
                message: "\(problem); this batch will never be accepted with the event: send its readings without it")
        }

        // An event id names one calibration for good: the same id with other content (in this batch or stored) is
        // refused like an invalid event, before anything is stored, not taken for a duplicate and dropped by the sender.
        if let eventStore, !calibrations.isEmpty {
            let stored: [String: CalibrationEvent]
            // An event is of a sensor the device has: declared in this batch or registered before.
            let declared = Set(batch.sensors.map(\.id))
            var unknown: SensorID?
            do {
                for sensor in Set(calibrations.map(\.sensor)) where !declared.contains(sensor) && unknown == nil {
                    if try await !eventStore.hasSensor(sensor, device: device) { unknown = sensor }
                }
                stored = try await eventStore.storedCalibrations(ids: calibrations.map(\.id), for: device)
            } catch {
                logger.storeFailure("store failed to read calibration events", error: error, metadata: ["device.id": "\(device.device)"])
                throw APIError.unavailable(error)
            }
            if let unknown {
                throw APIError(
                    .badRequest, code: IngestErrorCode.malformedBatch,
                    message: "a calibration event names sensor \(unknown.rawValue), which device '\(device.device)' never declared (not in this batch's sensors nor sent before); send the sensor's descriptor with the event, or send its readings without it")
            }
            if let problem = Self.conflictingEvent(in: calibrations, stored: stored) { throw problem }
        }

        // 6. Validate one reading at a time, store the rest durably.
        let (valid, rejected) = validator.validate(batch, now: current)
        let outcome: StoreOutcome
        let receivedAt = now()
        do {
            outcome = try await store.store(valid, for: device, receivedAt: receivedAt)
        } catch {
            logger.storeFailure("store failed to commit a batch", error: error, metadata: ["device.id": "\(device.device)"])
            throw APIError.unavailable(error)
        }
        commits.publish(outcome, device: device, receivedAt: receivedAt)
        let allRejected = (preRejected + rejected + outcome.rejected).sorted { ($0.sequence ?? 0, $0.sensor) < ($1.sequence ?? 0, $1.sensor) }
        var receipt = IngestReceipt(accepted: outcome.accepted, duplicates: outcome.duplicates, rejections: allRejected)
        if let eventStore, !calibrations.isEmpty {
            // After the readings: a failure here answers 503, the agent sends the batch again, the readings come back as
            // duplicates and the events are stored then. Nothing is acknowledged before both are durable.
            do {
                receipt.calibrations = try await eventStore.storeCalibrations(calibrations, for: device, receivedAt: now())
            } catch {
                logger.storeFailure("store failed to commit calibration events", error: error, metadata: ["device.id": "\(device.device)"])
                throw APIError.unavailable(error)
            }
        }
        return (receipt, device)
    }

    /// The refusal of the first event whose id is already taken by another event: earlier in `events`, or in `stored`
    /// (what the store holds under those ids). The sender quarantines the event and sends its readings without it.
    static func conflictingEvent(in events: [CalibrationEvent], stored: [String: CalibrationEvent]) -> APIError? {
        var seen = stored
        for event in events {
            if let other = seen[event.id], other != event {
                let whereFrom = stored[event.id] == nil ? "earlier in this batch" : "already stored"
                return APIError(
                    .badRequest, code: IngestErrorCode.malformedBatch,
                    message: "calibration event '\(event.id)' (sensor \(event.sensor.rawValue)) has other content than the event with that id \(whereFrom) (sensor \(other.sensor.rawValue)); an event id names one calibration for good: give this one a new id, or send its readings without it")
            }
            seen[event.id] = event
        }
        return nil
    }

    /// The answer to a body that is not a batch, by what is wrong with it: the agent retries `incomplete_body`, falls
    /// back to another format on `unsupported_format_version`, splits the batch on 413 and refuses `malformed_batch`.
    /// The binary format versions this ingest reads: 3 (calibration events) only when its store keeps them.
    var acceptedVersions: [UInt8] {
        (store is any CalibrationStore ? BatchCodec.readableVersions : [BatchCodec.formatVersion])
            + (wireState != nil ? [BatchCodec.statefulFormatVersion] : [])
    }

    /// Decodes a stateful frame (format version 4) against the device's state: a declared table is used as it is and
    /// stored once the frame decoded (before the answer, so a sender that sees a 2xx may name it by hash; a frame that
    /// fails to decode leaves no table behind, in memory or in the store); a table named by its hash must be held (else
    /// 409 `unknown_sensor_table`); a context must match the device's newest readings, from memory or else from the store
    /// (else 409 `stale_context`, with the ingest's newest readings in the answer), or be the one before this instance's last
    /// commit of the device (a frame sent again after its answer was lost; see ``WireStateCache/contextBeforeLastCommit(device:)``).
    /// - Throws: ``BatchDecodingError``, ``APIError`` (409), or the store's error.
    func decodeStateful(_ bytes: [UInt8], device: DeviceIdentity, limits: BatchLimits) async throws -> BatchFrame {
        guard let wireState else { throw BatchDecodingError("unsupported format version 4", kind: .unsupportedVersion(4)) }
        let head = try BatchCodec.decodeStatefulHead(bytes, limits: limits)
        let table: SensorTable
        if let declared = head.declaredTable {
            // A table is kept in memory and in the store: never one of more sensors than a device may have.
            guard declared.sensors.count <= self.limits.sensorsPerDevice else {
                throw APIError(
                    .unprocessableContent, code: IngestErrorCode.sensorTableTooLarge,
                    message: "the frame declares a sensor table of \(declared.sensors.count) sensors, more than the \(self.limits.sensorsPerDevice) this ingest allows one device ([limits] sensors_per_device); send self-contained frames (format version 2), or have the ingest's operator raise the limit")
            }
            // Checked before the table is kept: one the batch is refused for must not be named later.
            if let problem = Self.coarseResolution(in: declared.sensors) { throw problem }
            table = declared
        } else if let known = try await wireState.table(device: device, hash: head.tableHash) {
            table = known
        } else {
            throw APIError(
                .conflict, code: IngestErrorCode.unknownSensorTable,
                message: "this ingest holds no sensor table \(String(head.tableHash, radix: 16)) for device '\(device.device)' (it was never declared here, or the store lost it); send the same readings again with the table declared")
        }
        var context: [SensorID: ContextReading] = [:]
        var resent = false
        if head.usesContext {
            context = try await wireState.context(device: device)
            if !head.contextMatches(table: table, context: context), let before = wireState.contextBeforeLastCommit(device: device),
                head.contextMatches(table: table, context: before)
            {
                // The same frame again after its answer was lost: predicted from the context before it was stored.
                context = before
                resent = true
            }
            if !head.contextMatches(table: table, context: context) {
                // Another instance may have stored readings of the device since: the store decides.
                context = try await wireState.context(device: device, reload: true)
            }
            guard head.contextMatches(table: table, context: context) else {
                let entries = table.sensors.compactMap { descriptor in
                    context[descriptor.id].map { ContextEntryJSON(sensor: descriptor.id, reading: $0) }
                }
                throw APIError(
                    .conflict, code: IngestErrorCode.staleContext,
                    message: "the frame predicts from newest readings other than those this ingest holds for device '\(device.device)'; send the same readings again against the context in this answer, or without context",
                    context: entries)
            }
        }
        let frame = try BatchCodec.decodeStateful(head, table: table, context: context, device: device.device, limits: limits)
        if let declared = head.declaredTable { try await wireState.remember(declared, device: device) }
        metrics.statefulFrame(declared: head.declaredTable != nil, context: resent ? .previous : head.usesContext ? .used : .none)
        return frame
    }

    /// The refusal of a batch that declares a sensor with a resolution coarser than its quantity allows
    /// (``Quantity/coarsestStep``, the bound the agent's configuration has too): at such a step every value rounds to a
    /// few, and a reading sent again with other content under a stored sequence would compare equal (a duplicate, which
    /// the sender deletes) instead of being refused `sequence_conflict`. nil when every resolution is fine.
    static func coarseResolution(in sensors: [SensorDescriptor]) -> APIError? {
        for sensor in sensors {
            guard let problem = sensor.quantity.coarseResolutionProblem(sensor.resolution) else { continue }
            return APIError(
                .badRequest, code: IngestErrorCode.malformedBatch,
                message: "sensor '\(sensor.id)' is declared with resolution \(sensor.resolution.description): \(problem); fix the sender, this batch will never be accepted")
        }
        return nil
    }

    func decodingError(_ error: BatchDecodingError, format: BodyFormat, limits: IngestConfiguration.Limits) -> APIError {
        let form = format == .binary ? "binary" : "JSON"
        switch error.kind {
        case .unsupportedVersion(let version):
            let accepted = acceptedVersions.map(Int.init)
            return APIError(
                .unsupportedMediaType, code: IngestErrorCode.unsupportedFormatVersion,
                message: "the binary batch is of format version \(version); this ingest reads version \(accepted.map(String.init).joined(separator: ", ")) and always accepts the JSON form (\(IngestProtocol.jsonBatchMediaType)); send one of those or upgrade the ingest",
                acceptedVersions: accepted)
        case .truncated:
            return APIError(
                .badRequest, code: IngestErrorCode.incompleteBody,
                message: "the \(form) batch ends early (\(error.description)); the body was probably cut in transit (a proxy or a broken connection): send it again")
        case .tooManyReadings:
            return APIError(
                .contentTooLarge, code: IngestErrorCode.tooManyReadings,
                message: "the batch holds more than \(limits.maxReadingsPerBatch) readings (\(error.description)); send smaller batches")
        case .tooLarge:
            return APIError(
                .contentTooLarge, code: IngestErrorCode.decompressedTooLarge,
                message: "the \(form) batch expands beyond \(limits.maxDecompressedBytes) bytes (\(error.description)); send smaller batches")
        case .malformed:
            return APIError(
                .badRequest, code: IngestErrorCode.malformedBatch,
                message: "the \(form) batch cannot be decoded: \(error.description); fix the sender, this batch will never be accepted")
        }
    }

    static func format(of request: Request) throws(APIError) -> BodyFormat {
        let raw = request.headers[.contentType] ?? ""
        switch mediaType(of: raw) {
        case IngestProtocol.binaryBatchMediaType: return .binary
        case IngestProtocol.jsonBatchMediaType: return .json
        default:
            throw APIError(
                .unsupportedMediaType, code: "unsupported_media_type",
                message: "Content-Type '\(raw.prefix(100))' is not accepted; send \(IngestProtocol.binaryBatchMediaType) or \(IngestProtocol.jsonBatchMediaType)")
        }
    }

    /// A `Content-Type` value's media type, lower-cased, without its parameters (`application/json; charset=utf-8`).
    static func mediaType(of contentType: String) -> String {
        contentType.split(separator: ";", maxSplits: 1).first.map { $0.trimmingSpaces.lowercased() } ?? ""
    }

    static func encoding(of request: Request) throws(APIError) -> BodyEncoding {
        let raw = request.headers[.contentEncoding] ?? "identity"
        let token = raw.trimmingCharacters(in: .whitespaces).lowercased()
        switch token {
        case "", "identity": return .identity
        case "gzip", "x-gzip": return .gzip
        case "zstd": return .zstd
        default:
            throw APIError(
                .unsupportedMediaType, code: "unsupported_encoding",
                message: "Content-Encoding '\(raw.prefix(100))' is not accepted; send gzip, zstd or identity (one encoding, not a list)")
        }
    }

    private func readBody(_ request: Request, encoding: BodyEncoding) async throws(APIError) -> [UInt8] {
        let tooLarge = APIError(
            .contentTooLarge, code: "payload_too_large",
            message: "the request body is larger than \(limits.maxBodyBytes) bytes; send smaller batches")
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > limits.maxBodyBytes {
            throw tooLarge
        }
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: limits.maxBodyBytes)
        } catch is NIOTooManyBytesError {
            throw tooLarge
        } catch {
            throw APIError(
                .badRequest, code: IngestErrorCode.incompleteBody,
                message: "the request body could not be read in full (\(error)); it was probably cut in transit: send it again")
        }
        let raw = Array(buffer.readableBytesView)
        let expanded: [UInt8]
        do {
            switch encoding {
            case .identity: expanded = raw
            case .gzip: expanded = try Gzip.decompress(raw, maxOutput: limits.maxDecompressedBytes)
            case .zstd: expanded = try Zstd.decompress(raw, maxOutput: limits.maxDecompressedBytes)
            }
        } catch {
            if error.windowTooLarge {
                // Not a 413: halving the batch would not help, the frame's parameters are what is too large.
                throw APIError(
                    .unsupportedMediaType, code: "unsupported_encoding",
                    message: "the \(encoding.rawValue) body cannot be decoded in bounded memory: \(error.description)")
            }
            if error.exceededLimit {
                throw APIError(
                    .contentTooLarge, code: "decompressed_too_large",
                    message: "the body expands to more than \(limits.maxDecompressedBytes) bytes; send smaller batches")
            }
            if error.truncated {
                throw APIError(
                    .badRequest, code: IngestErrorCode.incompleteBody,
                    message: "the \(encoding.rawValue) body ends early (\(error.description)); it was probably cut in transit: send it again")
            }
            if error.trailingData {
                // The body is compressed as it says: "compress it with gzip" would send the sender looking in the wrong place.
                throw APIError(
                    .badRequest, code: IngestErrorCode.malformedBatch,
                    message: "the \(encoding.rawValue) body has bytes after the end of its compressed data (\(error.description)); send the compressed data alone")
            }
            throw APIError(
                .badRequest, code: IngestErrorCode.malformedBatch,
                message: "the \(encoding.rawValue) body cannot be decompressed: \(error.description); compress it with \(encoding.rawValue) or drop the Content-Encoding header")
        }
        guard expanded.count <= limits.maxDecompressedBytes else {
            throw APIError(
                .contentTooLarge, code: "decompressed_too_large",
                message: "the body is larger than \(limits.maxDecompressedBytes) bytes; send smaller batches")
        }
        return expanded
    }
}
