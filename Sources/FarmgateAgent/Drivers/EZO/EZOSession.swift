import FarmgateSupport
import Logging

/// The conversation with one EZO circuit on one serial port: initialisation, identification, reads, and recovery from a
/// reboot. Every method runs on the port's ``SerialLine`` thread, one at a time.
///
/// Problems of the port itself (unplugged, gone) are thrown as ``SerialError`` so that the line closes and reopens the
/// port; problems of the circuit (an error code, garbage, silence) come back as ``SensorError``.
final class EZOSession: @unchecked Sendable {
    // @unchecked: all state is touched only by jobs on the owning SerialLine's thread, which run one at a time.

    /// Why a transaction stopped short.
    enum Interruption: Error {
        /// The port failed (reopen it).
        case port(SerialError)
        /// The circuit failed the command.
        case sensor(SensorError)
        /// The circuit answered `command` with an error code.
        case refused(EZOErrorCode, command: String)
        /// The circuit restarted or changed state under us: initialise again and retry. `event` is the last event it
        /// sent (`*RS` while it boots), nil when it said so otherwise (readings streamed again, outputs changed).
        case restarted(String, event: EZOEvent?)
        /// The circuit reported `*UV` or `*OV` on its own since the last command: `command` (not a read) was not sent.
        case supply(EZOErrorCode, command: String)
    }

    /// One reading: its fields, and the temperature the circuit compensated it with (nil: its own setting, not one the
    /// driver set).
    struct Reading: Sendable, Hashable {
        var values: [Double]
        var temperature: Double?
    }

    /// How long a circuit may take from `*RS` to `*RE`; a command sent meanwhile is lost.
    static let bootTime: Duration = .seconds(3)

    let kind: EZOCircuitKind
    /// The outputs an EC circuit must have on, in reading order (empty for other kinds).
    let outputs: [EZOOutput]
    let portPath: String
    /// Who configured it, for the mismatch message.
    let sensors: String
    private let logger: Logger
    /// Extra time, past the datasheet's processing time, that an answer may take (transfer, a loaded host).
    let margin: Duration

    private var splitter = EZOLineSplitter()
    /// Lines that arrived after the answer a transaction waited for (a `*RS` right behind a reading): examined before
    /// the next command, so that a complete answer is never thrown away for what followed it.
    private var queued: [EZOLine] = []
    /// The port generation this session was initialised on; nil when it must initialise (first use, after a reboot).
    private var initialisedGeneration: Int?
    /// Whether the circuit ends answers with `*OK` (learned from `*OK,?`, and followed when it changes).
    private var responseCodes = true
    /// Whether the circuit takes `RT,<t>`; firmware from before it answers `*ER`, and is sent `T,<t>` then `R`.
    private var knowsRT = true
    /// `*ER` answers to `RT,<t>` in a row. One may be a garbled command; only ``rtRefusalLimit`` in a row say the
    /// firmware predates `RT`.
    private var rtRefusals = 0
    static let rtRefusalLimit = 3
    private(set) var firmware: String?
    private(set) var garbageLines = 0
    /// The temperature the circuit compensates with, as `RT,<t>` or `T,<t>` set it since it was last initialised; nil
    /// before any (after a restart it is back at its own setting). `RT` sets it for every later `R` as well, so every
    /// output read after it is compensated, whichever sensor's read sent it.
    private var compensation: Double?
    /// `*UV` or `*OV` the circuit sent on its own, between commands (after a reading's `*OK`, say): its supply is out
    /// of range and its readings are unreliable. The next read is not stored; the next other command (a calibration
    /// point) is not sent.
    private var supplyFault: EZOErrorCode?
    /// The last reading taken, when, on which generation of the port, for which compensation temperature (shared by
    /// the outputs of an EC circuit, see ``read(port:generation:temperature:requestedAt:)``).
    private var lastReading: (reading: Reading, takenAt: ContinuousClock.Instant, generation: Int, temperature: Double?)?

    init(kind: EZOCircuitKind, outputs: [EZOOutput], portPath: String, sensors: String, margin: Duration = .seconds(1), logger: Logger) {
        self.kind = kind
        self.outputs = outputs.sorted()
        self.portPath = portPath
        self.sensors = sensors
        self.margin = margin
        self.logger = logger
    }

