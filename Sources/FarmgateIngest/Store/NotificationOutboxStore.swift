import FarmgateSupport
public import FarmgateWire
import Foundation

/// Where alert receivers and the notification outbox live (`alert_receivers`, `alert_outbox`): the role the delivery
/// workers (``NotificationDelivery``) and the `farmgate-ingest alert receiver|outbox` commands use.
///
/// The alert engine writes outbox rows in the same transaction as an alert's state change; this role only delivers them.
/// While a row is `pending` and no claim has touched it (no attempt, never claimed), the engine may merge a later
/// notification of the same alert into it (``OutboxCoalescing``); once claimed, a row's payload never changes.
/// A row is `pending` until a worker claims it (`delivering`, `claimed_by`, `claimed_until_us`, `attempts` raised by
/// one), then `delivered`, or `pending` again with a later `next_attempt_at_us` after a failure, or `dead` after the
/// last attempt. A claim whose instance died expires at `claimed_until_us` and is claimed again, with the same
/// `idempotency_key`. While a row is `delivering`, `next_attempt_at_us` equals `claimed_until_us`, so one index
/// (`state IN ('pending', 'delivering')`, `next_attempt_at_us`) finds every row that is due.
///
/// `attempts` counts the attempts that failed or were cut short, plus the one in flight; an attempt the receiver
/// answered with a request for time (``OutboxCompletion/deferred(at:error:)``) is taken back by its own completion.
/// Only the completion of the claim that raised it lowers it, so the fencing token (`claimed_by`, `attempts`) of a claim
/// that expired and was taken over does not come back: every later claim sets it at least one higher. `alert outbox
/// retry` starts the count again, but the token still never repeats while its claim's delivery runs: `claimed_by` is
/// the instance (host and a random part, new at every start), and an instance never claims a row its own delivery of
/// it still holds (``OutboxClaimRequest/delivering``).
///
/// Claims are exclusive across instances: PostgreSQL locks the receivers it claims for (`FOR NO KEY UPDATE SKIP LOCKED`,
/// which does not block the engine's inserts that reference them) and the rows (`FOR UPDATE SKIP LOCKED`); SQLite claims
/// on its single writer. The same claim gives each row a send slot from the receiver's pacing
/// (``ReceiverPacing``, `alert_receivers.next_send_at_us`), so that `max_per_minute` holds across instances.
public protocol NotificationOutboxStore: Sendable {
    /// Adds a receiver to `farm`. Throws ``IngestStoreError/notFound(_:)`` for an unknown farm and
    /// ``IngestStoreError/alreadyExists(_:)`` when the farm has a receiver of that name.
    func addAlertReceiver(farm: String, _ spec: AlertReceiverSpec, createdAt: Timestamp) async throws -> AlertReceiver

    /// The receivers of `farm` ordered by name. Throws ``IngestStoreError/notFound(_:)`` for an unknown farm.
    func alertReceivers(farm: String) async throws -> [AlertReceiver]

    /// Replaces the settings of the receiver `spec.name` of `farm` with `spec` (its id, pacing and notifications stay).
    /// Notifications already waiting keep the time they are due; the new grouping applies to those written from now.
    /// Throws ``IngestStoreError/notFound(_:)`` when farm or receiver is unknown.
    func updateAlertReceiver(farm: String, _ spec: AlertReceiverSpec) async throws -> AlertReceiver

    /// Removes the receiver and every outbox row addressed to it (delivered history included: the rows reference it).
    /// - Returns: how many of those rows were not delivered yet (pending, delivering or dead), for the operator.
    /// - Throws: ``IngestStoreError/notFound(_:)`` when farm or receiver is unknown.
    func removeAlertReceiver(farm: String, name: String) async throws -> Int

    /// Inserts one `pending` row for `notification` at `receiverID`, due at `dueAt`, with the key
    /// ``AlertNotification/idempotencyKey(receiver:)``. What the engine does in its own transaction for a notification
    /// it does not merge (``OutboxCoalescing``); the tests, the benchmark and tools use this, and it never merges. - Returns: the row's id, or nil when a row with that key exists (nothing changed).
    func enqueueNotification(_ notification: AlertNotification, receiverID: Int64, dueAt: Timestamp) async throws -> Int64?

    /// Claims up to `request.limit` due rows for `request.claimant` (see ``OutboxClaimRequest``), and first turns expired
    /// claims that used up their attempts into dead letters. A row is not claimed while an older row of the same alert to
    /// the same receiver is `pending` or `delivering` (``OutboxOrdering``): an alert's notifications go out in order.
    func claimNotifications(_ request: OutboxClaimRequest) async throws -> [ClaimedNotification]

