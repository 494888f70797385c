/// The non-faulty readings of a rate-of-change window, oldest first: appended at the back, dropped at the front, and
/// the spread (highest minus lowest value) known at any moment in O(1).
///
/// Beside the readings it keeps two monotonic queues of their positions: `lows` holds the positions whose value is
/// lower than every value appended after them (values rise from front to back), `highs` those whose value is higher
/// than every later one. Appending a value removes from the back of each queue the positions it makes useless (a later,
/// lower or equal value outlives an earlier, higher one as the lowest candidate); dropping a reading at the front removes
/// its position from the front of a queue that starts with it. So the lowest value is always at the front of `lows`,
/// the highest at the front of `highs`, and each reading enters and leaves each queue once: O(1) amortised per reading
/// instead of a pass over the whole window per reading. No allocation per reading once the buffers have grown.
struct RateWindow: Sendable, Equatable {
    private var times: [Int64] = []
    private var values: [Double] = []
    /// Position in `times`/`values` of the oldest kept reading.
    private var start = 0
    /// Positions in `values`, in increasing order; their values rise strictly. `lows[lowsStart]` holds the lowest.
    private var lows: [Int] = []
    private var lowsStart = 0
    /// Positions in `values`, in increasing order; their values fall strictly. `highs[highsStart]` holds the highest.
    private var highs: [Int] = []
    private var highsStart = 0

    var count: Int { times.count - start }

    mutating func append(_ time: Int64, _ value: Double) {
        let position = values.count
        times.append(time)
        values.append(value)
        while lows.count > lowsStart, let last = lows.last, values[last] >= value { lows.removeLast() }
        lows.append(position)
        while highs.count > highsStart, let last = highs.last, values[last] <= value { highs.removeLast() }
        highs.append(position)
    }

    /// Drops the readings taken before `time`, from the front: the oldest first, stopping at the first one that is not
    /// older (readings are appended in time order).
    mutating func drop(before time: Int64) {
        while start < times.count, times[start] < time { start += 1 }
        while lowsStart < lows.count, lows[lowsStart] < start { lowsStart += 1 }
        while highsStart < highs.count, highs[highsStart] < start { highsStart += 1 }
        // Compact once the dropped part outweighs the kept one: amortised O(1) per reading.
        if start > 64, start * 2 > times.count { compact() }
    }

    /// Highest minus lowest value in the window (0 when empty).
    var spread: Double {
        guard lowsStart < lows.count, highsStart < highs.count else { return 0 }
        return values[highs[highsStart]] - values[lows[lowsStart]]
    }

    /// Removes the dropped readings from the buffers and shifts the queues' positions by as many.
    private mutating func compact() {
        let shift = start
        times.removeFirst(shift)
        values.removeFirst(shift)
        start = 0
        lows.removeFirst(lowsStart)
        lowsStart = 0
        highs.removeFirst(highsStart)
        highsStart = 0
        for index in lows.indices { lows[index] -= shift }
        for index in highs.indices { highs[index] -= shift }
    }

    /// True when both hold the same readings: at once when they share their buffers (one was assigned from the other
    /// and neither changed since), otherwise by comparing the readings.
    func holdsSameReadings(as other: RateWindow) -> Bool {
        if start == other.start, times.count == other.times.count, lowsStart == other.lowsStart, highsStart == other.highsStart,
            lows.count == other.lows.count, highs.count == other.highs.count,
            Self.sameBuffer(times, other.times), Self.sameBuffer(values, other.values), Self.sameBuffer(lows, other.lows),
            Self.sameBuffer(highs, other.highs)
        {
            return true
        }
        return self == other
    }

    private static func sameBuffer<Element>(_ lhs: [Element], _ rhs: [Element]) -> Bool {
        lhs.withUnsafeBufferPointer { left in rhs.withUnsafeBufferPointer { right in left.baseAddress == right.baseAddress } }
    }

    /// The kept readings, oldest first (tests).
    var entries: [(time: Int64, value: Double)] { (start..<times.count).map { (times[$0], values[$0]) } }

    static func == (lhs: RateWindow, rhs: RateWindow) -> Bool { lhs.entries.elementsEqual(rhs.entries) { $0 == $1 } }
}
