/// Caps applied before any allocation when decoding untrusted bytes.
public struct BatchLimits: Sendable, Hashable {
    /// The most readings one batch may hold.
    public var maxReadings: Int
    /// The most sensor descriptors one batch may hold.
    public var maxSensors: Int
    /// The largest decompressed frame accepted, in bytes (and the largest JSON document).
    public var maxDecompressedBytes: Int

    /// - Parameters:
    ///   - maxReadings: default 100 000.
    ///   - maxSensors: default 4 096.
    ///   - maxDecompressedBytes: default 32 MiB.
    public init(maxReadings: Int = 100_000, maxSensors: Int = 4_096, maxDecompressedBytes: Int = 32 << 20) {
        self.maxReadings = maxReadings
        self.maxSensors = maxSensors
        self.maxDecompressedBytes = maxDecompressedBytes
    }

    /// The limits the ingest applies unless configured otherwise.
    public static let `default` = BatchLimits()
}

/// Why bytes are not a batch. `description` names what was wrong; ``kind`` says what the sender can do about it.
public struct BatchDecodingError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of problem it is: the ingest answers each with its own stable code, because the agent acts on each
    /// differently (retry, fall back to another format, or split the batch).
    public enum Kind: Hashable, Sendable {
        /// The bytes are complete but not a batch: a bug in the sender. The same bytes will never be accepted.
        case malformed
        /// The input ends early (a frame, a zstd stream or JSON text cut short): transient, most likely a connection or
        /// proxy that cut the body; the same batch sent again may be accepted.
        case truncated
        /// A binary frame of a format version this decoder does not read (the sender is newer); the version found.
        case unsupportedVersion(UInt8)
        /// More readings than ``BatchLimits/maxReadings``: the batch must be split.
        case tooManyReadings
        /// The body expands beyond ``BatchLimits/maxDecompressedBytes``: the batch must be split.
        case tooLarge
    }

    public let description: String
    public let kind: Kind

    public init(_ description: String, kind: Kind = .malformed) {
        self.description = description
        self.kind = kind
    }
}

/// Why a batch cannot be encoded (a value that is not finite, a reading whose sensor has no descriptor, ...).
public struct BatchEncodingError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The binary batch format (media type ``IngestProtocol/binaryBatchMediaType``).
///
/// Lossless at each sensor's declared resolution: `decode(encode(batch))` holds the same sensors and readings, each value
/// being `resolution.value(ofSteps: resolution.quantize(value))`. The decoded batch is in canonical order: sensors sorted
/// by id, readings sorted by sequence number (the order of a batch carries no meaning).
///
/// ## Frame (format version 2)
/// ```
/// "FGB"  version=2  flags      3 + 1 + 1 bytes; flags bit 0: the body is zstd-compressed, bit 1 (only with bit 0): its
///                               zstd frames lack their 4-byte magic number (libzstd's magicless format)
/// body                          one or more concatenated zstd frames (RFC 8878), which expand to the streams below
/// ```
/// The encoder sets both flags (bit 1 unless libzstd refuses the magicless format) and writes three frames without
/// content size or checksum: the streams up to and including the value refs, the timestamp residuals, the rest. Each
/// frame starts the compressor afresh, so each kind of residual gets its own statistics and entropy tables (blocks of
/// one frame fare worse: later blocks inherit the earlier ones' statistics). The decoder accepts any number of frames.
/// All integers in the body are LEB128 varints; signed ones are zigzag-mapped first. The body is the header followed by
/// streams, each holding one kind of field for every sensor, so that zstd sees homogeneous bytes. The name table lists
/// the sensors in one order (the encoder uses natural id order, "tank2" before "tank10", which front-codes well); the
/// frame order stream then places each of them in the order of the per-sensor streams. The encoder picks whichever of
/// natural order and time order (by first timestamp, sensors without readings last) costs fewer bits: time order makes
/// first timestamps predictable and puts readings committed in time order in rank order. The decoder accepts any
/// permutation and returns sensors sorted by id.
/// ```
/// header     device id (length, bytes), sensor count S, reading count N, base sequence (the smallest),
///            base timestamp (the smallest, signed µs), timestamp unit u (the GCD of every timestamp minus the base),
///            layout byte (bit 0: every sequence is its rank, so no sequence stream follows), anchor lag L (≤ S)
/// quantity   S quantity codes, in table order
/// names      S (shared-prefix length, suffix length) pairs, then the suffix bytes (ids front-coded in table order)
/// resolution S entries in table order: 0 for the quantity's default, else numerator and denominator
/// frame order  S signed entries: each table entry's frame position p minus (p' + 1), p' being the previous entry's
///            position (−1 before the first); all 0 when the frame keeps table order. Every later stream is in frame order
/// flags      runs over all N readings, column after column: the number of runs, then (flags, run length) pairs
/// counts     S reading counts, each minus the previous sensor's (summing to N)
/// modes      one byte per sensor with ≥ 2 readings: bit 0 timestamps in delta mode (else grid), bit 1 values in delta
///            mode (else reference), bit 2 sequence errors in delta mode (else reference; 0 when bit 0 of the layout is set)
/// ts periods P in units of u, minus the previous such sensor's P (sensors with ≥ 2 readings)
/// value units    g, the GCD of the sensor's value differences in steps (0 when all values are equal: no residuals),
///                written 0 when it equals the previous g of the same quantity and resolution (initially 1), else g + 1
/// ts gaps    per grid-coded sensor: the number of gaps, then (index advance, slots skipped − 1) pairs
/// seq refs   unless the layout says exact: per sensor with readings, its sequence error reference
/// ts anchors A in units of u after the base (sensors with ≥ 1 reading), minus its prediction from the anchors before
///            it: the previous anchor, plus (L > 0) the step between the anchors L and L + 1 places back
/// value ref remainders  per sensor with ≥ 1 reading whose reference unit U is above 1: (R − R') mod U, in 0..<U
/// value refs     per sensor with ≥ 1 reading, signed q = ⌊(R − R') / U⌋, where R is the reference in steps (the median in
///                reference mode, the first value in delta mode, the value of a single reading), R' the R of the previous
///                sensor with the same quantity and resolution (0 if none), and U the GCD of both sensors' g (g = 0 for
///                a single reading), or 1 if that is 0; so R = R' + U·q + remainder
/// ts residuals   r per reading (grid: t = A + slot·P + r, every reading; delta: t = t' + P + r, all but the first)
/// value residuals  (reference: v = R + g·r; delta: v = v' + g·r)
/// seq residuals  unless exact: per sensor, the error's residuals against its reference or its previous error
/// ```
/// Each sensor's readings are ordered by timestamp, then sequence. A sequence is predicted as the base sequence plus the
/// reading's rank among all the batch's readings ordered by (timestamp, sensor in frame order, position); readings
/// committed in the order they were stamped, as the agent commits them, match it exactly and cost one layout bit.
/// The decoder checks every count against ``BatchLimits`` and the bytes left before it allocates, and never trusts a
/// size it cannot verify.
public enum BatchCodec {
    static let magic: [UInt8] = [UInt8(ascii: "F"), UInt8(ascii: "G"), UInt8(ascii: "B")]
    /// The format version this build writes and reads.
    public static let formatVersion: UInt8 = 2
    static let flagZstd: UInt8 = 1
    /// Frame flag: the zstd frames of the body lack their magic number.
    static let flagMagicless: UInt8 = 2
    /// Layout bit: every sequence equals the base sequence plus its rank; no sequence streams follow.
    static let layoutSequencesExact: UInt8 = 1

