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

/// What `farmgate status` shows about the configuration the agent runs: which file, since when, and how the last reload
/// (SIGHUP) went.
public struct ConfigurationStatus: Codable, Sendable, Hashable {
    /// The file the running configuration came from.
    public var file: String
    /// When the running configuration was loaded (at start, or by the last successful reload).
    public var loadedAt: Timestamp
    /// Successful reloads since the agent started.
    public var reloads: Int
    /// The last SIGHUP, successful or not.
    public var lastReloadAt: Timestamp?
    /// Why the last reload was refused (`file:line: key: message`); nil when it succeeded or none was asked for.
    public var lastReloadError: String?

    public init(file: String, loadedAt: Timestamp, reloads: Int = 0, lastReloadAt: Timestamp? = nil, lastReloadError: String? = nil) {
        self.file = file
        self.loadedAt = loadedAt
        self.reloads = reloads
        self.lastReloadAt = lastReloadAt
        self.lastReloadError = lastReloadError
    }
}

/// The agent's configuration across reloads: what status shows, and the configuration a reload accepted, which the
/// runtime starts next. Lives as long as the process; shared by every generation of services.
public final class ConfigurationReloads: Sendable {
    private struct State {
        var status: ConfigurationStatus
        var accepted: AgentConfiguration?
    }
    private let state: Mutex<State>
    /// SIGHUPs not yet taken by a reload (at most one: a reload reads the file as it is then), and the reload waiting.
    private let hangups = Mutex<(pending: Bool, waiter: CheckedContinuation<Bool, Never>?)>((false, nil))

    public init(file: String, loadedAt: Timestamp = .now()) {
        state = Mutex(State(status: ConfigurationStatus(file: file, loadedAt: loadedAt)))
    }

    /// Records a SIGHUP. The runtime's one handler calls this for the whole run, so that a SIGHUP that arrives while a
    /// reload is being checked, or while one generation of services stops and the next starts, is kept for the next
    /// generation's reload instead of being lost (several in that time make one reload, of the file as it is then).
    public func hangupReceived() {
        let waiter = hangups.withLock { state -> CheckedContinuation<Bool, Never>? in
            guard let waiter = state.waiter else {
                state.pending = true
                return nil
            }
            state.waiter = nil
            return waiter
        }
        waiter?.resume(returning: true)
    }

    /// Waits for the next SIGHUP (one recorded before the call counts): true, or false when the task is cancelled (a
    /// recorded SIGHUP then stays for the next call).
    func nextHangup() async -> Bool {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
                let now: Bool? = hangups.withLock { state in
                    // A generation that is stopping leaves a recorded SIGHUP to the next one.
                    if Task.isCancelled { return false }
                    if state.pending {
                        state.pending = false
                        return true
                    }
                    state.waiter = continuation
                    return nil
                }
                if let now { continuation.resume(returning: now) }
            }
        } onCancel: {
            let waiter = hangups.withLock { state -> CheckedContinuation<Bool, Never>? in
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume(returning: false)
        }
    }

    public func status() -> ConfigurationStatus { state.withLock { $0.status } }

    /// Whether a reload was accepted and the services are stopping to start again with it.
    public var isReloading: Bool { state.withLock { $0.accepted != nil } }

    func accept(_ configuration: AgentConfiguration, at time: Timestamp = .now()) {
        state.withLock {
            $0.accepted = configuration
            $0.status.lastReloadAt = time
            $0.status.lastReloadError = nil
        }
    }

    func refuse(_ reason: String, at time: Timestamp = .now()) {
        state.withLock {
            $0.status.lastReloadAt = time
            $0.status.lastReloadError = reason
        }
    }

    /// The accepted configuration, once: the runtime calls it after the services stopped.
    func takeAccepted(at time: Timestamp = .now()) -> AgentConfiguration? {
        state.withLock { state in
            guard let next = state.accepted else { return nil }
            state.accepted = nil
            state.status.file = next.file
            state.status.loadedAt = time
            state.status.reloads += 1
            return next
        }
    }
}

