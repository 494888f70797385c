@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// Builds `driver = "modbus"` sensors on `port` from `[[sensor]]` bodies (id → extra keys), through the real
/// configuration parser (and so its cross-sensor checks). The quantity is EC (plausible 0–1,000,000) unless the keys
/// name one: the driver refuses values the quantity cannot have.
func modbusSensors(port: String, _ sensors: [(id: String, keys: String)], interval: String = "10s") throws -> [SensorConfiguration] {
    var text = "[device]\nid = \"t\"\n"
    for sensor in sensors {
        text += """
            [[sensor]]
            id = "\(sensor.id)"
            driver = "modbus"
            \(sensor.keys.contains("quantity =") ? "" : "quantity = \"ec\"")
            interval = "\(interval)"
            port = "\(port)"
            \(sensor.keys)

            """
    }
    return try AgentConfiguration.parse(ConfigDocument.parse(text, file: "test.toml")).sensors
}

let driverTestLogger = Logger(label: "test.drivers") { _ in SwiftLogNoOpLogHandler() }

/// Drivers for `configurations`, closed (and their bus with them) at the end of `body`.
func withModbusDrivers<T>(
    _ configurations: [SensorConfiguration], _ body: ([ModbusDriver]) async throws -> T
) async throws -> T {
    let drivers = try configurations.map { try ModbusDriver(configuration: $0, logger: driverTestLogger) }
    do {
        let result = try await body(drivers)
        for driver in drivers { await driver.close() }
        return result
    } catch {
        for driver in drivers { await driver.close() }
        throw error
    }
}

func readResult(_ driver: any SensorDriver) async -> Result<SensorValue, SensorError> {
    do throws(SensorError) { return .success(try await driver.read()) } catch { return .failure(error) }
}

