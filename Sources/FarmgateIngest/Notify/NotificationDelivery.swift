import FarmgateSupport
import FarmgateWire
import Foundation
public import Logging
public import ServiceLifecycle
import Synchronization

/// The delivery workers: a `Service` in `serve`'s group that claims due outbox rows, sends them, and records the outcome.
///
/// - Claims go through ``NotificationOutboxStore/claimNotifications(_:)``: exclusive across instances, paced per
///   receiver (`max_per_minute`), at most ``NotifyConfiguration/perReceiver`` in flight per receiver and
///   ``NotifyConfiguration/maxInFlight`` in all at this instance. So a slow or dead receiver holds only its own few
///   slots, never another receiver's, and never anything of the ingest's request path (deliveries are tasks of their
///   own; webhooks are non-blocking I/O, SMTP runs on threads of its own).
/// - A failure is retried after `backoff_initial · 2^(attempt−1)` (capped at `backoff_max`, drawn between half and all
///   of it), or after the receiver's `Retry-After` when that is longer (``retryDelay(for:attempt:configuration:)``);
///   after `max_attempts`, or at once for a refusal that a retry cannot change, the row is a dead letter
///   (`alert outbox list --state dead`, `alert outbox retry ID`, the metric `farmgate_ingest_notification_outbox{state="dead"}`).
///   A 429 or 503 with `Retry-After` is the receiver asking for time, not failing: it does not count toward
///   `max_attempts` for ``deferralLimit`` after the notification was written.
/// - Claims are timed by the store's clock (``OutboxClaimClock/store``): on PostgreSQL every instance agrees on when a
///   claim expires, whatever its own clock says.
/// - Every attempt of a row carries the row's idempotency key. An instance killed mid-delivery leaves its claim, which
///   expires after `claim_timeout`; then any instance delivers the row again with the same key. The sole deliverer of a
///   store (`serve` on SQLite, which one process holds) takes such claims over at its start instead.
///
/// On graceful shutdown it stops claiming and lets the deliveries in flight finish for ``stopGrace`` (at most
/// `request_timeout`); those still going are then cut short and put back as pending, due now, their attempt not counted.
/// A delivery cut short by a hard stop is retried after its claim expires.
public final class NotificationDelivery: Service {
    /// `claimed_by` of this instance's claims: host, process id and a random part.
    public let instanceID: String
    private let store: any NotificationOutboxStore
    private let configuration: NotifyConfiguration
    private let metrics: NotificationMetrics?
    private let logger: Logger
    /// Whether no other process delivers from the store (``init(store:configuration:metrics:logger:instanceID:soleDeliverer:)``).
    private let soleDeliverer: Bool
    /// Wakes the polling loop: a tick every `poll_interval`, a delivery that finished, the engine's ``wake()``.
    /// Coalesced: one pending wake-up is kept, none is lost.
    private let wakeups: AsyncStream<Void>
    private let wakeupContinuation: AsyncStream<Void>.Continuation
    private let state = Mutex(State())

    private struct State {
        var busy: [Int64: Int] = [:]
        /// The ids of the rows being delivered (``OutboxClaimRequest/delivering``).
        var rows: Set<Int64> = []
        var inFlight = 0
        var stopping = false
        /// When a failed claim was last logged: a store that is down is said once a minute, not at every poll.
        var claimErrorLogged: ContinuousClock.Instant?
    }

    /// - Parameter soleDeliverer: no other process delivers from `store` now (SQLite under `serve`'s lock): the claims
    ///   found at the start are a stopped process's, due at once rather than when they expire.
    /// - Throws: ``DeliveryFailure`` when `[notify] ca_file` cannot be loaded.
    public init(
        store: any NotificationOutboxStore, configuration: NotifyConfiguration, metrics: NotificationMetrics? = nil, logger: Logger,
        instanceID: String? = nil, soleDeliverer: Bool = false
    ) throws {
        self.store = store
        self.soleDeliverer = soleDeliverer
        self.configuration = configuration
        self.metrics = metrics
        self.logger = logger
        self.instanceID = instanceID ?? Self.defaultInstanceID()
        // The HTTP client is made in run() (it must be shut down, which a service that never ran could not do); the CA
        // file is checked now, so that `serve` refuses a bad one at start.
        try Notifier.checkCAFile(configuration)
        (wakeups, wakeupContinuation) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
    }

