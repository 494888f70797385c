// The encoder of the binary batch format; the layout is documented on ``BatchCodec``.

/// One sensor's readings, ordered by (timestamp, sequence), with values as whole steps of its resolution.
struct EncodedColumn {
    var descriptor: SensorDescriptor
    var timestamps: [Int64] = []
    var steps: [Int64] = []
    var sequences: [UInt64] = []
    var flags: [UInt16] = []
}

/// Bits in the zigzag varint payload of `value`: the cost proxy used to choose between coding modes.
@inline(__always)
func codeBits(_ value: Int64) -> Int {
    64 - zigzag(value).leadingZeroBitCount
}

/// The median of `values` (the lower one for an even count); `values` must not be empty.
func median(_ values: [Int64]) -> Int64 {
    let sorted = values.sorted()
    return sorted[(sorted.count - 1) / 2]
}

/// The timestamp or value coding of one column: a mode, a parameter and residuals.
struct ColumnCoding {
    var mode: UInt8
    var parameter: Int64
    var anchor: Int64
    var residuals: [Int64]

    var cost: Int { residuals.reduce(0) { $0 + codeBits($1) } + codeBits(anchor) }
}

extension BatchCodec {
    static func encode(_ batch: Batch, compressionLevel: Int32, compressed: Bool) throws(BatchEncodingError) -> [UInt8] {
        var frame = magic
        frame.append(formatVersion)
        let streams = try encodeStreams(batch)
        if compressed {
            let body = compressBody(streams: streams, level: compressionLevel)
            frame.append(flagZstd | (body.magicless ? flagMagicless : 0))
            frame.append(contentsOf: body.bytes)
        } else {
            frame.append(0)
            frame.append(contentsOf: streams.flatMap(\.bytes))
        }
        return frame
    }

    /// Compresses a body given as streams into magicless zstd frames, one for each group of streams with similar
    /// statistics (see ``frameEnds``), as the body of a frame with the ``flagZstd`` and ``flagMagicless`` flags.
    package static func compress(streams: [(name: String, bytes: [UInt8])], level: Int32) -> [UInt8] {
        compressBody(streams: streams, level: level).bytes
    }

    static func compressBody(streams: [(name: String, bytes: [UInt8])], level: Int32) -> (bytes: [UInt8], magicless: Bool) {
        var segments: [[UInt8]] = [[]]
        for stream in streams {
            segments[segments.count - 1].append(contentsOf: stream.bytes)
            if frameEnds.contains(stream.name) { segments.append([]) }
        }
        let split = Zstd.compress(frames: segments.filter { !$0.isEmpty }, level: level, magicless: true)
        // A small body (a live batch of a few hundred bytes) often costs less as one frame: each frame has its own
        // header and block headers, worth more than separate entropy tables at that size. The decoder reads either.
        guard split.bytes.count < 600 else { return split }
        let single = Zstd.compress(frames: [segments.flatMap { $0 }], level: level, magicless: true)
        return single.bytes.count < split.bytes.count && single.magicless == split.magicless ? single : split
    }

