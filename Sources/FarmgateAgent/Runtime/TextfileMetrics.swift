#if canImport(Glibc)
import Glibc
#endif
import FarmgateSupport
import FarmgateWire
import Logging
import ServiceLifecycle

/// `[metrics]`: the agent's metrics as a file for node_exporter's textfile collector (the agent links no HTTP server).
public struct MetricsFileConfiguration: Sendable, Hashable {
    /// `[metrics] textfile`: the file to write, e.g. `/var/lib/node_exporter/textfile_collector/farmgate.prom`. Its
    /// directory must exist and be writable by the agent (it writes a temporary file there and renames it).
    public var path: String
    /// `[metrics] interval`: how often the file is rewritten. Default 15 s (1 s–1 h).
    public var interval: Duration

    public init(path: String, interval: Duration = .seconds(15)) {
        self.path = path
        self.interval = interval
    }
}

/// Renders the agent's state in the Prometheus text format (version 0.0.4).
///
/// Labels are bounded: an upload outcome, a driver kind (never a sensor id), a quarantine code (at most
/// ``maximumCodes`` distinct ones, the rest summed under `other`), a buffer operation (``BufferOperation``).
public enum TextfileMetrics {
    /// The most quarantine codes given a label of their own.
    public static let maximumCodes = 16

