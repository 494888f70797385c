import ArgumentParser
import FarmgateCLI
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging

extension AlertReceiverKind: ExpressibleByArgument {}
extension OutboxState: ExpressibleByArgument {}

extension ConfigOption {
    /// Opens the store like `administer` (a missing SQLite file made only when `creatingStore`), and hands over its
    /// outbox role.
    func administerAlerts<T: Sendable>(
        creatingStore: Bool = false, _ body: @escaping @Sendable (AlertDeliveryAdmin, IngestConfiguration, Logger) async throws -> T
    ) async throws -> T {
        let configuration = try load()
        return try await administer(creatingStore: creatingStore) { admin in
            guard let outbox = admin.store as? any NotificationOutboxStore else {
                throw failure("this store keeps no notification outbox")
            }
            var logger = Logger(label: "farmgate-ingest")
            logger.logLevel = .error
            do {
                return try await body(AlertDeliveryAdmin(store: outbox), configuration, logger)
            } catch let error as AlertReceiverSpecError {
                throw failure(error.description, code: 64)
            } catch let error as FarmNameError {
                throw failure(error.description, code: 64)
            } catch let error as OutboxRetryRefused {
                throw failure(error.description)
            } catch let error as DeliveryFailure {
                throw failure(error.description)
            }
        }
    }
}

/// Reads a secret from a file: the whole file without its final line end. Exits 64 when it cannot be read.
func readSecretFile(_ path: String, option: String) throws -> String {
    guard let data = FileManager.default.contents(atPath: path) else {
        throw ValidationError("\(option): cannot read \(path); give a file readable by this user that holds only the secret")
    }
    var text = String(decoding: data, as: UTF8.self)
    while let last = text.last, last == "\n" || last == "\r" { text.removeLast() }
    guard !text.isEmpty else { throw ValidationError("\(option): \(path) is empty") }
    return text
}

