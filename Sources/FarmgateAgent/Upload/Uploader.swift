import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
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
/// backlog drains in the background, in batches of up to ``UploadConfiguration/backlogBatchMaxReadings`` (the final flush
/// on shutdown uses that size too). With one batch or less pending, the oldest readings go first.
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
///   systematic: the queue is held (below). When part of it was accepted, a reading taken earlier in the delivery is sent
///   again first: refused as well, the queue is held too. Otherwise bisection continues into the refused halves; a single reading still
///   refused is quarantined with the error body's `code: message` if some other reading of its batch was accepted, and
///   holds the queue if none was (it is tried again later, when more readings give bisection something to compare).
/// - 413 (`payload_too_large`, `decompressed_too_large`, `too_many_readings`): the batch is halved and both halves sent,
///   whatever happens to the other; a single reading still refused 413 holds the queue.
/// - 415 `unsupported_format_version` for a binary batch: the uploader sends JSON (every ingest reads it), says so in the
///   log and in ``UploadStatus/formatFallback``, sends the same batch again at once and asks `GET /v1/device` what the
///   ingest reads; it goes back to binary when a routine question (at least ``UploadConfiguration/deviceCheckInterval``
///   after the fallback) lists its version again. This build
///   writes one binary version (``BatchCodec/formatVersion``), so `accepted_versions` never offers another it could write.
/// - 409 `unknown_sensor_table` / `stale_context` to a stateful frame (format version 4, sent when the ingest lists 4 and
///   `[upload] stateful` is on; see ``WireSession``): the same readings go again at once, the table declared or against
///   the context the answer carries; after ``maxStateRefusals`` in a row, or a 415 or 400/422 to a stateful frame, the
///   same readings go again at once as a self-contained frame and stateful frames pause for a while.
/// - Hold at once, no split: a 3xx (the reason names the `Location` to set as `upload.endpoint`; redirects are never
///   followed), 401, 403 (`unauthorized`, `revoked`, `device_mismatch`), 415 `unsupported_media_type`,
///   `unsupported_encoding` (or a JSON batch refused `unsupported_format_version`), any other 4xx.
/// - Transient, retried after a backoff, no split: 400 `incomplete_body`, 5xx, no answer (connection refused, timeouts,
///   TLS failures), an unreadable receipt.
/// - 429, 503 with `Retry-After`: the next attempt waits that long (even beyond ``UploadConfiguration/backoffMax``),
///   capped only at ``UploadConfiguration/retryAfterMax``, but never less than the backoff would and never less than a
///   second (`Retry-After: 0` or a date already past must not resend at once, forever). An HTTP-date is measured against
///   the answer's `Date` header when it has one (this box's clock may be years off).
///
/// Held means: nothing is quarantined and nothing deleted; ``UploadStatus/held`` shows the HTTP status, code, message and
/// since when, an error is logged when the hold begins (a notice at each further refusal), and the next attempt waits an
/// exponential backoff with full jitter (see ``Backoff``), capped at ``UploadConfiguration/backoffMax``, like every other
/// failure. The hold clears at the next acknowledged batch.
///
/// A reading that cannot be encoded at all goes to quarantine with `encoding_failed: ...`.
///
/// A buffer that cannot record an answer (delete what was acknowledged, quarantine, renumber: a read-only remount, a
/// full disk, an I/O error) is a failure like a 5xx: the batch stays pending and goes again after the backoff (at least
/// a second), and the status says so; it never resends the same batch every second (see ``bufferFailed(_:_:status:_:)``).
///
/// **Calibration events** (``ReadingBuffer/recordCalibration(_:)``) ride with the readings: when `GET /v1/device` listed 3 in
/// `accepted_versions` (the ingest keeps events), the first request of a delivery carries up to ``maxEventsPerBatch`` of the
/// oldest pending events: in a version 3 frame when batches go as binary, in the `calibrations` member when they go as
/// JSON (configured, or after a fallback); every other batch stays version 2 (or JSON without the member). They are deleted only when the receipt's
/// `calibrations.accepted + duplicates` equals the number sent; a receipt without `calibrations` leaves them for a later
/// batch (the ingest is idempotent on event ids), and one whose counts cannot be of these events (negative, more than
/// were sent, or not adding up) acknowledges nothing, readings included: the batch goes again after a backoff. Events never cost readings anything: a 415 `unsupported_format_version` to a version 3 frame
/// stops events until `GET /v1/device` lists 3 again, a 400/422 to one puts them under suspicion, and in both cases the
/// same readings go again at once without them. When those readings are then accepted, the events were the cause: a
/// single event is quarantined (kept in the buffer, never sent again, shown by `farmgate status` and `farmgate quarantine
/// list`), several are sent one per batch from then on so that each bad one is isolated and quarantined the same way and
/// the good ones delivered. When the readings are refused too, the events are not blamed and pause for a while. A batch
/// halved for size (or 413) carries its events on the first half sent only.
///
/// **Shutdown.** On graceful shutdown a request in flight is finished and its outcome recorded; then, unless the ingest is
/// failing or the shutdown is a reload (the next uploader carries on), the buffer is committed and what is pending is sent
/// for at most ``UploadConfiguration/shutdownFlushTimeout``, and ``run()`` returns. The two together get at most
/// ``stopAllowance`` from the shutdown's start: a request still in flight then is abandoned, so that a stop never waits
/// for a long `request_timeout` (systemd's `TimeoutStopSec=` would kill the agent). Cancelling the task abandons the
/// request.
/// Unacknowledged readings stay in the buffer.
///
/// **Metrics** (bounded labels): `farmgate_upload_requests_total{result="delivered"|"refused"|"failed"}`,
/// `farmgate_upload_readings_total{outcome="accepted"|"duplicate"|"rejected"|"quarantined"|"renumbered"}` and
/// `farmgate_upload_held` (1 while the queue is held, else 0).
public final class Uploader: Service {
    let device: DeviceID
    let source: any PendingReadings
    let configuration: UploadConfiguration
    let logger: Logger
    let client: HTTPClient
    /// The request targets, the same for every request.
    let batchesURL: String
    let deviceStateURL: String
    let authorization: HTTPHeader
    /// The key in ``IngestProtocol/deviceKeyHeader``, which HPACK indexes: sent with batches to an ingest that reads it.
    let deviceKeyHeader: HTTPHeader
    let state: Mutex<UploadStatus>
    /// Whether the graceful shutdown under way is a configuration reload: then the next generation's uploader carries on
    /// at once, and the pending readings are not flushed first (that held sampling back for up to
    /// `shutdown_flush_timeout` at every reload).
    let reloading: @Sendable () -> Bool
    let metrics = UploadMetrics()
    /// Liveness for the systemd watchdog: beaten by the loop and before every request (see ``Heartbeat``).
    public let heartbeat = Heartbeat(component: "uploader")
    /// The longest one step of the loop may go without a beat: a whole request (curl's timeout covers connecting) and the
    /// buffer work around it.
    var heartbeatAllowance: Duration { configuration.requestTimeout + .seconds(10) }

