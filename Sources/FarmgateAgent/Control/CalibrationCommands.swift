import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging
import ServiceLifecycle
import Synchronization

/// The control socket's calibration commands, as `farmgate calibrate` sends them. The agent owns the serial port, so the
/// CLI drives the session and the agent talks to the circuit, between the sampler's reads.
///
/// | command | arguments | answer (`calibration`) |
/// |---|---|---|
/// | `calibrate.begin` | `sensor` | `session`, the circuit, its points, the default points; readings of every sensor on the circuit (an EC circuit's `tds`, `salinity`, `specific_gravity` too) carry `calibrating` from now |
/// | `calibrate.read` | `sensor` | `reading`: one fresh reading (not stored) |
/// | `calibrate.point` | `sensor`, `point`, `reference` (a number; absent for `dry`, `air`, `zero`), `reading` (optional: a reading far from the reference is refused unless `force` is `true`) | `command` sent, `taken` |
/// | `calibrate.status` | `sensor` | `taken`, `state` (`Cal,?`, `Slope,?`) |
/// | `calibrate.finish` | `sensor` | `event` (committed to the buffer), `state`, `warnings` |
/// | `calibrate.abort` | `sensor`, `by` (optional: who aborts, for the log and the CLI whose session it was) | `taken` (points the circuit already holds stay in it) |
///
/// Every command but `begin` takes an optional `session` (what `begin` answered): a command for a session that ended
/// (aborted from another shell, finished, lapsed, replaced by a new one) is refused with `ended` set to how it ended
/// (`aborted`, `finished`, `lapsed`, `replaced`), and the error says when and, for an abort, by whom; the CLI stops at
/// once on it. Without `session` the sensor's current session is meant.
///
/// One calibration per sensor at a time; a session idle for longer than the flags' idle limit has lapsed and a new
/// `calibrate.begin` replaces it. Points a circuit took are never forgotten: a session that lapses with points (its CLI
/// was killed, the laptop closed) is recorded as the calibration event then, with what the circuit says it holds, and
/// so is one open when the agent stops (run as a service, it looks for lapsed sessions while the agent runs).
public final class CalibrationCommands: Service, Sendable {
    public static let commands = ["calibrate.begin", "calibrate.read", "calibrate.point", "calibrate.status", "calibrate.finish", "calibrate.abort"]

    struct Session: Sendable {
        var id = String(UUID().uuidString.lowercased().prefix(8))
        var circuit: EZOCircuitKind
        var steps: [CalibrationStep] = []
        var points: [CalibrationEvent.Point] = []
        var lastActivity = ContinuousClock.now
    }

    private let drivers: [SensorID: any SensorDriver]
    private let flags: CalibrationFlags
    private let recorder: any CalibrationRecorder
    private let sessions = Mutex<[SensorID: Session]>([:])
    /// How each sensor's last session ended, for the CLI still driving it (aborted from another shell, say).
    private let endings = Mutex<[SensorID: Ending]>([:])
    private let logger: Logger

    /// How a session ended.
    struct Ending: Sendable {
        /// `aborted`, `finished`, `lapsed`, `stopped`, `replaced`.
        var kind: String
        /// What happened, for the message: "was aborted by farmgate calibrate --abort (pid 4242, uid 1000)".
        var what: String
        var at: Timestamp
        var session: String
    }

    /// A command for a session that ended: `ended` of the answer is its kind.
    struct SessionEnded: Error, CustomStringConvertible {
        var kind: String
        var description: String
    }

    public init(drivers: [SensorID: any SensorDriver], flags: CalibrationFlags, recorder: any CalibrationRecorder, logger: Logger) {
        self.drivers = drivers
        self.flags = flags
        self.recorder = recorder
        self.logger = logger
    }

