import FarmgateSupport
import FarmgateWire
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging

/// `farmgate doctor`: checks what a site needs to work and says, for each finding, what to do.
///
/// In order: the running agent (control socket), each configured serial port and GPIO chip (exists, and the agent's
/// user may open it: mode, owner, group membership or a group its systemd unit grants), each 1-Wire probe (its sysfs
/// file where the driver reads it, readable by the agent's user, one read with the kernel's CRC), the sensors whose last
/// read in the running agent failed (its error and failures in a row), the clock (adjtimex), disk space
/// against the buffer's quota, the buffer (integrity, depth, oldest unsent reading, quarantine), the ingest (reachable,
/// TLS verified, `/healthz`), the key file (mode, owner) and whether the ingest accepts the key (`GET /v1/device`, and
/// that it is this device's).
///
/// Checks that block (stat, SQLite, the control socket) run on a thread of their own; HTTP runs on the libcurl client's.
public enum Doctor {
    /// Runs every check.
    ///
    /// - Parameters:
    ///   - user: whose permissions count (the agent's user: `farmgate` under systemd).
    ///   - clock: where the clock's state comes from (the kernel; the agent's test hook in tests).
    ///   - timeout: the longest one HTTP request to the ingest may take.
    ///   - unitDirectories: where to look for the agent's systemd unit (``ServiceUnit``), whose groups count for the
    ///     device checks when it runs the agent as `user`.
    public static func run(
        configuration: AgentConfiguration, user: UnixUser, clock: any ClockSource, timeout: Duration = .seconds(15),
        unitDirectories: [String] = ServiceUnit.standardDirectories, logger: Logger
    ) async -> DoctorReport {
        // Each probe's read has a deadline of its own (a hung 1-Wire bus), so these run before the other local checks.
        let oneWire = await oneWireFindings(configuration, user: user)
        let local = await runBlocking { () -> [DoctorFinding] in
            let status = agentStatus(configuration)
            var findings = [status.finding]
            findings += deviceFindings(configuration, user: user, unit: ServiceUnit.load(directories: unitDirectories))
            findings += oneWire
            findings += sensorFindings(status: status.status)
            findings.append(clockFinding(configuration, clock: clock))
            findings.append(diskFinding(configuration))
            findings += bufferFindings(configuration, status: status.status, now: clock.read().realtime)
            findings += writeAccessFindings(configuration, user: user, unit: ServiceUnit.load(directories: unitDirectories))
            findings += [metricsFreshnessFinding(configuration.metrics, status: status.status, now: clock.read().realtime)].compactMap { $0 }
            findings += keyFileFindings(configuration, user: user)
            return findings
        }
        let remote = await ingestFindings(configuration, timeout: timeout, logger: logger)
        return DoctorReport(configuration: configuration.file, device: configuration.device.rawValue, user: user.name, findings: local + remote)
    }

    private static func runBlocking(_ body: @escaping @Sendable () -> [DoctorFinding]) async -> [DoctorFinding] {
        do {
            return try await runOffPool(name: "farmgate-doctor") { body() }
        } catch {
            return [DoctorFinding(check: "doctor", subject: "local checks", status: .problem, message: "could not run: \(error)")]
        }
    }

    // MARK: Agent

    /// Whether the agent answers on its control socket, and its status when it does.
    static func agentStatus(_ configuration: AgentConfiguration) -> (finding: DoctorFinding, status: AgentStatus?) {
        let socket = configuration.controlSocket
        do {
            let bytes = try ControlClient.send(ControlRequest(command: "status"), to: socket, timeoutSeconds: 5, settling: ControlClient.cliSettling)
            let answer = try JSONDecoder().decode(ControlAnswer.self, from: Data(bytes))
            guard answer.ok, let status = answer.status else {
                return (DoctorFinding(check: "agent", subject: socket, status: .warning, message: "the agent answered: \(answer.error ?? "no status")"), nil)
            }
            var finding = DoctorFinding(
                check: "agent", subject: socket, status: .ok, message: "running (pid \(status.pid), version \(status.version), device \(status.device))")
            if status.device != configuration.device.rawValue {
                finding = DoctorFinding(
                    check: "agent", subject: socket, status: .warning,
                    message: "the running agent is device \(status.device), but the configuration says \(configuration.device)",
                    fix: "restart the agent to apply the configuration: systemctl restart farmgate")
            }
            return (finding, status)
        } catch {
            return (
                DoctorFinding(
                    check: "agent", subject: socket, status: .warning, message: "not running, or its control socket does not answer",
                    fix: "start it: systemctl start farmgate; `systemctl status farmgate` and `journalctl -u farmgate` say why it stopped"),
                nil
            )
        }
    }

