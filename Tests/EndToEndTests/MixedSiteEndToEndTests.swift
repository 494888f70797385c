import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A whole mixed site, read by the real agent and stored by the real ingest: EZO pH, EC and RTD (compensation source) on
/// pseudo-terminals, a Modbus RTU pH transmitter on a pseudo-terminal, a DS18B20 in a fake w1 tree, a float switch and a
/// flow meter's pulses through the GPIO `events` backend. Through an unplugged and replugged adapter, a CRC fault and a
/// vanished probe, a `kill -9` of the agent and a restart of the ingest, the ingest holds sequences 1...N of the device
/// exactly once, and every stored value is one a simulator produced.
@Suite("End to end: a mixed site (EZO, Modbus, DS18B20, GPIO)", .serialized)
struct MixedSiteEndToEndTests {
    struct Stored: Hashable {
        var sequence: UInt64
        var value: Double
        var flags: Set<String>
    }

    /// Every reading the ingest stores for `device`, by sensor, through the real `export` command.
    func stored(_ farm: Farm, device: String) async throws -> [String: [Stored]] {
        let output = try await farm.admin(["export", "--farm", "e2e", "--format", "jsonl"])
        var readings: [String: [Stored]] = [:]
        for line in output.split(separator: "\n") where !line.isEmpty {
            guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                object["device"] as? String == device, let sensor = object["sensor"] as? String,
                let value = (object["value"] as? NSNumber)?.doubleValue, let sequence = (object["sequence"] as? NSNumber)?.uint64Value
            else { continue }
            readings[sensor, default: []].append(Stored(sequence: sequence, value: value, flags: Set(object["flags"] as? [String] ?? [])))
        }
        return readings
    }

    static func w1Slave(millidegrees: Int, crcOK: Bool = true) -> String {
        "50 05 4b 46 7f ff 0c 10 1c : crc=1c \(crcOK ? "YES" : "NO")\n50 05 4b 46 7f ff 0c 10 1c t=\(millidegrees)\n"
    }

    @Test("every sensor of a mixed site reaches the real ingest exactly once through unplugs, faults, kill -9 and an ingest restart")
    func mixedSite() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("mixed-site")
        let keyFile = try farm.dir.write("mixed-site.key", key + "\n")

        // EZO circuits: values unique per read, exact at each sensor's resolution.
        let rtd = try EZOSimulator(.rtd, path: farm.dir.file("by-id-rtd"), values: { index, _ in 18 + Double(max(0, index)) / 8 })
        let ph = try EZOSimulator(.ph, path: farm.dir.file("by-id-ph"), values: { index, _ in 5 + Double(max(0, index)) / 100 })
        let ec = try EZOSimulator(.ec, path: farm.dir.file("by-id-ec"), firmware: "2.15", values: { index, _ in 1000 + Double(max(0, index)) })
        // A Modbus pH transmitter (SUP-PH8001 map: register 0 temperature ×0.1 °C, register 1 pH ×0.01).
        let bus = try ModbusTestSlave(path: farm.dir.file("by-id-rs485"), answering: [1])
        bus.set(slave: 1, address: 0, [215, 612])
        defer {
            rtd.stop()
            ph.stop()
            ec.stop()
            bus.stop()
        }
        // DS18B20 in a fake w1 tree; every value written is recorded.
        let w1 = farm.dir.file("w1")
        let probe = w1 + "/28-0316a2791aff"
        try FileManager.default.createDirectory(atPath: probe, withIntermediateDirectories: true)
        var written: Set<Double> = []
        func writeProbe(_ millidegrees: Int, crcOK: Bool = true) throws {
            try Self.w1Slave(millidegrees: millidegrees, crcOK: crcOK).write(toFile: probe + "/w1_slave", atomically: true, encoding: .utf8)
            // Stored at the sensor's resolution, 1/16 °C by default for a temperature.
            if crcOK { written.insert((Double(millidegrees) / 1000 * 16).rounded() / 16) }
        }
        try writeProbe(21_437)
        // GPIO: a float switch and a flow meter's pulses, each through a line-event script.
        let floatEvents = try farm.dir.write("float.events", "level 0\nnow 100\n")
        let pulseEvents = try farm.dir.write("pulses.events", "level 0\nnow 100\nrise 100.1\nfall 100.15\nrise 100.2\nfall 100.25\nrise 100.3\nnow 101\n")

