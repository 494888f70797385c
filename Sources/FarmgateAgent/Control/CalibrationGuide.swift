import FarmgateSupport
import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Decides when a probe has settled: the longest run of consecutive readings whose spread (largest minus smallest) is
/// within `tolerance`, and that run spans at least `window` with at least three readings. Time is passed in.
public struct StabilityDetector: Sendable {
    public let tolerance: Double
    public let window: Duration
    private var run: [(value: Double, at: Duration)] = []
    /// Every reading of the last `window`, stable or not (how much the readings move, for a point that never settles).
    private var recent: [(value: Double, at: Duration)] = []

    public init(tolerance: Double, window: Duration) {
        self.tolerance = tolerance
        self.window = window
    }

    /// Adds a reading taken at `at` (any monotonic origin) and says whether the readings are now stable.
    @discardableResult
    public mutating func add(_ value: Double, at: Duration) -> Bool {
        run.append((value, at))
        recent.append((value, at))
        while let first = recent.first, at - first.at > window { recent.removeFirst() }
        // Keep the longest suffix within the tolerance: a reading that moved too far restarts the run from there.
        while run.count > 1, let low = run.map(\.value).min(), let high = run.map(\.value).max(), high - low > tolerance {
            run.removeFirst()
        }
        return isStable
    }

    public var isStable: Bool {
        guard run.count >= 3, let first = run.first, let last = run.last else { return false }
        return last.at - first.at >= window
    }

    /// The spread of the current run and how long it lasted, for the live display.
    public var spread: (range: Double, lasted: Duration) {
        guard let first = run.first, let last = run.last, let low = run.map(\.value).min(), let high = run.map(\.value).max() else {
            return (0, .zero)
        }
        return (high - low, last.at - first.at)
    }

    /// How far the readings of the last `window` spread, whether or not they are within the tolerance, and the time
    /// they span: what "did not settle" reports (the stable run of readings jumping by more than the tolerance is one
    /// reading, and spreads by nothing).
    public var movement: (range: Double, lasted: Duration) {
        guard let first = recent.first, let last = recent.last, let low = recent.map(\.value).min(), let high = recent.map(\.value).max() else {
            return (0, .zero)
        }
        return (high - low, last.at - first.at)
    }

    /// Forgets every reading (the probe moved to another solution).
    public mutating func reset() {
        run.removeAll()
        recent.removeAll()
    }
}

/// The guided calibration `farmgate calibrate` runs: it drives the agent's `calibrate.*` commands, shows live readings,
/// waits until they are stable, asks the installer to confirm each point, and reports what the circuit holds afterwards.
///
/// Synchronous and blocking (the control socket is blocking): run it on a thread of its own, never on the concurrency pool.
public struct CalibrationGuide {
    public struct Options: Sendable {
        /// The points to take, in order; empty: the circuit's usual ones (``EZOCalibration/defaultSteps(_:)``).
        public var steps: [CalibrationStep] = []
        /// How far apart readings may be and still count as stable; nil: the circuit's default (``defaultTolerance(_:)``).
        public var tolerance: Double?
        /// How long the readings must stay within the tolerance.
        public var window: Duration = .seconds(30)
        /// How often a reading is taken while waiting.
        public var interval: Duration = .seconds(1)
        /// How long to wait for stable readings at one point before giving up.
        public var settleTimeout: Duration = .seconds(600)
        /// Take each point without asking (scripts); otherwise the installer confirms each one.
        public var assumeYes = false
        /// Offer a point whose stable reading is far from its reference (``EZOCalibration/implausibility(of:for:kind:)``)
        /// instead of refusing it; the installer must still confirm it, even with ``assumeYes``.
        public var force = false

        public init() {}
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        /// The session ended under the guide (aborted from another shell, lapsed): nothing more is sent for it, not
        /// even an abort (another calibration may have begun meanwhile).
        public let sessionEnded: Bool
        init(_ description: String, sessionEnded: Bool = false) {
            self.description = description
            self.sessionEnded = sessionEnded
        }
    }

    /// The tolerance when none is given: a few counts of the circuit's resolution.
    public static func defaultTolerance(_ circuit: EZOCircuitKind) -> Double {
        switch circuit {
        case .ph: 0.02
        case .ec: 10  // µS/cm
        case .rtd: 0.1
        case .orp: 2  // mV
        case .dissolvedOxygen: 0.1
        }
    }