    /// Groups, quantizes and orders the readings of `batch` by sensor, each column ordered by (timestamp, sequence), and
    /// the columns in the order the frame lists them: sensors with readings by their first timestamp (so that each
    /// sensor's first timestamp is close to the previous one's, and readings committed in time order rank in sensor
    /// order), ties and sensors without readings by id.
    /// - Parameter fixedOrder: keep the columns in the order of `batch.sensors` (a version 4 frame lists the sensors of
    ///   its table in the table's order, known to both sides): `table` is then the identity.
    static func columns(of batch: Batch, fixedOrder: Bool = false) throws(BatchEncodingError) -> (columns: [EncodedColumn], table: [Int]) {
        let sortedSensors = fixedOrder ? batch.sensors : batch.sensors.sorted { $0.id < $1.id }
        var indexOf: [SensorID: Int] = [:]
        indexOf.reserveCapacity(sortedSensors.count)
        for (index, descriptor) in sortedSensors.enumerated() {
            guard indexOf.updateValue(index, forKey: descriptor.id) == nil else {
                throw BatchEncodingError("sensor '\(descriptor.id)' is described more than once in the batch")
            }
        }
        var columns = sortedSensors.map { EncodedColumn(descriptor: $0) }
        for reading in batch.readings {
            guard let index = indexOf[reading.sensor] else {
                throw BatchEncodingError(
                    "reading \(reading.sequence) names sensor '\(reading.sensor)', which has no descriptor in the batch")
            }
            let resolution = columns[index].descriptor.resolution
            guard let steps = resolution.quantize(reading.value) else {
                let problem = reading.value.isFinite ? "too large for resolution \(resolution)" : "not finite"
                throw BatchEncodingError("reading \(reading.sequence) of sensor '\(reading.sensor)' has value \(reading.value), which is \(problem)")
            }
            columns[index].timestamps.append(reading.timestamp.microseconds)
            columns[index].steps.append(steps)
            columns[index].sequences.append(reading.sequence)
            columns[index].flags.append(reading.quality.rawValue)
        }
        for index in columns.indices where columns[index].timestamps.count > 1 {
            let c = columns[index]
            // The agent's batches arrive in (timestamp, sequence) order per sensor: nothing to reorder.
            let inOrder = c.timestamps.indices.dropFirst().allSatisfy {
                (c.timestamps[$0 - 1], c.sequences[$0 - 1]) <= (c.timestamps[$0], c.sequences[$0])
            }
            if inOrder { continue }
            let order = c.timestamps.indices.sorted {
                (c.timestamps[$0], c.sequences[$0]) < (c.timestamps[$1], c.sequences[$1])
            }
            columns[index].timestamps = order.map { c.timestamps[$0] }
            columns[index].steps = order.map { c.steps[$0] }
            columns[index].sequences = order.map { c.sequences[$0] }
            columns[index].flags = order.map { c.flags[$0] }
        }
        if fixedOrder { return (columns, Array(columns.indices)) }
        // The name table lists ids in natural order ("tank2" before "tank10"), which front-codes well and is often
        // the order of a configuration. The frame lists sensors in the cheaper of that order and time order (by first
        // timestamp, sensors without readings last), judged by the bits of the permutation, the first timestamps and
        // the counts; `table[k]` is the frame position of the table's k-th sensor.
        let natural = columns.indices.sorted { naturalOrder(columns[$0].descriptor.id.rawValue, columns[$1].descriptor.id.rawValue) }
        var naturalRank = [Int](repeating: 0, count: columns.count)
        for (k, index) in natural.enumerated() { naturalRank[index] = k }
        let byTime = columns.indices.sorted { a, b in
            switch (columns[a].timestamps.first, columns[b].timestamps.first) {
            case let (x?, y?): (x, naturalRank[a]) < (y, naturalRank[b])
            case (.some, nil): true
            case (nil, .some): false
            case (nil, nil): naturalRank[a] < naturalRank[b]
            }
        }
        func layout(_ order: [Int]) -> (table: [Int], cost: Int) {
            var position = [Int](repeating: 0, count: order.count)
            for (k, index) in order.enumerated() { position[index] = k }
            let table = natural.map { position[$0] }
            var cost = 0
            var previous = -1
            for p in table {
                cost += codeBits(Int64(p - previous - 1))
                previous = p
            }
            var previousCount = 0
            for index in order {
                cost += codeBits(Int64(columns[index].timestamps.count - previousCount))
                previousCount = columns[index].timestamps.count
            }
            let firsts = order.compactMap { columns[$0].timestamps.first }
            let anchorCost = (0...min(maxAnchorLag, firsts.count)).map { lag in
                firsts.indices.reduce(0) { $0 + codeBits(firsts[$1] &- predictAnchor(firsts, at: $1, lag: lag)) }
            }
            return (table, cost + (anchorCost.min() ?? 0))
        }
        let timeLayout = layout(byTime), naturalLayout = layout(natural)
        let (order, table) = timeLayout.cost < naturalLayout.cost ? (byTime, timeLayout.table) : (natural, naturalLayout.table)
        return (order.map { columns[$0] }, table)
    }