@Suite("Modbus bus against a libmodbus slave on a pseudo-terminal", .serialized)
struct ModbusBusTests {
    @Test("Values, scaling, data types and word order come out as the slave holds them")
    func values() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        // SUP-PH8001-style map: reg0 temperature ×0.1, reg1 pH ×0.01.
        slave.set(slave: 1, address: 0, [250, 612])
        let float = Float(1234.5).bitPattern
        slave.set(slave: 1, address: 10, [UInt16(float >> 16), UInt16(float & 0xFFFF)])  // big: high word first
        slave.set(slave: 1, address: 20, [UInt16(float & 0xFFFF), UInt16(float >> 16)])  // little: low word first
        slave.set(slave: 1, address: 30, [UInt16(bitPattern: -5)])
        let negative = UInt32(bitPattern: -100_000)
        slave.set(slave: 1, address: 40, [UInt16(negative >> 16), UInt16(negative & 0xFFFF)])
        slave.set(slave: 1, address: 50, [0xB2D0, 0x5E00])  // 3_000_000_000
        slave.set(slave: 1, address: 60, [UInt16(0x1234).byteSwapped])
        slave.set(slave: 1, .input, address: 5, [1413])
        let configurations = try modbusSensors(
            port: slave.path,
            [
                ("t.temp", "slave = 1\naddress = 0\nscale = 0.1\nquantity = \"temperature\""),
                ("t.ph", "slave = 1\naddress = 1\nscale = 0.01\nquantity = \"ph\""),
                ("t.f_big", "slave = 1\naddress = 10\ndata_type = \"float32\""),
                ("t.f_little", "slave = 1\naddress = 20\ndata_type = \"float32\"\nword_order = \"little\""),
                ("t.i16", "slave = 1\naddress = 30\ndata_type = \"int16\"\nscale = 0.5\noffset = 1\nquantity = \"temperature\""),
                ("t.i32", "slave = 1\naddress = 40\ndata_type = \"int32\"\nscale = 0.01\nquantity = \"orp\""),
                ("t.u32", "slave = 1\naddress = 50\ndata_type = \"uint32\"\nquantity = \"count\""),
                ("t.swapped", "slave = 1\naddress = 60\nbyte_order = \"little\""),
                ("t.ec", "slave = 1\nfunction = \"input\"\naddress = 5"),
            ])
        let values = try await withModbusDrivers(configurations) { drivers in
            var values: [Double] = []
            for driver in drivers { values.append(try await driver.read().value) }
            return values
        }
        #expect(abs(values[0] - 25.0) < 1e-9)
        #expect(abs(values[1] - 6.12) < 1e-9)
        #expect(values[2] == 1234.5)
        #expect(values[3] == 1234.5)
        #expect(values[4] == -1.5)
        #expect(values[5] == -1000)  // -100000 × 0.01 mV
        #expect(values[6] == 3_000_000_000)
        #expect(values[7] == 0x1234)
        #expect(values[8] == 1413)
        #expect(slave.requests.allSatisfy { $0.slave == 1 })
        #expect(slave.requests.contains { $0.function == 4 && $0.address == 5 })
    }

    @Test("An illegal address is a fault naming exception 0x02; the other sensors of a coalesced block still read")
    func illegalAddress() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1], registerCount: 100)
        slave.set(slave: 1, address: 98, [42])
        // 98 and 101 are 3 apart: planned as one request for 98-101, which the slave refuses (it ends at 99).
        let configurations = try modbusSensors(
            port: slave.path, [("t.ok", "slave = 1\naddress = 98"), ("t.missing", "slave = 1\naddress = 101")])
        try await withModbusDrivers(configurations) { drivers in
            let first = await readResult(drivers[0])
            let second = await readResult(drivers[1])
            #expect(first.map(\.value) == .success(42))
            guard case .failure(let error) = second else {
                Issue.record("reading a register the slave does not have succeeded: \(second)")
                return
            }
            #expect(error.kind == .fault)
            #expect(error.message.contains("exception 0x02 (illegal data address)"), "\(error)")
            // After the refusal the unit is read one sensor at a time: the next round reads 98 alone.
            let before = slave.requestCount(slave: 1)
            let again = try await drivers[0].read().value
            #expect(again == 42)
            #expect(slave.requests.last?.address == 98 && slave.requests.last?.count == 1)
            #expect(slave.requestCount(slave: 1) == before + 1)
        }
    }

    @Test("Adjacent registers of one slave are read in one request per round, each sensor gets its slice")
    func coalescing() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1, 2])
        slave.set(slave: 1, address: 0, [200, 650, 1413])
        slave.set(slave: 1, address: 60, [7])
        slave.set(slave: 2, address: 0, [99])
        let configurations = try modbusSensors(
            port: slave.path,
            [
                ("t.temp", "slave = 1\naddress = 0"), ("t.ph", "slave = 1\naddress = 1"), ("t.ec", "slave = 1\naddress = 2"),
                ("t.far", "slave = 1\naddress = 60"), ("t.other", "slave = 2\naddress = 0"),
            ])
        try await withModbusDrivers(configurations) { drivers in
            for round in 1...3 {
                let values = try await drivers.asyncMap { try await $0.read().value }
                #expect(values == [200, 650, 1413, 7, 99])
                // Per round: one request for 0-2, one for 60, one to slave 2.
                #expect(slave.requests.filter { $0.slave == 1 && $0.address == 0 }.count == round)
                #expect(slave.requests.filter { $0.slave == 1 && $0.address == 0 }.allSatisfy { $0.count == 3 })
                #expect(slave.requestCount(slave: 1) == 2 * round)
                #expect(slave.requestCount(slave: 2) == round)
            }
            // A value that changed at the slave shows in the next round's request.
            slave.set(slave: 1, address: 1, [655])
            #expect(try await drivers[0].read().value == 200)
            #expect(try await drivers[1].read().value == 655)
        }
    }

    @Test("A request to a silent slave times out and delays the others on its bus by at most twice its response timeout")
    func silentSlave() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [612])
        let configurations = try modbusSensors(
            port: slave.path,
            [("t.ph", "slave = 1\naddress = 0\nresponse_timeout = \"500ms\""), ("t.dead", "slave = 2\naddress = 0\nresponse_timeout = \"500ms\"")],
            interval: "100ms")
        try await withModbusDrivers(configurations) { drivers in
            for _ in 0..<2 {
                // The silent slave's request goes first; the good sensor's read queues behind it.
                async let dead = Self.timed { await readResult(drivers[1]) }
                try await Task.sleep(for: .milliseconds(50))
                let good = await Self.timed { await readResult(drivers[0]) }
                let silent = await dead
                guard case .failure(let error) = silent.result else {
                    Issue.record("the silent slave answered: \(silent.result)")
                    return
                }
                #expect(error.kind == .timeout)
                #expect(error.message.contains("slave 2 did not answer within"))
                #expect(silent.elapsed >= .milliseconds(450))
                #expect(try good.result.get().value == 612)
                // Waited for (part of) one timeout and the drain after it (the line silent for a response timeout),
                // about 0.95 s, never a third timeout's worth (a retry: the request count below says there is none);
                // 1.4 s was passed by 0.13 s once on a loaded CI machine.
                #expect(good.elapsed < .milliseconds(1800), "the good slave's read took \(good.elapsed)")
                try await Task.sleep(for: .milliseconds(120))
            }
            // One request per read: no retries that would multiply the cost.
            #expect(slave.requestCount(slave: 2) == 2)
            // Two timeouts in a row: the slave is backed off, the next read fails at once without a request.
            let backedOff = await Self.timed { await readResult(drivers[1]) }
            #expect(backedOff.result.failure?.kind == .disconnected, "\(backedOff.result)")
            #expect(backedOff.elapsed < .milliseconds(100))
            #expect(slave.requestCount(slave: 2) == 2)
        }
    }

    @Test("Consecutive requests are separated by the RTU silent interval")
    func silentInterval() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1, 3])
        // At 1200 baud, t3.5 = 3.5 × 11 / 1200 s ≈ 32.1 ms (an RTU character counts 11 bits, even at 8N1), far above
        // how fast the next request would otherwise go.
        let configurations = try modbusSensors(
            port: slave.path, [("t.a", "slave = 1\naddress = 0\nbaud = 1200"), ("t.b", "slave = 3\naddress = 0\nbaud = 1200")],
            interval: "100ms")
        let interval = try ModbusSensorOptions(configurations[0]).bus.silentInterval
        #expect(interval > .milliseconds(32) && interval < .milliseconds(33), "\(interval)")
        try await withModbusDrivers(configurations) { drivers in
            for _ in 0..<5 {
                _ = try await drivers[0].read()
                _ = try await drivers[1].read()
            }
        }
        let requests = slave.requests
        #expect(requests.count == 10)
        for (previous, next) in zip(requests, requests.dropFirst()) {
            let end = try #require(previous.answeredAt)
            #expect(next.receivedAt - end >= interval, "only \(next.receivedAt - end) between two frames")
        }
    }

    @Test(
        "t3.5 counts 11 bits per character below 19200 baud (9600: 4.01 ms), more with 8E2; 1750 µs above",
        arguments: [
            (9600, "none", 1, Duration.nanoseconds(4_010_417)),
            (9600, "even", 1, .nanoseconds(4_010_417)),
            (9600, "even", 2, .nanoseconds(4_375_000)),
            (19200, "none", 1, .nanoseconds(2_005_209)),
            (38400, "none", 1, .microseconds(1750)),
            (115200, "even", 2, .microseconds(1750)),
        ])
    func silentIntervalBits(baud: Int, parity: String, stopBits: Int, expected: Duration) throws {
        let configuration = try modbusSensors(
            port: "/dev/ttyUSB0", [("t.a", "slave = 1\naddress = 0\nbaud = \(baud)\nparity = \"\(parity)\"\nstop_bits = \(stopBits)")])
        #expect(try ModbusSensorOptions(configuration[0]).bus.silentInterval == expected)
    }

    @Test("A late answer (after its request timed out) is discarded, never taken as the answer to the next request")
    func lateAnswer() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        // Two sensors of one slave, far apart (two requests), each one register: the answers have the same length, so
        // only the flush keeps one from being taken for the other.
        slave.set(slave: 1, address: 0, [100])
        slave.set(slave: 1, address: 50, [200])
        let configurations = try modbusSensors(
            port: slave.path,
            [("t.a", "slave = 1\naddress = 0\nresponse_timeout = \"100ms\""), ("t.b", "slave = 1\naddress = 50\nresponse_timeout = \"100ms\"")],
            interval: "100ms")
        try await withModbusDrivers(configurations) { drivers in
            slave.delayNextAnswer(of: 1, by: .milliseconds(300))
            let late = try #require(await readResult(drivers[0]).failure)
            #expect(late.kind == .timeout)
            // The answer for register 0 arrives now, into the port's buffer.
            try await Task.sleep(for: .milliseconds(400))
            #expect(try await drivers[1].read().value == 200, "the late answer for register 0 was taken for register 50")
            #expect(try await drivers[0].read().value == 100)
            #expect(try await drivers[1].read().value == 200)
        }
        #expect(slave.requests.map(\.address) == [0, 50, 0, 50])
    }

    /// Slave 1 with 100 in register 0 and 200 in register 50, read by two sensors with `responseTimeout`, uncoalesced: the
    /// same slave, function and length, so that nothing in an answer tells which request it belongs to.
    static func oneSlaveTwoRegisters(responseTimeout: String) throws -> (Scratch, ModbusTestSlave, [SensorConfiguration]) {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [100])
        slave.set(slave: 1, address: 50, [200])
        let configurations = try modbusSensors(
            port: slave.path,
            [
                ("t.a", "slave = 1\naddress = 0\ncoalesce_gap = 0\nresponse_timeout = \"\(responseTimeout)\""),
                ("t.b", "slave = 1\naddress = 50\ncoalesce_gap = 0\nresponse_timeout = \"\(responseTimeout)\""),
            ],
            interval: "100ms")
        return (scratch, slave, configurations)
    }

    // A tester, 2026-12-07: an answer later than the timeout and the drain after it crossed the next request on the
    // wire and was stored as that request's value.
    @Test("An answer later than the drain after its timeout, arriving as the next request's, is not taken for it")
    func lateAnswerPastTheDrain() async throws {
        let (scratch, slave, configurations) = try Self.oneSlaveTwoRegisters(responseTimeout: "100ms")
        defer { withExtendedLifetime(scratch) {} }
        try await withModbusDrivers(configurations) { drivers async throws in
            for _ in 0..<3 {
                // Register 0's answer comes 250 ms after its request: after the 100 ms timeout and the 100 ms of silence
                // the drain waits, while the request for register 50 (sent at once) waits for its answer.
                slave.delayNextAnswer(of: 1, by: .milliseconds(250))
                let late = try #require(await readResult(drivers[0]).failure)
                #expect(late.kind == .timeout, "\(late)")
                switch await readResult(drivers[1]) {
                case .success(let value):
                    #expect(value.value == 200, "register 0's late answer was taken for register 50")
                case .failure(let error):
                    #expect(error.message.contains("answered holding registers 50-50 twice"), "\(error)")
                }
                // The slave's own answers are taken again.
                let values = await SensorReadContext.$oneOff.withValue(true) {
                    [await readResult(drivers[1]), await readResult(drivers[0])].map { try? $0.get().value }
                }
                #expect(values == [200, 100])
            }
        }
    }

    @Test("A slave that answers every request 50-100 ms after its timeout never has an answer taken for another request")
    func lateAnswerEveryTime() async throws {
        let (scratch, slave, configurations) = try Self.oneSlaveTwoRegisters(responseTimeout: "200ms")
        defer { withExtendedLifetime(scratch) {} }
        try await withModbusDrivers(configurations) { drivers async throws in
            for (index, delay) in [260, 290, 270, 280, 300, 265].enumerated() {
                slave.delayAnswers(of: 1, by: .milliseconds(delay))
                let driver = drivers[index % 2]
                let expected: Double = index % 2 == 0 ? 100 : 200
                switch await readResult(driver) {
                case .success(let value):
                    #expect(value.value == expected, "read \(value.value) for register \(index % 2 == 0 ? 0 : 50): another request's late answer")
                case .failure(let error):
                    // A timeout, or a read skipped while the slave is backed off after timeouts in a row.
                    #expect(error.kind == .timeout || error.message.contains("next attempt in"), "\(error)")
                }
            }
            // Back to answering in time: both read their own registers at once (an installer's read asks the slave
            // whatever its back-off; the sampler's would wait it out).
            slave.delayAnswers(of: 1, by: .zero)
            let values = await SensorReadContext.$oneOff.withValue(true) {
                [await readResult(drivers[0]), await readResult(drivers[1]), await readResult(drivers[0])].map { try? $0.get().value }
            }
            #expect(values == [100, 200, 100])
        }
    }

    @Test("A coalesced block is shared only by reads within the shared window; later reads and one-off reads ask the device")
    func blockFreshness() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [100, 200])
        // A 1 h interval: the block would be served for an hour if its age were bounded by the interval.
        let configurations = try modbusSensors(
            port: slave.path, [("t.a", "slave = 1\naddress = 0"), ("t.b", "slave = 1\naddress = 1")], interval: "1h")
        // ModbusLink.sharedReadWindow (1 s), spelled out so that the test also builds against the code before it.
        let window = Duration.seconds(1)
        try await withModbusDrivers(configurations) { drivers in
            // Within one tick the block feeds both: one request.
            #expect(try await drivers[0].read().value == 100)
            #expect(try await drivers[1].read().value == 200)
            #expect(slave.requests.count == 1)
            // A read after the window gets what the device holds now, not the block of the last round.
            #expect(try await drivers[0].read().value == 100)
            slave.set(slave: 1, address: 1, [300])
            try await Task.sleep(for: window + .milliseconds(200))
            #expect(try await drivers[1].read().value == 300, "a cached block value was stored as read now")
            // The installer's one-off read (`farmgate sensor read` through the agent) asks the device even within the
            // window, right after another sensor's block read.
            try await Task.sleep(for: window + .milliseconds(200))
            #expect(try await drivers[0].read().value == 100)
            slave.set(slave: 1, address: 1, [400])
            let answer = await SensorReadCommand.read(Sampler.Sensor(configuration: configurations[1], driver: drivers[1]), via: "agent")
            #expect(answer.reading?.raw == 400, "\(answer)")
        }
    }

    @Test("Values no transmitter of the quantity can measure are a fault naming the raw registers, never a reading")
    func implausibleValues() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        // Not the transmitters' own sentinels (0xFFFF, 0x80000000: see faultSentinels), values that scale out of range.
        slave.set(slave: 1, address: 0, [0xFFFE])  // × 0.01: pH 655.34
        slave.set(slave: 1, address: 10, [0x8000, 0x0001])  // int32 -2147483647
        let huge = Float(1e30).bitPattern
        slave.set(slave: 1, address: 20, [UInt16(huge >> 16), UInt16(huge & 0xFFFF)])
        slave.set(slave: 1, address: 30, [1450])  // pH 14.5: plausible (outside an expected range, stored flagged)
        slave.set(slave: 1, address: 40, [0x7FC0, 0x0000])  // float32 NaN
        slave.set(slave: 1, address: 50, [0x7FFF])  // int16 32767 at scale 0.1: 3276.7
        let configurations = try modbusSensors(
            port: slave.path,
            [
                ("t.u16", "slave = 1\naddress = 0\nscale = 0.01\nquantity = \"ph\""),
                ("t.i32", "slave = 1\naddress = 10\ndata_type = \"int32\"\nquantity = \"ph\""),
                ("t.f32", "slave = 1\naddress = 20\ndata_type = \"float32\"\nquantity = \"ph\""),
                ("t.ok", "slave = 1\naddress = 30\nscale = 0.01\nquantity = \"ph\""),
                ("t.nan", "slave = 1\naddress = 40\ndata_type = \"float32\"\nquantity = \"ph\""),
                ("t.i16", "slave = 1\naddress = 50\ndata_type = \"int16\"\nscale = 0.1\nquantity = \"ph\""),
            ])
        try await withModbusDrivers(configurations) { drivers in
            // A tester, 2026-12-07: NaN was an invalid response without its registers, and 3276.7 read 3276.7000000000003.
            let nan = try #require(await readResult(drivers[4]).failure)
            #expect(nan.kind == .fault && nan.message.contains("reads raw 0x7FC0 0x0000, which as float32 is no number"), "\(nan)")
            let scaled = try #require(await readResult(drivers[5]).failure)
            #expect(scaled.message.contains("reads 3276.7 (raw 0x7FFF)"), "\(scaled)")
            for (driver, raw) in zip(drivers.prefix(3), ["0xFFFE", "0x8000 0x0001", "0x7149 0xF2CA"]) {
                let error = try #require(await readResult(driver).failure, "\(driver.sensor) read a value")
                #expect(error.kind == .fault)
                #expect(error.message.contains("which no ph transmitter can measure"), "\(error)")
                #expect(error.message.contains("raw \(raw)"), "\(error)")
            }
            #expect(abs(try await drivers[3].read().value - 14.5) < 1e-9)
        }
    }

    // Before the fix (a tester, 2026-12-06, a DPH7-style transmitter sending floats low word first with word_order left
    // at "big") pH 7.00 was read as 2.3e-41 and stored as a good pH 0.00.
    @Test("A float32 too small for any measurement (what a wrong word order makes of most values) is a fault naming the other order's value; zero is a value")
    func floatInTheWrongWordOrder() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        func lowWordFirst(_ value: Float) -> [UInt16] { [UInt16(value.bitPattern & 0xFFFF), UInt16(value.bitPattern >> 16)] }
        slave.set(slave: 1, address: 0, lowWordFirst(7.0))  // 0x0000 0x40E0
        slave.set(slave: 1, address: 2, lowWordFirst(1408))  // EC µS/cm
        slave.set(slave: 1, address: 4, lowWordFirst(6.83))  // 0x8F5C 0x40DA: negative and tiny read high word first
        slave.set(slave: 1, address: 6, [0, 0])  // 0.0 in any order
        let configurations = try modbusSensors(
            port: slave.path,
            [
                ("t.ph", "slave = 1\naddress = 0\ndata_type = \"float32\"\nquantity = \"ph\""),
                ("t.ec", "slave = 1\naddress = 2\ndata_type = \"float32\""),
                ("t.ph2", "slave = 1\naddress = 4\ndata_type = \"float32\"\nquantity = \"ph\""),
                ("t.zero", "slave = 1\naddress = 6\ndata_type = \"float32\"\nquantity = \"ph\""),
                ("t.right", "slave = 1\naddress = 0\ndata_type = \"float32\"\nword_order = \"little\"\nquantity = \"ph\""),
            ])
        try await withModbusDrivers(configurations) { drivers in
            for (driver, other) in zip(drivers.prefix(3), ["7.0", "1408.0", "6.83"]) {
                let error = try #require(await readResult(driver).failure, "\(driver.sensor) read a value")
                #expect(error.kind == .fault)
                #expect(error.message.contains("with word_order = \"little\" they read \(other)"), "\(error)")
            }
            #expect(try await drivers[3].read().value == 0)
            #expect(try await drivers[4].read().value == 7)
        }
    }

    // Before the fix (rt-tester19 F3) 0x3333 0x3333 was said to be "most likely read in the wrong order (with
    // word_order = "little" they read 4.172325e-08)": the same value.
    @Test("A tiny float32 that reads the same, or as tiny, in the other word order is refused without blaming the word order")
    func tinyFloatInEitherOrder() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [0x3333, 0x3333])  // 4.17e-8 either way
        slave.set(slave: 1, address: 2, [0x0000, 0x3333])  // 1.8e-41 high word first, 4.17e-8 low word first (0x33330000)
        let configurations = try modbusSensors(
            port: slave.path,
            [
                ("t.same", "slave = 1\naddress = 0\ndata_type = \"float32\"\nquantity = \"ph\""),
                ("t.both", "slave = 1\naddress = 2\ndata_type = \"float32\"\nquantity = \"ph\""),
            ])
        try await withModbusDrivers(configurations) { drivers in
            let same = try #require(await readResult(drivers[0]).failure, "a tiny float was read")
            #expect(same.kind == .fault)
            #expect(same.message.contains("raw 0x3333 0x3333"), "\(same)")
            #expect(same.message.contains("the same in either word order"), "\(same)")
            #expect(!same.message.contains("wrong order"), "\(same)")
            let both = try #require(await readResult(drivers[1]).failure, "a tiny float was read")
            #expect(both.kind == .fault)
            #expect(both.message.contains("with word_order = \"little\" they read 4.1676685e-08, no measurement either"), "\(both)")
            #expect(!both.message.contains("wrong order"), "\(both)")
        }
    }

    @Test("An answer from another address names that address; exception 04 says the transmitter failed")
    func wrongAddressAndDeviceFailure() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [])
        slave.reply(to: 1, with: [9, 3, 2, 0, 42])
        slave.reply(to: 2, with: [2, 0x83, 0x04])
        let configurations = try modbusSensors(
            port: slave.path, [("t.one", "slave = 1\naddress = 0"), ("t.two", "slave = 2\naddress = 0")])
        try await withModbusDrivers(configurations) { drivers in
            let wrong = try #require(await readResult(drivers[0]).failure)
            #expect(wrong.kind == .invalidResponse)
            #expect(wrong.message.contains("came from address 9 instead of 1"), "\(wrong)")
            #expect(!wrong.message.contains("two slaves with id"), "\(wrong)")
            let failed = try #require(await readResult(drivers[1]).failure)
            #expect(failed.kind == .fault)
            #expect(failed.message.contains("reported an internal failure"), "\(failed)")
            #expect(failed.message.contains("check the transmitter itself"), "\(failed)")
            #expect(!failed.message.contains("check address, function and data_type"), "\(failed)")
        }
    }

    @Test("An answer cut short is said to be one, and does not count toward a silent slave's back-off")
    func answerCutShort() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [])
        // Two data bytes announced, one sent, then the CRC: the frame stops a byte short.
        slave.reply(to: 1, with: [1, 3, 2, 0])
        let configurations = try modbusSensors(port: slave.path, [("t.one", "slave = 1\naddress = 0\nresponse_timeout = \"200ms\"")])
        try await withModbusDrivers(configurations) { drivers in
            for _ in 0..<5 {
                let error = try #require(await readResult(drivers[0]).failure)
                #expect(error.kind == .invalidResponse, "\(error)")
                #expect(error.message.contains("slave 1 began to answer holding registers 0-0 but the answer stopped short:"), "\(error)")
                #expect(!error.message.contains("did not answer"), "\(error)")
                #expect(!error.message.contains("next attempt"), "\(error)")
            }
        }
        #expect(slave.requestCount(slave: 1) == 5, "every read asked the slave")
    }

    // Before the fix (rt-tester19 F2, 2026-12-06) a slave answering 100 ms after its timeout, every time, was said not
    // to answer: "check its unit id, the baud and parity, the A/B wiring and its power", all of which were fine.
    @Test("A slave that answers after its response_timeout is said to answer late, with how late and to raise response_timeout; its answer is still discarded")
    func lateAnswerIsNamed() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [612])
        let configurations = try modbusSensors(
            port: slave.path, [("t.ph", "slave = 1\naddress = 0\nscale = 0.01\nquantity = \"ph\"\nresponse_timeout = \"200ms\"")],
            interval: "100ms")
        try await withModbusDrivers(configurations) { drivers in
            slave.delayAnswers(of: 1, by: .milliseconds(350))
            let error = try #require(await readResult(drivers[0]).failure, "the late answer was taken")
            #expect(error.kind == .timeout)
            #expect(error.message.contains("slave 1 answered holding registers 0-0 late, about "), "\(error)")
            #expect(error.message.contains("response_timeout is 200ms"), "\(error)")
            #expect(error.message.contains("raise response_timeout for the sensors of slave 1 (response_timeout = \""), "\(error)")
            #expect(!error.message.contains("check its unit id"), "\(error)")
            // Late every time: backed off as a silent slave is (each request holds the bus as long), saying why.
            _ = await readResult(drivers[0])
            let backedOff = try #require(await readResult(drivers[0]).failure)
            #expect(backedOff.kind == .disconnected, "\(backedOff)")
            #expect(backedOff.message.contains("did not answer its last 2 requests in time"), "\(backedOff)")
            #expect(backedOff.message.contains("answered holding registers 0-0 late"), "\(backedOff)")
            // In time again: its own answer, not a late one (an installer's read asks it whatever its back-off).
            slave.delayAnswers(of: 1, by: .zero)
            slave.set(slave: 1, address: 0, [640])
            let value = try await SensorReadContext.$oneOff.withValue(true) { try await drivers[0].read().value }
            #expect(abs(value - 6.40) < 1e-9)
        }
    }

    // Before the fix (rt-tester19 F4) both were "malformed frame (Invalid data)" or a bare count without advice.
    @Test("An answer of another function code names both codes; an answer with more registers than asked says what to check")
    func answerOfAnotherShape() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [])
        slave.reply(to: 1, with: [1, 4, 2, 0, 42])  // function 04 to a 03 request, CRC valid
        slave.reply(to: 2, with: [2, 3, 4, 0, 42, 0, 43])  // two registers for one
        slave.reply(to: 3, with: [3, 3, 3, 0, 42, 0])  // an odd byte count
        slave.reply(to: 4, with: [4, 0x84, 2])  // an exception of function 04 to a 03 request (a tester, 2026-12-07)
        let configurations = try modbusSensors(
            port: slave.path,
            [("t.one", "slave = 1\naddress = 0"), ("t.two", "slave = 2\naddress = 0"), ("t.three", "slave = 3\naddress = 0"), ("t.four", "slave = 4\naddress = 0")])
        try await withModbusDrivers(configurations) { drivers in
            let function = try #require(await readResult(drivers[0]).failure)
            #expect(function.kind == .invalidResponse)
            #expect(
                function.message.contains("slave 1 answered holding registers 0-0 with function code 0x04 (read input registers) where 0x03 (read holding registers) was asked"),
                "\(function)")
            #expect(function.message.contains("another master"), "\(function)")
            #expect(function.message.contains("check `function`"), "\(function)")
            #expect(!function.message.contains("Invalid data"), "\(function)")
            let count = try #require(await readResult(drivers[1]).failure)
            #expect(count.kind == .invalidResponse)
            #expect(count.message.contains("slave 2 answered holding registers 0-0 with 2 registers where 1 register was asked"), "\(count)")
            #expect(count.message.contains("another master"), "\(count)")
            #expect(count.message.contains("another device with id 2"), "\(count)")
            let odd = try #require(await readResult(drivers[2]).failure)
            #expect(odd.message.contains("with 3 data bytes where 2 bytes (1 register) were asked"), "\(odd)")
            let exception = try #require(await readResult(drivers[3]).failure)
            #expect(
                exception.message.contains("slave 4 answered holding registers 0-0 with an exception of function code 0x04 (read input registers) (code 0x02 (illegal data address)) where 0x03 (read holding registers) was asked"),
                "\(exception)")
        }
    }

    // Before the fix (rt-tester19 F7) the second answer was discarded before the next request without a word.
    @Test("A second answer from the same unit id right after the one taken is logged as a warning naming the id, once; the first answer is the value")
    func secondAnswerIsWarned() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [612])
        slave.set(slave: 1, address: 50, [250])
        slave.answerTwice(1, then: [1, 3, 2, 0x01, 0x2B])
        let log = RecordedLog()
        let configurations = try modbusSensors(
            port: slave.path, [("t.a", "slave = 1\naddress = 0"), ("t.b", "slave = 1\naddress = 50")], interval: "100ms")
        let drivers = try configurations.map { try ModbusDriver(configuration: $0, logger: log.logger()) }
        for _ in 0..<3 {
            #expect(try await drivers[0].read().value == 612)
            try await Task.sleep(for: .milliseconds(50))
            #expect(try await drivers[1].read().value == 250)
            try await Task.sleep(for: .milliseconds(50))
        }
        for driver in drivers { await driver.close() }
        let warnings = log.entries.filter { $0.level == .warning && $0.message.contains("two devices may answer to id 1") }
        #expect(warnings.count == 1, "\(log.entries.map(\.message))")
    }

    @Test("A transmitter's fault sentinels (uint16 0xFFFF, uint32 0xFFFFFFFF, int16 0x8000, int32 0x80000000) are faults at any scale; int16 -1 is a value")
    func faultSentinels() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [0xFFFF])  // uint16 × 0.0001: pH 6.5535, plausible
        slave.set(slave: 1, address: 2, [0xFFFF])  // uint16: EC 65535 µS/cm, plausible
        slave.set(slave: 1, address: 4, [0xFFFF, 0xFFFF])  // uint32
        slave.set(slave: 1, address: 8, [0x8000])  // int16 × 0.001: -32.768 °C, plausible
        slave.set(slave: 1, address: 10, [0x0000, 0x8000])  // int32 low word first × 1e-9: -2.1 °C
        slave.set(slave: 1, address: 14, [0xFFFF])  // int16 -1 × 0.1: -0.1 °C, a reading
        slave.set(slave: 1, address: 16, [0xFFFE])  // uint16 65534: a reading
        let configurations = try modbusSensors(
            port: slave.path,
            [
                ("t.ph", "slave = 1\naddress = 0\nscale = 0.0001\nquantity = \"ph\""),
                ("t.ec", "slave = 1\naddress = 2"),
                ("t.u32", "slave = 1\naddress = 4\ndata_type = \"uint32\""),
                ("t.i16", "slave = 1\naddress = 8\ndata_type = \"int16\"\nscale = 0.001\nquantity = \"temperature\""),
                ("t.i32", "slave = 1\naddress = 10\ndata_type = \"int32\"\nword_order = \"little\"\nscale = 0.000000001\nquantity = \"temperature\""),
                ("t.minus", "slave = 1\naddress = 14\ndata_type = \"int16\"\nscale = 0.1\nquantity = \"temperature\""),
                ("t.max", "slave = 1\naddress = 16"),
            ])
        try await withModbusDrivers(configurations) { drivers in
            for (driver, raw) in zip(drivers.prefix(5), ["0xFFFF", "0xFFFF", "0xFFFF 0xFFFF", "0x8000", "0x0000 0x8000"]) {
                let error = try #require(await readResult(driver).failure, "\(driver.sensor) read a value")
                #expect(error.kind == .fault)
                #expect(error.message.contains("raw \(raw)"), "\(error)")
                #expect(error.message.contains("probe"), "\(error)")
            }
            #expect(abs(try await drivers[5].read().value - -0.1) < 1e-9)
            #expect(try await drivers[6].read().value == 65534)
        }
    }

    @Test(
        "An exception code the specification does not define, from the configured slave itself, is named; it is no wrong unit id",
        arguments: [(UInt8(0x0C), "0x0C"), (UInt8(0x00), "0x00")])
    func unknownExceptionCode(code: UInt8, shown: String) async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [])
        slave.reply(to: 5, with: [5, 0x83, code])
        let configurations = try modbusSensors(port: slave.path, [("t.ph", "slave = 5\naddress = 0")])
        try await withModbusDrivers(configurations) { drivers in
            let error = try #require(await readResult(drivers[0]).failure)
            #expect(error.kind == .fault)
            #expect(error.message.contains("slave 5 answered holding registers 0-0 with exception \(shown)"), "\(error)")
            #expect(error.message.contains("not defined by the Modbus specification"), "\(error)")
            #expect(!error.message.contains("has unit id"), "\(error)")
            #expect(!error.message.contains("of slave 5"), "\(error)")
        }
    }

    @Test(
        "Busy, acknowledge and gateway exceptions give advice that fits them, with the code in hex",
        arguments: [
            (UInt8(0x05), "0x05 (acknowledge)", "retried at the next interval"),
            (UInt8(0x06), "0x06 (slave device busy)", "retried at the next interval"),
            (UInt8(0x0A), "0x0A (gateway path unavailable)", "check the gateway"),
            (UInt8(0x0B), "0x0B (gateway target failed to respond)", "check the gateway"),
            (UInt8(0x02), "0x02 (illegal data address)", "check address, function and data_type"),
        ])
    func exceptionAdvice(code: UInt8, shown: String, advice: String) async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [])
        slave.reply(to: 5, with: [5, 0x83, code])
        let configurations = try modbusSensors(port: slave.path, [("t.ph", "slave = 5\naddress = 0")])
        try await withModbusDrivers(configurations) { drivers in
            let error = try #require(await readResult(drivers[0]).failure)
            #expect(error.message.contains("exception \(shown)"), "\(error)")
            #expect(error.message.contains(advice), "\(error)")
            if code != 0x02 { #expect(!error.message.contains("check address, function and data_type"), "\(error)") }
            #expect(!error.message.contains("of slave 5"), "\(error)")
        }
    }

    @Test("One port named by its link and by its target is one bus: both sensors read, neither is locked out by the other")
    func twoSpellingsOneBus() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [250, 602])
        let target = try FileManager.default.destinationOfSymbolicLink(atPath: slave.path)
        let configurations = try modbusSensors(port: slave.path, [("t.temp", "slave = 1\naddress = 0")])
            + modbusSensors(port: target, [("t.ph", "slave = 1\naddress = 1")])
        try await withModbusDrivers(configurations) { drivers in
            #expect(drivers[0].bus === drivers[1].bus)
            for _ in 0..<2 {
                let (temperature, ph) = (try await drivers[0].read().value, try await drivers[1].read().value)
                #expect(temperature == 250)
                #expect(ph == 602)
            }
        }
    }

    @Test("A slave that timed out twice in a row is asked at a growing back-off, reported disconnected with its next attempt; the others keep reading")
    func silentSlaveBackoff() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [612])
        let configurations = try modbusSensors(
            port: slave.path,
            [("t.ph", "slave = 1\naddress = 0"), ("t.dead", "slave = 2\naddress = 0\nresponse_timeout = \"50ms\"")],
            interval: "200ms")
        try await withModbusDrivers(configurations) { drivers in
            var skipped: [SensorError] = []
            let start = ContinuousClock.now
            for round in 0..<16 {
                try await Task.sleep(until: start + .milliseconds(200 * round))
                let dead = try #require(await readResult(drivers[1]).failure)
                if dead.kind == .disconnected { skipped.append(dead) } else { #expect(dead.kind == .timeout, "\(dead)") }
                #expect(try await drivers[0].read().value == 612)
            }
            // Asked at rounds 0, 1, then after 2, 4, 8 intervals: 5 requests, not 16.
            let asked = slave.requestCount(slave: 2)
            #expect(asked >= 4 && asked <= 6, "the silent slave was asked \(asked) times in 16 rounds")
            let first = try #require(skipped.first)
            #expect(first.message.contains("did not answer"), "\(first)")
            #expect(first.message.contains("next attempt in"), "\(first)")
            // Answering again, it is read at its interval once the back-off has run out.
        }
    }

    @Test("data_bits other than 8 is refused: Modbus RTU has 8 data bits")
    func sevenDataBits() throws {
        do {
            _ = try modbusSensors(port: "/dev/ttyUSB0", [("t.a", "slave = 1\naddress = 0\ndata_bits = 7")])
            Issue.record("data_bits = 7 was accepted")
        } catch {
            let text = "\(error)"
            #expect(text.contains("test.toml:"), "\(text)")
            #expect(text.contains("data_bits"), "\(text)")
            #expect(text.contains("Modbus RTU always uses 8 data bits"), "\(text)")
        }
    }

    @Test(
        "An exception answer libmodbus cannot parse (function byte 0x80) says to check the unit id",
        arguments: [
            // What some servers and gateways send for a unit id they do not have: function byte 0x80.
            (5, [UInt8(5), 0x80, 0x04], "Invalid exception code"),
        ])
    func invalidException(unit: Int, frame: [UInt8], detail: String) async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.reply(to: unit, with: frame)
        let configurations = try modbusSensors(port: slave.path, [("t.ph", "slave = \(unit)\naddress = 0")])
        try await withModbusDrivers(configurations) { drivers in
            let error = try #require(await readResult(drivers[0]).failure)
            #expect(error.kind == .fault)
            #expect(error.message.contains("slave \(unit) answered holding registers 0-0 with an invalid exception response (\(detail))"), "\(error)")
            #expect(error.message.contains("no transmitter on \(slave.path) has unit id \(unit)"), "\(error)")
            #expect(error.message.contains("check `slave`"), "\(error)")
            #expect(!error.message.contains("another master"), "\(error)")
        }
    }

    @Test("An unplugged adapter is read again as soon as its port is back, however long it was away; the backoff stays within 5 s")
    func replugIsUsedAtOnce() async throws {
        var backoff = ModbusLink.reconnectBackoff
        for _ in 0..<20 { backoff.recordFailure() }
        #expect(backoff.ceiling <= .seconds(5))

        let scratch = try Scratch(prefix: "fg-modbus")
        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [612])
        let configurations = try modbusSensors(port: slave.path, [("t.ph", "slave = 1\naddress = 0")], interval: "100ms")
        try await withModbusDrivers(configurations) { drivers in
            #expect(try await drivers[0].read().value == 612)
            slave.unplug()
            // Away for a while: the attempts back off (1 s, then 2 s, ...).
            let start = ContinuousClock.now
            var failures = 0
            while ContinuousClock.now - start < .milliseconds(3500) {
                if await readResult(drivers[0]).failure?.kind == .disconnected { failures += 1 }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(failures > 10)
            let waiting = try #require(await readResult(drivers[0]).failure)
            #expect(waiting.message.contains("next attempt in"), "\(waiting)")
            // Back: the next read opens the port, without waiting out the backoff.
            try slave.replug()
            slave.set(slave: 1, address: 0, [640])
            let back = await Self.timed { await readResult(drivers[0]) }
            #expect(back.result.map(\.value) == .success(640), "\(back.result)")
            #expect(back.elapsed < .milliseconds(900))
        }
    }

    @Test("A missing adapter reads disconnected; unplugged and replugged, the bus reopens the port by itself")
    func unplugAndReplug() async throws {
        let scratch = try Scratch(prefix: "fg-modbus")
        let missing = try modbusSensors(port: scratch.file("ttyNothing"), [("t.none", "slave = 1\naddress = 0")])
        try await withModbusDrivers(missing) { drivers in
            let error = try #require(await readResult(drivers[0]).failure)
            #expect(error.kind == .disconnected)
            #expect(error.message.contains("does not exist"))
            // Within the backoff the next read fails fast, saying when the next attempt is.
            let again = try #require(await readResult(drivers[0]).failure)
            #expect(again.message.contains("next attempt in"))
        }

        let slave = try ModbusTestSlave(path: scratch.file("ttyRS485"), answering: [1])
        slave.set(slave: 1, address: 0, [612])
        let configurations = try modbusSensors(port: slave.path, [("t.ph", "slave = 1\naddress = 0")], interval: "100ms")
        try await withModbusDrivers(configurations) { drivers in
            #expect(try await drivers[0].read().value == 612)
            slave.unplug()
            let error = try #require(await readResult(drivers[0]).failure)
            #expect(error.kind == .disconnected)
            try slave.replug()
            slave.set(slave: 1, address: 0, [640])
            let back = await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
                (try? await drivers[0].read().value) == 640
            }
            #expect(back)
        }
    }
}

extension ModbusBusTests {
    static func timed<T>(_ body: () async -> T) async -> (result: T, elapsed: Duration) {
        let start = ContinuousClock.now
        let result = await body()
        return (result, ContinuousClock.now - start)
    }
}

extension Result {
    var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}

extension Array {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var results: [T] = []
        for element in self { results.append(try await transform(element)) }
        return results
    }
}
