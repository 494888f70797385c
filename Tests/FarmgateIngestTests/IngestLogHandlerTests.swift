import Logging
import Synchronization
import Testing

@testable import FarmgateIngest

@Suite("The ingest's log handler")
struct IngestLogHandlerTests {
    final class Lines: TextOutputStream, Sendable {
        let text = Mutex("")
        func write(_ string: String) { text.withLock { $0 += string } }
    }

    struct Stream: TextOutputStream, Sendable {
        let lines: Lines
        mutating func write(_ string: String) { lines.write(string) }
    }

    /// The same logger through `StreamLogHandler` itself and through ``IngestLogHandler``.
    func written(_ use: (inout Logger) -> Void) -> (stream: String, ingest: String) {
        let plain = Lines(), ours = Lines()
        var logger = Logger(label: "farmgate-ingest") { StreamLogHandler(label: $0, stream: Stream(lines: plain), metadataProvider: nil) }
        logger.logLevel = .info
        use(&logger)
        var second = Logger(label: "farmgate-ingest") {
            IngestLogHandler(StreamLogHandler(label: $0, stream: Stream(lines: ours), metadataProvider: nil), level: .info)
        }
        use(&second)
        // Timestamps differ; compare what follows them.
        func strip(_ text: String) -> String {
            text.split(separator: "\n").map { line in line.split(separator: " ", maxSplits: 1).last.map(String.init) ?? "" }.joined(separator: "\n")
        }
        return (strip(plain.text.withLock { $0 }), strip(ours.text.withLock { $0 }))
    }

    @Test("lines equal StreamLogHandler's: the logger's metadata, the event's over it, levels below the threshold dropped")
    func sameLines() {
        let (stream, ingest) = written { logger in
            logger.info("no metadata")
            logger[metadataKey: "hb.request.id"] = "42"
            logger[metadataKey: "device"] = "dev-1"
            logger.info("with the logger's", metadata: ["farm": "f"])
            logger.warning("event wins", metadata: ["device": "dev-2"])
            logger.debug("dropped")
            logger[metadataKey: "device"] = nil
            logger.error("one key left")
        }
        #expect(ingest == stream)
        #expect(ingest.contains("device=dev-2"))
        #expect(ingest.contains("device=dev-1 farm=f hb.request.id=42"))
        #expect(!ingest.contains("dropped"))
        #expect(ingest.split(separator: "\n").count == 4)
    }

    @Test("the level set on the logger is the handler's")
    func level() {
        var logger = Logger(label: "x") { IngestLogHandler(label: $0, level: .warning) }
        #expect(logger.logLevel == .warning)
        logger.logLevel = .debug
        #expect(logger.logLevel == .debug)
    }
}
