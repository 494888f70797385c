import FarmgateWire
import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// Everything `farmgate status` shows, as the agent reports it over the control socket.
public struct AgentStatus: Codable, Sendable {
    public var device: String
    public var version: String
    public var pid: Int32
    public var startedAt: Timestamp
    public var now: Timestamp
    public var clockSynchronized: Bool
    /// The clock monitor's view (nil with `[clock] check = false`).
    public var clock: ClockStatus? = nil
    public var buffer: BufferStatistics
    /// nil when the configuration has no `[upload]` section.
    public var upload: UploadStatus?
    public var uploadEndpoint: String?
    public var sensors: [SensorStatus]
    /// The most recently quarantined readings (at most 10).
    public var recentQuarantine: [QuarantinedReading]
    /// The configuration file and how the last reload (SIGHUP) went; nil from an agent before reloads existed.
    public var configuration: ConfigurationStatus? = nil
}

/// The control socket's answer envelope: `{"ok": true, "status": {...}}` or `{"ok": false, "error": "..."}`.
public struct ControlAnswer: Codable, Sendable {
    public var ok: Bool
    public var error: String?
    public var status: AgentStatus?
    /// The answer to a `quarantine.*` command.
    public var quarantine: QuarantineAnswer?

    public init(ok: Bool, error: String? = nil, status: AgentStatus? = nil, quarantine: QuarantineAnswer? = nil) {
        self.ok = ok
        self.error = error
        self.status = status
        self.quarantine = quarantine
    }
}

extension AgentStatus {
    /// The status as an installer reads it in a terminal.
    public func humanReadable() -> String {
        var lines: [String] = []
        let uptime = Self.age(from: startedAt, to: now)
        lines.append("Farmgate agent \(device) (version \(version), pid \(pid)), up \(uptime)")
        lines.append(clockLine())
        if let configuration {
            var line = "Config    \(configuration.file), loaded \(Self.age(from: configuration.loadedAt, to: now)) ago"
            if configuration.reloads > 0 { line += " (\(configuration.reloads) reload\(configuration.reloads == 1 ? "" : "s"))" }
            lines.append(line)
            if let error = configuration.lastReloadError, let at = configuration.lastReloadAt {
                lines.append("          RELOAD REFUSED \(Self.age(from: at, to: now)) ago, still running the configuration above: \(error)")
            }
        }
        var bufferLine = "Buffer    \(buffer.pending) pending"
        if let oldest = buffer.oldestPending { bufferLine += ", oldest \(Self.age(from: oldest, to: now)) old" }
        if buffer.held > 0 { bufferLine += "; \(buffer.held) held (clock not set)" }
        bufferLine += "; \(buffer.uncommitted) uncommitted; \(buffer.quarantined) quarantined; \(buffer.dropped) dropped (full); \(buffer.duplicatesIgnored) duplicates ignored"
        lines.append(bufferLine)
        var sizeLine = "          \(Self.bytes(buffer.usedBytes)) used of \(Self.bytes(buffer.quotaBytes)) quota; last sequence \(buffer.lastSequence)"
        if let calibrations = buffer.pendingCalibrations {
            sizeLine += "; \(calibrations) calibration event\(calibrations == 1 ? "" : "s") waiting for the ingest"
        }
        lines.append(sizeLine)
        if let errors = buffer.errors, let last = errors.last {
            // A buffer that cannot write loses new readings or resends acknowledged ones: say so beside the counts.
            lines.append(
                "          BUFFER ERROR \(Self.age(from: last.at, to: now)) ago (\(last.operation)): \(last.message); "
                    + "\(errors.commit) commit and \(errors.acknowledge) acknowledge failures since the buffer was opened")
        }
        if let upload, let endpoint = uploadEndpoint {
            var line = "Upload    \(endpoint): \(upload.lastResult ?? "no attempt yet")"
            if let at = upload.lastAttemptAt { line += " (\(Self.age(from: at, to: now)) ago)" }
            lines.append(line)
            var detail = "          \(upload.uploadedTotal) uploaded, \(upload.duplicatesTotal) duplicates, \(upload.quarantinedTotal) quarantined"
            if let success = upload.lastSuccessAt { detail += "; last success \(Self.age(from: success, to: now)) ago" }
            if upload.consecutiveFailures > 0 { detail += "; \(upload.consecutiveFailures) failures in a row" }
            if let next = upload.nextAttemptAt, next > now { detail += "; next attempt in \(Self.age(from: now, to: next))" }
            lines.append(detail)
            if let failures = upload.failuresTotal, !failures.isEmpty {
                // The keys of `--json`'s failuresTotal: an HTTP status, or why there was none (`connection`: no answer).
                let counts = failures.sorted { $0.key < $1.key }.map { "\(Int($0.key) == nil ? $0.key : "HTTP \($0.key)") ×\($0.value)" }
                lines.append("          failed attempts since start: \(counts.joined(separator: ", "))")
            }
            if let held = upload.held {
                lines.append(
                    "          HELD for \(Self.age(from: held.since, to: now)) (\(held.refusals) refusals): \(held.httpStatus) \(held.code): \(held.message)")
                lines.append("          \(held.reason); nothing is quarantined, retrying with backoff")
            }
            if let fallback = upload.formatFallback { lines.append("          format \(upload.format ?? "json"): \(fallback)") }
            if let frames = upload.frames {
                let refusals = upload.stateRefusalsTotal.map { $0 > 0 ? "; \($0) answers that the ingest lacked the state (resent at once)" : "" } ?? ""
                lines.append("          frames \(frames)\(refusals)")
            }
            if upload.renumberedTotal > 0 {
                lines.append(
                    "          \(upload.renumberedTotal) readings renumbered after sequence_conflict (the ingest holds up to sequence \(upload.ingestHighestSequence.map(String.init) ?? "?"))")
            }
        } else {
            lines.append("Upload    off (no [upload] section: readings stay in the buffer)")
        }
        lines.append("Sensors")
        let header = [pad("ID", 22), pad("VALUE", 12), pad("UNIT", 7), pad("LAST READ", 11), "STATE"].joined(separator: " ")
        lines.append("  " + header)
        for sensor in sensors {
            let value = sensor.lastValue.map { Resolution.display($0, resolution: sensor.resolution) } ?? "-"
            let read = sensor.lastReadAt.map { Self.age(from: $0, to: now) + " ago" } ?? "never"
            var state = "ok"
            if sensor.consecutiveErrors > 0, let error = sensor.lastError {
                state = "\(error) (\(sensor.consecutiveErrors) in a row)"
            } else if sensor.readsOK == 0 {
                state = "waiting for first read"
            }
            if let skipped = sensor.skippedReads, skipped > 0 {
                state += "; \(skipped) scheduled reads skipped (reads took longer than the interval)"
            }
            lines.append("  " + [pad(sensor.id, 22), pad(value, 12), pad(sensor.unit, 7), pad(read, 11), state].joined(separator: " "))
        }
        lines.append(quarantineSummary)
        if !recentQuarantine.isEmpty {
            lines.append("  most recent (farmgate quarantine list shows them all):")
            for entry in recentQuarantine {
                let value = Resolution.display(entry.value, resolution: entry.resolution)
                lines.append("  seq \(entry.sequence) \(entry.sensor) at \(entry.timestamp) value \(value): \(entry.reason)")
            }
        }
        return lines.joined(separator: "\n")
    }

