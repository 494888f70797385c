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
import Logging
import ServiceLifecycle
import Synchronization
import UnixSignals

/// Assembles the daemon from its configuration and runs it until SIGTERM or SIGINT.
///
/// The services run in one `ServiceGroup` and shut down in reverse order of this list (buffer, clock monitor, uploader,
/// sampler, control socket): the control socket closes first, the sampler stops reading, the uploader finishes its request in
/// flight and sends what is pending (bounded by `shutdown_flush_timeout`), and the buffer commits what it still holds
/// last, so a graceful stop loses nothing and normally leaves nothing behind.
public enum AgentRuntime {
    /// The control socket's answer to `status`. The figures come from the buffer's thread; they get `timeout`, under
    /// the CLI's 10 s wait for an answer, so that a buffer stuck on its disk is named rather than the agent seeming not
    /// to answer at all (a tester, 2026-12-07: `farmgate status --socket` said only that nothing answered in 10 s).
    static func statusAnswer(_ snapshot: @escaping @Sendable () async throws -> AgentStatus, timeout: Duration = .seconds(5)) async -> ControlAnswer {
        let result = await withDeadline(timeout) { () -> Result<AgentStatus, any Error> in
            do { return .success(try await snapshot()) } catch { return .failure(error) }
        }
        switch result {
        case .success(let status)?: return ControlAnswer(ok: true, status: status)
        case .failure(let error)?: return ControlAnswer(ok: false, error: "cannot read the buffer: \(error)")
        case nil:
            return ControlAnswer(
                ok: false,
                error: "the buffer does not answer for its figures within \(timeout): its disk may be stuck (dmesg, `farmgate doctor`); the agent's journal names what is stuck")
        }
    }

    /// Runs the agent until SIGTERM or SIGINT. On SIGHUP the configuration file is read again
    /// (``ConfigurationReloadService``): a valid one replaces the running services by new ones built from it, in this
    /// process; an invalid one, or one the new services could not start with (a control socket where the agent cannot
    /// write, a moved buffer), is refused and the running configuration kept.
    ///
    /// - Parameter logLevel: set to each configuration's `[log] level` (the one at start is already in it); nil when the
    ///   caller's log handler does not follow one.
    public static func run(
        configuration: AgentConfiguration, drivers: DriverRegistry = .standard, logger: Logger, logLevel: SharedLogLevel? = nil
    ) async throws {
        let reloads = ConfigurationReloads(file: configuration.file)
        // One handler for the whole run: a SIGHUP that arrives while one generation of services stops and the next starts,
        // or while a reload is being checked, is recorded for the next reload rather than lost (or, with no handler, the
        // default action ending the process).
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        let hangupWatch = Task {
            for await _ in hangups { reloads.hangupReceived() }
        }
        defer { hangupWatch.cancel() }
        // A stop asked for while a reload is stopping one generation (the service group then ignores further signals)
        // or starting the next (no group listens yet) must end the agent, not be lost: `systemctl reload` followed by
        // `stop` would otherwise leave it running, with the new configuration, until systemd kills it.
        let stopRequests = StopRequests()
        let stops = await UnixSignalsSequence(trapping: .sigterm, .sigint)
        let stopWatch = Task {
            for await _ in stops {
                await stopRequests.request()?.triggerGracefulShutdown()
            }
        }
        defer { stopWatch.cancel() }
        let carried = GenerationCarry()
        var current = configuration
        while true {
            try await runServices(
                configuration: current, drivers: drivers, reloads: reloads, logger: logger, carried: carried, stops: stopRequests)
            guard let next = reloads.takeAccepted() else { break }
            if stopRequests.requested {
                logger.notice("Agent stopping: a stop was asked for while the reloaded configuration was being applied")
                break
            }
            logger.notice(
                "Agent restarted its services with the reloaded configuration",
                metadata: ["config": "\(next.file)", "sensors": "\(next.sensors.count)"])
            // The old metrics file would stay, frozen, beside the new one (node_exporter exporting stale figures, the
            // same series twice): it goes when the reload moves or removes it.
            if let old = current.metrics?.path, old != next.metrics?.path {
                if unlink(old) == 0 {
                    logger.notice("Metrics file removed: the reload moved or removed [metrics] textfile", metadata: ["metrics.file": "\(old)"])
                } else if errno != ENOENT {
                    logger.warning(
                        "Metrics file the reload moved or removed cannot be removed; node_exporter exports its last figures until it is",
                        metadata: ["metrics.file": "\(old)", "error": "\(String(cString: strerror(errno)))"])
                }
            }
            if let logLevel, next.logLevel != current.logLevel {
                logLevel.level = next.logLevel
                logger.notice("Log level changed by the reload", metadata: ["from": "\(current.logLevel)", "to": "\(next.logLevel)"])
            }
            current = next
        }
    }

