import FarmgateSupport
import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The serial line of one Modbus RTU bus. Every sensor on one port must give the same settings: they are one wire.
public struct ModbusBusSettings: Sendable, Hashable, CustomStringConvertible {
    public enum Parity: String, Sendable, Hashable, CaseIterable {
        case none, even, odd

        /// The character libmodbus takes.
        var letter: Character {
            switch self {
            case .none: "N"
            case .even: "E"
            case .odd: "O"
            }
        }
    }

    /// `port`: the serial device, best a stable `/dev/serial/by-id/...` path; a relative path is resolved against the
    /// configuration file's directory. Required.
    public var port: String
    /// `baud`: default 9600 (what most water-quality transmitters ship with).
    public var baud: Int
    /// `parity`: `none` (default), `even` or `odd`.
    public var parity: Parity
    /// `data_bits`: 8, the only value Modbus RTU defines (7 is refused).
    public var dataBits: Int
    /// `stop_bits`: 1 (default) or 2.
    public var stopBits: Int
    /// `rs485`: put the UART in the kernel's RS-485 mode (a UART with a transceiver whose direction pin the kernel drives).
    /// Default false: USB RS-485 adapters switch direction themselves.
    public var rs485: Bool

    public init(port: String, baud: Int = 9600, parity: Parity = .none, dataBits: Int = 8, stopBits: Int = 1, rs485: Bool = false) {
        self.port = port
        self.baud = baud
        self.parity = parity
        self.dataBits = dataBits
        self.stopBits = stopBits
        self.rs485 = rs485
    }

    /// The bauds libmodbus (and termios) accept.
    public static let bauds: [Int] = [1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400]

    /// `9600 8N1`, `19200 8E1 RS-485`.
    public var description: String {
        "\(baud) \(dataBits)\(parity.letter)\(stopBits)" + (rs485 ? " RS-485" : "")
    }

    /// The RTU silent interval (t3.5) that must separate two frames: 3.5 character times below 19200 baud, and the
    /// fixed 1750 µs the specification prescribes above (Modbus over Serial Line V1.02, 2.5.1.1).
    ///
    /// An RTU character is 11 bits on the wire (start, 8 data, parity or a second stop bit, stop: 2.5.1), and the
    /// specification's timings count it so (9600 baud: 4.01 ms). A line set to fewer bits (8N1 is 10) still waits the
    /// 11-bit time: a slave built to the specification expects that gap, and waiting a little longer never glues frames.
    public var silentInterval: Duration {
        guard baud <= 19200 else { return .microseconds(1750) }
        let bitsPerCharacter = max(1 + dataBits + (parity == .none ? 0 : 1) + stopBits, 11)
        return .nanoseconds(Int64((3.5 * Double(bitsPerCharacter) / Double(baud) * 1e9).rounded(.up)))
    }
}

/// Which registers a read asks for: function 03 (holding) or 04 (input).
public enum ModbusFunction: String, Sendable, Hashable, CaseIterable {
    case holding, input

    public var code: UInt8 { self == .holding ? 3 : 4 }
}

/// How the registers of a value are read.
public enum ModbusDataType: String, Sendable, Hashable, CaseIterable {
    case int16, uint16, int32, uint32, float32

    /// 16-bit registers one value takes.
    public var registerCount: Int {
        switch self {
        case .int16, .uint16: 1
        case .int32, .uint32, .float32: 2
        }
    }
}

/// Where one sensor's value lives on the bus and how to turn its registers into a value.
public struct ModbusPoint: Sendable, Hashable {
    /// The resolution that holds every value of a register scaled by `scale` and moved by `offset` exactly, when the
    /// quantity's default does not (a 0.1 °C register at the default 1/16 °C): the coarsest decimal step of which both
    /// are whole multiples (0.1, 0.01, ...). nil when the default holds them, or when no decimal step to 10⁻⁶ does.
    static func exactResolution(scale: Double, offset: Double, quantity: Quantity) -> Resolution? {
        func holds(_ resolution: Resolution) -> Bool {
            [scale, offset].allSatisfy { amount in
                let steps = amount / resolution.step
                return abs(steps - steps.rounded()) <= 1e-9 * max(1, abs(steps))
            }
        }
        if holds(quantity.defaultResolution) { return nil }
        var denominator: UInt32 = 1
        while denominator <= 1_000_000 {
            if let resolution = try? Resolution(numerator: 1, denominator: denominator), holds(resolution) { return resolution }
            denominator *= 10
        }
        return nil
    }