struct AlertReceiverCommand: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "receiver", abstract: "Manage where a farm's alert notifications go (webhooks, e-mail).",
        subcommands: [Add.self, Update.self, List.self, Remove.self, Test.self])

    struct Add: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "add", abstract: "Add a receiver: a webhook (Alertmanager format) or an e-mail address.",
            discussion: """
                Webhook: --webhook URL [--secret S | --secret-file FILE]. With a secret every request is signed (X-Farmgate-Timestamp, \
                X-Farmgate-Signature: sha256=HMAC-SHA256(secret, timestamp + "." + body)).
                E-mail: --email TO[,TO...] --smtp smtp://HOST:587 (STARTTLS, required) or smtps://HOST:465 --from ADDR \
                [--username U --password-file FILE].
                Secrets are stored in the ingest's database and never printed.
                """)

        @Option(help: "The farm whose alerts the receiver gets.") var farm: String
        @Option(help: "The receiver's name, unique in the farm (A-Z a-z 0-9 . _ -).") var name: String
        @Option(help: "The webhook URL (http:// or https://).") var webhook: String?
        @Option(help: "The webhook's HMAC secret (visible in the process list: prefer --secret-file).") var secret: String?
        @Option(help: "A file holding the webhook's HMAC secret.") var secretFile: String?
        @Option(help: "E-mail recipients, separated by commas.") var email: String?
        @Option(help: "The SMTP server: smtp://HOST:PORT (STARTTLS) or smtps://HOST:PORT.") var smtp: String?
        @Option(help: "The sender address.") var from: String?
        @Option(help: "The SMTP user name.") var username: String?
        @Option(help: "A file holding the SMTP password.") var passwordFile: String?
        @Option(parsing: .unconditional, help: "At most this many notifications a minute, spaced evenly; more wait (default 60).") var maxPerMinute: Int = 60
        @Option(help: "How long an alert's first notification waits, taking the alert's changes meanwhile into one (e.g. 30s; default 0s).")
        var groupWait = "0s"
        @Option(help: "How long after an alert's last notification its next one waits, taking the changes meanwhile into one (e.g. 5m; default 0s).")
        var groupInterval = "0s"
        @OptionGroup var options: ConfigOption

        /// `--group-wait` and `--group-interval` as durations.
        func grouping() throws -> (wait: Duration, interval: Duration) {
            (try AlertReceiverCommand.duration(groupWait, "--group-wait"), try AlertReceiverCommand.duration(groupInterval, "--group-interval"))
        }

        func validate() throws {
            try validateFarmArgument(farm)
            _ = try grouping()
            switch (webhook, email) {
            case (nil, nil): throw ValidationError("give --webhook URL, or --email TO with --smtp and --from")
            case (.some, .some): throw ValidationError("a receiver is either a webhook or an e-mail address: give --webhook or --email, not both")
            case (.some, nil):
                if smtp != nil || from != nil || username != nil || passwordFile != nil {
                    throw ValidationError("--smtp, --from, --username and --password-file belong to an e-mail receiver (--email)")
                }
                if secret != nil, secretFile != nil { throw ValidationError("give --secret or --secret-file, not both") }
            case (nil, .some):
                if secret != nil || secretFile != nil { throw ValidationError("--secret belongs to a webhook; an SMTP password goes in --password-file") }
                if smtp == nil || from == nil { throw ValidationError("an e-mail receiver needs --smtp smtp://HOST:PORT and --from ADDRESS") }
                if (username == nil) != (passwordFile == nil) { throw ValidationError("give --username and --password-file together") }
            }
        }

        func run() async throws {
            let spec: AlertReceiverSpec
            let (wait, interval) = try grouping()
            if let webhook {
                let key = try secretFile.map { try readSecretFile($0, option: "--secret-file") } ?? secret
                spec = AlertReceiverSpec(
                    name: name, kind: .webhook, url: webhook, secret: key, maxPerMinute: maxPerMinute, groupWait: wait, groupInterval: interval)
            } else {
                let password = try passwordFile.map { try readSecretFile($0, option: "--password-file") }
                spec = AlertReceiverSpec(
                    name: name, kind: .email, url: smtp ?? "", secret: password, username: username, emailFrom: from, emailTo: email,
                    maxPerMinute: maxPerMinute, groupWait: wait, groupInterval: interval)
            }
            let receiver = try await options.administerAlerts(creatingStore: true) { admin, _, _ in try await admin.addReceiver(farm: farm, spec) }
            print("Added receiver \(receiver.name) to farm \(farm): \(AlertDeliveryAdmin.describe(receiver).replacingOccurrences(of: "\t", with: ", ")).")
            print("Try it: farmgate-ingest alert receiver test --farm \(farm) --name \(receiver.name)")
        }
    }

    /// A grouping option's duration.
    static func duration(_ text: String, _ option: String) throws -> Duration {
        guard let duration = ConfigTable.parseDuration(text) else {
            throw ValidationError("\(option) '\(text.prefix(40))' must be a duration such as 0s, 30s, 5m or 1h")
        }
        return duration
    }

    struct Update: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "update", abstract: "Change a receiver's settings, keeping its notifications (only the options given change).",
            discussion: """
                Change the rate limit, the grouping, a webhook's URL or secret (--secret, --secret-file, or --no-secret), an e-mail \
                receiver's recipients, server, sender or login. A receiver's name and kind (webhook or e-mail) cannot change: add a new \
                one and remove this one. Notifications already waiting keep the time they are due; a new grouping applies to those \
                written from now. Every instance uses the new settings from its next delivery.
                """)

        @Option(help: "The farm.") var farm: String
        @Option(help: "The receiver's name.") var name: String
        @Option(help: "A webhook's new URL (http:// or https://).") var webhook: String?
        @Option(help: "A webhook's new HMAC secret (visible in the process list: prefer --secret-file).") var secret: String?
        @Option(help: "A file holding a webhook's new HMAC secret.") var secretFile: String?
        @Flag(help: "Stop signing a webhook's requests.") var noSecret = false
        @Option(help: "New e-mail recipients, separated by commas.") var email: String?
        @Option(help: "A new SMTP server: smtp://HOST:PORT (STARTTLS) or smtps://HOST:PORT.") var smtp: String?
        @Option(help: "A new sender address.") var from: String?
        @Option(help: "A new SMTP user name (with --password-file).") var username: String?
        @Option(help: "A file holding the new SMTP password.") var passwordFile: String?
        @Option(parsing: .unconditional, help: "At most this many notifications a minute.") var maxPerMinute: Int?
        @Option(help: "How long an alert's first notification waits (e.g. 30s; 0s: at once).") var groupWait: String?
        @Option(help: "How long after an alert's last notification its next one waits (e.g. 5m; 0s: at once).") var groupInterval: String?
        @OptionGroup var options: ConfigOption

        func validate() throws {
            try validateFarmArgument(farm)
            if let groupWait { _ = try AlertReceiverCommand.duration(groupWait, "--group-wait") }
            if let groupInterval { _ = try AlertReceiverCommand.duration(groupInterval, "--group-interval") }
            let secrets = [secret != nil, secretFile != nil, noSecret].filter { $0 }.count
            if secrets > 1 { throw ValidationError("give one of --secret, --secret-file and --no-secret") }
            if (username == nil) != (passwordFile == nil) { throw ValidationError("give --username and --password-file together") }
            let webhookOptions = webhook != nil || secrets > 0
            let emailOptions = email != nil || smtp != nil || from != nil || username != nil
            if webhookOptions, emailOptions {
                throw ValidationError("--webhook and the secret options change a webhook; --email, --smtp, --from, --username and --password-file an e-mail receiver: not both")
            }
            if !webhookOptions, !emailOptions, maxPerMinute == nil, groupWait == nil, groupInterval == nil {
                throw ValidationError("nothing to change: give at least one option (see --help)")
            }
        }

        func run() async throws {
            let key = try secretFile.map { try readSecretFile($0, option: "--secret-file") } ?? secret
            let password = try passwordFile.map { try readSecretFile($0, option: "--password-file") }
            let wait = try groupWait.map { try AlertReceiverCommand.duration($0, "--group-wait") }
            let interval = try groupInterval.map { try AlertReceiverCommand.duration($0, "--group-interval") }
            let receiver = try await options.administerAlerts { admin, _, _ in
                try await admin.updateReceiver(farm: farm, name: name) { spec in
                    switch spec.kind {
                    case .webhook:
                        if email != nil || smtp != nil || from != nil || username != nil {
                            throw ValidationError("receiver \(name) is a webhook: --email, --smtp, --from, --username and --password-file belong to an e-mail receiver")
                        }
                        if let webhook { spec.url = webhook }
                        if let key { spec.secret = key }
                        if noSecret { spec.secret = nil }
                    case .email:
                        if webhook != nil || secret != nil || secretFile != nil || noSecret {
                            throw ValidationError("receiver \(name) is an e-mail receiver: --webhook and the secret options belong to a webhook (its password goes in --password-file)")
                        }
                        if let email { spec.emailTo = email }
                        if let smtp { spec.url = smtp }
                        if let from { spec.emailFrom = from }
                        if let username { spec.username = username }
                        if let password { spec.secret = password }
                    }
                    if let maxPerMinute { spec.maxPerMinute = maxPerMinute }
                    if let wait { spec.groupWait = wait }
                    if let interval { spec.groupInterval = interval }
                }
            }
            print("Updated receiver \(receiver.name) of farm \(farm): \(AlertDeliveryAdmin.describe(receiver).replacingOccurrences(of: "\t", with: ", ")).")
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List a farm's receivers (secrets are not shown).")

        @Option(help: "The farm.") var farm: String
        @OptionGroup var options: ConfigOption

        func validate() throws { try validateFarmArgument(farm) }

        func run() async throws {
            let receivers = try await options.administerAlerts { admin, _, _ in try await admin.store.alertReceivers(farm: farm) }
            if receivers.isEmpty {
                print("Farm \(farm) has no receivers; add one with `farmgate-ingest alert receiver add`.")
                return
            }
            print("NAME\tKIND\tTARGET\tAUTH\tRATE\tGROUPING")
            for receiver in receivers { print(AlertDeliveryAdmin.describe(receiver)) }
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "remove", abstract: "Remove a receiver and its notifications (undelivered ones are dropped, and counted).")

        @Option(help: "The farm.") var farm: String
        @Option(help: "The receiver's name.") var name: String
        @Flag(help: "Remove it even while rules name it: it is taken out of them (alerts of a rule left with no receiver notify nobody).") var force = false
        @OptionGroup var options: ConfigOption

        func validate() throws { try validateFarmArgument(farm) }

        func run() async throws {
            let (dropped, rules) = try await options.administerAlerts { admin, _, _ in try await admin.removeReceiver(farm: farm, name: name, force: force) }
            var text = "Removed receiver \(name) from farm \(farm)"
            if dropped > 0 { text += "; \(dropped) undelivered notification(s) to it were dropped" }
            if !rules.isEmpty { text += "; taken out of the rule\(rules.count == 1 ? "" : "s") \(rules.joined(separator: ", "))" }
            print(text + ".")
        }
    }

    struct Test: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "test", abstract: "Send a test notification to a receiver now and say what it answered.",
            discussion: "Sent directly, not through the outbox, with this configuration's [notify] settings (timeouts, ca_file, external_url).")

        @Option(help: "The farm.") var farm: String
        @Option(help: "The receiver's name.") var name: String
        @OptionGroup var options: ConfigOption

        func validate() throws { try validateFarmArgument(farm) }

        func run() async throws {
            let (account, duration) = try await options.administerAlerts { admin, configuration, logger in
                try await admin.test(farm: farm, name: name, configuration: configuration.notify, logger: logger)
            }
            let milliseconds = duration.wholeMilliseconds
            print("Sent a test notification to receiver \(name) of farm \(farm): \(account) in \(milliseconds) ms.")
        }
    }
}

