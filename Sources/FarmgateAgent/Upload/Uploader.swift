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
/// **Outcomes.**
/// - 2xx with an ``IngestReceipt``: the readings the receipt rejects go to quarantine with `code: message`, all others
///   (accepted or duplicate) are acknowledged; the backoff resets.
/// - 400, 413, 422 (a poison batch): a batch of several readings is halved and each half sent again, isolating the readings the
///   ingest refuses; a single reading that is still refused goes to quarantine with the error body's `code: message`.
///   The queue moves on; nothing is retried forever.
/// - 401, 403: the device key is refused. An error is logged (re-enroll or check the key); the next attempt waits
///   ``UploadConfiguration/backoffMax``. Nothing is quarantined: the readings are fine.
/// - 415: the ingest does not take this ``UploadConfiguration/format``: a configuration problem, handled like 401.
/// - Graceful shutdown: the request in flight finishes; then, unless the ingest is failing, the buffer is committed and
///   what is pending is sent for at most ``UploadConfiguration/shutdownFlushTimeout``.
/// - 429, 503 with `Retry-After`: the next attempt waits exactly that long (even beyond ``UploadConfiguration/backoffMax``),
///   capped only at ``UploadConfiguration/retryAfterMax``.
/// - Anything else (other statuses, connection refused, timeouts, TLS failures): exponential backoff with full jitter
///   (see ``Backoff``), capped at ``UploadConfiguration/backoffMax``.
///
/// A reading that cannot be encoded at all goes to quarantine with `encoding_failed: ...`.
///
/// **Shutdown.** On graceful shutdown a request in flight is finished (bounded by ``UploadConfiguration/requestTimeout``) and
/// its outcome recorded; then ``run()`` returns. Cancelling the task abandons the request. Unacknowledged readings stay in the buffer.
///
/// **Metrics** (bounded labels): `farmgate_upload_requests_total{result="delivered"|"refused"|"failed"}` and
/// `farmgate_upload_readings_total{outcome="accepted"|"duplicate"|"rejected"|"quarantined"}`.
public final class Uploader: Service {
    private let device: DeviceID
    private let source: any PendingReadings
    private let configuration: UploadConfiguration
    private let logger: Logger
    private let client: HTTPClient
    /// The request target and headers, the same for every request.
    private let batchesURL: String
    private let headers: [HTTPHeader]
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
        self.headers = [
            HTTPHeader("Authorization", "Bearer \(configuration.deviceKey)"),
            HTTPHeader("Content-Type", configuration.contentType),
            HTTPHeader("Accept", "application/json"),
        ]
        self.state = Mutex(UploadStatus(endpoint: batchesURL))
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
        var loop = LoopState(backoff: Backoff(initial: configuration.backoffInitial, maximum: configuration.backoffMax))
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
        /// The end of the backlog the next batch comes from while the backlog holds more than one batch.
        var nextEnd: BacklogEnd = .newest
        /// When readings were first seen pending since the last delivery (monotonic, immune to wall-clock jumps).
        var pendingSince: ContinuousClock.Instant?
        /// Set during the final flush on graceful shutdown: new requests may start although the task is shutting down.
        var draining = false
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

    /// Delivers `readings`, halving batches that are too large, cannot be encoded or are refused as poison.
    /// Returns the wait before the next step: zero after progress, the backoff after a failure.
    private func deliver(_ readings: [Reading], _ loop: inout LoopState) async -> Duration {
        var work: [ArraySlice<Reading>] = [readings[...]]
        while let group = work.popLast() {
            // Graceful shutdown: the request in flight has finished; start no new one.
            if Self.stopping && !loop.draining { return .zero }
            let body: [UInt8]
            switch await encode(group) {
            case .encoded(let bytes) where bytes.count > configuration.batchMaxBytes && group.count > 1:
                logger.debug("Batch too large, halving", metadata: ["batch.bytes": "\(bytes.count)", "batch.readings": "\(group.count)"])
                work.append(contentsOf: Self.halves(group))
                continue
            case .encoded(let bytes):
                body = bytes
            case .unencodable(let reason):
                if group.count > 1 {
                    work.append(contentsOf: Self.halves(group))
                    continue
                }
                let reading = group[group.startIndex]
                logger.error(
                    "A reading cannot be encoded; moving it to quarantine",
                    metadata: ["reading.sequence": "\(reading.sequence)", "reading.sensor": "\(reading.sensor)", "error": "\(reason)"])
                guard await quarantine([reading.sequence: "encoding_failed: \(reason)"]) else { return bufferRetryDelay }
                continue
            case .bufferFailed:
                return bufferRetryDelay
            }
            switch await send(group, body: body, &loop) {
            case .delivered:
                continue
            case .poison(let reason):
                if group.count > 1 {
                    work.append(contentsOf: Self.halves(group))
                    continue
                }
                let reading = group[group.startIndex]
                logger.warning(
                    "The ingest refused a reading for good; moving it to quarantine",
                    metadata: ["reading.sequence": "\(reading.sequence)", "reading.sensor": "\(reading.sensor)", "reason": "\(reason)"])
                guard await quarantine([reading.sequence: reason]) else { return bufferRetryDelay }
            case .retry(let delay):
                return delay
            }
        }
        loop.pendingSince = nil
        return .zero
    }