    /// SIGTERM and SIGINT across generations: whether a stop was asked for, and the service group to stop. A stop that
    /// comes after a generation checked for one but before its group listens for signals would otherwise be lost (the
    /// group traps them only once it runs): the group is registered first, and a stop that finds it shuts it down.
    final class StopRequests: Sendable {
        private let state = Mutex<(requested: Bool, group: ServiceGroup?)>((false, nil))

        var requested: Bool { state.withLock { $0.requested } }

        /// Records a stop; returns the group running now, to be shut down gracefully.
        func request() -> ServiceGroup? {
            state.withLock { state in
                state.requested = true
                return state.group
            }
        }

        /// Makes `group` the one a stop shuts down (nil once it ran); false when a stop was already asked for, and then
        /// it must not run.
        func running(_ group: ServiceGroup?) -> Bool {
            state.withLock { state in
                state.group = group
                return !state.requested
            }
        }
    }

    /// What outlives one generation of services: the process's start time and the uploader's totals, so that a reload
    /// neither resets the counters of the metrics file and `farmgate status` nor moves the agent's start time.
    final class GenerationCarry: Sendable {
        let startedAt = Timestamp.now()
        let upload = Mutex<UploadStatus?>(nil)
        /// The sensors' counters as the last generation left them (``SensorStatusBoard/carry(from:)``).
        let sensors = Mutex<[SensorStatus]>([])
        /// Samples the stopping generation's buffer could not commit (a full disk): the next one queues them first; and
        /// how many it dropped from its memory queue and could not yet count in the file (the next one counts them).
        let samples = Mutex<(samples: [Sample], dropped: Int64)>(([], 0))
        /// The clock monitor's state (since when the clock has been synchronised or not, the last correction), so that
        /// `farmgate status` does not count "not synchronised for" from the last reload.
        let clock = Mutex<ClockMonitor.State?>(nil)
        /// The buffer's `<path>.lock`, taken by the first generation and held for the whole run (a reload cannot move the
        /// buffer): one agent per buffer file.
        let bufferLock = Mutex<[SidecarLock]>([])

        /// Takes the buffer's lock unless this run holds it already.
        /// - Throws: ``BufferInUseError`` when another process holds it. A lock that cannot be made (the buffer's
        ///   directory missing or not writable) is left to the buffer's own open, which says what is wrong.
        func lockBuffer(_ path: String) throws(BufferInUseError) {
            try bufferLock.withLock { (locks: inout [SidecarLock]) throws(BufferInUseError) in
                guard locks.isEmpty else { return }
                locks = try AgentRuntime.lockBuffer(path)
            }
        }
    }

    /// Takes the locks that keep one process per buffer file: `<buffer>.lock`, and the buffer file itself (made empty
    /// when new, which SQLite takes as a new database): a flock on the file is per inode, so a hard link to the buffer,
    /// or the `.lock` deleted, cannot let a second process in. SQLite's own locks are fcntl locks, which flock does not
    /// touch. Held until released or the process ends. Blocking system calls: not on the concurrency pool.
    /// - Throws: ``BufferInUseError`` when another process holds them. A lock that cannot be made (the buffer's
    ///   directory missing or not writable) is left to the buffer's own open, which says what is wrong.
    public static func lockBuffer(_ path: String) throws(BufferInUseError) -> [SidecarLock] {
        // The buffer's directory as its store makes it, so that the first start is locked too.
        if let slash = path.lastIndex(of: "/"), slash > path.startIndex {
            try? FileSystem.createDirectories(String(path[..<slash]))
        }
        var taken: [SidecarLock] = []
        for suffix in [".lock", ""] {
            do throws(SidecarLock.Failure) {
                taken.append(try SidecarLock(databasePath: path, suffix: suffix))
            } catch {
                if case .held(let lockPath) = error {
                    taken.forEach { $0.release() }
                    throw BufferInUseError(path: path, lockPath: lockPath)
                }
            }
        }
        return taken
    }

