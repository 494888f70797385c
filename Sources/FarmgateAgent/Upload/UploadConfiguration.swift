import FarmgateWire

/// How the ``Uploader`` reaches the ingest and cuts batches. Every default is documented on its property.
public struct UploadConfiguration: Sendable, Hashable {
    /// The body format of a batch.
    public enum Format: String, Sendable, Hashable, Codable {
        /// ``BatchCodec``: columnar, delta-coded, zstd-compressed (`application/vnd.farmgate.batch`).
        case binary
        /// ``BatchJSON`` (`application/json`): larger, readable, for debugging; every ingest reads it.
        case json

        /// The `Content-Type` of a batch in this format.
        public var mediaType: String {
            switch self {
            case .binary: IngestProtocol.binaryBatchMediaType
            case .json: IngestProtocol.jsonBatchMediaType
            }
        }
    }

    /// The ingest's base URL, e.g. `https://ingest.example.net`. Required. Batches go to this plus
    /// ``IngestProtocol/batchesPath``.
    public var endpoint: String
    /// The device key (`fgd_...`) sent as `Authorization: Bearer`. Required.
    public var deviceKey: String
    /// A PEM file of CA certificates to trust instead of the system CAs. Default nil: the system CAs.
    public var caFile: String?
    /// The batch format. Default ``Format/binary``.
    public var format: Format
    /// The most readings in one batch. Default 1000. A full batch is sent as soon as it is pending.
    public var batchMaxReadings: Int
    /// The most readings in one batch from the oldest end of a backlog, while more than ``batchMaxReadings`` are pending
    /// (after an outage). A request's fixed costs (a commit at the ingest, headers, the sensor table) are shared by more
    /// readings, so a backlog drains faster and costs fewer bytes; live batches, from the newest end, keep
    /// ``batchMaxReadings``. Default 5000, or ``batchMaxReadings`` when that is more; never less than it.
    public var backlogBatchMaxReadings: Int
    /// The default of ``backlogBatchMaxReadings`` (measured: 1000 → 5000 readings per backlog request drained a local
    /// backlog about 1.4 times as fast).
    public static let defaultBacklogBatchMaxReadings = 5000
    /// The largest encoded batch, in bytes. Default 256 KiB. A batch that encodes larger is halved (by reading count)
    /// until it fits; a single reading is sent whatever its size.
    public var batchMaxBytes: Int
    /// A partial batch is sent once its oldest reading is this old (by the reading's timestamp, or by how long the
    /// uploader has seen it pending, whichever is more: a wrong clock does not hold readings back). Default 20 s: a
    /// reading reaches the ingest within about 21 s, and a 60-sensor site at 10 s sends about 120 readings per request,
    /// a few bytes per reading on the wire (see the README's metered-link table; 5 s costs about 1.6 times as much).
    public var batchMaxAge: Duration
    /// The longest time to establish a connection, TLS handshake included. Default 10 s.
    public var connectTimeout: Duration
    /// The longest time one upload request may take. Default 30 s.
    public var requestTimeout: Duration
    /// A request whose transfer stalls (under 1 byte/s) this long is abandoned before ``requestTimeout``. Default 20 s.
    public var stallTimeout: Duration
    /// The ceiling of the first backoff wait after a failure. Default 1 s.
    public var backoffInitial: Duration
    /// The largest wait between attempts, also the cap on a `Retry-After`, and the wait after a credentials error. Default 5 min.
    public var backoffMax: Duration
    /// The longest `Retry-After` obeyed; a longer one (a misconfigured ingest asking for days) waits this long. It is
    /// deliberately independent of ``backoffMax``: the ingest knows its load better than the agent does. Default 1 h.
    public var retryAfterMax: Duration
    /// On graceful shutdown, committed readings still pending are sent for at most this long (unless the ingest is
    /// failing), so a clean stop leaves nothing behind. Zero turns the final flush off. Default 10 s.
    public var shutdownFlushTimeout: Duration
    /// How often the buffer is looked at while there is nothing to send. Default 500 ms.
    public var pollInterval: Duration
    /// How often the uploader asks `GET /v1/device` again while all is well, besides at start, after a
    /// `sequence_conflict` and after a 415 `unsupported_format_version`: an ingest upgraded meanwhile (format version 3,
    /// calibration events) is noticed without restarting the agent. Default 10 min.
    public var deviceCheckInterval: Duration
    /// Whether the proxy environment variables (`https_proxy`, `http_proxy`, `no_proxy`, ...) apply, as they do for `curl`.
    /// Default true.
    public var useProxyEnvironment: Bool
    /// Whether binary batches go as stateful frames (format version 4: the sensor table sent once, then named by its
    /// hash; values and timestamps predicted from the newest readings the ingest holds) when the ingest says it reads
    /// them (`GET /v1/device`). Default true; false sends self-contained version 2/3 frames.
    public var stateful: Bool

