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
