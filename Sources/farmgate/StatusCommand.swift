import ArgumentParser
import FarmgateAgent
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show what the running agent is doing: backlog, uploads, quarantine, every sensor's last value or error.",
        discussion: "Exits 1 when the agent cannot be reached.")

    @OptionGroup var options: ConfigOption

    @Option(help: ArgumentHelp("The agent's control socket (default: [control] socket of the configuration).", valueName: "path"))
    var socket: String?

    @Flag(help: "Print the status as JSON (timestamps in RFC 3339).")
    var json = false

    func run() throws {
        let path = try socket ?? options.load().controlSocket
        let answer: [UInt8]
        do {
            answer = try ControlClient.send(ControlRequest(command: "status"), to: path)
        } catch {
            throw CleanExit.message("farmgate status: \(error)", code: 1)
        }
        let decoded: ControlAnswer
        do {
            decoded = try JSONDecoder().decode(ControlAnswer.self, from: Data(answer))
        } catch {
            throw CleanExit.message("farmgate status: the agent's answer is not a status (\(error)); are both the same version?", code: 1)
        }
        guard decoded.ok, let status = decoded.status else {
            throw CleanExit.message("farmgate status: the agent answered: \(decoded.error ?? "unknown error")", code: 1)
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            let data = try encoder.encode(status)
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(status.humanReadable())
        }
    }
}