    /// Encodes `batch` into a compressed frame.
    ///
    /// - Parameters:
    ///   - batch: every reading must name a sensor described in `batch.sensors`, and sensor ids must be unique.
    ///   - compressionLevel: the zstd level; 19 makes the smallest frames and costs a few milliseconds per 1000 readings.
    /// - Throws: ``BatchEncodingError`` naming the first reading or sensor that cannot be encoded: a duplicate sensor id,
    ///   a reading whose sensor has no descriptor, a value that is not finite or too large for its resolution.
    public static func encode(_ batch: Batch, compressionLevel: Int32 = 19) throws(BatchEncodingError) -> [UInt8] {
        try encode(batch, compressionLevel: compressionLevel, compressed: true)
    }

    /// Decodes a frame made by ``encode(_:compressionLevel:)``.
    ///
    /// Total: any byte string yields a batch or an error whose description says what was wrong, in time roughly linear
    /// in the input and memory bounded by `limits`.
    /// - Throws: ``BatchDecodingError``.
    public static func decode(_ bytes: [UInt8], limits: BatchLimits = .default) throws(BatchDecodingError) -> Batch {
        try decodeBody(try body(of: bytes, versions: [formatVersion], limits: limits).body, limits: limits)
    }

    /// Checks the frame header and returns the version and the decompressed body.
    /// - Parameter versions: the format versions the caller reads; others are ``BatchDecodingError/Kind/unsupportedVersion(_:)``.
    static func body(of bytes: [UInt8], versions: Set<UInt8>, limits: BatchLimits) throws(BatchDecodingError) -> (version: UInt8, body: [UInt8]) {
        guard bytes.count >= 5 else {
            // A prefix of a header (the empty body included) is a frame cut short; anything else is not a frame at all.
            let cutShort = bytes.elementsEqual(magic.prefix(bytes.count)) || (bytes.count > 3 && Array(bytes[0..<3]) == magic)
            throw BatchDecodingError(
                "the frame is \(bytes.count) bytes long, shorter than its 5-byte header", kind: cutShort ? .truncated : .malformed)
        }
        guard Array(bytes[0..<3]) == magic else {
            throw BatchDecodingError("the frame does not start with \"FGB\": not a Farmgate binary batch")
        }
        guard versions.contains(bytes[3]) else {
            throw BatchDecodingError(
                "unsupported format version \(bytes[3]) (this build reads version \(versions.sorted().map(String.init).joined(separator: " and ")))",
                kind: .unsupportedVersion(bytes[3]))
        }
        let flags = bytes[4]
        guard flags & ~(flagZstd | flagMagicless) == 0, flags != flagMagicless else {
            throw BatchDecodingError("unknown flags 0x\(String(flags, radix: 16)) in the frame header")
        }
        let rest = Array(bytes[5...])
        let body: [UInt8]
        if flags & flagZstd != 0 {
            do {
                body = try Zstd.decompress(rest, maxOutput: limits.maxDecompressedBytes, magicless: flags & flagMagicless != 0)
            } catch {
                if error.exceededLimit {
                    throw BatchDecodingError("the body expands beyond the limit of \(limits.maxDecompressedBytes) bytes", kind: .tooLarge)
                }
                throw BatchDecodingError("the body is not valid zstd: \(error.description)", kind: error.truncated ? .truncated : .malformed)
            }
            // A body that ends early after whole zstd frames is .truncated too: the encoder writes several frames, and
            // a cut between two of them leaves every remaining frame valid.
        } else {
            guard rest.count <= limits.maxDecompressedBytes else {
                throw BatchDecodingError("the body is \(rest.count) bytes, more than the limit of \(limits.maxDecompressedBytes)", kind: .tooLarge)
            }
            body = rest
        }
        return (bytes[3], body)
    }
}
