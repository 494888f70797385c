import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// A Raspberry Pi without RTC, played with the real binaries: the agent starts on a clock three days behind that the kernel
/// calls unsynchronised (the `FARMGATE_TEST_CLOCK_FILE` hook), then NTP "sets" it.
@Suite("End to end: clock", .serialized)
struct ClockEndToEndTests {
    /// One stored reading as `farmgate-ingest export --format jsonl` prints it.
    struct Stored {
        let sensor: String
        let sequence: UInt64
        let timestamp: Timestamp
        let flags: [String]
    }

    static func export(_ farm: Farm, device: String) async throws -> [Stored] {
        let output = try await farm.admin(["export", "--farm", "e2e", "--format", "jsonl"])
        var stored: [Stored] = []
        for line in output.split(separator: "\n") where !line.isEmpty {
            guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                object["device"] as? String == device, let sensor = object["sensor"] as? String,
                let sequence = (object["sequence"] as? NSNumber)?.uint64Value,
                let text = object["timestamp"] as? String, let timestamp = RFC3339.parse(text)
            else { continue }
            stored.append(Stored(sensor: sensor, sequence: sequence, timestamp: timestamp, flags: object["flags"] as? [String] ?? []))
        }
        return stored
    }

    /// An agent configuration with the clock checked, `hold` for unsynchronised readings, and three sensors every 200 ms.
    static func config(_ farm: Farm, device: String, keyFile: String, hold: String) throws -> String {
        let path = try farm.agentConfig("\(device).toml", device: device, keyFile: keyFile, sensors: 3, interval: "200ms")
        let text = try String(contentsOfFile: path, encoding: .utf8)
            .replacingOccurrences(of: "check = false", with: "check = true\nhold_unsynchronized = \"\(hold)\"")
        return try farm.dir.write("\(device).toml", text)
    }

    @Test("Readings taken on a clock three days behind are held, then arrive once with their true time when the clock is set")
    func heldThenCorrected() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("pi-1")
        let keyFile = try farm.dir.write("pi-1.key", key + "\n")
        let config = try Self.config(farm, device: "pi-1", keyFile: keyFile, hold: "10m")
        let clockFile = try farm.dir.write("clock.json", #"{"synchronized": false, "offset_seconds": -259200}"#)
        try await farm.startIngest()

        let started = Timestamp.now()
        let agent = try Child(
            Farm.agentBinary, ["agent", "--config", config], logPath: farm.dir.file("agent.log"),
            environment: [SystemClockSource.testHookVariable: clockFile])

        // Unsynchronised: readings pile up held; the ingest stores none of them.
        var status: AgentStatus?
        let holding = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            status = try await farm.agentStatus(config: config)
            return (status?.buffer.held ?? 0) >= 15
        }
        #expect(holding, "no readings held: \(String(describing: status?.buffer)) \(agent.log)")
        #expect(status?.clock?.synchronized == false)
        #expect(status?.buffer.pending == 0)
        try await Task.sleep(for: .seconds(1))  // batch_max_age is 200 ms: a held reading would have gone by now
        #expect(try await Self.export(farm, device: "pi-1").isEmpty, "the ingest stored readings while they were held")
        let text = try await runCommand(Farm.agentBinary, ["status", "--config", config])
        #expect(text.stdout.contains("Clock     NOT synchronised"), "\(text.stdout)")
        #expect(text.stdout.contains("held"), "\(text.stdout)")
        let heldBeforeSync = try await farm.agentStatus(config: config)?.buffer.held ?? 0

