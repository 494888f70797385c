/// Why one delivery attempt did not reach its receiver, and whether trying again can help.
public struct DeliveryFailure: Error, Sendable, Hashable, CustomStringConvertible {
    /// What happened, for `last_error` and the log: `HTTP 503 from https://...: <start of the body>`, `timed out after 15s`.
    public var message: String
    /// False when the receiver refused the notification for a reason a retry cannot change (a 3xx, a 4xx other than
    /// 408/425/429, an SMTP 5xx, a refused login, no STARTTLS, a certificate that does not verify): it becomes a dead
    /// letter at once, to be retried from the CLI after the receiver or its settings are fixed.
    public var retryable: Bool
    /// How long a webhook receiver asked to wait, from the `Retry-After` of its 429 or 503 (nil without one, or when
    /// it is neither delta-seconds nor an HTTP-date). The wait is never shorter than the backoff and at most
    /// ``NotificationDelivery/retryAfterMax`` (``NotificationDelivery/retryDelay(for:attempt:configuration:)``).
    public var retryAfter: Duration?
    /// The recipients of an e-mail that its server took the message for before or during this attempt (the row's
    /// ``OutboxEntry/reached`` with this attempt's added): stored with the outcome, so that a retry sends only to the
    /// others. Empty for a webhook.
    public var reached: [String]

    public init(_ message: String, retryable: Bool, retryAfter: Duration? = nil, reached: [String] = []) {
        self.message = message
        self.retryable = retryable
        self.retryAfter = retryAfter
        self.reached = reached
    }

    /// Whether the receiver asked for time rather than failed: a 429 or 503 whose `Retry-After` asks for a wait. Such an
    /// attempt does not count toward `max_attempts` (see ``NotificationDelivery/deferralLimit``), so a receiver that
    /// says "later" during a long maintenance never turns notifications into dead letters by saying it.
    public var asksForTime: Bool { retryable && (retryAfter ?? .zero) > .zero }

    public var description: String { message }
}