    /// Creates the uploader and its HTTP client (no request is made until ``run()``).
    /// - Parameters:
    ///   - device: This gateway's id; every batch names it.
    ///   - source: The site buffer.
    ///   - configuration: Where and how to upload.
    ///   - logger: Receives what the uploader does; errors name what to fix.
    ///   - previous: the status of the uploader this one replaces (a configuration reload): its totals and last success
    ///     carry on, so that counters never go back while the process runs.
    /// - Throws: ``HTTPClientError`` when the HTTP client cannot be set up (a CA file that cannot be read, ...).
    public init(
        device: DeviceID, source: any PendingReadings, configuration: UploadConfiguration, logger: Logger, carrying previous: UploadStatus? = nil,
        reloading: @escaping @Sendable () -> Bool = { false }
    ) throws(HTTPClientError) {
        self.reloading = reloading
        self.device = device
        self.source = source
        self.configuration = configuration
        self.logger = logger
        self.client = try HTTPClient(configuration: configuration.httpClientConfiguration, logger: logger)
        self.batchesURL = configuration.batchesURL
        self.deviceStateURL = configuration.deviceStateURL
        self.authorization = HTTPHeader("Authorization", "Bearer \(configuration.deviceKey)")
        self.deviceKeyHeader = HTTPHeader(IngestProtocol.deviceKeyHeader, configuration.deviceKey)
        var status = UploadStatus(endpoint: batchesURL, format: configuration.format.rawValue)
        if let previous { status.carryTotals(from: previous) }
        self.state = Mutex(status)
        metrics.held.record(0)
    }

