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
    /// Readings this uploader moved to quarantine since start: rejected in a receipt, isolated by bisection while the rest
    /// of their batch was accepted, or impossible to encode.
    public var quarantinedTotal: Int64
    /// Set while the queue is held: the ingest refuses whole requests in a way no reading explains (a systematic refusal,
    /// refused credentials, an unsupported media type). Nothing is quarantined; the uploader backs off and tries again,
    /// and the hold clears at the next acknowledged batch.
    public var held: UploadHold?
    /// The body format batches are sent in now: the configured one, or `json` after the ingest refused the binary
    /// format version (see ``formatFallback``).
    public var format: String?
    /// Why ``format`` differs from the configured format; nil while it does not.
    public var formatFallback: String?
    /// The highest sequence number the ingest holds for this device, as it last answered `GET /v1/device`; nil before
    /// it answered or when it holds nothing.
    public var ingestHighestSequence: UInt64?
    /// Readings renumbered since start because the ingest holds other readings under their sequence numbers
    /// (`sequence_conflict`: this site's buffer lost its history).
    public var renumberedTotal: Int64
    /// The binary format versions the ingest said it reads (`accepted_versions` of `GET /v1/device`, [2] when it did not
    /// say); nil before it answered. Calibration events go only to an ingest that reads 3.
    public var ingestAcceptedVersions: [Int]?
    /// Calibration events the ingest counted in a receipt since start (and the buffer deleted); nil before the first.
    public var calibrationsUploadedTotal: Int64?
    /// Calibration events moved to quarantine since start (the ingest refused them for good); nil before the first.
    public var calibrationsQuarantinedTotal: Int64?
    /// How binary batches go: `stateful` (format version 4), or why not (`self-contained: ...`); nil before the first.
    public var frames: String?
    /// 409 `unknown_sensor_table` / `stale_context` answers since start (each followed at once by the same readings).
    public var stateRefusalsTotal: Int64?
    /// Failed upload attempts since start, by the HTTP status of the answer (`"503"`), or else by why the attempt failed
    /// without one (``UploadFailureCause``: `"connection"` when no answer came). The metrics file counts the latter under
    /// `status="none"`. An agent before this version counted them all as `"none"`.
    public var failuresTotal: [String: Int64]?

    public init(
        endpoint: String, lastAttemptAt: Timestamp? = nil, lastSuccessAt: Timestamp? = nil, lastResult: String? = nil,
        lastHTTPStatus: Int? = nil, consecutiveFailures: Int = 0, nextAttemptAt: Timestamp? = nil, currentBackoffSeconds: Double = 0,
        requestsTotal: Int64 = 0, uploadedTotal: Int64 = 0, duplicatesTotal: Int64 = 0, rejectedTotal: Int64 = 0, quarantinedTotal: Int64 = 0,
        held: UploadHold? = nil, format: String? = nil, formatFallback: String? = nil, ingestHighestSequence: UInt64? = nil,
        renumberedTotal: Int64 = 0
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
        self.held = held
        self.format = format
        self.formatFallback = formatFallback
        self.ingestHighestSequence = ingestHighestSequence
        self.renumberedTotal = renumberedTotal
    }
}

extension UploadStatus {
    /// Takes the totals of `previous`, the status of the uploader this one replaces, and its last attempt and success
    /// when both send to the same endpoint (a new one has not answered yet).
    mutating func carryTotals(from previous: UploadStatus) {
        if previous.endpoint == endpoint {
            lastAttemptAt = previous.lastAttemptAt
            lastSuccessAt = previous.lastSuccessAt
            // Failures since the last success go on counting (a new endpoint starts afresh).
            consecutiveFailures = previous.consecutiveFailures
            lastResult = previous.lastResult
            lastHTTPStatus = previous.lastHTTPStatus
        }
        requestsTotal = previous.requestsTotal
        uploadedTotal = previous.uploadedTotal
        duplicatesTotal = previous.duplicatesTotal
        rejectedTotal = previous.rejectedTotal
        quarantinedTotal = previous.quarantinedTotal
        renumberedTotal = previous.renumberedTotal
        calibrationsUploadedTotal = previous.calibrationsUploadedTotal
        calibrationsQuarantinedTotal = previous.calibrationsQuarantinedTotal
        stateRefusalsTotal = previous.stateRefusalsTotal
        failuresTotal = previous.failuresTotal
    }
}

/// What ``UploadStatus/failuresTotal`` counts a failed attempt under when the ingest's answer gave it no HTTP status.
public enum UploadFailureCause: String, Sendable, CaseIterable {
    /// No answer: the connection failed (refused, timed out, TLS, DNS, cut before the answer).
    case connection
    /// The buffer failed a write the attempt needed (making readings final before sending, renumbering them).
    case buffer
    /// Readings the ingest refused as `sequence_conflict` could not be renumbered (yet).
    case sequenceConflict = "sequence_conflict"
}

/// Why the upload queue is held (``UploadStatus/held``).
public struct UploadHold: Codable, Sendable, Hashable {
    /// The HTTP status of the refusal.
    public var httpStatus: Int
    /// The ingest's stable error code (``IngestErrorCode``), or `http_<status>` when its answer had none.
    public var code: String
    /// The ingest's message, for a person.
    public var message: String
    /// Why the uploader treats the refusal as systematic rather than caused by a reading, in words.
    public var reason: String
    /// When the hold began (the first refusal of this kind in a row).
    public var since: Timestamp
    /// Refusals of this kind in a row.
    public var refusals: Int

    public init(httpStatus: Int, code: String, message: String, reason: String, since: Timestamp, refusals: Int = 1) {
        self.httpStatus = httpStatus
        self.code = code
        self.message = message
        self.reason = reason
        self.since = since
        self.refusals = refusals
    }
}
