/// `[notify]`: how this instance delivers the notification outbox (receivers themselves live in the store, managed with
/// `farmgate-ingest alert receiver`).
///
/// ```toml
/// [notify]
/// enabled = true                # default true: this instance runs delivery workers
/// external_url = "https://ingest.example.net"   # default none: Alertmanager's externalURL, and the base of generatorURL
/// max_attempts = 12             # default 12: attempts before a notification becomes a dead letter
/// backoff_initial = "10s"       # default 10 s: the wait after the first failure, doubled after each (with jitter)
/// backoff_max = "10m"           # default 10 minutes
/// request_timeout = "15s"       # default 15 s: one webhook exchange or SMTP conversation, connecting to the last byte
/// connect_timeout = "5s"        # default 5 s
/// claim_timeout = "60s"         # default 60 s past the send slot: then another instance may retry a claimed row
/// per_receiver = 2              # default 2 deliveries in flight per receiver and instance
/// max_in_flight = 32            # default 32 deliveries in flight per instance
/// poll_interval = "1s"          # default 1 s: how often due rows are looked for
/// ca_file = "/etc/farmgate/receivers-ca.pem"   # default the system CAs: for https webhooks and SMTP TLS
/// ```
public struct NotifyConfiguration: Sendable, Hashable {
    /// Whether `serve` runs delivery workers. Default true. Several instances may all deliver: claims are exclusive.
    public var enabled: Bool
    /// The ingest's public base URL, sent as Alertmanager's `externalURL` and used for `generatorURL`. Default "".
    public var externalURL: String
    /// Attempts before a notification becomes a dead letter (`alert outbox list --state dead`). Default 12 (with the
    /// default backoff about an hour of retrying). A webhook receiver's request for time (429 or 503 with
    /// `Retry-After`) is not counted for ``NotificationDelivery/deferralLimit`` after the notification was written.
    public var maxAttempts: Int
    /// The wait after the first failed attempt; doubled after each, capped at ``backoffMax``, each wait drawn between
    /// half and all of it (jitter) so that many notifications to one receiver that came back do not retry together.
    /// Default 10 s. A `Retry-After` from a webhook (429, 503) is obeyed instead when it is longer, up to
    /// ``NotificationDelivery/retryAfterMax`` (an hour), however short ``backoffMax`` is.
    public var backoffInitial: Duration
    /// Default 10 minutes.
    public var backoffMax: Duration
    /// The longest one delivery may take: a webhook request with its whole response, body included, or a whole SMTP
    /// conversation. Default 15 s.
    public var requestTimeout: Duration
    /// The longest time to connect (TLS included). Default 5 s.
    public var connectTimeout: Duration
    /// How long a claimed row stays this instance's past its send slot. An instance killed in the middle of a delivery
    /// leaves its claim; after this time another instance (or this one restarted) delivers it again with the same
    /// idempotency key. Must exceed ``requestTimeout`` so that a live delivery is never taken over. Default 60 s.
    public var claimTimeout: Duration
    /// Deliveries to one receiver in flight at once per instance: a slow receiver holds only these. Default 2.
    public var perReceiver: Int
    /// Deliveries in flight at once per instance. Default 32.
    public var maxInFlight: Int
    /// How often the outbox is looked at for due rows (also right after a delivery finishes). Default 1 s.
    public var pollInterval: Duration
    /// A PEM file of CA certificates trusted for https webhooks and SMTP TLS instead of the system's. Default nil.
    public var caFile: String?

    /// Creates the section; every parameter defaults as documented on its property.
    public init(
        enabled: Bool = true, externalURL: String = "", maxAttempts: Int = 12, backoffInitial: Duration = .seconds(10),
        backoffMax: Duration = .seconds(600), requestTimeout: Duration = .seconds(15), connectTimeout: Duration = .seconds(5),
        claimTimeout: Duration = .seconds(60), perReceiver: Int = 2, maxInFlight: Int = 32, pollInterval: Duration = .seconds(1),
        caFile: String? = nil
    ) {
        self.enabled = enabled
        self.externalURL = externalURL
        self.maxAttempts = maxAttempts
        self.backoffInitial = backoffInitial
        self.backoffMax = backoffMax
        self.requestTimeout = requestTimeout
        self.connectTimeout = connectTimeout
        self.claimTimeout = claimTimeout
        self.perReceiver = perReceiver
        self.maxInFlight = maxInFlight
        self.pollInterval = pollInterval
        self.caFile = caFile
    }
}