    /// Records lapsed sessions as they lapse and, when the agent stops, the sessions still open.
    public func run() async throws {
        let sweep = min(flags.idleLimit, .seconds(30))
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do { try await Task.sleep(for: sweep) } catch { break }
                await self.recordLapsed()
            }
        }
        await recordOpen()
    }

    /// Records (and ends) every session that lapsed with points taken: the circuit holds them whether or not the CLI
    /// that took them is still there.
    func recordLapsed(now: ContinuousClock.Instant = .now) async {
        let limit = flags.idleLimit
        let lapsed: [(SensorID, Session)] = sessions.withLock { sessions in
            let gone = sessions.filter { now - $0.value.lastActivity > limit }
            for sensor in gone.keys { sessions[sensor] = nil }
            return gone.map { ($0.key, $0.value) }
        }
        for (sensor, session) in lapsed {
            ended(sensor, session, kind: "lapsed", what: "lapsed after \(limit) without a command\(session.points.isEmpty ? "" : " (the points the circuit took are recorded as a calibration event)")")
            clearFlags(sensor)
        }
        for (sensor, session) in lapsed where !session.points.isEmpty {
            guard let device = drivers[sensor] as? any CalibratableDriver else { continue }
            do {
                let state: CalibrationState? = try? await device.calibrationState()
                let event = try await record(sensor, session, state: state)
                logger.warning(
                    "Calibration lapsed after \(limit) without a command (its farmgate calibrate was stopped?): the points the circuit took are recorded\(event.keptByCircuit ? "" : "; the circuit holds fewer than were taken, so it is not counted as a calibration")",
                    metadata: ["sensor": "\(sensor)", "event": "\(event.id)", "points": "\(event.points.map(\.name).joined(separator: ","))", "circuit_holds": "\(state?.calibratedPoints.map(String.init) ?? "unknown")"])
            } catch {
                logger.error("Calibration lapsed but its points could not be recorded", metadata: ["sensor": "\(sensor)", "error": "\(error)"])
            }
        }
    }

    /// Records the sessions still open (with points) as the agent stops, without asking the circuits (their ports are
    /// closing).
    func recordOpen() async {
        let open = sessions.withLock { sessions in
            defer { sessions.removeAll() }
            return sessions
        }
        for (sensor, session) in open { ended(sensor, session, kind: "stopped", what: "ended as the agent stopped") }
        for (sensor, session) in open where !session.points.isEmpty {
            do {
                let event = try await record(sensor, session, state: nil)
                logger.warning(
                    "Calibration still in progress as the agent stops: the points the circuit took are recorded; calibrate again to finish it",
                    metadata: ["sensor": "\(sensor)", "event": "\(event.id)", "points": "\(event.points.map(\.name).joined(separator: ","))"])
            } catch {
                logger.error("Calibration in progress as the agent stops; its points could not be recorded", metadata: ["sensor": "\(sensor)", "error": "\(error)"])
            }
        }
    }

    /// What the installer is told when the circuit holds fewer points than were taken: the calibration failed.
    static func notKept(_ sensor: SensorID, _ event: CalibrationEvent, held: Int) -> String {
        let names = event.points.map(\.name).joined(separator: ", ")
        return "the circuit did not keep the calibration: Cal,? says it holds \(held) calibration point\(held == 1 ? "" : "s") after \(event.pointsExpected) \(event.pointsExpected == 1 ? "was" : "were") taken (\(names)); a Cal command was lost on the way or not done (with response codes off nothing acknowledges it). It is recorded as event \(event.id) with what the circuit holds, and not counted as a calibration (calibration_overdue). Check the circuit's wiring and power, then calibrate again: farmgate calibrate \(sensor)"
    }

    /// Commits the calibration event of `session`'s points, with what the circuit said it holds.
    private func record(_ sensor: SensorID, _ session: Session, state: CalibrationState?) async throws -> CalibrationEvent {
        let event = CalibrationEvent(
            id: UUID().uuidString.lowercased(), sensor: sensor, time: Timestamp.now(), circuit: session.circuit.rawValue,
            firmware: state?.firmware, points: session.points, calibratedPoints: state?.calibratedPoints, slope: state?.slope)
        try await recorder.recordCalibration(event)
        clearFlags(sensor)
        return event
    }

    /// Answers `request` with the JSON of a ``CalibrationControlAnswer``.
    public func answer(_ request: ControlRequest) async -> CalibrationControlAnswer {
        let arguments = request.arguments ?? [:]
        do {
            guard let name = arguments["sensor"] else { throw CalibrationError("name the sensor (argument sensor)") }
            let sensor: SensorID
            do { sensor = try SensorID(name) } catch { throw CalibrationError("\"\(name.prefix(80))\" is not a sensor id: \(error)") }
            guard let driver = drivers[sensor] else {
                throw CalibrationError("this agent has no sensor \"\(sensor)\"; `farmgate status` lists its sensors")
            }
            guard let device = driver as? any CalibratableDriver else {
                throw CalibrationError("sensor \"\(sensor)\" is not an EZO circuit: only EZO pH, EC, RTD, ORP and DO circuits are calibrated through the agent (a Modbus transmitter is calibrated with its vendor's tool)")
            }
            try checkCalibratedQuantity(sensor, device)
            switch request.command {
            case "calibrate.begin":
                // A lapsed session of this sensor is recorded before a new one takes its place.
                await recordLapsed()
                return try begin(sensor, device)
            case "calibrate.read": return try await read(sensor, device, session: arguments["session"])
            case "calibrate.point": return try await point(sensor, device, arguments)
            case "calibrate.status":
                let session = try current(sensor, session: arguments["session"])
                let state = try await device.calibrationState()
                return CalibrationControlAnswer(ok: true, calibration: CalibrationAnswer(sensor: sensor, circuit: session.circuit, taken: session.points, state: state))
            case "calibrate.finish": return try await finish(sensor, device, session: arguments["session"])
            case "calibrate.abort":
                let session = try current(sensor, session: arguments["session"])
                sessions.withLock { _ = $0.removeValue(forKey: sensor) }
                clearFlags(sensor)
                let by = arguments["by"].map { String($0.prefix(200)) } ?? "a calibrate.abort on the control socket"
                ended(sensor, session, kind: "aborted", what: "was aborted by \(by)")
                logger.notice("Calibration aborted", metadata: ["sensor": "\(sensor)", "points": "\(session.points.count)", "by": "\(by)"])
                var answer = CalibrationAnswer(sensor: sensor, circuit: session.circuit, taken: session.points)
                if !session.points.isEmpty {
                    answer.warnings = ["the circuit keeps the \(session.points.count) point\(session.points.count == 1 ? "" : "s") it already took (\(session.points.map(\.name).joined(separator: ", "))); calibrate again to replace them"]
                }
                return CalibrationControlAnswer(ok: true, calibration: answer)
            default:
                throw CalibrationError("unknown calibration command \"\(request.command)\"; known: \(Self.commands.joined(separator: ", "))")
            }
        } catch let error as CalibrationError {
            return CalibrationControlAnswer(ok: false, error: "\(request.command): \(error.description)")
        } catch let error as SessionEnded {
            var answer = CalibrationControlAnswer(ok: false, error: "\(request.command): \(error.description)")
            answer.ended = error.kind
            return answer
        } catch let error as SensorError {
            return CalibrationControlAnswer(ok: false, error: "\(request.command): the circuit failed: \(error.message)")
        } catch {
            return CalibrationControlAnswer(ok: false, error: "\(request.command): \(error)")
        }
    }

    /// Refuses a sensor that reads a derived output of its circuit (an EC circuit's TDS, salinity or specific gravity):
    /// the circuit is calibrated in µS/cm, so stability and the points' references must be judged on the EC output, and
    /// the event belongs to the EC sensor, whose calibration history `calibration_overdue` counts from. Refused rather
    /// than quietly redirected: an installer who typed the TDS sensor may be holding ppm values for the references.
    private func checkCalibratedQuantity(_ sensor: SensorID, _ device: any CalibratableDriver) throws(CalibrationError) {
        let calibrated = EZOCalibration.calibratedQuantity(device.circuit)
        guard device.measuredQuantity != calibrated else { return }
        let owner = drivers.filter { _, other in
            guard let other = other as? any CalibratableDriver else { return false }
            return other.circuitPort == device.circuitPort && other.measuredQuantity == calibrated
        }.keys.map(\.rawValue).sorted().first
        let what = "sensor \"\(sensor)\" is the \(device.measuredQuantity.rawValue) output of the \(device.circuit) circuit on \(device.circuitPort), which is calibrated in \(calibrated.unit) through its \(calibrated.rawValue) output (\(device.measuredQuantity.rawValue) is derived from it and follows its calibration)"
        if let owner {
            throw CalibrationError("\(what): calibrate \"\(owner)\" instead (farmgate calibrate \(owner)), with the references in \(calibrated.unit)")
        }
        throw CalibrationError("\(what): add a [[sensor]] with quantity = \"\(calibrated.rawValue)\" on port \(device.circuitPort) to the configuration, restart the agent and calibrate that sensor, with the references in \(calibrated.unit)")
    }

    /// The sensor's session, which must be live (touched now) and, when `id` is given, the one it names.
    /// - Throws: ``SessionEnded`` when that session ended (how, when, by whom), ``CalibrationError`` when there is none.
    private func current(_ sensor: SensorID, session id: String? = nil) throws -> Session {
        let now = ContinuousClock.now
        let limit = flags.idleLimit
        let session: Session? = sessions.withLock { sessions in
            // A lapsed session stays until ``recordLapsed(now:)`` records its points.
            guard var session = sessions[sensor], now - session.lastActivity <= limit, id == nil || id == session.id else { return nil }
            session.lastActivity = now
            sessions[sensor] = session
            return session
        }
        guard let session else {
            let ending = endings.withLock { $0[sensor] }
            let live = sessions.withLock { sessions in sessions[sensor].map { now - $0.lastActivity <= limit } ?? false }
            if let ending, id == ending.session {
                throw SessionEnded(
                    kind: ending.kind,
                    description: "the calibration of \(sensor) \(ending.what) at \(ending.at)\(live ? "; another one is in progress now" : ""); nothing more is sent for it")
            }
            if let ending, id == nil {
                throw SessionEnded(
                    kind: ending.kind,
                    description: "no calibration of \(sensor) is in progress: the last one \(ending.what) at \(ending.at); start one with `farmgate calibrate \(sensor)` (calibrate.begin on the control socket)")
            }
            if let id, live {
                throw SessionEnded(
                    kind: "replaced", description: "the calibration of \(sensor) this command belongs to (session \(id)) ended, and another one is in progress now; nothing is sent for it")
            }
            throw CalibrationError("no calibration of \(sensor) is in progress (or it lapsed after \(limit) without a command); start one with `farmgate calibrate \(sensor)` (calibrate.begin on the control socket)")
        }
        markFlags(sensor)
        return session
    }

    /// Notes how `session` of `sensor` ended, for its CLI's next command.
    private func ended(_ sensor: SensorID, _ session: Session, kind: String, what: String) {
        let ending = Ending(kind: kind, what: what, at: Timestamp.now(), session: session.id)
        endings.withLock { $0[sensor] = ending }
    }

    /// The sensors read from the circuit `sensor` is: an EC circuit's `ec`, `tds`, `salinity` and `specific_gravity`
    /// sensors share its port and probe (in air or a calibration solution while it is calibrated), `sensor` alone
    /// otherwise.
    private func circuitSensors(_ sensor: SensorID) -> [SensorID] {
        guard let device = drivers[sensor] as? any CalibratableDriver else { return [sensor] }
        let port = device.circuitPort
        let others = drivers.compactMap { id, driver -> SensorID? in
            guard id != sensor, let other = driver as? any CalibratableDriver, other.circuitPort == port else { return nil }
            return id
        }
        return [sensor] + others.sorted { $0.rawValue < $1.rawValue }
    }

    /// Flags the readings of every sensor of `sensor`'s circuit `calibrating`, from now until the idle limit.
    private func markFlags(_ sensor: SensorID) {
        for id in circuitSensors(sensor) { flags.mark(id) }
    }

    private func clearFlags(_ sensor: SensorID) {
        for id in circuitSensors(sensor) { flags.clear(id) }
    }

    private func begin(_ sensor: SensorID, _ device: any CalibratableDriver) throws(CalibrationError) -> CalibrationControlAnswer {
        let now = ContinuousClock.now
        let limit = flags.idleLimit
        let circuit = device.circuit
        let started = Session(circuit: circuit)
        let replaced: Session?? = sessions.withLock { sessions in
            if let session = sessions[sensor], now - session.lastActivity <= limit { return nil }
            defer { sessions[sensor] = started }
            return .some(sessions[sensor])
        }
        guard let replaced else {
            throw CalibrationError("a calibration of \(sensor) is already in progress (another farmgate calibrate?); finish or abort it first (farmgate calibrate \(sensor) --abort)")
        }
        if let replaced {
            // Lapsed, and not yet swept (recordLapsed ran just before, so it had no points to record).
            ended(sensor, replaced, kind: "lapsed", what: "lapsed after \(limit) without a command")
        }
        markFlags(sensor)
        logger.notice("Calibration started", metadata: ["sensor": "\(sensor)", "circuit": "\(circuit.rawValue)"])
        var answer = CalibrationAnswer(sensor: sensor, circuit: circuit, taken: [])
        answer.session = started.id
        answer.points = EZOCalibration.points(circuit)
        answer.defaultPoints = EZOCalibration.defaultSteps(circuit).map(\.description)
        return CalibrationControlAnswer(ok: true, calibration: answer)
    }

    private func read(_ sensor: SensorID, _ device: any CalibratableDriver, session id: String?) async throws -> CalibrationControlAnswer {
        let session = try current(sensor, session: id)
        let value = try await device.read()
        var answer = CalibrationAnswer(sensor: sensor, circuit: session.circuit, taken: session.points)
        answer.reading = value.value
        answer.readingAt = Timestamp.now()
        return CalibrationControlAnswer(ok: true, calibration: answer)
    }

    private func point(_ sensor: SensorID, _ device: any CalibratableDriver, _ arguments: [String: String]) async throws -> CalibrationControlAnswer {
        let session = try current(sensor, session: arguments["session"])
        guard let name = arguments["point"] else {
            throw CalibrationError("name the point (argument point: \(EZOCalibration.points(session.circuit).joined(separator: ", ")))")
        }
        var reference: Double?
        if let text = arguments["reference"] {
            guard let value = Double(text), value.isFinite else {
                throw CalibrationError("the reference must be a number, not \"\(text.prefix(40))\"")
            }
            reference = value
        }
        let step = CalibrationStep(point: name.lowercased(), reference: reference)
        let command = try EZOCalibration.command(for: step, kind: session.circuit, after: session.steps)
        let reading = arguments["reading"].flatMap(Double.init).flatMap { $0.isFinite ? $0 : nil }
        // A point taken in the wrong solution silently ruins the calibration: refuse unless the installer confirmed it.
        if let reading, arguments["force"] != "true", let problem = EZOCalibration.implausibility(of: reading, for: step, kind: session.circuit) {
            throw CalibrationError("\(problem) (nothing was sent; to take the point anyway, pass force=true)")
        }
        try await device.sendCalibration(command)
        let taken = CalibrationEvent.Point(name: step.point, reference: step.reference, at: Timestamp.now(), reading: reading)
        let points: [CalibrationEvent.Point] = sessions.withLock { sessions in
            sessions[sensor]?.steps.append(step)
            sessions[sensor]?.points.append(taken)
            return sessions[sensor]?.points ?? [taken]
        }
        logger.notice("Calibration point taken", metadata: ["sensor": "\(sensor)", "command": "\(command)"])
        var answer = CalibrationAnswer(sensor: sensor, circuit: session.circuit, taken: points)
        answer.command = command
        return CalibrationControlAnswer(ok: true, calibration: answer)
    }

    private func finish(_ sensor: SensorID, _ device: any CalibratableDriver, session id: String?) async throws -> CalibrationControlAnswer {
        let session = try current(sensor, session: id)
        guard !session.points.isEmpty else {
            throw CalibrationError("no point was taken yet; take at least one (\(EZOCalibration.defaultSteps(session.circuit).first?.description ?? "single=<reference>")) or abort")
        }
        // The points are taken (each was acknowledged): they are recorded even when the circuit does not say what it holds.
        var warnings: [String] = []
        let state: CalibrationState
        do throws(SensorError) {
            state = try await device.calibrationState()
        } catch {
            state = CalibrationState(calibratedPoints: nil, slope: nil, firmware: nil)
            warnings.append("the circuit did not say which calibration points it holds (\(error.message)); the points taken are recorded, but whether it kept them is unknown: if its readings look wrong, calibrate again")
        }
        let event = try await record(sensor, session, state: state)
        sessions.withLock { _ = $0.removeValue(forKey: sensor) }
        ended(sensor, session, kind: "finished", what: "finished (recorded as calibration event \(event.id))")
        logger.notice(
            "Calibration recorded",
            metadata: ["sensor": "\(sensor)", "event": "\(event.id)", "points": "\(event.points.map(\.name).joined(separator: ","))"])
        var answer = CalibrationAnswer(sensor: sensor, circuit: session.circuit, taken: session.points, state: state)
        answer.event = event
        if let slope = state.slope, let warning = EZOCalibration.slopeWarning(slope) { warnings.append(warning) }
        if !event.keptByCircuit, let held = event.calibratedPoints {
            answer.notKept = Self.notKept(sensor, event, held: held)
        }
        answer.warnings = warnings
        return CalibrationControlAnswer(ok: true, calibration: answer)
    }
}