    /// The resolution of a `float32` point without one of its own: the quantity's default when it is a decimal step,
    /// else 0.01 (temperature's default, 1/16 °C, is the DS18B20's and no float transmitter's).
    static func floatResolution(_ quantity: Quantity) -> Resolution? {
        var denominator = quantity.defaultResolution.denominator
        while denominator % 10 == 0 { denominator /= 10 }
        return denominator == 1 ? nil : .hundredth
    }

    /// `slave`: the unit id, 1–247. Required.
    public var slave: Int
    /// `function`: `holding` (03, default) or `input` (04).
    public var function: ModbusFunction
    /// `address`: the first register, as sent on the wire (0-based: "40001" and "30001" in a manual are address 0).
    public var address: Int
    /// `data_type`: `uint16` (default), `int16`, `uint32`, `int32`, `float32`.
    public var dataType: ModbusDataType
    /// `word_order`: for 32-bit types, `big` (default: the first register holds the high word, "ABCD") or `little`
    /// (low word first, "CDAB", as many transmitters send floats). The names libmodbus gives its float orders, `abcd`,
    /// `badc`, `cdab` and `dcba` (A the value's most significant byte, in the order the bytes come off the wire), set
    /// the byte order too.
    public var lowWordFirst: Bool
    /// `byte_order`: `big` (default, Modbus's own) or `little` (bytes swapped inside each register: "BADC" / "DCBA").
    public var swapBytes: Bool
    /// `scale` and `offset`: value = raw × scale + offset. Defaults 1 and 0.
    public var scale: Double
    public var offset: Double

    public init(
        slave: Int, function: ModbusFunction = .holding, address: Int, dataType: ModbusDataType = .uint16,
        lowWordFirst: Bool = false, swapBytes: Bool = false, scale: Double = 1, offset: Double = 0
    ) {
        self.slave = slave
        self.function = function
        self.address = address
        self.dataType = dataType
        self.lowWordFirst = lowWordFirst
        self.swapBytes = swapBytes
        self.scale = scale
        self.offset = offset
    }

    public var registerCount: Int { dataType.registerCount }

    /// The value these registers hold, scaled; nil when a float register pair holds NaN or infinity.
    public func decode(_ registers: ArraySlice<UInt16>) -> Double? {
        guard let bits = bits(registers) else { return nil }
        let raw: Double
        switch dataType {
        case .int16: raw = Double(Int16(bitPattern: UInt16(truncatingIfNeeded: bits)))
        case .uint16: raw = Double(bits)
        case .int32: raw = Double(Int32(bitPattern: bits))
        case .uint32: raw = Double(bits)
        case .float32:
            let float = Float(bitPattern: bits)
            guard float.isFinite else { return nil }
            raw = Double(float)
        }
        let value = raw * scale + offset
        return value.isFinite ? value : nil
    }

    /// What these registers hold when it is a transmitter's "no value" sentinel rather than a number, else nil.
    ///
    /// A transmitter whose probe is missing or broken fills the register with the largest value of an unsigned type or
    /// the smallest of a signed one, and at some scales that value lands inside the quantity's plausible range
    /// (0xFFFF × 0.0001 is pH 6.55; 65535 µS/cm is an EC). These raw values are faults whatever the scale and offset:
    /// `uint16` 0xFFFF, `uint32` 0xFFFFFFFF, `int16` 0x8000 (−32768), `int32` 0x80000000 (−2147483648), after
    /// `word_order` and `byte_order` are applied. All ones in a signed type is −1, a legitimate reading (−0.1 °C at scale
    /// 0.1), and stays a value; a `float32` sentinel is NaN or infinity, which ``decode(_:)`` already refuses.
    public func faultSentinel(_ registers: ArraySlice<UInt16>) -> String? {
        guard let bits = bits(registers) else { return nil }
        switch dataType {
        case .uint16 where bits == 0xFFFF: return "uint16 all ones (65535)"
        case .int16 where bits == 0x8000: return "the int16 minimum (-32768)"
        case .uint32 where bits == 0xFFFF_FFFF: return "uint32 all ones (4294967295)"
        case .int32 where bits == 0x8000_0000: return "the int32 minimum (-2147483648)"
        default: return nil
        }
    }