    /// Chooses the cheapest coding of a column of timestamps in units after the base (at least two):
    /// grid (`x[i] = A + k[i]·P + r[i]`, where slot `k` advances by one plus the gaps listed) with the column's median
    /// step or the previous sensor's period, or delta (`x[i] = x[i-1] + P + r[i]`).
    static func timestampCoding(_ x: [Int64], previousPeriod: Int64) -> TimestampCoding {
        let deltas = (1..<x.count).map { x[$0] &- x[$0 - 1] }
        let medianPeriod = median(deltas)
        var best = TimestampCoding(
            mode: 1, period: medianPeriod, anchor: x[0], gaps: [], residuals: deltas.map { $0 &- medianPeriod })
        var bestCost = best.cost(previousPeriod: previousPeriod)
        for period in (previousPeriod == medianPeriod ? [medianPeriod] : [medianPeriod, previousPeriod]) where period > 0 {
            var slots = [Int64](repeating: 0, count: x.count)
            var gaps: [(index: Int, skip: UInt64)] = []
            for i in 1..<x.count {
                let d = deltas[i - 1]
                var step: Int64 = 1
                if d > 0 {
                    let (q, r) = d.quotientAndRemainder(dividingBy: period)
                    step = max(1, r >= period - r ? q &+ 1 : q)
                }
                if step > 1 { gaps.append((i, UInt64(step - 1))) }
                slots[i] = slots[i - 1] &+ step
            }
            let offsets = x.indices.map { x[$0] &- slots[$0] &* period }
            let anchor = median(offsets)
            let grid = TimestampCoding(
                mode: 0, period: period, anchor: anchor, gaps: gaps, residuals: offsets.map { $0 &- anchor })
            let cost = grid.cost(previousPeriod: previousPeriod)
            if cost < bestCost || (cost == bestCost && best.mode == 1) {
                best = grid
                bestCost = cost
            }
        }
        return best
    }

    /// Chooses the cheaper of reference and delta coding for a column of steps whose differences are multiples of `unit`.
    static func valueCoding(_ s: [Int64], unit: Int64) -> ColumnCoding {
        guard unit != 0 else { return ColumnCoding(mode: 0, parameter: 0, anchor: s[0], residuals: []) }
        let reference = median(s)
        let byReference = ColumnCoding(mode: 0, parameter: unit, anchor: reference, residuals: s.map { ($0 - reference) / unit })
        let byDelta = ColumnCoding(
            mode: 1, parameter: unit, anchor: s[0], residuals: (1..<s.count).map { (s[$0] - s[$0 - 1]) / unit })
        // Reference unless delta is clearly cheaper: a batch of sensors in one mode compresses its mode bytes away.
        return byDelta.cost * 5 < byReference.cost * 4 ? byDelta : byReference
    }

    /// Chooses the cheaper of reference and delta coding for a column of sequence errors (wrapping arithmetic).
    static func sequenceCoding(_ e: [Int64]) -> ColumnCoding {
        let reference = median(e)
        let byReference = ColumnCoding(mode: 0, parameter: 1, anchor: reference, residuals: e.map { $0 &- reference })
        let byDelta = ColumnCoding(mode: 1, parameter: 1, anchor: e[0], residuals: (1..<e.count).map { e[$0] &- e[$0 - 1] })
        return byDelta.cost < byReference.cost ? byDelta : byReference
    }

    /// The streams after which the compressor ends a zstd frame, so that the next streams get a compressor of their own.
    static let frameEnds: Set<String> = ["value refs", "ts residuals"]

    /// The largest anchor lag the encoder tries (see ``predictAnchor(_:at:lag:)``).
    static let maxAnchorLag = 12

    /// The uncompressed body of `batch`, stream by stream in the order they are written (for measurements).
    package static func encodeStreams(_ batch: Batch) throws(BatchEncodingError) -> [(name: String, bytes: [UInt8])] {
        try encodeStreams(batch, stateful: nil)
    }

