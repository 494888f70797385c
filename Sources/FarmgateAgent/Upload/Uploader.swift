import FarmgateWire
import Foundation
import Logging
import Metrics
import ServiceLifecycle
import Synchronization

/// Sends buffered readings to the ingest in batches and deletes them from the buffer only once the ingest acknowledged them
/// (the Delivery contract in ARCHITECTURE.md).
///
/// **Cutting batches.** A batch is sent as soon as ``UploadConfiguration/batchMaxReadings`` readings are pending, or once the
/// oldest pending reading is ``UploadConfiguration/batchMaxAge`` old. A batch whose encoding exceeds
/// ``UploadConfiguration/batchMaxBytes`` is halved until it fits.
///
/// **Live first.** While the backlog holds more than one batch (after an outage), batches alternate between the newest and the
/// oldest end of the backlog, starting with the newest: fresh readings reach the ingest within a request or two while the
/// backlog drains at half the request rate in the background. With one batch or less pending, the oldest readings go first.
///
/// **Outcomes.** A reading goes to quarantine only when the ingest named it in a receipt, or when bisection isolated it
/// while the rest of its batch was accepted; a refusal of whole requests never quarantines a backlog.
/// - 2xx with an ``IngestReceipt`` whose counts add up to the batch: the readings it rejects go to quarantine with
///   `code: message`, except `sequence_conflict` (below); all others (accepted or duplicate) are acknowledged; the
///   backoff resets and a hold clears. A receipt whose counts do not add up, or that does not name every refused reading,
///   acknowledges nothing: the batch is sent again after a backoff.
/// - `sequence_conflict` in a receipt: the ingest holds other readings under those numbers (this site's buffer lost its
///   history). The uploader asks `GET /v1/device` for the ingest's highest sequence, raises the buffer's counter above it,
///   renumbers those readings above max(ingest's highest, buffer's last) and sends them again. Readings the ingest stored
///   (accepted or duplicate) are never renumbered. The same question is asked at start, so that new readings are numbered
///   above the ingest's from the first; an ingest that is down is asked again later and never delays sampling.
/// - 400/422 (`malformed_batch` and any code but `incomplete_body`), a possible poison batch: the batch is halved and both
///   halves sent. When both halves are refused the same way and nothing of the batch was accepted, the refusal is
///   systematic: the queue is held (below). Otherwise bisection continues into the refused halves; a single reading still
///   refused is quarantined with the error body's `code: message` if some other reading of its batch was accepted, and
///   holds the queue if none was (it is tried again later, when more readings give bisection something to compare).
/// - 413 (`payload_too_large`, `decompressed_too_large`, `too_many_readings`): the batch is halved and both halves sent,
///   whatever happens to the other; a single reading still refused 413 holds the queue.
/// - 415 `unsupported_format_version` for a binary batch: the uploader sends JSON (every ingest reads it) from then until it
///   restarts, says so in the log and in ``UploadStatus/formatFallback``, and sends the same batch again at once. This build
///   writes one binary version (``BatchCodec/formatVersion``), so `accepted_versions` never offers another it could write.
/// - Hold at once, no split: 401, 403 (`unauthorized`, `revoked`, `device_mismatch`), 415 `unsupported_media_type`,
///   `unsupported_encoding` (or a JSON batch refused `unsupported_format_version`), any other 4xx.
/// - Transient, retried after a backoff, no split: 400 `incomplete_body`, 5xx, no answer (connection refused, timeouts,
///   TLS failures), an unreadable receipt.
/// - 429, 503 with `Retry-After`: the next attempt waits exactly that long (even beyond ``UploadConfiguration/backoffMax``),
///   capped only at ``UploadConfiguration/retryAfterMax``.
///
/// Held means: nothing is quarantined and nothing deleted; ``UploadStatus/held`` shows the HTTP status, code, message and
/// since when, an error is logged when the hold begins (a notice at each further refusal), and the next attempt waits an
/// exponential backoff with full jitter (see ``Backoff``), capped at ``UploadConfiguration/backoffMax``, like every other
/// failure. The hold clears at the next acknowledged batch.
///
/// A reading that cannot be encoded at all goes to quarantine with `encoding_failed: ...`.
///
/// **Shutdown.** On graceful shutdown a request in flight is finished (bounded by ``UploadConfiguration/requestTimeout``) and
/// its outcome recorded; then, unless the ingest is failing, the buffer is committed and what is pending is sent for at most
/// ``UploadConfiguration/shutdownFlushTimeout``, and ``run()`` returns. Cancelling the task abandons the request.
/// Unacknowledged readings stay in the buffer.
///
/// **Metrics** (bounded labels): `farmgate_upload_requests_total{result="delivered"|"refused"|"failed"}`,
/// `farmgate_upload_readings_total{outcome="accepted"|"duplicate"|"rejected"|"quarantined"|"renumbered"}` and
/// `farmgate_upload_held` (1 while the queue is held, else 0).
public final class Uploader: Service {
    private let device: DeviceID
    private let source: any PendingReadings
    private let configuration: UploadConfiguration
    private let logger: Logger
    private let client: HTTPClient
    /// The request targets, the same for every request.
    private let batchesURL: String
    private let deviceStateURL: String
    private let authorization: HTTPHeader
    private let state: Mutex<UploadStatus>
    private let metrics = UploadMetrics()