    /// Why a `float32` these registers hold cannot be a measurement, else nil: a magnitude below 10⁻⁶ other than zero.
    ///
    /// No transmitter measures anything that finely, but that is what a wrong `word_order` (or `byte_order`) makes of
    /// most good values: 7.0 is 0x40E0 0x0000, and read low word first it is 2.3·10⁻⁴¹, which passes any plausible
    /// range and would be stored as 0. The message says what the other word order reads, and blames the word order
    /// only when that reads a measurable magnitude: two equal registers (0x3333 0x3333) read the same either way, and
    /// then the word order cannot be the cause.
    public func implausibleFloat(_ registers: ArraySlice<UInt16>) -> String? {
        guard dataType == .float32, let bits = bits(registers) else { return nil }
        let float = Float(bitPattern: bits)
        guard float != 0, float.isFinite, abs(float) < 1e-6 else { return nil }
        var other = self
        other.lowWordFirst.toggle()
        let otherOrder = "word_order = \"\(lowWordFirst ? "big" : "little")\""
        let problem = "float32 \(float), a magnitude no transmitter measures"
        guard let otherBits = other.bits(registers), otherBits != bits else {
            return "\(problem), and the same in either word order (so the word order is not the cause): not a reading; check address and data_type against its register map, and the transmitter"
        }
        let alternative = Float(bitPattern: otherBits)
        guard alternative.isFinite, alternative == 0 || abs(alternative) >= 1e-6 else {
            let read = alternative.isFinite ? "\(alternative), no measurement either" : "no number either"
            return "\(problem), and with \(otherOrder) they read \(read) (so the word order is not the cause): not a reading; check address, data_type and byte_order against its register map, and the transmitter"
        }
        let shown = other.decode(registers).map { "\(Float($0))" } ?? "no number either"
        return "\(problem): the registers are most likely read in the wrong order "
            + "(with \(otherOrder) they read \(shown)); check word_order and byte_order against its register map"
    }

    /// The value's bits, with byte and word order applied (16-bit types in the low half); nil for too few registers.
    private func bits(_ registers: ArraySlice<UInt16>) -> UInt32? {
        guard registers.count >= registerCount, let firstIndex = registers.indices.first else { return nil }
        func word(_ index: Int) -> UInt16 {
            let raw = registers[firstIndex + index]
            return swapBytes ? raw.byteSwapped : raw
        }
        guard registerCount == 2 else { return UInt32(word(0)) }
        let (high, low) = lowWordFirst ? (word(1), word(0)) : (word(0), word(1))
        return UInt32(high) << 16 | UInt32(low)
    }
}

/// Everything one `driver = "modbus"` sensor table says.
struct ModbusSensorOptions: Sendable, Hashable {
    var bus: ModbusBusSettings
    var point: ModbusPoint
    /// `response_timeout`: how long a request waits for the slave's answer. Default 500 ms, 20 ms–10 s. A request to a
    /// silent slave holds its bus for at most twice this (the timeout, then the drain); a slave that keeps timing out
    /// is backed off (``ModbusLink/SilentSlave``).
    var responseTimeout: Duration
    /// `coalesce_gap`: registers of one slave and function at most this many apart are read in one request (unused
    /// registers in between are read and ignored). Default 4, 0–100; 0 coalesces only adjacent registers.
    var coalesceGap: Int

    static let keys: Set<String> = [
        "port", "baud", "parity", "data_bits", "stop_bits", "rs485", "response_timeout", "coalesce_gap",
        "slave", "function", "address", "data_type", "word_order", "byte_order", "scale", "offset",
    ]

