import CZlib
import CZstd

/// Why a compressed body could not be expanded.
public struct CompressionError: Error, Hashable, Sendable, CustomStringConvertible {
    public let description: String
    /// The output would exceed the caller's limit (answer 413, not 400).
    public let exceededLimit: Bool
    /// The input ends before its stream does (cut in transit, most likely): worth sending again, unlike corrupt data.
    public let truncated: Bool
    /// The compressed data is whole, and bytes that are not compressed data follow it.
    public let trailingData: Bool
    /// A zstd frame asks for a larger window (history) than the decoder allows: the content may be small, but decoding
    /// it would take that much memory. Set with `exceededLimit`; the window allowed is in `description`.
    public let windowTooLarge: Bool
    public init(
        _ description: String, exceededLimit: Bool = false, truncated: Bool = false, trailingData: Bool = false, windowTooLarge: Bool = false
    ) {
        self.description = description
        self.exceededLimit = exceededLimit || windowTooLarge
        self.truncated = truncated
        self.trailingData = trailingData
        self.windowTooLarge = windowTooLarge
    }
}

/// The output chunk size of the streaming decompressors; output grows by at most this much beyond what was produced.
private let decompressionChunk = 64 * 1024

/// Zstandard (RFC 8878) over libzstd.
///
/// Decompression streams into a bounded output: the content size a frame declares is never trusted, and a frame that
/// expands beyond `maxOutput` is stopped as soon as it does. Concatenated frames decompress to the concatenation of
/// their contents, as the format specifies.
public enum Zstd {
    /// Compresses `bytes` into one zstd frame with its content size and no checksum.
    ///
    /// - Parameter level: 1 (fastest) to 19 or more (smallest); clamped into the library's range.
    public static func compress(_ bytes: [UInt8], level: Int32 = 3) -> [UInt8] {
        let clamped = min(max(level, 1), ZSTD_maxCLevel())
        let bound = ZSTD_compressBound(bytes.count)
        var output = [UInt8](repeating: 0, count: bound)
        let written = output.withUnsafeMutableBytes { out in
            bytes.withUnsafeBytes { input in
                ZSTD_compress(out.baseAddress, out.count, input.baseAddress, input.count, clamped)
            }
        }
        // With a valid level and an output of compressBound bytes, ZSTD_compress cannot fail; keep the type honest anyway.
        guard ZSTD_isError(written) == 0 else { return [] }
        output.removeSubrange(written...)
        return output
    }

