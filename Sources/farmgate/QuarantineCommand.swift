import ArgumentParser
import FarmgateCLI
import FarmgateAgent
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
import Synchronization

/// Where the running agent answers, and how to ask it: the options every command that talks to the agent shares.
struct AgentConnection: ParsableArguments {
    /// Whether this process said already that the configuration does not load.
    private static let warned = Atomic<Bool>(false)

    @OptionGroup var options: ConfigOption

    @OptionGroup var control: SocketOption
    var socket: String? { control.socket }

    /// Sends `command` and returns the agent's answer; exits 1 with the reason when the agent cannot be reached or refuses.
    ///
    /// - Parameters:
    ///   - timeoutSeconds: how long to wait for the answer.
    ///   - unanswered: added to the error when the agent was reached but did not answer (what became of the request).
    func send(
        _ command: String, _ arguments: [String: String] = [:], as name: String, timeoutSeconds: Int = 10, unanswered: String? = nil
    ) throws -> ControlAnswer {
        // As `status` finds the agent: a configuration that does not load (an edit a reload refused) must not hide the
        // running agent, which runs the one it loaded before; then the socket its [control] section names, read
        // leniently, and the default one are tried. Only a socket nobody answers on passes to the next; a request sent
        // and not answered is never sent again.
        let (candidates, problem) = StatusCommand.candidateSockets(socket: socket, configPath: options.config)
        var found: [UInt8]?
        var firstError: (any Error)?
        for path in candidates where found == nil {
            do {
                found = try ControlClient.send(
                    ControlRequest(command: command, arguments: arguments.isEmpty ? nil : arguments), to: path, timeoutSeconds: timeoutSeconds,
                    settling: ControlClient.cliSettling)
                if let problem, !Self.warned.exchange(true, ordering: .relaxed) {  // once, not on every page of a list
                    StandardStream.error.write("farmgate \(name): \(options.config) does not load (\(problem)); the agent on \(path) runs the configuration it loaded before\n")
                }
            } catch let error as ControlSocketError where error.unanswered {
                throw CleanExit.message("farmgate \(name): \(error)\(unanswered.map { "; \($0)" } ?? "")", code: 1)
            } catch {
                firstError = firstError ?? error
            }
        }
        guard let bytes = found else {
            if let problem { throw CleanExit.message("\(problem)\n(and no agent answers on \(candidates.joined(separator: ", ")))", code: 78) }  // EX_CONFIG
            throw CleanExit.message("farmgate \(name): \(firstError.map { "\($0)" } ?? "no control socket to ask")", code: 1)
        }
        let answer: ControlAnswer
        do {
            answer = try JSONDecoder().decode(ControlAnswer.self, from: Data(bytes))
        } catch {
            throw CleanExit.message("farmgate \(name): the agent's answer cannot be read (\(error)); are the CLI and the agent the same version?", code: 1)
        }
        guard answer.ok else {
            throw CleanExit.message("farmgate \(name): the agent answered: \(answer.error ?? "unknown error")", code: 1)
        }
        return answer
    }
}

