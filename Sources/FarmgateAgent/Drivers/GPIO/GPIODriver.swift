import FarmgateSupport
import FarmgateWire
import Logging
import Synchronization

/// A GPIO input through libgpiod: a float switch or leak sensor (`quantity = "state"`, debounced), or a flow meter's
/// pulses (`quantity = "flow"` in L/min over each interval, `quantity = "count"` for the running pulse count).
///
/// The line is watched on a thread of its own from the moment the driver is built, so that no edge is missed between
/// reads; each read answers from what the watcher saw. A flow and a count sensor may name the same line (they share its
/// watcher); any other second use of a line is refused by the configuration check. A missing chip or line is not a
/// configuration error: the sensor reads `disconnected` and the line is requested again with backoff.
///
/// A state input streams (``StreamingSensorDriver``): every debounced change is stored as it happens, stamped with the
/// time of the kernel's edge event, plus the unchanged state every `heartbeat`; its `interval` and `deadband` do not
/// apply. Flow and count sensors are read every `interval`; the running count continues across restarts of the agent
/// from a small state file beside the buffer (``GPIOCountStore``).
public final class GPIODriver: StreamingSensorDriver {
    static let optionKeys: Set<String> = [
        "chip", "line", "active_low", "bias", "debounce", "edge", "pulses_per_litre", "backend", "events_file",
    ]

    public static let description = withIgnoredKeys(DriverDescription(
        kind: "gpio",
        summary: "A GPIO input through libgpiod: float or leak switch (state, debounced) or flow-meter pulses (flow in L/min, count).",
        optionKeys: optionKeys,
        sampleConfiguration: """
            [[sensor]]
            id = "tank1.level_low"
            driver = "gpio"
            quantity = "state"        # 1 = active; "flow" (L/min) and "count" (pulses) count edges instead
            chip = "gpiochip0"        # name, number or /dev path (`gpiodetect`)
            line = 17                 # offset or line name such as "GPIO17" (`gpioinfo`)
            active_low = true         # a switch that pulls the line to ground reads 1 when closed
            bias = "pull_up"          # as_is, pull_up, pull_down, disable
            debounce = "50ms"         # every change held this long is stored, at the time of its edge...
            heartbeat = "15m"         # ...and the unchanged state every 15 minutes
            # flow meters: quantity = "flow", pulses_per_litre = 450, edge = "rising", debounce = "1ms", interval = "10s"
            # (quantity = "count" keeps its running count across restarts, beside the buffer)
            """,
        validate: { configuration throws(ConfigurationError) in _ = try Options(configuration) },
        claims: { configuration throws(ConfigurationError) in try Options(configuration).claims },
        make: { configuration, context in
            try GPIODriver(
                configuration: configuration, logger: context.logger,
                countFile: context.stateFilePrefix.map { GPIOCountStore.path(prefix: $0, sensor: configuration.id) },
                stateFilePrefix: context.stateFilePrefix)
        }))

    /// A switch (`quantity = "state"`) is not polled: every debounced change is stored as it happens, plus the unchanged
    /// state every `heartbeat`, so `interval` and `deadband` do nothing for it.
    static func withIgnoredKeys(_ description: DriverDescription) -> DriverDescription {
        var description = description
        description.ignoredKeys = { sensor in
            guard sensor.descriptor.quantity == .state else { return [:] }
            return [
                "interval": "a GPIO switch is not polled; every debounced change is stored as it happens, plus the unchanged state every heartbeat",
                "deadband": "a GPIO switch stores every debounced change (a state is 0 or 1)",
            ]
        }
        return description
    }

    enum Role: Sendable, Hashable {
        case state
        case flow(pulsesPerLitre: Double)
        case count
    }

    struct Options: Sendable, Hashable {
        /// `chip` (default `gpiochip0`) and `line` (required): by name or number.
        var request: GPIOLineRequest
        var role: Role
        var mode: GPIOLineMonitor.Mode
        /// `active_low`: the line is active (1) when low. Default false.
        var activeLow: Bool
        /// `backend`: `libgpiod` (default) or `events` (the line-event protocol read from `events_file`).
        var eventsFile: String?

