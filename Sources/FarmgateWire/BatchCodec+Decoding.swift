// The decoder of the binary batch format; the layout is documented on ``BatchCodec``.
//
// Every count is checked against the limits and against the bytes that remain before anything is allocated for it;
// arithmetic on decoded numbers wraps instead of trapping, and decoded values are range-checked afterwards.

/// The largest magnitude of a value in steps (as ``Resolution/quantize(_:)`` produces).
private let maxStepsMagnitude: UInt64 = 9_000_000_000_000_000

extension BatchCodec {
    static func decodeBody(_ body: [UInt8], limits: BatchLimits) throws(BatchDecodingError) -> Batch {
        var reader = ByteReader(body)

        // Header.
        let deviceLength = try reader.count("device id length", limit: identifierMaxLength)
        let deviceBytes = try reader.bytes(count: deviceLength, "device id")
        let device: DeviceID
        do { device = try DeviceID(String(decoding: deviceBytes, as: UTF8.self)) } catch {
            throw BatchDecodingError(error.description)
        }
        let sensorCount = try reader.count("sensor count", limit: limits.maxSensors)
        // Each sensor takes at least five bytes of the tables (prefix, suffix length, quantity, resolution, count).
        guard sensorCount <= reader.remaining / 5 else {
            throw BatchDecodingError("the frame declares \(sensorCount) sensors but only \(reader.remaining) bytes remain", kind: .truncated)
        }
        let declaredTotal = try reader.uvarint("reading count")
        guard declaredTotal <= UInt64(max(limits.maxReadings, 0)) else {
            throw BatchDecodingError("reading count is \(declaredTotal), more than the limit of \(limits.maxReadings)", kind: .tooManyReadings)
        }
        let total = Int(declaredTotal)
        // Each reading takes at least one byte of residuals or per-sensor fields.
        guard total <= reader.remaining else {
            throw BatchDecodingError("the frame declares \(total) readings but only \(reader.remaining) bytes remain", kind: .truncated)
        }
        let baseSequence = try reader.uvarint("base sequence")
        let baseTimestamp = try reader.svarint("base timestamp")
        let unit = try reader.uvarint("timestamp unit")
        guard unit > 0 else { throw BatchDecodingError("the timestamp unit is 0") }
        let layout = try reader.byte("layout")
        guard layout & ~layoutSequencesExact == 0 else {
            throw BatchDecodingError("unknown layout bits 0x\(String(layout, radix: 16))")
        }
        let sequencesExact = layout & layoutSequencesExact != 0
        let anchorLag = try reader.count("anchor lag", limit: sensorCount)

        // Sensor table: quantities, then the front-coded ids as (shared prefix, suffix length) pairs and suffix bytes.
        var quantities: [Quantity] = []
        quantities.reserveCapacity(sensorCount)
        // A quantity newer than this decoder is named with its sensor's id once the ids are read, so that the person
        // reading the refusal knows which sensor needs a newer ingest.
        var unknownQuantity: (index: Int, code: UInt8)?
        for i in 0..<sensorCount {
            let code = try reader.byte("sensor \(i) quantity")
            if let quantity = Quantity(code: code) {
                quantities.append(quantity)
            } else {
                if unknownQuantity == nil { unknownQuantity = (i, code) }
                quantities.append(.count)
            }
        }
        var prefixLengths = [Int](), suffixLengths = [Int]()
        prefixLengths.reserveCapacity(sensorCount)
        suffixLengths.reserveCapacity(sensorCount)
        for i in 0..<sensorCount {
            prefixLengths.append(try reader.count("sensor \(i) id prefix length", limit: identifierMaxLength))
            suffixLengths.append(try reader.count("sensor \(i) id suffix length", limit: identifierMaxLength))
        }
        var ids: [SensorID] = []
        ids.reserveCapacity(sensorCount)
        var seen = Set<SensorID>(minimumCapacity: sensorCount)
        var previousName: [UInt8] = []
        for i in 0..<sensorCount {
            guard prefixLengths[i] <= previousName.count else {
                throw BatchDecodingError(
                    "sensor \(i) id shares \(prefixLengths[i]) bytes with the previous id, which has only \(previousName.count)")
            }
            let suffix = try reader.bytes(count: suffixLengths[i], "sensor \(i) id")
            let name = previousName[0..<prefixLengths[i]] + suffix
            let id: SensorID
            do { id = try SensorID(String(decoding: name, as: UTF8.self)) } catch {
                throw BatchDecodingError("sensor \(i): \(error.description)")
            }
            guard seen.insert(id).inserted else { throw BatchDecodingError("sensor '\(id)' is described more than once") }
            ids.append(id)
            previousName = Array(name)
        }
        if let unknownQuantity {
            throw BatchDecodingError(
                "sensor '\(ids[unknownQuantity.index])' has quantity code \(unknownQuantity.code), which this ingest does not know "
                    + "(known: 1-\(Quantity.allCases.map(\.code).max() ?? 0)); upgrade the ingest, or remove the sensor from the device")
        }
        var table: [SensorDescriptor] = []
        table.reserveCapacity(sensorCount)
        for i in 0..<sensorCount {
            let numerator = try reader.uvarint("sensor \(i) resolution")
            var resolution = quantities[i].defaultResolution
            if numerator != 0 {
                let denominator = try reader.uvarint("sensor \(i) resolution denominator")
                guard numerator <= UInt64(Resolution.maxComponent), denominator <= UInt64(Resolution.maxComponent),
                    let parsed = try? Resolution(numerator: UInt32(numerator), denominator: UInt32(denominator))
                else {
                    throw BatchDecodingError(
                        "sensor '\(ids[i])' has invalid resolution \(numerator)/\(denominator) (parts must be 1 to \(Resolution.maxComponent))")
                }
                resolution = parsed
            }
            table.append(SensorDescriptor(id: ids[i], quantity: quantities[i], resolution: resolution))
        }
        // Frame order: the frame position of each table entry, a permutation.
        var framed = [SensorDescriptor?](repeating: nil, count: sensorCount)
        var previousPosition: Int64 = -1
        for k in 0..<sensorCount {
            let position = previousPosition &+ 1 &+ (try reader.svarint("sensor '\(ids[k])' frame position"))
            guard position >= 0, position < Int64(sensorCount), framed[Int(position)] == nil else {
                throw BatchDecodingError("sensor '\(ids[k])' has frame position \(position), outside 0..<\(sensorCount) or taken")
            }
            framed[Int(position)] = table[k]
            previousPosition = position
        }
        let descriptors = framed.compactMap { $0 }
        let readings = try decodeColumns(
            &reader, descriptors: descriptors, total: total,
            header: BodyHeader(baseSequence: baseSequence, baseTimestamp: baseTimestamp, unit: unit, sequencesExact: sequencesExact, anchorLag: anchorLag),
            stateful: nil, limits: limits)
        return Batch(device: device, sensors: table.sorted { $0.id < $1.id }, readings: readings)
    }

