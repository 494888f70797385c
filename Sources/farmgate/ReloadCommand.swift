import ArgumentParser
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

/// `farmgate reload`: SIGHUP to the running agent, then its verdict. systemd 252 has no `Type=notify-reload`, so
/// `ExecReload=/bin/kill -HUP` made `systemctl reload farmgate` succeed for a file the agent refused; the unit runs this
/// instead, so that a refused file fails the reload with the agent's reason.
struct ReloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reload",
        abstract: "Make the running agent reload its configuration (SIGHUP) and wait for its verdict.",
        discussion: """
            Exits 0 once the agent applied the file (its new services answer), 78 when it refused it (the reason is \
            printed; it keeps running the configuration it had), 1 when the agent cannot be reached, cannot be signalled \
            or gives no verdict within --timeout. The unit's ExecReload runs it, so `systemctl reload farmgate` fails \
            for a file the agent refuses.
            """)

    @OptionGroup var options: ConfigOption

    @OptionGroup var control: SocketOption
    var socket: String? { control.socket }

    @Option(help: ArgumentHelp("The process to signal (systemd's $MAINPID); it must be the agent answering on the socket.", valueName: "pid"))
    var pid: Int32?

    @Option(help: ArgumentHelp("How long to wait for the verdict, in seconds (1-3600).", valueName: "seconds"))
    var timeout: Int = 90

    func validate() throws {
        guard (1...3600).contains(timeout) else { throw ValidationError("--timeout must be between 1 and 3600 seconds (got \(timeout))") }
        if let pid, pid <= 1 { throw ValidationError("--pid must be the agent's process id, greater than 1 (got \(pid))") }
    }

    func run() throws {
        let (path, before) = try currentStatus()
        // A reload that moves the control socket is answered on the new one, which the agent records beside its buffer.
        let bufferPath = (try? AgentConfiguration.load(path: options.config))?.buffer.path
        // The agent on that socket must be the one that runs this file: another agent's socket named by mistake would
        // reload that agent's own file, and its verdict would be taken for this one's.
        // A file the agent was given as a relative path is taken from its working directory (/proc/PID/cwd); when that
        // cannot be read (another user's process, as a user) the file is not compared.
        if let running = before.configuration?.file, let absolute = Self.absolute(running, ofProcess: before.pid),
            FileSystem.resolvedPath(absolute) != FileSystem.resolvedPath(options.config)
        {
            throw CleanExit.message(
                "farmgate reload: the agent on \(path) (process \(before.pid)) runs \(running), not \(options.config); it was not signalled. Check [control] socket in \(options.config), or give the agent's own configuration with -c",
                code: 1)
        }
        if let pid, pid != before.pid {
            throw CleanExit.message(
                "farmgate reload: the agent on \(path) is process \(before.pid), not \(pid); nothing was signalled. Either --pid names another process (systemd's $MAINPID is the agent it started), or another agent answers on that socket (check [control] socket in \(options.config))",
                code: 1)
        }
        guard kill(before.pid, SIGHUP) == 0 else {
            let reason = String(cString: strerror(errno))
            throw CleanExit.message(
                "farmgate reload: cannot signal the agent (process \(before.pid)): \(reason); run it as the agent's user or as root", code: 1)
        }
        let previous = before.configuration
        let deadline = ContinuousClock.now + .seconds(timeout)
        while ContinuousClock.now < deadline {
            usleep(100_000)
            // An agent that exited gives no verdict (a stop that came during the reload ends it).
            if kill(before.pid, 0) != 0, errno == ESRCH {
                throw CleanExit.message("farmgate reload: the agent (process \(before.pid)) exited before it applied the file; see its log (journalctl -u farmgate)", code: 1)
            }
            // The socket is down for a moment while the services restart: ask again until the deadline.
            let moved = bufferPath.flatMap { ControlServer.recordedSocket(forBuffer: $0) }.flatMap { $0 == path ? nil : $0 }
            guard let status = (try? Self.status(at: path)) ?? moved.flatMap({ try? Self.status(at: $0) }) else { continue }
            if status.pid != before.pid {
                throw CleanExit.message(
                    "farmgate reload: the agent restarted (process \(before.pid) is gone, \(status.pid) answers); see its log (journalctl -u farmgate)", code: 1)
            }
            guard let now = status.configuration else { continue }
            if now.reloads > (previous?.reloads ?? 0) {
                print("farmgate reload: the agent applied \(now.file) (reload \(now.reloads) since it started)")
                return
            }
            if let error = now.lastReloadError, let at = now.lastReloadAt, at != previous?.lastReloadAt {
                throw CleanExit.message(
                    "farmgate reload: the agent refused \(now.file) and keeps running the configuration it had: \(error)", code: 78)  // EX_CONFIG
            }
        }
        throw CleanExit.message(
            "farmgate reload: no verdict from the agent within \(timeout) s (it may still be stopping its services for the new file); see farmgate status and its log",
            code: 1)
    }

    /// `path` as the process `pid` opens it: itself when absolute, else under the process's working directory; nil when
    /// that cannot be read.
    static func absolute(_ path: String, ofProcess pid: Int32) -> String? {
        if path.hasPrefix("/") { return path }
        guard let cwd = FileSystem.linkTarget("/proc/\(pid)/cwd") else { return nil }
        return (cwd == "/" ? "" : cwd) + "/" + path
    }

    /// The agent's status and the socket it answered on: `--socket`, the configuration's, or (a file that does not load:
    /// the agent will refuse it, and says why) the socket the file names and the default one.
    private func currentStatus() throws -> (String, AgentStatus) {
        let (candidates, problem) = StatusCommand.candidateSockets(socket: socket, configPath: options.config)
        var failures: [String] = []
        for path in candidates {
            do {
                return (path, try Self.status(at: path, settling: ControlClient.cliSettling))
            } catch {
                failures.append("\(error)")
            }
        }
        // A file that does not load (emptied, removed) names no socket: say so first, or the default socket's "no such
        // socket, is farmgate agent running?" sends the installer after an agent that runs (a tester, 2026-12-07).
        let unread = problem.map { "\(options.config) does not load (\($0)), so the agent's control socket is not known from it; tried " } ?? ""
        let signal = problem != nil && pid != nil ? ". Fix the file (the agent would refuse it as it is), then reload again; or `kill -HUP \(pid ?? 0)` to have the agent say why it refuses it in its log" : ""
        throw CleanExit.message("farmgate reload: \(unread)\(failures.joined(separator: "; "))\(signal)", code: 1)
    }

    private static func status(at path: String, settling: Duration = .zero) throws -> AgentStatus {
        let answer = try ControlClient.send(ControlRequest(command: "status"), to: path, timeoutSeconds: 5, settling: settling)
        let decoded = try JSONDecoder().decode(ControlAnswer.self, from: Data(answer))
        guard decoded.ok, let status = decoded.status else {
            throw CleanExit.message("farmgate reload: the agent answered: \(decoded.error ?? "unknown error")", code: 1)
        }
        return status
    }
}
