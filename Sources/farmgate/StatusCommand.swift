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

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show what the running agent is doing: backlog, uploads, quarantine, every sensor's last value or error.",
        discussion: "Exits 1 when the agent cannot be reached.")

    @OptionGroup var options: ConfigOption

    @OptionGroup var control: SocketOption
    var socket: String? { control.socket }

    @Flag(help: "Print the status as JSON (timestamps in RFC 3339).")
    var json = false

    func run() throws {
        let answer: [UInt8]
        if let socket {
            do {
                answer = try ControlClient.send(ControlRequest(command: "status"), to: socket, settling: ControlClient.cliSettling)
            } catch {
                throw CleanExit.message("farmgate status: \(error)", code: 1)
            }
        } else {
            answer = try askTheAgent()
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

    /// Asks the agent on the configuration's control socket. A configuration file that does not load (an edit a reload
    /// refused) must not hide the running agent, whose status says why it refused it: then the socket its `[control]`
    /// section names, read leniently, and the default one are tried, and the error is printed beside the status.
    private func askTheAgent() throws -> [UInt8] {
        let configuration: AgentConfiguration
        do {
            configuration = try AgentConfiguration.load(path: options.config)
        } catch {
            let problem = error.description
            let candidates = Self.sockets(namedIn: options.config)
            for path in candidates {
                guard let answer = try? ControlClient.send(ControlRequest(command: "status"), to: path, settling: ControlClient.cliSettling) else { continue }
                StandardStream.error.write(
                    "farmgate status: \(options.config) does not load (\(problem)); the agent on \(path) runs the configuration it loaded before\n")
                return answer
            }
            throw CleanExit.message("\(problem)\n(and no agent answers on \(candidates.joined(separator: ", ")))", code: 78)  // EX_CONFIG
        }
        do {
            return try ControlClient.send(ControlRequest(command: "status"), to: configuration.controlSocket, settling: ControlClient.cliSettling)
        } catch {
            // The agent of this buffer may answer elsewhere: the file names a new socket that a reload refused.
            if let recorded = ControlServer.recordedSocket(forBuffer: configuration.buffer.path), recorded != configuration.controlSocket,
                let answer = try? ControlClient.send(ControlRequest(command: "status"), to: recorded, settling: .zero)
            {
                StandardStream.error.write(
                    "farmgate status: the agent of \(configuration.buffer.path) answers on \(recorded), not on \(configuration.controlSocket) as \(options.config) says ([control] socket: a reload that moves it was refused, or the agent has not been reloaded since the edit)\n")
                return answer
            }
            throw CleanExit.message("farmgate status: \(error)", code: 1)
        }
    }

    /// Where the agent of `configuration` may answer: its `[control] socket`, then the socket its running agent recorded
    /// beside the buffer when that is another (the file names a socket a reload refused, or one not reloaded yet).
    static func sockets(of configuration: AgentConfiguration) -> [String] {
        var found = [configuration.controlSocket]
        if let recorded = ControlServer.recordedSocket(forBuffer: configuration.buffer.path), recorded != configuration.controlSocket {
            found.append(recorded)
        }
        return found
    }

    /// Where to ask the agent of the configuration at `path`: `socket` when given; else ``sockets(of:)`` of the loaded
    /// configuration; else, when it does not load (`problem`: why), ``sockets(namedIn:)``.
    static func candidateSockets(socket: String?, configPath path: String) -> (sockets: [String], problem: String?) {
        if let socket { return ([socket], nil) }
        do {
            return (sockets(of: try AgentConfiguration.load(path: path)), nil)
        } catch {
            return (sockets(namedIn: path), error.description)
        }
    }

    /// The `socket = "…"` of the `[control]` section of the file at `path`, read as text whatever else the file holds
    /// (relative to the file's directory, as the agent resolves it), then the socket the agent of its `[buffer] path`
    /// (read the same way, else the default buffer) recorded beside the buffer (an edit that moved the socket is not
    /// applied yet), then (`withDefault`) the default socket.
    static func sockets(namedIn path: String, withDefault: Bool = true) -> [String] {
        var found: [String] = []
        let editor = FileManager.default.contents(atPath: path).map { ConfigFileEditor(text: String(decoding: $0, as: UTF8.self)) }
        let base = URL(fileURLWithPath: path).deletingLastPathComponent().path
        if let socket = editor?.stringValue("socket", in: "control"), !socket.isEmpty {
            found.append(AgentConfiguration.resolve(socket, against: base))
        }
        let buffer = editor?.stringValue("path", in: "buffer").flatMap { $0.isEmpty ? nil : AgentConfiguration.resolve($0, against: base) }
            ?? BufferConfiguration().path
        if let recorded = ControlServer.recordedSocket(forBuffer: buffer), !found.contains(recorded) { found.append(recorded) }
        let fallback = AgentConfiguration.defaultControlSocket
        if withDefault, !found.contains(fallback) { found.append(fallback) }
        return found
    }
}
