/// What one GPIO line's edges mean: a debounced state, or a count of pulses. A pure state machine fed with edge events
/// and asked questions at a time on the same clock, so that it is tested by feeding it events.
///
/// Levels here are logical: with `activeLow`, a physically low line is 1 (a float switch that pulls the line to ground
/// when the water reaches it reads 1 = wet) and a physical rising edge is a logical falling one.
struct GPIOLineMonitor: Sendable {
    enum Mode: Sendable, Hashable {
        /// A switch: the state changes once the line has held its new level for `debounce` nanoseconds.
        case input(debounce: Int64)
        /// A pulse counter: a pulse is the line settling at the level `edge` leads to (high for `rising`), that is
        /// holding it for `debounce` nanoseconds, as a switch's change does; it is counted at the time of the edge after
        /// which the line held that level. A glitch shorter than `debounce` and bounce on either edge add no pulse.
        case pulses(edge: GPIOEdge, debounce: Int64)
    }

    let mode: Mode
    let activeLow: Bool

    /// The logical level the line has now (after the last event), and since when.
    private(set) var rawLevel: Int
    private(set) var rawSince: Int64
    /// The debounced state (of a pulse line too: the level it last held for the debounce time).
    private(set) var stable: Int
    /// Pulses counted since the monitor started (across reconnects of the line), up to the last event or question: a
    /// pulse whose level has not yet held for the debounce time is counted by the first question past it
    /// (``pulses(at:)``).
    private(set) var totalPulses: UInt64 = 0
    /// Timestamps of counted pulses not yet attributed to a flow window.
    private var unattributed: [Int64] = []
    /// Where the current flow window started.
    private(set) var windowStart: Int64
    /// When the monitor started (the line was requested). Pulses stamped before it (an events file's lines appended
    /// while the agent was down, applied at the request) are counted, but belong to no flow window: the first window
    /// begins here, and dividing them by it gave a rate hundreds of times the real one (a tester, 2026-12-07: 6,359 L/min
    /// for 6 after a `kill -9`).
    private let started: Int64

    /// The most pulse timestamps kept between two flow reads (a 500 Hz meter read every 10 min needs 300 000).
    static let maxUnattributed = 1_000_000

    init(mode: Mode, activeLow: Bool, physicalLevel: Int, at time: Int64) {
        self.mode = mode
        self.activeLow = activeLow
        let level = activeLow ? 1 - (physicalLevel != 0 ? 1 : 0) : (physicalLevel != 0 ? 1 : 0)
        rawLevel = level
        // The level found when the line is requested counts as settled.
        rawSince = time - 1_000_000_000_000
        stable = level
        windowStart = time
        started = time
    }

    /// The line was requested again (after the chip came back): its level now, keeping the count and flow window.
    ///
    /// The level read at the request is the line's level now, not a bounce to wait out: as at the first request it counts
    /// as settled, and a state input that changed while the line was gone records the change at once, at `time` (when
    /// the edge happened is unknown), so that it is stored and shown without waiting for another event. A pulse line
    /// counts no pulse for it: pulses while the line was gone are not seen.
    mutating func restart(physicalLevel: Int, at time: Int64) {
        let level = logical(physicalLevel)
        if level != rawLevel {
            rawLevel = level
            rawSince = max(time, rawSince)
        }
        guard level != stable else { return }
        stable = level
        if case .input = mode { record(StateChange(state: level, at: rawSince)) }
    }

    private func logical(_ physicalLevel: Int) -> Int {
        activeLow ? 1 - (physicalLevel != 0 ? 1 : 0) : (physicalLevel != 0 ? 1 : 0)
    }

    mutating func apply(_ event: GPIOEdgeEvent) {
        let physicalRising = event.edge == .rising
        let logicalEdge: GPIOEdge = physicalRising != activeLow ? .rising : .falling
        let level = logicalEdge == .rising ? 1 : 0
        let time = max(event.timestamp, rawSince)
        switch mode {
        case .input:
            guard level != rawLevel else { return }  // a repeated edge (one was lost): nothing changes
            settle(at: time)
            rawLevel = level
            rawSince = time
        case .pulses:
            settle(at: time)
            if level == rawLevel {
                // A repeated edge: the edge between was lost, so the line left this level and came back. Held, the level
                // was a pulse (or a pause) of its own: the line is taken to have settled at the other level in between
                // (uncounted), so that this edge can begin the next pulse. Not yet held, it is bounce: it restarts.
                if rawLevel == stable { stable = 1 - level }
            } else {
                rawLevel = level
            }
            rawSince = time
            settle(at: time)  // a debounce of 0 settles at once
        }
    }

    /// The pulses counted up to `time`: a level held for the debounce time by then is settled first.
    mutating func pulses(at time: Int64) -> UInt64 {
        settle(at: time)
        return totalPulses
    }
    /// The debounced state at `time`: the line's level once it has held it for the debounce time.
    mutating func state(at time: Int64) -> Int {
        settle(at: time)
        return stable
    }

    /// A debounced change of a state input: the new state and the time of the edge that began it.
    struct StateChange: Sendable, Hashable {
        var state: Int
        var at: Int64
    }

    /// Debounced changes not yet taken, oldest first (a state input records them for ``takeChanges()``).
    private(set) var changes: [StateChange] = []
    /// Changes dropped because nobody took them (more than ``maxChanges`` between two takes).
    private(set) var droppedChanges = 0
    /// The most changes kept between two takes: a switch bouncing past its debounce every 50 ms for 80 minutes.
    static let maxChanges = 100_000

    /// Whether a state input's line holds a level that is not (yet) its debounced state: a change may be about to be
    /// reported with the time of its edge, which is before now.
    var settling: Bool {
        guard case .input = mode else { return false }
        return rawLevel != stable
    }

    /// The changes debounced so far, oldest first; they are not reported again.
    mutating func takeChanges() -> [StateChange] {
        defer { changes = [] }
        return changes
    }

    /// Confirms the line's level as the state once it has held it for the debounce time at `time`: a state input records
    /// the change with the time of the edge that began it; a pulse line counts a pulse when the level is the one its
    /// counted edge leads to.
    private mutating func settle(at time: Int64) {
        switch mode {
        case .input(let debounce):
            guard rawLevel != stable, time - rawSince >= debounce else { return }
            stable = rawLevel
            record(StateChange(state: stable, at: rawSince))
        case .pulses(let edge, let debounce):
            guard rawLevel != stable, time - rawSince >= debounce else { return }
            stable = rawLevel
            guard stable == (edge == .rising ? 1 : 0) else { return }
            totalPulses += 1
            if unattributed.count < Self.maxUnattributed {
                unattributed.append(rawSince)
            } else {
                // Attribute the overflow to the current window rather than losing it.
                unattributed[unattributed.count - 1] = rawSince
            }
        }
    }

    private mutating func record(_ change: StateChange) {
        if changes.count >= Self.maxChanges {
            changes.removeFirst()
            droppedChanges += 1
        }
        changes.append(change)
    }

    /// The pulses counted since the previous call (or the start) up to `time`, and how long that window was in
    /// seconds; starts the next window at `time`.
    mutating func takeFlowWindow(at time: Int64) -> (pulses: Int, seconds: Double) {
        settle(at: time)
        let split = unattributed.firstIndex { $0 > time } ?? unattributed.count
        let pulses = unattributed[..<split].count { $0 >= started }
        unattributed.removeFirst(split)
        let seconds = Double(time - windowStart) / 1e9
        windowStart = max(windowStart, time)
        return (pulses, seconds)
    }
}
