@testable import FarmgateAgent
import FarmgateWire
import Testing

@Suite("Modbus request planning and decoding")
struct ModbusRequestPlanTests {
    func member(_ id: String, slave: Int = 1, function: ModbusFunction = .holding, at address: Int, count: Int = 1, gap: Int = 4, timeout: Int = 500, age: Int = 10)
        throws -> ModbusMember
    {
        ModbusMember(
            sensor: try SensorID(id), slave: slave, function: function, address: address, count: count, coalesceGap: gap,
            responseTimeout: .milliseconds(timeout), maxAge: .seconds(age))
    }

    @Test("Registers within the gap share a request; other slaves, functions and far registers do not")
    func grouping() throws {
        let blocks = ModbusRequestPlan.blocks(for: [
            try member("a", at: 0), try member("b", at: 1, count: 2), try member("c", at: 7), try member("d", at: 13),
            try member("e", slave: 2, at: 1), try member("f", function: .input, at: 1),
        ])
        #expect(blocks.map(\.members.count) == [3, 1, 1, 1])
        let first = try #require(blocks.first)
        #expect(first.start == 0 && first.count == 8)
        #expect(first.members.map(\.rawValue) == ["a", "b", "c"])
        #expect(blocks[1].start == 13)
        #expect(blocks[2].unit == ModbusUnit(slave: 1, function: .input))
        #expect(blocks[3].unit.slave == 2)
    }

    @Test("A block takes the longest timeout and the shortest age of its members; the smaller gap wins")
    func blockProperties() throws {
        let blocks = ModbusRequestPlan.blocks(for: [
            try member("a", at: 0, timeout: 200, age: 30), try member("b", at: 2, gap: 0, timeout: 800, age: 5), try member("c", at: 4, gap: 4),
        ])
        #expect(blocks.count == 3)  // a–b are 1 apart but b allows no gap; b–c likewise
        let merged = ModbusRequestPlan.blocks(for: [try member("a", at: 0, timeout: 200, age: 30), try member("b", at: 1, timeout: 800, age: 5)])
        #expect(merged.count == 1)
        #expect(merged[0].responseTimeout == .milliseconds(800))
        #expect(merged[0].maxAge == .seconds(5))
    }

    @Test("A request never asks for more than 125 registers; uncoalesced units are read one sensor at a time")
    func limits() throws {
        let spread = try (0..<40).map { try member("s\($0)", at: $0 * 4, count: 2) }
        let blocks = ModbusRequestPlan.blocks(for: spread)
        #expect(blocks.allSatisfy { $0.count <= 125 })
        #expect(blocks.flatMap(\.members).count == 40)
        #expect(blocks.count == 2)
        let single = ModbusRequestPlan.blocks(for: spread, uncoalesced: [ModbusUnit(slave: 1, function: .holding)])
        #expect(single.count == 40)
    }

    @Test("Decoding: the HARDWARE.md SUP-PH8001 answer, signed and unsigned, word and byte order, NaN refused")
    func decoding() {
        // "01 03 06 00 FA 02 BC 00 06": 25.0 °C, pH 7.00, 0.6 mV.
        let registers: [UInt16] = [0x00FA, 0x02BC, 0x0006]
        #expect(ModbusPoint(slave: 1, address: 0, scale: 0.1).decode(registers[0...]) == 25)
        #expect(ModbusPoint(slave: 1, address: 1, scale: 0.01).decode(registers[1...]) == 7)
        #expect(ModbusPoint(slave: 1, address: 0, dataType: .int16).decode([0xFF38][...]) == -200)
        #expect(ModbusPoint(slave: 1, address: 0, dataType: .uint16).decode([0xFF38][...]) == 65336)
        let bits = Float(-12.25).bitPattern
        let high = UInt16(bits >> 16), low = UInt16(bits & 0xFFFF)
        #expect(ModbusPoint(slave: 1, address: 0, dataType: .float32).decode([high, low][...]) == -12.25)
        #expect(ModbusPoint(slave: 1, address: 0, dataType: .float32, lowWordFirst: true).decode([low, high][...]) == -12.25)
        #expect(
            ModbusPoint(slave: 1, address: 0, dataType: .float32, swapBytes: true).decode([high.byteSwapped, low.byteSwapped][...]) == -12.25)
        #expect(ModbusPoint(slave: 1, address: 0, dataType: .uint32, lowWordFirst: true).decode([0x0001, 0x0002][...]) == 0x0002_0001)
        #expect(ModbusPoint(slave: 1, address: 0, dataType: .float32).decode([0x7FC0, 0x0000][...]) == nil)
        #expect(ModbusPoint(slave: 1, address: 0, dataType: .int32).decode([0x0001][...]) == nil)
    }

    @Test("The silent interval is 3.5 character times (of at least 11 bits) up to 19200 baud and 1750 µs above")
    func silentInterval() {
        #expect(ModbusBusSettings(port: "/dev/x", baud: 9600, parity: .even).silentInterval == .nanoseconds(4_010_417))
        // 8N1 is 10 bits on the wire, but the specification counts an RTU character as 11.
        #expect(ModbusBusSettings(port: "/dev/x", baud: 9600).silentInterval == .nanoseconds(4_010_417))
        #expect(ModbusBusSettings(port: "/dev/x", baud: 115_200).silentInterval == .microseconds(1750))
    }
}
