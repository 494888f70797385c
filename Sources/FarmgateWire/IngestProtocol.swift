/// The HTTP contract between `farmgate` and `farmgate-ingest`, shared so that both sides agree by construction.
public enum IngestProtocol {
    /// Where batches are posted.
    public static let batchesPath = "/v1/batches"
    /// `GET` with a device key: what the ingest holds for the calling device (``DeviceState``). The agent asks at start and
    /// after a `sequence_conflict`, so that it never numbers a reading with a sequence the ingest already holds.
    public static let deviceStatePath = "/v1/device"
    /// The media type of a binary batch (see ``BatchCodec``).
    public static let binaryBatchMediaType = "application/vnd.farmgate.batch"
    /// The media type of a JSON batch (see ``BatchJSON``).
    public static let jsonBatchMediaType = "application/json"
    /// The header a device key may be sent in instead of `Authorization: Bearer <key>`: the same key, alone. HTTP/2's
    /// header compression (HPACK) never indexes `Authorization` in libcurl's nghttp2 (it treats it as sensitive), so
    /// the bearer key costs about 62 bytes on every request; this header costs one byte after the first. The agent sends
    /// it to an ingest that lists format version 4 (which reads it); `Authorization` wins when both are present.
    public static let deviceKeyHeader = "Farmgate-Key"
    /// The media type of a compact receipt (``IngestReceipt/compact``): an agent that lists it in `Accept` gets a receipt
    /// without rejections as a few bytes; one with rejections always comes as JSON.
    public static let compactReceiptMediaType = "application/vnd.farmgate.receipt"
}

/// The answer to `GET /v1/device` (``IngestProtocol/deviceStatePath``):
/// `{"device": "site-1", "highest_sequence": 1234}`, `null` when the ingest holds no reading of the device.
public struct DeviceState: Codable, Hashable, Sendable {
    public var device: String
    /// The highest sequence number stored for this device, whatever became of that reading since (retention never lowers it).
    public var highestSequence: UInt64?
    /// The binary format versions this ingest reads (`[2, 3]`: 3 carries calibration events). Absent from an older
    /// ingest, which reads version 2 only (``effectiveAcceptedVersions``): an agent sends events only to an ingest that
    /// lists 3, because an older one would answer a version 3 frame with 415 and skip an unknown JSON member silently.
    public var acceptedVersions: [Int]?

    public init(device: String, highestSequence: UInt64?, acceptedVersions: [Int]? = nil) {
        self.device = device
        self.highestSequence = highestSequence
        self.acceptedVersions = acceptedVersions
    }

    /// The versions the ingest reads; `[2]` when it did not say.
    public var effectiveAcceptedVersions: [Int] { acceptedVersions ?? [2] }

    enum CodingKeys: String, CodingKey {
        case device
        case highestSequence = "highest_sequence"
        case acceptedVersions = "accepted_versions"
    }

    /// Writes `"highest_sequence": null` rather than leaving the member out, as documented.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(device, forKey: .device)
        try container.encode(highestSequence, forKey: .highestSequence)
        try container.encodeIfPresent(acceptedVersions, forKey: .acceptedVersions)
    }
}

/// The stable codes of whole-request errors (``APIErrorBody``). What the agent does with each is part of the delivery
/// contract: a whole-request refusal is never a reason to quarantine a reading by itself.
public enum IngestErrorCode {
    /// 400: the body can be read in full but is not a batch (a bug in the sender, or a codec it does not share).
    public static let malformedBatch = "malformed_batch"
    /// 400: the body ended early or could not be read (a proxy that truncated it, a connection that broke): transient,
    /// the same request may succeed when sent again.
    public static let incompleteBody = "incomplete_body"
    /// 415: a binary batch of a format version this ingest does not read; ``APIErrorBody/Detail/acceptedVersions`` lists
    /// the versions it does. JSON is always accepted.
    public static let unsupportedFormatVersion = "unsupported_format_version"
    /// 415: a Content-Type that is not a batch.
    public static let unsupportedMediaType = "unsupported_media_type"
    /// 415: a Content-Encoding other than identity, gzip or zstd.
    public static let unsupportedEncoding = "unsupported_encoding"
    /// 413: the body is larger than the ingest takes.
    public static let payloadTooLarge = "payload_too_large"
    /// 413: the body expands beyond the ingest's limit.
    public static let decompressedTooLarge = "decompressed_too_large"
    /// 413: more readings in one batch than the ingest takes.
    public static let tooManyReadings = "too_many_readings"
    /// 403: the batch names another device than the key's.
    public static let deviceMismatch = "device_mismatch"
    /// 401: no key, or a key the ingest does not know.
    public static let unauthorized = "unauthorized"
    /// 401: the key's device (or token) was revoked.
    public static let revoked = "revoked"
    /// 409: a stateful frame (format version 4) names a sensor table this ingest does not hold for the device (it was
    /// never declared here, or the store lost it): send the same readings again with the table declared.
    public static let unknownSensorTable = "unknown_sensor_table"
    /// 409: a stateful frame predicts from newest readings other than those this ingest holds for the device
    /// (``APIErrorBody/Detail/context`` lists the ingest's): send the same readings again, without context or against
    /// the ingest's.
    public static let staleContext = "stale_context"
    /// 422: a stateful frame declares a sensor table of more sensors than the ingest allows one device (`[limits]
    /// sensors_per_device`): send self-contained frames (format version 2).
    public static let sensorTableTooLarge = "sensor_table_too_large"
    /// 429: too many requests; `Retry-After` says when to come back.
    public static let rateLimited = "rate_limited"
    /// 503: the store cannot commit now; `Retry-After` says when to come back.
    public static let unavailable = "unavailable"
}

