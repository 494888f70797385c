import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif

/// One thing `farmgate doctor` looked at: what, what it found, and what to do about it.
public struct DoctorFinding: Codable, Sendable, Hashable {
    /// How it went.
    public enum Status: String, Codable, Sendable, Hashable {
        /// Fine.
        case ok
        /// Works, but deserves a look (readings waiting for hours, a key file others can read, plain HTTP).
        case warning
        /// Broken: the agent cannot do its job until it is fixed. Makes `farmgate doctor` exit 1.
        case problem
        /// Not checked, and why (no `[upload]`, `[clock] check = false`, the ingest unreachable so the key was not tried).
        case skipped
    }

    /// Which check: `configuration`, `agent`, `serial`, `gpio`, `1-wire`, `sensor`, `clock`, `disk`, `buffer`, `ingest`, `key`.
    public var check: String
    /// What was checked: a port, a chip, a path, a URL.
    public var subject: String
    public var status: Status
    /// What was found, in words.
    public var message: String
    /// What to do, when something is to be done.
    public var fix: String?

    public init(check: String, subject: String, status: Status, message: String, fix: String? = nil) {
        self.check = check
        self.subject = subject
        self.status = status
        self.message = message
        self.fix = fix
    }
}

/// Everything `farmgate doctor` found; `--json` prints it as it is.
public struct DoctorReport: Codable, Sendable, Hashable {
    /// True when no finding is a ``DoctorFinding/Status/problem``.
    public var ok: Bool
    public var configuration: String
    public var device: String?
    /// The user whose permissions were checked (the agent's).
    public var user: String
    public var findings: [DoctorFinding]

    public init(configuration: String, device: String?, user: String, findings: [DoctorFinding]) {
        self.ok = !findings.contains { $0.status == .problem }
        self.configuration = configuration
        self.device = device
        self.user = user
        self.findings = findings
    }

    /// The report for a person: one line per finding, the fix below it, a summary line.
    public func humanReadable() -> String {
        var lines = ["farmgate doctor: \(configuration)\(device.map { " (device \($0))" } ?? ""), permissions checked for user \(user)"]
        for finding in findings {
            let status: String
            switch finding.status {
            case .ok: status = "ok     "
            case .warning: status = "WARNING"
            case .problem: status = "PROBLEM"
            case .skipped: status = "skipped"
            }
            let check = finding.check.padded(to: 13)
            lines.append("  \(status) \(check) \(finding.subject): \(finding.message)")
            if let fix = finding.fix { lines.append("          \(String(repeating: " ", count: 13))  fix: \(fix)") }
        }
        let problems = findings.filter { $0.status == .problem }.count
        let warnings = findings.filter { $0.status == .warning }.count
        lines.append(
            problems == 0
                ? "No problem found\(warnings > 0 ? " (\(warnings) warning\(warnings == 1 ? "" : "s"))" : "")."
                : "\(problems) problem\(problems == 1 ? "" : "s")\(warnings > 0 ? ", \(warnings) warning\(warnings == 1 ? "" : "s")" : "") to fix.")
        return lines.joined(separator: "\n")
    }
}