        // NTP sets the clock.
        _ = try farm.dir.write("clock.json", #"{"synchronized": true}"#)
        let corrected = try await eventually(timeout: .seconds(30), every: .milliseconds(200)) {
            status = try await farm.agentStatus(config: config)
            return status?.clock?.lastCorrection != nil && status?.buffer.held == 0
        }
        #expect(corrected, "no correction: \(String(describing: status?.clock)) \(agent.log)")
        let correction = status?.clock?.lastCorrection
        #expect((correction?.corrected ?? 0) >= heldBeforeSync)
        #expect(abs((correction?.stepSeconds ?? 0) - 259_200) < 5, "\(String(describing: correction))")
        let afterSync = try await runCommand(Farm.agentBinary, ["status", "--config", config])
        #expect(afterSync.stdout.contains("readings taken before it was set"), "\(afterSync.stdout)")
        try await Task.sleep(for: .seconds(1))  // a few readings taken with the clock set
        #expect(await agent.stop(SIGTERM) == 0, "graceful stop failed: \(agent.log)")
        let stopped = Timestamp.now()

        // Everything the agent ever committed went up, exactly once.
        let bufferPath = farm.dir.file("pi-1/buffer.sqlite")
        let buffer = try await runOffPool {
            try ReadingBuffer(
                configuration: BufferConfiguration(path: bufferPath),
                logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
        }
        let left = try await buffer.statistics()
        try await buffer.close()
        #expect(left.pending == 0 && left.held == 0, "left in the buffer: \(left)")
        let stored = try await Self.export(farm, device: "pi-1")
        let sequences = stored.map(\.sequence).sorted()
        #expect(Set(sequences).count == sequences.count, "a reading was stored twice")
        #expect(sequences == Array(1...max(1, left.lastSequence)), "stored \(sequences.count) of \(left.lastSequence)")

        // With their true times: within the run, not three days back, each sensor's readings about 200 ms apart across
        // the moment the clock was set.
        let outside = stored.filter { $0.timestamp.microseconds < started.microseconds - 1_000_000 || $0.timestamp > stopped }
        #expect(outside.isEmpty, "readings outside the run: \(outside.prefix(5).map { "\($0.sequence) \($0.timestamp)" })")
        let correctedReadings = stored.filter { $0.flags.contains("clock_corrected") }
        #expect(correctedReadings.count >= heldBeforeSync)
        #expect(!stored.contains { $0.flags.contains("clock_unsynchronized") })
        for sensor in Set(stored.map(\.sensor)) {
            let series = stored.filter { $0.sensor == sensor }.sorted { $0.sequence < $1.sequence }
            for (earlier, later) in zip(series, series.dropFirst()) {
                let gap = later.timestamp.microseconds - earlier.timestamp.microseconds
                #expect(gap > 0 && gap < 1_500_000, "\(sensor): \(earlier.sequence) at \(earlier.timestamp), \(later.sequence) at \(later.timestamp)")
            }
            // The corrected readings come first, then the ones taken with the clock set.
            let flags = series.map { $0.flags.contains("clock_corrected") }
            #expect(flags == flags.sorted { $0 && !$1 }, "\(sensor): corrected readings interleaved with normal ones")
        }
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    @Test("Past the hold, unsynchronised readings go up flagged clock_unsynchronized with the time they were stamped with")
    func releasedFlagged() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("pi-2")
        let keyFile = try farm.dir.write("pi-2.key", key + "\n")
        let config = try Self.config(farm, device: "pi-2", keyFile: keyFile, hold: "1s")
        let clockFile = try farm.dir.write("clock.json", #"{"synchronized": false, "offset_seconds": -259200}"#)
        try await farm.startIngest()
        let started = Timestamp.now()
        let agent = try Child(
            Farm.agentBinary, ["agent", "--config", config], logPath: farm.dir.file("agent.log"),
            environment: [SystemClockSource.testHookVariable: clockFile])
        var stored: [Stored] = []
        let arrived = try await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            stored = try await Self.export(farm, device: "pi-2")
            return stored.count >= 20
        }
        #expect(arrived, "flagged readings did not arrive: \(agent.log)")
        // How long the clock has been unsynchronised survives a reload (before the fix, a tester 2026-12-05: `status`
        // counted it from the reload).
        let long = try await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
            (try await farm.agentStatus(config: config)?.clock?.stateSeconds ?? 0) >= 3
        }
        #expect(long, "\(agent.log)")
        let reload = try await runCommand(Farm.agentBinary, ["reload", "--config", config])
        #expect(reload.status == 0, "\(reload.stdout) \(reload.stderr)")
        let clock = try await farm.agentStatus(config: config)?.clock
        #expect(clock?.synchronized == false && (clock?.stateSeconds ?? 0) >= 3, "after the reload: \(String(describing: clock))")
        #expect(await agent.stop(SIGTERM) == 0)
        let threeDaysAgo = started.microseconds - 259_200_000_000
        #expect(stored.allSatisfy { $0.flags == ["clock_unsynchronized"] }, "\(stored.prefix(3).map(\.flags))")
        #expect(stored.allSatisfy { abs($0.timestamp.microseconds - threeDaysAgo) < 120_000_000 }, "\(stored.prefix(3).map(\.timestamp))")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }
}
