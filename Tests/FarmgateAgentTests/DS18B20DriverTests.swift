@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A fake `/sys/bus/w1/devices` in a scratch directory, as w1thermsensor's tests do.
final class FakeW1Tree {
    let scratch: Scratch
    var root: String { scratch.path }

    init() throws {
        scratch = try Scratch(prefix: "fg-w1")
        try FileManager.default.createDirectory(atPath: scratch.file("w1_bus_master1"), withIntermediateDirectories: true)
    }

    /// Writes `w1_slave` of `address` holding `millidegrees` with the CRC verdict `crc`.
    func slave(_ address: String, millidegrees: Int, crc: Bool = true) throws {
        try write(address, "w1_slave", Self.slaveText(millidegrees: millidegrees, crc: crc))
    }

    func write(_ address: String, _ file: String, _ text: String) throws {
        let directory = scratch.file(address)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try text.write(toFile: directory + "/" + file, atomically: true, encoding: .utf8)
    }

    /// Makes `w1_slave` of `address` a FIFO: a read of it blocks (holding its bus) until ``answer(_:millidegrees:)``.
    func fifo(_ address: String) throws -> String {
        try FileManager.default.createDirectory(atPath: scratch.file(address), withIntermediateDirectories: true)
        let path = scratch.file(address) + "/w1_slave"
        #expect(mkfifo(path, 0o600) == 0)
        return path
    }

    /// Ends the conversion a reader of the FIFO `path` waits for.
    static func answer(_ path: String, millidegrees: Int) {
        let writer = open(path, O_WRONLY | O_CLOEXEC)
        #expect(writer >= 0)
        _ = slaveText(millidegrees: millidegrees, crc: true).withCString { Glibc.write(writer, $0, strlen($0)) }
        close(writer)
    }

    /// Whether a reader has the FIFO `path` open (a read of its probe started).
    static func isBeingRead(_ path: String) -> Bool {
        let probe = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
        guard probe >= 0 else { return false }
        close(probe)
        return true
    }

    func remove(_ address: String) throws {
        try FileManager.default.removeItem(atPath: scratch.file(address))
    }

    /// What w1-therm prints: the scratchpad (temperature in 1/16 °C, little-endian) with the CRC verdict, then again
    /// with `t=`.
    static func slaveText(millidegrees: Int, crc: Bool) -> String {
        let raw = UInt16(bitPattern: Int16(clamping: (millidegrees * 16) / 1000))
        let pad = String(format: "%02x %02x 4b 46 7f ff 0c 10 1c", raw & 0xFF, raw >> 8)
        return "\(pad) : crc=1c \(crc ? "YES" : "NO")\n\(pad) t=\(millidegrees)\n"
    }

    func configuration(_ address: String, extra: String = "") throws -> SensorConfiguration {
        let text = """
            [device]
            id = "t"
            [[sensor]]
            id = "tank1.temp"
            driver = "ds18b20"
            quantity = "temperature"
            address = "\(address)"
            w1_root = "\(root)"
            \(extra)
            """
        return try #require(try AgentConfiguration.parse(ConfigDocument.parse(text, file: "test.toml")).sensors.first)
    }

    /// A driver on the fake tree. Its reads run on a thread of their own, timed against `read_timeout`: unless a test
    /// sets one, 10 s rather than the default 2 s, which two of these tests overran once at the start of the timed pass
    /// (hundreds of tests starting at once on two cores).
    func driver(_ address: String, extra: String = "") throws -> DS18B20Driver {
        let timeout = extra.contains("read_timeout") ? "" : "\nread_timeout = \"10s\""
        return try DS18B20Driver(configuration: try configuration(address, extra: extra + timeout), logger: driverTestLogger)
    }
}

@Suite("w1-therm sysfs parsing")
struct W1ThermTests {
    @Test(
        "w1_slave values are the kernel's millidegrees over 1000, exactly",
        arguments: [
            (23125, 23.125), (-1062, -1.062), (23062, 23.062), (22222, 22.222), (0, 0.0), (125_000, 125.0), (-55_000, -55.0),
        ])
    func values(millidegrees: Int, celsius: Double) throws {
        let parsed = try W1Therm.parseSlaveFile(FakeW1Tree.slaveText(millidegrees: millidegrees, crc: true)).get()
        #expect(parsed == millidegrees)
        #expect(W1Therm.celsius(millidegrees: parsed) == celsius)
        #expect(W1Therm.check(millidegrees: parsed) == nil)
    }