    /// What the uploader has done so far. Cheap and synchronous: safe to call from any thread at any time.
    public func status() -> UploadStatus {
        state.withLock { $0 }
    }

    /// How long the uploader may go on after a graceful shutdown began: the request in flight and the final flush
    /// together (at least 5 s for the request in flight when the flush is off).
    public var stopAllowance: Duration { max(configuration.shutdownFlushTimeout, .seconds(5)) }

    /// Uploads until graceful shutdown or cancellation. Never throws for upload failures: it backs off and tries again.
    /// After a graceful shutdown began, returns within ``stopAllowance`` (and the second curl takes to abandon a request).
    public func run() async throws {
        await withTaskGroup(of: Bool.self) { tasks in
            tasks.addTask {
                await self.uploadUntilStopped()
                return false
            }
            tasks.addTask {
                // Returns at once when cancelled: the uploading task ended first.
                guard (try? await gracefulShutdown()) != nil, (try? await Task.sleep(for: self.stopAllowance)) != nil else { return false }
                return true
            }
            if await tasks.next() == true {
                logger.warning(
                    "Graceful stop: the upload still in flight is abandoned; its readings stay in the buffer and go at the next start",
                    metadata: ["upload.stop_allowance": "\(stopAllowance)"])
            }
            tasks.cancelAll()
        }
    }

    func uploadUntilStopped() async {
        logger.info(
            "Uploader started",
            metadata: ["upload.url": "\(batchesURL)", "upload.format": "\(configuration.format.rawValue)"])
        // After a reload the failures in a row carry on (the first attempt still goes at once: the reload may have fixed
        // the cause); the waits after it grow from where they were.
        var loop = LoopState(
            backoff: Backoff(initial: configuration.backoffInitial, maximum: configuration.backoffMax, failures: status().consecutiveFailures),
            format: configuration.format,
            deviceCheck: DeviceStateCheck(
                backoff: Backoff(initial: configuration.backoffInitial, maximum: configuration.backoffMax),
                interval: configuration.deviceCheckInterval))
        while !Self.stopping {
            heartbeat.beat(within: heartbeatAllowance)
            let wait = await step(&loop)
            if wait > .zero {
                heartbeat.beat(within: wait + heartbeatAllowance)
                await Self.pause(wait)
            }
        }
        _ = await settleAcknowledgement(&loop)
        if !Task.isCancelled, !reloading() { await finalFlush(&loop) }
        let left = (try? await source.statistics().pending) ?? -1
        logger.info("Uploader stopped", metadata: ["upload.pending": "\(left)"])
    }

    // MARK: - The loop

    struct LoopState {
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
        /// Whether the ingest reads format version 3 (calibration events): what `GET /v1/device` last said in
        /// `accepted_versions` (absent: only 2). Cleared by a 415 `unsupported_format_version` to a version 3 frame.
        var acceptsEvents = false
        /// The calibration events the next request of this delivery carries (at most one request carries them).
        var outgoingEvents: [CalibrationEvent] = []
        /// After the ingest refused a frame carrying events as malformed, events wait until then (readings do not).
        var eventsPausedUntil: ContinuousClock.Instant?
        /// After a 415 to a version 3 frame, binary batches carry no events until then.
        var version3PausedUntil: ContinuousClock.Instant?
        /// The events of a frame the ingest refused 400/422 while their readings go again without them: if those readings
        /// are then accepted, the events are the cause (one is quarantined; several are sent one at a time to find out).
        var suspectEvents: (events: [CalibrationEvent], refusal: Refusal)?
        /// How many of the next deliveries carry a single event (after several were refused together).
        var singleEventDeliveries = 0
        /// When the uploader fell back to JSON after a 415 to its binary version (nil while it sends as configured).
        var fellBackAt: ContinuousClock.Instant?
        /// What the ingest holds for stateful frames (format version 4), as far as this run knows.
        var session = WireSession()
        /// Whether the ingest reads format version 4: what `GET /v1/device` last listed in `accepted_versions`.
        var acceptsStateful = false
        /// After a 415 or a 400/422 to a stateful frame, or refusals of its state that do not settle: binary batches go as
        /// version 2/3 frames until then.
        var statefulPausedUntil: ContinuousClock.Instant?
        /// 409 `unknown_sensor_table` / `stale_context` answers in a row (each is followed at once by the same readings).
        var stateRefusals = 0
        /// 400 `incomplete_body` answers in a row to the same readings (by the first sequence and count sent).
        var incompleteBodies: (first: UInt64, count: Int, answers: Int)?
        /// Within one delivery, once such answers made a batch a refusal: the bisection of its halves takes every
        /// further `incomplete_body` as a refusal at once.
        var incompleteBodyIsRefusal = false
        /// After a 401 to a request that carried the key only in `Farmgate-Key` (an instance that does not read it
        /// behind the same address as one that does): the key goes as `Authorization` until then.
        var keyHeaderPausedUntil: ContinuousClock.Instant?
        /// Whether the delivery under way may defer the deletion of what the ingest acknowledges (a backlog of more than
        /// one batch besides it), and the deletion deferred (see ``DeferredAcknowledgement``).
        var pipelining = false
        var deferred: DeferredAcknowledgement?

