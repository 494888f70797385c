import ArgumentParser
import Dispatch
import FarmgateAgent
import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

struct CalibrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "calibrate",
        abstract: "Calibrate an EZO circuit through the running agent, point by point, waiting for stable readings.",
        discussion: """
            The agent owns the serial port: this command asks it to read and calibrate. For each point it shows live readings, \
            waits until they stay within --tolerance for --window, asks you to confirm (unless --yes), then sends Cal. A stable \
            reading far from the point's reference (pH more than 1.5 away; EC dry above 100 µS/cm; EC points more than 2x off) \
            is refused, naming the solution the probe seems to be in; --force asks you instead, even with --yes. If a point \
            fails after others were taken, those are recorded and the command says what the circuit holds. \
            Afterwards it prints what the circuit holds (Cal,?) and, on pH, the probe's slope (Slope,?), and the agent records \
            the calibration as an event that is uploaded with the readings. Readings taken meanwhile carry the calibrating flag.

            Points (in the datasheets' order): pH mid=7.00 (first: it clears the others), low=4.00, high=10.00; \
            EC dry, then single=1413 or low=12880 and high=80000 (µS/cm); RTD single=<°C>; ORP single=225 (mV); DO air, zero. \
            Without --point the usual ones are taken (pH mid, low, high; EC dry, low, high; ORP single=225; DO air).
            Exits 1 when the calibration could not be completed, with what to check; a calibration aborted meanwhile from \
            another shell (--abort) stops this command at once, saying so and by whom, also with exit 1. Interrupted \
            (Ctrl-C, SIGTERM, SIGHUP: the terminal closed), it aborts its session first, so the sensor's readings stop \
            carrying the calibrating flag at once (points the circuit took stay in it), and exits 130, 143 or 129.
            """)

    @OptionGroup var options: ConfigOption

    @OptionGroup var control: SocketOption
    var socket: String? { control.socket }

    @Argument(help: "The sensor's id, as in the configuration (e.g. tank1.ph).")
    var sensor: String

    @Option(name: .customLong("point"), help: ArgumentHelp("A point to take, in order: name=reference, or name alone for dry, air, zero. Repeatable.", valueName: "point"))
    var points: [String] = []

    @Option(parsing: .unconditional, help: ArgumentHelp("How far apart readings may be and still count as stable (default: pH 0.02, EC 10 µS/cm, RTD 0.1 °C, ORP 2 mV, DO 0.1 mg/L).", valueName: "value"))
    var tolerance: Double?

    @Option(parsing: .unconditional, help: ArgumentHelp("How long readings must stay within the tolerance.", valueName: "duration"))
    var window: String = "30s"

    @Option(parsing: .unconditional, help: ArgumentHelp("How long to wait at one point for stable readings before giving up.", valueName: "duration"))
    var timeout: String = "10m"

    @Option(parsing: .unconditional, help: ArgumentHelp("How often to read while waiting.", valueName: "duration"))
    var interval: String = "1s"

    @Flag(name: [.short, .customLong("yes")], help: "Take each point without asking (for scripts).")
    var yes = false

    @Flag(help: "Offer a point whose stable reading is far from its reference (the probe seems to be in another solution) instead of refusing it; you are asked to confirm it, even with --yes.")
    var force = false

    @Flag(help: "Abort a calibration of this sensor left in progress (points already taken stay in the circuit).")
    var abort = false

    func validate() throws {
        for (name, text) in [("--window", window), ("--timeout", timeout), ("--interval", interval)] {
            guard let duration = ConfigTable.parseDuration(text), duration > .zero else {
                throw ValidationError("\(name) must be a duration such as 30s, 2m or 500ms, not \"\(text)\"")
            }
        }
        if let tolerance, !(tolerance.isFinite && tolerance > 0) {
            throw ValidationError("--tolerance must be a positive number, in the sensor's unit")
        }
        // A point no circuit knows, or one given twice, is refused here (64), before a session is begun on the agent.
        let known = Set(EZOCircuitKind.allCases.flatMap(EZOCalibration.points))
        var named: Set<String> = []
        for point in points {
            let step: CalibrationStep
            do { step = try CalibrationStep(parsing: point) } catch { throw ValidationError("--point \(point): \(error.description)") }
            guard known.contains(step.point) else {
                throw ValidationError(
                    "--point \(point): no EZO circuit has a point \(step.point); the points are \(known.sorted().joined(separator: ", ")) (see farmgate calibrate --help)")
            }
            guard named.insert(step.point).inserted else {
                throw ValidationError("--point \(point): point \(step.point) is given twice; each point is taken once: give it once, with the value on the solution's bottle")
            }
            // Only dry, air and zero take no reference (the circuit kind is the agent's to know; no kind has other such points).
            if step.reference == nil, !["dry", "air", "zero"].contains(step.point) {
                throw ValidationError("--point \(point): point \(step.point) needs the reference value of its solution, such as \(step.point)=7.00; only dry, air and zero take none")
            }
        }
        if let window = ConfigTable.parseDuration(window), let timeout = ConfigTable.parseDuration(timeout), window > timeout {
            throw ValidationError("--window \(self.window) is longer than --timeout \(self.timeout): readings could never stay stable for the window before the timeout; give a window shorter than the timeout")
        }
    }

    func run() throws {
        let path = try socket ?? options.load().controlSocket
        let send: (ControlRequest) throws -> CalibrationControlAnswer = { request in
            // A calibration point takes the circuit over a second, behind a read in progress: allow for both.
            let bytes = try ControlClient.send(request, to: path, timeoutSeconds: 30, settling: ControlClient.cliSettling)
            return try JSONDecoder().decode(CalibrationControlAnswer.self, from: Data(bytes))
        }
        if abort {
            do {
                // Who aborts, for the log and for the farmgate calibrate whose session this was (it says so and stops).
                let by = "farmgate calibrate --abort (pid \(getpid()), uid \(getuid()))"
                let answer = try send(ControlRequest(command: "calibrate.abort", arguments: ["sensor": sensor, "by": by]))
                guard answer.ok else { throw CleanExit.message("farmgate calibrate: \(answer.error ?? "the agent refused")", code: 1) }
                print("Calibration of \(sensor) aborted.")
                for warning in answer.calibration?.warnings ?? [] { print("Note: \(warning)") }
                return
            } catch let error as ExitCode {
                throw error
            } catch {
                throw CleanExit.message("farmgate calibrate: cannot reach the agent on \(path): \(error)", code: 1)
            }
        }
        var guideOptions = CalibrationGuide.Options()
        guideOptions.steps = points.compactMap { try? CalibrationStep(parsing: $0) }
        guideOptions.tolerance = tolerance
        guideOptions.window = ConfigTable.parseDuration(window) ?? .seconds(30)
        guideOptions.settleTimeout = ConfigTable.parseDuration(timeout) ?? .seconds(600)
        guideOptions.interval = ConfigTable.parseDuration(interval) ?? .seconds(1)
        guideOptions.assumeYes = yes
        guideOptions.force = force
        let interrupt = CalibrationInterrupt(sensor: sensor, socket: path)
        interrupt.install()
        let guide = CalibrationGuide(
            options: guideOptions, send: send,
            confirm: { question in
                StandardStream.output.write(question)
                guard let line = readLine() else { return false }
                return ["y", "yes"].contains(line.trimmingWhitespace().lowercased())
            },
            output: { line in
                // Unbuffered, so that live readings show as they come even through a pipe.
                StandardStream.output.write(line + "\n")
            },
            session: { interrupt.session = $0 })
        do {
            // The guide's session closure holds `interrupt`, and with it the signal sources, while it runs.
            _ = try guide.run(sensor: sensor)
        } catch {
            throw CleanExit.message("farmgate calibrate: \(error.description)", code: 1)
        }
    }
}

