/// The HTTP contract between `farmgate` and `farmgate-ingest`, shared so that both sides agree by construction.
public enum IngestProtocol {
    /// Where batches are posted.
    public static let batchesPath = "/v1/batches"
    /// The media type of a binary batch (see ``BatchCodec``).
    public static let binaryBatchMediaType = "application/vnd.farmgate.batch"
    /// The media type of a JSON batch (see ``BatchJSON``).
    public static let jsonBatchMediaType = "application/json"
}

/// The ingest's answer to an accepted upload (HTTP 200), sent only after its durable commit.
///
/// `accepted + duplicates + rejected.count` equals the number of readings in the batch.
public struct IngestReceipt: Codable, Hashable, Sendable {
    /// Readings stored now for the first time.
    public var accepted: Int
    /// Readings whose (device, sequence) was already stored; they were not stored again.
    public var duplicates: Int
    /// Readings refused one by one, with the reason; the rest of the batch was stored.
    public var rejected: [RejectedReading]

    public init(accepted: Int, duplicates: Int, rejected: [RejectedReading]) {
        self.accepted = accepted
        self.duplicates = duplicates
        self.rejected = rejected
    }
}

/// A reading the ingest will never take, and why.
public struct RejectedReading: Codable, Hashable, Sendable {
    public var sequence: UInt64
    public var sensor: String
    /// A stable machine-readable reason, e.g. `timestamp_in_future`, `not_finite`, `out_of_range`, `unknown_sensor`.
    public var code: String
    /// A sentence for a person.
    public var message: String

    public init(sequence: UInt64, sensor: String, code: String, message: String) {
        self.sequence = sequence
        self.sensor = sensor
        self.code = code
        self.message = message
    }
}

/// The body of every error answer from the ingest: `{"error": {"code": "...", "message": "..."}}`.
public struct APIErrorBody: Codable, Hashable, Sendable {
    public struct Detail: Codable, Hashable, Sendable {
        /// Stable, machine-readable: `unauthorized`, `forbidden`, `malformed_batch`, `payload_too_large`, `rate_limited`, ...
        public var code: String
        /// For a person: what was wrong and how to fix it.
        public var message: String
    }
    public var error: Detail

    public init(code: String, message: String) { self.error = Detail(code: code, message: message) }
}
