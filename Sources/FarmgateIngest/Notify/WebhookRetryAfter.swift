import FarmgateWire

/// The `Retry-After` of a webhook receiver's 429 or 503, read by ``RetryAfter`` (as the agent reads the ingest's) and
/// bounded: what the wait becomes is decided by ``NotificationDelivery/retryDelay(for:attempt:configuration:)``, never
/// shorter than the backoff, at most ``NotificationDelivery/retryAfterMax``.
enum WebhookRetryAfter {
    /// Longer waits are read as this (a year): the delivery caps the wait far below it, and no arithmetic on a
    /// receiver's `Retry-After: 99999999999999999999` can overflow.
    static let ceiling: Duration = .seconds(366 * 86_400)

    /// How long `value` asks to wait at `now`, at most ``ceiling``; zero for `0` and for a date that is not after `now`;
    /// nil for anything else, which the delivery treats as no `Retry-After`.
    static func delay(_ value: String, now: Timestamp) -> Duration? {
        RetryAfter.delay(value, now: now).map { min($0, ceiling) }
    }
}