        var text = try String(
            contentsOfFile: farm.agentConfig("base.toml", device: "mixed-site", keyFile: keyFile, sensors: 0, interval: "1s"), encoding: .utf8)
        text += """

            [[sensor]]
            id = "tank1.temp"
            driver = "ezo"
            quantity = "temperature"
            port = "\(rtd.path)"
            interval = "1s"

            [[sensor]]
            id = "tank1.ph"
            driver = "ezo"
            quantity = "ph"
            port = "\(ph.path)"
            temperature_sensor = "tank1.temp"
            interval = "1s"

            [[sensor]]
            id = "tank1.ec"
            driver = "ezo"
            quantity = "ec"
            port = "\(ec.path)"
            temperature_sensor = "tank1.temp"
            interval = "1s"

            [[sensor]]
            id = "tank2.ph"
            driver = "modbus"
            quantity = "ph"
            port = "\(bus.path)"
            slave = 1
            address = 1
            scale = 0.01
            interval = "1s"

            [[sensor]]
            id = "tank2.temp"
            driver = "modbus"
            quantity = "temperature"
            resolution = "0.1"
            port = "\(bus.path)"
            slave = 1
            address = 0
            scale = 0.1
            interval = "1s"

            [[sensor]]
            id = "room.temp"
            driver = "ds18b20"
            quantity = "temperature"
            address = "28-0316a2791aff"
            w1_root = "\(w1)"
            interval = "500ms"

            [[sensor]]
            id = "tank1.level_ok"
            driver = "gpio"
            quantity = "state"
            line = 17
            debounce = "10ms"
            backend = "events"
            events_file = "\(floatEvents)"

            [[sensor]]
            id = "loop.pulses"
            driver = "gpio"
            quantity = "count"
            line = 27
            interval = "500ms"
            backend = "events"
            events_file = "\(pulseEvents)"

            """
        let config = try farm.dir.write("agent.toml", text)
        try await farm.startIngest()
        var agent = try farm.startAgent(config: config, log: "agent-1.log")
        let sensors = ["tank1.temp", "tank1.ph", "tank1.ec", "tank2.ph", "tank2.temp", "room.temp", "tank1.level_ok", "loop.pulses"]
        func sensorError(_ id: String) async throws -> String? {
            try await farm.agentStatus(config: config)?.sensors.first { $0.id == id }?.lastError
        }

        // 1. Every sensor delivers.
        let flowing = try await eventually(timeout: .seconds(30), every: .milliseconds(500)) {
            let readings = try await stored(farm, device: "mixed-site")
            return sensors.allSatisfy { (readings[$0]?.count ?? 0) >= 1 }
        }
        #expect(flowing, "not every sensor delivered: \(agent.log)")

        // 2. The pH adapter is unplugged and plugged back; the DS18B20 fails its CRC, then vanishes, then comes back with
        //    new values; the Modbus transmitter's values change.
        await ph.unplug()
        #expect(try await eventually(timeout: .seconds(10), every: .milliseconds(200)) { try await sensorError("tank1.ph")?.hasPrefix("disconnected") == true })
        try writeProbe(22_000, crcOK: false)
        #expect(try await eventually(timeout: .seconds(10), every: .milliseconds(200)) { try await sensorError("room.temp")?.contains("CRC") == true })
        try FileManager.default.removeItem(atPath: probe)
        #expect(try await eventually(timeout: .seconds(10), every: .milliseconds(200)) { try await sensorError("room.temp")?.hasPrefix("disconnected") == true })
        try FileManager.default.createDirectory(atPath: probe, withIntermediateDirectories: true)
        try writeProbe(22_125)
        await ph.replug()
        bus.set(slave: 1, address: 0, [220, 618])
        try Data("rise 100.5\nnow 101\n".utf8).append(toFile: floatEvents)

        // 3. kill -9 of the agent, then a restart (the pulse script starts over with new pulses, as a fresh line would).
        try await Task.sleep(for: .seconds(2))
        #expect(await agent.stop(SIGKILL) == SIGKILL || !agent.isRunning)
        try Data("level 0\nnow 200\nrise 200.1\nfall 200.15\nrise 200.2\nnow 201\n".utf8).write(to: URL(fileURLWithPath: pulseEvents))
        agent = try farm.startAgent(config: config, log: "agent-2.log")

        // 4. The ingest restarts while the agent runs.
        try await Task.sleep(for: .seconds(2))
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
        try await Task.sleep(for: .seconds(1))
        try await farm.startIngest()
        try writeProbe(22_250)

        // 5. Quiet the serial devices, let everything pending go, stop gracefully.
        try await Task.sleep(for: .seconds(2))
        for simulator in [rtd, ph, ec] { simulator.inject(contentsOf: Array(repeating: .silence, count: 1000)) }
        let drained = try await eventually(timeout: .seconds(20), every: .milliseconds(300)) {
            guard let status = try await farm.agentStatus(config: config) else { return false }
            return status.buffer.pending == 0 && status.buffer.uncommitted == 0
        }
        #expect(drained, "the agent did not deliver everything: \(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0, "graceful stop failed: \(agent.log)")
        // What the circuits served, taken once the agent has stopped: a read in flight at the stop (an answer the
        // silence injected above came too late for) is still stored, and uploaded by the graceful stop.
        let served = ["tank1.temp": rtd.served, "tank1.ph": ph.served, "tank1.ec": ec.served]
        let lastSequence = try await lastBufferedSequence(farm.dir.file("mixed-site/buffer.sqlite"))