        init(_ configuration: SensorConfiguration) throws(ConfigurationError) {
            let table = configuration.options
            let chip: GPIOChipSelector
            switch table.value("chip") {
            case nil: chip = .name("gpiochip0")
            case .integer(let number)?:
                guard number >= 0 else { throw table.error("chip", "a chip number is 0 or more (got \(number))") }
                chip = .number(number)
            case .string(let name)?:
                let trimmed = name.trimmingSpaces
                guard !trimmed.isEmpty else { throw table.error("chip", "must name a chip such as \"gpiochip0\"") }
                if let number = Int(trimmed), number >= 0 {
                    chip = .number(number)
                } else if trimmed.hasPrefix("gpiochip"), let number = Int(trimmed.dropFirst(8)), number >= 0 {
                    chip = .number(number)
                } else if trimmed.hasPrefix("/dev/gpiochip"), let number = Int(trimmed.dropFirst(13)), number >= 0 {
                    chip = .number(number)
                } else {
                    chip = .name(trimmed)
                }
            case let other?:
                throw table.error("chip", "must be a chip name such as \"gpiochip0\" or a number (got \(Self.kind(of: other)))")
            }
            let line: GPIOLineSelector
            switch table.value("line") {
            case nil:
                throw table.error("line", "is required: the line's offset on the chip (17 for GPIO17 on a Raspberry Pi) or its name (\"GPIO17\"); `gpioinfo` lists them")
            case .integer(let offset)?:
                guard (0...511).contains(offset) else { throw table.error("line", "a line offset is between 0 and 511 (got \(offset))") }
                line = .offset(offset)
            case .string(let name)?:
                let trimmed = name.trimmingSpaces
                guard !trimmed.isEmpty else { throw table.error("line", "must name a line such as \"GPIO17\" or give its offset") }
                line = .name(trimmed)
            case let other?:
                throw table.error("line", "must be a line offset such as 17 or a line name such as \"GPIO17\" (got \(Self.kind(of: other)))")
            }
            let biases = Dictionary(uniqueKeysWithValues: GPIOBias.allCases.map { ($0.rawValue, $0) })
            let bias = try table.choice("bias", biases) ?? .asIs
            request = GPIOLineRequest(chip: chip, line: line, bias: bias, consumer: "farmgate")
            activeLow = try table.bool("active_low") ?? false

            switch configuration.descriptor.quantity {
            case .state:
                for key in ["edge", "pulses_per_litre"] where table.contains(key) {
                    throw table.error(key, "only applies to pulse counting (quantity \"flow\" or \"count\"); a state input has no \(key)")
                }
                role = .state
                let debounce = try table.duration("debounce", in: .zero...(.seconds(10))) ?? .milliseconds(50)
                mode = .input(debounce: debounce.wholeNanoseconds)
            case .flowRate, .count:
                let edge = try table.choice("edge", ["rising": GPIOEdge.rising, "falling": .falling]) ?? .rising
                let debounce = try table.duration("debounce", in: .zero...(.seconds(1))) ?? .milliseconds(1)
                mode = .pulses(edge: edge, debounce: debounce.wholeNanoseconds)
                if configuration.descriptor.quantity == .flowRate {
                    guard let perLitre = try table.double("pulses_per_litre", in: 0.001...1_000_000) else {
                        throw table.error(
                            "pulses_per_litre", "is required for a flow meter: its K factor from the datasheet (a YF-S201 gives about 450 pulses per litre)")
                    }
                    role = .flow(pulsesPerLitre: perLitre)
                } else {
                    _ = try table.double("pulses_per_litre", in: 0.001...1_000_000)
                    role = .count
                }
            default:
                throw table.error(
                    "quantity", "a gpio sensor measures \"state\" (a switch), \"flow\" (L/min from pulses) or \"count\" (pulses), not \"\(configuration.descriptor.quantity.rawValue)\"")
            }

            let backend = try table.choice("backend", ["libgpiod": false, "events": true]) ?? false
            let file = try table.string("events_file")
            switch (backend, file) {
            case (true, nil):
                throw table.error("events_file", "is required with backend = \"events\": the file of line-event commands to follow")
            case (false, .some):
                throw table.error("events_file", "only applies with backend = \"events\"")
            case (true, .some(let path)):
                guard path.hasPrefix("/") else { throw table.error("events_file", "must be an absolute path (got \"\(path)\")") }
                eventsFile = path
            case (false, nil):
                eventsFile = nil
            }
        }

