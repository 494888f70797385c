#if canImport(Glibc)
import Glibc
#endif
import FarmgateSupport
import FarmgateWire
import Logging
import ServiceLifecycle

/// The agent's side of `Type=notify`: `READY=1` once it really serves, a `STATUS=` line for `systemctl status`,
/// `WATCHDOG=1` pings while every component is alive, and `STOPPING=1` when a graceful stop begins.
///
/// Ready means: the buffer is open (it is, before any service runs), the sampler and buffer loops and the uploader have
/// started (their ``Heartbeat``s), and the control socket accepts a connection. The watchdog pings go out every half
/// `WatchdogSec` (`$WATCHDOG_USEC` / 2), but only while ``WatchdogGate`` finds no component late: a stuck sampler, buffer
/// or uploader stops them, and systemd restarts the agent `WatchdogSec` after the last ping. The first late check is
/// logged as an error naming the component, and the status line says it too.
///
/// Listed last in the service group, so that it is the first to hear of a graceful shutdown.
public final class AgentSupervisor: Service {
    /// How often the status line is refreshed (the watchdog may ping more often).
    public static let statusInterval: Duration = .seconds(5)

    let notifier: SystemdNotifier
    let gate: WatchdogGate
    let controlSocket: String
    let snapshot: @Sendable () async throws -> AgentStatus
    /// Whether a graceful shutdown is a reload (the services start again with a new configuration) rather than a stop.
    let reloading: @Sendable () -> Bool
    let logger: Logger
    /// Whether a status snapshot is still being answered (``statusLine(_:)``).
    private let snapshotInFlight = AtomicFlag()
    /// Whether the last notification failed (``send(_:)``).
    private let notifyFailing = AtomicFlag()

    public init(
        notifier: SystemdNotifier, gate: WatchdogGate, controlSocket: String, snapshot: @escaping @Sendable () async throws -> AgentStatus,
        reloading: @escaping @Sendable () -> Bool = { false }, logger: Logger
    ) {
        self.reloading = reloading
        self.notifier = notifier
        self.gate = gate
        self.controlSocket = controlSocket
        self.snapshot = snapshot
        self.logger = logger
    }

    public func run() async throws {
        await withGracefulShutdownHandler {
            await self.supervise()
        } onGracefulShutdown: {
            if self.reloading() {
                // systemd shows the unit "reloading" until the next generation's supervisor says READY=1 once it serves.
                var now = timespec()
                clock_gettime(CLOCK_MONOTONIC, &now)
                let microseconds = UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec) / 1_000
                self.send(["RELOADING=1", "MONOTONIC_USEC=\(microseconds)", "STATUS=reloading the configuration: restarting the services"])
            } else {
                self.send(["STOPPING=1", "STATUS=stopping: committing the buffer and sending what is pending"])
            }
        }
    }

    private func supervise() async {
        guard await waitUntilReady() else { return }
        var lastVerdict = gate.verdict()
        if send(["READY=1", "STATUS=" + (await statusLine(lastVerdict))]) {
            logger.info(
                "Told systemd the agent is ready",
                metadata: ["systemd.watchdog": "\(notifier.watchdogTimeout.map { "\($0)" } ?? "off")"])
        }
        let pingInterval = notifier.watchdogPingInterval
        let tick = min(pingInterval ?? Self.statusInterval, Self.statusInterval)
        var nextStatus = ContinuousClock.now + Self.statusInterval
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            let verdict = gate.verdict()
            var lines: [String] = []
            if pingInterval != nil, verdict == .alive { lines.append("WATCHDOG=1") }
            if verdict != lastVerdict {
                if case .stale(let late) = verdict {
                    logger.error(
                        "A component stopped making progress; withholding systemd watchdog pings, systemd restarts the agent if it stays stuck",
                        metadata: ["watchdog.late": "\(late.joined(separator: ", "))"])
                } else if case .stale = lastVerdict {
                    logger.notice("Every component makes progress again; watchdog pings resume")
                }
            }
            if verdict != lastVerdict || ContinuousClock.now >= nextStatus {
                lines.append("STATUS=" + (await statusLine(verdict)))
                nextStatus = ContinuousClock.now + Self.statusInterval
            }
            lastVerdict = verdict
            if !lines.isEmpty { send(lines) }
            do {
                try await cancelWhenGracefulShutdown { try await Task.sleep(for: tick) }
            } catch {
                return
            }
        }
    }

    /// Waits until every component started and the control socket answers; false when shut down first.
    private func waitUntilReady() async -> Bool {
        let path = controlSocket
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            if case .starting = gate.verdict() {
            } else {
                let listening = (try? await runOffPool(name: "farmgate-ready") {
                    do {
                        let fd = try UnixSocket.connect(path, timeoutSeconds: 1)
                        close(fd)
                        return true
                    } catch {
                        return false
                    }
                }) ?? false
                if listening { return true }
            }
            do { try await Task.sleep(for: .milliseconds(50)) } catch { return false }
        }
        return false
    }

    /// How long the status line waits for the buffer's figures: the loop that pings the watchdog and names a stuck
    /// component must never wait on the component it watches.
    static let snapshotTimeout: Duration = .seconds(2)

    /// The status line, from a snapshot that gets ``snapshotTimeout``. The buffer answers it on its thread: a buffer
    /// stuck on its disk (a frozen or failing SD card) held the loop on its first status refresh, so the stuck buffer was
    /// never logged nor shown, and the pings just stopped. One snapshot is asked at a time; while it has not come back
    /// the line says so.
    private func statusLine(_ verdict: WatchdogGate.Verdict) async -> String {
        guard !snapshotInFlight.take() else {
            return AgentStatusLine.unanswered(verdict: verdict, waited: nil)
        }
        let snapshot = self.snapshot
        let inFlight = snapshotInFlight
        let result = await withDeadline(Self.snapshotTimeout) { () -> Result<AgentStatus, any Error> in
            defer { inFlight.clear() }
            do { return .success(try await snapshot()) } catch { return .failure(error) }
        }
        switch result {
        case nil: return AgentStatusLine.unanswered(verdict: verdict, waited: Self.snapshotTimeout)
        case .success(let status)?: return AgentStatusLine.render(status, verdict: verdict)
        case .failure(let error)?: return "cannot read the buffer: \(error)"
        }
    }

    /// Sends `lines`; a failure is logged once, until a send works again (a socket that went away was logged at every
    /// ping). Returns whether the notification went out.
    @discardableResult
    private func send(_ lines: [String]) -> Bool {
        do {
            try notifier.send(lines)
            if notifyFailing.clear() { logger.notice("systemd is notified again") }
            return true
        } catch {
            if !notifyFailing.take() {
                logger.warning("Cannot notify systemd; said once until it works again", metadata: ["error": "\(error)"])
            }
            return false
        }
    }
}

