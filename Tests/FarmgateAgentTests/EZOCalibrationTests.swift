@testable import FarmgateAgent
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

@Suite("EZO calibration rules, answers and stability")
struct EZOCalibrationTests {
    func steps(_ texts: String...) throws -> [CalibrationStep] { try texts.map { try CalibrationStep(parsing: $0) } }

    /// Sends every step in order and returns the commands; throws the first refusal.
    func plan(_ kind: EZOCircuitKind, _ texts: String...) throws -> [String] {
        var done: [CalibrationStep] = []
        var commands: [String] = []
        for text in texts {
            let step = try CalibrationStep(parsing: text)
            commands.append(try EZOCalibration.command(for: step, kind: kind, after: done))
            done.append(step)
        }
        return commands
    }

    func refusal(_ kind: EZOCircuitKind, _ texts: String...) -> String? {
        var done: [CalibrationStep] = []
        for text in texts {
            do {
                let step = try CalibrationStep(parsing: text)
                _ = try EZOCalibration.command(for: step, kind: kind, after: done)
                done.append(step)
            } catch {
                return error.description
            }
        }
        return nil
    }

    @Test("pH: mid, low, high in that order become the datasheet's commands")
    func phOrder() throws {
        #expect(try plan(.ph, "mid=7.00", "low=4.00", "high=10.00") == ["Cal,mid,7.00", "Cal,low,4.00", "Cal,high,10.00"])
        #expect(try plan(.ph, "mid=6.86", "low=4.01") == ["Cal,mid,6.86", "Cal,low,4.01"])
    }

    @Test("pH: out-of-order and implausible points are refused with the reason")
    func phRefusals() {
        #expect(refusal(.ph, "low=4.00")?.contains("mid point (pH 7.00) first") == true)
        #expect(refusal(.ph, "high=10.00")?.contains("mid point") == true)
        #expect(refusal(.ph, "mid=7", "high=10")?.contains("low point (pH 4.00) before the high point") == true)
        #expect(refusal(.ph, "mid=7", "low=7.5")?.contains("a low point above 7") == true)
        #expect(refusal(.ph, "mid=7", "low=4", "high=6")?.contains("alkaline buffer") == true)
        #expect(refusal(.ph, "mid=7.8", "low=4", "high=7.6")?.contains("above the mid point") == true)
        // A wrong buffer is named as such whatever the order (high 7.2 after mid alone said "low before high").
        #expect(refusal(.ph, "mid=7.00", "high=7.2")?.contains("must be an alkaline buffer (at least 7.5") == true)
        #expect(refusal(.ph, "low=7.2")?.contains("must be an acid buffer (at most 6.5") == true)
        #expect(refusal(.ph, "mid=4")?.contains("neutral buffer") == true)
        #expect(refusal(.ph, "mid=15")?.contains("outside the pH scale") == true)
        #expect(refusal(.ph, "mid")?.contains("needs the solution's reference value") == true)
        #expect(refusal(.ph, "mid=7", "mid=7")?.contains("already taken") == true)
        #expect(refusal(.ph, "dry")?.contains("has no point \"dry\"") == true)
    }

    @Test("EC: dry first, then single or low and high; other circuits one point")
    func otherCircuits() throws {
        #expect(try plan(.ec, "dry", "low=12880", "high=80000") == ["Cal,dry", "Cal,low,12880", "Cal,high,80000"])
        #expect(try plan(.ec, "dry", "single=1413") == ["Cal,dry", "Cal,1413"])
        #expect(refusal(.ec, "single=1413")?.contains("calibrate dry first") == true)
        #expect(refusal(.ec, "dry", "high=80000")?.contains("low point before the high point") == true)
        #expect(refusal(.ec, "dry", "low=80000", "high=12880")?.contains("must be above the low point") == true)
        #expect(refusal(.ec, "dry", "single=-5")?.contains("above 0") == true)
        #expect(refusal(.ec, "dry=3")?.contains("takes no reference") == true)
        #expect(try plan(.rtd, "single=21.5") == ["Cal,21.50"])
        #expect(refusal(.rtd, "single=2000")?.contains("-126 and 1254") == true)
        #expect(try plan(.orp, "single=225") == ["Cal,225"])
        #expect(try plan(.dissolvedOxygen, "zero", "air") == ["Cal,0", "Cal"])
    }