        static func kind(of value: ConfigValue) -> String {
            switch value {
            case .string: "a string"
            case .integer: "an integer"
            case .double: "a number"
            case .bool: "a boolean"
            case .array: "an array"
            case .table: "a table"
            case .other(let name): name
            }
        }

        /// The line is one sensor's, except that one flow and one count sensor may share a pulse line when they count
        /// it the same way.
        var claims: [ResourceClaim] {
            let line = "GPIO line \(request.name)" + (eventsFile.map { " (events \($0))" } ?? "")
            // With backend = "events" the file is the chip, whatever `chip` says, and one file has many spellings (`//`,
            // `..`, a link): a tester, 2026-12-07, put two sensors on one line that way.
            let identity = eventsFile.map { "GPIO line \(request.line) of the events file \(FileSystem.lexicallyNormalized(FileSystem.resolvedPath($0)))" }
            switch role {
            case .state:
                return [ResourceClaim(resource: line, key: "line", shareable: false, identity: identity)]
            case .flow, .count:
                guard case .pulses(let edge, let debounce) = mode else { return [] }
                let settings = "pulse counting on \(edge.rawValue) edges, debounce \(debounce / 1_000_000)ms, active_low \(activeLow), bias \(request.bias.rawValue)"
                let output = role == .count ? "count" : "flow"
                return [
                    ResourceClaim(resource: line, key: "line", settings: settings, shareable: true, identity: identity),
                    ResourceClaim(resource: "the \(output) of \(line)", key: "line", shareable: false, identity: identity.map { "the \(output) of \($0)" }),
                ]
            }
        }
    }

    let options: Options
    let backend: any GPIOBackend
    let watcher: GPIOLineWatcher
    /// Where a count sensor keeps its running count across restarts (nil: it starts at 0 each time).
    let countStore: GPIOCountStore?
    /// The watcher's pulse total when this driver was made: a watcher still running from the previous generation of
    /// services (a reload) has pulses the stored count already holds.
    let pulseOrigin: UInt64
    let logger: Logger
    /// When the driver was made (its watcher's thread requests the line just after).
    let made = ContinuousClock.now
    /// Whether this driver took a flow window yet: its first began where the line was requested, or where the previous
    /// services' last read left it (a reload).
    private let tookFlowWindow = Mutex(false)

    /// - Parameters:
    ///   - countFile: for a count sensor, the file that keeps its running count across restarts.
    ///   - stateFilePrefix: where the agent keeps state beside the buffer: with `backend = "events"`, how far the events
    ///     file was delivered, so that a restarted agent resumes there (nil: the file is read from its start).
    public convenience init(
        configuration: SensorConfiguration, logger: Logger, countFile: String? = nil, stateFilePrefix: String? = nil
    ) throws {
        let options = try Options(configuration)
        let backend = Self.backend(for: options, logger: logger, stateFilePrefix: stateFilePrefix)
        try self.init(configuration: configuration, backend: backend, logger: logger, countFile: countFile)
    }

    /// A driver on `backend` (tests pass a ``ScriptedGPIOBackend``).
    public init(configuration: SensorConfiguration, backend: any GPIOBackend, logger: Logger, countFile: String? = nil) throws {
        let options = try Options(configuration)
        self.options = options
        self.backend = backend
        self.logger = logger
        countStore = options.role == .count ? countFile.map { GPIOCountStore(path: $0, logger: logger) } : nil
        (watcher, pulseOrigin) = try GPIOLineWatchers.shared.watcher(
            for: options.request, mode: options.mode, activeLow: options.activeLow, backend: backend, logger: logger)
    }