/// The stable codes of readings refused one by one (``RejectionGroup/code``).
public enum RejectionCode {
    /// The value is NaN or infinite.
    public static let notFinite = "not_finite"
    /// The value is outside the physically plausible range of the sensor's quantity.
    public static let outOfRange = "out_of_range"
    /// The timestamp is later than the ingest's clock plus the configured tolerance.
    public static let timestampInFuture = "timestamp_in_future"
    /// The timestamp is before 2000-01-01, which no real reading has.
    public static let timestampImplausible = "timestamp_implausible"
    /// The sensor is registered on this device with another quantity.
    public static let sensorConflict = "sensor_conflict"
    /// The batch has no descriptor for the reading's sensor.
    public static let unknownSensor = "unknown_sensor"
    /// The reading's sensor is not registered and its device already has as many sensors as the ingest allows one
    /// device (`[limits] sensors_per_device`).
    public static let tooManySensors = "too_many_sensors"
    /// The reading's sequence number is missing, not a whole number, or does not fit the store (above 2^63 - 1).
    public static let invalidSequence = "invalid_sequence"
    /// A JSON reading that cannot be represented (a missing member, a value of the wrong type).
    public static let invalidReading = "invalid_reading"
    /// The ingest already holds another reading (other sensor, time, value or flags) under this sequence number: the site
    /// numbered two readings alike (its buffer was lost). Never a duplicate: the agent renumbers the reading above the
    /// ingest's highest sequence (``DeviceState``) and sends it again.
    public static let sequenceConflict = "sequence_conflict"
}

/// One reading refused, as the ingest's validator and store report it before the receipt groups them.
public struct RejectedReading: Codable, Hashable, Sendable {
    /// nil when the reading had no usable sequence number (a JSON reading without `seq`, or with one that is not a whole number).
    public var sequence: UInt64?
    public var sensor: String
    /// A stable machine-readable reason (``RejectionCode``).
    public var code: String
    /// A sentence for a person.
    public var message: String

    public init(sequence: UInt64?, sensor: String, code: String, message: String) {
        self.sequence = sequence
        self.sensor = sensor
        self.code = code
        self.message = message
    }
}

/// A run of consecutive sequence numbers, `first...last`. In JSON a single number, or `[first, last]` for a longer run.
public struct SequenceRun: Codable, Hashable, Sendable {
    public var first: UInt64
    public var last: UInt64

    public init(first: UInt64, last: UInt64) {
        self.first = min(first, last)
        self.last = max(first, last)
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let single = try? container.decode(UInt64.self) {
            self.init(first: single, last: single)
            return
        }
        let pair = try container.decode([UInt64].self)
        guard pair.count == 2 else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "a sequence run is a number or [first, last]")
        }
        self.init(first: pair[0], last: pair[1])
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        if first == last { try container.encode(first) } else { try container.encode([first, last]) }
    }

    /// How many sequences the run holds (saturating).
    public var count: UInt64 { last - first == UInt64.max ? UInt64.max : last - first + 1 }
}