    @Test(
        "Fault signatures are refused with what to check",
        arguments: [
            ("", SensorError.Kind.fault, "returned nothing"),
            ("72 01 4b 46 7f ff 0e 10 57 : crc=57 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n", .fault, "CRC check failed"),
            ("00 00 00 00 00 00 00 00 00 : crc=00 YES\n00 00 00 00 00 00 00 00 00 t=0\n", .fault, "all zeros"),
            ("72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n", .invalidResponse, "no temperature line"),
            ("garbage\n", .invalidResponse, "does not look like w1-therm"),
            ("72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=abc\n", .invalidResponse, "not a temperature"),
        ])
    func faults(text: String, kind: SensorError.Kind, message: String) throws {
        let error = try #require(W1Therm.parseSlaveFile(text).failure)
        #expect(error.kind == kind)
        #expect(error.message.contains(message), "\(error)")
    }

    // A tester, 2026-12-07: a w1_slave pointing at /dev/zero gave a 16.5 KB message of raw NULs, /dev/urandom raw bytes.
    @Test("What a bad file holds is shown at most 80 characters long, control characters escaped")
    func badFileContentIsShownBounded() throws {
        let zeros = String(repeating: "\u{0}", count: 16_384)
        let error = try #require(W1Therm.parseSlaveFile(zeros).failure)
        #expect(error.message.contains("does not look like w1-therm output"), "\(error)")
        #expect(!error.message.contains("\u{0}") && error.message.contains("\\u{0}") && error.message.contains("… (16384 bytes)"), "\(error.message.prefix(200))")
        #expect(error.message.utf8.count < 700, "\(error.message.utf8.count) bytes")
        let binary = try #require(W1Therm.parseTemperatureFile("\u{1B}[2J\u{7}12x").failure)
        #expect(!binary.message.contains("\u{1B}") && binary.message.contains("\\u{1B}[2J"), "\(binary)")
    }

    @Test("85 °C (power-on reset), 127.9x °C (starved parasite power) and values outside -55..125 °C are refused")
    func checks() {
        let powerOn = W1Therm.check(millidegrees: 85_000)
        #expect(powerOn?.kind == .fault)
        #expect(powerOn?.message.contains("power-on reset value") == true)
        // The kernel prints 127937 for 0x07FF; datasheets write 127.94, and a clone in 14-bit mode reads 127984.
        for millidegrees in [127_937, 127_940, 127_984, 127_900, 127_999] {
            let starved = W1Therm.check(millidegrees: millidegrees)
            #expect(starved?.kind == .fault)
            #expect(starved?.message.contains("lacked power") == true, "\(millidegrees): \(String(describing: starved))")
        }
        #expect(W1Therm.check(millidegrees: 126_000)?.kind == .invalidResponse)
        #expect(W1Therm.check(millidegrees: 128_000)?.kind == .invalidResponse)
        #expect(W1Therm.check(millidegrees: -56_000)?.kind == .invalidResponse)
        #expect(W1Therm.check(millidegrees: 84_999) == nil)
    }
}

@Suite("DS18B20 driver on a fake w1 tree")
struct DS18B20DriverTests {
    let address = "28-0316a2791aff"

    @Test("Reads w1_slave; a CRC failure is a fault and the next good read recovers")
    func readsAndRejectsCRC() async throws {
        let tree = try FakeW1Tree()
        try tree.slave(address, millidegrees: 21_437)
        let driver = try tree.driver(address)
        #expect(try await driver.read().value == 21.437)
        try tree.slave(address, millidegrees: 21_500, crc: false)
        let error = try #require(await readResult(driver).failure)
        #expect(error.kind == .fault)
        #expect(error.message.contains("CRC"))
        try tree.slave(address, millidegrees: -312)
        #expect(try await driver.read().value == -0.312)
        await driver.close()
    }

    @Test("85 °C, the power-on reset value, is always refused, however often it repeats; a good value reads again")
    func powerOnValue() async throws {
        let tree = try FakeW1Tree()
        try tree.slave(address, millidegrees: 20_000)
        let driver = try tree.driver(address)
        #expect(try await driver.read().value == 20)
        try tree.slave(address, millidegrees: 85_000)
        // A sensor that browns out at every conversion reads 85 every time: never a temperature.
        for _ in 0..<3 {
            let error = try #require(await readResult(driver).failure)
            #expect(error.kind == .fault)
            #expect(error.message.contains("power-on reset value"))
            #expect(error.message.contains("check its VDD and ground wiring"))
        }
        // The same from the newer `temperature` file.
        try FileManager.default.removeItem(atPath: tree.scratch.file(address) + "/w1_slave")
        try tree.write(address, "temperature", "85000\n")
        #expect(await readResult(driver).failure?.message.contains("power-on reset value") == true)
        try tree.remove(address)
        try tree.slave(address, millidegrees: 20_062)
        #expect(try await driver.read().value == 20.062)
        await driver.close()
    }

