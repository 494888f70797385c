import Synchronization

/// A boolean that tasks and threads share: a cancellation a C callback polls on another thread, a "one at a time" or
/// "said once" mark. Reference-typed so that closures and C callbacks can hold it.
public final class AtomicFlag: Sendable {
    private let value = Atomic<Bool>(false)

    public init() {}

    /// Sets it.
    public func set() { value.store(true, ordering: .releasing) }

    public var isSet: Bool { value.load(ordering: .acquiring) }

    /// Sets it; returns whether it was set already.
    public func take() -> Bool { value.exchange(true, ordering: .acquiringAndReleasing) }

    /// Clears it; returns whether it was set.
    @discardableResult
    public func clear() -> Bool { value.exchange(false, ordering: .acquiringAndReleasing) }
}
