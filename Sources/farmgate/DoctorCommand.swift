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
import Logging

struct DoctorCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "doctor",
        abstract: "Check this site: device permissions, clock, disk, buffer, the ingest and the key; each finding with what to do.",
        discussion: """
            Checks, as the agent's user (farmgate when it exists, else you): every configured serial port and GPIO chip \
            (exists; mode, owner and group let the user open it, or a group that the agent's systemd unit grants, read from \
            farmgate.service and its drop-ins on systemd's unit path, or SYSTEMD_UNIT_PATH), every sensor whose last read \
            in the running agent failed (a warning; a problem after 10 of its intervals without a reading), clock synchronisation \
            (adjtimex), free disk space against the buffer's quota, the buffer (integrity, depth, oldest unsent reading, quarantine; from the running agent when \
            it answers), the key file's mode, the ingest (reachable, TLS verified) and whether it accepts the key for this \
            device (GET /v1/device). Exits 0 when nothing is a problem (warnings allowed), 1 otherwise, 78 when the \
            configuration is invalid.
            """)

    @OptionGroup var options: ConfigOption

    @Option(help: ArgumentHelp("Whose permissions to check (default: farmgate when that user exists, else the current user).", valueName: "user"))
    var user: String?

    /// `--user ''` names nobody: a usage error, not "there is no user ".
    func validate() throws {
        if user?.isEmpty == true { throw ValidationError("--user is empty: give the agent's user (usually farmgate), or leave the option out") }
    }

    @Flag(help: "Print the findings as JSON: {ok, configuration, device, user, findings: [{check, subject, status, message, fix}]}.")
    var json = false

    func run() async throws {
        let configuration: AgentConfiguration
        do {
            configuration = try AgentConfiguration.load(path: options.config)
        } catch {
            if json {
                let report = DoctorReport(
                    configuration: options.config, device: nil, user: user ?? "farmgate",
                    findings: [
                        DoctorFinding(
                            check: "configuration", subject: options.config, status: .problem, message: error.description,
                            fix: "fix the file (farmgate config check says the same), then run farmgate doctor again")
                    ])
                try printJSON(report)
            }
            throw CleanExit.message(error.description, code: 78)
        }
        let checked: UnixUser
        if let user {
            guard let found = UnixUser.named(user) else { throw CleanExit.message("farmgate doctor: there is no user \(user)", code: 64) }
            checked = found
        } else {
            checked = UnixUser.named("farmgate") ?? UnixUser.current
        }
        var quiet = Logger(label: "farmgate-doctor")
        quiet.logLevel = .critical
        let logger = quiet
        let clockHook = ProcessInfo.processInfo.environment[SystemClockSource.testHookVariable]
        let clock = try await runOffPool(name: "farmgate-doctor") {
            // Asked whatever [clock] check says: the agent may not hold readings for the clock, but TLS and the readings'
            // times still depend on it (an unsynchronised clock is then a warning, Doctor.clockFinding).
            SystemClockSource(checkSynchronization: true, testHookPath: clockHook, logger: logger)
        }
        let report = await Doctor.run(
            configuration: configuration, user: checked, clock: clock,
            unitDirectories: ServiceUnit.directories(environment: ProcessInfo.processInfo.environment), logger: logger)
        if json {
            try printJSON(report)
        } else {
            print(report.humanReadable())
        }
        if !report.ok { throw ExitCode(1) }
    }

    private func printJSON(_ report: DoctorReport) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        print(String(decoding: try encoder.encode(report), as: UTF8.self))
    }
}