/// Readings refused for the same reason: one code, one sensor, one message, and the sequences it applies to.
///
/// ```json
/// {"code": "timestamp_in_future", "sensor": "tank1.ph", "message": "...", "count": 3, "sequences": [17, [40, 41]]}
/// ```
/// `count` counts every reading of the group, also those without a usable sequence (which ``sequences`` cannot name).
public struct RejectionGroup: Codable, Hashable, Sendable {
    public var code: String
    /// The sensor the readings named, cut to ``IngestReceipt/maxEchoedSensorLength`` characters.
    public var sensor: String
    /// The first refused reading's message (cut to ``IngestReceipt/maxMessageLength``); the others differ at most in values.
    public var message: String
    public var count: Int
    /// Ascending, disjoint runs.
    public var sequences: [SequenceRun]

    public init(code: String, sensor: String, message: String, count: Int, sequences: [SequenceRun]) {
        self.code = code
        self.sensor = sensor
        self.message = message
        self.count = count
        self.sequences = sequences
    }

    /// Whether `sequence` is in one of the runs (binary search: a hostile run can be huge, it is never expanded).
    public func contains(_ sequence: UInt64) -> Bool {
        var low = 0
        var high = sequences.count
        while low < high {
            let middle = (low + high) / 2
            if sequences[middle].last < sequence { low = middle + 1 } else { high = middle }
        }
        return low < sequences.count && sequences[low].first <= sequence && sequence <= sequences[low].last
    }
}

/// The ingest's answer to an accepted upload (HTTP 200), sent only after its durable commit.
///
/// `accepted + duplicates + rejectedCount` equals the number of readings in the batch; an answer whose counts do not
/// add up is not an acknowledgement. Refused readings are grouped by (code, sensor) with their sequences as runs, so
/// that an answer never grows much beyond its request.
public struct IngestReceipt: Codable, Hashable, Sendable {
    /// Readings stored now for the first time.
    public var accepted: Int
    /// Readings whose (device, sequence) was already stored with the same content; they were not stored again.
    public var duplicates: Int
    /// Readings refused one by one, with the reason; the rest of the batch was stored.
    public var rejected: [RejectionGroup]
    /// The calibration events of a version 3 frame: present only when the batch carried some. Every event of a batch
    /// the ingest answered 200 is either stored now or was already stored (an event it cannot take makes the whole
    /// frame `malformed_batch`), so the agent deletes them all; `accepted + duplicates` equals the number sent.
    public var calibrations: CalibrationReceipt?

    /// The longest sensor id a receipt echoes; longer ones are cut (a hostile batch may name a huge one).
    public static let maxEchoedSensorLength = 64
    /// The longest message a receipt carries.
    public static let maxMessageLength = 300

    public init(accepted: Int, duplicates: Int, rejected: [RejectionGroup] = []) {
        self.accepted = accepted
        self.duplicates = duplicates
        self.rejected = rejected
    }

    /// Groups `rejections` by (code, sensor): groups in order of their first appearance, sequences as ascending runs.
    public init(accepted: Int, duplicates: Int, rejections: [RejectedReading]) {
        struct Key: Hashable {
            var code: String
            var sensor: String
        }
        var order: [Key] = []
        var groups: [Key: (message: String, count: Int, sequences: [UInt64])] = [:]
        for rejection in rejections {
            let key = Key(code: rejection.code, sensor: Self.cut(rejection.sensor, to: Self.maxEchoedSensorLength))
            if groups[key] == nil {
                order.append(key)
                groups[key] = (Self.cut(rejection.message, to: Self.maxMessageLength), 0, [])
            }
            groups[key]?.count += 1
            if let sequence = rejection.sequence { groups[key]?.sequences.append(sequence) }
        }
        self.init(
            accepted: accepted, duplicates: duplicates,
            rejected: order.compactMap { key in
                guard let group = groups[key] else { return nil }
                return RejectionGroup(
                    code: key.code, sensor: key.sensor, message: group.message, count: group.count,
                    sequences: Self.runs(group.sequences))
            })
    }

    /// Every refused reading, with or without a sequence.
    public var rejectedCount: Int { rejected.reduce(0) { $0 + max(0, $1.count) } }

    /// The group that refused `sequence`, if any.
    public func rejection(of sequence: UInt64) -> RejectionGroup? {
        rejected.first { $0.contains(sequence) }
    }

    /// Ascending runs of the distinct values of `sequences`.
    static func runs(_ sequences: [UInt64]) -> [SequenceRun] {
        var runs: [SequenceRun] = []
        for sequence in Set(sequences).sorted() {
            if let last = runs.last, last.last != UInt64.max, last.last + 1 == sequence {
                runs[runs.count - 1].last = sequence
            } else {
                runs.append(SequenceRun(first: sequence, last: sequence))
            }
        }
        return runs
    }

