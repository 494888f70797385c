import ArgumentParser
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
import Logging

struct EnrollCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enroll",
        abstract: "Exchange a one-time enrollment token for this site's device key and point [upload] at the ingest.",
        discussion: """
            The token comes from `farmgate-ingest enroll-token create --farm F --device D` on the ingest. The key is written \
            with mode 0600 to [upload] key_file (default: device.key beside the configuration), owned by the agent's user \
            (`farmgate`) when run as root, and never printed. [upload] endpoint and key_file are set in the configuration; the \
            rest of the file and its comments stay as they are (a missing file is created, a missing [device] id is set to \
            the token's device). Everything local is checked before the token is used. Exits 1 when the exchange fails \
            (expired or used token, ingest unreachable, TLS, an answer for another device than [device] id), 64 on bad arguments, 73 when a file cannot be written, 78 when \
            the configuration cannot be read or edited.
            """)

    @Argument(help: ArgumentHelp("The ingest's base URL, e.g. https://ingest.example.net.", valueName: "url"))
    var url: String

    @Argument(help: ArgumentHelp("The enrollment token (fge_…).", valueName: "token"))
    var token: String

    @OptionGroup var options: ConfigOption

    @Option(name: .customLong("ca-file"), help: ArgumentHelp("A PEM file of CA certificates to trust for the ingest (also written to [upload] ca_file).", valueName: "file"))
    var caFile: String?

    @Option(name: .customLong("key-file"), help: ArgumentHelp("Where to write the key (default: [upload] key_file, else device.key beside the configuration).", valueName: "file"))
    var keyFile: String?

    @Option(help: ArgumentHelp("The user that owns the key file when run as root (default: farmgate, the agent's user).", valueName: "user"))
    var owner: String?

    /// An empty option names nothing: a usage error, not "the user  does not exist" or the current directory as key file.
    func validate() throws {
        for (option, value) in [("--ca-file", caFile), ("--key-file", keyFile), ("--owner", owner)] where value?.isEmpty == true {
            throw ValidationError("\(option) is empty: give a value, or leave the option out for its default")
        }
    }

    func run() async throws {
        let owner = try resolveOwner()
        let request = SiteEnrollment.Request(
            endpoint: url, token: token, configPath: options.config, caFile: caFile, keyFile: keyFile, owner: owner)
        let plan: SiteEnrollment.Plan
        do {
            plan = try await runOffPool(name: "farmgate-enroll") { try SiteEnrollment.prepare(request) }
        } catch let failure as SiteEnrollment.Failure {
            throw CleanExit.message("farmgate enroll: \(failure.description)", code: failure.exitCode)
        }
        if plan.endpoint.lowercased().hasPrefix("http://"), !Self.isLoopback(plan.endpoint) {
            StandardStream.error.write("farmgate enroll: warning: \(plan.endpoint) is plain HTTP: the key and every reading cross the network unencrypted; put TLS in front of the ingest\n")
        }
        var logger = Logger(label: "farmgate-enroll")
        logger.logLevel = .warning
        let answer: EnrollmentAnswer
        do {
            answer = try await SiteEnrollment.exchange(plan, logger: logger)
        } catch {
            throw CleanExit.message("farmgate enroll: \(error.description)", code: error.exitCode)
        }
        let outcome: SiteEnrollment.Outcome
        do {
            outcome = try await runOffPool(name: "farmgate-enroll") { try SiteEnrollment.apply(plan, answer: answer) }
        } catch let failure as SiteEnrollment.Failure {
            throw CleanExit.message("farmgate enroll: \(failure.description)", code: failure.exitCode)
        }
        let action =
            answer.action == .created
            ? "a new device"
            : "an existing device: it has a new key, and its old key no longer works (its readings are kept)"
        print("Enrolled as device \(answer.device) of farm \(answer.farm) (\(action)).")
        if answer.repeated { print("The ingest had answered this token a moment ago; this is the same key again.") }
        print("Key written to \(outcome.keyFile) (mode 0600\(owner.map { ", owner \($0.name)" } ?? "")); it is not shown.")
        print("\(outcome.configPath): [upload] endpoint = \"\(plan.endpoint)\", key_file = \"\(outcome.keyFile)\"\(outcome.deviceIDWritten ? ", [device] id = \"\(answer.device)\"" : "").")
        if let problem = outcome.configurationProblem {
            print("The configuration cannot run the agent yet: \(problem)")
            print("Fix that (add sensors: farmgate sensor drivers --samples, or farmgate scan), then: farmgate doctor && systemctl restart farmgate")
        } else {
            print("Next: farmgate doctor, then systemctl restart farmgate")
        }
    }

    /// The key file's owner: `--owner`, else `farmgate` when run as root; nil (the current user) otherwise.
    func resolveOwner() throws -> AtomicFile.Owner? {
        let isRoot = geteuid() == 0
        guard let name = owner ?? (isRoot ? "farmgate" : nil) else { return nil }
        guard isRoot else {
            throw CleanExit.message("farmgate enroll: only root can give the key file to another user (--owner \(name)); run it with sudo", code: 64)
        }
        guard let found = AtomicFile.Owner.user(named: name) else {
            throw CleanExit.message(
                "farmgate enroll: the user \(name) does not exist; install farmgate (make install or the .deb create the user farmgate), or pass --owner USER",
                code: 64)
        }
        return found
    }

    static func isLoopback(_ endpoint: String) -> Bool {
        guard let host = URL(string: endpoint)?.host?.lowercased() else { return false }
        return host == "localhost" || host.hasPrefix("127.") || host == "::1" || host == "[::1]"
    }
}