    /// Creates the uploader and its HTTP client (no request is made until ``run()``).
    /// - Parameters:
    ///   - device: This gateway's id; every batch names it.
    ///   - source: The site buffer.
    ///   - configuration: Where and how to upload.
    ///   - logger: Receives what the uploader does; errors name what to fix.
    /// - Throws: ``HTTPClientError`` when the HTTP client cannot be set up (a CA file that cannot be read, ...).
    public init(device: DeviceID, source: any PendingReadings, configuration: UploadConfiguration, logger: Logger) throws(HTTPClientError) {
        self.device = device
        self.source = source
        self.configuration = configuration
        self.logger = logger
        self.client = try HTTPClient(configuration: configuration.httpClientConfiguration, logger: logger)
        self.batchesURL = configuration.batchesURL
        self.deviceStateURL = configuration.deviceStateURL
        self.authorization = HTTPHeader("Authorization", "Bearer \(configuration.deviceKey)")
        self.state = Mutex(UploadStatus(endpoint: batchesURL, format: configuration.format.rawValue))
        metrics.held.record(0)
    }

    /// What the uploader has done so far. Cheap and synchronous: safe to call from any thread at any time.
    public func status() -> UploadStatus {
        state.withLock { $0 }
    }

    /// Uploads until graceful shutdown or cancellation. Never throws for upload failures: it backs off and tries again.
    public func run() async throws {
        logger.info(
            "Uploader started",
            metadata: ["upload.url": "\(batchesURL)", "upload.format": "\(configuration.format.rawValue)"])
        var loop = LoopState(
            backoff: Backoff(initial: configuration.backoffInitial, maximum: configuration.backoffMax),
            format: configuration.format,
            deviceCheck: DeviceStateCheck(backoff: Backoff(initial: configuration.backoffInitial, maximum: configuration.backoffMax)))
        while !Self.stopping {
            let wait = await step(&loop)
            if wait > .zero { await Self.pause(wait) }
        }
        if !Task.isCancelled { await finalFlush(&loop) }
        let left = (try? await source.statistics().pending) ?? -1
        logger.info("Uploader stopped", metadata: ["upload.pending": "\(left)"])
    }

    // MARK: - The loop

    private struct LoopState {
        var backoff: Backoff
        /// The body format of the next request: the configured one until the ingest refuses its binary version.
        var format: UploadConfiguration.Format
        /// Whether (and when) to ask the ingest for the highest sequence it holds.
        var deviceCheck: DeviceStateCheck
        /// The end of the backlog the next batch comes from while the backlog holds more than one batch.
        var nextEnd: BacklogEnd = .newest
        /// When readings were first seen pending since the last delivery (monotonic, immune to wall-clock jumps).
        var pendingSince: ContinuousClock.Instant?
        /// Set during the final flush on graceful shutdown: new requests may start although the task is shutting down.
        var draining = false
        /// Numbers this run gave to renumbered readings: a conflict on one of them again means that someone else numbers
        /// readings for this device too (two sites with one key), and the next renumbering waits a backoff.
        var renumbered: Set<UInt64> = []
    }

    /// When to ask `GET /v1/device`: at start, and after a `sequence_conflict`; again later while the ingest cannot answer.
    private struct DeviceStateCheck {
        var due = true
        var notBefore: ContinuousClock.Instant?
        var backoff: Backoff

        var isDue: Bool { due && (notBefore.map { ContinuousClock.now >= $0 } ?? true) }

        mutating func answered() {
            due = false
            notBefore = nil
            backoff.reset()
        }

        mutating func postpone() {
            due = true
            notBefore = ContinuousClock.now + max(backoff.nextDelay(), .seconds(1))
        }
    }

    /// On graceful shutdown: commit what the buffer holds and send every pending reading, oldest first, for at most
    /// ``UploadConfiguration/shutdownFlushTimeout``. Skipped while the ingest is failing (the readings are safe in the
    /// buffer and go out at the next start); stops at the first failure.
    private func finalFlush(_ loop: inout LoopState) async {
        guard configuration.shutdownFlushTimeout > .zero, status().consecutiveFailures == 0 else { return }
        let deadline = ContinuousClock.now + configuration.shutdownFlushTimeout
        do {
            try await source.flush()
        } catch {
            logger.error("Cannot commit the buffer before the final flush", metadata: ["error": "\(error)"])
            return
        }
        loop.draining = true
        while ContinuousClock.now < deadline, !Task.isCancelled {
            guard let readings = try? await source.pending(limit: max(1, configuration.batchMaxReadings), from: .oldest),
                !readings.isEmpty
            else { break }
            if await deliver(readings, &loop) > .zero { break }
        }
    }

    private static var stopping: Bool { Task.isCancelled || Task.isShuttingDownGracefully }

    /// Sleeps for `duration`, returning early on graceful shutdown or cancellation.
    private static func pause(_ duration: Duration) async {
        guard !stopping else { return }
        _ = try? await cancelWhenGracefulShutdown { try await Task.sleep(for: duration) }
    }