    // MARK: Key file

    /// The key file: only its owner may read it, and that is the agent's user.
    static func keyFileFindings(_ configuration: AgentConfiguration, user: UnixUser) -> [DoctorFinding] {
        guard configuration.upload != nil,
            let document = try? ConfigDocument.load(path: configuration.file),
            let relative = try? document.table("upload")?.string("key_file")
        else { return [] }
        let base = URL(fileURLWithPath: configuration.file).deletingLastPathComponent().path
        let path = AgentConfiguration.resolve(relative, against: base)
        var info = stat()
        guard stat(path, &info) == 0 else { return [] }
        let mode = info.st_mode & 0o777
        if let blocked = user.blockedDirectory(on: path) {
            return [
                DoctorFinding(
                    check: "key", subject: path, status: .problem,
                    message: "\(user.name) cannot reach it: it may not pass the directory \(blocked)",
                    fix: "let \(user.name) through that directory (sudo chmod o+x, or give it the directory's group), or move the key where the agent's user may read it")
            ]
        }
        if !user.mayOpen(mode: mode, owner: info.st_uid, group: info.st_gid, write: false) {
            return [
                DoctorFinding(
                    check: "key", subject: path, status: .problem,
                    message: "\(user.name) cannot read it (mode \(String(mode, radix: 8)), owner \(UnixUser.userName(info.st_uid)))",
                    fix: "sudo chown \(user.name) \(path) && sudo chmod 600 \(path)")
            ]
        }
        if mode & 0o077 != 0 {
            return [
                DoctorFinding(
                    check: "key", subject: path, status: .warning,
                    message: "others may read the device key (mode \(String(mode, radix: 8)))", fix: "sudo chmod 600 \(path)")
            ]
        }
        return [DoctorFinding(check: "key", subject: path, status: .ok, message: "mode \(String(mode, radix: 8)), owner \(UnixUser.userName(info.st_uid))")]
    }

    // MARK: Ingest

