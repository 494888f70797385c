import NIOCore
import NIOEmbedded
import NIOHPACK
import NIOHTTP2
import Testing

@testable import FarmgateIngest

/// The two handlers that keep a small answer in one TLS record: what they pass on, on an embedded channel.
@Suite("TLS record shaping (write coalescing, END_STREAM on the last DATA frame)")
struct TLSRecordShapingTests {
    @Test("small writes between two flushes leave as one buffer, large ones as they are, and every promise completes")
    func coalescing() throws {
        let channel = EmbeddedChannel(handler: WriteCoalescingHandler())
        let promises = (0..<3).map { _ in channel.eventLoop.makePromise(of: Void.self) }
        for (index, text) in ["HTTP/1.1 200 OK\r\n", "content-length: 2\r\n\r\n", "{}"].enumerated() {
            channel.write(ByteBuffer(string: text), promise: promises[index])
        }
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil, "nothing leaves before the flush")
        channel.flush()
        #expect(try channel.readOutbound(as: ByteBuffer.self) == ByteBuffer(string: "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"))
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)
        for promise in promises { try promise.futureResult.wait() }

        let large = ByteBuffer(repeating: 7, count: WriteCoalescingHandler.largeWrite)
        channel.write(ByteBuffer(string: "head"), promise: nil)
        channel.write(large, promise: nil)
        channel.flush()
        #expect(try channel.readOutbound(as: ByteBuffer.self) == ByteBuffer(string: "head"))
        #expect(try channel.readOutbound(as: ByteBuffer.self)?.readableBytes == WriteCoalescingHandler.largeWrite)
        _ = try channel.finish()
    }

    @Test("an empty END_STREAM DATA frame is folded into the DATA frame before it; a flush in between lets that one go")
    func endStream() throws {
        let channel = EmbeddedChannel(handler: EndStreamOnLastData())
        let headers = HTTP2Frame.FramePayload.headers(.init(headers: HPACKHeaders([(":status", "200")])))
        channel.write(headers, promise: nil)
        channel.write(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer(string: "{}")))), promise: nil)
        channel.write(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer()), endStream: true)), promise: nil)
        channel.flush()
        guard case .headers = try channel.readOutbound(as: HTTP2Frame.FramePayload.self) else {
            Issue.record("the HEADERS frame did not come first")
            return
        }
        guard case .data(let data) = try channel.readOutbound(as: HTTP2Frame.FramePayload.self) else {
            Issue.record("no DATA frame")
            return
        }
        #expect(data.endStream)
        #expect(data.data.readableBytes == 2)
        #expect(try channel.readOutbound(as: HTTP2Frame.FramePayload.self) == nil, "the empty END_STREAM frame was sent too")

        // A body part flushed on its own leaves at the flush; the end then goes as it is.
        channel.write(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer(string: "part")))), promise: nil)
        channel.flush()
        guard case .data(let part) = try channel.readOutbound(as: HTTP2Frame.FramePayload.self) else {
            Issue.record("a flushed DATA frame was held")
            return
        }
        #expect(!part.endStream)
        channel.writeAndFlush(HTTP2Frame.FramePayload.data(.init(data: .byteBuffer(ByteBuffer()), endStream: true)), promise: nil)
        guard case .data(let end) = try channel.readOutbound(as: HTTP2Frame.FramePayload.self) else {
            Issue.record("the end was lost")
            return
        }
        #expect(end.endStream)
        _ = try channel.finish()
    }
}
