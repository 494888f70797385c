import FarmgateWire
import FarmgateSupport
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
import Synchronization

/// One request to the ingest and what its answer means (the classification documented on ``Uploader``).
extension Uploader {
    /// A whole-request refusal, from the ingest's ``APIErrorBody`` (or the bare status when the body is not one).
    struct Refusal: Sendable {
        var status: Int
        var code: String
        var message: String
        var acceptedVersions: [Int]? = nil
        /// With `stale_context`: the ingest's newest readings.
        var context: [ContextEntryJSON]? = nil

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
                context = body.error.context
                return
            }
            code = "http_\(response.status)"
            message = String(decoding: response.body.prefix(200), as: UTF8.self)
                .trimmingWhitespace()
                .replacing("\n", with: " ")
        }
    }

    /// What became of one request.
    enum Attempt {
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
    func attempt(_ group: ArraySlice<Reading>, _ loop: inout LoopState) async -> Attempt {
        while true {
            // Graceful shutdown: the request in flight has finished; start no new one.
            if Self.stopping && !loop.draining { return .stop(.zero) }
            let format = loop.format
            // Events ride on the first request of a delivery that is sent; a halved batch's first half takes them.
            let events = loop.outgoingEvents
            let body: [UInt8]
            let frame: StatefulFrame?
            switch await encode(group, events: events, format: format, session: statefulSession(loop)) {
            case .unencodable(let reason) where !events.isEmpty:
                // The events, not the readings, may be what cannot be encoded: readings never pay for an event.
                logger.error(
                    "Calibration events cannot be encoded; the readings go without them and the events wait in the buffer",
                    metadata: ["calibration.events": "\(events.count)", "error": "\(reason)"])
                pauseEvents(&loop)
                continue
            case .encoded(let bytes, _) where bytes.count > configuration.batchMaxBytes && group.count > 1:
                logger.debug("Batch too large, halving", metadata: ["batch.bytes": "\(bytes.count)", "batch.readings": "\(group.count)"])
                return .halve(nil)
            case .encoded(let bytes, let stateful):
                body = bytes
                frame = stateful
            case .unencodable(let reason):
                if group.count > 1 { return .halve(nil) }
                let reading = group[group.startIndex]
                logger.error(
                    "A reading cannot be encoded; moving it to quarantine",
                    metadata: ["reading.sequence": "\(reading.sequence)", "reading.sensor": "\(reading.sensor)", "error": "\(reason)"])
                if let wait = await quarantine([reading.sequence: "encoding_failed: \(reason)"], status: nil, &loop) { return .stop(wait) }
                return .settled
            case .bufferFailed:
                return .stop(bufferRetryDelay)
            }
            if format == .binary { noteFrames(frame, loop) }
            // nil: the uploader fell back to another format, or left events out; the same readings go again at once.
            guard let outcome = await send(group, body: body, format: format, events: events, frame: frame, &loop) else { continue }
            if let suspect = loop.suspectEvents, events.isEmpty {
                loop.suspectEvents = nil
                let delivered = if case .delivered = outcome { true } else { false }
                if let wait = await judgeSuspectEvents(suspect, readingsDelivered: delivered, &loop) { return .stop(wait) }
            }
            return outcome
        }
    }

    /// Sends one encoded batch and classifies the answer (see the type's documentation). Returns nil when the ingest refused
    /// the binary format version and the uploader switched to JSON: the caller encodes the same readings again and resends.
    ///
    /// A frame carrying calibration events that the ingest refuses whole never costs its readings anything: a 415
    /// `unsupported_format_version` means the ingest does not read version 3 after all (events wait until `GET /v1/device`
    /// says otherwise); a 400/422 may be the events' fault (they become suspects, judged by ``judgeSuspectEvents``). Either
    /// way the same readings go again at once without them and the events stay in the buffer. A 413 halves as usual; the
    /// events go with the first half.
    ///
    /// A stateful frame (`frame`) whose state the ingest does not hold (409 `unknown_sensor_table` or `stale_context`) goes
    /// again at once against the state the answer implies (the table declared, the ingest's context); after
    /// ``maxStateRefusals`` such answers in a row, or a 415 or 400/422 to a stateful frame, the same readings go again at
    /// once as a self-contained frame and stateful frames pause for a while.
    func send(
        _ group: ArraySlice<Reading>, body: [UInt8], format: UploadConfiguration.Format, events: [CalibrationEvent], frame: StatefulFrame? = nil,
        _ loop: inout LoopState
    ) async -> Attempt? {
        state.withLock {
            $0.lastAttemptAt = Timestamp.now()
            $0.requestsTotal += 1
        }
        // An ingest that reads format version 4 reads the key in Farmgate-Key too, which HTTP/2 compresses to a byte.
        let keyInHeader = loop.sendsKeyHeader
        let headers = [
            keyInHeader ? deviceKeyHeader : authorization, HTTPHeader("Content-Type", format.mediaType),
            HTTPHeader("Accept", "\(IngestProtocol.compactReceiptMediaType), application/json"),
        ]
        let response: HTTPResponse
        heartbeat.beat(within: heartbeatAllowance)
        // Readings taken before the clock was set may still be repaired, until a request carrying them may have reached the
        // ingest: the buffer makes them final once the connection is up, just before the request leaves, so that an
        // outage (no route, DNS, refused) never costs them their repair.
        let unsynchronized = group.compactMap { $0.quality.contains(.clockUnsynchronized) ? $0.sequence : nil }
        let freeze = unsynchronized.isEmpty ? nil : FreezeCheck(source: source, sequences: unsynchronized)
        var beforeSending: (@Sendable () -> Bool)?
        if let freeze { beforeSending = { freeze.run() } }
        // The previous batch's acknowledged readings are deleted while this request is in flight.
        startDeferredDeletion(&loop)
        do {
            response = try await client.post(batchesURL, headers: headers, body: body, beforeSending: beforeSending)
        } catch {
            if frame != nil, error.mayHaveReachedServer { loop.session.answerLost(group) }
            if let wait = await settleAcknowledgement(&loop) { return .stop(wait) }
            if error.kind == .cancelled { return .stop(.zero) }
            if error.kind == .withheld, let freeze {
                if let failure = freeze.failure { return .stop(bufferFailed("cannot make the readings final before sending", failure, status: nil, &loop)) }
                // Repaired since they were read: read them again, with their true time.
                logger.info("Readings were repaired by the clock while being sent; sending their repaired version")
                return .stop(.zero)
            }
            logger.warning("Upload failed", metadata: ["error": "\(error)", "upload.url": "\(batchesURL)"])
            return .stop(failed(result: error.description, status: nil, delay: loop.backoff.nextDelay(), &loop))
        }

        if let wait = await settleAcknowledgement(&loop) {
            // This answer is not read: its readings stay pending and go again, duplicates if it took them.
            if frame != nil { loop.session.answerLost(group) }
            return .stop(wait)
        }
        let status = response.status
        if (200...299).contains(status) { return await acknowledge(group, events: events, response: response, frame: frame, &loop) }
        let refusal = Refusal(response)
        let result = "\(status): \(refusal.reason)"
        if frame != nil {
            if status == 409, loop.session.refused(code: refusal.code, ingestContext: refusal.context) {
                loop.stateRefusals += 1
                state.withLock { $0.stateRefusalsTotal = ($0.stateRefusalsTotal ?? 0) + 1 }
                logger.info(
                    "The ingest does not hold the state a stateful frame assumed; sending the same readings again",
                    metadata: ["error.code": "\(refusal.code)", "refusals_in_a_row": "\(loop.stateRefusals)"])
                if loop.stateRefusals >= Self.maxStateRefusals { pauseStateful(&loop, refusal) }
                return nil
            }
            if status == 415 || ((status == 400 || status == 422) && refusal.code != IngestErrorCode.incompleteBody) {
                if status == 415 { loop.deviceCheck.askSoon() }
                pauseStateful(&loop, refusal)
                return nil
            }
        }
        if !events.isEmpty, status == 415, refusal.code == IngestErrorCode.unsupportedFormatVersion {
            noteRefusal(result, status: status)
            loop.acceptsEvents = false
            loop.outgoingEvents = []
            // Ask again what it reads. An ingest that keeps saying 3 and refusing it (instances of two versions behind one
            // address) gets no version 3 frame for a while: one extra request per pause, never one per batch. The JSON
            // form is not paused: the refusal was of the binary version, not of the events.
            loop.version3PausedUntil = ContinuousClock.now + max(configuration.backoffMax, .seconds(60))
            loop.deviceCheck.askSoon()
            logger.warning(
                "The ingest does not read batch format version 3 (calibration events) although it said so; readings go as version 2, the events wait in the buffer until the ingest says it reads version 3",
                metadata: ["ingest.accepted_versions": "\(refusal.acceptedVersions.map { "\($0)" } ?? "not said")", "calibration.events": "\(events.count)"])
            return nil
        }
        if !events.isEmpty, status == 400 || status == 422, refusal.code != IngestErrorCode.incompleteBody {
            noteRefusal(result, status: status)
            logger.warning(
                "The ingest refused a batch carrying calibration events; its readings go again without them, the events wait in the buffer",
                metadata: ["http.status": "\(status)", "reason": "\(refusal.reason)", "calibration.events": "\(events.count)"])
            loop.outgoingEvents = []
            loop.suspectEvents = (events, refusal)
            return nil
        }
        switch status {
        case 429, 503:
            if let header = response.header("Retry-After"), let asked = askedDelay(response) {
                // Never less than the backoff (and a second): `Retry-After: 0`, or a date already past, would otherwise
                // send the same batch again at once, as long as the ingest keeps saying so.
                let delay = max(asked, loop.backoff.nextDelay(), Self.minimumRetryAfterWait)
                logger.notice(
                    "The ingest asked to retry later",
                    metadata: ["http.status": "\(status)", "retry_after": "\(header)", "delay": "\(delay)"])
                return .stop(failed(result: result, status: status, delay: delay, &loop))
            }
            return transient(refusal, &loop)
        case 500...599:
            return transient(refusal, &loop)
        case 400 where refusal.code == IngestErrorCode.incompleteBody:
            // The body arrived cut short (a proxy, a broken connection): the same request may well succeed. An answer
            // means the ingest got a whole HTTP body, though: the same readings cut short every time are a frame that
            // cannot be read (an encoder's fault, a damaged buffer row), and are then refused like a malformed one
            // (bisected, held when systematic), not retried forever.
            let first = group.first?.sequence ?? 0
            if !loop.incompleteBodyIsRefusal {
                var seen = loop.incompleteBodies.flatMap { $0.first == first && $0.count == group.count ? $0.answers : nil } ?? 0
                seen += 1
                guard seen >= Self.maxIncompleteBodies else {
                    loop.incompleteBodies = (first, group.count, seen)
                    return transient(refusal, &loop)
                }
                loop.incompleteBodies = nil
                loop.incompleteBodyIsRefusal = true
                logger.warning(
                    "The ingest found the same batch cut short \(seen) times in a row; treating it as one it cannot read",
                    metadata: ["reason": "\(refusal.reason)", "batch.readings": "\(group.count)", "batch.first_sequence": "\(first)"])
            }
            noteRefusal(result, status: status)
            return .refused(refusal)
        case 401 where keyInHeader:
            // `GET /v1/device` said version 4, but this answer came from an instance that does not read Farmgate-Key (an
            // older one behind the same address): the key goes as Authorization for a while, these readings at once.
            loop.keyHeaderPausedUntil = ContinuousClock.now + max(configuration.backoffMax, .seconds(60))
            logger.warning(
                "The ingest refused the key sent in Farmgate-Key although it said it reads format version 4 (instances of two versions behind one address?); sending it as Authorization",
                metadata: ["http.status": "\(status)", "reason": "\(refusal.reason)"])
            return nil
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
        case 300...399:
            // A redirect is an address to fix, not a failure to wait out: batches are never posted where a redirect
            // points (a POST would be resent as a GET, or to a host the key was not meant for), so hold and say where.
            metrics.refused.increment()
            let target = response.header("Location").map { " to \($0.prefix(200))" } ?? ""
            return .stop(
                hold(
                    refusal,
                    reason: "the ingest's address redirects\(target): batches are not posted to a redirect; set upload.endpoint "
                        + "to the address it names (http:// to https://, a new host or path) and reload the agent", &loop))
        default:
            return transient(refusal, &loop)
        }
    }

    /// The shortest wait after a `Retry-After`, whatever it says: the ingest is overloaded, and a client that answers
    /// "retry in 0 s" by retrying at once is part of the load.
    static let minimumRetryAfterWait: Duration = .seconds(1)

    /// Records in the status how binary batches go now, for `farmgate status`.
    func noteFrames(_ frame: StatefulFrame?, _ loop: LoopState) {
        let frames: String
        if frame != nil {
            frames = "stateful (format version 4)"
        } else if !configuration.stateful {
            frames = "self-contained (upload.stateful = false)"
        } else if !loop.acceptsStateful {
            // Known only once `GET /v1/device` answered in this run (after a start or a reload, an unreachable ingest
            // has not said yet).
            let versions = state.withLock { $0.ingestAcceptedVersions }
            if let versions, !versions.contains(Int(BatchCodec.statefulFormatVersion)) {
                frames = "self-contained: the ingest does not read format version 4"
            } else {
                frames = "self-contained until the ingest answers and says it reads format version 4"
            }
        } else {
            frames = "self-contained for a while: the ingest refused a stateful frame"
        }
        state.withLock { $0.frames = frames }
    }

    /// How many 409 answers about the state in a row make the uploader pause stateful frames. One declares the table
    /// again, one adopts the ingest's context: a third means the two sides do not settle (instances that disagree).
    static let maxStateRefusals = 3

    /// How many 400 `incomplete_body` answers in a row to the same readings make them a refusal (bisected) rather than a
    /// transfer to retry.
    public static let maxIncompleteBodies = 5

    /// After the readings of a frame refused with its events went again alone: when they were accepted, the events were
    /// the cause (a refusal 400/422 is permanent: the same event would be refused forever). A single event is quarantined;
    /// several are sent one per batch next, so that each is judged alone. When the readings were not accepted, nothing
    /// shows the events are at fault: they pause for a while. Returns the wait when the buffer failed, else nil.
    func judgeSuspectEvents(
        _ suspect: (events: [CalibrationEvent], refusal: Refusal), readingsDelivered: Bool, _ loop: inout LoopState
    ) async -> Duration? {
        guard readingsDelivered else {
            pauseEvents(&loop)
            return nil
        }
        guard suspect.events.count == 1, let event = suspect.events.first else {
            loop.singleEventDeliveries = suspect.events.count
            logger.notice(
                "The ingest took the readings without the calibration events it refused with them; sending the events one per batch to find the one at fault",
                metadata: ["calibration.events": "\(suspect.events.count)"])
            return nil
        }
        do {
            try await source.quarantineCalibrations([event.id: suspect.refusal.reason])
        } catch {
            pauseEvents(&loop)
            return bufferFailed("cannot move a refused calibration event to quarantine", error, status: suspect.refusal.status, &loop)
        }
        loop.singleEventDeliveries = max(0, loop.singleEventDeliveries - 1)
        state.withLock { $0.calibrationsQuarantinedTotal = ($0.calibrationsQuarantinedTotal ?? 0) + 1 }
        logger.error(
            "The ingest refuses a calibration event for good (it took the same readings without it); the event is kept in quarantine and not sent again: see farmgate quarantine list",
            metadata: [
                "calibration.id": "\(event.id)", "calibration.sensor": "\(event.sensor)", "http.status": "\(suspect.refusal.status)",
                "reason": "\(suspect.refusal.reason)",
            ])
        return nil
    }

    /// Sends no events for a while (a backoff's maximum, at least a minute) after a frame carrying them was refused or could
    /// not be encoded: readings must not pay a second request per batch for an event the ingest keeps refusing.
    func pauseEvents(_ loop: inout LoopState) {
        loop.outgoingEvents = []
        loop.eventsPausedUntil = ContinuousClock.now + max(configuration.backoffMax, .seconds(60))
    }

    /// A refusal that bisection or halving follows up: recorded, not yet a failure.
    func noteRefusal(_ result: String, status: Int) {
        state.withLock {
            $0.lastResult = result
            $0.lastHTTPStatus = status
        }
        metrics.refused.increment()
    }

    func transient(_ refusal: Refusal, _ loop: inout LoopState) -> Attempt {
        logger.warning("Upload failed", metadata: ["http.status": "\(refusal.status)", "reason": "\(refusal.reason)"])
        return .stop(failed(result: "\(refusal.status): \(refusal.reason)", status: refusal.status, delay: loop.backoff.nextDelay(), &loop))
    }

    /// The ingest does not read the binary format version this build writes: every ingest reads JSON.
    func fallBackToJSON(_ refusal: Refusal, _ loop: inout LoopState) {
        loop.format = .json
        loop.fellBackAt = ContinuousClock.now
        loop.deviceCheck.askSoon()
        let versions = refusal.acceptedVersions.map { $0.map(String.init).joined(separator: ", ") } ?? "not said"
        let note =
            "the ingest does not read binary batch format version \(BatchCodec.formatVersion) (it reads: \(versions)); "
            + "sending JSON until it says it reads it again (GET /v1/device, asked every "
            + "\(Int(Backoff.seconds(configuration.deviceCheckInterval))) s) or the agent restarts"
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
    func hold(_ refusal: Refusal, reason: String, _ loop: inout LoopState) -> Duration {
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

    // MARK: - Failures

    /// Counts a failed attempt and says when the next one is. `status`: the HTTP status of the ingest's answer; without
    /// one, `cause` says why the attempt failed (by default no answer came).
    func failed(result: String, status: Int?, cause: UploadFailureCause = .connection, delay: Duration, _ loop: inout LoopState) -> Duration {
        let seconds = Backoff.seconds(delay)
        let next = Timestamp(microseconds: Timestamp.now().microseconds + Int64(seconds * 1_000_000))
        let failures = loop.backoff.failures
        let answer = status.map { "\($0)" } ?? cause.rawValue
        metrics.failed.increment()
        state.withLock {
            $0.lastResult = result
            $0.lastHTTPStatus = status
            $0.consecutiveFailures = failures
            $0.failuresTotal = ($0.failuresTotal ?? [:]).merging([answer: 1], uniquingKeysWith: +)
            $0.nextAttemptAt = next
            $0.currentBackoffSeconds = seconds
        }
        return delay
    }
}

/// The uploader's check just before a request leaves (``PendingReadings/freezeForSending(_:)``), run on the HTTP client's
/// thread; remembers why it said no.
final class FreezeCheck: Sendable {
    let source: any PendingReadings
    let sequences: [UInt64]
    private let error = Mutex<(any Error)?>(nil)

    init(source: any PendingReadings, sequences: [UInt64]) {
        self.source = source
        self.sequences = sequences
    }

    /// The buffer's error when it could not make the readings final (the request is then withheld too).
    var failure: (any Error)? { error.withLock { $0 } }

    func run() -> Bool {
        do {
            return try source.freezeForSending(sequences)
        } catch {
            self.error.withLock { $0 = error }
            return false
        }
    }
}

extension Uploader {
    /// The wait a response's `Retry-After` asks for (a number of seconds or an HTTP date, against its `Date`), capped at
    /// `retry_after_max`; nil without one.
    func askedDelay(_ response: HTTPResponse) -> Duration? {
        guard let header = response.header("Retry-After"),
            let asked = RetryAfter.delay(header, responseDate: response.header("Date"))
        else { return nil }
        return min(asked, configuration.retryAfterMax)
    }
}