    init(_ configuration: SensorConfiguration) throws(ConfigurationError) {
        let table = configuration.options
        // As every path in the file (and an EZO port): relative to the configuration file's directory.
        var bus = ModbusBusSettings(
            port: try AgentConfiguration.serialPort(table, example: "\"/dev/serial/by-id/usb-FTDI_...-if00-port0\" or \"/dev/ttyUSB0\""))
        if let baud = try table.int("baud") {
            guard ModbusBusSettings.bauds.contains(baud) else {
                throw table.error("baud", "must be one of \(ModbusBusSettings.bauds.map(String.init).joined(separator: ", ")) (got \(baud)); the transmitter's manual gives it, 9600 is the usual default")
            }
            bus.baud = baud
        }
        let parities: [String: ModbusBusSettings.Parity] = ["none": .none, "even": .even, "odd": .odd, "n": .none, "e": .even, "o": .odd]
        if let parity = try table.choice("parity", parities) { bus.parity = parity }
        if let dataBits = try table.int("data_bits") {
            // Modbus over Serial Line V1.02, 2.5.1: an RTU character has 8 data bits (7 is Modbus ASCII, which this
            // driver does not speak).
            guard dataBits == 8 else {
                throw table.error(
                    "data_bits",
                    "must be 8 (got \(dataBits)): Modbus RTU always uses 8 data bits (7 is Modbus ASCII, which is not supported); set the transmitter to 8 data bits or remove data_bits")
            }
            bus.dataBits = dataBits
        }
        if let stopBits = try table.int("stop_bits") {
            guard stopBits == 1 || stopBits == 2 else { throw table.error("stop_bits", "must be 1 or 2 (got \(stopBits))") }
            bus.stopBits = stopBits
        }
        if let rs485 = try table.bool("rs485") { bus.rs485 = rs485 }
        self.bus = bus

        guard let slave = try table.int("slave") else {
            throw table.error("slave", "is required: the transmitter's Modbus address (unit id), 1-247; its manual gives the default, often 1")
        }
        guard (1...247).contains(slave) else {
            throw table.error("slave", "must be a unit id between 1 and 247 (got \(slave)); 0 is broadcast and 248-255 are reserved")
        }
        let function = try Self.function(table)
        let dataTypes = Dictionary(uniqueKeysWithValues: ModbusDataType.allCases.map { ($0.rawValue, $0) })
        let dataType = try table.choice("data_type", dataTypes) ?? .uint16
        guard let address = try table.int("address") else {
            throw table.error("address", "is required: the first register's address as sent on the wire, 0-65535 (register 40001 in a manual is address 0)")
        }
        guard (0...(65536 - dataType.registerCount)).contains(address) else {
            throw table.error("address", "must be between 0 and \(65536 - dataType.registerCount) for \(dataType.rawValue) (got \(address))")
        }
        let (wordOrder, impliedByteOrder) = try Self.wordOrder(table)
        if table.contains("word_order"), dataType.registerCount == 1 {
            throw table.error("word_order", "only applies to 32-bit data types (int32, uint32, float32); remove it for \(dataType.rawValue)")
        }
        let byteOrders = ["big": false, "little": true]
        let byteOrder: Bool
        switch (try table.choice("byte_order", byteOrders), impliedByteOrder) {
        case (let given?, let implied?) where given != implied:
            let order = (try table.string("word_order") ?? "").lowercased()
            throw table.error(
                "byte_order",
                "contradicts word_order = \"\(order)\", which already means \(implied ? "bytes swapped in each register (\"little\")" : "Modbus's own byte order (\"big\")"); remove byte_order")
        case (let given?, _): byteOrder = given
        case (nil, let implied?): byteOrder = implied
        case (nil, nil): byteOrder = false
        }
        let scale = try table.double("scale") ?? 1
        guard scale != 0 else { throw table.error("scale", "must not be 0 (every value would be the offset)") }
        let offset = try table.double("offset") ?? 0
        point = ModbusPoint(
            slave: slave, function: function, address: address, dataType: dataType, lowWordFirst: wordOrder,
            swapBytes: byteOrder, scale: scale, offset: offset)
        responseTimeout = try table.duration("response_timeout", in: .milliseconds(20)...(.seconds(10))) ?? .milliseconds(500)
        coalesceGap = try table.int("coalesce_gap", in: 0...100) ?? 4
    }

    /// `function`: the name (`holding`, `input`) or the function code a register map gives, as a string (`"03"`) or a
    /// TOML integer (`3`).
    static func function(_ table: ConfigTable) throws(ConfigurationError) -> ModbusFunction {
        let accepted = "\"holding\" (or 3) for holding registers, \"input\" (or 4) for input registers"
        switch table.value("function") {
        case nil: return .holding
        case .integer(3)?: return .holding
        case .integer(4)?: return .input
        case .integer(let code)?:
            throw table.error("function", "must be \(accepted) (got \(code)); only the read functions 03 and 04 are supported")
        case .string(let text)?:
            let names: [String: ModbusFunction] = ["holding": .holding, "input": .input, "3": .holding, "4": .input, "03": .holding, "04": .input]
            guard let function = names[text.trimmingWhitespace().lowercased()] else {
                throw table.error("function", "must be one of \(names.keys.sorted().map { "\"\($0)\"" }.joined(separator: ", ")): \(accepted) (got \"\(text)\")")
            }
            return function
        case let other?:
            throw table.error("function", "must be \(accepted) (got \(other.typeName))")
        }
    }

    /// `word_order`: whether the low word comes first, and the byte order that libmodbus's four-letter names imply
    /// (nil for `big` and `little`, which leave it to `byte_order`).
    static func wordOrder(_ table: ConfigTable) throws(ConfigurationError) -> (lowWordFirst: Bool, swapBytes: Bool?) {
        guard let text = try table.string("word_order") else { return (false, nil) }
        switch text.trimmingWhitespace().lowercased() {
        case "big": return (false, nil)
        case "little": return (true, nil)
        case "abcd": return (false, false)
        case "badc": return (false, true)
        case "cdab": return (true, false)
        case "dcba": return (true, true)
        default:
            throw table.error(
                "word_order",
                "must be \"big\" (high word first) or \"little\" (low word first), or one of libmodbus's byte orders \"abcd\", \"badc\", \"cdab\", \"dcba\" (A = the most significant byte, as the bytes come off the wire; the transmitter's manual names one of them) (got \"\(text)\")")
        }
    }
}