    /// Records how one claimed delivery ended. Applies only while the row is still this claim's (`claimed_by` and
    /// `attempts` unchanged, state `delivering`): a claim that expired and was taken by another instance is not
    /// overwritten. - Returns: whether the row was changed.
    ///
    /// - Parameter reached: the recipients the notification has now reached in all (``OutboxEntry/reached``), stored
    ///   with the outcome; nil leaves them as they are.
    @discardableResult
    func completeNotification(id: Int64, claim: OutboxClaim, outcome: OutboxCompletion, reached: [String]?) async throws -> Bool

    /// Outbox rows, newest first, optionally of one farm and one state, at most `limit`.
    func outboxEntries(farm: String?, state: OutboxState?, limit: Int) async throws -> [OutboxEntry]

    /// Makes a `dead` (or still `pending`) row due now with its attempts reset, to be delivered again with the same
    /// idempotency key. Throws ``IngestStoreError/notFound(_:)`` for an unknown id, and
    /// ``OutboxRetryRefused`` when the row is being delivered or was delivered.
    func retryNotification(id: Int64, now: Timestamp) async throws

    /// How many rows are in each state, across farms (the metrics' gauges).
    func outboxCounts() async throws -> [OutboxState: Int]

    /// Makes every claimed (`delivering`) row due at `now`, its attempts as counted: for the only process that delivers
    /// from this store, whose claims found at its start are all of a process that stopped (SQLite, which one `serve`
    /// holds). They would otherwise wait for their claims to expire (`claim_timeout`), and the newer notifications of
    /// their alerts behind them. - Returns: how many rows.
    func releaseClaims(now: Timestamp) async throws -> Int
}

extension NotificationOutboxStore {
    /// Records how one claimed delivery ended, leaving the recipients it reached as they are.
    @discardableResult
    public func completeNotification(id: Int64, claim: OutboxClaim, outcome: OutboxCompletion) async throws -> Bool {
        try await completeNotification(id: id, claim: claim, outcome: outcome, reached: nil)
    }
}

/// `alert_outbox.reached`: recipients one per line (an address holds no control character, ``AlertReceiverValidation``),
/// NULL for none.
enum OutboxReached {
    static func encode(_ recipients: [String]?) -> String? {
        guard let recipients, !recipients.isEmpty else { return nil }
        return recipients.joined(separator: "\n")
    }

    static func decode(_ text: String?) -> [String] {
        (text ?? "").split(separator: "\n").map(String.init)
    }
}

/// What a receiver is, as `alert receiver add` gives it.
public struct AlertReceiverSpec: Sendable, Hashable {
    public var name: String
    public var kind: AlertReceiverKind
    /// The webhook URL (`http`/`https`), or the SMTP server (`smtp://host:port`, STARTTLS required; `smtps://` TLS from the start).
    public var url: String
    /// The HMAC secret of a webhook, or the SMTP password. Never printed.
    public var secret: String?
    /// The SMTP user name.
    public var username: String?
    public var emailFrom: String?
    /// One or more addresses separated by commas.
    public var emailTo: String?
    /// At most this many notifications per minute reach the receiver, spaced evenly; more wait. Default 60.
    public var maxPerMinute: Int
    /// How long an alert's first notification to this receiver waits before it is sent, taking the alert's changes in
    /// the meantime (a sensor flapping at its threshold: one notification telling the newest state and how often it
    /// changed). Default 0: sent at once. See ``OutboxCoalescing/due(_:now:grouping:after:)``.
    public var groupWait: Duration
    /// How long after an alert's last notification to this receiver its next one waits, taking the changes in the
    /// meantime. Default 0: sent at once.
    public var groupInterval: Duration

    public init(
        name: String, kind: AlertReceiverKind, url: String, secret: String? = nil, username: String? = nil, emailFrom: String? = nil,
        emailTo: String? = nil, maxPerMinute: Int = 60, groupWait: Duration = .zero, groupInterval: Duration = .zero
    ) {
        self.groupWait = groupWait
        self.groupInterval = groupInterval
        self.name = name
        self.kind = kind
        self.url = url
        self.secret = secret
        self.username = username
        self.emailFrom = emailFrom
        self.emailTo = emailTo
        self.maxPerMinute = maxPerMinute
    }
}

public enum AlertReceiverKind: String, Sendable, Hashable, CaseIterable {
    case webhook, email
}

/// A stored receiver.
public struct AlertReceiver: Sendable, Hashable {
    public var id: Int64
    public var farmID: Int64
    public var farm: String
    public var spec: AlertReceiverSpec
    public var createdAt: Timestamp

    public init(id: Int64, farmID: Int64, farm: String, spec: AlertReceiverSpec, createdAt: Timestamp) {
        self.id = id
        self.farmID = farmID
        self.farm = farm
        self.spec = spec
        self.createdAt = createdAt
    }

    public var name: String { spec.name }
    public var kind: AlertReceiverKind { spec.kind }
}

