import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// An Atlas Scientific EZO circuit in UART mode on a real pseudo-terminal, written from the datasheets (pH, EC, RTD,
/// ORP, DO): the driver opens ``path`` (a symlink to the pty's slave, like a `/dev/serial/by-id/` link) and talks to it
/// exactly as to the hardware.
///
/// What it does as the circuits do: commands end with a carriage return and are case-insensitive; answers end with a
/// carriage return and are followed by `*OK` while response codes are on (`*OK,0|1|?`); it starts in continuous mode
/// (a reading a second) until `C,0`; `i`, `R` (with the circuit's processing time), `RT,<t>`, `T`, `Cal`, `Slope,?`,
/// `O,` (EC outputs, listed in the order EC, TDS, S, SG), `S,` (RTD scale), `Status`, `Sleep`; `*ER` for anything else.
///
/// Faults a test can inject: an unprompted reboot (`*RS`, deaf while it boots, then `*RE`, or `*WA`, with the settings
/// back to factory), an error code, `*SL` (asleep until a character wakes it, which answers `*WA` and is not run), noise
/// before an answer, run into it, or instead of it, half an answer, silence (on reads, or on any other command), a wrong
/// baud (answers come out as noise), a code sent on its own after an answer (`*UV`), firmware without `RT`, DO outputs
/// other than mg/L, and unplug/replug (the pty goes
/// away with its link; a new pty appears behind the same link, as a USB replug gives a new tty behind the same by-id
/// link).
public final class EZOSimulator: Sendable {
    public enum Circuit: String, Sendable, CaseIterable {
        case ph = "pH"
        case ec = "EC"
        case rtd = "RTD"
        case orp = "ORP"
        case dissolvedOxygen = "DO"

        /// Processing time of `R` (feastorg/ezo-driver ezo_product.c).
        var readTime: Double {
            switch self {
            case .ph, .orp: 0.9
            case .ec, .dissolvedOxygen: 0.6
            case .rtd: 0.6
            }
        }

        var compensates: Bool { self == .ph || self == .ec || self == .dissolvedOxygen }
    }

    /// What happens to the next read (`R` or `RT`).
    public enum Fault: Sendable, Hashable {
        /// The read is answered with this line instead (`*ER`, `*OV`, `*UV`, `*DONE`; `*SL` also puts the circuit to
        /// sleep, as the `Sleep` command does).
        case respond(String)
        /// Noise bytes and a carriage return come before the normal answer.
        case garbageBefore([UInt8])
        /// Noise bytes run straight into the normal answer, without a line end between them (a glitch on the line as
        /// the circuit starts to send).
        case noisePrefix([UInt8])
        /// Noise bytes (and a carriage return) replace the answer.
        case garbageOnly([UInt8])
        /// An empty line where the value should be, then `*OK` (with response codes on).
        case emptyAnswer
        /// Half of the answer, without its carriage return, then nothing.
        case partial
        /// Noise bytes without any line end, then nothing (a wrong baud mangles the carriage return too).
        case noiseWithoutEnd([UInt8])
        /// No answer at all.
        case silence
        /// The normal answer, with its `*OK` garbled on the line (`*O\u{FB}K`: a bit error).
        case garbledOK
        /// This line (a stray reading, another device's answer) halfway through the processing time, then the normal
        /// answer.
        case lineBefore(String)
        /// The normal answer (and its `*OK`), then this line on its own, between commands: `*UV` or `*OV` as a circuit
        /// whose supply is out of range reports it, `*ER` for noise on its receive line.
        case lineAfter(String)
    }

    /// One answer the circuit gave to a read.
    public struct Served: Sendable, Hashable {
        /// The reading line as sent (`6.02`, `1413.0,707`).
        public var line: String
        /// The temperature it was compensated with (`RT,<t>`), nil for `R`.
        public var temperature: Double?
    }

    struct Settings: Sendable {
        var continuous = true
        var responseCodes = true
        var temperature = 25.0
        var outputs: Set<String> = ["EC"]
        /// A DO circuit's outputs (`MG`, `%`): mg/L only from the factory.
        var oxygenOutputs: Set<String> = ["MG"]
        /// `O,?` answered `?,O,%,mg`, the form the DO datasheet prints (and some firmware sends), not `?O,mg,%`.
        var outputsPrefixWithComma = false
        var scale = "c"
        var calibrationPoints = 0
        var asleep = false
    }