    @Test("Plausibility: a reading far from the point's reference is refused naming the solution; uncalibrated probes pass")
    func plausibility() {
        func problem(_ kind: EZOCircuitKind, _ point: String, _ reading: Double) -> String? {
            guard let step = try? CalibrationStep(parsing: point) else { return "unparsable \(point)" }
            return EZOCalibration.implausibility(of: reading, for: step, kind: kind)
        }
        // A new pH probe is off by a few tenths; an EC cell constant by tens of percent: both still calibrate.
        #expect(problem(.ph, "mid=7.00", 6.62) == nil)
        #expect(problem(.ph, "low=4.00", 4.9) == nil)
        #expect(problem(.ec, "single=1413", 1_000) == nil)
        #expect(problem(.ec, "high=80000", 110_000) == nil)
        #expect(problem(.ec, "dry", 3) == nil)
        #expect(problem(.rtd, "single=21.5", 22.4) == nil)
        #expect(problem(.orp, "single=225", 260) == nil)
        #expect(problem(.dissolvedOxygen, "air", 8.4) == nil)
        // The wrong solution is named.
        #expect(problem(.ph, "mid=7.00", 4.02)?.contains("seems to be in the pH 4.00 buffer, not the 7.00 one") == true)
        #expect(problem(.ph, "high=10.00", 7.01)?.contains("seems to be in the pH 7.00 buffer") == true)
        #expect(problem(.ph, "mid=7.00", 1.2)?.contains("none of the usual buffers") == true)
        #expect(problem(.ec, "dry", 1_413)?.contains("in the 1413 µS/cm solution") == true)
        #expect(problem(.ec, "single=1413", 12_500)?.contains("in the 12880 µS/cm solution") == true)
        #expect(problem(.ec, "low=12880", 2)?.contains("dry or in water without salts") == true)
        #expect(problem(.rtd, "single=21.5", 35) != nil)
        #expect(problem(.orp, "single=225", 10) != nil)
        // Dissolved oxygen: nearly 0 in the zero solution, a saturated water's worth in air.
        #expect(problem(.dissolvedOxygen, "zero", 0.4) == nil)
        #expect(problem(.dissolvedOxygen, "air", 5.1) == nil)
        #expect(problem(.dissolvedOxygen, "air", 13.9) == nil)
        #expect(problem(.dissolvedOxygen, "zero", 8.9)?.contains("seems to be in air or in aerated water") == true)
        #expect(problem(.dissolvedOxygen, "air", 0.3)?.contains("still in the zero solution") == true)
        #expect(problem(.dissolvedOxygen, "air", 45)?.contains("faulty") == true)
    }

    @Test("Cal,? and Slope,? answers parse; anything else does not")
    func answers() {
        #expect(EZOCalibration.parseCalibrated("?Cal,3") == 3)
        #expect(EZOCalibration.parseCalibrated("?CAL,0") == 0)
        #expect(EZOCalibration.parseCalibrated("?Cal,x") == nil)
        #expect(EZOCalibration.parseCalibrated("7.01") == nil)
        #expect(EZOCalibration.parseSlope("?Slope,99.7,100.3,-0.89") == CalibrationEvent.Slope(acidPercent: 99.7, basePercent: 100.3, offsetMillivolts: -0.89))
        #expect(EZOCalibration.parseSlope("?Slope,98.2,101.0") == CalibrationEvent.Slope(acidPercent: 98.2, basePercent: 101, offsetMillivolts: nil))
        #expect(EZOCalibration.parseSlope("?Slope,nan,1") == nil)
        #expect(EZOCalibration.parseSlope("?Cal,2") == nil)
        #expect(EZOCalibration.slopeWarning(CalibrationEvent.Slope(acidPercent: 99.7, basePercent: 100.3, offsetMillivolts: 0)) == nil)
        #expect(EZOCalibration.slopeWarning(CalibrationEvent.Slope(acidPercent: 80.1, basePercent: 100.3, offsetMillivolts: 0))?.contains("acid side 80.10 %") == true)
        #expect(EZOCalibration.slopeWarning(CalibrationEvent.Slope(acidPercent: 99, basePercent: 106, offsetMillivolts: 0))?.contains("replace the probe") == true)
    }

