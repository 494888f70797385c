import FarmgateWire

/// One sensor's registers on a bus, as the bus plans its requests.
struct ModbusMember: Sendable, Hashable {
    var sensor: SensorID
    var slave: Int
    var function: ModbusFunction
    var address: Int
    var count: Int
    /// Registers at most this far from the previous member's are read in the same request.
    var coalesceGap: Int
    var responseTimeout: Duration
    /// A block read for another member is served to this one only while it is younger than this (the sensor's
    /// interval) and than ``ModbusLink/sharedReadWindow``: one request per sampling tick feeds every sensor in the
    /// block, never a value a round old.
    var maxAge: Duration

    var end: Int { address + count }
}

/// One slave and function: the unit inside which registers can be read together.
struct ModbusUnit: Sendable, Hashable {
    var slave: Int
    var function: ModbusFunction
}

/// One request on the bus and the sensors it feeds.
struct ModbusBlock: Sendable, Hashable {
    var unit: ModbusUnit
    var start: Int
    var count: Int
    /// The longest response timeout among the members (each waits for the one request).
    var responseTimeout: Duration
    /// The shortest maximum age among the members.
    var maxAge: Duration
    var members: [SensorID]
}

/// Groups the registers of a bus's sensors into as few requests as the protocol and the configured gaps allow.
/// A pure function of its input, so that the grouping is tested without a bus.
enum ModbusRequestPlan {
    /// The most registers one read request may ask for (Modbus Application Protocol V1.1b3, 6.3 and 6.4).
    static let maxRegistersPerRequest = 125

    /// - Parameters:
    ///   - members: every sensor on the bus.
    ///   - uncoalesced: units whose registers are read one sensor at a time (the slave refused a coalesced read, for
    ///     example because it has no register in a gap).
    static func blocks(for members: [ModbusMember], uncoalesced: Set<ModbusUnit> = []) -> [ModbusBlock] {
        let byUnit = Dictionary(grouping: members) { ModbusUnit(slave: $0.slave, function: $0.function) }
        var blocks: [ModbusBlock] = []
        for unit in byUnit.keys.sorted(by: { ($0.slave, $0.function.code) < ($1.slave, $1.function.code) }) {
            let sorted = (byUnit[unit] ?? []).sorted { ($0.address, $0.count, $0.sensor.rawValue) < ($1.address, $1.count, $1.sensor.rawValue) }
            var current: (block: ModbusBlock, gap: Int)?
            for member in sorted {
                if var (block, gap) = current, !uncoalesced.contains(unit) {
                    let end = block.start + block.count
                    let distance = member.address - end
                    let newEnd = max(end, member.end)
                    if distance <= min(gap, member.coalesceGap), newEnd - block.start <= maxRegistersPerRequest {
                        block.count = newEnd - block.start
                        block.members.append(member.sensor)
                        block.responseTimeout = max(block.responseTimeout, member.responseTimeout)
                        block.maxAge = min(block.maxAge, member.maxAge)
                        gap = min(gap, member.coalesceGap)
                        current = (block, gap)
                        continue
                    }
                }
                if let (block, _) = current { blocks.append(block) }
                current = (
                    ModbusBlock(
                        unit: unit, start: member.address, count: member.count, responseTimeout: member.responseTimeout,
                        maxAge: member.maxAge, members: [member.sensor]),
                    member.coalesceGap
                )
            }
            if let (block, _) = current { blocks.append(block) }
        }
        return blocks
    }
}
