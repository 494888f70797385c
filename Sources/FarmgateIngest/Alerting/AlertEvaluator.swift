import FarmgateWire

/// What evaluation carries from one reading of a series (a rule on one sensor) to the next, beside the stored alert: the
/// rate-of-change window and the run of faulty readings. The engine keeps it between batches while it has evaluated
/// every reading of the device in between, and otherwise rebuilds it from the stored readings before the next one
/// (``AlertEngine``, "Series memory"), so a restart or another instance starts from what the readings say, not empty.
struct SeriesMemory: Sendable {
    var window = RateWindow()
    var faultRun = 0
}

/// What a reading-driven rule tests, without its names, labels and texts: plain values, so that the engine's loop over
/// thousands of rules per batch copies no reference-counted field.
struct AlertCondition: Sendable {
    var kind: AlertRule.Kind
    var threshold: Double?
    var clear: Double?
    var min: Double?
    var max: Double?
    var windowMicroseconds: Int64?
    var count: Int?
    var forMicroseconds: Int64

    init(_ rule: AlertRule) {
        kind = rule.kind
        threshold = rule.threshold
        clear = rule.clear
        min = rule.min
        max = rule.max
        windowMicroseconds = rule.windowMicroseconds
        count = rule.count
        forMicroseconds = rule.forMicroseconds
    }
}

/// The pure part of evaluation: whether a rule's condition holds for a reading, and how an alert's state moves. No I/O,
/// no clock; the engine and the late-report replay both use it, and the tests drive it directly.
enum AlertEvaluator {
    /// Whether `rule`'s condition holds at this reading (see the ``AlertCondition`` form).
    static func holds(_ rule: AlertRule, value: Double, quality: QualityFlags, at: Timestamp, active: Bool, memory: inout SeriesMemory) -> Bool? {
        holds(AlertCondition(rule), value: value, quality: quality, at: at, active: active, memory: &memory)
    }

    /// Whether the condition holds at this reading, or nil when the reading says nothing about it (a faulty reading for
    /// a threshold rule). `active` is whether the alert is FIRING: only then does the `clear` level apply (hysteresis
    /// keeps a firing alert from flapping). A pending alert is judged against the threshold itself, so that `for`
    /// counts only time the condition really held (a reading between the threshold and the clear level ends pending).
    static func holds(_ rule: AlertCondition, value: Double, quality: QualityFlags, at: Timestamp, active: Bool, memory: inout SeriesMemory) -> Bool? {
        let faulty = quality.contains(.sensorFault)
        switch rule.kind {
        case .above:
            guard !faulty, let threshold = rule.threshold else { return nil }
            return active ? value > (rule.clear ?? threshold) : value > threshold
        case .below:
            guard !faulty, let threshold = rule.threshold else { return nil }
            return active ? value < (rule.clear ?? threshold) : value < threshold
        case .outOfRange:
            guard !faulty else { return nil }
            if rule.min == nil, rule.max == nil { return quality.contains(.outOfRange) }
            return (rule.min.map { value < $0 } ?? false) || (rule.max.map { value > $0 } ?? false)
        case .rateOfChange:
            guard !faulty, let threshold = rule.threshold, let window = rule.windowMicroseconds else { return nil }
            memory.window.append(at.microseconds, value)
            memory.window.drop(before: at.microseconds - window)
            // Past the threshold, as `above` and `below` are: a change of exactly the threshold does not fire.
            return memory.window.spread > threshold
        case .sensorFault:
            memory.faultRun = faulty ? memory.faultRun + 1 : 0
            return memory.faultRun >= (rule.count ?? 1)
        case .noData, .deviceOffline, .calibrationOverdue:
            return nil
        }
    }