    /// - Parameters:
    ///   - status: the agent's snapshot (the same `farmgate status` shows).
    ///   - writtenBytes: `write_bytes` of `/proc/self/io`, nil when unreadable.
    public static func render(_ status: AgentStatus, writtenBytes: Int64?) -> String {
        var out = MetricsText()
        let now = status.now
        out.gauge("farmgate_agent_start_time_seconds", "When the agent started (Unix time).", seconds(status.startedAt))
        out.gauge("farmgate_buffer_pending_readings", "Committed readings not yet acknowledged by the ingest.", Double(status.buffer.pending))
        let oldestAge = status.buffer.oldestPending.map { max(0, Double(now.microseconds - $0.microseconds) / 1e6) } ?? 0
        out.gauge("farmgate_buffer_oldest_pending_age_seconds", "Age of the oldest pending reading; 0 when none is pending.", oldestAge)
        out.gauge(
            "farmgate_buffer_held_readings", "Readings held back until the clock is synchronised ([clock] hold_unsynchronized).",
            Double(status.buffer.held))
        out.gauge("farmgate_buffer_uncommitted_readings", "Readings waiting in memory for the next group commit.", Double(status.buffer.uncommitted))
        out.header("farmgate_buffer_quarantined_readings", "Readings in quarantine, by the code of their reason.", type: "gauge")
        for (code, count) in boundedCodes(status.buffer.quarantinedByCode) {
            out.sample("farmgate_buffer_quarantined_readings", [("code", code)], Double(count))
        }
        out.counter("farmgate_buffer_dropped_readings_total", "Readings discarded because the buffer was full.", Double(status.buffer.dropped))
        out.counter(
            "farmgate_buffer_duplicates_ignored_total", "Samples not stored because the same sensor and time was already buffered.",
            Double(status.buffer.duplicatesIgnored))
        out.gauge("farmgate_buffer_used_bytes", "Bytes the buffer file uses.", Double(status.buffer.usedBytes))
        out.gauge("farmgate_buffer_quota_bytes", "The buffer's disk quota.", Double(status.buffer.quotaBytes))
        out.gauge("farmgate_buffer_last_sequence", "The last sequence number assigned.", Double(status.buffer.lastSequence))
        out.header(
            "farmgate_agent_buffer_errors_total",
            "Buffer writes that failed since the buffer was opened: commit (new readings), acknowledge (recording the ingest's answer).",
            type: "counter")
        for operation in BufferOperation.allCases {
            out.sample("farmgate_agent_buffer_errors_total", [("operation", operation.rawValue)], Double(status.buffer.errors?.count(operation) ?? 0))
        }

        if let upload = status.upload {
            out.counter("farmgate_upload_attempts_total", "Upload requests sent since the agent started.", Double(upload.requestsTotal))
            out.header("farmgate_upload_readings_total", "Readings by the ingest's answer since the agent started.", type: "counter")
            for (outcome, value) in [
                ("accepted", upload.uploadedTotal), ("duplicate", upload.duplicatesTotal), ("rejected", upload.rejectedTotal),
                ("quarantined", upload.quarantinedTotal), ("renumbered", upload.renumberedTotal),
            ] {
                out.sample("farmgate_upload_readings_total", [("outcome", outcome)], Double(value))
            }
            out.header(
                "farmgate_upload_failures_total",
                "Failed upload attempts since the agent started, by the HTTP status of the answer (none: no answer).", type: "counter")
            // The label is the answer's HTTP status: the status' causes of a failure without one (``UploadFailureCause``:
            // `connection`, `buffer`, `sequence_conflict`) are `none` together, the label documented since before them.
            var byStatus: [String: Int64] = [:]
            for (key, count) in upload.failuresTotal ?? [:] { byStatus[Int(key) == nil ? "none" : key, default: 0] += count }
            for (status, count) in byStatus.sorted(by: { $0.key < $1.key }) {
                out.sample("farmgate_upload_failures_total", [("status", status)], Double(count))
            }
            out.gauge("farmgate_upload_consecutive_failures", "Failed upload attempts since the last success.", Double(upload.consecutiveFailures))
            out.gauge("farmgate_upload_held", "1 while the ingest refuses whole requests and the queue is held.", upload.held == nil ? 0 : 1)
            out.gauge(
                "farmgate_upload_last_success_time_seconds", "When the ingest last acknowledged a batch (Unix time); 0 never.",
                upload.lastSuccessAt.map(seconds) ?? 0)
        }

        var reads: [String: (ok: Int64, failed: Int64, failing: Int, skipped: Int64)] = [:]
        for sensor in status.sensors {
            var entry = reads[sensor.driver] ?? (0, 0, 0, 0)
            entry.ok += sensor.readsOK
            entry.failed += sensor.readsFailed
            if sensor.consecutiveErrors > 0 { entry.failing += 1 }
            entry.skipped += sensor.skippedReads ?? 0
            reads[sensor.driver] = entry
        }
        out.header("farmgate_driver_reads_total", "Sensor reads by driver kind and result.", type: "counter")
        for (driver, entry) in reads.sorted(by: { $0.key < $1.key }) {
            out.sample("farmgate_driver_reads_total", [("driver", driver), ("result", "ok")], Double(entry.ok))
            out.sample("farmgate_driver_reads_total", [("driver", driver), ("result", "error")], Double(entry.failed))
        }
        out.header(
            "farmgate_driver_skipped_reads_total",
            "Scheduled reads not made because the sensor's previous read ran past them (a bus that cannot keep its sensors' intervals), by driver kind.",
            type: "counter")
        for (driver, entry) in reads.sorted(by: { $0.key < $1.key }) {
            out.sample("farmgate_driver_skipped_reads_total", [("driver", driver)], Double(entry.skipped))
        }
        out.header("farmgate_driver_failing_sensors", "Sensors whose last read failed, by driver kind.", type: "gauge")
        for (driver, entry) in reads.sorted(by: { $0.key < $1.key }) {
            out.sample("farmgate_driver_failing_sensors", [("driver", driver)], Double(entry.failing))
        }

        // With `[clock] check = false` the agent does not ask the kernel: no synchronised figure to give.
        out.gauge("farmgate_clock_checked", "1 when the agent checks the kernel's clock state ([clock] check), else 0.", status.clock == nil ? 0 : 1)
        if let clock = status.clock {
            out.gauge("farmgate_clock_synchronized", "1 while the kernel says the clock is synchronised, else 0.", clock.synchronized ? 1 : 0)
            out.counter(
                "farmgate_clock_corrected_readings_total", "Readings taken before the clock was set whose times were repaired once it was.",
                Double(clock.correctedTotal ?? 0))
        }
        if let writtenBytes {
            out.counter(
                "farmgate_process_written_bytes_total", "Bytes this process caused to be written to storage (/proc/self/io write_bytes).",
                Double(writtenBytes))
        }
        out.gauge("farmgate_metrics_written_time_seconds", "When this file was written (Unix time).", seconds(now))
        return out.text
    }

    /// Quarantine counts under at most ``maximumCodes`` labels of `[a-z0-9_]` (the rest under `other`), sorted.
    static func boundedCodes(_ byCode: [String: Int]) -> [(String, Int)] {
        var result: [String: Int] = [:]
        for (code, count) in byCode.sorted(by: { $0.value > $1.value || ($0.value == $1.value && $0.key < $1.key) }) {
            let valid = !code.isEmpty && code.utf8.count <= 48 && code.utf8.allSatisfy { ($0 >= 97 && $0 <= 122) || ($0 >= 48 && $0 <= 57) || $0 == 95 }
            let label = valid && (result[code] != nil || result.count < maximumCodes) ? code : "other"
            result[label, default: 0] += count
        }
        return result.sorted { $0.key < $1.key }
    }

