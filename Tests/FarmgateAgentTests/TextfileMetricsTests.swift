@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

@Suite("Textfile metrics")
struct TextfileMetricsTests {
    static func status(quarantinedByCode: [String: Int] = [:], pending: Int = 42, ok: Int64 = 10) -> AgentStatus {
        let now = Timestamp.now()
        func sensor(_ id: String, driver: String, errors: Int) -> SensorStatus {
            SensorStatus(
                id: id, driver: driver, quantity: "ph", unit: "pH", resolution: "1/100", intervalSeconds: 1, lastValue: 6.1, lastReadAt: now,
                lastError: nil, lastErrorAt: nil, consecutiveErrors: errors, readsOK: ok, readsFailed: 3, suppressed: 0)
        }
        return AgentStatus(
            device: "t", version: "test", pid: 1, startedAt: Timestamp(microseconds: now.microseconds - 60_000_000), now: now,
            clockSynchronized: true,
            buffer: BufferStatistics(
                pending: pending, oldestPending: Timestamp(microseconds: now.microseconds - 30_000_000), uncommitted: 2,
                quarantined: quarantinedByCode.values.reduce(0, +), dropped: 5, duplicatesIgnored: 1, lastSequence: 1000,
                usedBytes: 4096, quotaBytes: 1 << 20, quarantinedByCode: quarantinedByCode, held: 7),
            upload: {
                var upload = UploadStatus(
                    endpoint: "http://x", lastSuccessAt: now, requestsTotal: 9, uploadedTotal: 900, duplicatesTotal: 4, rejectedTotal: 2,
                    quarantinedTotal: 2)
                upload.failuresTotal = ["503": 3, "connection": 2, "buffer": 1]
                return upload
            }(),
            uploadEndpoint: "http://x",
            sensors: [sensor("tank1.ph", driver: "ezo", errors: 0), sensor("tank2.ph", driver: "ezo", errors: 2), sensor("t1", driver: "ds18b20", errors: 0)],
            recentQuarantine: [])
    }