    /// Moves `record` by one observation of the condition at `at` and returns the transitions (none, one, or two when
    /// a rule without `for` goes straight from inactive through pending to firing).
    static func step(_ record: inout AlertRecord, holds: Bool, at: Timestamp, value: Double?, forMicroseconds: Int64) -> [(from: AlertState, to: AlertState)] {
        var moves: [(AlertState, AlertState)] = []
        func move(_ to: AlertState) {
            moves.append((record.state, to))
            record.state = to
        }
        switch (record.state, holds) {
        case (.inactive, true), (.resolved, true):
            move(.pending)
            record.pendingSince = at
            if forMicroseconds <= 0 {
                move(.firing)
                record.startsAt = at
                record.endsAt = nil
                record.acknowledgedAt = nil
                record.acknowledgedBy = nil
            }
        case (.pending, true):
            if let since = record.pendingSince, at.microseconds - since.microseconds >= forMicroseconds {
                move(.firing)
                record.startsAt = at
                record.endsAt = nil
                record.acknowledgedAt = nil
                record.acknowledgedBy = nil
            }
        case (.pending, false):
            move(.inactive)
            record.pendingSince = nil
        case (.firing, false):
            move(.resolved)
            record.endsAt = at
            record.pendingSince = nil
        default:
            break
        }
        if !moves.isEmpty { record.value = value }
        return moves
    }

    /// A timer rule's move: straight to firing when the condition holds, to resolved when it stops.
    static func timerStep(_ record: inout AlertRecord, holds: Bool, at: Timestamp) -> [(from: AlertState, to: AlertState)] {
        switch (record.state, holds) {
        case (.inactive, true), (.resolved, true), (.pending, true):
            let from = record.state
            record.state = .firing
            record.startsAt = at
            record.endsAt = nil
            record.pendingSince = nil
            record.acknowledgedAt = nil
            record.acknowledgedBy = nil
            return [(from, .firing)]
        case (.firing, false):
            record.state = .resolved
            record.endsAt = at
            return [(.firing, .resolved)]
        default:
            return []
        }
    }

    /// Stable per alert: FNV-1a 64 of farm, rule, device and sensor, as 16 hex digits (Alertmanager's `fingerprint`).
    static func fingerprint(farm: String, rule: String, device: String?, sensor: String?) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in "\(farm)\u{0}\(rule)\u{0}\(device ?? "")\u{0}\(sensor ?? "")".utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01B3
        }
        let hex = String(hash, radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }

    /// "pH below 5.5 from 03:12 to 05:40" for every firing episode in `transitions` (sorted by time), joined by "; ".
    /// More than `limit` episodes (a probe flapping through a backlog) are told in one line of bounded length: how
    /// many, their span, how often the alert fired and resolved, and the newest episode.
    static func episodes(_ transitions: [AlertTransitionRecord], what: String, limit: Int = .max) -> String {
        var parts: [String] = []
        var start: Timestamp?
        var first: Timestamp?
        var last: Timestamp?
        var fired = 0
        var resolved = 0
        for transition in transitions {
            if transition.to == .firing {
                fired += 1
                start = start ?? transition.at
                first = first ?? transition.at
            } else if transition.to == .resolved, transition.from == .firing {
                resolved += 1
                parts.append(start.map { "from \(clock($0)) to \(clock(transition.at))" } ?? "until \(clock(transition.at))")
                last = transition.at
                start = nil
            }
        }
        if let start { parts.append("since \(clock(start))") }
        guard parts.count > limit, let first, let newest = parts.last else { return parts.map { "\(what) \($0)" }.joined(separator: "; ") }
        let span = start == nil ? "from \(clock(first)) to \(clock(last ?? first))" : "from \(clock(first)), still firing"
        return "\(what): \(parts.count) episodes \(span) (fired \(fired) times, resolved \(resolved) times); the newest \(newest)"
    }

    /// `HH:MM` UTC, or `YYYY-MM-DD HH:MM` UTC when `full`.
    static func clock(_ timestamp: Timestamp) -> String {
        let text = RFC3339.format(timestamp)  // 2026-01-01T03:12:00.000000Z
        let time = text.dropFirst(11).prefix(5)
        return "\(text.prefix(10)) \(time) UTC"
    }
}

extension AlertRecord {
    /// ``AlertEvaluator/step(_:holds:at:value:forMicroseconds:)`` as a mutating method, so that the engine moves an
    /// optional record in place (`alert?.step(...)`) instead of copying it out and back for every reading.
    mutating func step(holds: Bool, at: Timestamp, value: Double?, forMicroseconds: Int64) -> [(from: AlertState, to: AlertState)] {
        AlertEvaluator.step(&self, holds: holds, at: at, value: value, forMicroseconds: forMicroseconds)
    }
}