    /// The wait after the buffer itself failed (it logs its own details).
    private var bufferRetryDelay: Duration { max(configuration.pollInterval, .seconds(1)) }

    /// Looks at the buffer, sends what is due, and says how long to wait before looking again.
    private func step(_ loop: inout LoopState) async -> Duration {
        if loop.deviceCheck.isDue {
            // Never blocks uploads: when the ingest cannot answer, batches go anyway (a conflict is caught in its receipt).
            _ = await learnDeviceState(&loop)
            if Self.stopping { return .zero }
        }
        let statistics: BufferStatistics
        do {
            statistics = try await source.statistics()
        } catch {
            logger.error("Cannot read the buffer statistics", metadata: ["error": "\(error)"])
            return bufferRetryDelay
        }
        guard statistics.pending > 0 else {
            loop.pendingSince = nil
            loop.nextEnd = .newest
            return configuration.pollInterval
        }
        let now = ContinuousClock.now
        let since = loop.pendingSince ?? now
        loop.pendingSince = since
        let seenFor = now - since
        var age = seenFor
        if let oldest = statistics.oldestPending {
            let wallAge = Duration.microseconds(Timestamp.now().microseconds - oldest.microseconds)
            age = max(age, wallAge)
        }
        let full = statistics.pending >= configuration.batchMaxReadings
        guard full || age >= configuration.batchMaxAge else {
            return min(configuration.pollInterval, configuration.batchMaxAge - age)
        }

        let end: BacklogEnd
        if statistics.pending > configuration.batchMaxReadings {
            end = loop.nextEnd
            loop.nextEnd = end == .newest ? .oldest : .newest
        } else {
            end = .oldest
            loop.nextEnd = .newest
        }
        let readings: [Reading]
        do {
            readings = try await source.pending(limit: max(1, configuration.batchMaxReadings), from: end)
        } catch {
            logger.error("Cannot read pending readings from the buffer", metadata: ["error": "\(error)"])
            return bufferRetryDelay
        }
        guard !readings.isEmpty else { return configuration.pollInterval }
        return await deliver(readings, &loop)
    }

    // MARK: - Delivering a batch: halving and bisection

    /// Where a delivery stands: go on with the next group, or stop and wait this long before the next step.
    private enum Flow {
        case proceed
        case stop(Duration)
    }

    /// What one delivery has learnt: whether any part of its batch was accepted. Until then, a refusal both halves of a
    /// split share is systematic (hold), and so is a single reading refused (nothing shows it is the cause). Once part of
    /// the batch was accepted, the refusal depends on what is sent: bisection goes on into every refused half (two poison
    /// readings side by side are both found) and a single reading still refused is quarantined.
    private struct Bisection {
        var accepted = false
    }

    /// Delivers `readings`, halving batches that are too large or cannot be encoded and bisecting refused ones (see the type's
    /// documentation). Returns the wait before the next step: zero after progress, the backoff after a failure or a hold.
    private func deliver(_ readings: [Reading], _ loop: inout LoopState) async -> Duration {
        var bisection = Bisection()
        switch await deliverGroup(readings[...], &loop, &bisection) {
        case .proceed:
            loop.pendingSince = nil
            return .zero
        case .stop(let wait):
            return wait
        }
    }

    private func deliverGroup(_ group: ArraySlice<Reading>, _ loop: inout LoopState, _ bisection: inout Bisection) async -> Flow {
        let outcome = await attempt(group, &loop)
        return await settle(group, outcome, &loop, &bisection)
    }

    /// Acts on the outcome of sending `group`.
    private func settle(_ group: ArraySlice<Reading>, _ attempt: Attempt, _ loop: inout LoopState, _ bisection: inout Bisection) async -> Flow {
        switch attempt {
        case .delivered:
            bisection.accepted = true
            return .proceed
        case .settled:
            return .proceed
        case .stop(let wait):
            return .stop(wait)
        case .halve(let refusal):
            guard group.count > 1 else {
                // Only a 413 halves a single reading (an oversized encoding is sent whatever its size).
                let refusal = refusal ?? Refusal(status: 413, code: "http_413", message: "the ingest refused a single reading as too large")
                return .stop(hold(refusal, reason: "the ingest refuses even a single reading as too large", &loop))
            }
            let (first, second) = Self.halves(group)
            for half in [first, second] {
                if case .stop(let wait) = await deliverGroup(half, &loop, &bisection) { return .stop(wait) }
            }
            return .proceed
        case .refused(let refusal):
            return await bisect(group, refusal, &loop, &bisection)
        }
    }

