// PLACEHOLDER API — the codec helper replaces the bodies. Signatures are the contract other targets compile against.

/// Caps applied before any allocation when decoding untrusted bytes.
public struct BatchLimits: Sendable, Hashable {
    public var maxReadings: Int
    public var maxSensors: Int
    /// The largest decompressed frame accepted, in bytes.
    public var maxDecompressedBytes: Int

    public init(maxReadings: Int = 100_000, maxSensors: Int = 4_096, maxDecompressedBytes: Int = 32 << 20) {
        self.maxReadings = maxReadings
        self.maxSensors = maxSensors
        self.maxDecompressedBytes = maxDecompressedBytes
    }

    public static let `default` = BatchLimits()
}

/// Why bytes are not a batch. `description` names what was wrong.
public struct BatchDecodingError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Why a batch cannot be encoded (a value that is not finite, a reading whose sensor has no descriptor, ...).
public struct BatchEncodingError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The binary batch format.
public enum BatchCodec {
    public static func encode(_ batch: Batch, compressionLevel: Int32 = 19) throws(BatchEncodingError) -> [UInt8] {
        throw BatchEncodingError("not implemented yet")
    }

    public static func decode(_ bytes: [UInt8], limits: BatchLimits = .default) throws(BatchDecodingError) -> Batch {
        throw BatchDecodingError("not implemented yet")
    }
}

/// The JSON form of a batch.
public enum BatchJSON {
    public static func encode(_ batch: Batch) -> [UInt8] { [] }

    public static func decode(_ bytes: [UInt8], limits: BatchLimits = .default) throws(BatchDecodingError) -> Batch {
        throw BatchDecodingError("not implemented yet")
    }
}

/// Why a compressed body could not be expanded.
public struct CompressionError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    /// The output would exceed the caller's limit (answer 413, not 400).
    public let exceededLimit: Bool
    public init(_ description: String, exceededLimit: Bool = false) {
        self.description = description
        self.exceededLimit = exceededLimit
    }
}

public enum Zstd {
    public static func compress(_ bytes: [UInt8], level: Int32 = 3) -> [UInt8] { bytes }
    public static func decompress(_ bytes: [UInt8], maxOutput: Int) throws(CompressionError) -> [UInt8] { bytes }
}

public enum Gzip {
    public static func compress(_ bytes: [UInt8], level: Int32 = 6) -> [UInt8] { bytes }
    public static func decompress(_ bytes: [UInt8], maxOutput: Int) throws(CompressionError) -> [UInt8] { bytes }
}
