import FarmgateAgent
import FarmgateIngest
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

/// Alerting end to end with real processes, as a farm sees it: two real agents, each uploading to its own instance of
/// `farmgate-ingest serve` on one PostgreSQL database; a pH rule notifying a webhook that fails intermittently (5xx,
/// resets, closes) and an e-mail address on a local SMTP server (STARTTLS, AUTH); both instances stopped for 45 s while
/// the pH keeps crossing the threshold, then started again. Fails, never skips, without the cluster of `make test`.
@Suite("End to end: alerts through an outage, two instances on PostgreSQL", .serialized)
struct AlertOutageEndToEndTests {
    /// A webhook request and the Alertmanager body it carried.
    struct Delivery {
        var request: RecordedRequest
        var body: AlertmanagerWebhook
        var answered: Bool
    }

    @Test(
        "Every transition is notified exactly once per receiver across instances; an outage's transitions fold into one late notification per alert"
    )
    func outageAcrossInstances() async throws {
        let cluster = try PostgresEndToEndTests.Cluster.fromEnvironment()
        let farm = try await Farm(databaseURL: try await cluster.createDatabase())
        let certificates = try await TestCertificates.make(in: farm.dir.path)
        var mailOptions = SMTPSink.Options()
        mailOptions.credentials = ("farm", "pa55 word")
        let sink = try await SMTPSink(certificate: certificates.certificateFile, key: certificates.keyFile, options: mailOptions)
        // Half of the requests fail, each in another way; a repeat must carry the same key and body.
        let pattern: [TestResponse] = [
            .reply(500), .reply(200), .reset, .reply(200), .reply(503, headers: ["Retry-After": "0"]), .reply(200), .close, .reply(200),
        ]
        let hook = try TestHTTPServer { _, index in pattern[index % pattern.count] }
        defer { hook.stop() }
        func deliveries() -> [Delivery] {
            hook.requests.enumerated().compactMap { index, request in
                guard let body = try? JSONDecoder().decode(AlertmanagerWebhook.self, from: Data(request.body)) else { return nil }
                var answered = false
                if case .reply(200, _, _) = pattern[index % pattern.count] { answered = true }
                return Delivery(request: request, body: body, answered: answered)
            }
        }

        // Readings older than 10 s on arrival are late; a backlog is reported once it has been quiet 5 s.
        try (try String(contentsOfFile: farm.ingestConfig, encoding: .utf8) + """

            [alerting]
            evaluation_interval = "500ms"
            late_after = "10s"
            late_quiet = "5s"

            [notify]
            poll_interval = "500ms"
            backoff_initial = "100ms"
            backoff_max = "1s"
            request_timeout = "3s"
            ca_file = "\(certificates.caFile)"
            external_url = "https://ingest.example.net"

            """).write(toFile: farm.ingestConfig, atomically: true, encoding: .utf8)
        let secretFile = try farm.dir.write("hook.secret", "s3cret\n")
        let passwordFile = try farm.dir.write("smtp.password", "pa55 word\n")
        try await farm.admin([
            "alert", "receiver", "add", "--farm", "e2e", "--name", "hook", "--webhook", hook.url + "/alerts", "--secret-file", secretFile,
            "--max-per-minute", "6000",
        ])
        try await farm.admin([
            "alert", "receiver", "add", "--farm", "e2e", "--name", "mail", "--email", "grower@farm.example", "--smtp", sink.url, "--from",
            "ingest@farm.example", "--username", "farm", "--password-file", passwordFile, "--max-per-minute", "6000",
        ])
        try await farm.admin([
            "alert", "rule", "add", "--farm", "e2e", "--name", "ph-low", "--kind", "below", "--quantity", "ph", "--threshold", "5.5", "--clear", "5.6",
            "--receiver", "hook", "--receiver", "mail",
        ])

        // Instance A on the farm's port, B on another; site-a uploads to A, site-b to B. The pH swings 5.0–7.0 every
        // 20 s: below 5.5 for about 6.7 s of each swing, so the alert fires and resolves every 20 s.
        let portB = try freePort()
        try await farm.startIngest()
        var instanceB = try await farm.startOtherInstance(port: portB)
        var agents: [String: Child] = [:]
        var configs: [String: String] = [:]
        for (device, endpoint) in [("site-a", farm.endpoint), ("site-b", "http://127.0.0.1:\(portB)")] {
            let key = try await farm.createDevice(device)
            let keyFile = try farm.dir.write("\(device).key", key + "\n")
            let base = try farm.agentConfig("\(device).toml", device: device, keyFile: keyFile, sensors: 0, interval: "250ms", endpoint: endpoint)
            let config = try farm.dir.write(
                "\(device).toml",
                try String(contentsOfFile: base, encoding: .utf8) + """

                    [[sensor]]
                    id = "tank1.ph"
                    driver = "simulated"
                    quantity = "ph"
                    interval = "250ms"
                    base = 6.0
                    amplitude = 1.0
                    period = "20s"
                    noise = 0
                    walk = 0
                    fault_rate = 0
                    latency = "0ms"

                    """)
            configs[device] = config
            agents[device] = try farm.startAgent(config: config, log: "\(device).log")
        }
        func logs() -> String {
            "A: \(farm.ingest?.log.suffix(3000) ?? "")\nB: \(instanceB.log.suffix(3000))\nagents: \(agents.values.map { $0.log.suffix(1500) })"
        }
        func devices(_ filter: (Delivery) -> Bool) -> Set<String> {
            Set(deliveries().filter { $0.answered && filter($0) }.compactMap { $0.body.alerts.first?.labels["device"] })
        }

        // Live: each device's alert fires and resolves, notified as it happens.
        let live = await eventually(timeout: .seconds(70), every: .milliseconds(500)) {
            devices { !$0.body.farmgate.late && $0.body.status == "resolved" } == ["site-a", "site-b"]
        }
        try #require(live, "no live firing and resolved notifications for both devices: \(logs())")

        // The outage: both instances stop; the agents keep measuring into their buffers.
        await farm.ingest?.stop()
        #expect(await instanceB.stop() == 0, "B did not stop gracefully: \(instanceB.log.suffix(2000))")
        let outageStart = Timestamp.now()
        try await Task.sleep(for: .seconds(45))
        let outageEnd = Timestamp.now()
        try await farm.startIngest()
        instanceB = try await farm.startOtherInstance(port: portB, name: "b2")

        // One late notification per alert and receiver, once the backlog has arrived and been quiet.
        let reported = await eventually(timeout: .seconds(60), every: .milliseconds(500)) {
            devices { $0.body.farmgate.late } == ["site-a", "site-b"]
        }
        if !reported {
            // What the webhook saw, and where the outbox stands: a late notification written but not delivered, or never written.
            let seen = hook.requests.enumerated().map { index, request in
                let body = try? JSONDecoder().decode(AlertmanagerWebhook.self, from: Data(request.body))
                return "#\(index) \(pattern[index % pattern.count]) key=\(body?.farmgate.idempotencyKey ?? "?") device=\(body?.alerts.first?.labels["device"] ?? "?") late=\(body?.farmgate.late ?? false) \(body?.status ?? "?")"
            }
            let rows = (try? await outbox(farm)) ?? []
            Issue.record(
                """
                no late notification for both devices after the outage
                webhook requests: \(seen.joined(separator: "\n"))
                outbox: \(rows.map { "\($0.receiver) \($0.key) \($0.state) \($0.lastError ?? "")" }.joined(separator: "\n"))
                \(logs())
                """)
        }
        for (device, config) in configs {
            // Every reading of the outage acknowledged. Not "nothing pending": a reading every 250 ms, committed within
            // 100 ms and sent within 200 ms, is pending most of the time, and polls every 500 ms can keep landing then.
            let drained = try await eventually(timeout: .seconds(30), every: .milliseconds(500)) {
                guard let buffer = try await farm.agentStatus(config: config)?.buffer else { return false }
                return buffer.pending == 0 || (buffer.oldestPending.map { $0 >= outageEnd } ?? true)
            }
            #expect(drained, "\(device) did not drain its backlog: \(logs())")
        }
        // The agents stop (the pH would go on swinging); late reports wait for 5 s of quiet: give every notification
        // time to be written and delivered.
        for agent in agents.values { #expect(await agent.stop() == 0, "\(agent.log.suffix(2000))") }
        try await Task.sleep(for: .seconds(7))
        let settled = try await eventually(timeout: .seconds(60), every: .milliseconds(500)) {
            let entries = try await outbox(farm)
            return !entries.isEmpty && entries.allSatisfy { $0.state == "delivered" }
        }
        let entries = try await outbox(farm)
        #expect(settled, "notifications not delivered: \(entries.filter { $0.state != "delivered" }.map { "\($0.receiver) \($0.state) \($0.lastError ?? "")" })")
        await farm.ingest?.stop()
        #expect(await instanceB.stop() == 0, "B did not stop gracefully: \(instanceB.log.suffix(2000))")
        await sink.stop()

        // Exactly once per receiver: the webhook saw each outbox key, repeats only with the same body, every request signed.
        let hookKeys = Set(entries.filter { $0.receiver == "hook" }.map(\.key))
        let all = deliveries()
        #expect(all.count == hook.requests.count, "a webhook request was not an Alertmanager body")
        #expect(Set(all.map(\.body.farmgate.idempotencyKey)) == hookKeys)
        #expect(Set(all.filter(\.answered).map(\.body.farmgate.idempotencyKey)) == hookKeys, "a notification was never answered 200")
        let byKey = Dictionary(grouping: all, by: { $0.body.farmgate.idempotencyKey })
        for (key, requests) in byKey {
            #expect(Set(requests.map(\.request.body)).count == 1, "notification \(key) was sent with different bodies")
            #expect(requests.allSatisfy { $0.request.headers["idempotency-key"] == key })
        }
        for delivery in all {
            let request = delivery.request
            #expect(
                WebhookSignature.verify(
                    body: request.body, timestamp: request.headers["x-farmgate-timestamp"] ?? "", signature: request.headers["x-farmgate-signature"] ?? "",
                    secret: "s3cret", now: Timestamp.now().microseconds / 1_000_000), "a request does not verify")
        }
        let mailKeys = sink.messages.compactMap { message in
            message.data.split(separator: "\r\n").first { $0.hasPrefix("X-Farmgate-Idempotency-Key: ") }.map { String($0.dropFirst(28)) }
        }
        #expect(mailKeys.count == sink.messages.count, "a message without its idempotency key")
        #expect(mailKeys.count == Set(mailKeys).count, "a notification was mailed twice")
        #expect(Set(mailKeys) == Set(entries.filter { $0.receiver == "mail" }.map(\.key)))
        #expect(sink.messages.allSatisfy { $0.tls }, "a message went out before STARTTLS")

        // The outage: per alert, exactly one late notification, which tells of the swings the site lived through
        // offline; nothing live for a transition in the middle of it (the last 10 s of the outage are not late on
        // arrival, and the agents' newest readings may arrive first, so only the stretch before is checked).
        let unique = byKey.compactMap { $0.value.first?.body }
        for device in ["site-a", "site-b"] {
            let mine = unique.filter { $0.alerts.first?.labels["device"] == device }
            let late = mine.filter(\.farmgate.late)
            #expect(late.count == 1, "\(device): \(late.count) late notifications: \(late.map(\.farmgate.transitions))\n\(logs())")
            if let report = late.first {
                // Two full swings fall in the 45 s: at least a firing and a resolution, each in the list.
                #expect(report.farmgate.transitions.count >= 2, "\(device): \(report.farmgate.transitions)")
                #expect(report.alerts.first?.annotations["description"]?.contains("late") == true, "\(report.alerts.first?.annotations ?? [:])")
            }
            let quietFrom = outageStart.microseconds + 2_000_000
            let quietTo = outageEnd.microseconds - 12_000_000
            for notification in mine where !notification.farmgate.late {
                guard let alert = notification.alerts.first else { continue }
                let text = notification.status == "firing" ? alert.startsAt : alert.endsAt
                guard let time = RFC3339.parse(text) else {
                    Issue.record("\(device): unreadable time '\(text)' in a \(notification.status) notification")
                    continue
                }
                #expect(
                    !(quietFrom...quietTo).contains(time.microseconds),
                    "\(device): a live \(notification.status) notification for \(text), inside the outage \(RFC3339.format(outageStart))–\(RFC3339.format(outageEnd))")
            }
        }
    }

    struct OutboxRow {
        var receiver: String
        var key: String
        var state: String
        var lastError: String?
    }

    /// The farm's outbox through the real CLI (`alert outbox list --json`).
    func outbox(_ farm: Farm) async throws -> [OutboxRow] {
        let output = try await farm.admin(["alert", "outbox", "list", "--farm", "e2e", "--json", "--limit", "10000"])
        let objects = try #require(try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [[String: Any]], "not a JSON array: \(output)")
        return try objects.map { object in
            OutboxRow(
                receiver: try #require(object["receiver"] as? String), key: try #require(object["idempotency_key"] as? String),
                state: try #require(object["state"] as? String), lastError: object["last_error"] as? String)
        }
    }
}