/// What the control socket answers to a `calibrate.*` command.
public struct CalibrationControlAnswer: Codable, Sendable {
    public var ok: Bool
    public var error: String?
    /// Set when the command was for a session that ended: how (`aborted`, `finished`, `lapsed`, `stopped`, `replaced`).
    /// The CLI driving that session stops at once, with ``error`` (which says when and, for an abort, by whom).
    public var ended: String?
    public var calibration: CalibrationAnswer?

    public init(ok: Bool, error: String? = nil, calibration: CalibrationAnswer? = nil) {
        self.ok = ok
        self.error = error
        self.calibration = calibration
    }
}

/// The calibration part of an answer; which fields are set depends on the command (see ``CalibrationCommands``).
public struct CalibrationAnswer: Codable, Sendable {
    public var sensor: String
    /// `calibrate.begin`: the session's id, for the commands that follow (`session`).
    public var session: String?
    /// `pH`, `EC`, `RTD`, `ORP`, `DO`.
    public var circuit: String
    /// The points taken so far in this session, in order.
    public var taken: [CalibrationEvent.Point]
    public var points: [String]?
    public var defaultPoints: [String]?
    public var reading: Double?
    public var readingAt: Timestamp?
    public var command: String?
    public var state: CalibrationState?
    public var event: CalibrationEvent?
    public var warnings: [String]?
    /// `calibrate.finish`: set when the circuit holds fewer points than were taken (the calibration failed; the event
    /// records what it holds): what went wrong and what to check. The CLI exits 1 with it.
    public var notKept: String?

    init(sensor: SensorID, circuit: EZOCircuitKind, taken: [CalibrationEvent.Point], state: CalibrationState? = nil) {
        self.sensor = sensor.rawValue
        self.circuit = circuit.rawValue
        self.taken = taken
        self.state = state
    }

    enum CodingKeys: String, CodingKey {
        case sensor, session, circuit, taken, points, reading, command, state, event, warnings
        case notKept = "not_kept"
        case defaultPoints = "default_points"
        case readingAt = "reading_at"
    }
}