    /// Takes one reading (`R`, or `RT,<t>` with a temperature), initialising the circuit first when the port is new or the
    /// circuit restarted. A restart seen during the read re-initialises and reads once more.
    /// - Returns: the reading's fields (one, or the EC circuit's enabled outputs in order) with the temperature the circuit
    ///   compensated them with, or why there is none.
    /// - Throws: ``SerialError`` when the port failed.
    ///
    /// The outputs of an EC circuit share one reading: an output that asked at `requestedAt` and finds a reading taken
    /// for a sibling since then (on this port's generation, with the same compensation temperature) gets its fields
    /// without a command of its own. So the four outputs of one circuit, woken together, cost one `RT` (about 900 ms)
    /// and come from one measurement.
    func read(port: SerialPort, generation: Int, temperature: Double?, requestedAt: ContinuousClock.Instant? = nil) throws(SerialError) -> Result<Reading, SensorError> {
        if let requestedAt, outputs.count > 1, let last = lastReading, last.generation == generation, last.takenAt >= requestedAt,
            last.temperature == temperature
        {
            return .success(last.reading)
        }
        let result = try readFromCircuit(port: port, generation: generation, temperature: temperature)
        if case .success(let reading) = result {
            lastReading = (reading, ContinuousClock.now, generation, temperature)
        } else {
            lastReading = nil
        }
        return result
    }

    private func readFromCircuit(port: SerialPort, generation: Int, temperature: Double?) throws(SerialError) -> Result<Reading, SensorError> {
        var restarts: [String] = []
        for _ in 0..<2 {
            do throws(Interruption) {
                if initialisedGeneration != generation {
                    try initialise(port)
                    initialisedGeneration = generation
                }
                let (command, answer) = try takeReading(port, temperature: temperature)
                if let code = supplyFault {
                    // Reported before this read (after the last one's *OK): the read was still taken, so that a circuit
                    // whose supply stays out of range says so again after it, but its answer is not a reading to keep.
                    supplyFault = nil
                    let shown = answer.map { "the answer \"\($0)\" to \(command) is not stored" } ?? "no reading is stored"
                    return .failure(SensorError(.fault, "EZO \(kind.rawValue) on \(portPath): \(code.reportedOnItsOwn(consequence: shown))"))
                }
                guard let text = answer else {
                    return .failure(SensorError(.invalidResponse, "no reading in the answer to \(command)"))
                }
                guard let values = EZOParse.reading(text) else {
                    return .failure(SensorError(.invalidResponse, "unreadable reading \"\(text)\""))
                }
                let expected = kind == .ec ? outputs.count : 1
                guard values.count == expected else {
                    guard kind == .ec else {
                        // A pH, ORP, RTD or DO circuit has one field (a DO circuit is set to mg/L alone): this is no
                        // restart to recover from but the wrong device or wrong output settings.
                        initialisedGeneration = nil
                        return .failure(SensorError(
                            .invalidResponse,
                            "the answer \"\(text)\" to \(command) from the circuit on \(portPath) has \(values.count) fields where an EZO \(kind.rawValue) circuit's reading has 1: not a \(kind.rawValue) circuit, or its output settings were changed (another program, a factory reset); check which circuit is wired to this port"))
                    }
                    // The EC circuit's outputs changed (a factory reset, another program): set them again.
                    throw Interruption.restarted("the reading has \(values.count) \(values.count == 1 ? "field" : "fields"), \(expected) expected", event: nil)
                }
                if let range = kind.outputRange, let value = values.first, !range.contains(value) {
                    // No circuit of this kind outputs it: a line garbled on the way, or another device answering.
                    // Check the circuit again (i) before the next read.
                    initialisedGeneration = nil
                    return .failure(SensorError(
                        .invalidResponse,
                        "the answer \"\(text)\" to \(command) from the EZO \(kind.rawValue) circuit on \(portPath) is outside the \(kind.outputRangeText) an EZO \(kind.rawValue) circuit outputs: not a reading (a line garbled on the way, or not a \(kind.rawValue) circuit's answer); check the wiring, a shared ground and the baud rate"))
                }
                if kind == .rtd, values.first == -1023 {
                    return .failure(SensorError(.fault, "the EZO RTD circuit on \(portPath) reads -1023: no probe connected; check the PT-100/PT-1000 probe's wires"))
                }
                return .success(Reading(values: values, temperature: compensation))
            } catch {
                switch error {
                case .port(let serial): throw serial
                case .sensor(let sensor):
                    // Whatever went wrong (an error code, noise, silence) may have been a restart we did not see:
                    // initialise again before the next read.
                    initialisedGeneration = nil
                    return .failure(sensor)
                case .refused(let code, let command):
                    initialisedGeneration = nil
                    return .failure(refusal(code, command))
                case .supply(let code, let command):
                    return .failure(SensorError(.fault, "EZO \(kind.rawValue) on \(portPath): \(code.reportedOnItsOwn(consequence: "\(command) was not sent"))"))
                case .restarted(let why, let event):
                    initialisedGeneration = nil
                    restarts.append(why)
                    logger.notice("EZO circuit restarted or changed state; initialising it again", metadata: ["why": "\(why)"])
                    try awaitBoot(port, after: event)
                }
            }
        }
        if restarts.allSatisfy({ $0.hasPrefix("the reading has") }) {
            // Not restarts at all: the outputs were set again and the reading still has other fields.
            return .failure(SensorError(
                .invalidResponse,
                "the EZO \(kind.rawValue) circuit on \(portPath) answers readings with other fields than its outputs were set to (\(Self.distinct(restarts).joined(separator: "; "))): another program changing its outputs, or not an EC circuit answering; check what else uses the port"))
        }
        if restarts.allSatisfy({ $0.contains("streaming readings") }) {
            // No restart event at all: continuous mode came back right after C,0 turned it off.
            return .failure(SensorError(
                .fault,
                "the EZO \(kind.rawValue) circuit on \(portPath) keeps streaming readings after C,0 turned continuous mode off: it does not take C,0, or another program turns it on again; check what else uses the port (a circuit that streams cannot be read one reading at a time)"))
        }
        return .failure(SensorError(.fault, "the EZO circuit on \(portPath) keeps restarting (\(restarts.joined(separator: "; "))): check its power supply"))
    }