    let options: Options
    let send: (ControlRequest) throws -> CalibrationControlAnswer
    let confirm: (String) -> Bool
    let output: (String) -> Void
    let session: (String?) -> Void

    /// - Parameters:
    ///   - send: sends one request to the agent and decodes its answer.
    ///   - confirm: asks the installer a yes/no question; not called with `assumeYes`.
    ///   - output: prints one line.
    ///   - session: told the session's id once the agent began it, and nil once it ended (finished or aborted): what an
    ///     interrupted CLI aborts (`farmgate calibrate` on Ctrl-C), and only that session, never one another CLI began.
    public init(
        options: Options, send: @escaping (ControlRequest) throws -> CalibrationControlAnswer, confirm: @escaping (String) -> Bool,
        output: @escaping (String) -> Void, session: @escaping (String?) -> Void = { _ in }
    ) {
        self.options = options
        self.send = send
        self.confirm = confirm
        self.output = output
        self.session = session
    }

    /// Runs the whole calibration of `sensor` and returns the agent's answer to `calibrate.finish` (with the event).
    /// On any failure after the session began it aborts the session, so the sensor's readings stop carrying `calibrating`;
    /// a session that ended under it (aborted from another shell) stops it at once, saying how, without another abort.
    public func run(sensor: String) throws(Failure) -> CalibrationAnswer {
        let begun = try request("calibrate.begin", sensor)
        // Every later command names this session: one that ended is then told apart from one begun since by another CLI.
        let session = begun.session
        self.session(session)
        defer { self.session(nil) }
        guard let circuit = EZOCircuitKind(rawValue: begun.circuit) else {
            abort(sensor, session: session)
            throw Failure("the agent reports an unknown circuit \"\(begun.circuit)\"; are the agent and the CLI the same version?")
        }
        do throws(Failure) {
            let steps = options.steps.isEmpty ? EZOCalibration.defaultSteps(circuit) : options.steps
            guard !steps.isEmpty else {
                throw Failure("an \(circuit) circuit has no usual point: give the reference, e.g. --point single=21.50 with the temperature a trusted thermometer reads in the same water")
            }
            // Check the whole plan before touching the circuit: a refusal at the third point must not leave two taken.
            var planned: [CalibrationStep] = []
            for step in steps {
                if let earlier = planned.first(where: { $0.point == step.point }) {
                    throw Failure(
                        "point \(step.point) is given twice (\(earlier.description) and \(step.description)); each point is taken once: give it once, with the value on the solution's bottle (nothing was sent)")
                }
                do { _ = try EZOCalibration.command(for: step, kind: circuit, after: planned) } catch { throw Failure(error.description) }
                planned.append(step)
            }
            let tolerance = options.tolerance ?? Self.defaultTolerance(circuit)
            output("Calibrating \(sensor) (\(circuit)): \(steps.map(\.description).joined(separator: ", ")); stable means within \(EZOCalibration.format(tolerance)) for \(ConfigTable.format(options.window))")
            var taken: [CalibrationStep] = []
            for step in steps {
                do throws(Failure) {
                    try take(step, sensor: sensor, session: session, circuit: circuit, tolerance: tolerance)
                } catch {
                    guard !taken.isEmpty else { throw error }
                    if error.sessionEnded {
                        let names = taken.map(\.point).joined(separator: ", ")
                        throw Failure(
                            "\(error.description)\nThe points taken before (\(names)) stay in the circuit; calibrate again to replace them: farmgate calibrate \(sensor)",
                            sessionEnded: true)
                    }
                    // The circuit holds what was taken before (a pH mid point even cleared the earlier low and high):
                    // record that as the event, and say what the circuit holds now and what to do.
                    throw Failure("\(error.description)\n\(finishPartial(sensor, session: session, circuit: circuit, taken: taken, failed: step))")
                }
                taken.append(step)
            }
            let finished = try request("calibrate.finish", sensor, session: session)
            report(finished)
            // Points sent that the circuit does not hold: the calibration failed, whatever each point looked like.
            if let notKept = finished.notKept { throw Failure(notKept) }
            return finished
        } catch {
            if !error.sessionEnded { abort(sensor, session: session) }
            throw error
        }
    }

