import NIOCore
import PostgresNIO

/// An element of a ``PostgresArrayParameter``: a fixed-width binary value.
protocol PostgresFixedWidthElement: Sendable {
    static var elementType: PostgresDataType { get }
    static var arrayType: PostgresDataType { get }
    /// Bytes of one element on the wire.
    static var width: Int { get }
    /// Stores the element, big-endian, at `offset` (unaligned).
    func storeBigEndian(into bytes: UnsafeMutableRawBufferPointer, at offset: Int)
}

/// A one-dimensional array without NULLs, bound as one binary parameter and written in one pass.
///
/// The write statement binds about 40 arrays of several thousand elements per group (``PostgresBatchWriter``), and
/// postgres-nio encodes an array element by element through generic code: in a profile of `farmgate-bench postgres` that
/// was 14 % of the ingest's CPU. The bytes are the same as postgres-nio's (`ndim` 0 or 1, no NULLs, the element's type,
/// the length, lower bound 1, then each element's length and value; `ArrayParameterTests` compares them).
struct PostgresArrayParameter<Element: PostgresFixedWidthElement>: PostgresNonThrowingEncodable {
    var elements: [Element]

    init(_ elements: [Element]) {
        self.elements = elements
    }

    static var psqlType: PostgresDataType { Element.arrayType }
    static var psqlFormat: PostgresFormat { .binary }

    func encode<JSONEncoder: PostgresJSONEncoder>(into buffer: inout ByteBuffer, context: PostgresEncodingContext<JSONEncoder>) {
        buffer.writeInteger(elements.isEmpty ? 0 : 1, as: UInt32.self)
        buffer.writeInteger(0, as: Int32.self)
        buffer.writeInteger(Element.elementType.rawValue)
        guard !elements.isEmpty else { return }
        buffer.writeInteger(Int32(clamping: elements.count))
        buffer.writeInteger(1, as: Int32.self)
        let stride = 4 + Element.width
        let length = UInt32(Element.width).bigEndian
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: elements.count * stride) { bytes in
            var offset = 0
            for element in elements {
                bytes.storeBytes(of: length, toByteOffset: offset, as: UInt32.self)
                element.storeBigEndian(into: bytes, at: offset + 4)
                offset += stride
            }
            return offset
        }
    }
}

extension Array where Element: PostgresFixedWidthElement {
    /// This array as one binary parameter of a query (see ``PostgresArrayParameter``).
    var postgresArray: PostgresArrayParameter<Element> { PostgresArrayParameter(self) }
}

extension Int64: PostgresFixedWidthElement {
    static var elementType: PostgresDataType { .int8 }
    static var arrayType: PostgresDataType { .int8Array }
    static var width: Int { 8 }
    func storeBigEndian(into bytes: UnsafeMutableRawBufferPointer, at offset: Int) {
        bytes.storeBytes(of: bigEndian, toByteOffset: offset, as: Int64.self)
    }
}

extension Int32: PostgresFixedWidthElement {
    static var elementType: PostgresDataType { .int4 }
    static var arrayType: PostgresDataType { .int4Array }
    static var width: Int { 4 }
    func storeBigEndian(into bytes: UnsafeMutableRawBufferPointer, at offset: Int) {
        bytes.storeBytes(of: bigEndian, toByteOffset: offset, as: Int32.self)
    }
}

extension Int16: PostgresFixedWidthElement {
    static var elementType: PostgresDataType { .int2 }
    static var arrayType: PostgresDataType { .int2Array }
    static var width: Int { 2 }
    func storeBigEndian(into bytes: UnsafeMutableRawBufferPointer, at offset: Int) {
        bytes.storeBytes(of: bigEndian, toByteOffset: offset, as: Int16.self)
    }
}

extension Double: PostgresFixedWidthElement {
    static var elementType: PostgresDataType { .float8 }
    static var arrayType: PostgresDataType { .float8Array }
    static var width: Int { 8 }
    func storeBigEndian(into bytes: UnsafeMutableRawBufferPointer, at offset: Int) {
        bytes.storeBytes(of: bitPattern.bigEndian, toByteOffset: offset, as: UInt64.self)
    }
}

extension Bool: PostgresFixedWidthElement {
    static var elementType: PostgresDataType { .bool }
    static var arrayType: PostgresDataType { .boolArray }
    static var width: Int { 1 }
    func storeBigEndian(into bytes: UnsafeMutableRawBufferPointer, at offset: Int) {
        bytes.storeBytes(of: self ? 1 : 0, toByteOffset: offset, as: UInt8.self)
    }
}