    /// `group` was refused as a whole by `refusal`: finds out whether a reading in it is the cause.
    private func bisect(
        _ group: ArraySlice<Reading>, _ refusal: Refusal, _ loop: inout LoopState, _ bisection: inout Bisection
    ) async -> Flow {
        guard group.count > 1 else {
            let reading = group[group.startIndex]
            guard bisection.accepted else {
                return .stop(
                    hold(
                        refusal,
                        reason: "a single reading was refused and no other reading of its batch was accepted: nothing shows that the "
                            + "reading is the cause; it is tried again with the readings that follow it", &loop))
            }
            logger.warning(
                "The ingest refused a reading that bisection isolated while the rest of its batch was accepted; moving it to quarantine",
                metadata: [
                    "reading.sequence": "\(reading.sequence)", "reading.sensor": "\(reading.sensor)", "http.status": "\(refusal.status)",
                    "reason": "\(refusal.reason)",
                ])
            guard await quarantine([reading.sequence: refusal.reason]) else { return .stop(bufferRetryDelay) }
            return .proceed
        }
        let (first, second) = Self.halves(group)
        let firstAttempt = await attempt(first, &loop)
        if case .stop(let wait) = firstAttempt { return .stop(wait) }
        if case .delivered = firstAttempt { bisection.accepted = true }
        let secondAttempt = await attempt(second, &loop)
        if case .stop(let wait) = secondAttempt { return .stop(wait) }
        if case .delivered = secondAttempt { bisection.accepted = true }
        if case .refused(let one) = firstAttempt, case .refused(let other) = secondAttempt, one.isSame(as: other), !bisection.accepted {
            return .stop(
                hold(
                    one, reason: "both halves of a split batch were refused the same way: the refusal is systematic, not caused by a reading",
                    &loop))
        }
        for (half, outcome) in [(first, firstAttempt), (second, secondAttempt)] {
            if case .stop(let wait) = await settle(half, outcome, &loop, &bisection) { return .stop(wait) }
        }
        return .proceed
    }

    /// The two halves of `group`, the older first.
    private static func halves(_ group: ArraySlice<Reading>) -> (ArraySlice<Reading>, ArraySlice<Reading>) {
        let middle = group.startIndex + group.count / 2
        return (group[..<middle], group[middle...])
    }

    private enum Encoding {
        case encoded([UInt8])
        case unencodable(String)
        case bufferFailed
    }

    private func encode(_ group: ArraySlice<Reading>, format: UploadConfiguration.Format) async -> Encoding {
        let descriptors: [SensorDescriptor]
        do {
            descriptors = try await source.descriptors(for: Set(group.map(\.sensor)))
        } catch {
            logger.error("Cannot read sensor descriptors from the buffer", metadata: ["error": "\(error)"])
            return .bufferFailed
        }
        let batch = Batch(device: device, sensors: descriptors, readings: Array(group))
        switch format {
        case .json:
            return .encoded(BatchJSON.encode(batch))
        case .binary:
            do {
                return .encoded(try BatchCodec.encode(batch))
            } catch {
                return .unencodable(error.description)
            }
        }
    }

    private func quarantine(_ reasons: [UInt64: String]) async -> Bool {
        do {
            try await source.quarantine(reasons)
        } catch {
            logger.error("Cannot move readings to quarantine", metadata: ["error": "\(error)"])
            return false
        }
        state.withLock { $0.quarantinedTotal += Int64(reasons.count) }
        metrics.quarantined.increment(by: Int64(reasons.count))
        return true
    }

    // MARK: - One request

    /// A whole-request refusal, from the ingest's ``APIErrorBody`` (or the bare status when the body is not one).
    struct Refusal: Sendable {
        var status: Int
        var code: String
        var message: String
        var acceptedVersions: [Int]? = nil

        /// `code: message`, as quarantine reasons and the status show it.
        var reason: String { "\(code): \(message)" }

        /// Whether two refusals are the same answer (status and code; the message may name values).
        func isSame(as other: Refusal) -> Bool { status == other.status && code == other.code }

        init(status: Int, code: String, message: String, acceptedVersions: [Int]? = nil) {
            self.status = status
            self.code = code
            self.message = message
            self.acceptedVersions = acceptedVersions
        }

        init(_ response: HTTPResponse) {
            status = response.status
            if let body = try? JSONDecoder().decode(APIErrorBody.self, from: Data(response.body)) {
                code = String(body.error.code.prefix(100))
                message = String(body.error.message.prefix(IngestReceipt.maxMessageLength))
                acceptedVersions = body.error.acceptedVersions
                return
            }
            code = "http_\(response.status)"
            message = String(decoding: response.body.prefix(200), as: UTF8.self)
                .trimmingCharacters(in: .whitespacesAndNewlines)
                .replacingOccurrences(of: "\n", with: " ")
        }
    }

    /// What became of one request.
    private enum Attempt {
        /// The ingest took the batch (its receipt settled every reading).
        case delivered
        /// Too large (413, or over batch_max_bytes, or not encodable as a whole): send the halves, each on its own.
        case halve(Refusal?)
        /// Refused whole in a way a reading in it may cause (400/422): bisect.
        case refused(Refusal)
        /// Dealt with on site without the ingest (a single reading that cannot be encoded, quarantined): nothing accepted.
        case settled
        /// Stop this delivery and wait: transient failure, Retry-After, hold, buffer failure, shutdown.
        case stop(Duration)
    }