    /// The backend a configured sensor uses: libgpiod, or the events file it follows (which logs its bad lines to
    /// `logger`, the first sensor's that follows the file).
    static func backend(
        for options: Options, logger: Logger = Logger(label: "farmgate.gpio"), stateFilePrefix: String? = nil
    ) -> any GPIOBackend {
        if let file = options.eventsFile {
            EventFileBackends.shared.backend(for: file, logger: logger, stateFilePrefix: stateFilePrefix)
        } else {
            LibgpiodBackends.shared
        }
    }

    /// A state input streams its changes; flow and count sensors are read on their interval.
    public var streams: Bool { options.role == .state }

    /// The debounced changes since the previous poll, each with how long ago its edge happened, and the settled state.
    public func poll() async throws(SensorError) -> StreamedUpdate {
        guard options.role == .state else { return StreamedUpdate(current: nil) }
        // Just made, the watcher's thread may not have requested the line yet: nothing to report, rather than a failure
        // (reads wait for that request; a poll must not wait).
        if !watcher.tried, ContinuousClock.now - made < Self.requestWait { return StreamedUpdate(current: nil) }
        let (changes, current, now) = try watcher.withMonitor { monitor, now, pending in
            let state = monitor.state(at: now)
            // While edges are on their way to the monitor (or a change is settling), the state now is not known: a
            // heartbeat of the state before them, stamped now, would be newer than the change they make.
            return (monitor.takeChanges(), monitor.settling || pending ? nil : state, now)
        }
        return StreamedUpdate(
            values: changes.map { StreamedValue(SensorValue(Double($0.state)), age: .nanoseconds(now - $0.at)) },
            current: current.map { SensorValue(Double($0)) })
    }

    /// How long a read waits for the line's first request (the watcher's thread requests it just after the driver is
    /// made): a read right at start, or a one-off `farmgate sensor read`, answers from the line, not "not requested yet".
    static let requestWait: Duration = .seconds(2)

    /// The shortest first flow window after a start or reload that gives a stored rate (see ``scheduledRead()``).
    static let shortestFirstFlowWindow: Double = 1

    /// How long a one-off read of a flow meter (`farmgate sensor read`) counts pulses: a flow is a rate over a window.
    static let oneOffFlowWindow: Duration = .seconds(1)

    public func read() async throws(SensorError) -> SensorValue {
        _ = await watcher.waitUntilTried(timeout: Self.requestWait)
        switch options.role {
        case .state:
            return SensorValue(Double(try watcher.withMonitor { monitor, now in monitor.state(at: now) }))
        case .count:
            let pulses = try watcher.withMonitor { monitor, now in monitor.pulses(at: now) }
            let counted = pulses >= pulseOrigin ? pulses - pulseOrigin : 0
            guard let countStore else { return SensorValue(Double(counted)) }
            return SensorValue(Double(try await countStore.total(pulsesSinceStart: counted)))
        case .flow(let perLitre):
            let window: (pulses: Int, seconds: Double)
            if SensorReadContext.oneOff {
                // A one-off read (`farmgate sensor read`) counts over a window of its own, leaving the sampler's alone
                // (through the running agent, the next stored flow still covers its whole interval).
                let (pulses, start) = try watcher.withMonitor { monitor, now in (monitor.pulses(at: now), now) }
                try? await Task.sleep(for: Self.oneOffFlowWindow)
                let (after, end) = try watcher.withMonitor { monitor, now in (monitor.pulses(at: now), now) }
                window = (Int(clamping: after >= pulses ? after - pulses : 0), Double(end - start) / 1e9)
                if window.seconds <= 0, let file = options.eventsFile {
                    // A one-off read has no previous reading to speak of (a tester, 2026-12-07).
                    throw SensorError(
                        .timeout,
                        "the line's clock did not move during the \(Self.oneOffFlowWindow) this read counts pulses: the events file \(file) moves it only with its `now` lines, and none came (is anything appending to it?)")
                }
            } else {
                // A caller of read() wants a value: a window that covered no time is an error here, the first one too.
                window = try takeFlowWindow().window
            }
            return try flowRate(window, pulsesPerLitre: perLitre)
        }
    }