public enum OutboxState: String, Sendable, Hashable, CaseIterable {
    case pending, delivering, delivered, dead
}

/// One outbox row, as listed and claimed.
public struct OutboxEntry: Sendable, Hashable {
    public var id: Int64
    public var farm: String
    public var receiverID: Int64
    public var receiver: String
    public var alertID: Int64
    public var transitionID: Int64
    public var idempotencyKey: String
    /// JSON of ``AlertNotification``.
    public var payload: String
    public var state: OutboxState
    public var attempts: Int
    public var nextAttemptAt: Timestamp
    public var claimedBy: String?
    public var claimedUntil: Timestamp?
    public var lastError: String?
    public var createdAt: Timestamp
    public var deliveredAt: Timestamp?
    public var lastAttemptAt: Timestamp?
    /// How many firing or resolved transitions the row tells: more than 1 when later notifications of the alert were
    /// merged into it while it waited (``OutboxCoalescing``), or for a late report.
    public var transitions: Int
    /// When the first of them happened (nil for a row written before the ingest recorded it).
    public var firstTransitionAt: Timestamp?
    /// When a notification was last merged into it; its text is told as of then (else as of ``createdAt``).
    public var coalescedAt: Timestamp?
    /// The recipients of an e-mail notification that its server already took it for, in the order they were reached
    /// (`alert_outbox.reached`): a retry sends only to the receiver's other recipients. Empty for a webhook.
    public var reached: [String]

    public init(
        id: Int64, farm: String, receiverID: Int64, receiver: String, alertID: Int64, transitionID: Int64, idempotencyKey: String, payload: String,
        state: OutboxState, attempts: Int, nextAttemptAt: Timestamp, claimedBy: String?, claimedUntil: Timestamp?, lastError: String?,
        createdAt: Timestamp, deliveredAt: Timestamp?, lastAttemptAt: Timestamp?, transitions: Int = 1, firstTransitionAt: Timestamp? = nil,
        coalescedAt: Timestamp? = nil, reached: [String] = []
    ) {
        self.reached = reached
        self.transitions = transitions
        self.firstTransitionAt = firstTransitionAt
        self.coalescedAt = coalescedAt
        self.id = id
        self.farm = farm
        self.receiverID = receiverID
        self.receiver = receiver
        self.alertID = alertID
        self.transitionID = transitionID
        self.idempotencyKey = idempotencyKey
        self.payload = payload
        self.state = state
        self.attempts = attempts
        self.nextAttemptAt = nextAttemptAt
        self.claimedBy = claimedBy
        self.claimedUntil = claimedUntil
        self.lastError = lastError
        self.createdAt = createdAt
        self.deliveredAt = deliveredAt
        self.lastAttemptAt = lastAttemptAt
    }
}

/// What a worker asks of ``NotificationOutboxStore/claimNotifications(_:)``.
public struct OutboxClaimRequest: Sendable, Hashable {
    /// Who claims: the instance id (`claimed_by`).
    public var claimant: String
    public var now: Timestamp
    /// How long a claim holds past its send slot; after it, another instance may claim the row again.
    public var claimDuration: Duration
    /// Send slots are handed out this far ahead of `now`; the worker waits for its slot before sending.
    public var lookahead: Duration
    /// The most rows to claim now (the instance's free delivery capacity).
    public var limit: Int
    /// The most rows one receiver may have in delivery at this instance at once.
    public var perReceiver: Int
    /// Rows this instance is delivering now, by receiver id (they count against ``perReceiver``).
    public var busy: [Int64: Int]
    /// The ids of the rows this instance is delivering now: never claimed again by it, even when the claim expired
    /// (an attempt that outlived its claim), so that one instance never sends a row twice at once and its claim's
    /// fencing token cannot come back after `alert outbox retry`.
    public var delivering: Set<Int64>
    /// An expired claim of a row that has had this many attempts becomes a dead letter instead of being claimed again.
    public var maxAttempts: Int
    /// Whose clock times the claim: `now` (the default), or the store's.
    public var clock: OutboxClaimClock

    public init(
        claimant: String, now: Timestamp, claimDuration: Duration, lookahead: Duration, limit: Int, perReceiver: Int, busy: [Int64: Int] = [:],
        maxAttempts: Int, clock: OutboxClaimClock = .claimant, delivering: Set<Int64> = []
    ) {
        self.delivering = delivering
        self.claimant = claimant
        self.now = now
        self.claimDuration = claimDuration
        self.lookahead = lookahead
        self.limit = limit
        self.perReceiver = perReceiver
        self.busy = busy
        self.maxAttempts = maxAttempts
        self.clock = clock
    }

    /// How many more rows `receiver` may take at this instance.
    func room(for receiver: Int64) -> Int { max(0, perReceiver - busy[receiver, default: 0]) }
}