/// The one line `systemctl status` shows for the agent: `42 pending, last upload 3s ago, 12/12 sensors ok`, led by
/// `STUCK: …` when the watchdog holds back and by `BUFFER ERROR …` for an hour after a failed buffer write.
public enum AgentStatusLine {
    /// How long the line shows the buffer's last failed write (`farmgate status` shows it as long as the buffer is open).
    public static let recentBufferError = Timestamp(microseconds: 3_600_000_000)

    /// The line while the buffer does not answer for its figures (its disk stuck?): `waited` how long this refresh
    /// waited, nil when an earlier one is still waiting.
    public static func unanswered(verdict: WatchdogGate.Verdict, waited: Duration?) -> String {
        var parts: [String] = []
        if case .stale(let late) = verdict { parts.append("STUCK: \(late.joined(separator: ", "))") }
        parts.append(
            "the buffer does not answer for its figures" + (waited.map { " within \($0)" } ?? " (still waiting)")
                + ": its disk may be stuck (dmesg, `farmgate doctor`)")
        return parts.joined(separator: ", ")
    }

    public static func render(_ status: AgentStatus, verdict: WatchdogGate.Verdict = .alive) -> String {
        var parts: [String] = []
        if case .stale(let late) = verdict { parts.append("STUCK: \(late.joined(separator: ", "))") }
        if let last = status.buffer.errors?.last, status.now.microseconds - last.at.microseconds < recentBufferError.microseconds {
            // A buffer that cannot write loses new readings or sends acknowledged ones again: first, while it is recent.
            parts.append("BUFFER ERROR \(AgentStatus.age(from: last.at, to: status.now)) ago (\(last.operation)): \(last.message.prefix(80))")
        }
        parts.append("\(status.buffer.pending) pending")
        if let upload = status.upload {
            if let success = upload.lastSuccessAt {
                parts.append("last upload \(AgentStatus.age(from: success, to: status.now)) ago")
            } else {
                parts.append("no upload yet")
            }
            if let held = upload.held {
                parts.append("upload held (\(held.httpStatus) \(held.code))")
            } else if upload.consecutiveFailures > 0 {
                parts.append("\(upload.consecutiveFailures) upload failures in a row")
            }
        } else {
            parts.append("upload off")
        }
        let ok = status.sensors.filter { $0.consecutiveErrors == 0 && $0.lastReadAt != nil }.count
        parts.append("\(ok)/\(status.sensors.count) sensors ok")
        if status.buffer.quarantined > 0 { parts.append("\(status.buffer.quarantined) quarantined") }
        if status.buffer.held > 0 { parts.append("\(status.buffer.held) held (clock not set)") }
        if !status.clockSynchronized { parts.append("clock not synchronized") }
        return parts.joined(separator: ", ")
    }
}