    /// Encodes and sends `group` once (twice when the ingest's answer made the uploader fall back to JSON).
    private func attempt(_ group: ArraySlice<Reading>, _ loop: inout LoopState) async -> Attempt {
        while true {
            // Graceful shutdown: the request in flight has finished; start no new one.
            if Self.stopping && !loop.draining { return .stop(.zero) }
            let format = loop.format
            let body: [UInt8]
            switch await encode(group, format: format) {
            case .encoded(let bytes) where bytes.count > configuration.batchMaxBytes && group.count > 1:
                logger.debug("Batch too large, halving", metadata: ["batch.bytes": "\(bytes.count)", "batch.readings": "\(group.count)"])
                return .halve(nil)
            case .encoded(let bytes):
                body = bytes
            case .unencodable(let reason):
                if group.count > 1 { return .halve(nil) }
                let reading = group[group.startIndex]
                logger.error(
                    "A reading cannot be encoded; moving it to quarantine",
                    metadata: ["reading.sequence": "\(reading.sequence)", "reading.sensor": "\(reading.sensor)", "error": "\(reason)"])
                guard await quarantine([reading.sequence: "encoding_failed: \(reason)"]) else { return .stop(bufferRetryDelay) }
                return .settled
            case .bufferFailed:
                return .stop(bufferRetryDelay)
            }
            // nil: the uploader fell back to another format (at most once per run); the same readings go again at once.
            guard let outcome = await send(group, body: body, format: format, &loop) else { continue }
            return outcome
        }
    }

    /// Sends one encoded batch and classifies the answer (see the type's documentation). Returns nil when the ingest refused
    /// the binary format version and the uploader switched to JSON: the caller encodes the same readings again and resends.
    private func send(_ group: ArraySlice<Reading>, body: [UInt8], format: UploadConfiguration.Format, _ loop: inout LoopState) async -> Attempt? {
        state.withLock {
            $0.lastAttemptAt = Timestamp.now()
            $0.requestsTotal += 1
        }
        let headers = [authorization, HTTPHeader("Content-Type", format.mediaType), HTTPHeader("Accept", "application/json")]
        let response: HTTPResponse
        do {
            response = try await client.post(batchesURL, headers: headers, body: body)
        } catch {
            if error.kind == .cancelled { return .stop(.zero) }
            logger.warning("Upload failed", metadata: ["error": "\(error)", "upload.url": "\(batchesURL)"])
            return .stop(failed(result: error.description, status: nil, delay: loop.backoff.nextDelay(), &loop))
        }

        let status = response.status
        if (200...299).contains(status) { return await acknowledge(group, response: response, &loop) }
        let refusal = Refusal(response)
        let result = "\(status): \(refusal.reason)"
        switch status {
        case 429, 503:
            if let header = response.header("Retry-After"), let asked = RetryAfter.delay(header) {
                let delay = min(asked, configuration.retryAfterMax)
                logger.notice(
                    "The ingest asked to retry later",
                    metadata: ["http.status": "\(status)", "retry_after": "\(header)", "delay": "\(delay)"])
                loop.backoff.recordFailure()
                return .stop(failed(result: result, status: status, delay: delay, &loop))
            }
            return transient(refusal, &loop)
        case 500...599:
            return transient(refusal, &loop)
        case 400 where refusal.code == IngestErrorCode.incompleteBody:
            // The body arrived cut short (a proxy, a broken connection): the same request may well succeed.
            return transient(refusal, &loop)
        case 401, 403:
            metrics.refused.increment()
            return .stop(
                hold(
                    refusal, reason: "the ingest refuses this device's key or device id: re-enroll this device (farmgate enroll), "
                        + "or check upload.key_file and device.id in the agent configuration", &loop))
        case 415 where refusal.code == IngestErrorCode.unsupportedFormatVersion && format == .binary:
            metrics.refused.increment()
            fallBackToJSON(refusal, &loop)
            return nil
        case 415:
            metrics.refused.increment()
            return .stop(
                hold(
                    refusal, reason: "the ingest does not accept how batches are sent (\(format.mediaType)): "
                        + "check upload.format in the agent configuration, and any proxy in front of the ingest", &loop))
        case 413:
            logger.notice(
                "The ingest refused a batch as too large; halving it",
                metadata: ["http.status": "\(status)", "batch.readings": "\(group.count)", "reason": "\(refusal.reason)"])
            noteRefusal(result, status: status)
            return .halve(refusal)
        case 400, 422:
            logger.notice(
                "The ingest refused a batch; sending its halves to find out whether a reading is the cause",
                metadata: ["http.status": "\(status)", "batch.readings": "\(group.count)", "reason": "\(refusal.reason)"])
            noteRefusal(result, status: status)
            return .refused(refusal)
        case 400...499:
            metrics.refused.increment()
            return .stop(
                hold(refusal, reason: "the ingest refuses the request itself: check upload.endpoint in the agent configuration", &loop))
        default:
            return transient(refusal, &loop)
        }
    }

    /// A refusal that bisection or halving follows up: recorded, not yet a failure.
    private func noteRefusal(_ result: String, status: Int) {
        state.withLock {
            $0.lastResult = result
            $0.lastHTTPStatus = status
        }
        metrics.refused.increment()
    }

    private func transient(_ refusal: Refusal, _ loop: inout LoopState) -> Attempt {
        logger.warning("Upload failed", metadata: ["http.status": "\(refusal.status)", "reason": "\(refusal.reason)"])
        return .stop(failed(result: "\(refusal.status): \(refusal.reason)", status: refusal.status, delay: loop.backoff.nextDelay(), &loop))
    }

