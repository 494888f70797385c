import FarmgateWire

/// How the alert engine's write of a notification merges it into a row the receiver has not been sent yet, on both stores.
///
/// A sensor flapping around a threshold changes state every few readings, and a receiver paced by `max_per_minute`
/// (or busy with other alerts) takes a notification every few seconds at most: one row per transition would queue
/// thousands of stale notifications, delivered one by one long after they mattered. So, in the transaction that
/// records the transition, the engine looks at the receiver's newest row of the alert (`alert_outbox_newest`) and, when
/// that row is ``untouched`` (pending, no attempt, never claimed) and both it and the new notification are live (not
/// late reports), writes the merged notification over it (``AlertNotification/merging(_:)``): the newest state, the
/// counts in ``AlertNotification/Coalesced`` and `alert_outbox.transitions`, `first_transition_at_us` and
/// `coalesced_at_us`. Otherwise it inserts a row, as for the first notification.
///
/// Why this keeps the outbox's guarantees (``NotificationOutboxStore``):
/// - A row a claim has touched is never changed: a claim sets `claimed_by`, raises `attempts` and sets
///   `last_attempt_at_us`, and none of them is ever cleared back together (a deferral lowers `attempts` but keeps
///   `claimed_by`; `alert outbox retry` clears `claimed_by` but keeps `last_attempt_at_us`). So the receiver never gets
///   two bodies under one idempotency key, and a row's key is one the receiver has not seen when its body changes.
/// - Only the newest row of (alert, receiver) is merged into, so a merge never moves a state ahead of an earlier row
///   of the alert that is still waiting; the merged row keeps its place in line (`next_attempt_at_us`). (An earlier row
///   that failed and waits to be retried can still reach the receiver after a newer one, as without merging: the claims
///   order rows by when they are due.)
/// - On PostgreSQL the engine reads the newest row without a lock, then updates it `WHERE` it is still ``untouched``
///   (under READ COMMITTED the `UPDATE` re-checks that on the row's latest version, after waiting for a claim that
///   holds it): a claim that took the row first makes the `UPDATE` match nothing, and the engine inserts a row; a claim
///   that comes while the engine's `UPDATE` holds the row skips it (`SKIP LOCKED`) and takes the merged row at its next
///   round. The engine never waits on a row that cannot be merged into (delivered, dead, being delivered), so it never
///   waits for retention's purge of old delivered rows. Two engines never write the same alert at once: each first
///   updates the alert's row under its version check, which the other waits for, so the payload read is the one the
///   `UPDATE` replaces.
/// - On SQLite the engine's transaction and every claim run on the one writer, one after the other.
///
/// A receiver's grouping (`alert receiver add --group-wait --group-interval`) makes such a wait on purpose, for a
/// receiver that keeps up: a new row is due only after the wait (``due(_:now:grouping:after:)``), and until a claim
/// takes it every change of the alert merges into it as above.
enum OutboxCoalescing {
    /// A receiver's grouping, read with its id in the engine's transaction (`alert_receivers.group_wait_us`,
    /// `group_interval_us`).
    struct Grouping: Sendable {
        var waitMicroseconds: Int64 = 0
        var intervalMicroseconds: Int64 = 0
    }

    /// The receiver's columns the engine's transaction reads by farm and name: its id and its grouping.
    static let receiverRow = "SELECT id, group_wait_us, group_interval_us FROM alert_receivers"

    /// When a new row of `notification` for a receiver is due (its `next_attempt_at_us`), `tail` being the receiver's
    /// newest row of the alert: `group_interval` after that row's last attempt while that is still ahead (the alert was
    /// told lately: its next change waits, as Alertmanager's `group_interval`), else `group_wait` from now (a new
    /// alert, or one quiet for longer, as `group_wait`). Late reports are due at once: they are written once a
    /// backlog went quiet, and never merged.
    static func due(_ notification: AlertNotification, now: Timestamp, grouping: Grouping, after tail: Tail?) -> Timestamp {
        guard notification.isLive else { return now }
        if grouping.intervalMicroseconds > 0, let last = tail?.lastAttemptAt {
            let (next, overflow) = last.addingReportingOverflow(grouping.intervalMicroseconds)
            if !overflow, next > now.microseconds { return Timestamp(microseconds: next) }
        }
        return Timestamp(microseconds: now.microseconds &+ grouping.waitMicroseconds)
    }

    /// The receiver's newest outbox row of an alert, as the engine's transaction reads it.
    struct Tail: Sendable {
        var id: Int64
        var state: String
        var attempts: Int64
        var claimedBy: String?
        var lastAttemptAt: Int64?
        var payload: String
    }

    /// The `WHERE` part (SQLite and PostgreSQL alike) that holds for a row no claim has touched.
    static let untouched = "state = 'pending' AND attempts = 0 AND claimed_by IS NULL AND last_attempt_at_us IS NULL"

    /// The receiver's newest row of an alert (`alert_outbox_newest`); PostgreSQL adds `FOR UPDATE`.
    static let newestRow = "SELECT id, state, attempts, claimed_by, last_attempt_at_us, payload FROM alert_outbox"

    /// What to write over `tail` instead of inserting `notification`, or nil to insert it: when there is no row, the
    /// row was claimed or attempted, either notification is not live, or the stored payload is not one this version
    /// reads (it is then left as it is).
    static func merged(_ notification: AlertNotification, into tail: Tail?) -> AlertNotification? {
        guard let tail, tail.state == OutboxState.pending.rawValue, tail.attempts == 0, tail.claimedBy == nil, tail.lastAttemptAt == nil,
            notification.isLive, let waiting = try? OutboxPayload.decode(tail.payload), waiting.isLive, waiting.alertID == notification.alertID
        else { return nil }
        return waiting.merging(notification)
    }
}

/// Per-alert order at a receiver: a notification is claimed only when no older one of the same alert to the same
/// receiver is still unsent (`pending`, waiting for its first try or a retry, or `delivering`, claimed, possibly by an
/// instance that died and whose claim has not expired). So a receiver never gets an alert's newer state before an older
/// one: after a crash or a failed try the older row goes first, then the newer one, and the receiver ends on the newest
/// state. A dead row does not hold the ones after it. Both stores put this condition, on `alert_outbox o`, in their
/// claims (served by the index `alert_outbox_newest (alert_id, receiver_id, id)`).
enum OutboxOrdering {
    static let noOlderUnsent = """
        NOT EXISTS (SELECT 1 FROM alert_outbox older WHERE older.alert_id = o.alert_id AND older.receiver_id = o.receiver_id
            AND older.id < o.id AND older.state IN ('pending', 'delivering') AND o.alert_id <> 0)
        """
}
