import PropertyBased
import Testing

@testable import FarmgateWire

@Suite("Bounded zstd and gzip")
struct CompressionTests {
    @Test("zstd and gzip round-trip random bytes")
    func roundTrips() async {
        await propertyCheck(count: 100, input: Gen.uint8(in: 0...255).array(of: 0...5000)) { bytes throws in
            #expect(try Zstd.decompress(Zstd.compress(bytes, level: 3), maxOutput: bytes.count) == bytes)
            #expect(try Gzip.decompress(Gzip.compress(bytes), maxOutput: bytes.count) == bytes)
            let segments = [Array(bytes.prefix(bytes.count / 2)), Array(bytes.dropFirst(bytes.count / 2))]
            for magicless in [false, true] {
                let frames = Zstd.compress(frames: segments, level: 19, magicless: magicless)
                #expect(frames.magicless == magicless)
                #expect(try Zstd.decompress(frames.bytes, maxOutput: bytes.count, magicless: magicless) == bytes)
            }
        }
    }

    @Test("a zstd bomb of 100 MB of zeros stops at maxOutput with exceededLimit")
    func zstdBomb() throws {
        let bomb = Zstd.compress([UInt8](repeating: 0, count: 100_000_000), level: 3)
        #expect(bomb.count < 10_000)
        #expect(throws: CompressionError.self) { try Zstd.decompress(bomb, maxOutput: 1_000_000) }
        do {
            _ = try Zstd.decompress(bomb, maxOutput: 1_000_000)
        } catch {
            #expect(error.exceededLimit)
        }
        // Exactly at the limit is fine; one byte less is not.
        let small = Zstd.compress([UInt8](repeating: 7, count: 100_000))
        #expect(try Zstd.decompress(small, maxOutput: 100_000).count == 100_000)
        #expect(throws: CompressionError("zstd: the content is larger than the limit of 99999 bytes", exceededLimit: true)) {
            try Zstd.decompress(small, maxOutput: 99_999)
        }
    }

    @Test("a gzip bomb of 100 MB of zeros stops at maxOutput with exceededLimit")
    func gzipBomb() throws {
        let bomb = Gzip.compress([UInt8](repeating: 0, count: 100_000_000), level: 9)
        #expect(throws: CompressionError("gzip: the content is larger than the limit of 1000000 bytes", exceededLimit: true)) {
            try Gzip.decompress(bomb, maxOutput: 1_000_000)
        }
    }

    @Test("truncated, corrupt and empty inputs are errors, not limits")
    func corrupt() throws {
        let text = Array(String(repeating: "farmgate ", count: 200).utf8)
        for compressed in [Zstd.compress(text), Gzip.compress(text)] {
            let isZstd = compressed.starts(with: [0x28, 0xB5, 0x2F, 0xFD])
            for length in [0, 1, compressed.count / 2, compressed.count - 1] {
                let prefix = Array(compressed.prefix(length))
                do {
                    _ = try isZstd ? Zstd.decompress(prefix, maxOutput: 1 << 20) : Gzip.decompress(prefix, maxOutput: 1 << 20)
                    Issue.record("a truncation to \(length) bytes expanded")
                } catch {
                    #expect(!error.exceededLimit)
                }
            }
        }
        #expect(throws: CompressionError.self) { try Gzip.decompress(Array("not gzip".utf8), maxOutput: 100) }
        #expect(throws: CompressionError.self) { try Zstd.decompress(Array("not zstd".utf8), maxOutput: 100) }
    }

    @Test("concatenated gzip members and zstd frames expand to the concatenation; trailing garbage is an error")
    func concatenation() throws {
        let a = Array("first ".utf8), b = Array("second".utf8)
        #expect(try Gzip.decompress(Gzip.compress(a) + Gzip.compress(b), maxOutput: 100) == a + b)
        #expect(try Zstd.decompress(Zstd.compress(a) + Zstd.compress(b), maxOutput: 100) == a + b)
        #expect(throws: CompressionError.self) { try Gzip.decompress(Gzip.compress(a) + [1, 2, 3], maxOutput: 100) }
        // zlib streams are detected too.
        let zlib: [UInt8] = [0x78, 0x9C, 0x4B, 0x4C, 0x4A, 0x06, 0x00, 0x02, 0x4D, 0x01, 0x27]
        #expect(try Gzip.decompress(zlib, maxOutput: 100) == Array("abc".utf8))
    }
}