    @Test("A vanished device is disconnected and names what is on the bus; a missing bus says how to enable it")
    func vanished() async throws {
        let tree = try FakeW1Tree()
        try tree.slave(address, millidegrees: 19_000)
        try tree.slave("28-00000a1b2c3d", millidegrees: 19_500)
        let driver = try tree.driver(address)
        #expect(try await driver.read().value == 19)
        try tree.remove(address)
        let error = try #require(await readResult(driver).failure)
        #expect(error.kind == .disconnected)
        #expect(error.message.contains("\(address) is not on the bus"))
        #expect(error.message.contains("present: 28-00000a1b2c3d"))
        // A tester, 2026-12-07: with 305 devices the message was 5.6 KB. At most ten are named.
        for index in 0..<25 { try tree.slave(String(format: "28-0000000001%02d", index), millidegrees: 19_000) }
        let crowded = try #require(await readResult(driver).failure)
        #expect(crowded.message.contains("28-000000000100, 28-000000000101") && crowded.message.contains(" and 16 more (`ls "), "\(crowded)")
        #expect(crowded.message.count < 400, "\(crowded.message.count) characters")
        try tree.slave(address, millidegrees: 19_125)
        #expect(try await driver.read().value == 19.125)
        await driver.close()

        let configuration = try tree.configuration(address, extra: "")
        var options = try DS18B20Driver.Options(configuration)
        options.root = tree.scratch.file("no-such-bus")
        let missing = try #require(DS18B20Driver.readMillidegrees(options).failure)
        #expect(missing.kind == .disconnected)
        #expect(missing.message.contains("dtoverlay=w1-gpio"))

        // Listed, but without w1_slave or temperature (w1_therm not loaded): not "not on the bus … present: <it>" (a
        // tester, 2026-12-06).
        try FileManager.default.createDirectory(atPath: tree.scratch.file("w1/28-0316a2791aff"), withIntermediateDirectories: true)
        options.root = tree.scratch.file("w1")
        options.address = "28-0316a2791aff"
        let bare = try #require(DS18B20Driver.readMillidegrees(options).failure)
        #expect(bare.message.contains("listed but has neither w1_slave nor temperature"), "\(bare)")
        #expect(!bare.message.contains("not on the bus"), "\(bare)")
    }

    @Test("Without w1_slave the newer temperature file is read; empty means the conversion failed")
    func temperatureFile() async throws {
        let tree = try FakeW1Tree()
        try tree.write(address, "temperature", "23187\n")
        let driver = try tree.driver(address)
        #expect(try await driver.read().value == 23.187)
        try tree.write(address, "temperature", "")
        let error = try #require(await readResult(driver).failure)
        #expect(error.kind == .fault)
        #expect(error.message.contains("conversion failed"))
        await driver.close()
    }

    @Test("A read that blocks (a hung bus) is abandoned after read_timeout and the sensor recovers once it returns")
    func blockedRead() async throws {
        let tree = try FakeW1Tree()
        try FileManager.default.createDirectory(atPath: tree.scratch.file(address), withIntermediateDirectories: true)
        let fifo = tree.scratch.file(address) + "/w1_slave"
        #expect(mkfifo(fifo, 0o600) == 0)
        let driver = try tree.driver(address, extra: "read_timeout = \"200ms\"")
        let start = ContinuousClock.now
        let error = try #require(await readResult(driver).failure)
        #expect(error.kind == .timeout)
        #expect(ContinuousClock.now - start < .seconds(3))
        // While the first read is stuck, the next fails at once instead of queueing behind it.
        let stuck = try #require(await readResult(driver).failure)
        #expect(stuck.message.contains("still blocked"))
        // The bus answers: the stuck read completes; then the sensor reads normally again.
        let writer = open(fifo, O_WRONLY)
        #expect(writer >= 0)
        let text = FakeW1Tree.slaveText(millidegrees: 18_000, crc: true)
        _ = text.withCString { write(writer, $0, strlen($0)) }
        close(writer)
        try FileManager.default.removeItem(atPath: fifo)
        try tree.slave(address, millidegrees: 18_250)
        let back = await eventually(timeout: .seconds(10)) { (try? await driver.read().value) == 18.25 }
        #expect(back)
        await driver.close()
    }

