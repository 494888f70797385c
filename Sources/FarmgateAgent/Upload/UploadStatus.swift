import FarmgateWire

/// What the uploader has been doing, for `farmgate status` and the control socket.
public struct UploadStatus: Codable, Sendable, Hashable {
    /// Where batches go.
    public var endpoint: String
    /// When the last request started.
    public var lastAttemptAt: Timestamp?
    /// When the ingest last acknowledged a batch (HTTP 200 with a receipt).
    public var lastSuccessAt: Timestamp?
    /// The outcome of the last request in words: `200: 1000 accepted, 0 duplicates, 0 rejected`, `connection refused`,
    /// `503: ...; retrying after 30 s`.
    public var lastResult: String?
    /// The HTTP status of the last answer; nil when the last request got none.
    public var lastHTTPStatus: Int?
    /// Failed attempts since the last success.
    public var consecutiveFailures: Int
    /// When the next attempt is due after a failure; nil while nothing is waiting.
    public var nextAttemptAt: Timestamp?
    /// The wait before ``nextAttemptAt``, in seconds; 0 while not backing off.
    public var currentBackoffSeconds: Double
    /// Requests sent since start.
    public var requestsTotal: Int64
    /// Readings the ingest stored for the first time, since start.
    public var uploadedTotal: Int64
    /// Readings the ingest already had, since start.
    public var duplicatesTotal: Int64
    /// Readings the ingest rejected one by one in its receipts, since start.
    public var rejectedTotal: Int64
    /// Readings this uploader moved to quarantine since start: rejected in a receipt, refused alone in a poison batch, or
    /// impossible to encode.
    public var quarantinedTotal: Int64

    public init(
        endpoint: String, lastAttemptAt: Timestamp? = nil, lastSuccessAt: Timestamp? = nil, lastResult: String? = nil,
        lastHTTPStatus: Int? = nil, consecutiveFailures: Int = 0, nextAttemptAt: Timestamp? = nil, currentBackoffSeconds: Double = 0,
        requestsTotal: Int64 = 0, uploadedTotal: Int64 = 0, duplicatesTotal: Int64 = 0, rejectedTotal: Int64 = 0, quarantinedTotal: Int64 = 0
    ) {
        self.endpoint = endpoint
        self.lastAttemptAt = lastAttemptAt
        self.lastSuccessAt = lastSuccessAt
        self.lastResult = lastResult
        self.lastHTTPStatus = lastHTTPStatus
        self.consecutiveFailures = consecutiveFailures
        self.nextAttemptAt = nextAttemptAt
        self.currentBackoffSeconds = currentBackoffSeconds
        self.requestsTotal = requestsTotal
        self.uploadedTotal = uploadedTotal
        self.duplicatesTotal = duplicatesTotal
        self.rejectedTotal = rejectedTotal
        self.quarantinedTotal = quarantinedTotal
    }
}