/// Reloads the configuration on SIGHUP (`systemctl reload farmgate`).
///
/// The file is read and validated exactly as at start (and as `farmgate config check` does, GPIO lines included). Invalid:
/// the agent keeps running the configuration it has, logs the located error (`file:line: key: message`) and `farmgate
/// status` shows it until the next reload. Valid: this service returns, which stops the services gracefully (the sampler,
/// then the uploader finishing its request and sending what is pending, then the buffer committing), and the runtime starts
/// them again with the new configuration in the same process: sensors added, removed or changed, intervals, upload
/// settings, and every other key take effect. The process, its PID and systemd's view of it stay; sampling pauses for
/// about a second (longer while an upload is in flight, at most `request_timeout`; the backlog is not flushed first, the
/// next generation's uploader sends it).
///
/// Before the running services stop, the new configuration must be one they can start with: the running one is only
/// given up for one that works. Beyond what `farmgate config check` checks, a reload is refused when it moves the buffer
/// (`[buffer] path`: the pending readings of the old file would be left behind; restart the agent to move it) or changes
/// `[device] id` (the pending readings would go up as the new device's), when the new control socket's directory cannot
/// be created or written, when another agent answers on the new socket, when the uploader's HTTP client cannot be set
/// up (a CA file it cannot read), or when a sensor's quantity changed while it runs or while the buffer holds readings
/// of it taken as the old one (``SensorQuantityChange``).
final class ConfigurationReloadService: Service {
    let file: String
    let drivers: DriverRegistry
    let reloads: ConfigurationReloads
    let logger: Logger
    /// The configuration the services run now.
    let running: AgentConfiguration
    /// The running buffer, asked whether a sensor's quantity changed under readings it still holds.
    let buffer: ReadingBuffer?

    init(running: AgentConfiguration, drivers: DriverRegistry, reloads: ConfigurationReloads, buffer: ReadingBuffer? = nil, logger: Logger) {
        self.file = running.file
        self.running = running
        self.drivers = drivers
        self.reloads = reloads
        self.buffer = buffer
        self.logger = logger
    }

    /// Refuses `next` when the services could not start with it where `running` works (see the type's documentation).
    /// Blocking (file system, curl): call it off the concurrency pool.
    static func checkStartable(_ next: AgentConfiguration, running: AgentConfiguration, logger: Logger) throws(ConfigurationError) {
        func refuse(_ key: String, _ message: String) -> ConfigurationError {
            ConfigurationError(file: next.file, line: nil, key: key, message: message)
        }
        if next.buffer.path != running.buffer.path {
            throw refuse(
                "buffer.path",
                "changed from \(running.buffer.path) to \(next.buffer.path), which a reload cannot do: the readings still pending in "
                    + "the old file would be left behind. Put the old path back and reload, or restart the agent to move the buffer "
                    + "(stop it, move the file with its -wal and .seq files to the new path, then start it)")
        }
        if next.device != running.device {
            throw refuse(
                "device.id",
                "changed from \(running.device) to \(next.device), which a reload cannot do: the buffer's readings carry no device "
                    + "of their own, so those not yet sent would go up as \(next.device)'s. Put the old id back and reload; to make "
                    + "this site another device, first let the backlog drain (farmgate status: 0 pending), then change the id and "
                    + "restart the agent")
        }
        if next.controlSocket != running.controlSocket {
            let socket = next.controlSocket
            let directory = URL(fileURLWithPath: socket).deletingLastPathComponent().path
            do {
                // What the control socket does when it starts; done now, so that a directory it cannot make is refused.
                try FileSystem.createDirectories(directory, mode: 0o750)
            } catch {
                throw refuse("control.socket", "cannot create the directory \(directory) for \(socket): \(error.reason)")
            }
            guard access(directory, W_OK | X_OK) == 0 else {
                throw refuse(
                    "control.socket", "the agent may not create \(socket): \(String(cString: strerror(errno))) on \(directory)")
            }
            if FileManager.default.fileExists(atPath: socket), let fd = try? UnixSocket.connect(socket, timeoutSeconds: 1) {
                close(fd)
                throw refuse("control.socket", "another farmgate agent answers on \(socket); choose another path or stop that agent")
            }
        }
        if let upload = next.upload {
            do {
                _ = try HTTPClient(configuration: upload.httpClientConfiguration, logger: logger)
            } catch {
                throw refuse("upload", "the uploader cannot be set up: \(error)")
            }
        }
    }

