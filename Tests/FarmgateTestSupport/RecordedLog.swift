import Logging
import Synchronization

/// A log that keeps every event its loggers emit, with level and metadata, for tests that assert what was logged.
public final class RecordedLog: Sendable {
    public struct Entry: Sendable {
        public let level: Logger.Level
        public let message: String
        /// The logger's metadata merged with the event's.
        public let metadata: Logger.Metadata
    }

    private let storage = Mutex<[Entry]>([])

    public init() {}

    /// Everything logged so far, oldest first.
    public var entries: [Entry] { storage.withLock { $0 } }

    /// A logger at level `trace` that records into this log.
    public func logger(label: String = "test.recorded") -> Logger {
        Logger(label: label) { _ in Handler(log: self) }
    }

    fileprivate func append(_ entry: Entry) {
        storage.withLock { $0.append(entry) }
    }

    private struct Handler: LogHandler {
        let log: RecordedLog
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            log.append(Entry(level: event.level, message: event.message.description, metadata: metadata.merging(event.metadata ?? [:]) { $1 }))
        }
    }
}