    public init(
        endpoint: String,
        deviceKey: String,
        caFile: String? = nil,
        format: Format = .binary,
        batchMaxReadings: Int = 1000,
        backlogBatchMaxReadings: Int? = nil,
        batchMaxBytes: Int = 256 << 10,
        batchMaxAge: Duration = .seconds(20),
        connectTimeout: Duration = .seconds(10),
        requestTimeout: Duration = .seconds(30),
        stallTimeout: Duration = .seconds(20),
        backoffInitial: Duration = .seconds(1),
        backoffMax: Duration = .seconds(300),
        retryAfterMax: Duration = .seconds(3600),
        shutdownFlushTimeout: Duration = .seconds(10),
        pollInterval: Duration = .milliseconds(500),
        useProxyEnvironment: Bool = true,
        deviceCheckInterval: Duration = .seconds(600),
        stateful: Bool = true
    ) {
        self.endpoint = endpoint
        self.deviceKey = deviceKey
        self.caFile = caFile
        self.format = format
        self.batchMaxReadings = batchMaxReadings
        self.backlogBatchMaxReadings = max(backlogBatchMaxReadings ?? Self.defaultBacklogBatchMaxReadings, batchMaxReadings)
        self.batchMaxBytes = batchMaxBytes
        self.batchMaxAge = batchMaxAge
        self.connectTimeout = connectTimeout
        self.requestTimeout = requestTimeout
        self.stallTimeout = stallTimeout
        self.backoffInitial = backoffInitial
        self.backoffMax = backoffMax
        self.retryAfterMax = retryAfterMax
        self.shutdownFlushTimeout = shutdownFlushTimeout
        self.pollInterval = pollInterval
        self.useProxyEnvironment = useProxyEnvironment
        self.deviceCheckInterval = deviceCheckInterval
        self.stateful = stateful
    }


    /// Where batches are posted: ``endpoint`` without trailing slashes, plus ``IngestProtocol/batchesPath``.
    public var batchesURL: String { baseURL + IngestProtocol.batchesPath }

    /// Where the uploader asks which sequence numbers the ingest holds for this device: ``endpoint`` without trailing
    /// slashes, plus ``IngestProtocol/deviceStatePath``.
    public var deviceStateURL: String { baseURL + IngestProtocol.deviceStatePath }

    private var baseURL: String {
        var base = Substring(endpoint)
        while base.hasSuffix("/") { base = base.dropLast() }
        return String(base)
    }

    /// The media type of ``format``.
    public var contentType: String { format.mediaType }

    /// The HTTP client settings these values imply.
    public var httpClientConfiguration: HTTPClient.Configuration {
        HTTPClient.Configuration(
            connectTimeout: connectTimeout, requestTimeout: requestTimeout, caFile: caFile, lowSpeedLimit: 1, lowSpeedTime: stallTimeout,
            maxResponseBytes: 1 << 20, useProxyEnvironment: useProxyEnvironment, userAgent: "farmgate")
    }
}