    /// The ingest does not read the binary format version this build writes: every ingest reads JSON.
    private func fallBackToJSON(_ refusal: Refusal, _ loop: inout LoopState) {
        loop.format = .json
        let versions = refusal.acceptedVersions.map { $0.map(String.init).joined(separator: ", ") } ?? "not said"
        let note =
            "the ingest does not read binary batch format version \(BatchCodec.formatVersion) (it reads: \(versions)); "
            + "sending JSON until the agent restarts"
        logger.warning(
            "Falling back to JSON batches: the ingest does not read this agent's binary format version",
            metadata: [
                "upload.format_version": "\(BatchCodec.formatVersion)", "ingest.accepted_versions": "\(versions)",
                "reason": "\(refusal.reason)",
            ])
        state.withLock {
            $0.format = UploadConfiguration.Format.json.rawValue
            $0.formatFallback = note
            $0.lastResult = "\(refusal.status): \(refusal.reason)"
            $0.lastHTTPStatus = refusal.status
        }
    }

    /// Holds the queue after `refusal`: nothing is quarantined; shown in the status and the log; the next attempt waits a
    /// backoff. Returns the wait.
    private func hold(_ refusal: Refusal, reason: String, _ loop: inout LoopState) -> Duration {
        let now = Timestamp.now()
        let delay = loop.backoff.nextDelay()
        let (began, refusals) = state.withLock { status -> (Bool, Int) in
            if var held = status.held, held.httpStatus == refusal.status, held.code == refusal.code {
                held.refusals += 1
                held.message = refusal.message
                held.reason = reason
                status.held = held
                return (false, held.refusals)
            }
            status.held = UploadHold(httpStatus: refusal.status, code: refusal.code, message: refusal.message, reason: reason, since: now)
            return (true, 1)
        }
        metrics.held.record(1)
        let metadata: Logger.Metadata = [
            "http.status": "\(refusal.status)", "error.code": "\(refusal.code)", "error.message": "\(refusal.message)",
            "hold.reason": "\(reason)", "hold.refusals": "\(refusals)", "retry_in": "\(delay)",
        ]
        if began {
            logger.error("Upload held: the ingest refuses whole batches; nothing is quarantined, the queue waits and is retried", metadata: metadata)
        } else {
            logger.notice("Upload still held", metadata: metadata)
        }
        return failed(result: "\(refusal.status): \(refusal.reason) (held)", status: refusal.status, delay: delay, &loop)
    }

    // MARK: - The receipt

    private func acknowledge(_ group: ArraySlice<Reading>, response: HTTPResponse, _ loop: inout LoopState) async -> Attempt {
        let status = response.status
        guard let receipt = try? JSONDecoder().decode(IngestReceipt.self, from: Data(response.body)) else {
            // Re-sending is safe (the ingest is idempotent); a receipt we cannot read acknowledges nothing.
            logger.warning("The ingest answered without a readable receipt", metadata: ["http.status": "\(status)"])
            return .stop(failed(result: "\(status): the answer is not a receipt", status: status, delay: loop.backoff.nextDelay(), &loop))
        }
        var refusedBy: [UInt64: RejectionGroup] = [:]
        for reading in group {
            if let rejected = receipt.rejection(of: reading.sequence) { refusedBy[reading.sequence] = rejected }
        }
        let rejectedTotal = Self.rejectedTotal(receipt, batch: group.count)
        guard let refused = rejectedTotal,
            receipt.accepted >= 0, receipt.duplicates >= 0, receipt.accepted <= group.count, receipt.duplicates <= group.count,
            receipt.accepted + receipt.duplicates + refused == group.count, refusedBy.count == refused
        else {
            // Not an acknowledgement: deleting on its word could lose readings it never stored. Nothing is deleted or
            // quarantined; the batch goes again (the ingest is idempotent).
            logger.warning(
                "The ingest's receipt does not add up to the batch: not an acknowledgement; nothing is deleted, the batch is sent again",
                metadata: [
                    "batch.readings": "\(group.count)", "receipt.accepted": "\(receipt.accepted)",
                    "receipt.duplicates": "\(receipt.duplicates)", "receipt.rejected": "\(receipt.rejected.map(\.count))",
                    "receipt.rejected_named": "\(refusedBy.count)",
                ])
            let result =
                "\(status): the receipt does not add up to the batch of \(group.count) (\(receipt.accepted) accepted, "
                + "\(receipt.duplicates) duplicates, \(rejectedTotal.map(String.init) ?? "?") rejected, \(refusedBy.count) named); not an acknowledgement"
            return .stop(failed(result: result, status: status, delay: loop.backoff.nextDelay(), &loop))
        }
        var conflicts: [UInt64] = []
        var reasons: [UInt64: String] = [:]
        for (sequence, rejection) in refusedBy {
            if rejection.code == RejectionCode.sequenceConflict {
                conflicts.append(sequence)
            } else {
                reasons[sequence] = "\(rejection.code): \(rejection.message)"
            }
        }
        if !reasons.isEmpty {
            logger.warning("The ingest rejected readings; moving them to quarantine", metadata: ["readings": "\(reasons.count)"])
            guard await quarantine(reasons) else { return .stop(bufferRetryDelay) }
        }
        do {
            try await source.acknowledge(group.map(\.sequence).filter { refusedBy[$0] == nil })
        } catch {
            logger.error("Cannot delete acknowledged readings from the buffer", metadata: ["error": "\(error)"])
            return .stop(bufferRetryDelay)
        }
        loop.backoff.reset()
        metrics.delivered.increment()
        metrics.accepted.increment(by: Int64(receipt.accepted))
        metrics.duplicates.increment(by: Int64(receipt.duplicates))
        metrics.rejected.increment(by: Int64(refused))
        let result = "\(status): \(receipt.accepted) accepted, \(receipt.duplicates) duplicates, \(refused) rejected"
        logger.debug(
            "Batch delivered",
            metadata: [
                "batch.readings": "\(group.count)", "batch.first": "\(group.first?.sequence ?? 0)", "batch.last": "\(group.last?.sequence ?? 0)",
                "receipt.accepted": "\(receipt.accepted)", "receipt.duplicates": "\(receipt.duplicates)", "receipt.rejected": "\(refused)",
            ])
        let cleared = state.withLock { state -> UploadHold? in
            let held = state.held
            state.held = nil
            state.lastSuccessAt = Timestamp.now()
            state.lastResult = result
            state.lastHTTPStatus = status
            state.consecutiveFailures = 0
            state.nextAttemptAt = nil
            state.currentBackoffSeconds = 0
            state.uploadedTotal += Int64(receipt.accepted)
            state.duplicatesTotal += Int64(receipt.duplicates)
            state.rejectedTotal += Int64(refused)
            return held
        }
        if let cleared {
            metrics.held.record(0)
            logger.notice(
                "Upload hold cleared: the ingest acknowledged a batch",
                metadata: ["error.code": "\(cleared.code)", "hold.since": "\(cleared.since)", "hold.refusals": "\(cleared.refusals)"])
        }
        if !conflicts.isEmpty, let wait = await repairConflicts(conflicts.sorted(), &loop) { return .stop(wait) }
        return .delivered
    }