struct QuarantineCommand: ParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "quarantine",
        abstract: "Review the readings the ingest refused for good: list or export them, send them again, or drop them.",
        discussion: """
            The agent keeps a reading the ingest refused for good (a timestamp too far ahead, a sensor it does not know, ...) \
            aside in quarantine so the queue moves on. Fix the cause, then requeue the readings: they go back into the queue \
            with their original sequence numbers, and the ingest stores each exactly once. All three commands talk to the \
            running agent and exit 1 when it cannot be reached.
            """,
        subcommands: [List.self, Requeue.self, Drop.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List quarantined readings, oldest sequence first (with --json: export them as JSON lines).",
            discussion: """
                The table shows sequence, sensor, timestamp, value (at the sensor's resolution), code, when it was \
                quarantined and the message. --json prints one JSON object per line and nothing else: \
                {"sequence":N,"sensor":"...","timestamp":"RFC 3339","value":6.08,"resolution":"1/100","flags":[...],\
                "code":"...","message":"...","quarantined_at":"RFC 3339"}. Rows are fetched from the agent 1000 at a time \
                and printed as they come, so exporting any number of rows takes little memory.
                """)

        @OptionGroup var agent: AgentConnection

        @Flag(help: "Print JSON lines (one object per reading) instead of a table: the export format.")
        var json = false

        @Option(help: ArgumentHelp("Only readings whose reason has this code, e.g. timestamp_in_future.", valueName: "code"))
        var code: String?

        @Option(parsing: .unconditional, help: ArgumentHelp("Print at most this many readings (default: all).", valueName: "n"))
        var limit: Int?

        func validate() throws {
            if let code, !QuarantineReason.isCode(code) {
                throw ValidationError("--code must be a reason code such as timestamp_in_future (1 to 64 of a-z, 0-9, _), not '\(code)'")
            }
            if let limit, limit < 1 { throw ValidationError("--limit must be at least 1, not \(limit)") }
        }

        func run() throws {
            var after: UInt64 = 0
            var printed = 0
            var events: [QuarantinedCalibration] = []
            let table = QuarantineTable()
            while limit.map({ printed < $0 }) ?? true {
                let pageSize = min(ReadingBuffer.maximumQuarantinePage, limit.map { $0 - printed } ?? Int.max)
                var arguments = ["after": String(after), "limit": String(pageSize)]
                if let code { arguments["code"] = code }
                let page = try agent.send("quarantine.list", arguments, as: "quarantine list").quarantine
                let readings = page?.readings ?? []
                if after == 0 { events = page?.calibrations ?? [] }
                if !readings.isEmpty {
                    var text = printed == 0 && !json ? table.header + "\n" : ""
                    for reading in readings { text += (json ? try QuarantineExport.line(reading) : table.row(reading)) + "\n" }
                    StandardStream.output.write(text)
                    printed += readings.count
                }
                guard let next = page?.nextAfter, !readings.isEmpty else { break }
                after = next
            }
            if !events.isEmpty {
                var text = json ? "" : "\nCalibration events the ingest refused for good (kept here, never sent again):\n" + table.eventHeader + "\n"
                for event in events { text += (json ? try QuarantineExport.line(event) : table.row(event)) + "\n" }
                StandardStream.output.write(text)
            }
            if !json {
                // Through the same unbuffered handle as the rows, so the lines keep their order.
                var summary =
                    printed == 0 && events.isEmpty
                    ? code.map { "No quarantined reading has code \($0)." } ?? "Quarantine is empty."
                    : "\(printed) reading\(printed == 1 ? "" : "s") listed."
                if !events.isEmpty { summary += " \(events.count) calibration event\(events.count == 1 ? "" : "s") listed." }
                StandardStream.output.write(summary + "\n")
            }
        }
    }

    /// The selector `requeue` and `drop` share: exactly one of them.
    struct Selection: ParsableArguments {
        @Flag(help: "Every quarantined reading (and calibration event).")
        var all = false

        @Option(help: ArgumentHelp("The readings whose reason has this code, e.g. timestamp_in_future.", valueName: "code"))
        var code: String?

        @Option(
            name: .customLong("sequence"), parsing: .upToNextOption,
            help: ArgumentHelp("These sequence numbers (repeat the option or list several after it).", valueName: "n"))
        var sequences: [UInt64] = []

        func validate() throws {
            let given = (all ? 1 : 0) + (code == nil ? 0 : 1) + (sequences.isEmpty ? 0 : 1)
            guard given == 1 else {
                throw ValidationError(
                    given == 0
                        ? "say which readings: --all, --code CODE or --sequence N... (farmgate quarantine list shows them)"
                        : "give only one of --all, --code and --sequence")
            }
            if let code, !QuarantineReason.isCode(code) {
                throw ValidationError("--code must be a reason code such as timestamp_in_future (1 to 64 of a-z, 0-9, _), not '\(code)'")
            }
            if sequences.contains(0) { throw ValidationError("--sequence: sequence numbers start at 1") }
            if sequences.count > QuarantineCommands.maximumSequences {
                throw ValidationError("--sequence: at most \(QuarantineCommands.maximumSequences) numbers at once; use --code or --all")
            }
        }

        var arguments: [String: String] {
            if all { return ["all": "true"] }
            if let code { return ["code": code] }
            return ["sequences": sequences.map(String.init).joined(separator: ",")]
        }

        var summary: String {
            if all { return "" }
            if let code { return " with code \(code)" }
            return ""
        }

        /// How long `requeue` and `drop` wait for the agent's answer. The agent works through a large selection in chunks
        /// between its commits and uploads (a million readings take minutes on a Raspberry Pi), and answers when all are
        /// done; the usual 10 s would give up on it while it works.
        static let answerTimeoutSeconds = 3_600

        /// Added to the error when no answer came (`verb`: requeue, drop): a running agent goes on with the job, and what a
        /// stopped one finished stays done.
        static func unanswered(_ verb: String) -> String {
            "an agent that still runs goes on with it, and what it finished stays done (`farmgate status` shows what is left in "
                + "quarantine); run the command again to \(verb) the rest"
        }
    }

    struct Requeue: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send quarantined readings again, with their original sequence numbers (fix the cause first).",
            discussion: """
                A reading whose sensor and timestamp equal those of a reading still waiting to be sent stays in quarantine \
                (the buffer keeps one reading per sensor and timestamp) and is listed; requeue it again once that reading is \
                delivered, or drop it. The agent moves at most 5000 readings per transaction while it goes on sampling and \
                uploading, and answers once all are moved (the command waits up to an hour). If the agent stops midway, the \
                readings already moved stay moved: run the command again to requeue the rest. Exits 1 when nothing could be \
                requeued.
                """)

        @OptionGroup var agent: AgentConnection
        @OptionGroup var selection: Selection

        func run() throws {
            let answer = try agent.send(
                "quarantine.requeue", selection.arguments, as: "quarantine requeue", timeoutSeconds: Selection.answerTimeoutSeconds,
                unanswered: Selection.unanswered("requeue"))
            guard let outcome = answer.quarantine?.requeue else {
                throw CleanExit.message("farmgate quarantine requeue: the agent's answer has no outcome; are the CLI and the agent the same version?", code: 1)
            }
            print("Requeued \(outcome.requeued) reading\(outcome.requeued == 1 ? "" : "s")\(selection.summary) with their original sequence numbers.")
            if !outcome.conflicting.isEmpty {
                print(
                    "Left in quarantine: \(outcome.conflicting.count) whose sensor and timestamp equal a reading waiting to be sent "
                        + "(sequence \(QuarantineTable.list(outcome.conflicting))); requeue them once it is delivered, or drop them.")
            }
            if !outcome.notFound.isEmpty { print("Not in quarantine: sequence \(QuarantineTable.list(outcome.notFound)).") }
            let events = outcome.calibrations ?? 0
            if events > 0 { print("Requeued \(events) calibration event\(events == 1 ? "" : "s"); they go with the next batch.") }
            if outcome.requeued == 0 && events == 0 { throw ExitCode(1) }
        }
    }

    struct Drop: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Delete quarantined readings for good (counted in status and logged by the agent).",
            discussion: """
                Like requeue, the agent works in transactions of at most 5000 readings and answers once all are dropped (the \
                command waits up to an hour); if it stops midway, run the command again to drop the rest. Exits 1 when \
                nothing was dropped.
                """)

        @OptionGroup var agent: AgentConnection
        @OptionGroup var selection: Selection

        func run() throws {
            let answer = try agent.send(
                "quarantine.drop", selection.arguments, as: "quarantine drop", timeoutSeconds: Selection.answerTimeoutSeconds,
                unanswered: Selection.unanswered("drop"))
            guard let outcome = answer.quarantine?.drop else {
                throw CleanExit.message("farmgate quarantine drop: the agent's answer has no outcome; are the CLI and the agent the same version?", code: 1)
            }
            print("Dropped \(outcome.dropped) reading\(outcome.dropped == 1 ? "" : "s")\(selection.summary) for good.")
            if !outcome.notFound.isEmpty { print("Not in quarantine: sequence \(QuarantineTable.list(outcome.notFound)).") }
            let events = outcome.calibrations ?? 0
            if events > 0 { print("Dropped \(events) calibration event\(events == 1 ? "" : "s") for good.") }
            if outcome.dropped == 0 && events == 0 { throw ExitCode(1) }
        }
    }
}