struct AlertOutboxCommand: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "outbox", abstract: "See and retry notifications waiting for, or given up on, delivery.",
        subcommands: [List.self, Retry.self])

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "list", abstract: "List notifications, newest first.",
            discussion: """
                TELLS is how many times the alert fired or resolved in that notification: more than one when later notifications of a \
                flapping alert were merged into it while it waited to be sent. Dead letters (--state dead) are notifications that failed \
                every attempt or were refused for good; retry them with `alert outbox retry ID`.
                """)

        @Option(help: "Only this farm's.") var farm: String?
        @Option(help: "Only this state: pending, delivering, delivered, dead.") var state: OutboxState?
        @Option(parsing: .unconditional, help: "At most this many (default 100).") var limit: Int = 100
        @Flag(help: "Print a JSON array of objects, one notification to a line.") var json = false
        @OptionGroup var options: ConfigOption

        func validate() throws {
            if let farm { try validateFarmArgument(farm) }
            guard (1...100_000).contains(limit) else { throw ValidationError("--limit must be between 1 and 100000") }
        }

        func run() async throws {
            let entries = try await options.administerAlerts { admin, _, _ in
                // An unknown farm is an error, as in every other alert command, not an empty table.
                if let farm, let farms = admin.store as? any AdministrationStore, try await farms.farm(named: farm) == nil {
                    throw IngestStoreError.notFound("farm '\(farm)'")
                }
                return try await admin.store.outboxEntries(farm: farm, state: state, limit: limit)
            }
            if json {
                // One array, as every other list prints, with one notification to a line.
                print("[" + entries.map(AlertDeliveryAdmin.json).joined(separator: ",\n") + "]")
                return
            }
            print("ID\tSTATE\tATTEMPTS\tFARM/RECEIVER\tIDEMPOTENCY KEY\tTELLS\tWHEN\tLAST ERROR")
            for entry in entries { print(AlertDeliveryAdmin.describe(entry)) }
        }
    }

    struct Retry: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "retry", abstract: "Deliver a dead (or pending) notification again now, with its attempts reset and the same idempotency key.")

        @Argument(help: "The notification's id (the first column of `alert outbox list`).") var id: Int64
        @OptionGroup var options: ConfigOption

        func run() async throws {
            try await options.administerAlerts { admin, _, _ in try await admin.store.retryNotification(id: id, now: .now()) }
            print("Notification \(id) is pending again; a running farmgate-ingest serve delivers it within its poll interval.")
        }
    }
}