    /// Looks at the outbox now rather than at the next poll: for a caller that has just written rows (the engine).
    public func wake() {
        wakeupContinuation.yield()
    }

    public func run() async throws {
        let notifier = try Notifier(configuration: configuration, logger: logger)
        logger.info("notification delivery started", metadata: ["notify.instance": "\(instanceID)"])
        if soleDeliverer {
            do {
                let released = try await store.releaseClaims(now: .now())
                if released > 0 {
                    logger.notice(
                        "notifications a stopped process was delivering are sent again now, with the same idempotency keys",
                        metadata: ["notify.rows": "\(released)"])
                }
            } catch {
                logger.storeFailure("cannot take over the claims of a stopped process; they are sent again when they expire (claim_timeout)", error: error)
            }
        }
        let interval = configuration.pollInterval
        await withDiscardingTaskGroup { group in
            group.addTask {
                while !Task.isCancelled, !self.state.withLock({ $0.stopping }) {
                    try? await Task.sleep(for: interval)
                    self.wake()
                }
            }
            await withGracefulShutdownHandler {
                var lastCounts = ContinuousClock.now - .seconds(3600)
                wake()
                for await _ in wakeups {
                    guard !state.withLock({ $0.stopping }) else { break }
                    let claimed = await claim()
                    for notification in claimed {
                        group.addTask {
                            await self.deliver(notification, notifier: notifier)
                            self.finished(notification.receiver.id, row: notification.entry.id)
                        }
                    }
                    if ContinuousClock.now - lastCounts >= max(interval, .seconds(10)) {
                        lastCounts = ContinuousClock.now
                        if let metrics, let counts = try? await store.outboxCounts() { metrics.outbox(counts) }
                    }
                }
                // Stopping: the deliveries in flight get ``stopGrace`` (at most the request timeout) to finish, then
                // are cut short, and each puts its row back as pending, due now, its attempt not counted (the same
                // idempotency key goes out again after the restart). One hung receiver held the whole graceful stop
                // for its request timeout, and the HTTP server and the store were then cancelled rather than stopped.
                let grace = min(configuration.requestTimeout, Self.stopGrace)
                let stopping = ContinuousClock.now
                while state.withLock({ $0.inFlight }) > 0, ContinuousClock.now - stopping < grace {
                    try? await Task.sleep(for: .milliseconds(20))
                }
                let cut = state.withLock { $0.inFlight }
                if cut > 0 {
                    logger.warning(
                        "stopping: notifications still being delivered are cut short and sent again after the restart, with the same idempotency key",
                        metadata: ["notify.in_flight": "\(cut)", "notify.grace": "\(grace)", "notify.instance": "\(instanceID)"])
                }
                group.cancelAll()
            } onGracefulShutdown: {
                self.state.withLock { $0.stopping = true }
                self.wakeupContinuation.finish()
            }
        }
        await notifier.shutdown()
        logger.info("notification delivery stopped", metadata: ["notify.instance": "\(instanceID)"])
    }

    /// Claims what this instance has room for; reserves the room before the deliveries start.
    private func claim() async -> [ClaimedNotification] {
        let (free, busy, rows) = state.withLock { state in (configuration.maxInFlight - state.inFlight, state.busy, state.rows) }
        guard free > 0 else { return [] }
        let request = OutboxClaimRequest(
            claimant: instanceID, now: .now(), claimDuration: configuration.claimTimeout, lookahead: configuration.pollInterval, limit: free,
            perReceiver: configuration.perReceiver, busy: busy, maxAttempts: configuration.maxAttempts, clock: .store, delivering: rows)
        let claimed: [ClaimedNotification]
        do {
            claimed = try await store.claimNotifications(request)
        } catch {
            let now = ContinuousClock.now
            let log = state.withLock { state in
                guard state.claimErrorLogged.map({ now - $0 >= .seconds(60) }) ?? true else { return false }
                state.claimErrorLogged = now
                return true
            }
            if log {
                logger.error(
                    "cannot claim notifications from the outbox; trying again at every poll (said again in a minute if it lasts)",
                    metadata: ["error": "\(String(reflecting: error))", "notify.instance": "\(instanceID)"])
            }
            return []
        }
        state.withLock { $0.claimErrorLogged = nil }
        let inFlight = state.withLock { state in
            for notification in claimed {
                state.busy[notification.receiver.id, default: 0] += 1
                state.rows.insert(notification.entry.id)
            }
            state.inFlight += claimed.count
            return state.inFlight
        }
        metrics?.inFlight(inFlight)
        return claimed
    }