    @Test("Point arguments: name=value or a bare name; a bad value says how to write it")
    func parsing() throws {
        #expect(try CalibrationStep(parsing: "MID=7.00") == CalibrationStep(point: "mid", reference: 7))
        #expect(try CalibrationStep(parsing: "dry") == CalibrationStep(point: "dry"))
        #expect(throws: CalibrationError.self) { try CalibrationStep(parsing: "mid=seven") }
        #expect(throws: CalibrationError.self) { try CalibrationStep(parsing: "=7") }
    }

    func add(_ detector: inout StabilityDetector, _ value: Double, at: Duration) -> Bool { detector.add(value, at: at) }

    @Test("Stability: noise restarts the run; readings within the tolerance over the window are stable")
    func stability() {
        var detector = StabilityDetector(tolerance: 0.02, window: .seconds(3))
        let noisy = [7.3, 6.8, 7.2, 6.9, 7.1]
        for (i, value) in noisy.enumerated() { #expect(!add(&detector, value, at: .seconds(i))) }
        // What "did not settle" reports: the readings of the last 3 s moved by 0.4 (6.8 to 7.2), though the run
        // within the tolerance is the last reading alone.
        #expect(abs(detector.movement.range - 0.4) < 1e-9 && detector.movement.lasted == .seconds(3))
        #expect(detector.spread.range == 0)
        // Settling: 7.01, 7.02, 7.01, 7.00 one second apart: the run starts at 7.01 (t=5) and spans 3 s at t=8.
        #expect(!add(&detector, 7.01, at: .seconds(5)))
        #expect(!add(&detector, 7.02, at: .seconds(6)))
        #expect(!add(&detector, 7.01, at: .seconds(7)))
        #expect(add(&detector, 7.00, at: .seconds(8)))
        // One reading out of the band breaks it again.
        #expect(!add(&detector, 7.05, at: .seconds(9)))
        // Two readings spanning the window are not enough: three are needed.
        var sparse = StabilityDetector(tolerance: 0.1, window: .seconds(1))
        #expect(!add(&sparse, 1, at: .zero))
        #expect(!add(&sparse, 1, at: .seconds(5)))
        #expect(add(&sparse, 1, at: .seconds(6)))
    }

    @Test("Calibration flags lapse when the CLI goes silent")
    func flagsLapse() async throws {
        let flags = CalibrationFlags(idleLimit: .milliseconds(200))
        let sensor = try SensorID("tank1.ph")
        #expect(!flags.contains(sensor))
        flags.mark(sensor)
        #expect(flags.contains(sensor))
        try await Task.sleep(for: .milliseconds(300))
        #expect(!flags.contains(sensor))
        flags.mark(sensor)
        flags.clear(sensor)
        #expect(!flags.contains(sensor))
    }

    /// A pH circuit that takes every point and says how many it holds.
    final class FakeCircuit: CalibratableDriver {
        let sent = Mutex<[String]>([])
        /// Reads (from 1) that fail with a supply fault.
        let failing: Set<Int>
        let reads = Mutex(0)
        init(failing: Set<Int> = []) { self.failing = failing }
        var circuit: EZOCircuitKind { .ph }
        var measuredQuantity: Quantity { .ph }
        var circuitPort: String { "/dev/ttyFAKE" }
        func read() async throws(SensorError) -> SensorValue {
            let index = reads.withLock { count in
                count += 1
                return count
            }
            if failing.contains(index) { throw SensorError(.fault, "EZO ph on /dev/ttyFAKE: *UV") }
            return SensorValue(7.01)
        }
        func sendCalibration(_ command: String) async throws(SensorError) { sent.withLock { $0.append(command) } }
        func calibrationState() async throws(SensorError) -> CalibrationState {
            CalibrationState(calibratedPoints: sent.withLock { $0.count }, slope: nil, firmware: "2.16")
        }
    }

    final class Collector: CalibrationRecorder {
        let events = Mutex<[CalibrationEvent]>([])
        func recordCalibration(_ event: CalibrationEvent) async throws { events.withLock { $0.append(event) } }
    }

    @Test("Points a circuit took are recorded when their session lapses (a killed CLI), before a new session replaces it, and when the agent stops")
    func lapsedSessionsAreRecorded() async throws {
        let sensor = try SensorID("tank1.ph")
        let collector = Collector()
        let commands = CalibrationCommands(
            drivers: [sensor: FakeCircuit()], flags: CalibrationFlags(idleLimit: .milliseconds(300)), recorder: collector,
            logger: Logger(label: "test"))
        func send(_ command: String, _ arguments: [String: String] = [:]) async -> CalibrationControlAnswer {
            await commands.answer(ControlRequest(command: command, arguments: arguments.merging(["sensor": "tank1.ph"]) { a, _ in a }))
        }
        // A session with one point whose CLI goes silent: nothing is recorded before it lapses, the point after.
        #expect(await send("calibrate.begin").ok)
        #expect(await send("calibrate.point", ["point": "mid", "reference": "7.00", "reading": "7.01"]).ok)
        await commands.recordLapsed()
        #expect(collector.events.withLock { $0.isEmpty })
        try await Task.sleep(for: .milliseconds(400))
        await commands.recordLapsed()
        let lapsed = collector.events.withLock { $0 }
        #expect(lapsed.count == 1)
        #expect(lapsed.first?.points.map(\.name) == ["mid"])
        #expect(lapsed.first?.calibratedPoints == 1)
        #expect(await send("calibrate.status").error?.contains("lapsed") == true)

        // A lapsed session found by a new begin (no sweep ran) is recorded first.
        #expect(await send("calibrate.begin").ok)
        #expect(await send("calibrate.point", ["point": "mid", "reference": "7.00"]).ok)
        #expect(await send("calibrate.point", ["point": "low", "reference": "4.00"]).ok)
        try await Task.sleep(for: .milliseconds(400))
        #expect(await send("calibrate.begin").ok)
        #expect(collector.events.withLock { $0.map { $0.points.map(\.name) } } == [["mid"], ["mid", "low"]])

        // Open when the agent stops: recorded without asking the circuit; a session without points records nothing.
        #expect(await send("calibrate.point", ["point": "mid", "reference": "7.00"]).ok)
        await commands.recordOpen()
        let stopped = collector.events.withLock { $0 }
        #expect(stopped.count == 3)
        #expect(stopped.last?.points.map(\.name) == ["mid"])
        #expect(stopped.last?.calibratedPoints == nil)
        #expect(await send("calibrate.begin").ok)
        await commands.recordOpen()
        #expect(collector.events.withLock { $0.count } == 3)
    }

    /// One output of a circuit (an EC circuit's `ec` or `tds`) that takes every point.
    final class FakeOutput: CalibratableDriver {
        let circuit: EZOCircuitKind
        let measuredQuantity: Quantity
        let circuitPort: String
        let sent = Mutex<[String]>([])
        init(_ circuit: EZOCircuitKind, _ quantity: Quantity, port: String) {
            self.circuit = circuit
            measuredQuantity = quantity
            circuitPort = port
        }
        func read() async throws(SensorError) -> SensorValue { SensorValue(1413) }
        func sendCalibration(_ command: String) async throws(SensorError) { sent.withLock { $0.append(command) } }
        func calibrationState() async throws(SensorError) -> CalibrationState {
            CalibrationState(calibratedPoints: sent.withLock { $0.count }, slope: nil, firmware: "2.15")
        }
    }

    @Test("Every sensor read from the circuit under calibration carries calibrating: an EC circuit's TDS, salinity and specific gravity too, not another circuit's")
    func siblingsFlagged() async throws {
        let ec = try SensorID("tank1.ec"), tds = try SensorID("tank1.tds"), salinity = try SensorID("tank1.salinity")
        let gravity = try SensorID("tank1.sg"), ph = try SensorID("tank1.ph"), otherTDS = try SensorID("tank2.tds")
        let flags = CalibrationFlags()
        let commands = CalibrationCommands(
            drivers: [
                ec: FakeOutput(.ec, .electricalConductivity, port: "/dev/ttyEC1"), tds: FakeOutput(.ec, .tds, port: "/dev/ttyEC1"),
                salinity: FakeOutput(.ec, .salinity, port: "/dev/ttyEC1"), gravity: FakeOutput(.ec, .specificGravity, port: "/dev/ttyEC1"),
                otherTDS: FakeOutput(.ec, .tds, port: "/dev/ttyEC2"), ph: FakeCircuit(),
            ],
            flags: flags, recorder: Collector(), logger: Logger(label: "test"))
        func send(_ command: String, _ arguments: [String: String] = [:]) async -> CalibrationControlAnswer {
            await commands.answer(ControlRequest(command: command, arguments: arguments.merging(["sensor": "tank1.ec"]) { a, _ in a }))
        }
        let circuit = [ec, tds, salinity, gravity]
        #expect(await send("calibrate.begin").ok)
        #expect(circuit.allSatisfy(flags.contains), "\(circuit.filter { !flags.contains($0) }) not flagged")
        #expect(!flags.contains(ph) && !flags.contains(otherTDS), "sensors of other circuits are flagged")
        #expect(await send("calibrate.point", ["point": "dry", "reading": "0"]).ok)
        #expect(circuit.allSatisfy(flags.contains), "\(circuit.filter { !flags.contains($0) }) not flagged")
        #expect(await send("calibrate.finish").ok)
        #expect(!circuit.contains(where: flags.contains), "\(circuit.filter(flags.contains)) still flagged after finish")

        #expect(await send("calibrate.begin").ok)
        #expect(circuit.allSatisfy(flags.contains))
        #expect(await send("calibrate.abort").ok)
        #expect(!circuit.contains(where: flags.contains), "\(circuit.filter(flags.contains)) still flagged after abort")
    }

    /// Answers a control request in-process and blocks until then, as the control socket does for the CLI.
    final class BlockingAgent: Sendable {
        let commands: CalibrationCommands
        let requests = Mutex<[ControlRequest]>([])
        init(_ commands: CalibrationCommands) { self.commands = commands }

        func send(_ request: ControlRequest) -> CalibrationControlAnswer {
            requests.withLock { $0.append(request) }
            let box = AnswerBox()
            let done = DispatchSemaphore(value: 0)
            let commands = self.commands
            Task {
                let answer = await commands.answer(request)
                box.answer.withLock { $0 = answer }
                done.signal()
            }
            done.wait()
            return box.answer.withLock { $0 } ?? CalibrationControlAnswer(ok: false, error: "no answer")
        }

        final class AnswerBox: Sendable {
            let answer = Mutex<CalibrationControlAnswer?>(nil)
        }
    }

    // Before the fix (a tester, 2026-12-06) a read that failed (*UV) inside the window left the run going: the point
    // was taken over a span in which the circuit's supply was out of range.
    @Test("A failed read restarts the stability window: the readings before it do not count")
    func failedReadRestartsTheWindow() async throws {
        let sensor = try SensorID("tank1.ph")
        let commands = CalibrationCommands(
            drivers: [sensor: FakeCircuit(failing: [3])], flags: CalibrationFlags(), recorder: Collector(), logger: Logger(label: "test"))
        let agent = BlockingAgent(commands)
        let lines = CalibrationAgentTests.Lines()
        let outcome: Result<CalibrationAnswer, CalibrationGuide.Failure> = try await runOffPool(name: "calibration-guide") {
            var options = CalibrationGuide.Options()
            options.steps = [CalibrationStep(point: "mid", reference: 7)]
            options.window = .milliseconds(200)
            options.interval = .milliseconds(20)
            options.assumeYes = true
            let guide = CalibrationGuide(options: options, send: { agent.send($0) }, confirm: { _ in true }, output: lines.append)
            do throws(CalibrationGuide.Failure) { return .success(try guide.run(sensor: "tank1.ph")) } catch { return .failure(error) }
        }
        #expect((try? outcome.get()) != nil, "\(outcome)")
        let readings = lines.text.split(separator: "\n").filter { $0.hasPrefix("  7.01") || $0.hasPrefix("  no reading") }
        try #require(readings.count >= 4, "\(lines.text)")
        #expect(readings[2].hasPrefix("  no reading"), "\(lines.text)")
        // The first reading after the failure starts a new run.
        #expect(readings[3].contains("for 0s)") || readings[3].contains("for 0ms)"), "\(lines.text)")
    }

    @Test("A calibration aborted from another shell: its CLI stops at once, says once that it was aborted and by what, and does not abort again")
    func abortedFromElsewhere() async throws {
        let sensor = try SensorID("tank1.ph")
        let commands = CalibrationCommands(
            drivers: [sensor: FakeCircuit()], flags: CalibrationFlags(), recorder: Collector(), logger: Logger(label: "test"))
        let agent = BlockingAgent(commands)
        let lines = CalibrationAgentTests.Lines()
        let outcome: Result<CalibrationAnswer, CalibrationGuide.Failure> = try await runOffPool(name: "calibration-guide") {
            var options = CalibrationGuide.Options()
            options.steps = [CalibrationStep(point: "mid", reference: 7)]
            options.window = .seconds(30)  // never stable: the abort comes first
            options.interval = .milliseconds(10)
            options.assumeYes = true
            var reads = 0
            let guide = CalibrationGuide(
                options: options,
                send: { request in
                    if request.command == "calibrate.read" {
                        reads += 1
                        if reads == 3 {
                            // `farmgate calibrate tank1.ph --abort` in another shell, between two reads.
                            let aborted = agent.send(ControlRequest(
                                command: "calibrate.abort", arguments: ["sensor": "tank1.ph", "by": "farmgate calibrate --abort (pid 4242, uid 1000)"]))
                            #expect(aborted.ok, "\(aborted)")
                        }
                    }
                    return agent.send(request)
                },
                confirm: { _ in true }, output: lines.append)
            do throws(CalibrationGuide.Failure) { return .success(try guide.run(sensor: "tank1.ph")) } catch { return .failure(error) }
        }
        guard case .failure(let failure) = outcome else {
            Issue.record("the aborted calibration finished: \(outcome)")
            return
        }
        let output = lines.text
        #expect(failure.description.contains("aborted"), "\(failure)")
        #expect(failure.description.contains("pid 4242"), "\(failure)")
        #expect(!failure.description.contains("five reads"), "\(failure)")
        #expect(!failure.description.contains("check the probe"), "\(failure)")
        #expect(!output.contains("no calibration"), "\(output)")
        #expect((output + "\n" + failure.description).components(separatedBy: "aborted").count == 2, "said more than once: \(output)\n\(failure)")
        let reads = agent.requests.withLock { $0.filter { $0.command == "calibrate.read" }.count }
        #expect(reads == 3, "read on after the abort: \(reads) reads")
        let aborts = agent.requests.withLock { $0.filter { $0.command == "calibrate.abort" }.count }
        #expect(aborts == 1, "the CLI aborted again (another calibration begun meanwhile would be aborted): \(aborts)")
    }

    @Test("Commands on a calibration that ended say how it ended: aborted (by whom), finished, lapsed")
    func endedSessionSaysHow() async throws {
        let sensor = try SensorID("tank1.ph")
        let commands = CalibrationCommands(
            drivers: [sensor: FakeCircuit()], flags: CalibrationFlags(idleLimit: .milliseconds(300)), recorder: Collector(),
            logger: Logger(label: "test"))
        func send(_ command: String, _ arguments: [String: String] = [:]) async -> CalibrationControlAnswer {
            await commands.answer(ControlRequest(command: command, arguments: arguments.merging(["sensor": "tank1.ph"]) { a, _ in a }))
        }
        #expect(await send("calibrate.begin").ok)
        #expect(await send("calibrate.abort", ["by": "farmgate calibrate --abort (pid 4242, uid 1000)"]).ok)
        let afterAbort = await send("calibrate.read")
        #expect(!afterAbort.ok)
        #expect(afterAbort.error?.contains("aborted") == true && afterAbort.error?.contains("pid 4242") == true, "\(afterAbort)")

        #expect(await send("calibrate.begin").ok)
        #expect(await send("calibrate.point", ["point": "mid", "reference": "7.00", "reading": "7.01"]).ok)
        #expect(await send("calibrate.finish").ok)
        let afterFinish = await send("calibrate.read")
        #expect(afterFinish.error?.contains("finished") == true, "\(afterFinish)")

        #expect(await send("calibrate.begin").ok)
        try await Task.sleep(for: .milliseconds(400))
        await commands.recordLapsed()
        let afterLapse = await send("calibrate.read")
        #expect(afterLapse.error?.contains("lapsed") == true, "\(afterLapse)")
    }
}
