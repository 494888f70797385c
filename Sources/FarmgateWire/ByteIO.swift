// Little building blocks of the binary codec: an appending writer and a bounds-checked reader of LEB128 varints.

/// Maps a signed integer to an unsigned one so that small magnitudes get small codes: 0, -1, 1, -2 → 0, 1, 2, 3.
@inline(__always)
func zigzag(_ value: Int64) -> UInt64 {
    UInt64(bitPattern: (value &<< 1) ^ (value &>> 63))
}

/// The inverse of ``zigzag(_:)``; total on every input.
@inline(__always)
func unzigzag(_ value: UInt64) -> Int64 {
    Int64(bitPattern: (value &>> 1) ^ (0 &- (value & 1)))
}

/// Appends bytes and varints to a growing array.
struct ByteWriter {
    private(set) var bytes: [UInt8] = []

    init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    mutating func byte(_ value: UInt8) { bytes.append(value) }

    mutating func bytes(_ values: some Sequence<UInt8>) { bytes.append(contentsOf: values) }

    /// Unsigned LEB128: seven bits per byte, low group first, high bit set on every byte but the last.
    mutating func uvarint(_ value: UInt64) {
        var rest = value
        while rest >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: rest) | 0x80)
            rest >>= 7
        }
        bytes.append(UInt8(truncatingIfNeeded: rest))
    }

    mutating func uvarint(_ value: Int) { uvarint(UInt64(truncatingIfNeeded: value)) }

    /// A signed integer, zigzag-mapped then written as an unsigned varint.
    mutating func svarint(_ value: Int64) { uvarint(zigzag(value)) }

    mutating func append(_ other: ByteWriter) { bytes.append(contentsOf: other.bytes) }
}

/// Reads what ``ByteWriter`` wrote, never past the end: every read either succeeds or throws a ``BatchDecodingError``
/// that says what was being read.
struct ByteReader {
    private let bytes: [UInt8]
    private(set) var offset: Int

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
        self.offset = 0
    }

    var remaining: Int { bytes.count - offset }

    /// The bytes read since `start` (an earlier ``offset``).
    func consumed(from start: Int) -> ArraySlice<UInt8> { bytes[start..<offset] }

    /// The bytes not read yet.
    var rest: [UInt8] { Array(bytes[offset...]) }
    var isAtEnd: Bool { offset >= bytes.count }

    mutating func byte(_ what: @autoclosure () -> String) throws(BatchDecodingError) -> UInt8 {
        guard offset < bytes.count else { throw BatchDecodingError("\(what()): the frame ends early", kind: .truncated) }
        defer { offset += 1 }
        return bytes[offset]
    }

    mutating func bytes(count: Int, _ what: @autoclosure () -> String) throws(BatchDecodingError) -> ArraySlice<UInt8> {
        guard count >= 0, count <= remaining else {
            throw BatchDecodingError("\(what()): needs \(count) bytes but only \(remaining) remain", kind: count >= 0 ? .truncated : .malformed)
        }
        defer { offset += count }
        return bytes[offset..<(offset + count)]
    }

    mutating func uvarint(_ what: @autoclosure () -> String) throws(BatchDecodingError) -> UInt64 {
        var result: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard offset < bytes.count else { throw BatchDecodingError("\(what()): the frame ends inside a number", kind: .truncated) }
            let b = bytes[offset]
            offset += 1
            if shift == 63 && b > 1 { throw BatchDecodingError("\(what()): number does not fit in 64 bits") }
            result |= UInt64(b & 0x7F) &<< shift
            if b < 0x80 { return result }
            shift += 7
            if shift > 63 { throw BatchDecodingError("\(what()): number does not fit in 64 bits") }
        }
    }

    mutating func svarint(_ what: @autoclosure () -> String) throws(BatchDecodingError) -> Int64 {
        unzigzag(try uvarint(what()))
    }

    /// An unsigned varint that must not exceed `limit`; the error names both.
    mutating func count(_ what: @autoclosure () -> String, limit: Int) throws(BatchDecodingError) -> Int {
        let value = try uvarint(what())
        guard value <= UInt64(max(limit, 0)) else {
            throw BatchDecodingError("\(what()) is \(value), more than the limit of \(limit)")
        }
        return Int(value)
    }
}
