public import FarmgateWire

/// What one committed batch stored for the first time, handed to whatever follows a commit.
public struct CommittedBatch: Sendable {
    public var device: DeviceIdentity
    public var receivedAt: Timestamp
    /// ``StoreOutcome/fresh``: never empty when delivered (a batch of duplicates is not published).
    public var readings: [CommittedReading]
    /// When the batch was handed on, after its commit: a check of the alert configuration that started later saw every
    /// rule and silence acknowledged before the batch was stored.
    public var committedAt: ContinuousClock.Instant

    public init(device: DeviceIdentity, receivedAt: Timestamp, readings: [CommittedReading], committedAt: ContinuousClock.Instant = .now) {
        self.device = device
        self.receivedAt = receivedAt
        self.readings = readings
        self.committedAt = committedAt
    }
}

/// Something that acts on committed readings off the request path: the latest-value cache, the alert engine.
///
/// ``committed(_:)`` is called on the request's task right after the commit and before the receipt is sent: it must
/// return at once (hand the batch to a queue, an actor, a stream) and never wait on I/O, so that the answer to the site
/// never waits for what follows. An observer that must not miss readings after a crash (the alert engine) keeps its own
/// durable watermark and catches up from the store on start: the feed is a fast path, not the record.
public protocol CommitObserver: Sendable {
    func committed(_ batch: CommittedBatch)
}

/// The observers of commits, fixed when the application is built.
public struct CommitFeed: Sendable {
    public let observers: [any CommitObserver]

    public init(_ observers: [any CommitObserver] = []) {
        self.observers = observers
    }

    func publish(_ outcome: StoreOutcome, device: DeviceIdentity, receivedAt: Timestamp) {
        guard !outcome.fresh.isEmpty, !observers.isEmpty else { return }
        let batch = CommittedBatch(device: device, receivedAt: receivedAt, readings: outcome.fresh)
        for observer in observers { observer.committed(batch) }
    }
}