    /// One generation of services, from the buffer to the control socket, until a graceful shutdown or an accepted reload.
    static func runServices(
        configuration: AgentConfiguration, drivers: DriverRegistry, reloads: ConfigurationReloads, logger: Logger,
        carried: GenerationCarry = GenerationCarry(), stops: StopRequests = StopRequests()
    ) async throws {
        // Opening runs quick_check, which takes seconds on a large buffer: keep it off the concurrency pool.
        let bufferConfiguration = configuration.buffer
        // Two agents on one buffer would number readings from one counter and deduplicate each other's samples away.
        try await runOffPool { try carried.lockBuffer(bufferConfiguration.path) }
        let buffer: ReadingBuffer
        // Sensors whose quantity changed under readings still buffered: not sampled until those are sent (see
        // ``SensorQuantityChange``), so that their port stays free and no sample is refused every commit.
        let keptBack: Set<SensorID>
        do {
            buffer = try await runOffPool { try ReadingBuffer(configuration: bufferConfiguration, logger: logger) }
            keptBack = Set(try await buffer.register(configuration.sensors.map(\.descriptor)).map(\.sensor))
            let (queued, dropped) = carried.samples.withLock { carry in
                defer { carry = ([], 0) }
                return carry
            }
            try buffer.adopt(queued, dropped: dropped)
            if !queued.isEmpty {
                logger.notice(
                    "Queued the samples the buffer could not commit before the reload; they are committed when the disk has room",
                    metadata: ["buffer.queued": "\(queued.count)"])
            }
        } catch let error as SQLiteError where error.isAccessDenied {
            throw BufferAccessError(path: bufferConfiguration.path, underlying: error)
        }

        let board = SensorStatusBoard(sensors: configuration.sensors)
        board.carry(from: carried.sensors.withLock { $0 })
        let context = DriverContext.site(
            configuration.sensors, latestValues: board, logger: logger, stateFilePrefix: configuration.buffer.path)
        var sensors: [Sampler.Sensor] = []
        var streamingSensors: [StreamingSampler.Sensor] = []
        // Every sensor in configuration order, for `farmgate sensor read` through the agent (streaming ones included).
        var readable: [Sampler.Sensor] = []
        for sensor in configuration.sensors where !keptBack.contains(sensor.id) {
            guard let description = drivers.driver(named: sensor.driver) else {
                throw ControlSocketError("sensor \(sensor.id): unknown driver \(sensor.driver)")
            }
            let driver = try description.make(sensor, context)
            // Sensors that report changes as they happen (GPIO switches) run beside the sampler, not on its interval.
            let polled = Sampler.Sensor(configuration: sensor, driver: driver)
            if let streaming = driver as? any StreamingSensorDriver, streaming.streams {
                streamingSensors.append(StreamingSampler.Sensor(configuration: sensor, driver: streaming))
            } else {
                sensors.append(polled)
            }
            readable.append(polled)
        }
        // The kernel's clocks (reads the boot id, and the test hook's file when FARMGATE_TEST_CLOCK_FILE names one).
        let checkClock = configuration.checkClock
        let hookPath = ProcessInfo.processInfo.environment[SystemClockSource.testHookVariable]
        let source = try await runOffPool {
            SystemClockSource(checkSynchronization: checkClock, testHookPath: hookPath, logger: logger)
        }
        let clock = WallClock(checkSynchronization: checkClock, source: source)
        var monitor: ClockMonitor?
        if checkClock {
            let clockMonitor = ClockMonitor(
                source: source, observer: buffer, hold: configuration.holdUnsynchronized, logger: logger, carrying: carried.clock.withLock { $0 })
            // Before the uploader starts: readings of this boot still waiting in the buffer stay held, and are corrected by
            // the monitor's first poll once the agent runs (a repair of millions of readings here would hold up READY).
            await clockMonitor.poll(repair: false)
            monitor = clockMonitor
        }
        let readableSensors = readable
        let sampler = Sampler(sensors: sensors, sink: buffer, board: board, clock: clock, logger: logger)

        var uploader: Uploader?
        if let upload = configuration.upload {
            uploader = try Uploader(
                device: configuration.device, source: buffer, configuration: upload, logger: logger,
                carrying: carried.upload.withLock { $0 }, reloading: { reloads.isReloading })
        }

        let startedAt = carried.startedAt
        let device = configuration.device.rawValue
        let endpoint = configuration.upload?.endpoint
        let uploaderForStatus = uploader
        let monitorForStatus = monitor
        let pid = ProcessInfo.processInfo.processIdentifier
        // One snapshot for `farmgate status`, the systemd status line and the metrics file.
        let snapshot: @Sendable () async throws -> AgentStatus = {
            AgentStatus(
                device: device, version: FarmgateVersion.current, pid: pid,
                startedAt: startedAt, now: Timestamp.now(), clockSynchronized: clock.isSynchronized(),
                clock: monitorForStatus?.status(),
                buffer: try await buffer.statistics(), upload: uploaderForStatus?.status(), uploadEndpoint: endpoint,
                sensors: board.snapshot(), recentQuarantine: try await buffer.quarantined(limit: 10),
                configuration: reloads.status())
        }
        let calibration = CalibrationCommands(
            drivers: Dictionary(sensors.map { ($0.configuration.id, $0.driver) }, uniquingKeysWith: { first, _ in first }),
            flags: sampler.calibrating, recorder: buffer, logger: logger)
        // Where this agent answers, beside its buffer (whose path a reload cannot change): `farmgate status` finds the agent
        // there when the file's [control] socket names another one (a reload that moved it was refused).
        let socketPointer = ControlServer.socketPointer(forBuffer: configuration.buffer.path)
        let socketPath = configuration.controlSocket
        try? await runOffPool { ControlServer.recordSocket(socketPath, at: socketPointer) }
        let control = ControlServer(path: configuration.controlSocket, logger: logger) { request in
            if CalibrationCommands.commands.contains(request.command) { return ControlServer.encode(await calibration.answer(request)) }
            let answer: ControlAnswer
            switch request.command {
            case let command where QuarantineCommands.commands.contains(command):
                answer = await QuarantineCommands(buffer: buffer).answer(request)
            case SensorReadCommand.command:
                return ControlServer.encode(await SensorReadCommand.answer(request, sensors: readableSensors))
            case "status":
                answer = await statusAnswer(snapshot)
            default:
                let known = (["status", SensorReadCommand.command] + QuarantineCommands.commands + CalibrationCommands.commands).joined(separator: ", ")
                answer = ControlAnswer(ok: false, error: "unknown command \"\(request.command)\"; this agent knows: \(known)")
            }
            return ControlServer.encode(answer)
        }

        // Shut down in reverse: control socket, sampler (no new readings), uploader (finishes its request and sends what
        // is pending), buffer (commits anything left).
        var services: [any Service] = [buffer]
        // The metrics file stops just before the buffer: its last write has the final counts.
        if let metrics = configuration.metrics {
            services.append(TextfileMetricsService(configuration: metrics, snapshot: snapshot, logger: logger))
        }
        if let monitor { services.append(monitor) }
        if let uploader { services.append(uploader) }
        services.append(sampler)
        if !streamingSensors.isEmpty {
            services.append(StreamingSampler(sensors: streamingSensors, sink: buffer, board: board, clock: clock, logger: logger))
        }
        // Stops after the control socket (no new command), recording a calibration left open (its points are in the circuit).
        services.append(calibration)
        services.append(control)
        // Under systemd (Type=notify): READY=1, STATUS=, WATCHDOG=1 while sampler, buffer and uploader make progress, and
        // STOPPING=1 first thing on shutdown (listed last, so told first).
        if let notifier = SystemdNotifier(environment: ProcessInfo.processInfo.environment) {
            let heartbeats = [sampler.heartbeat, buffer.heartbeat] + (uploader.map { [$0.heartbeat] } ?? [])
            services.append(
                AgentSupervisor(
                    notifier: notifier, gate: WatchdogGate(heartbeats: heartbeats), controlSocket: configuration.controlSocket,
                    snapshot: snapshot, reloading: { reloads.isReloading }, logger: logger))
        }
        logger.info(
            "Agent starting",
            metadata: [
                "device": "\(configuration.device)", "sensors": "\(configuration.sensors.count)", "buffer": "\(configuration.buffer.path)",
                "upload": "\(endpoint ?? "off")", "version": "\(FarmgateVersion.current)",
            ])
        // Returns when SIGHUP brought a valid configuration: the group then stops gracefully, like on SIGTERM.
        let reload = ConfigurationReloadService(running: configuration, drivers: drivers, reloads: reloads, buffer: buffer, logger: logger)
        let group = ServiceGroup(
            configuration: ServiceGroupConfiguration(
                services: services.map { ServiceGroupConfiguration.ServiceConfiguration(service: $0) }
                    + [.init(service: reload, successTerminationBehavior: .gracefullyShutdownGroup)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        // A stop that came while this generation was being built (after a reload) found no group listening; one that
        // comes from now on shuts this group down, even before it traps the signals itself.
        guard stops.running(group) else {
            logger.info("Agent stopped before its services started: a stop was asked for while they were being built")
            return
        }
        defer {
            _ = stops.running(nil)
            if let uploader { carried.upload.withLock { $0 = uploader.status() } }
            carried.sensors.withLock { $0 = board.snapshot() }
            if let monitor { carried.clock.withLock { $0 = monitor.carriedState() } }
        }
        try await group.run()
        // What the buffer could not commit at its stop (a full disk) goes to the next generation on a reload; a stop
        // cannot keep it.
        let (uncommitted, droppedInMemory) = buffer.takeUncommitted()
        if reloads.isReloading {
            carried.samples.withLock { $0 = (uncommitted, droppedInMemory) }
            return
        }
        if !uncommitted.isEmpty {
            logger.critical(
                "Agent stopped with samples its buffer could not commit (the disk is full); they are lost",
                metadata: [
                    "buffer.lost_uncommitted": "\(uncommitted.count)", "buffer.dropped_in_memory": "\(droppedInMemory)",
                    "buffer.path": "\(bufferConfiguration.path)",
                ])
            throw BufferError(
                "\(uncommitted.count) samples could not be committed to \(bufferConfiguration.path) before the agent stopped (the disk is full); free space on its file system")
        }
        logger.info("Agent stopped")
    }
}

extension ReadingBuffer: SampleSink {}

/// Another process holds the buffer's lock: another agent runs on the same `[buffer] path`.
public struct BufferInUseError: Error, CustomStringConvertible {
    let path: String
    let lockPath: String

    public var description: String {
        "another farmgate agent is running on the buffer \(path) (it holds \(lockPath)): each agent needs its own [buffer] path; "
            + "stop the other one (`farmgate status` names its pid; `systemctl stop farmgate` for the service), or give this "
            + "configuration another [buffer] path"
    }
}

/// `[buffer] path` names a file that is not the agent's: a directory, a file of another kind, another program's SQLite
/// database. Nothing was changed or moved; the configuration must name another file.
public struct BufferPathError: Error, CustomStringConvertible {
    let path: String
    let problem: String

    public var description: String {
        "[buffer] path \(path) \(problem): the agent keeps its readings in a file of its own and leaves this one as it is; "
            + "point [buffer] path at another file, such as /var/lib/farmgate/buffer.sqlite"
    }
}

/// The buffer cannot be opened or written by the agent's user: which file, as whom, and the command that fixes it.
struct BufferAccessError: Error, CustomStringConvertible {
    let path: String
    let underlying: SQLiteError

    var description: String {
        let user = UnixUser.current.name
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().path
        return "the buffer \(path) cannot be opened for writing as user \(user) (\(underlying.message)): give the buffer's files and "
            + "directory to that user (sudo chown \(user): \(directory) \(path)*) and start the agent again; `farmgate doctor --user \(user)` checks it"
    }
}