/// The human table of `farmgate quarantine list`.
struct QuarantineTable {
    private func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
    }

    var header: String {
        [pad("SEQ", 10), pad("SENSOR", 20), pad("TIMESTAMP", 27), pad("VALUE", 10), pad("CODE", 22), pad("QUARANTINED", 20), "MESSAGE"]
            .joined(separator: " ")
    }

    func row(_ reading: QuarantinedReading) -> String {
        let quarantined = String(RFC3339.format(reading.quarantinedAt).prefix(19)) + "Z"
        return [
            pad(String(reading.sequence), 10), pad(reading.sensor, 20), pad(RFC3339.format(reading.timestamp), 27),
            pad(Resolution.display(reading.value, resolution: reading.resolution), 10), pad(reading.code, 22), pad(quarantined, 20),
            reading.message,
        ].joined(separator: " ")
    }

    var eventHeader: String {
        [pad("EVENT", 38), pad("SENSOR", 20), pad("TIME", 27), pad("CIRCUIT", 8), pad("CODE", 22), pad("QUARANTINED", 20), "MESSAGE"]
            .joined(separator: " ")
    }

    func row(_ quarantined: QuarantinedCalibration) -> String {
        let at = String(RFC3339.format(quarantined.quarantinedAt).prefix(19)) + "Z"
        return [
            pad(quarantined.event.id, 38), pad(quarantined.event.sensor.rawValue, 20), pad(RFC3339.format(quarantined.event.time), 27),
            pad(quarantined.event.circuit, 8), pad(quarantined.code, 22), pad(at, 20), quarantined.message,
        ].joined(separator: " ")
    }

    /// `1, 2, 3` or `1, 2, 3, ... (12 in all)`.
    static func list(_ sequences: [UInt64]) -> String {
        let shown = sequences.prefix(10).map(String.init).joined(separator: ", ")
        return sequences.count > 10 ? "\(shown), ... (\(sequences.count) in all)" : shown
    }
}

