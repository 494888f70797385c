import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// A command that only groups subcommands (`farmgate sensor`, `farmgate-ingest token`). Named alone it is a usage
/// error, exit 64, listing its subcommands, not its help with exit 0: a script that left the subcommand out must fail.
public protocol SubcommandsOnly: ParsableCommand {}

extension SubcommandsOnly {
    public mutating func run() throws {
        // A group takes no options, so the words of its command line are its path ("farmgate-ingest alert rule").
        let program = CommandLine.arguments.first.map { String($0.split(separator: "/").last ?? Substring($0)) } ?? Self._commandName
        let path = ([program] + CommandLine.arguments.dropFirst().filter { !$0.hasPrefix("-") }).joined(separator: " ")
        let message = CommandLineRules.needsSubcommand(path: path, of: Self.self)
        _ = message.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
        throw ExitCode(64)  // EX_USAGE
    }
}

/// What ArgumentParser leaves unchecked on a command line before it parses.
public enum CommandLineRules {
    /// The problem with `help NAME…` or `NAME… --help` when a name is not a command (`help nosuch`, `nosuch --help`),
    /// which ArgumentParser answers with the nearest known command's help and exit 0; nil when the line is not a help
    /// request or names real commands. After `--help`'s command names come that command's own arguments.
    public static func unknownHelpTopic(_ arguments: [String], root: any ParsableCommand.Type) -> String? {
        let helpCommand = arguments.first == "help"
        guard helpCommand || arguments.contains("--help") || arguments.contains("-h") else { return nil }
        var command = root
        var path = [root._commandName]
        for name in arguments.dropFirst(helpCommand ? 1 : 0) where !name.hasPrefix("-") {
            let subcommands = command.configuration.subcommands
            if subcommands.isEmpty, !helpCommand { return nil }
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

    /// The usage error (the message and the command's usage line) for an option that takes one value given more than
    /// once (`--device a --device b`, `-c x --config y`), which ArgumentParser answers by keeping the last, so that a
    /// script's mistake runs on half of what it said (options declared as arrays may repeat), or a flag given more than
    /// once (`--json --json`, `-y --yes`: a doubled word is a script's mistake too; `--help` is help however often), or
    /// for a negative number given to an option that takes none (`--sequence -5`, which ArgumentParser calls a missing
    /// value); nil when the line has none of them.
    public static func optionProblem(_ arguments: [String], root: any ParsableCommand.Type) -> String? {
        let words = arguments.prefix { $0 != "--" }
        // Cheap first: one option cannot repeat, and the agent's `agent -c FILE` never pays for the lookup below.
        guard words.count(where: { $0.hasPrefix("-") && $0 != "-" }) > 1 else { return nil }
        var command = root
        for word in words where !word.hasPrefix("-") {
            guard let next = command.configuration.subcommands.first(where: { $0._commandName == word || $0.configuration.aliases.contains(word) })
            else { break }
            command = next
        }
        guard let info = try? JSONDecoder().decode(DumpedHelp.self, from: Data(command._dumpHelp().utf8)) else { return nil }
        for argument in info.command.arguments ?? [] where argument.kind == "option" || argument.kind == "flag" {
            let spellings = (argument.names ?? []).map { $0.kind == "long" ? "--" + $0.name : "-" + $0.name }
            let name = spellings.first { $0.hasPrefix("--") } ?? spellings.first ?? "?"
            guard argument.kind == "option" else {
                guard !argument.isRepeating, !spellings.contains("--help") else { continue }
                let given = words.filter { spellings.contains($0) }
                guard given.count > 1 else { continue }
                return usageError("\(name) is a flag but was given \(given.count) times (\(given.joined(separator: ", "))); give it once", of: command, root: root)
            }
            // A negative number after an option that does not take one as its value reads as an option, and
            // ArgumentParser then says the value is missing (`--sequence -5`).
            if argument.parsingStrategy != "unconditional",
                let at = words.indices.first(where: { spellings.contains(words[$0]) && $0 + 1 < words.endIndex && isNegativeNumber(words[$0 + 1]) })
            {
                return usageError("\(name) takes no negative value (got \(words[at + 1]))", of: command, root: root)
            }
            guard !argument.isRepeating else { continue }
            let given = words.filter { word in spellings.contains { word == $0 || word.hasPrefix($0 + "=") } }
            guard given.count > 1 else { continue }
            return usageError("\(name) takes one value but was given \(given.count) times (\(given.joined(separator: ", "))); give it once", of: command, root: root)
        }
        return nil
    }

    /// The usage error for a command group given an option before (or instead of) its subcommand (`farmgate sensor -c
    /// F`), which ArgumentParser calls an unknown option: the group takes none, its subcommands do. Nil when the command
    /// the line's leading words name is no group, or the word after them is no option.
    public static func groupOptionProblem(_ arguments: [String], root: any ParsableCommand.Type) -> String? {
        var command = root
        var path = [root._commandName]
        var rest = arguments[...]
        while let word = rest.first,
            let next = command.configuration.subcommands.first(where: { $0._commandName == word || $0.configuration.aliases.contains(word) })
        {
            command = next
            path.append(next._commandName)
            rest = rest.dropFirst()
        }
        guard !command.configuration.subcommands.isEmpty, let option = rest.first, option != "-", option != "--" else {
            return nil
        }
        // A word that names no subcommand of the group (`farm lst -c F`, `farm delete x`): ArgumentParser spoke of the
        // options or arguments after it instead (a tester, 2026-12-07: "Unknown option '-c'").
        guard option.hasPrefix("-") else {
            let names = command.configuration.subcommands.map { $0._commandName }
            let shown = String(option.prefix(40)).unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7F ? "?" : String($0) }.joined()
            let where_ = path.joined(separator: " ")
            return "Error: '\(shown)' is not a subcommand of \(where_): one of \(names.joined(separator: ", "))\n  See '\(where_) --help' for what each does.\n"
        }
        let name = option.split(separator: "=", maxSplits: 1).first.map(String.init) ?? option
        return needsSubcommand(path: path.joined(separator: " "), of: command, before: name)
    }

    /// "Error: `path` needs a subcommand: one of …", naming the option that came first when one did (options go after
    /// the subcommand), and where each is described.
    static func needsSubcommand(path: String, of group: any ParsableCommand.Type, before option: String? = nil) -> String {
        let names = group.configuration.subcommands.map { $0._commandName }
        let where_ = option.map { " before \($0)" } ?? ""
        return "Error: \(path) needs a subcommand\(where_): one of \(names.joined(separator: ", "))\n  See '\(path) --help' for what each does.\n"
    }

    /// `-5`, `-1.5`, `-1s`: a word that starts like a negative number.
    private static func isNegativeNumber(_ word: String) -> Bool {
        let bytes = Array(word.utf8)
        return bytes.count > 1 && bytes[0] == UInt8(ascii: "-") && (bytes[1] >= UInt8(ascii: "0") && bytes[1] <= UInt8(ascii: "9") || bytes[1] == UInt8(ascii: "."))
    }

    /// The part of ArgumentParser's `--experimental-dump-help` JSON that ``optionProblem(_:root:)`` reads.
    private struct DumpedHelp: Decodable {
        struct Command: Decodable { var arguments: [Argument]? }
        struct Argument: Decodable {
            struct Name: Decodable {
                var kind: String
                var name: String
            }
            var kind: String
            var isRepeating: Bool
            var parsingStrategy: String
            var names: [Name]?
        }
        var command: Command
    }

    /// Runs `root` as ArgumentParser would, after refusing a `help` request for a command that does not exist, an
    /// option of one value or a flag given twice, and a group given an option instead of its subcommand (standard
    /// error, exit 64).
    public static func main<Root: AsyncParsableCommand>(_ root: Root.Type) async {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if let problem = unknownHelpTopic(arguments, root: root) {
            root.exit(withError: ValidationError(problem))
        }
        if let problem = optionProblem(arguments, root: root) { exitWithUsageError(problem) }
        // ArgumentParser's `main`, except that a `ValidationError` thrown by a subcommand's `run()` is shown with that
        // subcommand's usage line: `main` gives the root's (`Usage: farmgate-ingest <subcommand>`).
        var command: any ParsableCommand
        do {
            command = try root.parseAsRoot(arguments)
        } catch {
            // Only a line ArgumentParser refuses (not `--help`, `--version` and the like, which it throws as well).
            if root.exitCode(for: error) == .validationFailure, let problem = groupOptionProblem(arguments, root: root) {
                exitWithUsageError(problem)
            }
            root.exit(withError: error)
        }
        do {
            if var asynchronous = command as? any AsyncParsableCommand {
                try await asynchronous.run()
            } else {
                try command.run()
            }
        } catch let error as ValidationError {
            exitWithUsageError(usageError(error.message, of: type(of: command), root: root))
        } catch {
            root.exit(withError: error)
        }
    }

    /// "Error: …", the usage line of `command` and where its help is, as ArgumentParser words a usage error.
    static func usageError(_ message: String, of command: any ParsableCommand.Type, root: any ParsableCommand.Type) -> String {
        let usage = root.usageString(for: command)
        // The usage line starts with the command's path ("farmgate-ingest alert list --farm <farm> …").
        let path = ([root._commandName] + commandPath(to: command, from: root)).joined(separator: " ")
        return "Error: \(message)\nUsage: \(usage)\n  See '\(path) --help' for more information.\n"
    }

    /// The subcommand names from `root` down to `command` (empty for the root itself).
    private static func commandPath(to command: any ParsableCommand.Type, from root: any ParsableCommand.Type) -> [String] {
        for subcommand in root.configuration.subcommands {
            if subcommand == command { return [subcommand._commandName] }
            let below = commandPath(to: command, from: subcommand)
            if !below.isEmpty { return [subcommand._commandName] + below }
        }
        return []
    }

    private static func exitWithUsageError(_ text: String) -> Never {
        _ = text.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
        exit(64)  // EX_USAGE
    }
}