    static func cut(_ text: String, to length: Int) -> String {
        text.count <= length ? text : String(text.prefix(length - 1)) + "…"
    }
}

/// The body of every error answer from the ingest: `{"error": {"code": "...", "message": "..."}}`.
public struct APIErrorBody: Codable, Hashable, Sendable {
    public struct Detail: Codable, Hashable, Sendable {
        /// Stable, machine-readable (``IngestErrorCode``).
        public var code: String
        /// For a person: what was wrong and how to fix it.
        public var message: String
        /// With `unsupported_format_version`: the binary format versions this ingest reads.
        public var acceptedVersions: [Int]?
        /// With `stale_context`: the newest reading the ingest holds of each sensor of the frame's table, the context the
        /// sender may predict from instead.
        public var context: [ContextEntryJSON]?

        public init(code: String, message: String, acceptedVersions: [Int]? = nil, context: [ContextEntryJSON]? = nil) {
            self.code = code
            self.message = message
            self.acceptedVersions = acceptedVersions
            self.context = context
        }

        enum CodingKeys: String, CodingKey {
            case code, message, context
            case acceptedVersions = "accepted_versions"
        }
    }
    public var error: Detail

    public init(code: String, message: String, acceptedVersions: [Int]? = nil, context: [ContextEntryJSON]? = nil) {
        self.error = Detail(code: code, message: message, acceptedVersions: acceptedVersions, context: context)
    }
}

/// One context reading in a `stale_context` answer: `{"sensor": "tank1.ph", "seq": 812, "ts_us": 1764590400123000, "value": 6.02}`.
public struct ContextEntryJSON: Codable, Hashable, Sendable {
    public var sensor: String
    public var sequence: UInt64
    public var timestampMicroseconds: Int64
    public var value: Double

    public init(sensor: SensorID, reading: ContextReading) {
        self.sensor = sensor.rawValue
        self.sequence = reading.sequence
        self.timestampMicroseconds = reading.timestamp.microseconds
        self.value = reading.value
    }

    /// The entry as a context reading, nil when its sensor id is not valid.
    public var reading: (sensor: SensorID, reading: ContextReading)? {
        guard let id = try? SensorID(sensor), value.isFinite else { return nil }
        return (id, ContextReading(sequence: sequence, timestamp: Timestamp(microseconds: timestampMicroseconds), value: value))
    }

    enum CodingKeys: String, CodingKey {
        case sensor, value
        case sequence = "seq"
        case timestampMicroseconds = "ts_us"
    }
}

extension IngestReceipt {
    /// The compact form (``IngestProtocol/compactReceiptMediaType``) of a receipt without rejections: accepted and
    /// duplicates as LEB128 varints, then, when the batch carried calibration events, their accepted and duplicates.
    /// Two bytes for a batch of up to 127 readings. nil when the receipt rejects readings (those go as JSON, which names them).
    public var compact: [UInt8]? {
        guard rejected.isEmpty, accepted >= 0, duplicates >= 0 else { return nil }
        var writer = ByteWriter()
        writer.uvarint(accepted)
        writer.uvarint(duplicates)
        if let calibrations {
            guard calibrations.accepted >= 0, calibrations.duplicates >= 0 else { return nil }
            writer.uvarint(calibrations.accepted)
            writer.uvarint(calibrations.duplicates)
        }
        return writer.bytes
    }

    /// Reads the compact form; nil when `bytes` are not one (the caller treats that as an unreadable receipt).
    public init?(compact bytes: [UInt8]) {
        var reader = ByteReader(bytes)
        guard let accepted = try? reader.count("accepted", limit: Int(Int32.max)),
            let duplicates = try? reader.count("duplicates", limit: Int(Int32.max))
        else { return nil }
        self.init(accepted: accepted, duplicates: duplicates)
        if !reader.isAtEnd {
            guard let calibrationsAccepted = try? reader.count("calibrations accepted", limit: Int(Int32.max)),
                let calibrationsDuplicates = try? reader.count("calibrations duplicates", limit: Int(Int32.max))
            else { return nil }
            calibrations = CalibrationReceipt(accepted: calibrationsAccepted, duplicates: calibrationsDuplicates)
        }
        guard reader.isAtEnd else { return nil }
    }
}