        // Exactly 1...N for the device, none twice, none missing (N: the buffer's last sequence).
        let readings = try await stored(farm, device: "mixed-site")
        let sequences = readings.values.flatMap { $0.map(\.sequence) }.sorted()
        #expect(sequences.count == Set(sequences).count, "a sequence was stored twice")
        #expect(sequences == Array(1...max(1, lastSequence)), "stored \(sequences.count) of 1...\(lastSequence)")

        // EZO: every stored value was served; a kill -9 loses at most what the last commit interval held.
        for (sensor, answers) in served {
            let expected = Set(answers.compactMap { Double($0.line) })
            let got = (readings[sensor] ?? []).map(\.value)
            #expect(Set(got).isSubset(of: expected), "\(sensor): stored values never served: \(Set(got).subtracting(expected).sorted())")
            #expect(got.count == Set(got).count, "\(sensor): a value stored twice")
            #expect(expected.count - got.count <= 3, "\(sensor): served \(expected.count), stored \(got.count)")
        }
        // Compensation: a stored pH or EC reading is flagged exactly when the circuit was read with RT,<t>, and with a
        // temperature the RTD had served (two decimals, as the driver sends it).
        let temperatures = Set(rtd.served.compactMap { Double($0.line).map { ($0 * 100).rounded() / 100 } })
        for sensor in ["tank1.ph", "tank1.ec"] {
            let answers = Dictionary((served[sensor] ?? []).compactMap { answer in Double(answer.line).map { ($0, answer.temperature) } }, uniquingKeysWith: { first, _ in first })
            let stored = readings[sensor] ?? []
            for reading in stored {
                let temperature = answers[reading.value] ?? nil
                #expect(reading.flags.contains("compensated") == (temperature != nil), "\(sensor) \(reading.value): flags \(reading.flags), read with \(String(describing: temperature))")
                if let temperature { #expect(temperatures.contains(temperature), "\(sensor) compensated with \(temperature), never read by the RTD") }
            }
            #expect(stored.contains { $0.flags.contains("compensated") }, "\(sensor): no compensated reading")
        }
        #expect((readings["tank1.temp"] ?? []).allSatisfy { !$0.flags.contains("compensated") })
        // Modbus: only the values the transmitter held.
        #expect(Set((readings["tank2.ph"] ?? []).map(\.value)).isSubset(of: [6.12, 6.18]), "\(readings["tank2.ph"] ?? [])")
        #expect(Set((readings["tank2.temp"] ?? []).map(\.value)).isSubset(of: [21.5, 22.0]), "\(readings["tank2.temp"] ?? [])")
        #expect((readings["tank2.ph"] ?? []).contains { $0.value == 6.18 }, "the changed transmitter value never arrived")
        // DS18B20: the CRC failure and the vanished probe stored nothing; every stored value was a good one written.
        let room = (readings["room.temp"] ?? []).map(\.value)
        #expect(Set(room).isSubset(of: written), "stored \(Set(room).subtracting(written)), never written with a good CRC")
        #expect(room.contains(22.125) || room.contains(22.25), "the probe's values after it came back never arrived: \(room)")
        // GPIO: the switch's states, and a count that never goes back.
        #expect(Set((readings["tank1.level_ok"] ?? []).map(\.value)).isSubset(of: [0, 1]))
        #expect((readings["tank1.level_ok"] ?? []).contains { $0.value == 1 }, "the float switch's change never arrived")
        let counts = (readings["loop.pulses"] ?? []).sorted { $0.sequence < $1.sequence }.map(\.value)
        #expect(zip(counts, counts.dropFirst()).allSatisfy { $0 <= $1 }, "the count went back: \(counts)")
        #expect(counts.last == 5, "3 pulses before the kill and 2 after: \(counts)")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    /// The buffer's last assigned sequence, read from its counters table after the agent stopped.
    func lastBufferedSequence(_ path: String) async throws -> UInt64 {
        let result = try await runCommand("/usr/bin/sqlite3", [path, "SELECT value FROM counters WHERE name = 'last_sequence'"])
        return UInt64(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }
}

extension Data {
    /// Appends to an existing file.
    func append(toFile path: String) throws {
        guard let handle = FileHandle(forWritingAtPath: path) else { throw CocoaError(.fileNoSuchFile) }
        defer { try? handle.close() }
        try handle.seekToEnd()
        try handle.write(contentsOf: self)
    }
}