/// One quarantined reading as a line of JSON: the export format of `farmgate quarantine list --json`.
enum QuarantineExport {
    struct Line: Encodable {
        let sequence: UInt64
        let sensor: String
        let timestamp: Timestamp
        let value: Double
        let resolution: String?
        let flags: [String]
        let code: String
        let message: String
        let quarantinedAt: Timestamp

        enum CodingKeys: String, CodingKey {
            case sequence, sensor, timestamp, value, resolution, flags, code, message
            case quarantinedAt = "quarantined_at"
        }
    }

    /// One encoder for every line (creating one per row costs more than the encoding).
    private static let encoder: JSONEncoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }()

    /// A quarantined calibration event as a line of the export: `{"calibration_event": {...}, "code", "message",
    /// "quarantined_at"}` (no `sequence`: events are not readings).
    static func line(_ quarantined: QuarantinedCalibration) throws -> String {
        struct EventLine: Encodable {
            let calibrationEvent: CalibrationEvent
            let code: String
            let message: String
            let quarantinedAt: Timestamp
            enum CodingKeys: String, CodingKey {
                case calibrationEvent = "calibration_event"
                case code, message
                case quarantinedAt = "quarantined_at"
            }
        }
        let line = EventLine(calibrationEvent: quarantined.event, code: quarantined.code, message: quarantined.message, quarantinedAt: quarantined.quarantinedAt)
        do {
            return String(decoding: try encoder.encode(line), as: UTF8.self)
        } catch {
            throw CleanExit.message("farmgate quarantine list: cannot write calibration event \(quarantined.event.id) as JSON: \(error)", code: 1)
        }
    }

    static func line(_ reading: QuarantinedReading) throws -> String {
        let line = Line(
            sequence: reading.sequence, sensor: reading.sensor, timestamp: reading.timestamp, value: reading.value,
            resolution: reading.resolution, flags: QualityFlags.names.filter { reading.quality.contains($0.0) }.map(\.1),
            code: reading.code, message: reading.message, quarantinedAt: reading.quarantinedAt)
        do {
            return String(decoding: try encoder.encode(line), as: UTF8.self)
        } catch {
            throw CleanExit.message("farmgate quarantine list: cannot write reading \(reading.sequence) as JSON: \(error)", code: 1)
        }
    }
}