/// What `farmgate calibrate` does when interrupted (SIGINT, SIGTERM, SIGHUP): it aborts the session it began, so the
/// sensor's readings stop carrying `calibrating` now rather than when the agent finds the session idle (15 minutes),
/// then exits 128 + the signal. Before the agent began a session, and after it ended, the signal just ends the command.
/// The handlers run on a Dispatch queue, never on the concurrency pool (the control socket blocks).
final class CalibrationInterrupt: Sendable {
    private let sensor: String
    private let socket: String
    private let current = Mutex<String?>(nil)
    /// Written once, by ``install()`` on the command's thread before any signal is handled; kept for the handlers' life.
    nonisolated(unsafe) private var sources: [any DispatchSourceSignal] = []

    init(sensor: String, socket: String) {
        self.sensor = sensor
        self.socket = socket
    }

    /// The session to abort: set once the agent began it, nil once it ended.
    var session: String? {
        get { current.withLock { $0 } }
        set { current.withLock { $0 = newValue } }
    }

    func install() {
        let queue = DispatchQueue(label: "farmgate-calibrate-signals")
        var made: [any DispatchSourceSignal] = []
        for (number, name) in [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM"), (SIGHUP, "SIGHUP")] {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
            source.setEventHandler { [self] in interrupted(by: name, number: number) }
            source.resume()
            made.append(source)
        }
        sources = made
    }

    private func interrupted(by name: String, number: Int32) {
        // Taken, so that a second Ctrl-C while the abort is on its way does not send another.
        let session = current.withLock { current in
            defer { current = nil }
            return current
        }
        if let session {
            let by = "farmgate calibrate, interrupted by \(name) (pid \(getpid()), uid \(getuid()))"
            let request = ControlRequest(command: "calibrate.abort", arguments: ["sensor": sensor, "session": session, "by": by])
            let outcome: String
            do {
                let bytes = try ControlClient.send(request, to: socket, timeoutSeconds: 10, settling: ControlClient.cliSettling)
                let answer = try JSONDecoder().decode(CalibrationControlAnswer.self, from: Data(bytes))
                if answer.ok {
                    let kept = answer.calibration?.warnings.map { $0.map { " Note: \($0)." }.joined() } ?? ""
                    outcome = "calibration of \(sensor) aborted (\(name)).\(kept)"
                } else {
                    outcome = "\(name); the calibration of \(sensor) was not aborted: \(answer.error ?? "the agent refused")"
                }
            } catch {
                outcome = "\(name); cannot reach the agent on \(socket) to abort the calibration of \(sensor) (\(error)): run `farmgate calibrate \(sensor) --abort`, or it lapses after 15 minutes idle"
            }
            StandardStream.error.write("\nfarmgate calibrate: \(outcome)\n")
        }
        exit(128 + number)
    }
}