    enum Action: Sendable {
        case reboot(String, boot: Double)
        case unplug
        case replug
    }

    struct State: Sendable {
        var settings = Settings()
        var master: Int32 = -1
        var slave: Int32 = -1
        var plugged = false
        var stopped = false
        var actions: [Action] = []
        var faults: [Fault] = []
        /// Faults for the next command whose name (the part before the first comma) is the key, upper case.
        var commandFaults: [String: [Fault]] = [:]
        /// Whether `RT,<t>` exists (firmware before it answers `*ER`).
        var knowsRT = true
        /// Commands (keys as for ``commandFaults``) the circuit answers as usual but does not do, every time.
        var ignored: Set<String> = []
        /// Whether `C,0` is done (a circuit that keeps streaming ignores it).
        var takesContinuousOff = true
        /// Whether streamed readings come between commands too, or only within reads (a stream in phase with them).
        var streamsBetweenCommands = true
        /// Every command line sent back before it is handled (a link or adapter with echo on).
        var echo = false
        /// Whether calibration points are kept (`Cal,?` counts them); not: acknowledged and forgotten.
        var keepsCalibrations = true
        var served: [Served] = []
        var commands: [String] = []
        var reads = 0
        var baudMismatch = false
        /// The baud the circuit runs at; nil: whatever the port is set to.
        var baud: Int?
        var lastAnswerAt = ContinuousClock.now
    }

    public let circuit: Circuit
    /// The stable path the driver opens (a symlink re-pointed at every replug).
    public let path: String
    public let firmware: String
    /// Multiplies every processing time (1: the datasheet's; tests that make many reads use less).
    public let timeScale: Double
    private let values: @Sendable (Int, Double?) -> Double
    private let state = Mutex(State())

    /// - Parameters:
    ///   - circuit: which circuit it is.
    ///   - path: where the link to the pty goes (its directory must exist).
    ///   - firmware: what `i` reports.
    ///   - timeScale: factor for processing times.
    ///   - values: the reading for the n-th read (from 0), given the compensation temperature (nil for `R`).
    public init(
        _ circuit: Circuit, path: String, firmware: String = "2.16", timeScale: Double = 1,
        values: @escaping @Sendable (Int, Double?) -> Double
    ) throws {
        self.circuit = circuit
        self.path = path
        self.firmware = firmware
        self.timeScale = timeScale
        self.values = values
        try state.withLock { state in try Self.plug(&state, path: path) }
        let thread = Thread { [self] in self.loop() }
        thread.name = "ezo-simulator"
        thread.start()
    }

    /// Stops the circuit and removes its pty and link. Call it when done: the circuit's thread keeps it alive until then.
    public func stop() {
        state.withLock { state in
            state.stopped = true
        }
    }

    // MARK: What tests do

    /// The next reads meet these faults, one each, in order.
    public func inject(_ faults: Fault...) {
        inject(contentsOf: faults)
    }

    /// The next reads meet these faults, one each, in order.
    public func inject(contentsOf faults: [Fault]) {
        state.withLock { $0.faults.append(contentsOf: faults) }
    }

    /// The next command named `name` (`CAL`, `SLOPE`, `O`: the part before the first comma, any case; or the first two
    /// fields, `CAL,LOW`, for that command only) meets `fault` instead of being done: `.silence` (no answer at all),
    /// `.respond(code)` (that line only); or, done as usual, `.noisePrefix(bytes)`: those bytes, without a line end,
    /// as the command arrives, so that the answer runs into them (a half line a circuit sends at power-up).
    public func injectCommand(_ name: String, _ fault: Fault) {
        state.withLock { $0.commandFaults[name.uppercased(), default: []].append(fault) }
    }

    /// Every command named `name` (as for ``injectCommand(_:_:)``: `S,C`, `O,%`) is answered as usual (`*OK` with codes
    /// on, nothing with them off) but not done: a setting the circuit does not take.
    public func ignore(_ name: String) {
        state.withLock { _ = $0.ignored.insert(name.uppercased()) }
    }

    /// Whether `C,0` turns continuous mode off; false: acknowledged, and the readings keep streaming.
    public func setTakesContinuousOff(_ on: Bool) {
        state.withLock { $0.takesContinuousOff = on }
    }

    /// Whether streamed readings also come between commands; false: only within the processing time of reads, where
    /// a stream of one a second falls into reads of most of a second.
    public func setStreamsBetweenCommands(_ on: Bool) {
        state.withLock { $0.streamsBetweenCommands = on }
    }