    /// Compresses each of `segments` into a zstd frame of its own, without content size or checksum, and concatenates
    /// the frames; `magicless` drops each frame's 4-byte magic number (libzstd's `ZSTD_f_zstd1_magicless` format, for
    /// containers that say "zstd" themselves). Each frame starts the compressor afresh: its own statistics, entropy
    /// tables and parameters tuned to its size, which suits the batch codec's streams, whose statistics differ a lot.
    ///
    /// - Returns: the frames, and whether they are magicless (false if this libzstd refuses the format; the frames are
    ///   then ordinary ones).
    static func compress(frames segments: [[UInt8]], level: Int32, magicless: Bool) -> (bytes: [UInt8], magicless: Bool) {
        guard let context = ZSTD_createCCtx() else { return (segments.flatMap { compress($0, level: level) }, false) }
        defer { ZSTD_freeCCtx(context) }
        _ = ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, min(max(level, 1), ZSTD_maxCLevel()))
        _ = ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 0)
        _ = ZSTD_CCtx_setParameter(context, ZSTD_c_contentSizeFlag, 0)
        // ZSTD_c_format (experimental parameter 2) = ZSTD_f_zstd1_magicless (1); part of the shared library's ABI.
        let dropMagic = magicless && ZSTD_isError(ZSTD_CCtx_setParameter(context, ZSTD_c_experimentalParam2, 1)) == 0
        var output: [UInt8] = []
        for segment in segments {
            let start = output.count
            output.append(contentsOf: repeatElement(0, count: ZSTD_compressBound(segment.count)))
            let written = output.withUnsafeMutableBytes { out in
                segment.withUnsafeBytes { input in
                    ZSTD_compress2(context, out.baseAddress.map { $0 + start }, out.count - start, input.baseAddress, input.count)
                }
            }
            // With an output of compressBound bytes ZSTD_compress2 cannot fail; fall back to plain frames anyway.
            guard ZSTD_isError(written) == 0 else { return (segments.flatMap { compress($0, level: level) }, false) }
            output.removeSubrange((start + written)...)
        }
        return (output, dropMagic)
    }

    /// Expands one or more concatenated zstd frames.
    ///
    /// - Parameter maxOutput: the largest result accepted, in bytes. Beyond it decompression stops and throws a
    ///   ``CompressionError`` whose `exceededLimit` is true. Windows larger than 8 MiB (or than `maxOutput`, if larger)
    ///   are refused so that memory stays bounded too.
    /// - Throws: ``CompressionError`` for a corrupt or truncated frame, or output beyond `maxOutput`.
    public static func decompress(_ bytes: [UInt8], maxOutput: Int) throws(CompressionError) -> [UInt8] {
        try decompress(bytes, maxOutput: maxOutput, magicless: false)
    }

    /// ``decompress(_:maxOutput:)``, of frames without their magic number if `magicless` (see
    /// ``compress(frames:level:magicless:)``).
    static func decompress(_ bytes: [UInt8], maxOutput: Int, magicless: Bool) throws(CompressionError) -> [UInt8] {
        guard !bytes.isEmpty else { throw CompressionError("zstd: the input is empty", truncated: true) }
        guard let context = ZSTD_createDCtx() else { throw CompressionError("zstd: could not allocate a decompression context") }
        defer { ZSTD_freeDCtx(context) }
        // ZSTD_d_format (experimental parameter 1) = ZSTD_f_zstd1_magicless (1).
        if magicless, ZSTD_isError(ZSTD_DCtx_setParameter(context, ZSTD_d_experimentalParam1, 1)) != 0 {
            throw CompressionError("zstd: this libzstd cannot read magicless frames")
        }
        let limit = max(maxOutput, 0)
        var windowLog: Int32 = 23
        while windowLog < 27 && (1 << windowLog) < limit { windowLog += 1 }
        _ = ZSTD_DCtx_setParameter(context, ZSTD_d_windowLogMax, windowLog)

        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: decompressionChunk)
        var lastResult = 0
        var inputPosition = 0
        while true {
            var produced = 0
            let result: Int = bytes.withUnsafeBytes { input in
                chunk.withUnsafeMutableBytes { out in
                    var inBuffer = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: inputPosition)
                    var outBuffer = ZSTD_outBuffer(dst: out.baseAddress, size: out.count, pos: 0)
                    let r = ZSTD_decompressStream(context, &outBuffer, &inBuffer)
                    inputPosition = inBuffer.pos
                    produced = outBuffer.pos
                    return r
                }
            }
            if ZSTD_isError(result) != 0 {
                let name = String(cString: ZSTD_getErrorName(result))
                // A window beyond the cap set from the limit, or memory the limit would not allow: too large, not corrupt.
                let code = ZSTD_getErrorCode(result)
                if code == ZSTD_error_frameParameter_windowTooLarge {
                    throw CompressionError(
                        "zstd: the frame's window is larger than the \((1 << windowLog) >> 20) MiB this decoder allows; compress at level 19 or lower, without --long",
                        windowTooLarge: true)
                }
                throw CompressionError("zstd: \(name)", exceededLimit: code == ZSTD_error_memory_allocation)
            }
            lastResult = result
            if produced > 0 {
                guard output.count + produced <= limit else {
                    throw CompressionError("zstd: the content is larger than the limit of \(limit) bytes", exceededLimit: true)
                }
                output.append(contentsOf: chunk[0..<produced])
            }
            if inputPosition >= bytes.count && produced < chunk.count {
                // All input consumed and the decoder had room to spare: it has said everything it can.
                break
            }
        }
        guard lastResult == 0 else { throw CompressionError("zstd: the frame is truncated", truncated: true) }
        return output
    }
}

/// gzip (RFC 1952) over zlib.
///
/// Decompression also accepts a zlib stream (RFC 1950), detected from the header, and a series of concatenated gzip
/// members (as `cat a.gz b.gz` produces), which expand to the concatenation of their contents. Anything after the last
/// complete member that is not another member is an error. The output is bounded like ``Zstd``'s.
public enum Gzip {
    /// Compresses `bytes` into one gzip member.
    ///
    /// - Parameter level: 0 (store) to 9 (smallest); clamped into that range.
    public static func compress(_ bytes: [UInt8], level: Int32 = 6) -> [UInt8] {
        var stream = z_stream()
        let clamped = min(max(level, 0), 9)
        let initResult = deflateInit2_(
            &stream, clamped, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY, zlibVersion(), Int32(MemoryLayout<z_stream>.size))
        guard initResult == Z_OK else { return [] }  // only when zlib cannot allocate its state
        defer { deflateEnd(&stream) }
        // deflateBound is exact for one call with Z_FINISH; add room for the gzip header and trailer.
        let bound = Int(deflateBound(&stream, uLong(bytes.count))) + 64
        var output = [UInt8](repeating: 0, count: bound)
        var input = bytes
        let result: Int32 = input.withUnsafeMutableBytes { inRaw in
            output.withUnsafeMutableBytes { outRaw in
                stream.next_in = inRaw.baseAddress?.assumingMemoryBound(to: Bytef.self)
                stream.avail_in = uInt(inRaw.count)
                stream.next_out = outRaw.baseAddress?.assumingMemoryBound(to: Bytef.self)
                stream.avail_out = uInt(outRaw.count)
                return deflate(&stream, Z_FINISH)
            }
        }
        guard result == Z_STREAM_END else { return [] }
        output.removeSubrange(Int(stream.total_out)...)
        return output
    }

