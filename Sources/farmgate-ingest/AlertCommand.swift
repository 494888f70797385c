import ArgumentParser

// MARK: alert

/// `farmgate-ingest alert ...`: receivers and the notification outbox (AlertDeliveryCommands.swift); the rules and
/// alerts of the alert engine join it here.
struct AlertCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "alert", abstract: "Manage alerting: receivers and the notification outbox.",
        subcommands: [AlertReceiverCommand.self, AlertOutboxCommand.self])
}