    /// Why `next` cannot be applied for a sensor's quantity (``SensorQuantityChange``): readings of it taken as the old
    /// quantity are still buffered, or it runs now with the old quantity and may take more before the services stop
    /// (the next generation would then keep it back, unsampled, until they are sent).
    func quantityChangeProblem(_ next: AgentConfiguration) async -> String? {
        if let buffer, let change = try? await buffer.quantityChanges(next.sensors.map(\.descriptor)).sorted(by: { $0.sensor < $1.sensor }).first {
            return change.description
        }
        let runningQuantity = Dictionary(running.sensors.map { ($0.id, $0.descriptor.quantity) }, uniquingKeysWith: { first, _ in first })
        for sensor in next.sensors {
            guard let old = runningQuantity[sensor.id], old != sensor.descriptor.quantity else { continue }
            let new = sensor.descriptor.quantity.rawValue
            return "sensor \"\(sensor.id)\": quantity changed from \(old.rawValue) to \(new), which a reload cannot do while it runs: readings "
                + "of it not yet sent would go up as \(new). Give the new sensor another id: the ingest keeps each id of a device bound to "
                + "the quantity it first received it as, and quarantines readings of it sent as another (sensor_conflict)"
        }
        return nil
    }

    func run() async throws {
        try await cancelWhenGracefulShutdown {
            try await self.reloadOnHangups()
        }
    }

    /// Reloads at each SIGHUP the runtime recorded (``ConfigurationReloads/hangupReceived()``) until one is accepted.
    private func reloadOnHangups() async throws {
        while await reloads.nextHangup() {
            logger.notice("SIGHUP: reloading the configuration", metadata: ["config": "\(file)"])
            let (file, drivers, running, logger) = (self.file, self.drivers, self.running, self.logger)
            var outcome: Result<AgentConfiguration, ConfigurationError>
            do {
                // Reads the file and the GPIO chips: blocking, so off the concurrency pool.
                outcome = .success(
                    try await runOffPool(name: "farmgate-reload") {
                        let next = try AgentConfiguration.load(path: file, drivers: drivers)
                        _ = try GPIODriver.checkLinesOnChips(next.sensors)
                        try Self.checkStartable(next, running: running, logger: logger)
                        return next
                    })
            } catch let error as ConfigurationError {
                outcome = .failure(error)
            } catch {
                outcome = .failure(ConfigurationError(file: file, line: nil, key: nil, message: "\(error)"))
            }
            if case .success(let next) = outcome, let problem = await quantityChangeProblem(next) {
                outcome = .failure(ConfigurationError(file: file, line: nil, key: nil, message: problem))
            }
            switch outcome {
            case .failure(let error):
                reloads.refuse(error.description)
                logger.error(
                    "Configuration reload refused; the agent keeps running the configuration it has. Fix the file and send SIGHUP again",
                    metadata: ["config": "\(file)", "error": "\(error.description)"])
            case .success(let next):
                reloads.accept(next)
                logger.notice(
                    "Configuration is valid; restarting the services with it",
                    metadata: ["config": "\(file)", "sensors": "\(next.sensors.count)", "upload": "\(next.upload?.endpoint ?? "off")"])
                return
            }
        }
    }
}
