import NIOCore
import PostgresNIO

/// Reads a row's `int8` and `float8` columns in order, straight from their binary cells.
///
/// postgres-nio's `row.decode((Int64, Double?, …).self)` goes through generic code: each cell looks up the metadata of
/// its type at run time. Measured on the range query (one day of one sensor at 1 minute, 1,440 rows of 8 columns),
/// that decoding was 46 % of the client's CPU and metadata lookups a third of it. Reading the eight bytes directly
/// is what that code ends up doing. Any other shape of cell (text format, another type, a wrong length) still goes
/// through postgres-nio's decoding, which converts what it can and says what was wrong otherwise.
struct PostgresCellReader {
    private var cells: PostgresRow.Iterator

    init(_ row: PostgresRow) {
        cells = row.makeIterator()
    }

    /// The next column, which must not be NULL.
    mutating func int64() throws -> Int64 {
        let cell = try next()
        return try Self.binaryInt64(cell) ?? cell.decode(Int64.self)
    }

    /// The next column, nil when NULL.
    mutating func optionalInt64() throws -> Int64? {
        let cell = try next()
        guard cell.bytes != nil else { return nil }
        return try Self.binaryInt64(cell) ?? cell.decode(Int64.self)
    }

    /// The next column, which must not be NULL.
    mutating func double() throws -> Double {
        let cell = try next()
        return try Self.binaryDouble(cell) ?? cell.decode(Double.self)
    }

    /// The next column, nil when NULL.
    mutating func optionalDouble() throws -> Double? {
        let cell = try next()
        guard cell.bytes != nil else { return nil }
        return try Self.binaryDouble(cell) ?? cell.decode(Double.self)
    }

    /// The cell's value when it is a binary `int8`; nil otherwise (postgres-nio decides then).
    private static func binaryInt64(_ cell: PostgresCell) -> Int64? {
        guard cell.format == .binary, cell.dataType == .int8, let bytes = cell.bytes, bytes.readableBytes == 8 else { return nil }
        return bytes.getInteger(at: bytes.readerIndex, endianness: .big, as: Int64.self)
    }

    /// The cell's value when it is a binary `float8`; nil otherwise (postgres-nio decides then).
    private static func binaryDouble(_ cell: PostgresCell) -> Double? {
        guard cell.format == .binary, cell.dataType == .float8, let bytes = cell.bytes, bytes.readableBytes == 8,
            let bits = bytes.getInteger(at: bytes.readerIndex, endianness: .big, as: UInt64.self)
        else { return nil }
        return Double(bitPattern: bits)
    }

    private mutating func next() throws -> PostgresCell {
        guard let cell = cells.next() else { throw IngestStoreError.corrupt("PostgreSQL returned a row with fewer columns than the query selects") }
        return cell
    }
}