    // A tester, 2026-12-07: with parasite power the kernel holds the bus for each conversion, so concurrent reads queue
    // there; timed from their start, the later ones timed out, stayed blocked and held the bus for the next round.
    @Test("Probes on one bus whose reads the bus serves one at a time all read: read_timeout starts when a read has the bus")
    func readsShareTheBus() async throws {
        let tree = try FakeW1Tree()
        let addresses = (1...6).map { "28-00000000000\($0)" }
        for address in addresses {
            try FileManager.default.createDirectory(atPath: tree.scratch.file(address), withIntermediateDirectories: true)
            #expect(mkfifo(tree.scratch.file(address) + "/w1_slave", 0o600) == 0)
        }
        // The bus: one conversion at a time, 250 ms each, for whichever probe is being read (a reader has the FIFO open).
        let stop = Mutex(false)
        let served = Mutex(0)
        let fifos = addresses.map { tree.scratch.file($0) + "/w1_slave" }
        let bus = Thread {
            while !stop.withLock({ $0 }) {
                var idle = true
                for (index, fifo) in fifos.enumerated() {
                    let writer = open(fifo, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
                    guard writer >= 0 else { continue }
                    idle = false
                    Thread.sleep(forTimeInterval: 0.25)
                    let text = FakeW1Tree.slaveText(millidegrees: 20_000 + index * 1000, crc: true)
                    _ = text.withCString { write(writer, $0, strlen($0)) }
                    close(writer)
                    served.withLock { $0 += 1 }
                    // Until the reader has closed its end (it read to the end): the same read is not served twice.
                    let until = Date().addingTimeInterval(1)
                    while Date() < until {
                        let again = open(fifo, O_WRONLY | O_NONBLOCK | O_CLOEXEC)
                        guard again >= 0 else { break }
                        close(again)
                        Thread.sleep(forTimeInterval: 0.002)
                    }
                }
                if idle { Thread.sleep(forTimeInterval: 0.005) }
            }
        }
        bus.start()
        defer { stop.withLock { $0 = true } }
        // Six conversions of 250 ms take 1.5 s: a read_timeout of 1.2 s counted from the request would fail the last
        // probes, counted from when a read has the bus it passes (600 ms ran out once under a loaded CI run, the fake
        // bus slow to serve the first).
        let drivers = try addresses.map { try tree.driver($0, extra: "read_timeout = \"1200ms\"\ninterval = \"10s\"") }
        let results = await withTaskGroup(of: (Int, Result<SensorValue, SensorError>).self) { group in
            for (index, driver) in drivers.enumerated() { group.addTask { (index, await readResult(driver)) } }
            var results: [Int: Result<SensorValue, SensorError>] = [:]
            for await (index, result) in group { results[index] = result }
            return results
        }
        for (index, _) in addresses.enumerated() {
            let value = try? results[index]?.get().value
            #expect(value == 20 + Double(index), "probe \(index): \(String(describing: results[index]))")
        }
        // The bus thread counts a conversion just after closing its end, which is when the reader's read returns: wait
        // for the count rather than race it (5 was seen once under load).
        #expect(await eventually(timeout: .seconds(5)) { served.withLock { $0 } == 6 }, "\(served.withLock { $0 })")
        for driver in drivers { await driver.close() }
    }

    // A tester, 2026-12-07: on a busy bus a read waited for the bus as long as the sampler waited for the whole read,
    // so a read that got the bus late was abandoned by the sampler mid-conversion, its reading dropped; and a read whose
    // caller had stopped waiting still took the bus for a conversion nobody read.
    @Test("The sampler waits for a probe's bus and its read_timeout both; a read given up before it had the bus never takes it")
    func readGivenUpDoesNotTakeTheBus() async throws {
        let tree = try FakeW1Tree()
        let addresses = ["28-00000000000a", "28-00000000000b"]
        let fifos = try addresses.map(tree.fifo)
        let drivers = [
            try tree.driver(addresses[0], extra: "read_timeout = \"300ms\"\ninterval = \"2s\""),
            try tree.driver(addresses[1], extra: "read_timeout = \"2s\"\ninterval = \"2s\""),
        ]
        let sensor = Sampler.Sensor(configuration: try tree.configuration(addresses[1], extra: "read_timeout = \"2s\"\ninterval = \"2s\""), driver: drivers[1])
        #expect(sensor.readTimeout >= drivers[1].busWait + .seconds(2), "\(sensor.readTimeout)")
        // Probe a's read holds the bus (its FIFO has no writer yet); b's read waits for the bus and gives up after 5 s.
        let first = Task { await readResult(drivers[0]) }
        try await Task.sleep(for: .milliseconds(300))
        guard case .failure(let waited) = await readResult(drivers[1]) else {
            Issue.record("b read while a held the bus")
            return
        }
        #expect(waited.message.contains("waited 5.0 seconds for its 1-Wire bus"), "\(waited)")
        // It names what holds the bus, and past 10 × that read's read_timeout, that only a restart clears it (a tester,
        // 2026-12-07: after a reload the old services' stuck read held the bus and nothing said so).
        #expect(waited.message.contains("a read of 28-00000000000a has held the bus for "), "\(waited)")
        #expect(waited.message.contains("only restarting the agent (systemctl restart farmgate) clears this"), "\(waited)")
        // a's conversion ends: the bus is free, and b's given-up read must not open b's w1_slave.
        FakeW1Tree.answer(fifos[0], millidegrees: 21_000)
        _ = await first.value
        try await Task.sleep(for: .milliseconds(500))
        #expect(!FakeW1Tree.isBeingRead(fifos[1]), "b's w1_slave was opened by a read whose caller had given up")
        for driver in drivers { await driver.close() }
    }

    // A tester, 2026-12-07: after a reload of a busy bus the old services' reads still waiting for it converted one
    // after another, 5–6 readings nobody stored, while the new services waited.
    @Test("A read still waiting for the bus when its driver closes (a stop, a reload) never takes it")
    func closedDriverDoesNotTakeTheBus() async throws {
        let tree = try FakeW1Tree()
        let addresses = ["28-00000000000c", "28-00000000000d"]
        let fifos = try addresses.map(tree.fifo)
        let drivers = try addresses.map { try tree.driver($0, extra: "read_timeout = \"300ms\"\ninterval = \"2s\"") }
        let first = Task { await readResult(drivers[0]) }  // holds the bus: its FIFO has no writer yet
        try await Task.sleep(for: .milliseconds(300))
        let second = Task { await readResult(drivers[1]) }  // waits for the bus
        try await Task.sleep(for: .milliseconds(300))
        await drivers[1].close()
        FakeW1Tree.answer(fifos[0], millidegrees: 21_000)
        _ = await first.value
        try await Task.sleep(for: .milliseconds(500))
        #expect(!FakeW1Tree.isBeingRead(fifos[1]), "the closed driver's waiting read opened its w1_slave")
        second.cancel()
        await drivers[0].close()
    }

    // Found by a black-box tester: a read that never returns leaves the probe timing out for good, even once the device
    // is healthy again; past 10 × read_timeout the message says that only a restart clears it.
    @Test("A read blocked for over 10 × read_timeout says that only restarting the agent clears it")
    func readBlockedForGood() async throws {
        let tree = try FakeW1Tree()
        try FileManager.default.createDirectory(atPath: tree.scratch.file(address), withIntermediateDirectories: true)
        let fifo = tree.scratch.file(address) + "/w1_slave"
        #expect(mkfifo(fifo, 0o600) == 0)
        // 300 ms: the early look must come before 10 × the timeout even on a loaded machine.
        let driver = try tree.driver(address, extra: "read_timeout = \"300ms\"")
        #expect(try #require(await readResult(driver).failure).kind == .timeout)
        let early = try #require(await readResult(driver).failure)
        #expect(early.message.contains("still blocked") && !early.message.contains("systemctl restart farmgate"), "\(early.message)")
        try await Task.sleep(for: .milliseconds(3_100))
        let late = try #require(await readResult(driver).failure)
        #expect(late.kind == .timeout)
        // At least the 3.1 s slept, and more on a loaded machine (CI run 131 saw a second more).
        #expect(late.message.contains(" s ago) is still blocked") && !late.message.contains("(started 0 s ago)"), "\(late.message)")
        #expect(late.message.contains("only restarting the agent (systemctl restart farmgate) clears this"), "\(late.message)")
        // Let the stuck read end so that the driver's thread can stop.
        let writer = open(fifo, O_WRONLY)
        if writer >= 0 { close(writer) }
        await driver.close()
    }
}