    /// The numbers of a body's header that the streams are decoded with.
    struct BodyHeader {
        var baseSequence: UInt64
        var baseTimestamp: Int64
        var unit: UInt64
        var sequencesExact: Bool
        var anchorLag: Int
    }

    /// Decodes the streams that follow the sensor table (version 2) or the header (version 4), for `descriptors` in frame
    /// order; with `stateful`, the first timestamps and reference values of the sensors that have a context reading are
    /// predicted from it. Returns the readings in canonical order, and checks that the body ends with them.
    static func decodeColumns(
        _ reader: inout ByteReader, descriptors: [SensorDescriptor], total: Int, header: BodyHeader, stateful: StatefulPredictions?,
        limits: BatchLimits
    ) throws(BatchDecodingError) -> [Reading] {
        let sensorCount = descriptors.count
        let ids = descriptors.map(\.id)
        let (baseSequence, baseTimestamp, unit) = (header.baseSequence, header.baseTimestamp, header.unit)
        let (sequencesExact, anchorLag) = (header.sequencesExact, header.anchorLag)
        // Flags: runs over every reading, column after column; one value for all when there is a single run.
        var allFlags: [UInt16] = []
        let runCount = try reader.count("flag run count", limit: total)
        if runCount == 1 {
            let value = try reader.uvarint("flags")
            guard value <= UInt64(UInt16.max) else { throw BatchDecodingError("flags \(value) are more than 16 bits") }
            let length = try reader.count("flag run length", limit: total)
            guard length == total else { throw BatchDecodingError("the flag runs cover \(length) of the \(total) readings") }
            allFlags = [UInt16(value)]
        } else if runCount > 1 {
            allFlags.reserveCapacity(total)
            for _ in 0..<runCount {
                let value = try reader.uvarint("flags")
                guard value <= UInt64(UInt16.max) else { throw BatchDecodingError("flags \(value) are more than 16 bits") }
                let length = try reader.count("flag run length", limit: total - allFlags.count)
                guard length > 0 else { throw BatchDecodingError("a flag run is empty") }
                allFlags.append(contentsOf: repeatElement(UInt16(value), count: length))
            }
            guard allFlags.count == total else {
                throw BatchDecodingError("the flag runs cover \(allFlags.count) of the \(total) readings")
            }
        } else if total > 0 {
            throw BatchDecodingError("no flag runs cover the \(total) readings")
        }
        var flagOffset = 0
        var counts: [Int] = []
        counts.reserveCapacity(sensorCount)
        var sum = 0
        var previousCount: Int64 = 0
        for i in 0..<sensorCount {
            let signed = previousCount &+ (try reader.svarint("sensor \(i) reading count"))
            guard signed >= 0 else {
                throw BatchDecodingError("sensor '\(ids[i])' declares \(signed) readings")
            }
            previousCount = signed
            let n = UInt64(signed)
            guard n <= UInt64(limits.maxReadings) else {
                throw BatchDecodingError("sensor '\(ids[i])' declares \(n) readings, more than the limit of \(limits.maxReadings)")
            }
            sum += Int(n)  // at most maxSensors × maxReadings: cannot overflow
            guard sum <= total else {
                throw BatchDecodingError("sensor '\(ids[i])' declares \(n) readings, more than the \(total) the batch holds")
            }
            counts.append(Int(n))
        }
        guard sum == total else {
            throw BatchDecodingError("the sensors declare \(sum) readings in all but the batch holds \(total)")
        }

        // Per-sensor parameters, in the order the encoder writes their streams.
        var timestampModes = [UInt8](repeating: 0, count: sensorCount)
        var periods = [Int64](repeating: 0, count: sensorCount)
        var anchors = [Int64](repeating: 0, count: sensorCount)
        var valueModes = [UInt8](repeating: 0, count: sensorCount)
        var valueUnits = [UInt64](repeating: 0, count: sensorCount)
        var references = [Int64](repeating: 0, count: sensorCount)
        var sequenceModes = [UInt8](repeating: 0, count: sensorCount)
        var sequenceReferences = [Int64](repeating: 0, count: sensorCount)
        for i in 0..<sensorCount where counts[i] >= 2 {
            let modes = try reader.byte("sensor '\(ids[i])' modes")
            guard modes <= (sequencesExact ? 3 : 7) else {
                throw BatchDecodingError("sensor '\(ids[i])' has unknown modes 0x\(String(modes, radix: 16))")
            }
            timestampModes[i] = modes & 1
            valueModes[i] = (modes >> 1) & 1
            sequenceModes[i] = (modes >> 2) & 1
        }
        var previousPeriod: Int64 = 0
        for i in 0..<sensorCount where counts[i] >= 2 {
            periods[i] = previousPeriod &+ (try reader.svarint("sensor '\(ids[i])' timestamp period"))
            previousPeriod = periods[i]
        }
        var previousUnit: [QuantityResolution: UInt64] = [:]
        for i in 0..<sensorCount where counts[i] >= 2 {
            let key = QuantityResolution(quantity: descriptors[i].quantity, resolution: descriptors[i].resolution)
            let code = try reader.uvarint("sensor '\(ids[i])' value unit")
            let g = code == 0 ? previousUnit[key] ?? 1 : code &- 1
            guard g <= 2 * maxStepsMagnitude else {
                throw BatchDecodingError("sensor '\(ids[i])' has value unit \(g), larger than any difference of two values")
            }
            valueUnits[i] = g
            previousUnit[key] = g
        }
        var flags: [[UInt16]] = Array(repeating: [], count: sensorCount)
        for i in 0..<sensorCount {
            if allFlags.count == 1 {
                if allFlags[0] != 0 { flags[i] = [UInt16](repeating: allFlags[0], count: counts[i]) }
            } else if !allFlags.isEmpty {
                flags[i] = Array(allFlags[flagOffset..<(flagOffset + counts[i])])
                flagOffset += counts[i]
            }
        }
        // Slot of each reading in grid-coded timestamp columns: one more than the previous; at a listed gap, 2 + the
        // coded number (the encoder writes slots skipped − 1, which is ≥ 0).
        var slots: [[Int64]] = Array(repeating: [], count: sensorCount)
        for i in 0..<sensorCount where counts[i] >= 2 && timestampModes[i] == 0 {
            let n = counts[i]
            let gapCount = try reader.count("sensor '\(ids[i])' timestamp gap count", limit: n - 1)
            var increments = [Int64](repeating: 1, count: n)
            increments[0] = 0
            var index = 0
            for _ in 0..<gapCount {
                let advance = try reader.count("sensor '\(ids[i])' timestamp gap position", limit: n - 1 - index)
                guard advance > 0 else { throw BatchDecodingError("sensor '\(ids[i])' lists a timestamp gap twice") }
                index += advance
                increments[index] = 2 &+ Int64(truncatingIfNeeded: try reader.uvarint("sensor '\(ids[i])' timestamp gap"))
            }
            var slot: Int64 = 0
            slots[i] = increments.map { increment in
                slot = slot &+ increment
                return slot
            }
        }
        if !sequencesExact {
            for i in 0..<sensorCount where counts[i] >= 1 {
                sequenceReferences[i] = try reader.svarint("sensor '\(ids[i])' sequence reference")
            }
        }
        var decodedAnchors: [Int64] = []
        decodedAnchors.reserveCapacity(sensorCount)
        var periodInEffect: Int64 = 0
        for i in 0..<sensorCount where counts[i] >= 1 {
            // A sensor with one reading is predicted with the period of the last sensor before it that has two or more.
            if counts[i] >= 2 { periodInEffect = periods[i] }
            let prediction =
                stateful?.context[i].map { contextUnits($0.timestamp, base: baseTimestamp, unit: unit) &+ periodInEffect }
                ?? predictAnchor(decodedAnchors, at: decodedAnchors.count, lag: anchorLag)
            anchors[i] = prediction &+ (try reader.svarint("sensor '\(ids[i])' first timestamp"))
            decodedAnchors.append(anchors[i])
        }
        // Reference values: each the previous one of its quantity and resolution plus quotient × unit + remainder, the
        // unit being the GCD of both sensors' value units; remainders only where the unit is above 1.
        var referenceUnits = [UInt64](repeating: 1, count: sensorCount)
        var previousValueUnit: [QuantityResolution: UInt64] = [:]
        for i in 0..<sensorCount where counts[i] >= 1 {
            let key = QuantityResolution(quantity: descriptors[i].quantity, resolution: descriptors[i].resolution)
            referenceUnits[i] = max(gcd(valueUnits[i], previousValueUnit[key] ?? 0), 1)
            previousValueUnit[key] = valueUnits[i]
        }
        var remainders = [UInt64](repeating: 0, count: sensorCount)
        for i in 0..<sensorCount where counts[i] >= 1 && referenceUnits[i] > 1 {
            remainders[i] = try reader.uvarint("sensor '\(ids[i])' reference value remainder")
            guard remainders[i] < referenceUnits[i] else {
                throw BatchDecodingError(
                    "sensor '\(ids[i])' has reference remainder \(remainders[i]), not below its unit \(referenceUnits[i])")
            }
        }
        var previousReference: [QuantityResolution: Int64] = [:]
        for i in 0..<sensorCount where counts[i] >= 1 {
            let key = QuantityResolution(quantity: descriptors[i].quantity, resolution: descriptors[i].resolution)
            let quotient = try reader.svarint("sensor '\(ids[i])' reference value")
            let predicted = stateful?.context[i]?.steps ?? previousReference[key] ?? 0
            references[i] = predicted &+ quotient &* Int64(truncatingIfNeeded: referenceUnits[i])
                &+ Int64(truncatingIfNeeded: remainders[i])
            previousReference[key] = references[i]
        }

        // Timestamps.
        var timestamps: [[Int64]] = []
        timestamps.reserveCapacity(sensorCount)
        for i in 0..<sensorCount {
            let n = counts[i]
            var x = [Int64](repeating: anchors[i], count: n)
            if n >= 2 {
                let period = periods[i]
                if timestampModes[i] == 0 {
                    for j in 0..<n {
                        let r = try reader.svarint("sensor '\(ids[i])' timestamp \(j)")
                        x[j] = anchors[i] &+ slots[i][j] &* period &+ r
                    }
                } else {
                    for j in 1..<n {
                        x[j] = x[j - 1] &+ period &+ (try reader.svarint("sensor '\(ids[i])' timestamp \(j)"))
                    }
                }
            }
            timestamps.append(x.map { baseTimestamp &+ Int64(bitPattern: UInt64(bitPattern: $0) &* unit) })
        }

        // Values.
        var steps: [[Int64]] = []
        steps.reserveCapacity(sensorCount)
        for i in 0..<sensorCount {
            let n = counts[i]
            var s = [Int64](repeating: references[i], count: n)
            let g = Int64(truncatingIfNeeded: valueUnits[i])
            if n >= 2 && g != 0 {
                if valueModes[i] == 0 {
                    for j in 0..<n { s[j] = references[i] &+ (try reader.svarint("sensor '\(ids[i])' value \(j)")) &* g }
                } else {
                    for j in 1..<n { s[j] = s[j - 1] &+ (try reader.svarint("sensor '\(ids[i])' value \(j)")) &* g }
                }
            }
            if let bad = s.first(where: { $0.magnitude >= maxStepsMagnitude }) {
                throw BatchDecodingError("sensor '\(ids[i])' has a value of \(bad) steps, beyond what a value can hold")
            }
            steps.append(s)
        }

        // Sequences: rank among all readings by (timestamp, sensor, position), plus the coded error.
        var sequences = sequenceRanks(timestamps, base: baseSequence)
        if !sequencesExact {
            for i in 0..<sensorCount where counts[i] >= 1 {
                let n = counts[i]
                var errors = [Int64](repeating: sequenceReferences[i], count: n)
                if n >= 2 {
                    if sequenceModes[i] == 0 {
                        for j in 0..<n { errors[j] = sequenceReferences[i] &+ (try reader.svarint("sensor '\(ids[i])' sequence \(j)")) }
                    } else {
                        for j in 1..<n { errors[j] = errors[j - 1] &+ (try reader.svarint("sensor '\(ids[i])' sequence \(j)")) }
                    }
                }
                for j in 0..<n { sequences[i][j] = sequences[i][j] &+ UInt64(bitPattern: errors[j]) }
            }
        }
        guard reader.isAtEnd else {
            throw BatchDecodingError("\(reader.remaining) bytes follow the last reading")
        }

        // Canonical order: by sequence, ties (only in batches that repeat a sequence) by sensor and position.
        var output: [(sequence: UInt64, sensor: Int32, position: Int32)] = []
        output.reserveCapacity(total)
        for i in 0..<sensorCount {
            for j in 0..<counts[i] { output.append((sequences[i][j], Int32(i), Int32(j))) }
        }
        output.sort { ($0.sequence, $0.sensor, $0.position) < ($1.sequence, $1.sensor, $1.position) }
        let readings = output.map { entry in
            let (i, j) = (Int(entry.sensor), Int(entry.position))
            return Reading(
                sensor: ids[i], sequence: entry.sequence, timestamp: Timestamp(microseconds: timestamps[i][j]),
                value: descriptors[i].resolution.value(ofSteps: steps[i][j]),
                quality: QualityFlags(rawValue: flags[i].isEmpty ? 0 : flags[i][j]))
        }
        return readings
    }
}