    /// Sends one command other than a read (a calibration, `Cal,?`, `Slope,?`), initialising the circuit first when needed.
    /// - Parameters:
    ///   - time: the command's processing time (1.2 s for a calibration point).
    ///   - answer: which data line is the answer; nil for commands answered only by `*OK`.
    /// - Returns: the answer line (nil for a command without one), or why the circuit failed it.
    /// - Throws: ``SerialError`` when the port failed.
    func command(
        port: SerialPort, generation: Int, _ command: String, time: Duration, answer: ((String) -> Bool)?
    ) throws(SerialError) -> Result<String?, SensorError> {
        for _ in 0..<2 {
            do throws(Interruption) {
                if initialisedGeneration != generation {
                    try initialise(port)
                    initialisedGeneration = generation
                }
                try absorbPending(port)
                if let code = supplyFault {
                    // Not sent to a circuit whose supply is out of range: a calibration point taken so is worthless.
                    // (A read is sent all the same, and fails afterwards: see read.)
                    supplyFault = nil
                    throw Interruption.supply(code, command: command)
                }
                return .success(try transact(port, command, time: time, answer: answer))
            } catch {
                switch error {
                case .port(let serial): throw serial
                case .sensor(let sensor):
                    initialisedGeneration = nil
                    return .failure(sensor)
                case .refused(let code, let command):
                    initialisedGeneration = nil
                    return .failure(refusal(code, command))
                case .supply(let code, let command):
                    return .failure(SensorError(.fault, "EZO \(kind.rawValue) on \(portPath): \(code.reportedOnItsOwn(consequence: "\(command) was not sent"))"))
                case .restarted(let why, let event):
                    initialisedGeneration = nil
                    logger.notice("EZO circuit restarted during a command; initialising it again", metadata: ["why": "\(why)", "command": "\(command)"])
                    try awaitBoot(port, after: event)
                }
            }
        }
        return .failure(SensorError(.fault, "the EZO circuit on \(portPath) restarted twice during \(command): check its power supply"))
    }

    /// The answer to a read: `R`, or with a temperature `RT,<t>` (`T,<t>` then `R` on firmware without `RT`).
    /// - Returns: the command that was answered and its answer.
    private func takeReading(_ port: SerialPort, temperature: Double?) throws(Interruption) -> (command: String, answer: String?) {
        let isReading: (String) -> Bool = { EZOParse.reading($0) != nil }
        guard let temperature, kind.compensates else {
            return ("R", try transact(port, "R", time: kind.readTime, answer: isReading, single: true))
        }
        let degrees = Self.format(temperature)
        if knowsRT {
            do throws(Interruption) {
                let answer = try transact(port, "RT,\(degrees)", time: kind.compensatedReadTime, answer: isReading, single: true)
                rtRefusals = 0
                compensation = Double(degrees)
                return ("RT,\(degrees)", answer)
            } catch .refused(.unknownCommand, _) {
                // One *ER may be a command garbled on the way: this read goes with T then R, and the next tries RT
                // again. Only several in a row say the firmware has no RT.
                rtRefusals += 1
                if rtRefusals >= Self.rtRefusalLimit {
                    knowsRT = false
                    logger.notice(
                        "The EZO circuit does not know RT (firmware from before it: refused \(rtRefusals) times in a row): sending T,<temperature> before each R until it restarts",
                        metadata: ["port": "\(portPath)", "firmware": "\(firmware ?? "?")"])
                } else {
                    logger.notice(
                        "The EZO circuit refused RT (*ER); this read sends T,<temperature> then R, the next tries RT again",
                        metadata: ["port": "\(portPath)", "firmware": "\(firmware ?? "?")", "refusals_in_a_row": "\(rtRefusals)"])
                }
            }
        }
        _ = try transact(port, "T,\(degrees)", time: EZOCircuitKind.commandTime, answer: nil)
        compensation = Double(degrees)
        return ("R", try transact(port, "R", time: kind.readTime, answer: isReading, single: true))
    }

