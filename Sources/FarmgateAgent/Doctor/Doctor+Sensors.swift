import FarmgateSupport
import FarmgateWire

extension Doctor {
    /// How many of its intervals a failing sensor may go without a reading before it is a problem rather than a warning.
    ///
    /// A few failures in a row happen to working sensors (an EZO circuit busy, a bus hiccup, a probe being moved) and
    /// the next read may well succeed: a warning. A sensor that has stored nothing for ten of its own intervals (or ever
    /// since the configuration was loaded, that long) is no hiccup: its readings are lost until someone acts, so doctor
    /// exits 1. Counting in its intervals judges a 1 s flow meter and a 15 min probe alike.
    static let silentIntervalsForProblem = 10

    /// The sensors as the running agent reports them: one finding per sensor whose last read failed, with the agent's
    /// error (which says what to check), and one `ok` line for the rest. Skipped when no agent answers: only it knows.
    static func sensorFindings(status: AgentStatus?) -> [DoctorFinding] {
        guard let status else {
            return [
                DoctorFinding(
                    check: "sensor", subject: "running agent", status: .skipped,
                    message: "not checked: the agent does not answer, and only the running agent knows how its reads go")
            ]
        }
        let now = status.now
        func seconds(since time: Timestamp) -> Int64 { max(0, (now.microseconds - time.microseconds) / 1_000_000) }
        var findings: [DoctorFinding] = []
        var waiting = 0
        for sensor in status.sensors {
            guard sensor.consecutiveErrors > 0 else {
                if sensor.readsOK == 0 { waiting += 1 }
                continue
            }
            let interval = max(sensor.intervalSeconds, 0.001)
            // A sensor never read is counted from when its configuration was loaded (a sensor a reload added is young).
            let loaded = status.configuration?.loadedAt ?? status.startedAt
            let silentSeconds = seconds(since: sensor.lastReadAt ?? loaded)
            let silentIntervals = Int(Double(silentSeconds) / interval)
            let silence =
                sensor.lastReadAt == nil
                ? "no reading since the agent loaded its configuration \(duration(silentSeconds)) ago"
                : "no reading for \(duration(silentSeconds)) (\(silentIntervals) of its intervals)"
            let failed = sensor.lastErrorAt.map { " \(duration(seconds(since: $0))) ago" } ?? ""
            let problem = silentIntervals >= silentIntervalsForProblem
            findings.append(
                DoctorFinding(
                    check: "sensor", subject: sensor.id, status: problem ? .problem : .warning,
                    message: "its last read failed\(failed) (\(sensor.consecutiveErrors) in a row; \(silence)): \(sensor.lastError ?? "no error recorded")",
                    fix: "do what the error says, then check with `farmgate sensor read \(sensor.id)`; `journalctl -u farmgate` logs each failure"))
        }
        let fine = status.sensors.count - findings.count
        if fine > 0 || status.sensors.isEmpty {
            let others = findings.isEmpty ? "" : "the other "
            var message = status.sensors.isEmpty ? "the agent reads no sensor" : "\(others)\(fine) sensor\(fine == 1 ? "" : "s") read without error"
            if waiting > 0 { message += " (\(waiting) waiting for a first read)" }
            findings.append(DoctorFinding(check: "sensor", subject: "running agent", status: .ok, message: message))
        }
        return findings
    }
}