    /// Reachability and TLS (`GET /healthz`), then the key (`GET /v1/device`).
    static func ingestFindings(_ configuration: AgentConfiguration, timeout: Duration, logger: Logger) async -> [DoctorFinding] {
        guard let upload = configuration.upload else {
            return [
                DoctorFinding(
                    check: "ingest", subject: "[upload]", status: .warning, message: "no [upload] section: readings stay on this site",
                    fix: "farmgate enroll <ingest URL> <token from farmgate-ingest enroll-token create>")
            ]
        }
        var base = Substring(upload.endpoint)
        while base.hasSuffix("/") { base = base.dropLast() }
        let endpoint = String(base)
        let client: HTTPClient
        do {
            client = try HTTPClient(
                configuration: HTTPClient.Configuration(
                    connectTimeout: min(timeout, .seconds(10)), requestTimeout: timeout, caFile: upload.caFile,
                    useProxyEnvironment: upload.useProxyEnvironment, userAgent: "farmgate-doctor"),
                logger: logger)
        } catch {
            return [DoctorFinding(check: "ingest", subject: endpoint, status: .problem, message: "cannot set up HTTP: \(error)", fix: "check [upload] ca_file")]
        }
        defer { client.close() }
        var findings: [DoctorFinding] = []
        let health: HTTPResponse
        do {
            health = try await client.get(endpoint + "/healthz", headers: [])
        } catch {
            findings.append(unreachable(error, endpoint: endpoint))
            findings.append(
                DoctorFinding(check: "key", subject: "device key", status: .skipped, message: "not tried: the ingest cannot be reached"))
            return findings
        }
        let key = await keyFinding(client, endpoint: endpoint, upload: upload, device: configuration.device, healthStatus: health.status)
        let secure = endpoint.lowercased().hasPrefix("https://")
        let transport = secure ? "over HTTPS, certificate verified" : "over plain HTTP"
        if key.message.hasPrefix(notAnIngest) {
            // Something answers at the URL, but not as an ingest: that one finding says it all (a /healthz warning
            // beside it would only repeat it).
            findings.append(key)
        } else if health.status == 200 {
            findings.append(DoctorFinding(check: "ingest", subject: endpoint, status: .ok, message: "reachable \(transport)"))
        } else {
            findings.append(
                DoctorFinding(
                    check: "ingest", subject: endpoint, status: .warning, message: "reachable \(transport), but /healthz answered HTTP \(health.status)",
                    fix: "is [upload] endpoint the ingest's base URL (no path)? A proxy in front may answer instead"))
        }
        if !secure, !isLoopback(endpoint) {
            findings.append(
                DoctorFinding(
                    check: "ingest", subject: endpoint, status: .warning, message: "plain HTTP: the key and the readings cross the network unencrypted",
                    fix: "put TLS in front of the ingest (a reverse proxy) and use https:// in [upload] endpoint"))
        }
        if !key.message.hasPrefix(notAnIngest) { findings.append(key) }
        return findings
    }

    static func unreachable(_ error: HTTPClientError, endpoint: String) -> DoctorFinding {
        switch SiteEnrollment.SchemeMismatch(error, endpoint: endpoint) {
        case .plainPort?:
            return DoctorFinding(
                check: "ingest", subject: endpoint, status: .problem, message: "the server does not speak TLS on this port: \(error)",
                fix: "use http:// in [upload] endpoint if the ingest serves plain HTTP there, or the port its TLS listens on (443 behind a reverse proxy)")
        case .tlsPort?:
            return DoctorFinding(
                check: "ingest", subject: endpoint, status: .problem, message: "the server hung up without an answer: \(error)",
                fix: "if the ingest serves HTTPS on this port, use https:// in [upload] endpoint (plain HTTP to a TLS port gets no answer)")
        case nil:
            break
        }
        switch error.kind {
        case .tls:
            return DoctorFinding(
                check: "ingest", subject: endpoint, status: .problem, message: "\(error)",
                fix:
                    "the ingest's certificate is not trusted or does not match the host name: with a private CA set [upload] ca_file to its PEM file; check the clock too (a clock far off makes certificates invalid)")
        case .timedOut:
            return DoctorFinding(
                check: "ingest", subject: endpoint, status: .problem, message: "no answer in time: \(error)",
                fix: "check the network path to the ingest (firewall, proxy: https_proxy) and that the ingest runs")
        default:
            return DoctorFinding(
                check: "ingest", subject: endpoint, status: .problem, message: "cannot connect: \(error)",
                fix: "check [upload] endpoint, this site's network and DNS (`getent hosts <host>`), and that the ingest runs (`farmgate-ingest serve`)")
        }
    }

