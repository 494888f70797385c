import FarmgateSupport
import Foundation

extension IngestConfiguration {
    /// Reads `[notify]` into ``notify`` (see ``NotifyConfiguration`` for every key and its default).
    mutating func parseNotify(_ table: ConfigTable, baseDirectory: String) throws(ConfigurationError) {
        guard let section = try table.table("notify") else { return }
        try section.checkKeys([
            "enabled", "external_url", "max_attempts", "backoff_initial", "backoff_max", "request_timeout", "connect_timeout", "claim_timeout",
            "per_receiver", "max_in_flight", "poll_interval", "ca_file",
        ])
        if let enabled = try section.bool("enabled") { notify.enabled = enabled }
        if let url = try section.string("external_url") {
            let trimmed = url.hasSuffix("/") ? String(url.dropLast()) : url
            guard trimmed.isEmpty || ((trimmed.hasPrefix("http://") || trimmed.hasPrefix("https://")) && URL(string: trimmed)?.host != nil) else {
                throw section.error("external_url", "must be the ingest's public base URL, such as \"https://ingest.example.net\"")
            }
            notify.externalURL = trimmed
        }
        if let attempts = try section.int("max_attempts", in: 1...1000) { notify.maxAttempts = attempts }
        if let wait = try section.duration("backoff_initial", in: Duration.milliseconds(10)...Duration.seconds(86_400)) { notify.backoffInitial = wait }
        if let wait = try section.duration("backoff_max", in: Duration.milliseconds(10)...Duration.seconds(7 * 86_400)) { notify.backoffMax = wait }
        if notify.backoffMax < notify.backoffInitial {
            throw section.error(section.contains("backoff_max") ? "backoff_max" : "backoff_initial", "backoff_max must be at least backoff_initial")
        }
        if let timeout = try section.duration("request_timeout", in: Duration.milliseconds(100)...Duration.seconds(600)) { notify.requestTimeout = timeout }
        if let timeout = try section.duration("connect_timeout", in: Duration.milliseconds(100)...Duration.seconds(600)) { notify.connectTimeout = timeout }
        if let timeout = try section.duration("claim_timeout", in: Duration.seconds(1)...Duration.seconds(86_400)) { notify.claimTimeout = timeout }
        if notify.claimTimeout <= notify.requestTimeout {
            throw section.error(
                section.contains("claim_timeout") ? "claim_timeout" : "request_timeout",
                "claim_timeout (\(notify.claimTimeout)) must exceed request_timeout (\(notify.requestTimeout)): a delivery still running must never be taken over by another instance")
        }
        if let count = try section.int("per_receiver", in: 1...100) { notify.perReceiver = count }
        if let count = try section.int("max_in_flight", in: 1...10_000) { notify.maxInFlight = count }
        if let interval = try section.duration("poll_interval", in: Duration.milliseconds(10)...Duration.seconds(60)) { notify.pollInterval = interval }
        if let file = try section.string("ca_file") {
            let path = Self.resolve(file, against: baseDirectory)
            guard !file.isEmpty, FileManager.default.isReadableFile(atPath: path) else {
                throw section.error("ca_file", "cannot read \(path); give a PEM file of the CA certificates that receivers' TLS certificates chain to")
            }
            // A file without a certificate would pass every admin command and stop `serve` with no location.
            if let problem = Self.caFileProblem(path) { throw section.error("ca_file", problem) }
            notify.caFile = path
        }
    }
}
