import Logging
import Synchronization

/// Every message logged through a ``RecordingHandler``, as "level message key=value …" (metadata sorted by key).
public final class LogRecorder: Sendable {
    public let lines = Mutex<[String]>([])
    public init() {}
    public var all: [String] { lines.withLock { $0 } }
    /// A logger whose every message lands here.
    public func logger(label: String = "test") -> Logger { Logger(label: label) { _ in RecordingHandler(recorder: self) } }
}

/// A log handler that writes every message, at every level, into a ``LogRecorder``.
public struct RecordingHandler: LogHandler {
    public let recorder: LogRecorder
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .trace
    public init(recorder: LogRecorder) { self.recorder = recorder }
    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    public func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { $1 }
        let text = merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        recorder.lines.withLock { $0.append("\(event.level) \(event.message) \(text)") }
    }
}