    /// The streams of a version 2 body, or with `stateful` those of a version 4 body after its state section: no device
    /// id and no sensor table (the receiver holds both), columns in table order, and the first timestamps, reference
    /// values, base sequence and base timestamp predicted from the context where `stateful` has one.
    static func encodeStreams(_ batch: Batch, stateful: StatefulPredictions?) throws(BatchEncodingError) -> [(name: String, bytes: [UInt8])] {
        let (columns, table) = try columns(of: batch, fixedOrder: stateful != nil)
        let total = columns.reduce(0) { $0 + $1.timestamps.count }

        let baseSequence = columns.lazy.compactMap { $0.sequences.min() }.min() ?? 0
        let baseTimestamp = columns.lazy.compactMap { $0.timestamps.min() }.min() ?? 0
        var unit: UInt64 = 0
        for column in columns {
            for t in column.timestamps { unit = gcd(unit, UInt64(bitPattern: t &- baseTimestamp)) }
        }
        if unit == 0 { unit = 1 }

        // Sequence predictions: the rank of each reading among all readings ordered by (timestamp, sensor, position).
        let predicted = sequenceRanks(columns.map(\.timestamps), base: baseSequence)
        let errors = columns.indices.map { i in
            columns[i].sequences.indices.map { j in Int64(bitPattern: columns[i].sequences[j] &- predicted[i][j]) }
        }
        let sequencesExact = errors.allSatisfy { $0.allSatisfy { $0 == 0 } }

        var idLengths = ByteWriter(), suffixes = ByteWriter()
        var quantities = ByteWriter(), resolutions = ByteWriter(), counts = ByteWriter()
        var previousName: [UInt8] = []
        var frameOrder = ByteWriter()
        var previousPosition = -1
        for position in table where stateful == nil {
            let column = columns[position]
            frameOrder.svarint(Int64(position - previousPosition - 1))
            previousPosition = position
            let name = Array(column.descriptor.id.rawValue.utf8)
            var shared = 0
            while shared < name.count, shared < previousName.count, name[shared] == previousName[shared] { shared += 1 }
            idLengths.uvarint(shared)
            idLengths.uvarint(name.count - shared)
            suffixes.bytes(name[shared...])
            previousName = name
            quantities.byte(column.descriptor.quantity.code)
            let resolution = column.descriptor.resolution
            if resolution == column.descriptor.quantity.defaultResolution {
                resolutions.uvarint(0)
            } else {
                resolutions.uvarint(UInt64(resolution.numerator))
                resolutions.uvarint(UInt64(resolution.denominator))
            }
        }
        var previousCount = 0
        for column in columns {
            counts.svarint(Int64(column.timestamps.count - previousCount))
            previousCount = column.timestamps.count
        }

        var modes = ByteWriter(), periods = ByteWriter(), gapLists = ByteWriter()
        var valueUnits = ByteWriter(), references = ByteWriter(), referenceRemainders = ByteWriter()
        var sequenceReferences = ByteWriter(), flagRuns = ByteWriter()
        var timestampResiduals = ByteWriter(capacity: total), valueResiduals = ByteWriter(capacity: total)
        var sequenceResiduals = ByteWriter(capacity: sequencesExact ? 0 : total)
        var anchors: [Int64] = []
        // Per anchor: its prediction from the context (the context reading's timestamp plus one period), or nil when the
        // sensor has no context and the anchor is predicted from the anchors before it.
        var anchorPredictions: [Int64?] = []
        var previousPeriod: Int64 = 0
        var previousReference: [QuantityResolution: (reference: Int64, unit: UInt64)] = [:]
        var previousUnit: [QuantityResolution: UInt64] = [:]
        var runs: [(flags: UInt16, length: Int)] = []

        for (sensor, column) in columns.enumerated() {
            let n = column.timestamps.count
            // Flags as runs over every reading of the batch, column after column: a batch without flags costs two bytes.
            for f in column.flags {
                if let last = runs.last, last.flags == f { runs[runs.count - 1].length += 1 } else { runs.append((f, 1)) }
            }
            guard n > 0 else { continue }

            // Timestamps, in units after the base.
            let x = column.timestamps.map { Int64(bitPattern: UInt64(bitPattern: $0 &- baseTimestamp) / unit) }
            var mode: UInt8 = 0
            let context = stateful?.context[sensor]
            if n == 1 {
                anchors.append(x[0])
                anchorPredictions.append(context.map { contextUnits($0.timestamp, base: baseTimestamp, unit: unit) &+ previousPeriod })
            } else {
                let coding = timestampCoding(x, previousPeriod: previousPeriod)
                mode |= coding.mode
                periods.svarint(coding.period &- previousPeriod)
                previousPeriod = coding.period
                if coding.mode == 0 {
                    gapLists.uvarint(coding.gaps.count)
                    var previousIndex = 0
                    for gap in coding.gaps {
                        gapLists.uvarint(gap.index - previousIndex)
                        gapLists.uvarint(gap.skip - 1)
                        previousIndex = gap.index
                    }
                }
                anchors.append(coding.anchor)
                anchorPredictions.append(context.map { contextUnits($0.timestamp, base: baseTimestamp, unit: unit) &+ coding.period })
                for r in coding.residuals { timestampResiduals.svarint(r) }
            }

            // Values, in steps; the unit and the reference are predicted from the previous sensor of the same quantity
            // and resolution, the reference as a quotient and remainder by both sensors' common step.
            let key = QuantityResolution(quantity: column.descriptor.quantity, resolution: column.descriptor.resolution)
            let reference: Int64
            var g: UInt64 = 0
            if n == 1 {
                reference = column.steps[0]
            } else {
                for s in column.steps { g = gcd(g, (s - column.steps[0]).magnitude) }
                let coding = valueCoding(column.steps, unit: Int64(g))
                mode |= coding.mode << 1
                valueUnits.uvarint(g == (previousUnit[key] ?? 1) ? 0 : g &+ 1)
                previousUnit[key] = g
                reference = coding.anchor
                for r in coding.residuals { valueResiduals.svarint(r) }
            }
            let previous = previousReference[key] ?? (0, 0)
            let predicted = context?.steps ?? previous.reference
            let (quotient, remainder) = referenceDivision(reference &- predicted, unit: max(gcd(g, previous.unit), 1))
            references.svarint(quotient)
            if let remainder { referenceRemainders.uvarint(remainder) }
            previousReference[key] = (reference, g)

            // Sequences, unless every one is its rank: the error of the prediction, against its median or delta-coded.
            if !sequencesExact {
                if n == 1 {
                    sequenceReferences.svarint(errors[sensor][0])
                } else {
                    let coding = sequenceCoding(errors[sensor])
                    mode |= coding.mode << 2
                    sequenceReferences.svarint(coding.anchor)
                    for r in coding.residuals { sequenceResiduals.svarint(r) }
                }
            }
            if n >= 2 { modes.byte(mode) }
        }
        flagRuns.uvarint(runs.count)
        for run in runs {
            flagRuns.uvarint(UInt64(run.flags))
            flagRuns.uvarint(run.length)
        }

        // First timestamps: each predicted from the ones before it with the lag that costs least.
        var lag = 0
        var lagCost = Int.max
        for candidate in 0...min(maxAnchorLag, anchors.count) {
            let cost = anchors.indices.reduce(0) {
                $0 + (anchorPredictions[$1] == nil ? codeBits(anchors[$1] &- predictAnchor(anchors, at: $1, lag: candidate)) : 0)
            }
            if cost < lagCost {
                lag = candidate
                lagCost = cost
            }
        }
        var anchorStream = ByteWriter()
        for j in anchors.indices {
            anchorStream.svarint(anchors[j] &- (anchorPredictions[j] ?? predictAnchor(anchors, at: j, lag: lag)))
        }

        var header = ByteWriter()
        if let stateful {
            header.uvarint(total)
            if let newest = stateful.newest {
                header.svarint(Int64(bitPattern: baseSequence &- (newest.sequence &+ 1)))
                header.svarint(baseTimestamp &- newest.timestamp)
            } else {
                header.uvarint(baseSequence)
                header.svarint(baseTimestamp)
            }
        } else {
            header.uvarint(batch.device.rawValue.utf8.count)
            header.bytes(batch.device.rawValue.utf8)
            header.uvarint(columns.count)
            header.uvarint(total)
            header.uvarint(baseSequence)
            header.svarint(baseTimestamp)
        }
        header.uvarint(unit)
        header.byte(sequencesExact ? layoutSequencesExact : 0)
        header.uvarint(lag)

        return [
            ("header", header), ("quantities", quantities), ("id lengths", idLengths), ("id suffixes", suffixes),
            ("resolutions", resolutions), ("frame order", frameOrder), ("flags", flagRuns), ("counts", counts), ("modes", modes),
            ("ts periods", periods), ("value units", valueUnits), ("ts gaps", gapLists),
            ("seq refs", sequenceReferences), ("ts anchors", anchorStream),
            ("value ref remainders", referenceRemainders), ("value refs", references),
            ("ts residuals", timestampResiduals), ("value residuals", valueResiduals), ("seq residuals", sequenceResiduals),
        ].map { (name: $0.0, bytes: $0.1.bytes) }
    }
}