    /// Expands gzip (or zlib) data.
    ///
    /// - Parameter maxOutput: the largest result accepted, in bytes; beyond it decompression stops and throws a
    ///   ``CompressionError`` whose `exceededLimit` is true. The sizes in gzip trailers are never trusted.
    /// - Throws: ``CompressionError`` for corrupt or truncated data, or output beyond `maxOutput`.
    public static func decompress(_ bytes: [UInt8], maxOutput: Int) throws(CompressionError) -> [UInt8] {
        guard !bytes.isEmpty else { throw CompressionError("gzip: the input is empty", truncated: true) }
        guard bytes.count < Int(UInt32.max) else { throw CompressionError("gzip: the input is too large", exceededLimit: true) }
        let limit = max(maxOutput, 0)
        var stream = z_stream()
        guard inflateInit2_(&stream, 15 + 32, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw CompressionError("gzip: could not allocate a decompression context")
        }
        defer { inflateEnd(&stream) }

        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: decompressionChunk)
        var input = bytes
        var consumed = 0
        while true {
            var produced = 0
            let result: Int32 = input.withUnsafeMutableBytes { inRaw in
                chunk.withUnsafeMutableBytes { outRaw in
                    let base = inRaw.baseAddress?.assumingMemoryBound(to: Bytef.self)
                    stream.next_in = base.map { $0 + consumed }
                    stream.avail_in = uInt(inRaw.count - consumed)
                    stream.next_out = outRaw.baseAddress?.assumingMemoryBound(to: Bytef.self)
                    stream.avail_out = uInt(outRaw.count)
                    let r = inflate(&stream, Z_NO_FLUSH)
                    consumed = inRaw.count - Int(stream.avail_in)
                    produced = outRaw.count - Int(stream.avail_out)
                    return r
                }
            }
            if produced > 0 {
                guard output.count + produced <= limit else {
                    throw CompressionError("gzip: the content is larger than the limit of \(limit) bytes", exceededLimit: true)
                }
                output.append(contentsOf: chunk[0..<produced])
            }
            switch result {
            case Z_STREAM_END:
                if consumed >= bytes.count { return output }
                // Another member follows, or bytes that begin none (junk appended to the body), of which zlib would say
                // what it says of a bad header ("incorrect header check"): say what they are instead.
                guard Self.beginsStream(bytes[consumed...]) else {
                    throw CompressionError(
                        "gzip: \(bytes.count - consumed) bytes follow the end of the compressed data", trailingData: true)
                }
                guard inflateReset(&stream) == Z_OK else { throw CompressionError("gzip: could not reset the decompressor") }
            case Z_OK:
                continue
            case Z_BUF_ERROR:
                // No progress possible: the input ended inside a member.
                if produced == 0 { throw CompressionError("gzip: the data is truncated", truncated: true) }
            case Z_NEED_DICT:
                throw CompressionError("gzip: the stream needs a preset dictionary, which is not supported")
            default:
                let message = stream.msg.map { String(cString: $0) } ?? "error \(result)"
                throw CompressionError("gzip: \(message)")
            }
        }
    }

    /// Whether `bytes` begin as a gzip member (its magic number) or a zlib stream (a valid header) would, as far as they go.
    private static func beginsStream(_ bytes: ArraySlice<UInt8>) -> Bool {
        let head = Array(bytes.prefix(2))
        if [0x1f, 0x8b].starts(with: head) { return true }
        // RFC 1950: deflate (CM 8) with a window of at most 32 KiB, and the two bytes a multiple of 31.
        guard head.count == 2 else { return head[0] & 0x0f == 8 && head[0] >> 4 <= 7 }
        return head[0] & 0x0f == 8 && head[0] >> 4 <= 7 && (UInt16(head[0]) << 8 | UInt16(head[1])) % 31 == 0
    }
}