    /// After a point failed with `taken` already in the circuit: records them as the calibration event (what the circuit
    /// actually holds now), and returns what the installer must know.
    private func finishPartial(_ sensor: String, session: String?, circuit: EZOCircuitKind, taken: [CalibrationStep], failed: CalibrationStep) -> String {
        let names = taken.map(\.point)
        var holds = "only the \(names.joined(separator: " and ")) point\(names.count == 1 ? "" : "s") taken in this calibration"
        if circuit == .ph, names.contains("mid") {
            holds += " (Cal,mid cleared any low and high points it held before)"
        }
        var lines: [String] = []
        do throws(Failure) {
            let finished = try request("calibrate.finish", sensor, session: session)
            if let held = finished.state?.calibratedPoints {
                holds += "; Cal,? says \(held) point\(held == 1 ? "" : "s")"
            }
            lines.append("The circuit now holds \(holds).")
            if let event = finished.event {
                lines.append("The points taken (\(names.joined(separator: ", "))) are recorded as calibration event \(event.id); it is uploaded with the readings.")
            }
            for warning in finished.warnings ?? [] { lines.append("WARNING: \(warning)") }
            if let notKept = finished.notKept { lines.append("Moreover \(notKept)") }
        } catch {
            lines.append("The circuit now holds \(holds); recording them as a calibration event failed: \(error.description)")
        }
        let remaining = "\(failed.point) point"
        lines.append(
            circuit == .ph && names == ["mid"]
                ? "Its readings have a one-point calibration (offset only, no slope). Check the probe and the solution for the \(remaining), then calibrate again from the mid point: farmgate calibrate \(sensor)"
                : "Check the probe and the solution for the \(remaining), then calibrate again with all the points: farmgate calibrate \(sensor)")
        return lines.joined(separator: "\n")
    }

    private func take(_ step: CalibrationStep, sensor: String, session: String?, circuit: EZOCircuitKind, tolerance: Double) throws(Failure) {
        output("")
        output("Point \(step.description): \(Self.instruction(step, circuit))")
        if !options.assumeYes, !confirm("Is the probe in place? [y/N] ") {
            throw Failure("stopped at point \(step.point) on your request; points taken before it stay in the circuit")
        }
        var detector = StabilityDetector(tolerance: tolerance, window: options.window)
        let start = ContinuousClock.now
        var failures: [String] = []
        var last: Double?
        waiting: while true {
            let at = ContinuousClock.now - start
            if at > options.settleTimeout {
                let spread = detector.movement
                throw Failure(
                    "the readings did not settle at point \(step.point) within \(ConfigTable.format(options.settleTimeout)) (last \(last.map(EZOCalibration.format) ?? "none"), moving by \(EZOCalibration.format(spread.range)) in \(ConfigTable.format(spread.lasted))): rinse the probe, check it is submerged without air bubbles at its tip and the solution is fresh, or allow more with --tolerance or a shorter --window")
            }
            do throws(Failure) {
                let answer = try request("calibrate.read", sensor, session: session)
                failures.removeAll()
                if let value = answer.reading {
                    last = value
                    let stable = detector.add(value, at: at)
                    let spread = detector.spread
                    output("  \(EZOCalibration.format(value))  (within \(EZOCalibration.format(spread.range)) for \(ConfigTable.format(spread.lasted)))\(stable ? "  stable" : "")")
                    if stable { break waiting }
                }
            } catch {
                // Aborted from another shell, lapsed: no read will work again, and retrying says nothing more.
                if error.sessionEnded { throw error }
                // Readings on either side of a failed read (a supply fault, a reboot) are no one steady run.
                detector.reset()
                failures.append(error.description)
                output("  no reading: \(error.description)")
                if failures.count >= 5 {
                    throw Failure("five reads in a row failed at point \(step.point) (last: \(error.description)): check the probe's connector, the circuit's power and its wiring to the port")
                }
            }
            sleepBlocking(options.interval)
        }
        var forced = false
        if let last, let problem = EZOCalibration.implausibility(of: last, for: step, kind: circuit) {
            guard options.force else {
                throw Failure("not taking point \(step.description): \(problem). Nothing was sent; if the probe really is in that solution, run again with --force (you will be asked to confirm)")
            }
            // Forced: the installer decides, and must say so even with --yes.
            output("WARNING: \(problem)")
            guard confirm("The reading is far from the point's reference. Calibrate \(step.description) anyway? [y/N] ") else {
                throw Failure("stopped before point \(step.point) on your request (the reading is far from its reference); points taken before it stay in the circuit")
            }
            forced = true
        } else if !options.assumeYes, !confirm("Readings are stable at \(last.map(EZOCalibration.format) ?? "?"). Calibrate \(step.description)? [y/N] ") {
            throw Failure("stopped before point \(step.point) on your request; points taken before it stay in the circuit")
        }
        var arguments = ["sensor": sensor, "point": step.point]
        if let reference = step.reference { arguments["reference"] = String(reference) }
        if let last { arguments["reading"] = String(last) }
        if forced { arguments["force"] = "true" }
        let taken = try request("calibrate.point", sensor, session: session, arguments)
        output("Point \(step.description) taken (\(taken.command ?? "Cal")).")
    }

