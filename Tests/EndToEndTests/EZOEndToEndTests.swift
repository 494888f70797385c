import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

/// The real agent reads three simulated EZO circuits on pseudo-terminals and uploads to the real ingest: every reading a
/// circuit served arrives exactly once with the right flags, through a USB replug and a circuit reboot, without a restart.
@Suite("End to end: EZO circuits", .serialized)
struct EZOEndToEndTests {
    struct Stored: Hashable {
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
                let value = (object["value"] as? NSNumber)?.doubleValue
            else { continue }
            readings[sensor, default: []].append(Stored(value: value, flags: Set(object["flags"] as? [String] ?? [])))
        }
        return readings
    }

    @Test("pH and EC compensated by an RTD, a replug and a reboot in the middle: every served value stored once")
    func threeCircuits() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("ezo-site")
        let keyFile = try farm.dir.write("ezo-site.key", key + "\n")
        // Values unique per read and exact at each sensor's resolution, so that the stored set can be compared with the served one.
        let rtd = try EZOSimulator(.rtd, path: farm.dir.file("by-id-rtd"), values: { index, _ in 18 + Double(max(0, index)) / 8 })
        let ph = try EZOSimulator(.ph, path: farm.dir.file("by-id-ph"), values: { index, _ in 5 + Double(max(0, index)) / 100 })
        let ec = try EZOSimulator(.ec, path: farm.dir.file("by-id-ec"), firmware: "2.15", values: { index, _ in 1000 + Double(max(0, index)) })
        defer {
            rtd.stop()
            ph.stop()
            ec.stop()
        }
        var text = try String(contentsOfFile: farm.agentConfig("base.toml", device: "ezo-site", keyFile: keyFile, sensors: 0, interval: "1s"), encoding: .utf8)
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
            temperature_max_age = "30s"
            interval = "1s"

            [[sensor]]
            id = "tank1.ec"
            driver = "ezo"
            quantity = "ec"
            port = "\(ec.path)"
            temperature_sensor = "tank1.temp"
            interval = "1s"

            """
        let config = try farm.dir.write("agent.toml", text)
        try await farm.startIngest()
        let agent = try farm.startAgent(config: config, log: "agent.log")

        // 1. All three circuits deliver.
        let flowing = try await eventually(timeout: .seconds(40), every: .milliseconds(500)) {
            let readings = try await stored(farm, device: "ezo-site")
            return ["tank1.temp", "tank1.ph", "tank1.ec"].allSatisfy { (readings[$0]?.count ?? 0) >= 4 }
        }
        #expect(flowing, "readings did not arrive from all three circuits: \(agent.log)")

        // 2. The pH adapter is pulled out for a while and plugged back in (a new tty behind the same by-id link), and the
        //    EC circuit reboots on its own; the same agent process carries on.
        let phBefore = ph.served.count
        await ph.unplug()
        let sawDisconnect = try await eventually(timeout: .seconds(15), every: .milliseconds(300)) {
            let status = try await farm.agentStatus(config: config)
            return status?.sensors.first { $0.id == "tank1.ph" }?.lastError?.hasPrefix("disconnected") == true
        }
        #expect(sawDisconnect, "farmgate status did not show the pH sensor disconnected")
        await ec.reboot()
        try await Task.sleep(for: .seconds(1))
        await ph.replug()
        let resumed = await eventually(timeout: .seconds(40), every: .milliseconds(300)) {
            ph.served.count >= phBefore + 4 && ec.served.count >= 8
        }
        #expect(resumed, "the pH circuit was not read again after the replug: \(agent.log)")
        #expect(agent.isRunning)
        #expect(ec.commands.filter { $0.uppercased() == "C,0" }.count >= 2, "the EC circuit was not initialised again after its reboot")

        // 3. Quiet the circuits (every read from now on goes unanswered), let what was served be stored, then stop.
        for simulator in [rtd, ph, ec] {
            simulator.inject(contentsOf: Array(repeating: .silence, count: 1000))
        }
        try await Task.sleep(for: .seconds(3))
        #expect(await agent.stop(SIGTERM) == 0, "graceful stop failed: \(agent.log)")
        // Taken after the stop: a read in flight at the stop is stored too (the sampler waits for it).
        let served = ["tank1.temp": rtd.served, "tank1.ph": ph.served, "tank1.ec": ec.served]

        let readings = try await stored(farm, device: "ezo-site")
        for (sensor, answers) in served {
            let expected = answers.compactMap { Double($0.line) }.sorted()
            let got = (readings[sensor] ?? []).map(\.value).sorted()
            #expect(got.count == Set(got).count, "\(sensor): a value was stored twice")
            #expect(got == expected, "\(sensor): served \(expected.count), stored \(got.count); missing \(Set(expected).subtracting(got).sorted()), extra \(Set(got).subtracting(expected).sorted())")
        }
        // Compensation: every pH and EC reading carries the flag, and was read with a temperature the RTD had served.
        // The driver sends the temperature with two decimals (RT,18.13), as the circuits take it.
        let temperatures = Set(rtd.served.compactMap { Double($0.line).map { ($0 * 100).rounded() / 100 } })
        for sensor in ["tank1.ph", "tank1.ec"] {
            let flags = (readings[sensor] ?? []).map(\.flags)
            let compensated = flags.filter { $0.contains("compensated") }.count
            let answers = served[sensor] ?? []
            let withTemperature = answers.filter { $0.temperature != nil }
            #expect(compensated == withTemperature.count, "\(sensor): \(compensated) flagged, \(withTemperature.count) read with RT")
            // Only reads before the RTD's first value go without (the circuits start together).
            #expect(answers.suffix(answers.count / 2).allSatisfy { $0.temperature != nil }, "\(sensor): \(answers.map { $0.temperature == nil ? "R" : "RT" })")
            for answer in withTemperature {
                #expect(answer.temperature.map { temperatures.contains($0) } == true, "\(sensor) was compensated with \(String(describing: answer.temperature)), which the RTD never read")
            }
        }
        #expect((readings["tank1.temp"] ?? []).allSatisfy { !$0.flags.contains("compensated") })
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