    /// The sensor error for an error code the circuit answered `command` with.
    private func refusal(_ code: EZOErrorCode, _ command: String) -> SensorError {
        SensorError(.fault, "EZO \(kind.rawValue) on \(portPath): \(code.explanation(command: command))")
    }

    /// After `*RS` the circuit is deaf until it sends `*RE` (or `*WA`): waits for that, at most ``bootTime``, so that
    /// the initialisation that follows is heard. Other events need no wait.
    private func awaitBoot(_ port: SerialPort, after event: EZOEvent?) throws(SerialError) {
        guard event == .reset else { return }
        let until = ContinuousClock.now + Self.bootTime
        while ContinuousClock.now < until {
            for line in splitter.feed(try port.read(until: until)) {
                if case .event(let event) = EZOResponse(line: line), event == .ready || event == .woke { return }
            }
        }
        logger.notice("EZO circuit did not say it is ready within the boot time", metadata: ["port": "\(portPath)", "boot_time": "\(Self.bootTime)"])
    }

    /// Initialises the circuit (``initialiseOnce(_:)``), starting over when it restarts, wakes or says it is ready
    /// meanwhile (a command sent while it boots or sleeps is lost), at most three times.
    private func initialise(_ port: SerialPort) throws(Interruption) {
        var round = 1
        while true {
            do throws(Interruption) {
                return try initialiseOnce(port)
            } catch .restarted(let why, let event) where round < 3 {
                round += 1
                logger.debug("EZO circuit restarted while being initialised; starting over", metadata: ["why": "\(why)"])
                do throws(SerialError) { try awaitBoot(port, after: event) } catch { throw .port(error) }
            }
        }
    }

