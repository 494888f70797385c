public import Logging

/// swift-log's `StreamLogHandler` on standard error, with the logger's metadata kept aside until a line is written.
///
/// `StreamLogHandler` formats its whole metadata (sorted, joined) each time a key is set. The framework sets one per
/// request (`hb.request.id`) on a logger that is then rarely used, so the ingest paid that formatting on every request
/// (about 3 % of the CPU of a `latest` request). Here a key costs a dictionary insert; the lines written are the same,
/// since `StreamLogHandler` merges the metadata given with an event the same way (the event's keys win).
public struct IngestLogHandler: LogHandler {
    private var stream: StreamLogHandler
    public var metadata: Logger.Metadata = [:]

    public init(label: String, level: Logger.Level) {
        self.init(StreamLogHandler.standardError(label: label), level: level)
    }

    /// Lines go to `stream` (the tests read them).
    init(_ stream: StreamLogHandler, level: Logger.Level) {
        self.stream = stream
        self.stream.logLevel = level
    }

    public var logLevel: Logger.Level {
        get { stream.logLevel }
        set { stream.logLevel = newValue }
    }

    public var metadataProvider: Logger.MetadataProvider? {
        get { stream.metadataProvider }
        set { stream.metadataProvider = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var event = event
        if !metadata.isEmpty {
            event.metadata = metadata.merging(event.metadata ?? [:]) { _, explicit in explicit }
        }
        stream.log(event: event)
    }
}
