/// Why one delivery attempt did not reach its receiver, and whether trying again can help.
public struct DeliveryFailure: Error, Sendable, Hashable, CustomStringConvertible {
    /// What happened, for `last_error` and the log: `HTTP 503 from https://...: <start of the body>`, `timed out after 15s`.
    public var message: String
    /// False when the receiver refused the notification for a reason a retry cannot change (a 4xx other than 408/425/429,
    /// an SMTP 5xx, a refused login, no STARTTLS): it becomes a dead letter at once, to be retried from the CLI after
    /// the receiver or its settings are fixed.
    public var retryable: Bool
    /// The receiver's `Retry-After`, obeyed (up to `backoff_max`) instead of the backoff.
    public var retryAfter: Duration?

    public init(_ message: String, retryable: Bool, retryAfter: Duration? = nil) {
        self.message = message
        self.retryable = retryable
        self.retryAfter = retryAfter
    }

    public var description: String { message }
}
