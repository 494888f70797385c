/// Access to GPIO lines, behind a protocol so that the logic (debouncing, pulse counting) is tested without a GPIO chip
/// and so that the libgpiod 2.x API can replace ``LibgpiodBackend`` (1.6, the v1 API) in one file.
///
/// Implementations: ``LibgpiodBackend`` (the kernel's GPIO character device) and ``ScriptedGPIOBackend`` (a line driven
/// by the line-event protocol, for tests and machines without GPIO).
public protocol GPIOBackend: AnyObject, Sendable {
    /// Requests the line as an input with edge events on both edges. Called on the line's own thread.
    func open(_ request: GPIOLineRequest) throws(SensorError) -> any GPIOLine
    /// Now, on the clock of the events' timestamps (CLOCK_MONOTONIC for the kernel), in nanoseconds.
    func now() -> Int64
    /// ``now()``, and whether edges that happened by then are still waiting to be handed to a line's thread or applied
    /// by it (the thread applies what a wait returned before it waits again): while they are, what the line's monitor
    /// knows is older than `now`, and a state read at `now` could be contradicted by a change stamped before it.
    func clockReading() -> (now: Int64, pending: Bool)
    /// Finds a line without requesting it: which chip and offset a name or number means, so that `farmgate config check`
    /// sees one line written two ways (`17` and `"GPIO17"`). Blocking (opens the chip): not on the concurrency pool.
    func lookUp(chip: GPIOChipSelector, line: GPIOLineSelector) -> GPIOLineLookup
}

extension GPIOBackend {
    /// The kernel hands an edge to the line's thread as soon as it happens (the thread waits on the line's file
    /// descriptor): nothing is taken to be pending.
    public func clockReading() -> (now: Int64, pending: Bool) { (now(), false) }
}

/// What ``GPIOBackend/lookUp(chip:line:)`` found.
public enum GPIOLineLookup: Sendable, Hashable {
    /// The line is offset `offset` of the chip the kernel names `chip` (`gpiochip0`).
    case found(chip: String, offset: Int)
    /// The chip does not exist here (or cannot be opened): nothing can be resolved; says why.
    case noChip(String)
    /// The chip exists but has no such line; says which lines it has.
    case noLine(String)
}

/// A requested line. One thread owns it; it is released when the object is.
public protocol GPIOLine: AnyObject {
    /// The physical level now: 0 or 1.
    func level() throws(SensorError) -> Int
    /// Waits up to `timeout` for edge events and returns those that arrived, oldest first (empty on timeout).
    func waitForEvents(timeout: Duration) throws(SensorError) -> [GPIOEdgeEvent]
}

/// A GPIO chip, as the kernel names it (`gpiochip0`), by number (`0`), path (`/dev/gpiochip0`) or label.
public enum GPIOChipSelector: Sendable, Hashable, CustomStringConvertible {
    case name(String)
    case number(Int)

    /// The same chip however it was written: `0`, `gpiochip0` and `/dev/gpiochip0` are one chip.
    public var description: String {
        switch self {
        case .number(let number): "gpiochip\(number)"
        case .name(let name): name.hasPrefix("/dev/") ? String(name.dropFirst(5)) : name
        }
    }
}

/// A line of a chip, by offset (`17`) or by the name the device tree gives it (`GPIO17`).
public enum GPIOLineSelector: Sendable, Hashable, CustomStringConvertible {
    case offset(Int)
    case name(String)

    public var description: String {
        switch self {
        case .offset(let offset): "\(offset)"
        case .name(let name): name
        }
    }
}

/// The line's internal resistor (kernel 5.5 and later).
public enum GPIOBias: String, Sendable, Hashable, CaseIterable {
    case asIs = "as_is"
    case disable
    case pullUp = "pull_up"
    case pullDown = "pull_down"
}

public enum GPIOEdge: String, Sendable, Hashable {
    case rising, falling
}

/// An edge the kernel saw, with its timestamp (nanoseconds on the backend's clock).
public struct GPIOEdgeEvent: Sendable, Hashable {
    public var edge: GPIOEdge
    public var timestamp: Int64

    public init(_ edge: GPIOEdge, at timestamp: Int64) {
        self.edge = edge
        self.timestamp = timestamp
    }
}

/// What a sensor asks of a backend.
public struct GPIOLineRequest: Sendable, Hashable {
    public var chip: GPIOChipSelector
    public var line: GPIOLineSelector
    public var bias: GPIOBias
    /// Shown by `gpioinfo` as the line's user.
    public var consumer: String

    public init(chip: GPIOChipSelector, line: GPIOLineSelector, bias: GPIOBias = .asIs, consumer: String = "farmgate") {
        self.chip = chip
        self.line = line
        self.bias = bias
        self.consumer = consumer
    }

    /// `gpiochip0:17`.
    public var name: String { "\(chip):\(line)" }
}
