import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

@testable import FarmgateAgent

/// `farmgate agent` reloads its configuration on SIGHUP: the real binary, real signals, its control socket.
@Suite("Configuration reload on SIGHUP", .serialized)
struct ConfigurationReloadTests {
    static func configuration(
        sensors: [String], interval: String = "200ms", extra: String = "", buffer: String = "buffer.sqlite", socket: String = "control.sock"
    ) -> String {
        var text = """
            [device]
            id = "reload-site"

            [buffer]
            path = "\(buffer)"
            commit_interval = "100ms"

            [control]
            socket = "\(socket)"

            [clock]
            check = false
            \(extra)

            """
        for id in sensors {
            text += """

                [[sensor]]
                id = "\(id)"
                driver = "simulated"
                quantity = "ph"
                interval = "\(interval)"
                fault_rate = 0
                latency = "0ms"

                """
        }
        return text
    }

    static func status(_ socket: String) async -> AgentStatus? {
        guard let answer = try? await runOffPool(name: "test-status", { try ControlClient.send(ControlRequest(command: "status"), to: socket, timeoutSeconds: 2) })
        else { return nil }
        return (try? JSONDecoder().decode(ControlAnswer.self, from: Data(answer)))?.status
    }

    /// Waits (at most 30 s) until the agent on `socket` has committed a few readings; fails with its log otherwise.
    static func requireSampling(_ socket: String, log: () -> String) async throws {
        let started = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            (await Self.status(socket)?.buffer.lastSequence ?? 0) > 2
        }
        try #require(started, "the agent did not start: \(log())")
    }

    /// The real `farmgate agent` on `config`, its output in `agent.log` of `scratch` (returned with the process).
    static func startAgent(config: String, in scratch: Scratch) throws -> (Process, String) {
        let binary = builtExecutable("farmgate", environmentOverride: "FARMGATE_BINARY")
        let log = scratch.file("agent.log")
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["agent", "--config", config]
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.standardOutput = process.standardError
        try process.run()
        return (process, log)
    }

    /// The real agent on one simulated sensor (`tank1.ph`), sampling: its scratch directory (`agent.toml` in it), control
    /// socket, process and a reader of its log.
    static func samplingAgent(prefix: String) async throws -> (Scratch, String, Process, @Sendable () -> String) {
        let scratch = try Scratch(prefix: prefix, in: URL(fileURLWithPath: "/tmp"))
        let config = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph"]))
        let socket = scratch.file("control.sock")
        let (process, log) = try Self.startAgent(config: config, in: scratch)
        let agentLog: @Sendable () -> String = { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
        do {
            try await Self.requireSampling(socket, log: agentLog)
        } catch {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            throw error
        }
        return (scratch, socket, process, agentLog)
    }

    @Test("an invalid file is refused and the agent keeps running; a valid one adds, removes and changes sensors live")
    func reloadRefusesThenApplies() async throws {
        let scratch = try Scratch(prefix: "fg-reload", in: URL(fileURLWithPath: "/tmp"))
        let config = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph", "tank2.ph"]))
        let socket = scratch.file("control.sock")
        let (process, log) = try Self.startAgent(config: config, in: scratch)
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        func agentLog() -> String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }

        var status: AgentStatus?
        let started = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            status = await Self.status(socket)
            return (status?.buffer.lastSequence ?? 0) > 4
        }
        try #require(started, "the agent did not start: \(agentLog())")
        #expect(status?.configuration?.file == config)
        #expect(status?.configuration?.reloads == 0)

        // 1. An unknown key: refused, located, the agent keeps sampling with the configuration it has.
        _ = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph"], extra: "colour = \"blue\""))
        kill(process.processIdentifier, SIGHUP)
        let refused = await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
            status = await Self.status(socket)
            return status?.configuration?.lastReloadError != nil
        }
        #expect(refused, "no refusal in status: \(agentLog())")
        let error = status?.configuration?.lastReloadError ?? ""
        #expect(error.contains("agent.toml:"), "located: \(error)")
        #expect(error.contains("colour"), "names the key: \(error)")
        #expect(process.isRunning)
        #expect(status?.sensors.map(\.id).sorted() == ["tank1.ph", "tank2.ph"], "the running configuration is kept")
        #expect(status?.configuration?.reloads == 0)
        // `farmgate status -c` with the file the reload refused still reaches the agent (its [control] socket read
        // leniently) and shows the refusal, with the file's error beside it.
        let cli = try await runOffPool(name: "test-status-cli") { () throws -> (Int32, String, String) in
            let process = Process()
            process.executableURL = URL(fileURLWithPath: builtExecutable("farmgate", environmentOverride: "FARMGATE_BINARY"))
            process.arguments = ["status", "--config", config]
            let out = Pipe()
            let err = Pipe()
            process.standardOutput = out
            process.standardError = err
            try process.run()
            let output = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let errors = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            return (process.terminationStatus, output, errors)
        }
        #expect(cli.0 == 0, "\(cli.2)")
        #expect(cli.1.contains("RELOAD REFUSED"), "\(cli.1)")
        #expect(cli.2.contains("does not load") && cli.2.contains("colour"), "\(cli.2)")
        let before = status?.buffer.lastSequence ?? 0
        let sampling = await eventually(timeout: .seconds(10), every: .milliseconds(100)) {
            (await Self.status(socket)?.buffer.lastSequence ?? 0) > before + 4
        }
        #expect(sampling, "the agent kept sampling after the refusal")
        #expect(agentLog().contains("Configuration reload refused"))

        // 2. A valid file: one sensor removed, one added, the interval changed. Applied without a new process.
        let readsBefore = await Self.status(socket)?.sensors.first { $0.id == "tank1.ph" }?.readsOK ?? 0
        #expect(readsBefore > 0)
        _ = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph", "tank3.ph"], interval: "300ms"))
        let pid = process.processIdentifier
        kill(pid, SIGHUP)
        let applied = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            status = await Self.status(socket)
            return status?.configuration?.reloads == 1
        }
        #expect(applied, "the reload was not applied: \(agentLog())")
        #expect(status?.configuration?.lastReloadError == nil)
        #expect(status?.pid == pid, "same process")
        #expect(status?.sensors.map(\.id).sorted() == ["tank1.ph", "tank3.ph"])
        // A sensor kept carries its counters on (the metrics file's counters do not start again at every reload).
        #expect((status?.sensors.first { $0.id == "tank1.ph" }?.readsOK ?? 0) >= readsBefore, "\(readsBefore)")
        let tank3 = await eventually(timeout: .seconds(10), every: .milliseconds(100)) {
            (await Self.status(socket)?.sensors.first { $0.id == "tank3.ph" }?.lastReadAt) != nil
        }
        #expect(tank3, "the added sensor is read")
        let sequenceAfter = status?.buffer.lastSequence ?? 0
        #expect(sequenceAfter >= before, "the buffer and its numbering carry on")

        // 3. SIGTERM still stops it gracefully.
        kill(pid, SIGTERM)
        process.waitUntilExit()
        #expect(process.terminationReason == .exit && process.terminationStatus == 0, "\(agentLog())")
    }

    @Test("A SIGHUP that arrives while a reload is under way is not lost: the file as it is then runs", arguments: [0, 30, 80])
    func hangupDuringReload(delayMilliseconds: Int) async throws {
        let (scratch, socket, process, agentLog) = try await Self.samplingAgent(prefix: "fg-reload-twice")
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }

        _ = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph", "tank2.ph"]))
        kill(process.processIdentifier, SIGHUP)
        if delayMilliseconds > 0 { try await Task.sleep(for: .milliseconds(delayMilliseconds)) }
        _ = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph", "tank2.ph", "tank3.ph"]))
        kill(process.processIdentifier, SIGHUP)
        var status: AgentStatus?
        let latest = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            status = await Self.status(socket)
            return status?.sensors.map(\.id).sorted() == ["tank1.ph", "tank2.ph", "tank3.ph"]
        }
        #expect(latest, "the second SIGHUP was lost: \(status?.sensors.map(\.id) ?? []), \(agentLog())")
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        #expect(process.terminationReason == .exit && process.terminationStatus == 0, "\(agentLog())")
    }

    @Test("A reload applies [log] level to every logger, and keeps the agent's start time")
    func reloadAppliesLogLevel() async throws {
        let (scratch, socket, process, agentLog) = try await Self.samplingAgent(prefix: "fg-reload-level")
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        let startedAt = await Self.status(socket)?.startedAt

        // To "error": the reload's own notices stop appearing from the next reload on.
        _ = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph", "tank2.ph"], extra: "\n[log]\nlevel = \"error\""))
        kill(process.processIdentifier, SIGHUP)
        var status: AgentStatus?
        let first = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            status = await Self.status(socket)
            return status?.configuration?.reloads == 1
        }
        try #require(first, "the reload was not applied: \(agentLog())")
        #expect(status?.startedAt == startedAt, "a reload is not a new start")
        let logged = agentLog().utf8.count
        _ = try scratch.write(
            "agent.toml", Self.configuration(sensors: ["tank1.ph", "tank2.ph", "tank3.ph"], extra: "\n[log]\nlevel = \"error\""))
        kill(process.processIdentifier, SIGHUP)
        let second = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            await Self.status(socket)?.configuration?.reloads == 2
        }
        try #require(second, "the second reload was not applied: \(agentLog())")
        let after = String(decoding: agentLog().utf8.dropFirst(logged), as: UTF8.self)
        #expect(!after.contains("SIGHUP: reloading"), "a notice was logged at level error: \(after)")
        #expect(agentLog().contains("SIGHUP: reloading"), "logged at the start's level info")
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
    }

    // A tester, 2026-12-07: the old file stayed beside the new one, never rewritten, its figures exported for ever.
    @Test("A reload that moves [metrics] textfile removes the old file; one that removes [metrics] removes it too")
    func reloadMovesTheMetricsFile() async throws {
        let (scratch, socket, process, agentLog) = try await Self.samplingAgent(prefix: "fg-reload-metrics")
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        let first = scratch.file("first.prom")
        let second = scratch.file("second.prom")
        for (reload, extra, written, gone) in [
            (1, "\n[metrics]\ntextfile = \"\(first)\"\ninterval = \"1s\"", first, second),
            (2, "\n[metrics]\ntextfile = \"\(second)\"\ninterval = \"1s\"", second, first),
        ] {
            _ = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph", "tank2.ph"], extra: extra))
            kill(process.processIdentifier, SIGHUP)
            let applied = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
                await Self.status(socket)?.configuration?.reloads == reload && FileManager.default.fileExists(atPath: written)
            }
            try #require(applied, "reload \(reload) was not applied: \(agentLog())")
            #expect(!FileManager.default.fileExists(atPath: gone), "reload \(reload) left \(gone)")
        }
        _ = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph", "tank2.ph"]))
        kill(process.processIdentifier, SIGHUP)
        let removed = await eventually(timeout: .seconds(30), every: .milliseconds(100)) {
            await Self.status(socket)?.configuration?.reloads == 3
        }
        try #require(removed, "the third reload was not applied: \(agentLog())")
        #expect(!FileManager.default.fileExists(atPath: second), "a reload without [metrics] left its file")
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
    }

    @Test("SIGTERM right after SIGHUP stops the agent: a stop during a reload is not lost", arguments: [0, 20, 60])
    func stopDuringReload(delayMilliseconds: Int) async throws {
        let (scratch, _, process, agentLog) = try await Self.samplingAgent(prefix: "fg-reload-stop")
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }

        // A valid new configuration, reloaded, and a stop while the reload is validated or the old services stop.
        _ = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph", "tank2.ph"]))
        kill(process.processIdentifier, SIGHUP)
        if delayMilliseconds > 0 { try await Task.sleep(for: .milliseconds(delayMilliseconds)) }
        kill(process.processIdentifier, SIGTERM)
        let stopped = await eventually(timeout: .seconds(30), every: .milliseconds(100)) { !process.isRunning }
        #expect(stopped, "the agent went on running after SIGTERM: \(agentLog())")
        guard stopped else { return }
        #expect(process.terminationReason == .exit && process.terminationStatus == 0, "\(agentLog())")
    }

    // Before the fix, both were accepted: the old services stopped, and a control socket the new generation could not
    // create ended the process (under systemd, a restart loop); a moved buffer left its pending readings behind.
    @Test("a reload that the new services could not start with, moves the buffer or changes the device id is refused and the agent keeps running")
    func reloadRefusesWhatCannotStart() async throws {
        let scratch = try Scratch(prefix: "fg-reload", in: URL(fileURLWithPath: "/tmp"))
        let config = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph"]))
        // A regular file where the new socket's directory would have to be: no user, root included, can create it.
        _ = try scratch.write("not-a-directory", "")
        let socket = scratch.file("control.sock")
        let (process, log) = try Self.startAgent(config: config, in: scratch)
        defer { if process.isRunning { kill(process.processIdentifier, SIGKILL) } }
        func agentLog() -> String { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
        try await Self.requireSampling(socket, log: agentLog)

        for (number, (text, expected)) in [
            (Self.configuration(sensors: ["tank1.ph"], socket: "not-a-directory/control.sock"), "not-a-directory"),
            (Self.configuration(sensors: ["tank1.ph"], buffer: "moved/buffer.sqlite"), "restart the agent"),
            // The buffer's readings carry no device: a new id would send the old device's backlog as the new one's.
            (Self.configuration(sensors: ["tank1.ph"]).replacingOccurrences(of: "id = \"reload-site\"", with: "id = \"other-site\""), "device.id"),
        ].enumerated() {
            _ = try scratch.write("agent.toml", text)
            kill(process.processIdentifier, SIGHUP)
            var status: AgentStatus?
            let refused = await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
                status = await Self.status(socket)
                return status?.configuration?.lastReloadError?.contains(expected) == true
            }
            #expect(refused, "reload \(number) not refused: \(status?.configuration?.lastReloadError ?? "nil"): \(agentLog())")
            #expect(process.isRunning, "\(agentLog())")
            #expect(status?.configuration?.reloads == 0)
            let before = status?.buffer.lastSequence ?? 0
            let sampling = await eventually(timeout: .seconds(10), every: .milliseconds(100)) {
                (await Self.status(socket)?.buffer.lastSequence ?? 0) > before + 2
            }
            #expect(sampling, "the agent kept sampling into the same buffer after refusal \(number)")
            // Ask again only once this refusal is recorded: the next one must be told apart.
            _ = try scratch.write("agent.toml", Self.configuration(sensors: ["tank1.ph"]))
        }
        #expect(!FileManager.default.fileExists(atPath: scratch.file("moved/buffer.sqlite")))

        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        #expect(process.terminationReason == .exit && process.terminationStatus == 0, "\(agentLog())")
    }
}
