import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// A command that only groups subcommands (`farmgate sensor`, `farmgate-ingest token`). Named alone it is a usage
/// error, exit 64, listing its subcommands, not its help with exit 0: a script that left the subcommand out must fail.
public protocol SubcommandsOnly: ParsableCommand {}

extension SubcommandsOnly {
    public mutating func run() throws {
        let names = Self.configuration.subcommands.map { $0._commandName }
        // A group takes no options, so the words of its command line are its path ("farmgate-ingest alert rule").
        let program = CommandLine.arguments.first.map { String($0.split(separator: "/").last ?? Substring($0)) } ?? Self._commandName
        let path = ([program] + CommandLine.arguments.dropFirst().filter { !$0.hasPrefix("-") }).joined(separator: " ")
        let message = "Error: \(path) needs a subcommand: one of \(names.joined(separator: ", "))\n  See '\(path) --help' for what each does.\n"
        _ = message.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
        throw ExitCode(64)  // EX_USAGE
    }
}

/// What ArgumentParser leaves unchecked on a command line before it parses.
public enum CommandLineRules {
    /// The problem with `help NAME…` when a name is not a command (`help nosuch`), which ArgumentParser answers with
    /// the nearest known command's help and exit 0; nil when the line is not a `help` request or names real commands.
    public static func unknownHelpTopic(_ arguments: [String], root: any ParsableCommand.Type) -> String? {
        guard arguments.first == "help" else { return nil }
        var command = root
        var path = [root._commandName]
        for name in arguments.dropFirst() where !name.hasPrefix("-") {
            let subcommands = command.configuration.subcommands
            guard let next = subcommands.first(where: { $0._commandName == name || $0.configuration.aliases.contains(name) }) else {
                let known = subcommands.map { $0._commandName }
                let where_ = path.joined(separator: " ")
                return known.isEmpty
                    ? "help: \(where_) has no subcommands, so '\(name)' is not one; see '\(where_) --help'"
                    : "help: '\(name)' is not a command of \(where_); it has \(known.joined(separator: ", "))"
            }
            command = next
            path.append(next._commandName)
        }
        return nil
    }

    /// Runs `root` as ArgumentParser would, after refusing a `help` request for a command that does not exist
    /// (standard error, exit 64).
    public static func main<Root: AsyncParsableCommand>(_ root: Root.Type) async {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if let problem = unknownHelpTopic(arguments, root: root) {
            root.exit(withError: ValidationError(problem))
        }
        await root.main(arguments)
    }
}
