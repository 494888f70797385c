import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing

/// A calibration made with the real `farmgate calibrate` on a running agent reaches the real ingest once, travelling in a
/// version 3 frame with the readings, and leaves the agent's buffer.
@Suite("End to end: calibration events", .serialized)
struct CalibrationDeliveryTests {
    struct Answer: Decodable {
        var device: String
        var sensor: String
        var calibrations: [CalibrationEvent]
    }

    /// The ingest's calibrations of `sensor`, through its read API with a viewer token; nil while it does not answer 200.
    static func calibrations(_ farm: Farm, token: String, device: String, sensor: String) async -> [CalibrationEvent]? {
        guard let url = URL(string: farm.endpoint + "/v1/farms/e2e/devices/\(device)/sensors/\(sensor)/calibrations") else { return nil }
        var request = URLRequest(url: url)
        request.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization")
        request.timeoutInterval = 5
        guard let (data, response) = try? await URLSession.shared.data(for: request), (response as? HTTPURLResponse)?.statusCode == 200,
            let answer = try? JSONDecoder().decode(Answer.self, from: data)
        else { return nil }
        return answer.calibrations
    }

    @Test("farmgate calibrate on a running agent: the event is readable on the ingest exactly once and the buffer has none left")
    func calibrationReachesTheIngestOnce() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("cal-site")
        let keyFile = try farm.dir.write("cal-site.key", key + "\n")
        let tokenOutput = try await farm.admin(["token", "create", "--farm", "e2e", "--role", "viewer"])
        let token = try #require(
            tokenOutput.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\"" }).first { $0.hasPrefix("fgr_") }.map(String.init))
        let ph = try EZOSimulator(.ph, path: farm.dir.file("by-id-ph"), timeScale: 0.2, values: { _, _ in 7.01 })
        defer { ph.stop() }
        var text = try String(
            contentsOfFile: farm.agentConfig("base.toml", device: "cal-site", keyFile: keyFile, sensors: 0, interval: "1s"), encoding: .utf8)
        text += """

            [[sensor]]
            id = "tank1.ph"
            driver = "ezo"
            quantity = "ph"
            port = "\(ph.path)"
            interval = "400ms"

            """
        let config = try farm.dir.write("agent.toml", text)
        try await farm.startIngest()
        let agent = try farm.startAgent(config: config, log: "agent.log")

        // Readings flow before the calibration (binary version 2 batches), and the agent learnt the ingest reads version 3.
        let flowing = try await eventually(timeout: .seconds(40), every: .milliseconds(500)) {
            try await farm.storedSequences(device: "cal-site").count >= 3
        }
        try #require(flowing, "no readings reached the ingest: \(agent.log)")
        #expect(await Self.calibrations(farm, token: token, device: "cal-site", sensor: "tank1.ph") == [])

        let calibrate = try await runCommand(
            Farm.agentBinary,
            ["calibrate", "-c", config, "tank1.ph", "--point", "mid=7.00", "--yes", "--window", "1s", "--interval", "100ms", "--tolerance", "0.02"])
        #expect(calibrate.status == 0, "farmgate calibrate failed: \(calibrate.stdout) \(calibrate.stderr)")
        #expect((calibrate.stdout + calibrate.stderr).contains("Calibration recorded as event"), "\(calibrate.stdout) \(calibrate.stderr)")

        // The event arrives with a later batch; then the agent's buffer holds none.
        let arrived = await eventually(timeout: .seconds(40), every: .milliseconds(300)) {
            (await Self.calibrations(farm, token: token, device: "cal-site", sensor: "tank1.ph"))?.isEmpty == false
        }
        try #require(arrived, "the calibration never reached the ingest: \(agent.log)")
        let drained = try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            try await farm.agentStatus(config: config)?.buffer.pendingCalibrations == 0
        }
        #expect(drained, "the agent's buffer still holds the event: \(agent.log)")
        let human = try await runCommand(Farm.agentBinary, ["status", "--config", config])
        #expect(human.stdout.contains("0 calibration events waiting for the ingest"), "\(human.stdout)")

        // More batches go; the event is still there exactly once.
        let before = try await farm.storedSequences(device: "cal-site").count
        #expect(try await eventually(timeout: .seconds(30), every: .milliseconds(500)) {
            try await farm.storedSequences(device: "cal-site").count >= before + 3
        })
        let events = try #require(await Self.calibrations(farm, token: token, device: "cal-site", sensor: "tank1.ph"))
        #expect(events.count == 1, "\(events)")
        #expect(events.first?.points.map(\.name) == ["mid"])
        #expect(events.first?.points.first?.reference == 7)
        #expect(events.first?.sensor.rawValue == "tank1.ph")

        #expect(await agent.stop() == 0, "\(agent.log)")
        await farm.ingest?.stop()
    }
}