    static func seconds(_ timestamp: Timestamp) -> Double { Double(timestamp.microseconds) / 1e6 }

    /// `write_bytes` from `/proc/self/io`, or nil where it cannot be read.
    public static func processWrittenBytes(procIO: String = "/proc/self/io") -> Int64? {
        guard let text = try? readSmallFile(procIO) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("write_bytes:") {
            return Int64(line.dropFirst("write_bytes:".count).trimmingPrefix(" "))
        }
        return nil
    }

    static func readSmallFile(_ path: String) throws(TextfileError) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw TextfileError(path: path, step: "open", errno) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 { throw TextfileError(path: path, step: "read", errno) }
            if count == 0 { break }
            bytes += chunk[..<count]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Writes `text` to `path` atomically: a temporary file in the same directory, written and fsynced, renamed over
    /// `path`, then the directory fsynced. A reader (node_exporter) sees the old file or the new one, never a part.
    public static func writeAtomically(_ text: String, to path: String) throws(TextfileError) {
        do {
            // node_exporter runs as another user: readable by all whatever the agent's umask (UMask=0077 in the unit).
            try DurableFile.replace(path, with: Array(text.utf8), temporary: path + ".tmp.\(getpid())", mode: 0o644)
        } catch {
            throw TextfileError(path: error.path, step: error.step, error.code)
        }
    }
}

/// The metrics file could not be written: which file, which step, and the system's reason.
public struct TextfileError: Error, CustomStringConvertible, Sendable {
    public let path: String
    public let step: String
    public let code: Int32

    init(path: String, step: String, _ code: Int32) {
        self.path = path
        self.step = step
        self.code = code
    }

    public var description: String {
        "cannot \(step) \(path): \(String(cString: strerror(code))); check that the directory exists and the agent's user may write "
            + "there (under systemd: ReadWritePaths= in farmgate.service)"
    }
}

/// Accumulates Prometheus text: one `# HELP`/`# TYPE` header per metric, then its samples.
struct MetricsText {
    private(set) var text = ""

    mutating func header(_ name: String, _ help: String, type: String) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
    }

    mutating func sample(_ name: String, _ labels: [(String, String)] = [], _ value: Double) {
        text += name
        if !labels.isEmpty {
            text += "{" + labels.map { "\($0.0)=\"\(Self.escape($0.1))\"" }.joined(separator: ",") + "}"
        }
        text += " " + Self.format(value) + "\n"
    }

    mutating func gauge(_ name: String, _ help: String, _ value: Double) {
        header(name, help, type: "gauge")
        sample(name, [], value)
    }

    mutating func counter(_ name: String, _ help: String, _ value: Double) {
        header(name, help, type: "counter")
        sample(name, [], value)
    }

    static func escape(_ value: String) -> String {
        value.replacing("\\", with: "\\\\").replacing("\"", with: "\\\"").replacing("\n", with: "\\n")
    }

    static func format(_ value: Double) -> String {
        if value.isNaN { return "NaN" }
        if value.isInfinite { return value > 0 ? "+Inf" : "-Inf" }
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return "\(value)"
    }
}

/// Rewrites the metrics file every ``MetricsFileConfiguration/interval`` (and once more at shutdown).
public final class TextfileMetricsService: Service {
    let configuration: MetricsFileConfiguration
    let snapshot: @Sendable () async throws -> AgentStatus
    let logger: Logger

    public init(configuration: MetricsFileConfiguration, snapshot: @escaping @Sendable () async throws -> AgentStatus, logger: Logger) {
        self.configuration = configuration
        self.snapshot = snapshot
        self.logger = logger
    }

    public func run() async throws {
        var failing = false
        while true {
            do {
                let status = try await snapshot()
                let path = configuration.path
                try await runOffPool(name: "farmgate-metrics") {
                    try TextfileMetrics.writeAtomically(TextfileMetrics.render(status, writtenBytes: TextfileMetrics.processWrittenBytes()), to: path)
                }
                if failing { logger.info("Metrics file written again", metadata: ["metrics.textfile": "\(path)"]) }
                failing = false
            } catch {
                if !failing {
                    logger.error("Cannot write the metrics file", metadata: ["metrics.textfile": "\(configuration.path)", "error": "\(error)"])
                }
                failing = true
            }
            if Task.isShuttingDownGracefully || Task.isCancelled { return }
            do {
                try await cancelWhenGracefulShutdown { try await Task.sleep(for: self.configuration.interval) }
            } catch {
                // Shutdown: one last write with the final counts, above.
            }
            if Task.isCancelled { return }
        }
    }
}