    /// Stops continuous output, learns whether response codes are on, checks the circuit is the configured kind, and
    /// selects °C on an RTD circuit, the configured outputs on an EC circuit, and mg/L alone on a DO circuit.
    ///
    /// Nothing that arrived before is examined: a reading still streamed after `C,0` is no restart here.
    private func initialiseOnce(_ port: SerialPort) throws(Interruption) {
        // A circuit fresh from the factory (or a reboot) streams a reading a second: stop that, then drop what came.
        splitter.discardPartial()
        queued.removeAll()
        port.discardInput()
        knowsRT = true
        rtRefusals = 0
        // A circuit that restarted compensates with its own setting again; one that did not keeps the last RT's, but
        // which it is cannot be told here: nothing is flagged compensated until RT or T sets it again.
        compensation = nil
        // Response codes may be off: a missing *OK is no failure here (*OK,? tells).
        _ = try transact(port, "C,0", time: EZOCircuitKind.commandTime, answer: nil, absorb: false, acknowledged: false, resendIfGarbled: true)
        settle(port, for: .milliseconds(100))
        // Learn whether *OK follows each answer: ask without waiting for one.
        responseCodes = false
        guard let codes = try transact(port, "*OK,?", time: EZOCircuitKind.commandTime, answer: { EZOParse.responseCodes($0) != nil }, absorb: false, resendIfGarbled: true),
            let enabled = EZOParse.responseCodes(codes)
        else {
            throw .sensor(SensorError(.invalidResponse, "the circuit on \(portPath) did not answer *OK,?"))
        }
        responseCodes = enabled
        settle(port, for: .milliseconds(enabled ? 50 : 0))
        guard let identity = try transact(port, "i", time: EZOCircuitKind.commandTime, answer: { EZOParse.identity($0) != nil }, absorb: false, resendIfGarbled: true),
            let (type, firmware) = EZOParse.identity(identity)
        else {
            throw .sensor(SensorError(.invalidResponse, "the circuit on \(portPath) did not say what it is (no answer to i)"))
        }
        guard let found = EZOCircuitKind(identity: type) else {
            throw .sensor(SensorError(.fault, "the device on \(portPath) says it is \"\(type)\" (firmware \(firmware)), not an EZO pH, EC, RTD, ORP or DO circuit"))
        }
        guard found == kind else {
            throw .sensor(SensorError(
                .fault,
                "the circuit on \(portPath) is an \(found) (firmware \(firmware)), but \(sensors) needs an \(kind) circuit: check which circuit is wired to this port, or change the sensor's quantity"))
        }
        self.firmware = firmware
        // C,0 is confirmed as every other setting is: a circuit that does not take it goes on streaming, and a streamed
        // line inside a read's wait is taken for its answer now and then (a tester, 2026-12-07: readings stored between
        // the faults that named the streaming). Firmware that does not know C,? is taken at its C,0.
        let continuousAnswer: String?
        do throws(Interruption) {
            continuousAnswer = try transact(
                port, "C,?", time: EZOCircuitKind.commandTime, answer: { EZOParse.continuous($0) != nil }, absorb: false, resendIfGarbled: true)
        } catch .refused(.unknownCommand, _) {
            continuousAnswer = nil
        } catch .sensor(let error) where error.kind == .timeout && !responseCodes {
            // With response codes off a firmware that does not know C,? answers nothing at all (no *ER either).
            continuousAnswer = nil
        }
        if let continuousAnswer, EZOParse.continuous(continuousAnswer) == true {
            throw .sensor(SensorError(
                .fault,
                "the EZO \(kind.rawValue) circuit on \(portPath) did not take C,0: C,? still answers \"\(continuousAnswer)\" (continuous readings on), so none is read; a circuit that streams cannot be read one reading at a time: check what else uses the port, or stop the agent and send C,0 to the circuit with a terminal program at its baud"))
        }
        switch kind {
        case .rtd:
            // With response codes off nothing says whether S,c was done: S,? does. A reading in °F or K stored as °C
            // (and sent to other circuits as their compensation) is worse than no reading.
            _ = try transact(port, "S,c", time: EZOCircuitKind.commandTime, answer: nil, absorb: false, resendIfGarbled: true)
            guard let answer = try transact(port, "S,?", time: EZOCircuitKind.commandTime, answer: { EZOParse.scale($0) != nil }, absorb: false, resendIfGarbled: true),
                let scale = EZOParse.scale(answer)
            else {
                throw .sensor(SensorError(.invalidResponse, "the RTD circuit on \(portPath) did not say its temperature scale (S,?) after S,c"))
            }
            guard scale == "c" else {
                throw .sensor(SensorError(
                    .fault,
                    "the EZO RTD circuit on \(portPath) did not take S,c (°C): S,? still answers \"\(answer)\" (readings in \(scale == "f" ? "°F" : "K")), so none is stored as °C; check the wiring (a command lost on the way; setup is tried again at every read), or stop the agent and send S,c to the circuit with a terminal program at its baud"))
            }
        case .ec:
            guard let answer = try transact(port, "O,?", time: EZOCircuitKind.commandTime, answer: { EZOParse.outputs($0) != nil }, absorb: false, resendIfGarbled: true),
                let enabled = EZOParse.outputs(answer)
            else {
                throw .sensor(SensorError(.invalidResponse, "the EC circuit on \(portPath) did not list its outputs (O,?)"))
            }
            let changes = EZOOutput.allCases.filter { enabled.contains($0) != outputs.contains($0) }.map { "O,\($0.rawValue),\(outputs.contains($0) ? 1 : 0)" }
            for change in changes {
                _ = try transact(port, change, time: EZOCircuitKind.commandTime, answer: nil, absorb: false, resendIfGarbled: true)
            }
            if !changes.isEmpty {
                // With response codes off nothing says whether the outputs changed: O,? does. A reading's fields are
                // told apart only by their order, so other outputs would put one quantity's value under another.
                guard let confirm = try transact(port, "O,?", time: EZOCircuitKind.commandTime, answer: { EZOParse.outputs($0) != nil }, absorb: false, resendIfGarbled: true),
                    let now = EZOParse.outputs(confirm)
                else {
                    throw .sensor(SensorError(.invalidResponse, "the EC circuit on \(portPath) did not list its outputs (O,?) after \(changes.joined(separator: ", "))"))
                }
                guard now == Set(outputs) else {
                    throw .sensor(SensorError(
                        .fault,
                        "the EZO EC circuit on \(portPath) did not take \(changes.joined(separator: " and ")): O,? still answers \"\(confirm)\" where \(outputs.map(\.rawValue).joined(separator: ",")) is configured, so no reading is stored; check the wiring (a command lost on the way; setup is tried again at every read), or stop the agent and send \(changes.joined(separator: ", ")) to the circuit with a terminal program at its baud"))
                }
            }
        case .dissolvedOxygen:
            // mg/L alone: with % saturation on too, every reading has two fields.
            let answer: String?
            do throws(Interruption) {
                answer = try transact(port, "O,?", time: EZOCircuitKind.commandTime, answer: { EZOParse.oxygenOutputs($0) != nil }, absorb: false, resendIfGarbled: true)
            } catch .refused(.unknownCommand, _) {
                answer = nil  // firmware without outputs to choose: mg/L only
            }
            if let enabled = answer.flatMap(EZOParse.oxygenOutputs) {
                let changes = [("%", false), ("mg", true)].filter { enabled.contains($0.0.uppercased()) != $0.1 }.map { "O,\($0.0),\($0.1 ? 1 : 0)" }
                for change in changes {
                    _ = try transact(port, change, time: EZOCircuitKind.commandTime, answer: nil, absorb: false, resendIfGarbled: true)
                }
                if !changes.isEmpty {
                    // With response codes off nothing says whether the outputs changed: O,? does. % saturation stored
                    // as mg/L is worse than no reading.
                    guard let confirm = try transact(port, "O,?", time: EZOCircuitKind.commandTime, answer: { EZOParse.oxygenOutputs($0) != nil }, absorb: false, resendIfGarbled: true),
                        let now = EZOParse.oxygenOutputs(confirm)
                    else {
                        throw .sensor(SensorError(.invalidResponse, "the DO circuit on \(portPath) did not list its outputs (O,?) after \(changes.joined(separator: ", "))"))
                    }
                    guard now == ["MG"] else {
                        throw .sensor(SensorError(
                            .fault,
                            "the EZO DO circuit on \(portPath) did not take \(changes.joined(separator: " and ")): O,? still answers \"\(confirm)\" where mg/L alone is needed, so no reading is stored (not in mg/L); check the wiring (a command lost on the way; setup is tried again at every read), or stop the agent and send \(changes.joined(separator: ", ")) to the circuit with a terminal program at its baud"))
                    }
                }
            }
        case .ph, .orp:
            break
        }
        logger.info(
            "EZO circuit ready",
            metadata: [
                "circuit": "\(kind.rawValue)", "firmware": "\(firmware)", "response_codes": "\(responseCodes)",
                "outputs": "\(outputs.map(\.rawValue).joined(separator: ","))",
            ])
    }