    /// `Clock     synchronised; ...` or `Clock     NOT synchronised ...`, with what happens to the readings.
    func clockLine() -> String {
        // nil: `[clock] check = false` (the agent never asks the kernel).
        guard let clock else { return "Clock     not checked ([clock] check = false): readings are never held or flagged clock_unsynchronized" }
        var line = "Clock     "
        let hold = Self.age(seconds: Int64(clock.holdSeconds))
        if clock.synchronized {
            line += "synchronised"
        } else {
            line += "NOT synchronised for \(Self.age(seconds: Int64(clock.stateSeconds)))"
            line += clock.holdSeconds > 0
                ? ": \(buffer.held) readings held (up to \(hold), then sent flagged clock_unsynchronized); corrected when NTP sets the clock"
                : ": readings are sent flagged clock_unsynchronized (hold_unsynchronized = 0); the rest are corrected when NTP sets the clock"
        }
        if let correction = clock.lastCorrection {
            line += "; corrected \(correction.corrected) readings taken before it was set (at \(correction.at)"
            if let step = correction.stepSeconds {
                line += ", clock set \(step < 0 ? "back" : "forward") by \(Self.age(seconds: Int64(abs(step).rounded())))"
            }
            line += ")"
            if correction.shifted > 0 { line += ", \(correction.shifted) moved by a millisecond or more (time taken)" }
        }
        return line
    }

    /// `Quarantine 3 readings: timestamp_in_future 2, unknown_sensor 1; 0 trimmed (quota), 0 dropped by an installer`.
    var quarantineSummary: String {
        var line = "Quarantine \(buffer.quarantined) reading\(buffer.quarantined == 1 ? "" : "s")"
        let codes = buffer.quarantinedByCode.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }
        if !codes.isEmpty { line += ": " + codes.map { "\($0.key) \($0.value)" }.joined(separator: ", ") }
        line += "; \(buffer.quarantineTrimmed) trimmed (quota), \(buffer.quarantineDropped) dropped by an installer"
        if let events = buffer.quarantinedCalibrations, events > 0 {
            line += "; \(events) calibration event\(events == 1 ? "" : "s") refused for good (farmgate quarantine list)"
        }
        return line
    }

    private func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
    }

    static func age(from start: Timestamp, to end: Timestamp) -> String {
        age(seconds: (end.microseconds - start.microseconds) / 1_000_000)
    }

    static func age(seconds: Int64) -> String {
        let seconds = max(0, seconds)
        if seconds < 60 { return "\(seconds)s" }
        if seconds < 3600 { return "\(seconds / 60)m \(seconds % 60)s" }
        if seconds < 86_400 { return "\(seconds / 3600)h \(seconds / 60 % 60)m" }
        return "\(seconds / 86_400)d \(seconds / 3600 % 24)h"
    }

    static func bytes(_ count: Int64) -> String {
        if count >= 1 << 30 { return fixedPoint(Double(count) / Double(1 << 30), places: 1) + " GiB" }
        if count >= 1 << 20 { return fixedPoint(Double(count) / Double(1 << 20), places: 1) + " MiB" }
        if count >= 1 << 10 { return fixedPoint(Double(count) / Double(1 << 10), places: 1) + " KiB" }
        return "\(count) B"
    }
}