    /// A flow meter's first window after a start may cover no time, or hardly any: on an events file's clock, which moves
    /// only with its lines, the sampler's first read often comes at the very time the line was requested, and with
    /// libgpiod a few milliseconds after it. A first window shorter than ``shortestFirstFlowWindow`` only begins the
    /// window the next read measures (nil: nothing stored, no failed read); a later window that covers no time is still
    /// an error. Other sensors, and one-off reads, read as ``read()`` does.
    public func scheduledRead() async throws(SensorError) -> SensorValue? {
        guard case .flow(let perLitre) = options.role, !SensorReadContext.oneOff else { return try await read() }
        _ = await watcher.waitUntilTried(timeout: Self.requestWait)
        let (window, first) = try takeFlowWindow()
        // A first window of a fraction of a second (the sampler reads at once at start) is a few pulses or none: a rate
        // from it is noise (a tester, 2026-12-07: 0.0 L/min stored for 6 after a restart). It only begins the next.
        if first, window.seconds < Self.shortestFirstFlowWindow { return nil }
        return try flowRate(window, pulsesPerLitre: perLitre)
    }

    /// The sampler's flow window up to now, and whether it is this driver's first.
    private func takeFlowWindow() throws(SensorError) -> (window: (pulses: Int, seconds: Double), first: Bool) {
        let window = try watcher.withMonitor { monitor, now in monitor.takeFlowWindow(at: now) }
        let first = tookFlowWindow.withLock { took in
            defer { took = true }
            return !took
        }
        return (window, first)
    }

    /// L/min over `window`; an error when it covered no time on the line's clock.
    private func flowRate(_ window: (pulses: Int, seconds: Double), pulsesPerLitre perLitre: Double) throws(SensorError) -> SensorValue {
        guard window.seconds > 0 else {
            let eventsNote = options.eventsFile.map { " (the events file \($0) moves the line's clock only with its `now` lines)" } ?? ""
            throw SensorError(.timeout, "no time has passed on the line's clock since the previous flow reading\(eventsNote)")
        }
        return SensorValue(Double(window.pulses) / perLitre / (window.seconds / 60))
    }

    /// Flow and count sensors are read once more as the sampler stops, so that the pulses since the last read are kept.
    public var readsAtStop: Bool { options.role != .state }

    /// Releases the line. A count sensor then stores its running count with every pulse counted until the line was
    /// released (after the sampler's last read, edges may still have come), so that a graceful stop or a reload loses none.
    public func close() async {
        let last = GPIOLineWatchers.shared.release(watcher, backend: backend)
        guard let countStore else { return }
        if last { await watcher.waitUntilFinished(timeout: .seconds(1)) }
        let pulses = watcher.totalPulses
        do {
            _ = try await countStore.total(pulsesSinceStart: pulses >= pulseOrigin ? pulses - pulseOrigin : 0)
        } catch {
            logger.warning("Could not store the running count at stop", metadata: ["error": "\(error)"])
        }
    }
}

/// One libgpiod backend for the process (it holds no state; the watchers key on its identity).
enum LibgpiodBackends {
    static let shared = LibgpiodBackend()
}

/// One scripted backend per events file (and state prefix), so that a flow and a count sensor following one file share
/// its line, and a reload keeps following the file where it was. The agent's backends remember their position beside the
/// buffer; those made only to look lines up (`config check`, a reload's check) or for a one-off read do not.
final class EventFileBackends: Sendable {
    static let shared = EventFileBackends()
    private let backends = Mutex<[String: ScriptedGPIOBackend]>([:])

    func backend(for file: String, logger: Logger, stateFilePrefix: String? = nil) -> ScriptedGPIOBackend {
        backends.withLock { backends in
            let key = "\(stateFilePrefix ?? "")|\(file)"
            if let backend = backends[key] { return backend }
            let backend = ScriptedGPIOBackend(
                file: file, positionFile: stateFilePrefix.map { ScriptedGPIOBackend.positionFile(prefix: $0, file: file) }, logger: logger)
            backends[key] = backend
            return backend
        }
    }
}

extension String {
    fileprivate var trimmingSpaces: String {
        var slice = self[...]
        while slice.first == " " { slice = slice.dropFirst() }
        while slice.last == " " { slice = slice.dropLast() }
        return String(slice)
    }
}