    /// Whether every command line comes back before its answer (a link or adapter that echoes).
    public func setEcho(_ on: Bool) {
        state.withLock { $0.echo = on }
    }

    /// Whether calibration points are kept; false: acknowledged as usual, but `Cal,?` does not count them.
    public func setKeepsCalibrations(_ on: Bool) {
        state.withLock { $0.keepsCalibrations = on }
    }

    /// Sets an RTD circuit's scale (`c`, `k`, `f`), as `S,f` from another program would.
    public func setScale(_ scale: String) {
        state.withLock { $0.settings.scale = scale.lowercased() }
    }

    /// Whether the circuit knows `RT,<t>` (firmware from before it answers `*ER`, and takes `T,<t>` then `R`).
    public func setKnowsRT(_ on: Bool) {
        state.withLock { $0.knowsRT = on }
    }

    /// Sets an EC circuit's outputs (`EC`, `TDS`, `S`, `SG`), as `O,…,1` from another program would.
    public func setConductivityOutputs(_ outputs: Set<String>) {
        state.withLock { $0.settings.outputs = outputs }
    }

    /// Sets a DO circuit's outputs (`MG`, `%`), as `O,mg,1` / `O,%,1` from another program would.
    public func setOxygenOutputs(_ outputs: Set<String>) {
        state.withLock { $0.settings.oxygenOutputs = outputs }
    }

    /// Answers `O,?` as `?,O,…` (the DO datasheet's form) rather than `?O,…`; a DO circuit lists `%` before `mg` then.
    public func setOutputsPrefixWithComma(_ on: Bool) {
        state.withLock { $0.settings.outputsPrefixWithComma = on }
    }

    /// Answers come out as noise, as when the circuit runs at another baud than the port.
    public func setBaudMismatch(_ on: Bool) {
        state.withLock { $0.baudMismatch = on }
    }

    /// Makes the circuit run at `baud`: while the port is set to another speed (the pty's settings, which the driver
    /// sets on its side), answers come out as noise. nil: it answers at any speed.
    public func setBaud(_ baud: Int?) {
        state.withLock { $0.baud = baud }
    }

    /// Sets what a factory-fresh circuit would not have: response codes on or off.
    public func setResponseCodes(_ on: Bool) {
        state.withLock { $0.settings.responseCodes = on }
    }

    /// Reboots unprompted: `*RS`, settings back to factory (continuous mode on, response codes on), then after `boot`
    /// seconds (times ``timeScale``) of deafness `announce` (`*RE`, or `*WA`). Returns when the circuit is up again.
    public func reboot(announce: String = "*RE", boot: Double = 0.2) async {
        await perform(.reboot(announce, boot: boot))
    }

    /// Pulls the adapter: the pty closes (the driver's reads fail with EIO or a hang-up) and the link disappears.
    /// Waits until no read is being answered and the last answer had time to be read, so that nothing served is lost.
    public func unplug() async {
        await perform(.unplug)
    }

    /// Plugs it back in: a new pty behind the same link, with the circuit's settings kept (it was only the adapter).
    public func replug() async {
        await perform(.replug)
    }

    /// Every answer to a read, in order.
    public var served: [Served] { state.withLock { $0.served } }
    /// Every command received, in order, as sent (without the carriage return).
    public var commands: [String] { state.withLock { $0.commands } }
    /// Whether continuous mode is on.
    public var continuous: Bool { state.withLock { $0.settings.continuous } }
    /// Which EC outputs are on.
    public var outputs: Set<String> { state.withLock { $0.settings.outputs } }
    /// Which DO outputs are on.
    public var oxygenOutputs: Set<String> { state.withLock { $0.settings.oxygenOutputs } }
    /// The temperature last set by `T` or `RT`.
    public var temperature: Double { state.withLock { $0.settings.temperature } }

    private func perform(_ action: Action) async {
        state.withLock { $0.actions.append(action) }
        while state.withLock({ !$0.actions.isEmpty && !$0.stopped }) {
            try? await Task.sleep(for: .milliseconds(10))
        }
    }

    // MARK: The pty