        /// Whether the next request carries the key in `Farmgate-Key` (which HTTP/2 compresses to a byte) rather than
        /// `Authorization`.
        var sendsKeyHeader: Bool {
            acceptsStateful && (keyHeaderPausedUntil.map { ContinuousClock.now >= $0 } ?? true)
        }
    }

    /// When to ask `GET /v1/device`: at start, after a `sequence_conflict` or a 415 `unsupported_format_version`, and every
    /// ``UploadConfiguration/deviceCheckInterval`` after the last answer (an ingest upgraded meanwhile is noticed without a
    /// restart); again after a backoff while the ingest cannot answer.
    struct DeviceStateCheck {
        var due = true
        var notBefore: ContinuousClock.Instant?
        var backoff: Backoff
        /// The routine question's period.
        var interval: Duration
        /// When the routine question is due (set by each answer).
        var routineAt: ContinuousClock.Instant?

        init(backoff: Backoff, interval: Duration) {
            self.backoff = backoff
            self.interval = interval
        }

        var isDue: Bool {
            let now = ContinuousClock.now
            if due { return notBefore.map { now >= $0 } ?? true }
            return routineAt.map { now >= $0 } ?? false
        }

        mutating func answered() {
            due = false
            notBefore = nil
            routineAt = ContinuousClock.now + interval
            backoff.reset()
        }

        /// Asks at the next step (after a 415: what does the ingest read now?).
        mutating func askSoon() {
            due = true
        }

        /// Asks again after a backoff, or after `atLeast` when longer (the ingest's `Retry-After`).
        mutating func postpone(atLeast: Duration = .zero) {
            due = true
            notBefore = ContinuousClock.now + max(backoff.nextDelay(), .seconds(1), atLeast)
        }
    }

