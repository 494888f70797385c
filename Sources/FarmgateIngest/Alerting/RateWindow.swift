/// A rate-of-change window over one sensor's non-faulty readings, appended in time order and dropped from the front,
/// with the spread (highest minus lowest value) known at any moment in O(1), in memory bounded by what can still be an
/// extreme rather than by the readings in the window.
///
/// It keeps two monotonic queues of readings: `lows` holds the readings whose value is lower than every value appended
/// after them (values rise strictly from front to back), `highs` those whose value is higher than every later one. A
/// reading in neither queue can never again be the lowest or the highest of the window (a later reading, which leaves
/// the window after it, is at least as low and at least as high), so it is not kept at all. Appending a value removes
/// from the back of each queue the readings it makes useless; dropping the readings before a time removes them from
/// the front of each queue (readings are appended in time order, so the queues are in time order too). The lowest value
/// is at the front of `lows`, the highest at the front of `highs`; each reading enters and leaves each queue once: O(1)
/// amortised per reading, and no allocation per reading once the buffers have grown.
///
/// What it holds: a queue holds values that rise (or fall) strictly, so each holds at most as many readings as the
/// window has distinct values. A noisy signal keeps a few dozen (the running extremes), a steady one one or two, and a
/// value that drifts one way for the whole window at most one reading per resolution step of its range: a 366-day
/// window over a 1 Hz sensor would otherwise keep 31.6 million readings (half a gigabyte) per rule and sensor.
struct RateWindow: Sendable, Equatable {
    private var lows = Queue()
    private var highs = Queue()

    /// Readings in order, taken from the front through `start`; the dropped part is compacted away once it outweighs
    /// the kept one.
    private struct Queue: Sendable {
        var times: [Int64] = []
        var values: [Double] = []
        var start = 0

        var isEmpty: Bool { start == times.count }
        var count: Int { times.count - start }
        var front: Double { values[start] }

        mutating func pushBack(_ time: Int64, _ value: Double, removingWhile useless: (Double) -> Bool) {
            while times.count > start, let last = values.last, useless(last) {
                times.removeLast()
                values.removeLast()
            }
            times.append(time)
            values.append(value)
        }

        mutating func drop(before time: Int64) {
            while start < times.count, times[start] < time { start += 1 }
            if start == times.count {
                times.removeAll(keepingCapacity: true)
                values.removeAll(keepingCapacity: true)
                start = 0
            } else if start > 64, start * 2 > times.count {
                times.removeFirst(start)
                values.removeFirst(start)
                start = 0
            }
        }

        static func same(_ lhs: Queue, _ rhs: Queue) -> Bool {
            lhs.count == rhs.count && lhs.times[lhs.start...].elementsEqual(rhs.times[rhs.start...])
                && lhs.values[lhs.start...].elementsEqual(rhs.values[rhs.start...])
        }

        func sharesBuffers(with other: Queue) -> Bool {
            start == other.start && times.count == other.times.count && RateWindow.sameBuffer(times, other.times)
                && RateWindow.sameBuffer(values, other.values)
        }
    }

    /// How many entries the queues keep (a reading in both counts twice; the newest always is): what the window costs,
    /// not how many readings fall in it.
    var kept: Int { lows.count + highs.count }

    var isEmpty: Bool { lows.isEmpty }

    mutating func append(_ time: Int64, _ value: Double) {
        lows.pushBack(time, value) { $0 >= value }
        highs.pushBack(time, value) { $0 <= value }
    }

    /// Drops the readings taken before `time`.
    mutating func drop(before time: Int64) {
        lows.drop(before: time)
        highs.drop(before: time)
    }

    /// Highest minus lowest value in the window (0 when empty).
    var spread: Double {
        guard !lows.isEmpty, !highs.isEmpty else { return 0 }
        return highs.front - lows.front
    }

    /// True when both will give the same spreads for the same readings from now on (they keep the same candidates): at
    /// once when they share their buffers (one was assigned from the other and neither changed since), otherwise by
    /// comparing what they keep.
    func holdsSameReadings(as other: RateWindow) -> Bool {
        if lows.sharesBuffers(with: other.lows), highs.sharesBuffers(with: other.highs) { return true }
        return self == other
    }

    fileprivate static func sameBuffer<Element>(_ lhs: [Element], _ rhs: [Element]) -> Bool {
        lhs.withUnsafeBufferPointer { left in rhs.withUnsafeBufferPointer { right in left.baseAddress == right.baseAddress } }
    }

    static func == (lhs: RateWindow, rhs: RateWindow) -> Bool { Queue.same(lhs.lows, rhs.lows) && Queue.same(lhs.highs, rhs.highs) }
}