    private static func plug(_ state: inout State, path: String) throws {
        let (master, slavePath) = try PseudoTerminal.open(nonBlocking: true)
        // Hold the slave open too: the master then never sees a hang-up when the driver closes and reopens its side.
        let slave = open(slavePath, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC)
        guard slave >= 0 else {
            close(master)
            throw POSIXError(.EIO)
        }
        var options = termios()
        tcgetattr(slave, &options)
        cfmakeraw(&options)
        cfsetispeed(&options, speed_t(B9600))
        cfsetospeed(&options, speed_t(B9600))
        tcsetattr(slave, TCSANOW, &options)
        // Re-point the link atomically, as udev does.
        let temporary = path + ".new"
        unlink(temporary)
        guard symlink(slavePath, temporary) == 0, rename(temporary, path) == 0 else {
            close(slave)
            close(master)
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        state.master = master
        state.slave = slave
        state.plugged = true
    }

    private static func unplug(_ state: inout State, path: String) {
        unlink(path)
        if state.master >= 0 { close(state.master) }
        if state.slave >= 0 { close(state.slave) }
        state.master = -1
        state.slave = -1
        state.plugged = false
    }

    // MARK: The circuit

    private func loop() {
        var input: [UInt8] = []
        var nextStream = ContinuousClock.now + .seconds(1)
        while true {
            let (stopped, master) = state.withLock { ($0.stopped, $0.master) }
            if stopped { break }
            if runActions(input: &input, nextStream: &nextStream) { continue }
            guard master >= 0 else {
                usleep(10_000)
                continue
            }
            var request = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
            let ready = poll(&request, 1, 20)
            if ready > 0, request.revents & Int16(POLLIN) != 0 {
                var buffer = [UInt8](repeating: 0, count: 256)
                let count = buffer.withUnsafeMutableBytes { Glibc.read(master, $0.baseAddress, $0.count) }
                if count > 0 { input.append(contentsOf: buffer[0..<count]) }
            }
            while let end = input.firstIndex(where: { $0 == 0x0D || $0 == 0x0A }) {
                let line = String(decoding: input[..<end], as: UTF8.self)
                input.removeSubrange(...end)
                if line.isEmpty { continue }
                if state.withLock({ $0.echo }) { sendRaw(Array((line + "\r").utf8)) }
                handle(line)
            }
            let continuous = state.withLock { $0.settings.continuous && !$0.settings.asleep && $0.streamsBetweenCommands }
            if continuous, ContinuousClock.now >= nextStream {
                nextStream = ContinuousClock.now + .seconds(1)
                let value = format(values(-1, nil))
                send([value])
            }
        }
        state.withLock { Self.unplug(&$0, path: path) }
    }

    /// Runs a queued reboot, unplug or replug; returns whether it did.
    private func runActions(input: inout [UInt8], nextStream: inout ContinuousClock.Instant) -> Bool {
        guard let action = state.withLock({ $0.actions.first }) else { return false }
        switch action {
        case .reboot(let announce, let boot):
            sendRaw(Array("*RS\r".utf8))
            state.withLock { $0.settings = Settings() }
            usleep(UInt32(boot * 1_000_000 * timeScale))
            // Deaf while it boots: what was sent meanwhile is lost.
            state.withLock { state in
                guard state.master >= 0 else { return }
                var buffer = [UInt8](repeating: 0, count: 256)
                while buffer.withUnsafeMutableBytes({ Glibc.read(state.master, $0.baseAddress, $0.count) }) > 0 {}
            }
            input.removeAll()
            sendRaw(Array("\(announce)\r".utf8))
            nextStream = ContinuousClock.now + .seconds(1)
        case .unplug:
            // Let the driver read the last answer before the tty goes.
            while true {
                let since = state.withLock { ContinuousClock.now - $0.lastAnswerAt }
                if since >= .milliseconds(300) { break }
                usleep(20_000)
            }
            state.withLock { Self.unplug(&$0, path: path) }
            input.removeAll()
        case .replug:
            let path = self.path
            state.withLock { state in
                if !state.plugged { try? Self.plug(&state, path: path) }
            }
        }
        state.withLock { _ = $0.actions.removeFirst() }
        return true
    }

    private func handle(_ line: String) {
        state.withLock { $0.commands.append(line) }
        let asleep = state.withLock { state -> Bool in
            let was = state.settings.asleep
            state.settings.asleep = false
            return was
        }
        if asleep {
            // Any character wakes the circuit; the command that woke it is not run.
            sendRaw(Array("*WA\r".utf8))
            return
        }
        let fields = line.split(separator: ",", omittingEmptySubsequences: false).map { String($0).uppercased() }
        let command = fields[0]
        let generic = 0.3
        let commandFault = state.withLock { state -> Fault? in
            for key in (fields.count > 1 ? ["\(command),\(fields[1])", command] : [command]) {
                guard var queued = state.commandFaults[key], !queued.isEmpty else { continue }
                let fault = queued.removeFirst()
                state.commandFaults[key] = queued
                return fault
            }
            return nil
        }
        if case .silence? = commandFault { return }
        if case .respond(let code)? = commandFault { return send([code]) }
        if case .noisePrefix(let noise)? = commandFault { sendRaw(noise) }
        let ignored = state.withLock { state in
            (fields.count > 1 ? ["\(command),\(fields[1])", command] : [command]).contains { state.ignored.contains($0) }
        }
        if ignored { return answer([], after: generic) }
        switch (command, fields.count) {
        case ("I", 1):
            answer(["?I,\(circuit.rawValue),\(firmware)"], after: generic)
        case ("R", 1):
            read(temperature: nil)
        case ("RT", 2) where circuit.compensates && state.withLock({ $0.knowsRT }):
            guard let t = Double(fields[1]) else { return error(after: generic) }
            read(temperature: t)
        case ("T", 2) where circuit.compensates:
            if fields[1] == "?" {
                let t = state.withLock { $0.settings.temperature }
                answer(["?T,\(String(format: "%.2f", t))"], after: generic)
            } else if let t = Double(fields[1]) {
                state.withLock { $0.settings.temperature = t }
                answer([], after: generic)
            } else {
                error(after: generic)
            }
        case ("C", 2):
            switch fields[1] {
            case "?":
                let on = state.withLock { $0.settings.continuous }
                answer(["?C,\(on ? 1 : 0)"], after: generic)
            case "0", "1":
                state.withLock { state in
                    if fields[1] == "1" || state.takesContinuousOff { state.settings.continuous = fields[1] == "1" }
                }
                answer([], after: generic)
            default: error(after: generic)
            }
        case ("*OK", 2):
            switch fields[1] {
            case "?":
                let on = state.withLock { $0.settings.responseCodes }
                answer(["?*OK,\(on ? 1 : 0)"], after: generic)
            case "0", "1":
                state.withLock { $0.settings.responseCodes = fields[1] == "1" }
                answer([], after: generic)
            default: error(after: generic)
            }
        case ("CAL", _):
            calibrate(Array(fields.dropFirst()))
        case ("SLOPE", 2) where circuit == .ph && fields[1] == "?":
            answer(["?Slope,99.7,100.3,-0.89"], after: generic)
        case ("O", 2) where circuit == .ec && fields[1] == "?":
            let (on, comma) = state.withLock { ($0.settings.outputs, $0.settings.outputsPrefixWithComma) }
            let listed = ["EC", "TDS", "S", "SG"].filter { on.contains($0) }
            answer([(comma ? "?,O," : "?O,") + (listed.isEmpty ? "No output" : listed.joined(separator: ","))], after: generic)
        case ("O", 3) where circuit == .ec && ["EC", "TDS", "S", "SG"].contains(fields[1]) && ["0", "1"].contains(fields[2]):
            state.withLock { state in
                if fields[2] == "1" { state.settings.outputs.insert(fields[1]) } else { state.settings.outputs.remove(fields[1]) }
            }
            answer([], after: generic)
        case ("O", 2) where circuit == .dissolvedOxygen && fields[1] == "?":
            let (on, comma) = state.withLock { ($0.settings.oxygenOutputs, $0.settings.outputsPrefixWithComma) }
            let listed = (comma ? ["%", "mg"] : ["mg", "%"]).filter { on.contains($0.uppercased()) }
            let prefix = comma ? "?,O," : "?O,"
            answer([prefix + (listed.isEmpty ? "No output" : listed.joined(separator: ","))], after: generic)
        case ("O", 3) where circuit == .dissolvedOxygen && ["MG", "%"].contains(fields[1]) && ["0", "1"].contains(fields[2]):
            state.withLock { state in
                if fields[2] == "1" { state.settings.oxygenOutputs.insert(fields[1]) } else { state.settings.oxygenOutputs.remove(fields[1]) }
            }
            answer([], after: generic)
        case ("S", 2) where circuit == .rtd:
            if fields[1] == "?" {
                let scale = state.withLock { $0.settings.scale }
                answer(["?S,\(scale)"], after: generic)
            } else if ["C", "K", "F"].contains(fields[1]) {
                state.withLock { $0.settings.scale = fields[1].lowercased() }
                answer([], after: generic)
            } else {
                error(after: generic)
            }
        case ("STATUS", 1):
            answer(["?Status,P,5.038"], after: generic)
        case ("SLEEP", 1):
            state.withLock { $0.settings.asleep = true }
            sendRaw(Array("*SL\r".utf8))
        default:
            error(after: generic)
        }
    }

    private func calibrate(_ arguments: [String]) {
        let time = 1.2
        if arguments != ["?"], !state.withLock({ $0.keepsCalibrations }) {
            // Acknowledged, and forgotten.
            return answer([], after: time)
        }
        switch (circuit, arguments.first, arguments.count) {
        case (_, "?", 1):
            let points = state.withLock { $0.settings.calibrationPoints }
            answer(["?Cal,\(points)"], after: 0.3)
        case (_, "CLEAR", 1):
            state.withLock { $0.settings.calibrationPoints = 0 }
            answer([], after: 0.3)
        case (.ph, "MID", 2) where Double(arguments[1]) != nil:
            // Mid-point calibration clears the others.
            state.withLock { $0.settings.calibrationPoints = 1 }
            answer([], after: time)
        case (.ph, "LOW", 2) where Double(arguments[1]) != nil, (.ph, "HIGH", 2) where Double(arguments[1]) != nil:
            state.withLock { $0.settings.calibrationPoints = min(3, max(1, $0.settings.calibrationPoints) + 1) }
            answer([], after: time)
        case (.ec, "DRY", 1):
            state.withLock { $0.settings.calibrationPoints = 0 }
            answer([], after: time)
        case (.ec, "LOW", 2) where Double(arguments[1]) != nil, (.ec, "HIGH", 2) where Double(arguments[1]) != nil:
            state.withLock { $0.settings.calibrationPoints = min(2, $0.settings.calibrationPoints + 1) }
            answer([], after: time)
        case (.ec, _, 1) where Double(arguments[0]) != nil, (.rtd, _, 1) where Double(arguments[0]) != nil,
            (.orp, _, 1) where Double(arguments[0]) != nil, (.dissolvedOxygen, _, 1) where Double(arguments[0]) != nil:
            state.withLock { $0.settings.calibrationPoints = 1 }
            answer([], after: time)
        default:
            error(after: 0.3)
        }
    }

    private func read(temperature: Double?) {
        let (fault, index, settings) = state.withLock { state -> (Fault?, Int, Settings) in
            let fault = state.faults.isEmpty ? nil : state.faults.removeFirst()
            if let temperature { state.settings.temperature = temperature }
            return (fault, state.reads, state.settings)
        }
        let time = temperature == nil ? circuit.readTime : 0.9
        let value = values(index, temperature)
        var fields: [String]
        if circuit == .ec {
            fields = []
            if settings.outputs.contains("EC") { fields.append(format(value)) }
            if settings.outputs.contains("TDS") { fields.append(String(Int((value * 0.5).rounded()))) }
            if settings.outputs.contains("S") { fields.append(String(format: "%.2f", value / 1000 * 0.55)) }
            if settings.outputs.contains("SG") { fields.append("1.000") }
            if fields.isEmpty { fields = ["No output"] }
        } else if circuit == .dissolvedOxygen {
            // mg/L, then % saturation, of those on.
            fields = []
            if settings.oxygenOutputs.contains("MG") { fields.append(format(value)) }
            if settings.oxygenOutputs.contains("%") { fields.append(String(format: "%.1f", value * 11)) }
            if fields.isEmpty { fields = ["No output"] }
        } else {
            fields = [format(value)]
        }
        let line = fields.joined(separator: ",")
        switch fault {
        case .none:
            if settings.continuous {
                // Still streaming (C,0 not taken): a streamed reading falls into the processing time, as one a second
                // does into a read of most of a second.
                pause(time / 2)
                send([format(values(-1, nil))])
                pause(time / 2)
            } else {
                pause(time)
            }
            // Recorded before the answer goes out: a driver that has read the answer must find it served.
            state.withLock { state in
                state.reads += 1
                state.served.append(Served(line: line, temperature: temperature))
            }
            answer([line], after: 0)
        case .respond(let code)?:
            pause(time)
            if code.uppercased() == "*SL" { state.withLock { $0.settings.asleep = true } }
            sendRaw(Array("\(code)\r".utf8))
        case .garbageBefore(let noise)?:
            pause(time)
            sendRaw(noise + [0x0D])
            state.withLock { state in
                state.reads += 1
                state.served.append(Served(line: line, temperature: temperature))
            }
            answer([line], after: 0)
        case .noisePrefix(let noise)?:
            pause(time)
            state.withLock { state in
                state.reads += 1
                state.served.append(Served(line: line, temperature: temperature))
            }
            let codes = state.withLock { $0.settings.responseCodes }
            sendRaw(noise + Array((line + "\r" + (codes ? "*OK\r" : "")).utf8))
        case .garbageOnly(let noise)?:
            pause(time)
            sendRaw(noise + [0x0D])
        case .emptyAnswer?:
            pause(time)
            answer([""], after: 0)
        case .partial?:
            pause(time)
            sendRaw(Array(line.utf8.prefix(max(1, line.utf8.count / 2))))
        case .noiseWithoutEnd(let noise)?:
            pause(time)
            sendRaw(noise)
        case .silence?:
            break
        case .garbledOK?:
            pause(time)
            state.withLock { state in
                state.reads += 1
                state.served.append(Served(line: line, temperature: temperature))
            }
            sendRaw(Array((line + "\r*O").utf8) + [0xFB] + Array("K\r".utf8))
        case .lineAfter(let code)?:
            pause(time)
            state.withLock { state in
                state.reads += 1
                state.served.append(Served(line: line, temperature: temperature))
            }
            answer([line], after: 0)
            usleep(10_000)
            send([code])
        case .lineBefore(let stray)?:
            pause(time / 2)
            send([stray])
            pause(time / 2)
            state.withLock { state in
                state.reads += 1
                state.served.append(Served(line: line, temperature: temperature))
            }
            answer([line], after: 0)
        }
    }

    private func format(_ value: Double) -> String {
        switch circuit {
        case .ec: String(format: "%.1f", value)
        case .orp: String(format: "%.1f", value)
        default: String(format: "%.3f", value)
        }
    }

    private func pause(_ seconds: Double) {
        if seconds > 0 { usleep(UInt32(seconds * timeScale * 1_000_000)) }
    }

    private func error(after seconds: Double) {
        pause(seconds)
        sendRaw(Array("*ER\r".utf8))
    }

    /// Sends `lines` after the processing time, then `*OK` when response codes are on.
    private func answer(_ lines: [String], after seconds: Double) {
        pause(seconds)
        let codes = state.withLock { $0.settings.responseCodes }
        send(lines + (codes ? ["*OK"] : []))
    }

    /// The speed the other end set on the pseudo-terminal (Linux reports the slave's settings through the master).
    static func portBaud(_ master: Int32) -> Int? {
        var options = termios()
        guard tcgetattr(master, &options) == 0 else { return nil }
        let speeds: [(speed_t, Int)] = [
            (speed_t(B1200), 1200), (speed_t(B2400), 2400), (speed_t(B4800), 4800), (speed_t(B9600), 9600),
            (speed_t(B19200), 19200), (speed_t(B38400), 38400), (speed_t(B57600), 57600), (speed_t(B115200), 115_200),
            (speed_t(B230400), 230_400),
        ]
        let speed = cfgetospeed(&options)
        return speeds.first { $0.0 == speed }?.1
    }

    private func send(_ lines: [String]) {
        guard !lines.isEmpty else { return }
        sendRaw(Array(lines.map { $0 + "\r" }.joined().utf8))
    }

    private func sendRaw(_ bytes: [UInt8]) {
        state.withLock { state in
            guard state.master >= 0 else { return }
            var bytes = bytes
            if state.baudMismatch || (state.baud != nil && Self.portBaud(state.master) != state.baud) {
                // At the wrong speed every byte arrives as something else.
                bytes = bytes.map { $0 == 0x0D ? 0x0D : ($0 &* 7) | 0x80 }
            }
            var offset = 0
            var attempts = 0
            while offset < bytes.count, attempts < 100 {
                let written = bytes[offset...].withUnsafeBytes { Glibc.write(state.master, $0.baseAddress, $0.count) }
                if written > 0 { offset += written } else { attempts += 1; usleep(1000) }
            }
            state.lastAnswerAt = ContinuousClock.now
        }
    }
}