    /// Sends `command` and collects the answer.
    ///
    /// - Parameters:
    ///   - time: the datasheet's processing time; the answer may take `margin` longer.
    ///   - answer: which data line is the answer; nil for commands answered only by `*OK` (or nothing, with response
    ///     codes off).
    ///   - absorb: whether lines that arrived before the command are examined (a restart shows there); initialisation
    ///     discards them instead.
    ///   - acknowledged: for a command without an answer, whether a missing `*OK` (response codes on) is an error: the
    ///     command may not have been done. Only `C,0`, sent before the codes are known, does without.
    ///   - single: a read (`R`, `RT`), which the circuit answers with exactly one value line (then `*OK` with codes
    ///     on). Every answer line is collected until `*OK` arrives or, with codes off, until the whole wait is over; a
    ///     second one is proof of readings streamed or noise on the line, and fails the read: which line is the
    ///     circuit's answer cannot be told.
    ///   - resendIfGarbled: a setup command, which can be sent twice: after a garbled answer it is sent once more
    ///     before the answer is an error. A circuit at power-up may send a half line without its carriage return
    ///     (NUL NUL 0xFF 0xFF `*R`) just before its answer, which then reads as one garbled line (`*R*OK`). Never for
    ///     a read: a garbled reading is not read again, and nothing garbled is ever taken for an answer.
    /// - Returns: the answer line, or nil for a command without one.
    private func transact(
        _ port: SerialPort, _ command: String, time: Duration, answer: ((String) -> Bool)?, absorb: Bool = true, acknowledged: Bool = true,
        single: Bool = false, resendIfGarbled: Bool = false
    ) throws(Interruption) -> String? {
        if absorb { try absorbPending(port) }
        let dropped = splitter.discardPartial()
        if !dropped.isEmpty { logger.debug("EZO partial line dropped", metadata: ["bytes": "\(dropped.count)"]) }
        let start = ContinuousClock.now
        do {
            try port.write(Array((command + "\r").utf8), deadline: start + .seconds(1))
        } catch {
            throw .port(error)
        }
        let deadline = start + time + margin
        var data: String?
        /// Answer lines after the first (a read has exactly one).
        var more: [String] = []
        var sawOK = false
        /// An *OK came where the answer should have been: an empty answer line (the line splitter drops it), or the
        /// *OK of an earlier command.
        var okWithoutData = false
        var unreadable: [String] = []
        // Done: the answer (and its *OK while response codes are on), or for a command without an answer its *OK. A
        // read without response codes is never done early: a second value line may still come within its wait.
        func complete() -> Bool {
            guard answer != nil else { return sawOK }
            return data != nil && (responseCodes ? sawOK : !single)
        }
        while true {
            if complete() { break }
            // Without response codes a command without an answer is done when its processing time has passed.
            let until = (answer == nil && !responseCodes) ? start + time : deadline
            let bytes: [UInt8]
            do { bytes = try port.read(until: until) } catch { throw .port(error) }
            if bytes.isEmpty {
                if ContinuousClock.now >= until { break }
                continue
            }
            var lines = splitter.feed(bytes)[...]
            while let line = lines.popFirst() {
                if complete() {
                    queued.append(line)
                    continue
                }
                let response = EZOResponse(line: line)
                if case .data(let text) = response, text == command {
                    // The command itself coming back: a link (or adapter) that echoes what is sent. Not an answer.
                    continue
                }
                switch response {
                case .ok:
                    // An answer's *OK follows it; one before it is left over from an earlier command. Either proves the
                    // circuit's response codes are on: an *OK lost once (a bit error on the line) turned them off here,
                    // and every read would otherwise wait out its whole deadline from then on.
                    if answer == nil || data != nil { sawOK = true } else { okWithoutData = true }
                    if !responseCodes {
                        responseCodes = true
                        logger.debug("EZO response codes are on")
                    }
                case .error(let code):
                    throw .refused(code, command: command)
                case .event(let event):
                    if event.restarts {
                        // *RS and *RE may come in one chunk: the last event says whether it is still booting.
                        let last = lines.compactMap { line -> EZOEvent? in
                            if case .event(let later) = EZOResponse(line: line), later.restarts { return later }
                            return nil
                        }.last
                        throw .restarted("\(event.rawValue) during \(command)", event: last ?? event)
                    }
                case .data(let text):
                    if let answer, answer(text) {
                        if data == nil { data = text } else { more.append(text) }
                    } else if EZOParse.reading(text) == nil {
                        // A reading streamed in continuous mode (being turned off) is no answer, but it is not noise.
                        unreadable.append(text)
                    }
                case .garbage(let bytes):
                    garbageLines += 1
                    unreadable.append(Self.show(bytes))
                }
            }
        }
        if !unreadable.isEmpty {
            logger.debug("EZO lines ignored", metadata: ["command": "\(command)", "lines": "\(unreadable.prefix(3))"])
        }
        let garbled = !unreadable.isEmpty && (answer != nil ? data == nil : !sawOK && responseCodes)
        if garbled, resendIfGarbled {
            logger.debug("EZO garbled answer to a setup command; sending it once more", metadata: ["command": "\(command)"])
            return try transact(
                port, command, time: time, answer: answer, absorb: absorb, acknowledged: acknowledged, single: single, resendIfGarbled: false)
        }
        if answer != nil {
            guard let data else {
                if !unreadable.isEmpty {
                    throw .sensor(SensorError(
                        .invalidResponse,
                        "garbled answer to \(command) from the EZO \(kind.rawValue) circuit on \(portPath) (\(unreadable.count) unreadable line\(unreadable.count == 1 ? "" : "s"), first: \(unreadable[0])): check the baud rate, the wiring and a shared ground"))
                }
                if !splitter.pending.isEmpty {
                    let pending = splitter.pending
                    // Bytes outside printable ASCII are what a wrong baud rate reads (or noise); a printable half line
                    // is an answer cut short.
                    let hint = pending.allSatisfy(EZOLineSplitter.isPrintable)
                        ? "the circuit stopped mid-line: check its power and the wiring"
                        : "check the baud rate (the circuit's, factory 9600, must match baud), the wiring and a shared ground"
                    throw .sensor(SensorError(
                        .invalidResponse,
                        "incomplete answer to \(command) from the EZO \(kind.rawValue) circuit on \(portPath) (\(Self.show(pending)) without an end of line): \(hint)"))
                }
                if okWithoutData {
                    throw .sensor(SensorError(
                        .invalidResponse,
                        "the EZO \(kind.rawValue) circuit on \(portPath) answered \(command) with *OK but no value within \(ConfigTable.format(time + margin)) (an empty answer line): check the probe and its connector on the circuit"))
                }
                throw .sensor(SensorError(
                    .timeout,
                    "no answer to \(command) from the EZO circuit on \(portPath) within \(ConfigTable.format(time + margin)): check its power, that TX and RX are crossed, that it is in UART mode (LED not blue) and the baud rate"))
            }
            if responseCodes && !sawOK {
                // The answer came but no *OK after it: response codes were turned off (another program, a reset).
                responseCodes = false
                logger.debug("EZO response codes are off")
            }
            if !more.isEmpty {
                let lines = ([data] + more).prefix(4).map { "\"\($0)\"" }.joined(separator: ", ")
                throw .sensor(SensorError(
                    .invalidResponse,
                    "\(more.count + 1) value lines answered \(command) from the EZO \(kind.rawValue) circuit on \(portPath) (\(lines)), where the circuit sends one: it is streaming readings (continuous mode on again: a restart, another program, or it does not take C,0) or another device or noise is on the line; none is stored, as which one is the answer cannot be told; the circuit is initialised again before the next read (if this repeats, check what else is connected to the port and the wiring)"))
            }
            return data
        }
        if !sawOK && responseCodes {
            if !unreadable.isEmpty {
                throw .sensor(SensorError(
                    .invalidResponse,
                    "garbled answer to \(command) from the EZO \(kind.rawValue) circuit on \(portPath) (first: \(unreadable[0])): check the baud rate and the wiring"))
            }
            guard acknowledged else {
                // No *OK within the time: the circuit has response codes off (it answers nothing), or it is not there
                // at all, which the next command that must answer finds out.
                responseCodes = false
                return nil
            }
            throw .sensor(SensorError(
                .timeout,
                "no *OK to \(command) from the EZO \(kind.rawValue) circuit on \(portPath) within \(ConfigTable.format(time + margin)): it may not have been done; check its power and wiring, then send it again"))
        }
        return nil
    }