    private func finished(_ receiver: Int64, row: Int64) {
        let inFlight = state.withLock { state in
            state.rows.remove(row)
            state.busy[receiver, default: 1] -= 1
            if state.busy[receiver] == 0 { state.busy[receiver] = nil }
            state.inFlight -= 1
            return state.inFlight
        }
        metrics?.inFlight(inFlight)
        wake()
    }

    /// Waits for the row's send slot, sends it, and records the outcome under the claim.
    private func deliver(_ claimed: ClaimedNotification, notifier: Notifier) async {
        let entry = claimed.entry
        var metadata: Logger.Metadata = [
            "notify.id": "\(entry.id)", "notify.receiver": "\(claimed.receiver.name)", "notify.farm": "\(entry.farm)",
            "notify.attempt": "\(entry.attempts)", "notify.key": "\(entry.idempotencyKey)",
        ]
        let wait = claimed.slot.microseconds - Timestamp.now().microseconds
        if wait > 0 { try? await Task.sleep(for: .microseconds(wait)) }
        let started = ContinuousClock.now
        let completion: OutboxCompletion
        let result: NotificationMetrics.Result
        // The e-mail recipients reached in all, stored with the outcome (nil: as they were).
        var reached: [String]?
        do {
            let notification: AlertNotification
            do {
                notification = try OutboxPayload.decode(entry.payload)
            } catch {
                throw DeliveryFailure("the outbox payload is not a notification (\(error)); the alert engine wrote something this version cannot read", retryable: false)
            }
            // Told as of when the notification was written, or last merged into ("firing since 03:12 (5m so far)", the
            // mail's Date), so that every attempt under one idempotency key sends the same body (a claimed row is never
            // merged into again); signed now, as receivers check.
            let sent = try await notifier.send(
                notification, idempotencyKey: entry.idempotencyKey, to: claimed.receiver, asOf: entry.coalescedAt ?? entry.createdAt, signedAt: .now(),
                reached: entry.reached)
            let account = sent.account
            if sent.reached != entry.reached { reached = sent.reached }
            completion = .delivered(at: .now())
            result = .delivered
            logger.debug("notification delivered", metadata: metadata.merging(["notify.result": "\(account)"]) { $1 })
        } catch let failure as DeliveryFailure where Task.isCancelled {
            // Cut short by a stop (``stopGrace``): not the receiver's failure, and not counted.
            if failure.reached != entry.reached { reached = failure.reached }
            completion = .deferred(at: .now(), error: "cut short by the ingest stopping (\(failure.message)); sent again with the same idempotency key")
            result = .retried
        } catch let failure as DeliveryFailure {
            let now = Timestamp.now()
            metadata["error"] = "\(failure.message)"
            if failure.reached != entry.reached {
                reached = failure.reached
                metadata["notify.reached"] = "\(failure.reached.joined(separator: ", "))"
            }
            let deferral = failure.asksForTime && now.microseconds - entry.createdAt.microseconds < Self.deferralLimit.wholeMicroseconds
            if !failure.retryable || (!deferral && entry.attempts >= configuration.maxAttempts) {
                completion = .dead(at: now, error: failure.message)
                result = .dead
                logger.error(
                    failure.retryable
                        ? "notification is a dead letter after its last attempt; retry it with `farmgate-ingest alert outbox retry`"
                        : "the receiver refused the notification for good; it is a dead letter: fix the receiver, then `farmgate-ingest alert outbox retry`",
                    metadata: metadata)
            } else {
                let delay = Self.retryDelay(for: failure, attempt: entry.attempts, configuration: configuration)
                let at = Timestamp(microseconds: now.microseconds + delay.wholeMicroseconds)
                result = .retried
                metadata["notify.retry_in"] = "\(delay)"
                if deferral {
                    completion = .deferred(at: at, error: failure.message + " (the receiver asked to wait; not counted as an attempt)")
                    logger.warning("the receiver asked to be called later; the notification waits, and the attempt does not count", metadata: metadata)
                } else {
                    completion = .retry(at: at, error: failure.message)
                    logger.warning("notification delivery failed; it will be retried", metadata: metadata)
                }
            }
        } catch {
            completion =
                Task.isCancelled
                ? .deferred(at: .now(), error: "cut short by the ingest stopping (\(error)); sent again with the same idempotency key")
                : .retry(at: .now(), error: "\(error)")
            result = .retried
        }
        metrics?.attempt(result, kind: claimed.receiver.kind, duration: ContinuousClock.now - started)
        do {
            // In a task of its own: a delivery cut short by a stop is cancelled, and the store would refuse a cancelled
            // caller at once, leaving the row `delivering` until its claim expired.
            let store = self.store
            let applied = try await Task { try await store.completeNotification(id: entry.id, claim: claimed.claim, outcome: completion, reached: reached) }.value
            if !applied {
                logger.warning(
                    "the claim on a notification expired before its delivery was recorded; another attempt may repeat it with the same idempotency key",
                    metadata: metadata)
            }
        } catch {
            metadata["error"] = "\(String(reflecting: error))"
            logger.error(
                "cannot record a notification's delivery; it will be sent again with the same idempotency key after its claim expires",
                metadata: metadata)
        }
    }