    /// The two halves of `group`, the first half last so that it is popped first.
    private static func halves(_ group: ArraySlice<Reading>) -> [ArraySlice<Reading>] {
        let middle = group.startIndex + group.count / 2
        return [group[middle...], group[..<middle]]
    }

    private enum Encoding {
        case encoded([UInt8])
        case unencodable(String)
        case bufferFailed
    }

    private func encode(_ group: ArraySlice<Reading>) async -> Encoding {
        let descriptors: [SensorDescriptor]
        do {
            descriptors = try await source.descriptors(for: Set(group.map(\.sensor)))
        } catch {
            logger.error("Cannot read sensor descriptors from the buffer", metadata: ["error": "\(error)"])
            return .bufferFailed
        }
        let batch = Batch(device: device, sensors: descriptors, readings: Array(group))
        switch configuration.format {
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

    private enum SendOutcome {
        case delivered
        case poison(String)
        case retry(Duration)
    }

    private func send(_ group: ArraySlice<Reading>, body: [UInt8], _ loop: inout LoopState) async -> SendOutcome {
        state.withLock {
            $0.lastAttemptAt = Timestamp.now()
            $0.requestsTotal += 1
        }
        let response: HTTPResponse
        do {
            response = try await client.post(batchesURL, headers: headers, body: body)
        } catch {
            if error.kind == .cancelled { return .retry(.zero) }
            logger.warning("Upload failed", metadata: ["error": "\(error)", "upload.url": "\(batchesURL)"])
            return failed(result: error.description, status: nil, delay: loop.backoff.nextDelay(), &loop)
        }

        let status = response.status
        switch status {
        case 200...299:
            return await acknowledge(group, response: response, &loop)

        case 400, 413, 422:
            let reason = Self.errorReason(response)
            logger.notice(
                "The ingest refused a batch",
                metadata: ["http.status": "\(status)", "batch.readings": "\(group.count)", "reason": "\(reason)"])
            state.withLock {
                $0.lastResult = "\(status): \(reason)"
                $0.lastHTTPStatus = status
            }
            metrics.refused.increment()
            return .poison(reason)

        case 401, 403:
            let reason = Self.errorReason(response)
            logger.error(
                "The ingest refused the device key: re-enroll this device (farmgate enroll) or check upload.key in the agent configuration",
                metadata: ["http.status": "\(status)", "reason": "\(reason)"])
            loop.backoff.recordFailure()
            return failed(result: "\(status): \(reason)", status: status, delay: configuration.backoffMax, &loop)

        case 415:
            let reason = Self.errorReason(response)
            logger.error(
                "The ingest does not accept this batch format: check upload.format in the agent configuration",
                metadata: ["http.status": "\(status)", "upload.format": "\(configuration.format.rawValue)", "reason": "\(reason)"])
            loop.backoff.recordFailure()
            return failed(result: "\(status): \(reason)", status: status, delay: configuration.backoffMax, &loop)

        case 429, 503:
            let reason = Self.errorReason(response)
            if let header = response.header("Retry-After"), let asked = RetryAfter.delay(header) {
                let delay = min(asked, configuration.retryAfterMax)
                logger.notice(
                    "The ingest asked to retry later",
                    metadata: ["http.status": "\(status)", "retry_after": "\(header)", "delay": "\(delay)"])
                loop.backoff.recordFailure()
                return failed(result: "\(status): \(reason)", status: status, delay: delay, &loop)
            }
            logger.warning("Upload failed", metadata: ["http.status": "\(status)", "reason": "\(reason)"])
            return failed(result: "\(status): \(reason)", status: status, delay: loop.backoff.nextDelay(), &loop)

        default:
            let reason = Self.errorReason(response)
            logger.warning("Upload failed", metadata: ["http.status": "\(status)", "reason": "\(reason)"])
            return failed(result: "\(status): \(reason)", status: status, delay: loop.backoff.nextDelay(), &loop)
        }
    }

    private func acknowledge(_ group: ArraySlice<Reading>, response: HTTPResponse, _ loop: inout LoopState) async -> SendOutcome {
        let status = response.status
        guard let receipt = try? JSONDecoder().decode(IngestReceipt.self, from: Data(response.body)) else {
            // Re-sending is safe (the ingest is idempotent); a receipt we cannot read acknowledges nothing.
            logger.warning("The ingest answered without a readable receipt", metadata: ["http.status": "\(status)"])
            return failed(result: "\(status): the answer is not a receipt", status: status, delay: loop.backoff.nextDelay(), &loop)
        }
        var reasons: [UInt64: String] = [:]
        for reading in group {
            if let rejected = receipt.rejection(of: reading.sequence) { reasons[reading.sequence] = "\(rejected.code): \(rejected.message)" }
        }
        if receipt.accepted + receipt.duplicates + receipt.rejectedCount != group.count {
            logger.warning(
                "The receipt's counts do not add up to the batch",
                metadata: [
                    "batch.readings": "\(group.count)", "receipt.accepted": "\(receipt.accepted)",
                    "receipt.duplicates": "\(receipt.duplicates)", "receipt.rejected": "\(receipt.rejectedCount)",
                ])
        }
        if !reasons.isEmpty {
            logger.warning("The ingest rejected readings; moving them to quarantine", metadata: ["readings": "\(reasons.count)"])
            guard await quarantine(reasons) else { return .retry(bufferRetryDelay) }
        }
        do {
            try await source.acknowledge(group.map(\.sequence).filter { reasons[$0] == nil })
        } catch {
            logger.error("Cannot delete acknowledged readings from the buffer", metadata: ["error": "\(error)"])
            return .retry(bufferRetryDelay)
        }
        loop.backoff.reset()
        metrics.delivered.increment()
        metrics.accepted.increment(by: Int64(receipt.accepted))
        metrics.duplicates.increment(by: Int64(receipt.duplicates))
        metrics.rejected.increment(by: Int64(receipt.rejectedCount))
        let result = "\(status): \(receipt.accepted) accepted, \(receipt.duplicates) duplicates, \(receipt.rejectedCount) rejected"
        logger.debug(
            "Batch delivered",
            metadata: [
                "batch.readings": "\(group.count)", "batch.first": "\(group.first?.sequence ?? 0)", "batch.last": "\(group.last?.sequence ?? 0)",
                "receipt.accepted": "\(receipt.accepted)", "receipt.duplicates": "\(receipt.duplicates)",
                "receipt.rejected": "\(receipt.rejectedCount)",
            ])
        state.withLock {
            $0.lastSuccessAt = Timestamp.now()
            $0.lastResult = result
            $0.lastHTTPStatus = status
            $0.consecutiveFailures = 0
            $0.nextAttemptAt = nil
            $0.currentBackoffSeconds = 0
            $0.uploadedTotal += Int64(receipt.accepted)
            $0.duplicatesTotal += Int64(receipt.duplicates)
            $0.rejectedTotal += Int64(receipt.rejectedCount)
        }
        return .delivered
    }

    private func failed(result: String, status: Int?, delay: Duration, _ loop: inout LoopState) -> SendOutcome {
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
        return .retry(delay)
    }

    /// `code: message` from an ``APIErrorBody``, else `http_<status>` and the start of the body.
    static func errorReason(_ response: HTTPResponse) -> String {
        if let body = try? JSONDecoder().decode(APIErrorBody.self, from: Data(response.body)) {
            return "\(body.error.code): \(body.error.message)"
        }
        let text = String(decoding: response.body.prefix(200), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines)
            .replacingOccurrences(of: "\n", with: " ")
        return text.isEmpty ? "http_\(response.status)" : "http_\(response.status): \(text)"
    }
}

/// The uploader's counters, created once with bounded labels.
private struct UploadMetrics: Sendable {
    let delivered = Counter(label: "farmgate_upload_requests_total", dimensions: [("result", "delivered")])
    let refused = Counter(label: "farmgate_upload_requests_total", dimensions: [("result", "refused")])
    let failed = Counter(label: "farmgate_upload_requests_total", dimensions: [("result", "failed")])
    let accepted = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "accepted")])
    let duplicates = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "duplicate")])
    let rejected = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "rejected")])
    let quarantined = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "quarantined")])
}
