import FarmgateSupport
import Testing

@testable import FarmgateIngest

@Suite("[notify] configuration")
struct NotifyConfigurationTests {
    @Test("Every key is read; the defaults hold without the section")
    func keys() throws {
        #expect(try IngestConfiguration.parse("", file: "ingest.toml", baseDirectory: "/").notify == NotifyConfiguration())
        let text = """
            [notify]
            enabled = false
            external_url = "https://ingest.example.net/"
            max_attempts = 5
            backoff_initial = "2s"
            backoff_max = "1m"
            request_timeout = "5s"
            connect_timeout = "2s"
            claim_timeout = "30s"
            per_receiver = 3
            max_in_flight = 10
            poll_interval = "500ms"
            """
        let notify = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/").notify
        #expect(
            notify
                == NotifyConfiguration(
                    enabled: false, externalURL: "https://ingest.example.net", maxAttempts: 5, backoffInitial: .seconds(2), backoffMax: .seconds(60),
                    requestTimeout: .seconds(5), connectTimeout: .seconds(2), claimTimeout: .seconds(30), perReceiver: 3, maxInFlight: 10,
                    pollInterval: .milliseconds(500)))
    }

    @Test(
        "Bad values are refused with file, line and key",
        arguments: [
            ("[notify]\nclaim_timeout = \"10s\"\nrequest_timeout = \"15s\"\n", "ingest.toml:2: notify.claim_timeout"),
            ("[notify]\nbackoff_max = \"1s\"\n", "ingest.toml:2: notify.backoff_max"),
            ("[notify]\nexternal_url = \"ingest.example.net\"\n", "ingest.toml:2: notify.external_url"),
            ("[notify]\nca_file = \"/nonexistent/ca.pem\"\n", "ingest.toml:2: notify.ca_file"),
            // A readable file with no certificate (a tester, 2026-12-07: taken by every admin command, then `serve` stopped
            // with "failedToLoadCertificate" and no location).
            ("[notify]\nca_file = \"/etc/passwd\"\n", "ingest.toml:2: notify.ca_file: the CA file /etc/passwd holds no PEM certificate"),
            ("[notify]\nmax_attempt = 3\n", "ingest.toml:2: notify.max_attempt"),
        ])
    func refused(text: String, located: String) {
        do {
            _ = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/")
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.description.hasPrefix(located), "\(error.description)")
        }
    }
}

@Suite("[alerting] configuration and the outbox's retention keys")
struct AlertingConfigurationTests {
    @Test("Every engine timing is a key; the defaults hold without the section")
    func keys() throws {
        let defaults = try IngestConfiguration.parse("", file: "ingest.toml", baseDirectory: "/")
        #expect(defaults.alerting == AlertEngine.Settings())
        #expect(defaults.alerting.tick == .seconds(5) && defaults.alerting.lateAfter == .seconds(300) && defaults.alerting.lateQuiet == .seconds(30))
        #expect(defaults.retention.deliveredNotifications == .seconds(30 * 86_400) && defaults.retention.deadNotifications == .seconds(90 * 86_400))
        let text = """
            [alerting]
            evaluation_interval = "2s"
            late_after = "10m"
            late_quiet = "1m"
            calibration_interval = "1h"
            queue_limit = 50

            [retention]
            delivered_notifications = "7d"
            dead_notifications = "forever"
            """
        let configuration = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/")
        #expect(
            configuration.alerting
                == AlertEngine.Settings(tick: .seconds(2), lateAfter: .seconds(600), lateQuiet: .seconds(60), queueLimit: 50, calibrationInterval: .seconds(3600)))
        #expect(configuration.retention.deliveredNotifications == .seconds(7 * 86_400))
        #expect(configuration.retention.deadNotifications == nil)
    }

    @Test(
        "Bad values are refused with file, line and key",
        arguments: [
            ("[alerting]\nevaluation_interval = \"10ms\"\n", "ingest.toml:2: alerting.evaluation_interval"),
            ("[alerting]\nlate_after = \"soon\"\n", "ingest.toml:2: alerting.late_after"),
            ("[alerting]\n\nlate_quiet = \"2h\"\n", "ingest.toml:3: alerting.late_quiet"),
            ("[alerting]\nqueue_limit = 0\n", "ingest.toml:2: alerting.queue_limit"),
            ("[alerting]\ncalibration_interval = true\n", "ingest.toml:2: alerting.calibration_interval"),
            ("[alerting]\ntick = \"5s\"\n", "ingest.toml:2: alerting.tick"),
            ("[retention]\ndelivered_notifications = \"1h\"\n", "ingest.toml:2: retention.delivered_notifications"),
            ("[retention]\ndead_notifications = \"never\"\n", "ingest.toml:2: retention.dead_notifications"),
        ])
    func refused(text: String, location: String) throws {
        do {
            _ = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/")
            Issue.record("accepted: \(text)")
        } catch {
            #expect(error.description.hasPrefix(location), "\(error.description)")
        }
    }
}
