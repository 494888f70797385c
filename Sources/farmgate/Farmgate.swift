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
import Logging

@main
struct Farmgate: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "farmgate",
        abstract: "The Farmgate site gateway: reads water-quality sensors, buffers every reading, forwards them to the ingest.",
        discussion: """
            `farmgate agent` is the daemon (systemd runs it). The other commands are for the installer and talk to a running \
            agent over its control socket, or read the configuration file.
            """,
        version: FarmgateVersion.current,
        subcommands: [
            AgentCommand.self, StatusCommand.self, ReloadCommand.self, QuarantineCommand.self, CalibrateCommand.self, ConfigCommand.self, SensorCommand.self,
            ScanCommand.self, DebugCommand.self, EnrollCommand.self, DoctorCommand.self,
        ]
    )

    /// `help nosuch` is a usage error (64), not the root's help.
    static func main() async { await CommandLineRules.main(Self.self) }
}

/// Options every command that reads the agent's configuration shares.
struct ConfigOption: ParsableArguments {
    @Option(
        name: [.short, .long],
        help: ArgumentHelp("The agent's configuration file.", valueName: "file"))
    var config: String = ProcessInfo.processInfo.environment["FARMGATE_CONFIG"] ?? AgentConfiguration.defaultPath

    /// `-c ''` or `FARMGATE_CONFIG=` names no file: a usage error, not "cannot read ''".
    func validate() throws {
        if config.isEmpty {
            throw ValidationError(
                "the configuration path is empty (-c '' or FARMGATE_CONFIG set to nothing): give the agent's configuration file, or leave both out for \(AgentConfiguration.defaultPath)")
        }
    }

    /// Loads the configuration or exits non-zero with the located error.
    func load() throws -> AgentConfiguration {
        do {
            return try AgentConfiguration.load(path: config)
        } catch {
            throw CleanExit.message(error.description, code: 78)  // EX_CONFIG
        }
    }
}

/// `--socket`, which every command that talks to the running agent takes.
struct SocketOption: ParsableArguments {
    @Option(help: ArgumentHelp("The agent's control socket (default: [control] socket of the configuration).", valueName: "path"))
    var socket: String?

    /// An empty or overlong path is a usage error (64), not "cannot reach the agent" (1), and never a silent fallback.
    func validate() throws {
        guard let socket else { return }
        if socket.isEmpty {
            throw ValidationError("--socket is empty: give the agent's control socket, or leave the option out for [control] socket of the configuration")
        }
        if socket.utf8.count > 107 {
            throw ValidationError("--socket is \(socket.utf8.count) bytes, longer than a Unix socket path may be (107)")
        }
    }
}

extension CleanExit {
    /// Prints `text` to standard error and exits with `code`.
    static func message(_ text: String, code: Int32) -> any Error {
        StandardStream.error.write(text + "\n")
        return ExitCode(code)
    }
}

struct AgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "agent",
        abstract: "Run the daemon: sample sensors, buffer readings, upload them.",
        discussion: "Stops gracefully on SIGTERM or SIGINT, committing buffered readings and finishing the upload in flight.")

    @OptionGroup var options: ConfigOption

    func run() async throws {
        // Until the runtime's handler is installed, a SIGHUP (`systemctl reload` right after start) must not end the agent
        // by the default action: the configuration is read just below anyway.
        signal(SIGHUP, SIG_IGN)
        let configuration = try options.load()
        // As `config check` and a reload do: one GPIO line written two ways (17 here, "GPIO17" there), or a line name the
        // chip does not have, is found only on the chips (a tester, 2026-12-07: the agent started with both, and two
        // sensors on one line stored wrong flows). Reads the chips: off the concurrency pool.
        let sensors = configuration.sensors
        do {
            _ = try await runOffPool(name: "farmgate-gpio-check") { try GPIODriver.checkLinesOnChips(sensors) }
        } catch let error as ConfigurationError {
            throw CleanExit.message(error.description, code: 78)  // EX_CONFIG
        }
        let level = SharedLogLevel(configuration.logLevel)
        LoggingSystem.bootstrap { label in
            FollowingLogHandler(StreamLogHandler.standardError(label: label), level: level)
        }
        let logger = Logger(label: "farmgate")
        for warning in configuration.warnings {
            logger.warning("Configuration warning", metadata: ["config.warning": "\(warning.description)"])
        }
        do {
            try await AgentRuntime.run(configuration: configuration, logger: logger, logLevel: level)
        } catch let error as BufferPathError {
            logger.critical("Agent not started", metadata: ["error": "\(error)"])
            throw ExitCode(78)  // EX_CONFIG: the configuration names another program's file
        } catch let error as BufferInUseError {
            logger.critical("Agent not started", metadata: ["error": "\(error)"])
            throw ExitCode(75)  // EX_TEMPFAIL: it may start once the other one stopped
        } catch {
            logger.critical("Agent stopped", metadata: ["error": "\(error)"])
            throw ExitCode(1)
        }
    }
}

struct ConfigCommand: ParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "config",
        abstract: "Check the agent's configuration file.",
        subcommands: [Check.self])

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Validate the configuration and print what the agent would run; exits 78 when it is invalid.")

        @OptionGroup var options: ConfigOption

        func run() throws {
            let configuration = try options.load()
            // GPIO lines resolved on this machine's chips: one line written two ways is found only here.
            let gpioNotes: [String]
            do { gpioNotes = try GPIODriver.checkLinesOnChips(configuration.sensors) } catch {
                throw CleanExit.message(error.description, code: 78)
            }
            print("\(configuration.file): OK")
            print("device      \(configuration.device)")
            print("buffer      \(configuration.buffer.path) (quota \(configuration.buffer.quotaBytes >> 20) MiB, \(configuration.buffer.whenFull.rawValue))")
            print("upload      \(configuration.upload?.endpoint ?? "off (no [upload] section: readings stay in the buffer)")")
            print("control     \(configuration.controlSocket)")
            print("sensors     \(configuration.sensors.count)")
            for sensor in configuration.sensors {
                let d = sensor.descriptor
                // A sensor its driver does not poll (a GPIO switch) is stored on change: its `interval` means nothing.
                let polled = DriverRegistry.standard.driver(named: sensor.driver)?.ignoredKeys(sensor)["interval"] == nil
                let schedule = polled
                    ? "every \(ConfigTable.format(sensor.interval))"
                    : "on change (heartbeat every \(ConfigTable.format(sensor.heartbeat)))"
                print("  \(sensor.id.rawValue.padded(to: 24)) \(sensor.driver.padded(to: 10)) \(d.quantity.rawValue) (\(d.quantity.unit)) \(schedule), resolution \(d.resolution)")
            }
            for note in gpioNotes {
                print("gpio        \(note)")
            }
            for warning in configuration.warnings {
                print("warning     \(warning.description)")
            }
        }
    }
}

struct SensorCommand: ParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "sensor",
        abstract: "Sensors and their drivers.",
        subcommands: [Drivers.self, SensorRead.self, SensorAdd.self, SensorRemove.self])

    struct Drivers: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the drivers this build has, with a configuration to copy.")

        @Flag(help: "Print each driver's sample [[sensor]] table too.")
        var samples = false

        func run() {
            for driver in DriverRegistry.standard.descriptions {
                print("\(driver.kind): \(driver.summary)")
                if samples { print(driver.sampleConfiguration + "\n") }
            }
        }
    }
}