    /// The sum of the receipt's rejection counts, or nil when one is negative or larger than the batch (not a receipt of it).
    private static func rejectedTotal(_ receipt: IngestReceipt, batch: Int) -> Int? {
        var total = 0
        for group in receipt.rejected {
            guard group.count >= 0, group.count <= batch else { return nil }
            total += group.count
            guard total <= batch else { return nil }
        }
        return total
    }

    // MARK: - Sequence numbers the ingest already holds

    /// What the ingest said about the sequences it holds for this device.
    private enum IngestHighest {
        /// Its highest stored sequence (nil: it holds nothing of this device).
        case known(UInt64?)
        /// It does not answer `GET /v1/device` (an ingest older than the endpoint).
        case unsupported
        /// No usable answer now; asked again later.
        case unavailable
    }

    /// Asks `GET /v1/device` and raises the buffer's counter above the ingest's highest sequence when it is below (the
    /// buffer lost its history). Logs loudly when it jumps.
    private func learnDeviceState(_ loop: inout LoopState) async -> IngestHighest {
        let response: HTTPResponse
        do {
            response = try await client.get(deviceStateURL, headers: [authorization, HTTPHeader("Accept", "application/json")])
        } catch {
            if error.kind != .cancelled {
                logger.notice(
                    "Cannot ask the ingest which sequence numbers it holds; asking again later",
                    metadata: ["error": "\(error)", "upload.url": "\(deviceStateURL)"])
            }
            loop.deviceCheck.postpone()
            return .unavailable
        }
        switch response.status {
        case 200:
            guard let answer = try? JSONDecoder().decode(DeviceState.self, from: Data(response.body)) else {
                logger.warning("The ingest's answer to GET \(IngestProtocol.deviceStatePath) is not a device state; asking again later")
                loop.deviceCheck.postpone()
                return .unavailable
            }
            guard answer.device == device.rawValue else {
                logger.error(
                    "The ingest says this device key belongs to another device: check device.id and upload.key_file in the agent configuration",
                    metadata: ["device": "\(device)", "ingest.device": "\(answer.device)"])
                loop.deviceCheck.postpone()
                return .unavailable
            }
            if let highest = answer.highestSequence {
                do {
                    if let previous = try await source.advanceSequence(past: highest) {
                        logger.error(
                            "The ingest holds sequence numbers above this buffer's last one: the buffer lost its history (replaced, re-imaged or deleted). New readings are numbered above the ingest's highest; buffered readings it refuses as sequence_conflict are renumbered and sent again",
                            metadata: [
                                "buffer.last_sequence": "\(previous)", "ingest.highest_sequence": "\(highest)",
                                "buffer.next_sequence": "\(highest + 1)",
                            ])
                    }
                } catch {
                    logger.error(
                        "Cannot raise the buffer's sequence counter above the ingest's highest sequence; asking again later",
                        metadata: ["error": "\(error)", "ingest.highest_sequence": "\(highest)"])
                    loop.deviceCheck.postpone()
                    return .unavailable
                }
            }
            loop.deviceCheck.answered()
            state.withLock { $0.ingestHighestSequence = answer.highestSequence }
            logger.info(
                "The ingest reported the highest sequence it holds for this device",
                metadata: ["ingest.highest_sequence": "\(answer.highestSequence.map(String.init) ?? "none")"])
            return .known(answer.highestSequence)
        case 404, 405, 501:
            logger.notice(
                "The ingest does not report the sequence numbers it holds (an older ingest); sequence numbers are not checked against it",
                metadata: ["http.status": "\(response.status)", "upload.url": "\(deviceStateURL)"])
            loop.deviceCheck.answered()
            return .unsupported
        default:
            logger.notice(
                "The ingest did not say which sequence numbers it holds; asking again later",
                metadata: ["http.status": "\(response.status)", "reason": "\(Refusal(response).reason)"])
            loop.deviceCheck.postpone()
            return .unavailable
        }
    }