/// A strict total order on ids that compares runs of digits by their numeric value ("tank2" < "tank10"), then bytewise:
/// the order of a sensor table, and of readings with one timestamp in a frame's sequence prediction.
public func naturalOrder(_ a: String, _ b: String) -> Bool {
    let x = Array(a.utf8), y = Array(b.utf8)
    func isDigit(_ c: UInt8) -> Bool { c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9") }
    var i = 0, j = 0
    while i < x.count && j < y.count {
        if isDigit(x[i]) && isDigit(y[j]) {
            var i2 = i, j2 = j
            while i2 < x.count && isDigit(x[i2]) { i2 += 1 }
            while j2 < y.count && isDigit(y[j2]) { j2 += 1 }
            // Compare numerically: strip leading zeros, then the longer run is larger, else bytewise.
            var p = i, q = j
            while p < i2 - 1 && x[p] == UInt8(ascii: "0") { p += 1 }
            while q < j2 - 1 && y[q] == UInt8(ascii: "0") { q += 1 }
            if i2 - p != j2 - q { return i2 - p < j2 - q }
            if !x[p..<i2].elementsEqual(y[q..<j2]) { return x[p..<i2].lexicographicallyPrecedes(y[q..<j2]) }
            i = i2
            j = j2
        } else {
            if x[i] != y[j] { return x[i] < y[j] }
            i += 1
            j += 1
        }
    }
    if x.count - i != y.count - j { return x.count - i < y.count - j }
    return x.lexicographicallyPrecedes(y)
}

/// The prediction of the `j`th first timestamp (in frame order, sensors with readings) from those before it: the
/// previous one plus the step between the two that are `lag` places further back (lag 0: the previous one itself).
/// `lag` 1 extrapolates a constant spacing; lag k repeats a pattern of k spacings, as sensors staggered in a
/// repeating order of kinds produce. Wrapping arithmetic: total on any input.
func predictAnchor(_ anchors: [Int64], at j: Int, lag: Int) -> Int64 {
    guard j >= 1 else { return 0 }
    guard lag >= 1, j - lag - 1 >= 0 else { return anchors[j - 1] }
    return anchors[j - 1] &+ (anchors[j - lag] &- anchors[j - lag - 1])
}

/// For each reading of `timestamps` (columns in frame order), `base` plus its rank among all readings ordered by
/// (timestamp, column, position).
func sequenceRanks(_ timestamps: [[Int64]], base: UInt64) -> [[UInt64]] {
    var order: [(timestamp: Int64, sensor: Int32, position: Int32)] = []
    order.reserveCapacity(timestamps.reduce(0) { $0 + $1.count })
    for (sensor, column) in timestamps.enumerated() {
        for (position, t) in column.enumerated() { order.append((t, Int32(truncatingIfNeeded: sensor), Int32(truncatingIfNeeded: position))) }
    }
    order.sort { ($0.timestamp, $0.sensor, $0.position) < ($1.timestamp, $1.sensor, $1.position) }
    var ranks = timestamps.map { [UInt64](repeating: 0, count: $0.count) }
    for (rank, entry) in order.enumerated() {
        ranks[Int(entry.sensor)][Int(entry.position)] = base &+ UInt64(rank)
    }
    return ranks
}

/// A difference `d` of reference values as `d = quotient × unit + remainder` with `0 ≤ remainder < unit`, no remainder
/// when `unit` is 1. `unit` (≥ 1) is a GCD of differences of values in steps, far below `Int64.max`.
func referenceDivision(_ difference: Int64, unit: UInt64) -> (quotient: Int64, remainder: UInt64?) {
    guard unit > 1 else { return (difference, nil) }
    let u = Int64(clamping: unit)
    let (q, r) = difference.quotientAndRemainder(dividingBy: u)
    return r < 0 ? (q - 1, UInt64(r + u)) : (q, UInt64(r))
}

/// How one column of timestamps is coded.
struct TimestampCoding {
    var mode: UInt8
    var period: Int64
    var anchor: Int64
    var gaps: [(index: Int, skip: UInt64)]
    var residuals: [Int64]

    func cost(previousPeriod: Int64) -> Int {
        residuals.reduce(0) { $0 + codeBits($1) } + codeBits(period &- previousPeriod) + 8 * gaps.count
    }
}

/// A timestamp of the context in units after the base, as the frame's timestamps are (signed: the context is usually
/// before the base). Wrapping, total on any input.
func contextUnits(_ timestamp: Int64, base: Int64, unit: UInt64) -> Int64 {
    let u = Int64(truncatingIfNeeded: unit)
    guard u > 0 else { return 0 }
    return (timestamp &- base) / u
}

/// What a version 4 body is predicted from: per column (table order), the context reading in steps, if used; and the
/// newest (sequence, timestamp) of the context, which predicts the base sequence and timestamp.
struct StatefulPredictions {
    var context: [(timestamp: Int64, steps: Int64)?]
    var newest: (sequence: UInt64, timestamp: Int64)?
}

/// The key under which the previous sensor's reference value predicts the next one's.
struct QuantityResolution: Hashable {
    var quantity: Quantity
    var resolution: Resolution
}