    private func report(_ answer: CalibrationAnswer) {
        output("")
        if let points = answer.state?.calibratedPoints {
            output("The circuit holds \(points) calibration point\(points == 1 ? "" : "s") (Cal,?).")
        } else {
            output("The circuit did not say how many points it holds (Cal,?).")
        }
        if let slope = answer.state?.slope {
            output("Slope: acid \(EZOCalibration.format(slope.acidPercent)) %, base \(EZOCalibration.format(slope.basePercent)) %\(slope.offsetMillivolts.map { ", offset \(EZOCalibration.format($0)) mV" } ?? "") (Slope,?).")
        }
        for warning in answer.warnings ?? [] { output("WARNING: \(warning)") }
        if let event = answer.event, answer.notKept == nil {
            output("Calibration recorded as event \(event.id); it is uploaded with the readings.")
        }
    }

    /// Ends the session (a no-op when it was finished); the agent's warnings are shown.
    private func abort(_ sensor: String, session: String?) {
        var arguments = ["sensor": sensor, "by": "farmgate calibrate itself, after it failed"]
        if let session { arguments["session"] = session }
        guard let answer = try? send(ControlRequest(command: "calibrate.abort", arguments: arguments)), answer.ok else { return }
        for warning in answer.calibration?.warnings ?? [] { output("Note: \(warning)") }
    }

    private func request(_ command: String, _ sensor: String, session: String? = nil, _ arguments: [String: String]? = nil) throws(Failure) -> CalibrationAnswer {
        let answer: CalibrationControlAnswer
        var arguments = arguments ?? ["sensor": sensor]
        if let session { arguments["session"] = session }
        do {
            answer = try send(ControlRequest(command: command, arguments: arguments))
        } catch {
            throw Failure("cannot reach the agent: \(error) (is `farmgate agent` running, and may you use its control socket? members of the agent's group may)")
        }
        // The control socket names the command an error answers (`calibrate.point: …`); the installer did not type it.
        let error = answer.error.map { $0.hasPrefix(command + ": ") ? String($0.dropFirst(command.count + 2)) : $0 }
        if !answer.ok, answer.ended != nil {
            throw Failure(error ?? "the calibration of \(sensor) ended (\(answer.ended ?? "")); nothing more is sent for it", sessionEnded: true)
        }
        guard answer.ok, let calibration = answer.calibration else {
            throw Failure(error ?? "the agent answered \(command) without a result; are the agent and the CLI the same version?")
        }
        return calibration
    }

    /// What the installer does at a point.
    static func instruction(_ step: CalibrationStep, _ circuit: EZOCircuitKind) -> String {
        switch (circuit, step.point) {
        case (.ec, "dry"): "take the probe out of any liquid and dry it; it reads about 0"
        case (.dissolvedOxygen, "air"): "take the probe out, let it sit in the air (not in the sun, not wet)"
        case (.dissolvedOxygen, "zero"): "put the probe in the zero dissolved-oxygen solution and stir away the bubbles"
        case (.rtd, _): "put the probe in water whose temperature a trusted thermometer reads \(step.reference.map(EZOCalibration.format) ?? "?") °C"
        default: "rinse the probe and put it in the \(step.reference.map(EZOCalibration.format) ?? "") solution"
        }
    }
}
