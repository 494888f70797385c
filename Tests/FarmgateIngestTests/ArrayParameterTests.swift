import NIOCore
import PostgresNIO
import Testing

@testable import FarmgateIngest

/// ``PostgresArrayParameter`` writes what postgres-nio's own array encoding writes, byte for byte (the write statement's
/// arrays go to PostgreSQL this way; the store suites check what PostgreSQL makes of them).
@Suite("PostgreSQL array parameters")
struct ArrayParameterTests {
    func bytes(_ value: some PostgresNonThrowingEncodable) -> [UInt8] {
        var buffer = ByteBuffer()
        value.encode(into: &buffer, context: .default)
        return Array(buffer.readableBytesView)
    }

    func same<Element: PostgresFixedWidthElement & PostgresArrayEncodable & PostgresNonThrowingEncodable>(_ elements: [Element]) {
        #expect(PostgresArrayParameter<Element>.psqlType == [Element].psqlType)
        #expect(bytes(elements.postgresArray) == bytes(elements), "\(Element.self) × \(elements.count)")
    }

    @Test("every element type, empty, one element and many, extremes included")
    func matchesPostgresNIO() {
        same([Int64]())
        same([Int64.min, -1, 0, 1, .max])
        same((0..<1000).map { Int64($0) * 7_919 - 3_000_000 })
        same([Int32]())
        same([Int32.min, -2, 0, 3, .max])
        same([Int16.min, -1, 0, 1, .max])
        same([Double]())
        same([0.0, -0.0, 6.02, -1e-300, .greatestFiniteMagnitude, .infinity, -.infinity, 1412.5])
        same([true, false, false, true])
        same([false])
    }
}