    @Test("The file is well-formed Prometheus text with bounded labels: per driver kind, never per sensor")
    func renders() throws {
        let text = TextfileMetrics.render(Self.status(quarantinedByCode: ["out_of_range": 2, "sequence_conflict": 1]), writtenBytes: 123_456)
        let samples = try PrometheusText.parse(text)
        func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
            samples.first { $0.name == name && $0.labels == labels }?.value
        }
        #expect(value("farmgate_buffer_pending_readings") == 42)
        #expect(value("farmgate_buffer_held_readings") == 7)
        #expect((29...32).contains(value("farmgate_buffer_oldest_pending_age_seconds") ?? 0))
        #expect(value("farmgate_buffer_quarantined_readings", ["code": "out_of_range"]) == 2)
        #expect(value("farmgate_buffer_quarantined_readings", ["code": "sequence_conflict"]) == 1)
        #expect(value("farmgate_upload_readings_total", ["outcome": "accepted"]) == 900)
        #expect(value("farmgate_upload_held") == 0)
        #expect(value("farmgate_driver_reads_total", ["driver": "ezo", "result": "ok"]) == 20)
        #expect(value("farmgate_driver_reads_total", ["driver": "ezo", "result": "error"]) == 6)
        #expect(value("farmgate_driver_failing_sensors", ["driver": "ezo"]) == 1)
        #expect(value("farmgate_driver_failing_sensors", ["driver": "ds18b20"]) == 0)
        #expect(value("farmgate_process_written_bytes_total") == 123_456)
        // `[clock] check = false` (no clock status): not checked, and no synchronised figure (a tester, 2026-12-07: 1
        // was written while the kernel said otherwise).
        #expect(value("farmgate_clock_checked") == 0)
        #expect(value("farmgate_clock_synchronized") == nil)
        var checked = Self.status()
        checked.clock = ClockStatus(synchronized: false, bootID: "b", holdSeconds: 900, correctedTotal: 12)
        let clockSamples = try PrometheusText.parse(TextfileMetrics.render(checked, writtenBytes: nil))
        #expect(clockSamples.first { $0.name == "farmgate_clock_checked" }?.value == 1)
        #expect(clockSamples.first { $0.name == "farmgate_clock_synchronized" }?.value == 0)
        #expect(clockSamples.first { $0.name == "farmgate_clock_corrected_readings_total" }?.value == 12)
        #expect(Self.status().humanReadable().contains("Clock     not checked ([clock] check = false)"))
        #expect(!text.contains("tank1.ph"), "a sensor id became a label")
        #expect(value("farmgate_upload_failures_total", ["status": "503"]) == 3)
        // Failures without an answer's status, whatever their cause in the status, are `none` together.
        #expect(value("farmgate_upload_failures_total", ["status": "none"]) == 3)
        // Prometheus' naming rules (promtool check metrics): a counter ends in _total, and only a counter does.
        for line in text.split(separator: "\n") where line.hasPrefix("# TYPE ") {
            let parts = line.split(separator: " ")
            guard parts.count == 4 else { continue }
            #expect((parts[3] == "counter") == parts[2].hasSuffix("_total"), "\(line)")
        }
    }

    @Test("A reload's new uploader carries on the totals, and the last success to the same endpoint; what describes the connection starts again")
    func uploadTotalsCarryOver() {
        let now = Timestamp.now()
        var previous = UploadStatus(
            endpoint: "http://old/v1/batches", lastAttemptAt: now, lastSuccessAt: now, consecutiveFailures: 4, requestsTotal: 9,
            uploadedTotal: 900, duplicatesTotal: 4, rejectedTotal: 2, quarantinedTotal: 3, renumberedTotal: 5)
        previous.calibrationsUploadedTotal = 6
        previous.calibrationsQuarantinedTotal = 7
        previous.stateRefusalsTotal = 8
        previous.failuresTotal = ["connection": 4]
        var next = UploadStatus(endpoint: "http://new/v1/batches", format: "binary")
        next.carryTotals(from: previous)
        #expect(next.endpoint == "http://new/v1/batches")
        #expect(next.consecutiveFailures == 0)
        #expect(next.format == "binary")
        #expect(next.lastSuccessAt == nil && next.lastAttemptAt == nil, "the new endpoint has not answered yet")
        var same = UploadStatus(endpoint: previous.endpoint)
        same.carryTotals(from: previous)
        #expect(same.lastSuccessAt == now && same.lastAttemptAt == now && same.requestsTotal == 9)
        #expect([next.requestsTotal, next.uploadedTotal, next.duplicatesTotal, next.rejectedTotal, next.quarantinedTotal, next.renumberedTotal]
            == [9, 900, 4, 2, 3, 5])
        #expect([next.calibrationsUploadedTotal, next.calibrationsQuarantinedTotal, next.stateRefusalsTotal] == [6, 7, 8])
        #expect(next.failuresTotal == ["connection": 4])
    }

    /// A failed attempt without an answer was counted under the key `"none"` in `status --json` (a black-box tester,
    /// 2026-12-06). It is `connection` in the status; the metrics keep their documented label, `status="none"`.
    @Test("Attempts that got no answer count as `connection` in the status and under status=\"none\" in the metrics")
    func connectionFailures() async throws {
        let data = try await TestBuffer(count: 3)
        let port = try freePort()  // nobody listens: every attempt fails to connect
        try await withUploader(source: data.buffer, configuration: uploadConfiguration("http://127.0.0.1:\(port)")) { uploader throws in
            #expect(await eventually(timeout: .seconds(30)) { uploader.status().consecutiveFailures >= 2 })
            let upload = uploader.status()
            let failures = upload.failuresTotal ?? [:]
            #expect(failures.keys.sorted() == ["connection"], "\(failures)")
            let count = try #require(failures["connection"])
            var agent = Self.status()
            agent.upload = upload
            let samples = try PrometheusText.parse(TextfileMetrics.render(agent, writtenBytes: nil))
            let failed = samples.filter { $0.name == "farmgate_upload_failures_total" }
            #expect(failed.map(\.labels) == [["status": "none"]] && failed.first?.value == Double(count), "\(failed)")
            #expect(agent.humanReadable().contains("failed attempts since start: connection ×\(count)"), "\(agent.humanReadable())")
        }
    }

    @Test("Failed buffer writes are counted by operation, both labels present from the start")
    func bufferErrors() throws {
        func value(_ text: String, _ operation: String) throws -> Double? {
            try PrometheusText.parse(text).first { $0.name == "farmgate_agent_buffer_errors_total" && $0.labels == ["operation": operation] }?.value
        }
        let healthy = TextfileMetrics.render(Self.status(), writtenBytes: nil)
        #expect(try value(healthy, "commit") == 0)
        #expect(try value(healthy, "acknowledge") == 0)
        var failing = Self.status()
        failing.buffer.errors = BufferErrors(
            commit: 2, acknowledge: 37, last: BufferFailure(operation: "acknowledge", message: "disk I/O error", at: failing.now))
        let text = TextfileMetrics.render(failing, writtenBytes: nil)
        #expect(try value(text, "commit") == 2)
        #expect(try value(text, "acknowledge") == 37)
        #expect(text.contains("# TYPE farmgate_agent_buffer_errors_total counter"))
        #expect(!text.contains("disk I/O error"), "an error message became a label")
    }

    @Test("Quarantine codes get at most 16 labels; odd or excess codes are summed under other")
    func boundedCodes() throws {
        var codes: [String: Int] = ["Bad Code\"": 5]
        for index in 0..<30 { codes["code_\(index)"] = index + 1 }
        let samples = try PrometheusText.parse(TextfileMetrics.render(Self.status(quarantinedByCode: codes), writtenBytes: nil))
        let quarantine = samples.filter { $0.name == "farmgate_buffer_quarantined_readings" }
        #expect(quarantine.count <= TextfileMetrics.maximumCodes + 1)
        #expect(quarantine.reduce(0) { $0 + $1.value } == Double(codes.values.reduce(0, +)))
        #expect(quarantine.contains { $0.labels["code"] == "other" })
        #expect(quarantine.contains { $0.labels["code"] == "code_29" }, "the largest codes keep their own label")
        #expect(!samples.contains { $0.name == "farmgate_process_written_bytes_total" })
    }

    @Test("write_bytes is read from /proc/self/io and grows when this process writes and fsyncs")
    func writtenBytes() throws {
        let before = try #require(TextfileMetrics.processWrittenBytes())
        let dir = try Scratch(prefix: "fg-io")
        try TextfileMetrics.writeAtomically(String(repeating: "x", count: 1 << 20) + "\n", to: dir.file("big.prom"))
        let after = try #require(TextfileMetrics.processWrittenBytes())
        #expect(after >= before + (1 << 20) - 4096, "write_bytes \(before) -> \(after)")
    }

    @Test("Rewritten atomically: a reader polling the file never sees a partial one, and no temporary file is left")
    func atomicRewrite() async throws {
        let dir = try Scratch(prefix: "fg-prom")
        let path = dir.file("farmgate.prom")
        try TextfileMetrics.writeAtomically(TextfileMetrics.render(Self.status(), writtenBytes: 0), to: path)
        let writing = Mutex(true)
        let reads = Mutex((count: 0, failures: [String]()))
        let reader = Thread {
            while writing.withLock({ $0 }) {
                guard let data = FileManager.default.contents(atPath: path) else {
                    reads.withLock { $0.failures.append("file missing") }
                    continue
                }
                let text = String(decoding: data, as: UTF8.self)
                do {
                    let samples = try PrometheusText.parse(text)
                    if samples.last?.name != "farmgate_metrics_written_time_seconds" { throw CancellationError() }
                    reads.withLock { $0.count += 1 }
                } catch {
                    reads.withLock { $0.failures.append("\(error): \(text.suffix(80))") }
                }
            }
        }
        reader.start()
        // Files of varying length (pending grows, codes come and go), so a torn read would show.
        try await runOffPool {
            for round in 0..<300 {
                var codes: [String: Int] = [:]
                for index in 0..<(round % 12) { codes["code_\(index)"] = round }
                try TextfileMetrics.writeAtomically(
                    TextfileMetrics.render(Self.status(quarantinedByCode: codes, pending: round * 997, ok: Int64(round)), writtenBytes: Int64(round)),
                    to: path)
            }
        }
        writing.withLock { $0 = false }
        try await Task.sleep(for: .milliseconds(100))
        let result = reads.withLock { $0 }
        #expect(result.failures.isEmpty, "\(result.failures.prefix(3))")
        #expect(result.count > 10, "the reader read only \(result.count) times")
        let last = try PrometheusText.parse(String(contentsOfFile: path, encoding: .utf8))
        #expect(last.first { $0.name == "farmgate_buffer_pending_readings" }?.value == Double(299 * 997))
        #expect(dir.names() == ["farmgate.prom"])
    }

    @Test("A write into a missing directory fails naming the file and what to check")
    func writeFails() {
        #expect {
            try TextfileMetrics.writeAtomically("x\n", to: "/nonexistent-farmgate/farmgate.prom")
        } throws: { error in
            "\(error)".contains("/nonexistent-farmgate/farmgate.prom.tmp.") && "\(error)".contains("ReadWritePaths")
        }
    }

    @Test("[metrics] textfile and interval are read; a missing or misnamed file is refused with file:line: key")
    func configuration() throws {
        let base = "[device]\nid = \"t\"\n[[sensor]]\nid = \"a.ph\"\ndriver = \"simulated\"\nquantity = \"ph\"\n"
        let scratch = try Scratch(prefix: "fg-metrics-dir")
        let directory = URL(fileURLWithPath: scratch.file("d.prom"))
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: false)
        let parsed = try AgentConfiguration.parse(
            ConfigDocument.parse(base + "[metrics]\ntextfile = \"/var/lib/node_exporter/textfile_collector/farmgate.prom\"\ninterval = \"30s\"\n", file: "/etc/farmgate/agent.toml"))
        #expect(parsed.metrics == MetricsFileConfiguration(path: "/var/lib/node_exporter/textfile_collector/farmgate.prom", interval: .seconds(30)))
        #expect(try AgentConfiguration.parse(ConfigDocument.parse(base, file: "a.toml")).metrics == nil)
        #expect(try AgentConfiguration.parse(ConfigDocument.parse(base + "[metrics]\ntextfile = \"m.prom\"\n", file: "/etc/farmgate/a.toml")).metrics?.path == "/etc/farmgate/m.prom")
        for (bad, expected) in [
            ("[metrics]\ninterval = \"10s\"\n", "textfile: is required"),
            ("[metrics]\ntextfile = \"/tmp/farmgate.txt\"\n", "must end in .prom"),
            ("[metrics]\ntextfile = \"/tmp/f.prom\"\ninterval = \"100ms\"\n", "interval"),
            ("[metrics]\ntextfile = \"/tmp/f.prom\"\nintervall = \"10s\"\n", "intervall"),
            // A tester, 2026-12-07: a directory there passed every check, and no metrics were ever written.
            ("[metrics]\ntextfile = \"\(directory.path)\"\n", "is a directory; the metrics file is replaced as a whole"),
        ] {
            #expect {
                try AgentConfiguration.parse(ConfigDocument.parse(base + bad, file: "agent.toml"))
            } throws: { error in
                "\(error)".contains("agent.toml:") && "\(error)".contains(expected)
            }
        }
    }
}