    /// Whether the ingest accepts the key, and for this device. A URL that answers, but not as an ingest does (GET
    /// /v1/device is not found, or answers something that is not a device state), is a problem of check `ingest`: the key
    /// was never verified and every upload would fail. `healthStatus`: what `/healthz` answered, for the message.
    static func keyFinding(
        _ client: HTTPClient, endpoint: String, upload: UploadConfiguration, device: DeviceID, healthStatus: Int
    ) async -> DoctorFinding {
        let subject = "device key"
        let reEnroll = "make a new token on the ingest (farmgate-ingest enroll-token create --farm FARM --device \(device)) and run farmgate enroll again"
        let response: HTTPResponse
        do {
            response = try await client.get(endpoint + IngestProtocol.deviceStatePath, headers: [HTTPHeader("Authorization", "Bearer \(upload.deviceKey)")])
        } catch {
            return unreachable(error, endpoint: endpoint)
        }
        let decoder = JSONDecoder()
        let health = healthStatus == 200 ? "" : ", /healthz HTTP \(healthStatus)"
        let notAnIngestFix =
            "check [upload] endpoint: it must be the ingest's base URL (https://host or https://host:port, no path), the one "
            + "`farmgate-ingest serve` or its reverse proxy answers on; a proxy must pass /v1/ and /healthz to the ingest"
        switch response.status {
        case 200:
            guard let state = try? decoder.decode(DeviceState.self, from: Data(response.body)) else {
                return DoctorFinding(
                    check: "ingest", subject: endpoint, status: .problem,
                    message: "\(notAnIngest): GET \(IngestProtocol.deviceStatePath) answered HTTP 200 with something "
                        + "that is not a device state\(health); the key was not verified",
                    fix: notAnIngestFix)
            }
            guard state.device == device.rawValue else {
                return DoctorFinding(
                    check: "key", subject: subject, status: .problem,
                    message: "the ingest accepts the key, but it belongs to device \(state.device) while [device] id is \(device): uploads are refused (device_mismatch)",
                    fix: "set [device] id = \"\(state.device)\", or \(reEnroll)")
            }
            let highest = state.highestSequence.map { "highest stored sequence \($0)" } ?? "nothing stored yet"
            return DoctorFinding(check: "key", subject: subject, status: .ok, message: "accepted for device \(state.device) (\(highest))")
        case 401, 403:
            let body = try? decoder.decode(APIErrorBody.self, from: Data(response.body))
            let revoked = body?.error.code == "revoked"
            return DoctorFinding(
                check: "key", subject: subject, status: .problem,
                message: revoked ? "the key has been revoked" : "the ingest does not accept the key (\(body?.error.message ?? "HTTP \(response.status)"))",
                fix: reEnroll)
        case 404, 405:
            return DoctorFinding(
                check: "ingest", subject: endpoint, status: .problem,
                message: "\(notAnIngest): GET \(IngestProtocol.deviceStatePath) answered HTTP \(response.status)\(health); "
                    + "the key was not verified and uploads would fail",
                fix: notAnIngestFix)
        case 429:
            return DoctorFinding(
                check: "key", subject: subject, status: .warning, message: "rate limited (HTTP 429): too many attempts from this address",
                fix: "try again in a minute")
        case 300..<400:
            let location = response.headers.first { $0.name.lowercased() == "location" }.map { " to \($0.value)" } ?? ""
            return DoctorFinding(
                check: "key", subject: subject, status: .problem,
                message: "GET \(IngestProtocol.deviceStatePath) was redirected (HTTP \(response.status)\(location)); the agent does not follow redirects, so the key was not verified and uploads would fail",
                fix: "set [upload] endpoint to the URL the ingest answers on (https:// rather than http://?)")
        case 500..<600:
            return DoctorFinding(
                check: "key", subject: subject, status: .problem,
                message: "GET \(IngestProtocol.deviceStatePath) answered HTTP \(response.status): the ingest (or a proxy in front of it) fails, so the key was not verified and uploads fail the same way",
                fix: "the ingest's log says why (journalctl -u farmgate-ingest); behind a proxy, check that the ingest runs")
        default:
            return DoctorFinding(
                check: "key", subject: subject, status: .problem,
                message: "GET \(IngestProtocol.deviceStatePath) answered HTTP \(response.status): the key was not verified",
                fix: "the ingest's log says why; check [upload] endpoint")
        }
    }

    /// How a finding for a URL that answers, but not as an ingest, begins.
    static let notAnIngest = "this URL answers but is not a Farmgate ingest"

    static func isLoopback(_ endpoint: String) -> Bool {
        guard let host = URL(string: endpoint)?.host else { return false }
        return SiteEnrollment.isLoopback(host)
    }
}