    /// Renumbers readings refused `sequence_conflict` above max(the ingest's highest, the buffer's last), so that they are
    /// sent again under numbers nobody used. Returns a wait when that cannot happen now (the readings stay as they are and
    /// meet the same conflict at the next attempt), nil when they were renumbered.
    private func repairConflicts(_ conflicts: [UInt64], _ loop: inout LoopState) async -> Duration? {
        logger.error(
            "The ingest holds other readings under sequence numbers of this batch (sequence_conflict): this site's buffer lost its history. Asking the ingest for its highest sequence and renumbering these readings",
            metadata: ["readings": "\(conflicts.count)", "sequences": "\(Self.describe(conflicts))"])
        let floor: UInt64
        switch await learnDeviceState(&loop) {
        case .known(let highest):
            floor = highest ?? 0
        case .unsupported:
            floor = 0
        case .unavailable:
            return failed(
                result: "sequence_conflict on \(conflicts.count) readings; cannot ask the ingest for its highest sequence yet",
                status: nil, delay: loop.backoff.nextDelay(), &loop)
        }
        let moved: [SequenceRenumbering]
        do {
            moved = try await source.renumber(conflicts, above: floor)
        } catch {
            logger.error("Cannot renumber readings in the buffer", metadata: ["error": "\(error)"])
            return bufferRetryDelay
        }
        guard !moved.isEmpty else { return nil }
        let again = conflicts.contains { loop.renumbered.contains($0) }
        if loop.renumbered.count > 1_000_000 { loop.renumbered = [] }
        loop.renumbered.formUnion(moved.map(\.new))
        state.withLock { $0.renumberedTotal += Int64(moved.count) }
        metrics.renumbered.increment(by: Int64(moved.count))
        logger.error(
            "Renumbered readings the ingest refused as sequence_conflict; they are sent again under their new numbers",
            metadata: [
                "readings": "\(moved.count)", "from": "\(Self.describe(moved.map(\.old)))", "to": "\(Self.describe(moved.map(\.new)))",
                "ingest.highest_sequence": "\(floor)",
            ])
        guard again else { return nil }
        // Numbers this run chose above the ingest's highest were taken again: another sender numbers readings for this
        // device (two sites with one key?). Keep the readings, but do not race it at full speed.
        logger.error(
            "Readings renumbered above the ingest's highest sequence met sequence_conflict again: is another site using this device's key?",
            metadata: ["readings": "\(moved.count)"])
        return failed(
            result: "sequence_conflict again on renumbered readings: is another site using this device's key?", status: nil,
            delay: loop.backoff.nextDelay(), &loop)
    }

    /// Ascending sequences as runs: `1-40, 52, 60-61`, at most 20 runs.
    static func describe(_ sequences: [UInt64]) -> String {
        var runs: [(UInt64, UInt64)] = []
        for sequence in sequences.sorted() {
            if let last = runs.last, last.1 != UInt64.max, last.1 + 1 == sequence {
                runs[runs.count - 1].1 = sequence
            } else if runs.last?.1 != sequence {
                runs.append((sequence, sequence))
            }
        }
        var text = runs.prefix(20).map { $0.0 == $0.1 ? "\($0.0)" : "\($0.0)-\($0.1)" }.joined(separator: ", ")
        if runs.count > 20 { text += ", ... (\(runs.count) runs)" }
        return text
    }

    // MARK: - Failures

    private func failed(result: String, status: Int?, delay: Duration, _ loop: inout LoopState) -> Duration {
        let seconds = Backoff.seconds(delay)
        let next = Timestamp(microseconds: Timestamp.now().microseconds + Int64(seconds * 1_000_000))
        let failures = loop.backoff.failures
        metrics.failed.increment()
        state.withLock {
            $0.lastResult = result
            $0.lastHTTPStatus = status
            $0.consecutiveFailures = failures
            $0.nextAttemptAt = next
            $0.currentBackoffSeconds = seconds
        }
        return delay
    }
}

/// The uploader's metrics, created once with bounded labels.
private struct UploadMetrics: Sendable {
    let delivered = Counter(label: "farmgate_upload_requests_total", dimensions: [("result", "delivered")])
    let refused = Counter(label: "farmgate_upload_requests_total", dimensions: [("result", "refused")])
    let failed = Counter(label: "farmgate_upload_requests_total", dimensions: [("result", "failed")])
    let accepted = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "accepted")])
    let duplicates = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "duplicate")])
    let rejected = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "rejected")])
    let quarantined = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "quarantined")])
    let renumbered = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "renumbered")])
    let held = Gauge(label: "farmgate_upload_held")
}