    /// How long the deliveries in flight may go on once the ingest stops (at most `request_timeout`): well inside the
    /// service group's graceful stop, which the HTTP server and the store need after them.
    public static let stopGrace: Duration = .seconds(3)

    /// The longest a receiver's `Retry-After` is obeyed: an hour, beyond `backoff_max`'s default, so that a receiver in
    /// maintenance is left alone as long as it asks, but a notification does not wait half a day on a header that asks
    /// for one (a larger value waits this long, then asks again).
    public static let retryAfterMax: Duration = .seconds(3600)

    /// How long after a notification was written a receiver may ask for time (a 429 or 503 with `Retry-After`) without
    /// the attempt counting toward `max_attempts`: a day. Beyond it such attempts count like any other, so a receiver
    /// that says "later" for ever still ends in a dead letter, after at most `max_attempts` more.
    public static let deferralLimit: Duration = .seconds(86_400)

    /// The wait after `failure` on attempt `attempt`: the backoff, or the receiver's `Retry-After` when that is longer,
    /// at most ``retryAfterMax``. Never shorter than the backoff: a `Retry-After: 0` (or a date in the past) is no
    /// reason to retry at once and burn every attempt in seconds.
    static func retryDelay(for failure: DeliveryFailure, attempt: Int, configuration: NotifyConfiguration) -> Duration {
        let backoff = backoff(attempt: attempt, configuration: configuration)
        guard let asked = failure.retryAfter else { return backoff }
        return max(backoff, min(asked, retryAfterMax))
    }

    /// `backoff_initial · 2^(attempt−1)`, at most `backoff_max`, drawn uniformly between half and all of it.
    static func backoff(attempt: Int, configuration: NotifyConfiguration) -> Duration {
        let initial = Double(configuration.backoffInitial.wholeMicroseconds)
        let cap = Double(configuration.backoffMax.wholeMicroseconds)
        let full = min(cap, initial * pow(2, Double(max(0, min(attempt - 1, 40)))))
        return .microseconds(Int64(Double.random(in: (full / 2)...max(full / 2, full))))
    }

    static func defaultInstanceID() -> String {
        let host = ProcessInfo.processInfo.hostName.split(separator: ".").first.map(String.init) ?? "host"
        let random = String(UInt32.random(in: 0...UInt32.max), radix: 16)
        return "\(host.prefix(40))/\(getpid())/\(random)"
    }
}