    /// Examines what the circuit sent since the last command: a restart event, or readings streamed in continuous mode
    /// (the circuit restarted with factory settings), mean it must be initialised again; `*UV` or `*OV` sent on its own
    /// is logged and kept in ``supplyFault`` for the next command to fail, and `*ER` to no command of ours is logged.
    /// Reads what is there, for at most a quarter of a second (a line that never falls silent is left to the command's
    /// answer to show).
    private func absorbPending(_ port: SerialPort) throws(Interruption) {
        var lines = queued
        queued.removeAll()
        var restart: (why: String, event: EZOEvent?)?
        let until = ContinuousClock.now + .milliseconds(250)
        while true {
            if lines.isEmpty {
                let bytes: [UInt8]
                do { bytes = try port.read(until: .now) } catch { throw .port(error) }
                if bytes.isEmpty || ContinuousClock.now >= until { break }
                lines = splitter.feed(bytes)
            }
            let batch = lines
            lines.removeAll()
            for line in batch {
                switch EZOResponse(line: line) {
                case .ok:
                    responseCodes = true
                case .event(let event) where event.restarts:
                    // The last event counts: `*RS` then `*RE` is a circuit that is up again.
                    restart = (restart?.why ?? "the circuit sent \(event.rawValue)", event)
                case .data(let text) where EZOParse.reading(text) != nil:
                    if restart == nil { restart = ("the circuit is streaming readings (continuous mode is on again)", nil) }
                case .error(let code):
                    let metadata: Logger.Metadata = ["circuit": "\(kind.rawValue)", "port": "\(portPath)", "code": "\(code.rawValue)"]
                    if code == .unknownCommand {
                        // Answers no command of ours (each had its answer): bytes the circuit took for a command, noise
                        // on its receive line or another program writing to the port. Its readings are not affected.
                        logger.warning(
                            "EZO circuit sent *ER between commands: it received something that is no command (noise on its RX line, or another program writing to the port); check the wiring",
                            metadata: metadata)
                    } else {
                        logger.warning(
                            "EZO circuit reported its supply voltage out of range on its own (*UV under, *OV over); its next reading is not stored: check its power supply",
                            metadata: metadata.merging(["meaning": "\(code.explanation(command: ""))"]) { $1 })
                        supplyFault = code
                    }
                case .garbage:
                    garbageLines += 1
                default:
                    break
                }
            }
        }
        if let restart { throw .restarted(restart.why, event: restart.event) }
    }

