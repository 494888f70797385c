import Logging
import Synchronization

/// The agent's `[log] level`, which a configuration reload changes for every logger at once (``FollowingLogHandler``).
public final class SharedLogLevel: Sendable {
    private let index: Atomic<Int>

    public init(_ level: Logger.Level) {
        index = Atomic(Self.index(of: level))
    }

    public var level: Logger.Level {
        get { Logger.Level.allCases[index.load(ordering: .relaxed)] }
        set { index.store(Self.index(of: newValue), ordering: .relaxed) }
    }

    private static func index(of level: Logger.Level) -> Int {
        Logger.Level.allCases.firstIndex(of: level) ?? 0
    }
}

/// A log handler whose level is the agent's ``SharedLogLevel``: loggers made at start follow a reload's `[log] level`.
/// Setting a logger's own level overrides the shared one for that logger.
public struct FollowingLogHandler<Wrapped: LogHandler>: LogHandler {
    public var wrapped: Wrapped
    public let shared: SharedLogLevel
    private var override: Logger.Level?

    public init(_ wrapped: Wrapped, level shared: SharedLogLevel) {
        self.wrapped = wrapped
        self.shared = shared
    }

    public var logLevel: Logger.Level {
        get { override ?? shared.level }
        set { override = newValue }
    }

    public var metadata: Logger.Metadata {
        get { wrapped.metadata }
        set { wrapped.metadata = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { wrapped[metadataKey: key] }
        set { wrapped[metadataKey: key] = newValue }
    }

    public var metadataProvider: Logger.MetadataProvider? {
        get { wrapped.metadataProvider }
        set { wrapped.metadataProvider = newValue }
    }

    public func log(event: LogEvent) {
        wrapped.log(event: event)
    }
}
