import FarmgateAgent
import FarmgateTestSupport
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing

/// The real binaries speak systemd's notify protocol to a datagram socket the test binds in systemd's place.
@Suite("End to end: systemd notify", .serialized)
struct SystemdNotifyTests {
    @Test("The agent sends READY=1 once its control socket answers, STATUS lines, WATCHDOG=1 at half WATCHDOG_USEC, STOPPING=1 on SIGTERM; its metrics file moves")
    func agentNotifies() async throws {
        let farm = try await Farm()
        try await farm.startIngest()
        let key = try await farm.createDevice("notify-site")
        let keyFile = try farm.dir.write("notify.key", key + "\n")
        let metricsFile = farm.dir.file("farmgate.prom")
        let config = try farm.agentConfig(
            "agent.toml", device: "notify-site", keyFile: keyFile, sensors: 3, interval: "200ms")
        let text = try String(contentsOfFile: config, encoding: .utf8) + "\n[metrics]\ntextfile = \"\(metricsFile)\"\ninterval = \"1s\"\n"
        try text.write(toFile: config, atomically: true, encoding: .utf8)
        // An abstract socket name, as systemd uses for user managers and containers.
        let listener = try NotifyListener(address: "@farmgate-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        defer { listener.stop() }
        let started = ContinuousClock.now
        let agent = try Child(
            Farm.agentBinary, ["agent", "--config", config], logPath: farm.dir.file("agent.log"),
            environment: ["NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000"])

        let ready = await eventually(timeout: .seconds(30), every: .milliseconds(10)) { !listener.messages(with: "READY=1").isEmpty }
        #expect(ready, "no READY=1: \(agent.log)")
        // READY=1 promises a serving agent: the control socket answers at once.
        let status = try await farm.agentStatus(config: config)
        #expect(status != nil, "READY=1 came before the control socket answered")
        #expect(listener.messages(with: "READY=1").first?.fields.contains { $0.hasPrefix("STATUS=") && $0.contains("pending") } == true)

        // Watchdog pings every 200 ms (half of 400 ms), only after READY=1.
        try await Task.sleep(for: .seconds(3))
        let readyAt = listener.messages(with: "READY=1")[0].at
        let pings = listener.messages(with: "WATCHDOG=1")
        #expect(pings.allSatisfy { $0.at >= readyAt })
        let window = pings.filter { $0.at > readyAt + .milliseconds(500) }
        if let first = window.first, let last = window.last, window.count > 1 {
            let mean = first.at.duration(to: last.at) / Double(window.count - 1)
            #expect(mean > .milliseconds(150) && mean < .milliseconds(500), "mean gap between pings \(mean)")
        } else {
            Issue.record("too few WATCHDOG=1 pings: \(pings.count) since \(started.duration(to: readyAt)) after start")
        }

        // STATUS lines go on (every 5 s) and say what systemctl status should: pending, upload, sensors.
        let moreStatus = await eventually(timeout: .seconds(15), every: .milliseconds(100)) { listener.statusLines.count >= 2 }
        #expect(moreStatus)
        let lastStatus = listener.statusLines.last ?? ""
        #expect(lastStatus.contains("pending") && lastStatus.contains("last upload") && lastStatus.contains("3/3 sensors ok"), "\(lastStatus)")

        // The metrics file is valid Prometheus text and its counters move.
        let first = try PrometheusText.parse(String(contentsOfFile: metricsFile, encoding: .utf8))
        let reads = { (samples: [PrometheusText.Sample]) in
            samples.first { $0.name == "farmgate_driver_reads_total" && $0.labels == ["driver": "simulated", "result": "ok"] }?.value ?? -1
        }
        let moved = try await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            try reads(PrometheusText.parse(String(contentsOfFile: metricsFile, encoding: .utf8))) > reads(first)
        }
        #expect(moved, "farmgate_driver_reads_total did not move")
        let accepted = try PrometheusText.parse(String(contentsOfFile: metricsFile, encoding: .utf8)).first {
            $0.name == "farmgate_upload_readings_total" && $0.labels["outcome"] == "accepted"
        }
        #expect((accepted?.value ?? 0) > 0)

        // A reload (systemctl reload: SIGHUP) says RELOADING=1 with the monotonic time, then READY=1 once it serves again.
        let readies = listener.messages(with: "READY=1").count
        agent.signal(SIGHUP)
        let reloaded = await eventually(timeout: .seconds(30), every: .milliseconds(20)) { listener.messages(with: "READY=1").count > readies }
        #expect(reloaded, "no READY=1 after the reload: \(agent.log)")
        let reloading = listener.messages(with: "RELOADING=1")
        #expect(reloading.count == 1 && reloading[0].fields.contains { $0.hasPrefix("MONOTONIC_USEC=") && UInt64($0.dropFirst(15)) != nil }, "\(reloading)")
        #expect(reloading.first.map { $0.at <= listener.messages(with: "READY=1")[readies].at } == true)

        let exit = await agent.stop(SIGTERM)
        #expect(exit == 0, "\(agent.log)")
        #expect(!listener.messages(with: "STOPPING=1").isEmpty, "no STOPPING=1")
        await farm.ingest?.stop()
    }

    @Test("The ingest extends its start while it migrates, sends READY=1 once /readyz answers, STATUS with the last minute's requests, STOPPING=1 on SIGTERM")
    func ingestNotifies() async throws {
        let farm = try await Farm()
        let path = farm.dir.file("notify.sock")
        let listener = try NotifyListener(address: path)
        defer { listener.stop() }
        let ingest = try Child(
            Farm.ingestBinary, ["serve", "--config", farm.ingestConfig], logPath: farm.dir.file("ingest.log"),
            environment: ["NOTIFY_SOCKET": path])
        let ready = await eventually(timeout: .seconds(30), every: .milliseconds(10)) { !listener.messages(with: "READY=1").isEmpty }
        #expect(ready, "no READY=1: \(ingest.log)")
        #expect(await farm.httpStatus("/readyz") == 200, "READY=1 came before /readyz answered")
        // Before it listens it migrates, saying so and extending the start's timeout (a long migration is no hang).
        let readyAt = listener.messages(with: "READY=1")[0].at
        #expect(listener.messages(with: "EXTEND_TIMEOUT_USEC=90000000").contains { $0.at <= readyAt }, "\(listener.received.map(\.fields))")
        #expect(listener.statusLines.first == "migrating the store's schema", "\(listener.statusLines)")
        #expect(
            listener.messages(with: "READY=1")[0].fields.contains { $0.hasPrefix("STATUS=serving; last minute: ") },
            "\(listener.received.map(\.fields))")
        for _ in 0..<4 { _ = await farm.httpStatus("/healthz") }
        // The next status line (every 10 s) counts those requests.
        let counted = await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
            listener.statusLines.dropFirst().contains { line in
                line.split(separator: " ").dropFirst(3).first.flatMap { Int($0) }.map { $0 >= 5 } ?? false
            }
        }
        #expect(counted, "\(listener.statusLines)")
        let exit = await ingest.stop(SIGTERM)
        #expect(exit == 0, "\(ingest.log)")
        #expect(!listener.messages(with: "STOPPING=1").isEmpty, "no STOPPING=1")
    }
}