/// Whose clock times a claim: which rows are due, which claims expired (and which of those are dead letters), the send
/// slots, `claimed_until_us` and `last_attempt_at_us`.
public enum OutboxClaimClock: Sendable, Hashable {
    /// The request's `now`: for tests and tools that step time through claims.
    case claimant
    /// The store's own. On PostgreSQL, `clock_timestamp()`: the one clock every instance sharing the database agrees
    /// on, so that an instance whose clock runs ahead can neither take over a claim another instance is still
    /// delivering nor sweep it into a dead letter, and pacing holds across instances whatever their clocks say. The
    /// claimed rows' times are then the store's; each ``ClaimedNotification/slot`` is moved into the claimant's clock
    /// (the offset measured at the claim), because the claimant waits for it on its own clock. SQLite, which one process
    /// owns, uses `now`.
    case store
}

/// Who holds a claim: the fencing token a completion must present.
public struct OutboxClaim: Sendable, Hashable {
    public var claimant: String
    /// `attempts` after the claim raised it.
    public var attempt: Int

    public init(claimant: String, attempt: Int) {
        self.claimant = claimant
        self.attempt = attempt
    }
}

/// A row claimed for delivery, with its receiver and send slot.
public struct ClaimedNotification: Sendable, Hashable {
    public var entry: OutboxEntry
    public var receiver: AlertReceiver
    /// Not before: the receiver's pacing slot for this row, in the claimant's clock.
    public var slot: Timestamp

    public init(entry: OutboxEntry, receiver: AlertReceiver, slot: Timestamp) {
        self.entry = entry
        self.receiver = receiver
        self.slot = slot
    }

    public var claim: OutboxClaim { OutboxClaim(claimant: entry.claimedBy ?? "", attempt: entry.attempts) }
}

/// How a delivery ended.
public enum OutboxCompletion: Sendable, Hashable {
    case delivered(at: Timestamp)
    /// Pending again, due at `at`.
    case retry(at: Timestamp, error: String)
    /// Pending again, due at `at`, and the attempt not counted (`attempts` lowered by one): the receiver asked for time
    /// (a 429 or 503 with `Retry-After`) rather than failed.
    case deferred(at: Timestamp, error: String)
    /// A dead letter: retried only from the CLI.
    case dead(at: Timestamp, error: String)
}

/// `alert outbox retry` of a row that is not dead or pending.
public struct OutboxRetryRefused: Error, Sendable, Hashable, CustomStringConvertible {
    public var id: Int64
    public var state: OutboxState

    public var description: String {
        switch state {
        case .delivering:
            "notification \(id) is being delivered now; wait for the outcome (alert outbox list) and retry it if it ends dead"
        case .delivered:
            "notification \(id) was delivered; nothing to retry"
        case .pending, .dead:
            "notification \(id) cannot be retried"
        }
    }
}

/// The pacing of one receiver: `max_per_minute` sends spaced evenly, `60 s / max_per_minute` apart, across instances.
///
/// A generic cell rate algorithm without burst: `alert_receivers.next_send_at_us` is the earliest time of the next send
/// (its theoretical arrival time). A claim hands out the slots `max(next, now)`, then one interval later each, while
/// they fall before `now + lookahead`, and stores the slot after the last one it used. So a receiver never sees more
/// than `max_per_minute` sends in any minute, however many instances deliver, and a storm waits its turn instead of
/// being dropped.
public struct ReceiverPacing: Sendable, Hashable {
    /// Microseconds between two sends.
    public let interval: Int64

    public init(maxPerMinute: Int) {
        interval = 60_000_000 / Int64(max(1, maxPerMinute))
    }

    /// Up to `count` send slots from `next` (the stored value) at `now`, before `now + lookahead`.
    public func slots(next: Timestamp, now: Timestamp, lookahead: Duration, count: Int) -> [Timestamp] {
        guard count > 0 else { return [] }
        let horizon = now.microseconds + max(1, lookahead.wholeMicroseconds)
        var slot = max(next.microseconds, now.microseconds)
        var slots: [Timestamp] = []
        while slots.count < count, slot < horizon {
            slots.append(Timestamp(microseconds: slot))
            slot += interval
        }
        return slots
    }

    /// The value to store after `slots` were used.
    public func next(after slots: [Timestamp], stored: Timestamp) -> Timestamp {
        guard let last = slots.last else { return stored }
        return Timestamp(microseconds: last.microseconds + interval)
    }
}

/// The payload column: JSON of ``AlertNotification`` with sorted keys, as the engine writes it.
enum OutboxPayload {
    static func encode(_ notification: AlertNotification) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(notification), as: UTF8.self)
    }

    static func decode(_ text: String) throws -> AlertNotification {
        try JSONDecoder().decode(AlertNotification.self, from: Data(text.utf8))
    }
}