    /// Reads and discards what arrives for `duration` (readings streamed while continuous mode was being turned off).
    private func settle(_ port: SerialPort, for duration: Duration) {
        let until = ContinuousClock.now + duration
        while ContinuousClock.now < until {
            guard let bytes = try? port.read(until: until), !bytes.isEmpty else { continue }
        }
        port.discardInput()
        splitter.discardPartial()
        queued.removeAll()
    }

    /// `21.437` → "21.44": two decimals are what the circuits take. Callers pass plausible temperatures; anything
    /// else is clamped rather than allowed to overflow.
    static func format(_ temperature: Double) -> String {
        let bounded = temperature.isFinite ? min(max(temperature, -1_000), 10_000) : 25
        let hundredths = Int((bounded * 100).rounded())
        let sign = hundredths < 0 ? "-" : ""
        let magnitude = abs(hundredths)
        let fraction = magnitude % 100
        return "\(sign)\(magnitude / 100).\(fraction < 10 ? "0" : "")\(fraction)"
    }

    static func show(_ bytes: [UInt8]) -> String {
        if bytes.allSatisfy(EZOLineSplitter.isPrintable) { return "\"\(String(decoding: bytes, as: UTF8.self))\"" }
        return bytes.prefix(12).map { String($0, radix: 16, uppercase: false) }.map { $0.count == 1 ? "0" + $0 : $0 }
            .joined(separator: " ") + (bytes.count > 12 ? " …" : "")
    }
}

extension EZOSession {
    /// `texts` without repeats, in their first order ("the reading has 1 field, 2 expected" once, not per round).
    static func distinct(_ texts: [String]) -> [String] {
        var seen: Set<String> = []
        return texts.filter { seen.insert($0).inserted }
    }
}