    /// On graceful shutdown: commit what the buffer holds and send every pending reading, oldest first, for at most
    /// ``UploadConfiguration/shutdownFlushTimeout``. Skipped while the ingest is failing (the readings are safe in the
    /// buffer and go out at the next start); stops at the first failure.
    func finalFlush(_ loop: inout LoopState) async {
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
            guard let readings = try? await source.pending(limit: max(1, configuration.backlogBatchMaxReadings), from: .oldest),
                !readings.isEmpty
            else { break }
            if await deliver(readings, &loop) > .zero { break }
        }
    }

    static var stopping: Bool { Task.isCancelled || Task.isShuttingDownGracefully }

    /// Sleeps for `duration`, returning early on graceful shutdown or cancellation.
    static func pause(_ duration: Duration) async {
        guard !stopping else { return }
        _ = try? await cancelWhenGracefulShutdown { try await Task.sleep(for: duration) }
    }

    /// The wait after the buffer failed to read (nothing was sent), and the shortest wait after it failed to settle what
    /// the ingest answered (see ``bufferFailed(_:_:status:_:)``).
    var bufferRetryDelay: Duration { max(configuration.pollInterval, .seconds(1)) }

    /// The buffer could not make a batch's readings final before sending, or settle what the ingest answered (delete
    /// acknowledged readings or events, quarantine, renumber): a read-only remount, a full disk, an I/O error. The batch is still pending and goes again, so this is a
    /// failure like any other: it waits the exponential backoff (at least ``bufferRetryDelay``), counts in the status'
    /// consecutive failures and says what failed, rather than resending the same batch every second on a metered link.
    /// The buffer counts and shows its own error (``BufferStatistics/errors``). Returns the wait.
    func bufferFailed(_ what: String, _ error: any Error, status: Int?, _ loop: inout LoopState) -> Duration {
        let delay = max(loop.backoff.nextDelay(), bufferRetryDelay)
        logger.error(
            "The buffer failed a write the upload needs (operation); the batch stays pending and goes again after a backoff",
            metadata: ["operation": "\(what)", "error": "\(error)", "retry_in": "\(delay)"])
        let result = "\(status.map { "\($0): " } ?? "")the buffer \(what): \(error); the batch goes again after a backoff"
        return failed(result: result, status: status, cause: .buffer, delay: delay, &loop)
    }

    /// Looks at the buffer, sends what is due, and says how long to wait before looking again.
    func step(_ loop: inout LoopState) async -> Duration {
        if loop.deviceCheck.isDue {
            // What the ingest says may renumber readings: the buffer must hold what was acknowledged, no more.
            if let wait = await settleAcknowledgement(&loop) { return wait }
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
        if let deferred = loop.deferred {
            // Still counted as pending until deleted. Unless a backlog of more than one batch is left besides them, delete
            // them now and look again: batching by age and size must see the buffer as it is.
            guard statistics.pending - deferred.sequences.count > configuration.batchMaxReadings else {
                return await settleAcknowledgement(&loop) ?? .zero
            }
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
        var limit = configuration.batchMaxReadings
        if statistics.pending > configuration.batchMaxReadings {
            end = loop.nextEnd
            loop.nextEnd = end == .newest ? .oldest : .newest
            if end == .oldest { limit = configuration.backlogBatchMaxReadings }
        } else {
            end = .oldest
            loop.nextEnd = .newest
        }
        let readings: [Reading]
        do {
            readings = try await source.pending(limit: max(1, limit), from: end, excluding: loop.deferred?.range)
        } catch {
            logger.error("Cannot read pending readings from the buffer", metadata: ["error": "\(error)"])
            return await settleAcknowledgement(&loop) ?? bufferRetryDelay
        }
        guard !readings.isEmpty else { return await settleAcknowledgement(&loop) ?? configuration.pollInterval }
        loop.pipelining = statistics.pending - (loop.deferred?.sequences.count ?? 0) - readings.count > configuration.batchMaxReadings
        defer { loop.pipelining = false }
        return await deliver(readings, &loop)
    }

    /// The most calibration events one batch carries: they are rare and each is small, so a handful keeps a batch's size
    /// close to what its readings make it.
    public static let maxEventsPerBatch = 8

    /// The calibration events to attach to the next batch: the oldest pending ones, when the ingest reads version 3 (it
    /// keeps events, in either form); none while events are paused.
    func eventsToAttach(_ loop: LoopState) async -> [CalibrationEvent] {
        guard loop.acceptsEvents else { return [] }
        if let until = loop.eventsPausedUntil, ContinuousClock.now < until { return [] }
        if loop.format == .binary, let until = loop.version3PausedUntil, ContinuousClock.now < until { return [] }
        do {
            return try await source.pendingCalibrations(limit: loop.singleEventDeliveries > 0 ? 1 : Self.maxEventsPerBatch)
        } catch {
            // Readings go anyway; the events wait in the buffer for the next batch.
            logger.error("Cannot read pending calibration events from the buffer", metadata: ["error": "\(error)"])
            return []
        }
    }

    // MARK: - Delivering a batch: halving and bisection

    /// Where a delivery stands: go on with the next group, or stop and wait this long before the next step.
    enum Flow {
        case proceed
        case stop(Duration)
    }

    /// What one delivery has learnt: whether any part of its batch was accepted. Until then, a refusal both halves of a
    /// split share is systematic (hold), and so is a single reading refused (nothing shows it is the cause). Once part of
    /// the batch was accepted, the refusal may depend on what is sent (two poison readings, one in each half), or the
    /// ingest may have begun to refuse everything since: a reading it took earlier in this delivery (``sample``) is sent
    /// again, a duplicate to an ingest that works. Taken again, bisection goes on into both halves and a single reading
    /// still refused is quarantined; refused too, the refusal is systematic and the queue is held, so that a refusal
    /// that starts in the middle of a bisection never quarantines the readings it had still to send.
    struct Bisection {
        /// One reading of a group the ingest took in this delivery.
        var sample: ArraySlice<Reading>?
        var accepted: Bool { sample != nil }

        mutating func took(_ group: ArraySlice<Reading>) {
            sample = group.suffix(1)
        }
    }

    /// Delivers `readings`, halving batches that are too large or cannot be encoded and bisecting refused ones (see the type's
    /// documentation). Returns the wait before the next step: zero after progress, the backoff after a failure or a hold.
    func deliver(_ readings: [Reading], _ loop: inout LoopState) async -> Duration {
        var bisection = Bisection()
        loop.incompleteBodyIsRefusal = false
        loop.outgoingEvents = await eventsToAttach(loop)
        defer { loop.outgoingEvents = [] }
        switch await deliverGroup(readings[...], &loop, &bisection) {
        case .proceed:
            loop.pendingSince = nil
            return .zero
        case .stop(let wait):
            return wait
        }
    }

    func deliverGroup(_ group: ArraySlice<Reading>, _ loop: inout LoopState, _ bisection: inout Bisection) async -> Flow {
        let outcome = await attempt(group, &loop)
        return await settle(group, outcome, &loop, &bisection)
    }

    /// Acts on the outcome of sending `group`.
    func settle(_ group: ArraySlice<Reading>, _ attempt: Attempt, _ loop: inout LoopState, _ bisection: inout Bisection) async -> Flow {
        switch attempt {
        case .delivered:
            bisection.took(group)
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
    func bisect(
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
            if let wait = await quarantine([reading.sequence: refusal.reason], status: refusal.status, &loop) { return .stop(wait) }
            return .proceed
        }
        let (first, second) = Self.halves(group)
        let firstAttempt = await attempt(first, &loop)
        if case .stop(let wait) = firstAttempt { return .stop(wait) }
        if case .delivered = firstAttempt { bisection.took(first) }
        let secondAttempt = await attempt(second, &loop)
        if case .stop(let wait) = secondAttempt { return .stop(wait) }
        if case .delivered = secondAttempt { bisection.took(second) }
        if case .refused(let one) = firstAttempt, case .refused(let other) = secondAttempt, one.isSame(as: other) {
            guard let sample = bisection.sample else {
                return .stop(
                    hold(
                        one, reason: "both halves of a split batch were refused the same way: the refusal is systematic, not caused by a reading",
                        &loop))
            }
            let probe = await attempt(sample, &loop)
            if case .stop(let wait) = probe { return .stop(wait) }
            guard case .delivered = probe else {
                return .stop(
                    hold(
                        one,
                        reason: "both halves of a split batch were refused the same way, and so was a reading the ingest took earlier in "
                            + "this delivery: the refusal is systematic, not caused by a reading", &loop))
            }
        }
        for (half, outcome) in [(first, firstAttempt), (second, secondAttempt)] {
            if case .stop(let wait) = await settle(half, outcome, &loop, &bisection) { return .stop(wait) }
        }
        return .proceed
    }

    /// The two halves of `group`, the older first.
    static func halves(_ group: ArraySlice<Reading>) -> (ArraySlice<Reading>, ArraySlice<Reading>) {
        let middle = group.startIndex + group.count / 2
        return (group[..<middle], group[middle...])
    }

    enum Encoding {
        /// The body, and what it assumed of the ingest when it is a stateful frame.
        case encoded([UInt8], StatefulFrame?)
        case unencodable(String)
        case bufferFailed
    }

    /// The session to encode the next binary batch with, or nil when it goes as a self-contained version 2/3 frame: the
    /// ingest must read version 4, the configuration allow it, and no refusal have paused it.
    func statefulSession(_ loop: LoopState) -> WireSession? {
        guard configuration.stateful, loop.acceptsStateful, loop.format == .binary else { return nil }
        if let until = loop.statefulPausedUntil, ContinuousClock.now < until { return nil }
        return loop.session
    }

    /// Sends version 2/3 frames for a while (a backoff's maximum, at least a minute) and forgets the session: the next
    /// stateful frame declares its table and predicts from nothing it has not seen acknowledged.
    func pauseStateful(_ loop: inout LoopState, _ refusal: Refusal) {
        loop.statefulPausedUntil = ContinuousClock.now + max(configuration.backoffMax, .seconds(60))
        loop.session.reset()
        loop.stateRefusals = 0
        logger.warning(
            "The ingest refused a stateful batch frame (format version 4); the same readings go again as a self-contained frame, and stateful frames pause for a while",
            metadata: ["http.status": "\(refusal.status)", "reason": "\(refusal.reason)"])
    }

    /// Encodes `group` with `events` (binary: version 3 when there are any, version 4 through `session`; JSON: a
    /// `calibrations` member).
    func encode(
        _ group: ArraySlice<Reading>, events: [CalibrationEvent], format: UploadConfiguration.Format, session: WireSession? = nil
    ) async -> Encoding {
        let descriptors: [SensorDescriptor]
        var configured: [SensorDescriptor] = []
        do {
            descriptors = try await source.descriptors(for: Set(group.map(\.sensor)))
            if session != nil { configured = try await source.allDescriptors() }
        } catch {
            logger.error("Cannot read sensor descriptors from the buffer", metadata: ["error": "\(error)"])
            return .bufferFailed
        }
        let batch = Batch(device: device, sensors: descriptors, readings: Array(group))
        if let session, format == .binary {
            // The table: every configured sensor, and those of the readings sent (a sensor no longer configured may still
            // have readings pending); with the readings' descriptors winning.
            var byID: [SensorID: SensorDescriptor] = [:]
            for descriptor in configured + descriptors { byID[descriptor.id] = descriptor }
            // Past what one table holds (4,096 configured sensors and a renamed one with readings pending), this batch
            // goes as a self-contained frame, which names only its own sensors: never unencodable for the table alone.
            if byID.count > SensorTable.maxSensors {
                do {
                    return .encoded(try BatchCodec.encode(batch, calibrations: events), nil)
                } catch {
                    return .unencodable(error.description)
                }
            }
            do {
                let frame = try session.encode(batch, table: try SensorTable(Array(byID.values)), calibrations: events)
                return .encoded(frame.bytes, frame)
            } catch {
                return .unencodable(error.description)
            }
        }
        switch format {
        case .json:
            do {
                return .encoded(try BatchJSON.encode(batch, calibrations: events), nil)
            } catch {
                return .unencodable(error.description)
            }
        case .binary:
            do {
                return .encoded(try BatchCodec.encode(batch, calibrations: events), nil)
            } catch {
                return .unencodable(error.description)
            }
        }
    }

    /// Moves readings to quarantine. Returns nil, or the wait when the buffer failed (`status`: the answer that refused
    /// them, nil when the agent did).
    func quarantine(_ reasons: [UInt64: String], status: Int?, _ loop: inout LoopState) async -> Duration? {
        do {
            try await source.quarantine(reasons)
        } catch {
            return bufferFailed("cannot move refused readings to quarantine", error, status: status, &loop)
        }
        state.withLock { $0.quarantinedTotal += Int64(reasons.count) }
        metrics.quarantined.increment(by: Int64(reasons.count))
        return nil
    }
}

/// The uploader's metrics, created once with bounded labels.
struct UploadMetrics: Sendable {
    let delivered = Counter(label: "farmgate_upload_requests_total", dimensions: [("result", "delivered")])
    let refused = Counter(label: "farmgate_upload_requests_total", dimensions: [("result", "refused")])
    let failed = Counter(label: "farmgate_upload_requests_total", dimensions: [("result", "failed")])
    let accepted = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "accepted")])
    let duplicates = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "duplicate")])
    let rejected = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "rejected")])
    let quarantined = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "quarantined")])
    let renumbered = Counter(label: "farmgate_upload_readings_total", dimensions: [("outcome", "renumbered")])
    /// Calibration events the ingest counted in a receipt (stored or already had) and the buffer deleted.
    let calibrations = Counter(label: "farmgate_upload_calibrations_total")
    let held = Gauge(label: "farmgate_upload_held")
}
