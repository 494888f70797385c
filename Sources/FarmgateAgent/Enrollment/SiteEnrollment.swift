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

/// `farmgate enroll URL TOKEN`: exchanges a one-time enrollment token for the device key, writes the key where the agent
/// reads it (mode 0600, owned by the agent's user) and points `[upload]` of the configuration at the ingest, keeping the
/// rest of the file and its comments.
///
/// Everything that can fail locally is checked **before** the token is used (``prepare(_:)``): the configuration's path
/// names a file, the configuration can be read and edited, the key file and the configuration can be written (the
/// configuration with its owner kept), the key would not replace one of the agent's own files, the agent's user exists.
/// A configuration that is a symbolic link has its target edited; the link stays. Only then is the token
/// exchanged, so a mistake on the site never burns it. If the answer is lost on the way (a timeout, a reset connection),
/// the exchange is sent again: the ingest answers the same token with the same key for a while, never with a second
/// device.
public enum SiteEnrollment {
    /// What `farmgate enroll` was asked to do.
    public struct Request: Sendable {
        /// The ingest's base URL (`https://ingest.example.net`).
        public var endpoint: String
        public var token: String
        /// The agent's configuration file; created when missing.
        public var configPath: String
        /// A PEM bundle to trust for the ingest (also written to `[upload] ca_file`); nil keeps the configuration's.
        public var caFile: String?
        /// Where to write the key; nil: the configuration's `[upload] key_file`, else `device.key` beside it.
        public var keyFile: String?
        /// Who should own the key file; nil: the current user.
        public var owner: AtomicFile.Owner?
        /// How long one exchange may take. Default 30 s.
        public var requestTimeout: Duration = .seconds(30)
        /// How often an exchange whose answer was lost is sent again. Default 2.
        public var retries: Int = 2

        public init(endpoint: String, token: String, configPath: String, caFile: String? = nil, keyFile: String? = nil, owner: AtomicFile.Owner? = nil) {
            self.endpoint = endpoint
            self.token = token
            self.configPath = configPath
            self.caFile = caFile
            self.keyFile = keyFile
            self.owner = owner
        }
    }

    /// What was checked and will be written.
    public struct Plan: Sendable {
        public var request: Request
        /// The ingest's base URL without trailing slashes.
        public var endpoint: String
        public var keyFile: String
        /// The configuration as it is now (empty when the file does not exist yet).
        public var originalText: String
        public var configExists: Bool
        /// `[device] id` of the configuration, when it has one: sent so that a token for another device is refused unused.
        public var device: String?
        /// The CA bundle for the exchange: ``Request/caFile`` or the configuration's `[upload] ca_file`.
        public var caFile: String?
        /// The file the configuration is written to: ``Request/configPath``, or the file it points to when it is a
        /// symbolic link (the link stays).
        public var configTarget: String
    }

    /// What `farmgate enroll` did.
    public struct Outcome: Sendable {
        public var answer: EnrollmentAnswer
        public var keyFile: String
        public var configPath: String
        /// `[device] id` was absent and has been set to the device the token was made for.
        public var deviceIDWritten: Bool
        /// Why the resulting configuration cannot run the agent yet (no sensors, ...), or nil when it can.
        public var configurationProblem: String?
    }

    /// A failure, phrased for the installer, with the exit status the CLI uses.
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let description: String
        /// 1: the exchange failed; 64: bad arguments; 73: a file cannot be written; 78: the configuration cannot be edited.
        public let exitCode: Int32
    }

    // MARK: Before the exchange

    /// Checks everything that does not need the ingest. Blocking file I/O: call it off the concurrency pool.
    public static func prepare(_ request: Request) throws(Failure) -> Plan {
        var endpoint = Substring(request.endpoint.trimmingWhitespace())
        while endpoint.hasSuffix("/") { endpoint = endpoint.dropLast() }
        if endpoint.hasSuffix(EnrollmentProtocol.path) { endpoint = endpoint.dropLast(EnrollmentProtocol.path.count) }
        guard let url = URL(string: String(endpoint)), let scheme = url.scheme?.lowercased(), scheme == "http" || scheme == "https", url.host != nil
        else {
            throw Failure(description: "\(request.endpoint) is not an http:// or https:// URL; give the ingest's base URL, e.g. https://ingest.example.net", exitCode: 64)
        }
        if let problem = AgentConfiguration.endpointQueryOrFragment(String(endpoint)) {
            throw Failure(description: "the URL \(problem)", exitCode: 64)
        }
        // What [upload] endpoint would refuse (a port out of 1–65535, a host that is no host) is refused here, before
        // the token is sent: libcurl's "URL using bad/illegal format" told nothing.
        if let problem = AgentConfiguration.endpointProblem(String(endpoint)) {
            throw Failure(description: "the URL \(problem)", exitCode: 64)
        }
        // The token and the key it is exchanged for cross the network in clear over http://: only to this machine.
        if scheme == "http", !Self.isLoopback(url.host ?? "") {
            throw Failure(
                description: "\(request.endpoint) is plain http:// to another machine: the token and the device key would cross the network in "
                    + "clear. Use the ingest's https:// URL (http:// is taken only for an ingest on this machine: localhost, 127.0.0.0/8, ::1)",
                exitCode: 64)
        }
        // A token is about 80 characters; one of thousands (pasted twice over, a file's contents) was sent, and the
        // ingest's refusal of the oversized header came back as a connection error to retry.
        guard request.token.utf8.count <= 512 else {
            throw Failure(
                description: "the token is \(request.token.utf8.count) characters long; an enrollment token (fge_…) is about 80: copy it again from `farmgate-ingest enroll-token create`",
                exitCode: 64)
        }
        guard request.token.hasPrefix(EnrollmentProtocol.tokenPrefix), request.token.utf8.count > 8,
            request.token.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F })
        else {
            let hint = request.token.hasPrefix("fgd_") ? " (this is a device key: put it in key_file instead, or ask for an enrollment token)" : ""
            throw Failure(
                description: "the token is not an enrollment token (they start with fge_ and come from `farmgate-ingest enroll-token create`)\(hint)",
                exitCode: 64)
        }
        // Checked before the token is spent: a file without a certificate would fail the handshake, blaming the ingest.
        if let caFile = request.caFile, let problem = AgentConfiguration.caFileProblem(caFile) {
            throw Failure(description: "--ca-file: \(problem)", exitCode: 64)
        }

        try checkConfigPath(request.configPath)
        // A symbolic link is followed: its target is the file to edit, and the new one is written beside it.
        let configTarget = try writeTarget(of: request.configPath)
        let configExists = FileManager.default.fileExists(atPath: configTarget)
        // A configuration that does not exist yet is made, in a directory that does: a mistyped -c (or FARMGATE_CONFIG)
        // must not spend the one-time token on a new file in new directories that the agent never reads.
        let configDirectory = URL(fileURLWithPath: configTarget).deletingLastPathComponent().path
        if !configExists, !FileSystem.isDirectory(configDirectory) {
            throw Failure(
                description: "neither \(request.configPath) nor its directory \(configDirectory) exists: check -c (or FARMGATE_CONFIG); "
                    + "enroll edits the agent's configuration, or makes it in an existing directory (install farmgate first: it makes /etc/farmgate/agent.toml)",
                exitCode: 78)
        }
        var originalText = ""
        var device: String?
        var configuredKeyFile: String?
        var configuredCA: String?
        var parsed: ConfigTable?
        // Relative paths in the file are resolved as the agent resolves them: against the directory of the path it is
        // given, a symbolic link's own directory included.
        let base = URL(fileURLWithPath: request.configPath).deletingLastPathComponent().path
        if configExists {
            do {
                originalText = try FileSystem.text(configTarget)
            } catch {
                throw Failure(description: "cannot read \(request.configPath): \(error.reason)", exitCode: 78)
            }
            let document: ConfigTable
            do {
                document = try ConfigDocument.parse(originalText, file: request.configPath)
            } catch {
                throw Failure(description: "\(error.description)\nfix the file first: enroll edits it and must be able to read it", exitCode: 78)
            }
            parsed = document
            do {
                device = try document.table("device")?.string("id")
                let upload = try document.table("upload")
                configuredKeyFile = try upload?.string("key_file").map { AgentConfiguration.resolve($0, against: base) }
                configuredCA = try upload?.string("ca_file").map { AgentConfiguration.resolve($0, against: base) }
            } catch {
                throw Failure(description: "\(error.description)\nfix the file first: enroll edits it", exitCode: 78)
            }
        }
        // A given path is made absolute with `..` resolved (`/missing/../device.key` is /device.key): it is written as
        // it is to [upload] key_file.
        if let given = request.keyFile, given.hasSuffix("/") {
            throw Failure(
                description: "--key-file \(given) is a directory (it ends in /); the key is written to a file: give --key-file a file of its own, such as \(given)device.key",
                exitCode: 64)
        }
        let keyFile = request.keyFile.map { AgentConfiguration.lexicalPath($0) }
            ?? configuredKeyFile ?? AgentConfiguration.resolve("device.key", against: base)
        // A file where a directory of the key's or the configuration's path must be is a path problem, not one of
        // permissions (it said "run as root", exit 73).
        for (path, given, fix) in [
            (keyFile, request.keyFile != nil, request.keyFile != nil ? "give --key-file a path in a directory" : "correct [upload] key_file in \(request.configPath)"),
            (configTarget, true, "give --config a path in a directory"),
        ] {
            if let blocker = FileSystem.fileInTheWay(of: path) {
                throw Failure(
                    description: "\(blocker) is not a directory, so \(path) cannot be written there: \(fix). Nothing was sent: the token is unused",
                    exitCode: given ? 64 : 78)
            }
        }
        // The CA bundle the exchange trusts is one of the files the key must not replace.
        let caForExchange = request.caFile.map { AgentConfiguration.resolve($0, against: FileManager.default.currentDirectoryPath) } ?? configuredCA
        try checkKeyFile(
            keyFile, configPath: request.configPath,
            agentFiles: agentFiles(configPath: request.configPath, document: parsed, base: base)
                + (caForExchange.map { [($0, "the CA file the ingest's certificate is checked against")] } ?? []),
            given: request.keyFile != nil)
        if let other = otherDeviceKeyedAt(keyFile, configPath: request.configPath, device: device) {
            let given = request.keyFile != nil
            throw Failure(
                description: "\(keyFile) is the key of \(other.device.map { "device \"\($0)\"" } ?? "another site (a configuration that names no device yet)") (\(other.config) reads it); writing "
                    + "\(device.map { "\"\($0)\"'s" } ?? "this device's") key over it would stop that agent's uploads: "
                    + (given ? "give --key-file" : "pass --key-file with")
                    + " a file of its own, such as \(URL(fileURLWithPath: keyFile).deletingLastPathComponent().path)/\(device ?? "this-device").key. "
                    + "Nothing was sent: the token is unused",
                exitCode: given ? 64 : 78)
        }
        if configExists { try checkConfigOwner(configTarget, as: .current) }
        let plan = Plan(
            request: request, endpoint: String(endpoint), keyFile: keyFile, originalText: originalText, configExists: configExists,
            device: device, caFile: caForExchange, configTarget: configTarget)
        // The edit must work on the file as it is, with any key: try it now, with a placeholder device.
        _ = try edited(plan, device: device ?? "placeholder")
        let targetDirectory = URL(fileURLWithPath: configTarget).deletingLastPathComponent().path
        for directory in Set([URL(fileURLWithPath: keyFile).deletingLastPathComponent().path, targetDirectory]) {
            if let problem = AtomicFile.canCreate(in: directory) {
                throw Failure(description: "\(problem.description) (run farmgate enroll as root, or give --config/--key-file paths you can write)", exitCode: 73)
            }
        }
        return plan
    }

    /// Whether `host` (a URL's host, IPv6 without brackets) is this machine: `localhost`, 127.0.0.0/8 or ::1.
    static func isLoopback(_ host: String) -> Bool {
        var host = Substring(host.lowercased())
        if host.hasPrefix("["), host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        if host == "localhost" || host == "::1" || host == "0:0:0:0:0:0:0:1" { return true }
        let parts = host.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts[0] == "127" && parts.allSatisfy { UInt8($0) != nil }
    }

    /// An endpoint whose scheme does not match what its port speaks, when libcurl's error says so.
    enum SchemeMismatch {
        /// `https://` to a plain HTTP server: the TLS handshake reads an HTTP answer (OpenSSL's "wrong version number").
        case plainPort
        /// `http://` to a TLS port: the server hangs up on bytes that are no TLS handshake (an empty reply or a reset).
        case tlsPort

        init?(_ error: HTTPClientError, endpoint: String) {
            let secure = endpoint.lowercased().hasPrefix("https://")
            let detail = error.detail.lowercased()
            if secure, error.kind == .tls,
                ["wrong version number", "wrong_version_number", "packet length too long", "unknown protocol", "record layer failure"]
                    .contains(where: { detail.contains($0) })
            {
                self = .plainPort
            } else if !secure, error.kind == .transport, [8, 52, 56].contains(error.curlCode) {
                // CURLE_GOT_NOTHING (52), CURLE_RECV_ERROR (56), CURLE_WEIRD_SERVER_REPLY (8).
                self = .tlsPort
            } else {
                return nil
            }
        }
    }

    /// Refuses a key path that cannot hold the key, or would destroy something: an existing directory, or one of the
    /// agent's own files (``agentFiles(configPath:document:base:)``: the configuration, the buffer and its `-wal`, `-shm`
    /// and `.seq` files, the metrics file, the control socket), by path or as the same file under another name. The key
    /// is written by renaming a new file over the path, so a buffer there would be gone with its pending readings.
    /// `given`: it came from `--key-file` (exit 64), not from the configuration's `[upload] key_file` (exit 78).
    static func checkKeyFile(_ keyFile: String, configPath: String, agentFiles: [(path: String, what: String)], given: Bool) throws(Failure) {
        let source = given ? "--key-file \(keyFile)" : "[upload] key_file of \(configPath) (\(keyFile))"
        let fix = given ? "give --key-file a file of its own" : "set key_file to a file of its own, or pass --key-file"
        let exitCode: Int32 = given ? 64 : 78
        if FileSystem.isDirectory(keyFile) {
            throw Failure(
                description: "\(source) is a directory; the key is written to a file: \(fix), such as \(keyFile)/device.key",
                exitCode: exitCode)
        }
        // A device node, FIFO or socket there is something else's (as root, `--key-file /dev/ttyUSB0` would have replaced
        // the serial port's node). A symbolic link is replaced, never written through, so it may point anywhere.
        var info = stat()
        if lstat(keyFile, &info) == 0, info.st_mode & S_IFMT != S_IFREG, info.st_mode & S_IFMT != S_IFLNK {
            let kind: String
            switch info.st_mode & S_IFMT {
            case S_IFCHR, S_IFBLK: kind = "a device node"
            case S_IFIFO: kind = "a FIFO"
            case S_IFSOCK: kind = "a socket"
            default: kind = "not a regular file"
            }
            throw Failure(
                description: "\(source) is \(kind); writing the key there would replace it: \(fix). Nothing was sent: the token is unused",
                exitCode: exitCode)
        }
        for file in agentFiles where sameFile(keyFile, file.path) {
            let shown = file.path == configPath ? "" : " (\(file.path))"
            throw Failure(
                description: "\(source) is \(file.what)\(shown); writing the key there would replace it: \(fix), such as device.key beside "
                    + "the configuration. Nothing was sent: the token is unused",
                exitCode: exitCode)
        }
        // Any other regular file there must be a device key (an earlier one, being replaced) or empty: anything else is some other
        // file the path names by mistake (a tester's --key-file named another site's agent.toml, and notes), and the
        // key would have replaced it without a word.
        if lstat(keyFile, &info) == 0, info.st_mode & S_IFMT == S_IFREG, info.st_size > 0 {
            let held = info.st_size > 4096 ? nil : FileManager.default.contents(atPath: keyFile).map { String(decoding: $0, as: UTF8.self) }
            let text = held?.trimmingWhitespace() ?? ""
            if held == nil || (!text.isEmpty && KeyFormat.deviceKeyProblem(text) != nil) {
                throw Failure(
                    description: "\(source) holds something other than a device key (\(info.st_size) bytes); writing the key there would replace it: \(fix) "
                        + "(or move that file away, if it is an old key file). Nothing was sent: the token is unused",
                    exitCode: exitCode)
            }
        }
    }

    /// Refuses an answer for another device than the configuration's `[device] id`: the key belongs to that device, and
    /// writing it here would have this site send as it (or be refused for good). Nothing is written.
    /// Also refuses a key that is not a whole device key: it goes into the key file as it came, and one cut short or
    /// carrying a line break would replace a working key with one no ingest accepts.
    static func checkDevice(_ answer: EnrollmentAnswer, plan: Plan) throws(Failure) {
        if KeyFormat.deviceKeyProblem(answer.key) != nil {
            throw Failure(
                description: "the answer of \(plan.endpoint) carries a key that is not a whole device key (fgd_, 8 characters of a-z and 2-7, _, "
                    + "64 lowercase hex digits; this one is \(answer.key.utf8.count) bytes): nothing was written and the key file is unchanged. "
                    + "Is it a farmgate-ingest of this version, or does something on the way change its answers? The token works again for a few minutes",
                exitCode: 1)
        }
        guard let expected = plan.device, answer.device != expected else { return }
        let rotated =
            answer.action == .rotated
            ? " The ingest gave \"\(answer.device)\" a new key: its old key no longer works, so if that device runs elsewhere, enroll it again."
            : ""
        throw Failure(
            description: "wrong device: the ingest enrolled device \"\(answer.device)\" of farm \"\(answer.farm)\" with this token, but "
                + "\(plan.request.configPath) has [device] id = \"\(expected)\"; the key was not written and the configuration not "
                + "changed. Make a token for \"\(expected)\" (`farmgate-ingest enroll-token create --farm \(answer.farm) --device "
                + "\(expected)`) and run farmgate enroll with it, or, if this site is \"\(answer.device)\", set [device] id to it and run "
                + "the same command again within a few minutes (the ingest answers the same key).\(rotated)",
            exitCode: 1)
    }

    /// The configuration text with `[upload]` (and `[device] id` when absent) set, checked with the TOML parser: the values
    /// read back are the ones written and nothing else changed.
    static func edited(_ plan: Plan, device: String) throws(Failure) -> String {
        var editor = ConfigFileEditor(text: plan.configExists ? plan.originalText : newConfigurationHeader)
        do {
            if plan.device == nil { try editor.set("id", .string(device), in: "device") }
            try editor.set("endpoint", .string(plan.endpoint), in: "upload")
            try editor.remove("key", in: "upload")
            if editor.stringValue("key_file", in: "upload") == nil || plan.request.keyFile != nil {
                try editor.set("key_file", .string(plan.keyFile), in: "upload")
            }
            if let caFile = plan.request.caFile { try editor.set("ca_file", .string(plan.caFile ?? caFile), in: "upload") }
        } catch {
            throw Failure(description: "cannot edit \(plan.request.configPath): \(error.description)", exitCode: 78)
        }
        let text = editor.text
        let problem = "cannot edit [upload] of \(plan.request.configPath) automatically; set endpoint and key_file there by hand"
        do {
            let document = try ConfigDocument.parse(text, file: plan.request.configPath)
            let base = URL(fileURLWithPath: plan.request.configPath).deletingLastPathComponent().path
            let upload = try document.table("upload")
            guard try document.table("device")?.string("id") == device,
                try upload?.string("endpoint") == plan.endpoint,
                try upload?.string("key_file").map({ AgentConfiguration.resolve($0, against: base) }) == plan.keyFile,
                upload?.contains("key") == false
            else { throw Failure(description: problem, exitCode: 78) }
        } catch let error as Failure {
            throw error
        } catch {
            throw Failure(description: "\(problem) (\(error))", exitCode: 78)
        }
        return text
    }

    /// The start of a configuration file that enroll creates.
    static let newConfigurationHeader = """
        # farmgate agent configuration, written by `farmgate enroll`. Add the sensors ([[sensor]] tables: see
        # `farmgate sensor drivers --samples`, or `farmgate scan`), then `farmgate config check` and `farmgate doctor`.

        """

    // MARK: The exchange

    /// Exchanges the token. An exchange whose answer was lost (timeout, reset) is sent again, up to ``Request/retries``
    /// times: the ingest gives the same key to the same token for a while.
    public static func exchange(_ plan: Plan, logger: Logger) async throws(Failure) -> EnrollmentAnswer {
        let configuration = HTTPClient.Configuration(
            connectTimeout: .seconds(10), requestTimeout: plan.request.requestTimeout, caFile: plan.caFile, userAgent: "farmgate-enroll")
        let client: HTTPClient
        do {
            client = try HTTPClient(configuration: configuration, logger: logger)
        } catch {
            throw Failure(description: "cannot set up HTTP: \(error.description)", exitCode: 1)
        }
        defer { client.close() }
        var body: [UInt8] = []
        if let device = plan.device {
            do { body = Array(try JSONEncoder().encode(EnrollmentRequest(device: device))) } catch {
                throw Failure(description: "cannot encode the request: \(error)", exitCode: 1)
            }
        }
        let url = plan.endpoint + EnrollmentProtocol.path
        let headers = [HTTPHeader("Authorization", "Bearer \(plan.request.token)"), HTTPHeader("Content-Type", "application/json")]
        var attempt = 0
        while true {
            attempt += 1
            let response: HTTPResponse
            do {
                response = try await client.post(url, headers: headers, body: body)
            } catch {
                // Lost on the way: the ingest may have answered. The same token within the grace window gets the same key.
                if (error.kind == .timedOut || error.kind == .transport), attempt <= plan.request.retries {
                    logger.warning("no answer from the ingest; asking again with the same token", metadata: ["error": "\(error)"])
                    try? await Task.sleep(for: .seconds(2))
                    continue
                }
                throw transportFailure(error, endpoint: plan.endpoint)
            }
            return try answer(response, plan: plan)
        }
    }

    static func transportFailure(_ error: HTTPClientError, endpoint: String) -> Failure {
        if let mismatch = schemeMismatch(error, endpoint: endpoint) { return Failure(description: mismatch, exitCode: 1) }
        let text: String
        switch error.kind {
        case .connectFailed:
            text = "cannot reach the ingest at \(endpoint) (\(error)); check the URL, this site's network and DNS (`getent hosts <host>`), and that the ingest is running"
        case .tls:
            text = "TLS failure talking to \(endpoint) (\(error)); the ingest's certificate is not trusted or does not match the host name. With a private CA, pass --ca-file /path/to/ca.pem; check this site's clock too (`timedatectl`): a clock far off makes every certificate invalid"
        case .timedOut:
            text = "the ingest at \(endpoint) did not answer in time (\(error)); check the network (a proxy? `https_proxy`) and try again: the same token works again for a few minutes"
        case .configuration:
            text = "cannot talk to \(endpoint): \(error)"
        case .cancelled, .transport, .withheld:
            text = "the exchange with \(endpoint) failed (\(error)); try again: the same token works again for a few minutes"
        }
        return Failure(description: text, exitCode: 1)
    }

    /// The words for an endpoint whose scheme does not match what its port speaks, when libcurl's error says so:
    /// `https://` to a plain HTTP server (the TLS handshake reads an HTTP answer: OpenSSL's "wrong version number"), or
    /// `http://` to a TLS port (the server hangs up on bytes that are no TLS handshake: an empty reply or a reset).
    /// Nil when the error is something else.
    static func schemeMismatch(_ error: HTTPClientError, endpoint: String) -> String? {
        switch SchemeMismatch(error, endpoint: endpoint) {
        case .plainPort?:
            return "the server at \(endpoint) does not speak TLS on this port (\(error)): use http:// if the ingest serves plain HTTP "
                + "there, or the port its TLS listens on (443 behind a reverse proxy). Nothing was exchanged: the token is unused"
        case .tlsPort?:
            return "the ingest at \(endpoint) hung up without an answer (\(error)); if it serves HTTPS on this port, use https:// "
                + "(plain HTTP to a TLS port gets no answer). Otherwise try again: the same token works again for a few minutes"
        case nil:
            return nil
        }
    }

    static func answer(_ response: HTTPResponse, plan: Plan) throws(Failure) -> EnrollmentAnswer {
        let decoder = JSONDecoder()
        if response.status == 200 {
            guard let answer = try? decoder.decode(EnrollmentAnswer.self, from: Data(response.body)), (try? DeviceID(answer.device)) != nil
            else {
                throw Failure(description: "the answer of \(plan.endpoint) is not an enrollment answer; is it a farmgate-ingest of this version?", exitCode: 1)
            }
            try checkDevice(answer, plan: plan)
            return answer
        }
        let error = try? decoder.decode(APIErrorBody.self, from: Data(response.body))
        let message = error?.error.message ?? String(decoding: response.body.prefix(300), as: UTF8.self)
        let text: String
        switch (response.status, error?.error.code) {
        case (_, EnrollmentErrorCode.tokenExpired?):
            text = "the token has expired: \(message)"
        case (_, EnrollmentErrorCode.tokenUsed?):
            text = "the token was already used: \(message)"
        case (_, EnrollmentErrorCode.tokenRevoked?):
            text = "the token was revoked: \(message)"
        case (_, EnrollmentErrorCode.invalidToken?):
            text = "the ingest does not accept this token: \(message)"
        case (_, EnrollmentErrorCode.deviceMismatch?):
            text = "wrong device: \(message)"
        case (429, _):
            text = "too many attempts: \(message)"
        case (404, _), (405, _):
            text = "\(plan.endpoint) has no enrollment endpoint (HTTP \(response.status)); is the URL the ingest's, and is it a farmgate-ingest that knows `enroll-token`?"
        case (300..<400, _):
            // Not followed (the token must not go where nobody asked it to): say where, as doctor does for uploads.
            let location = response.header("location").map { " to \($0.escapingControlCharacters.prefix(300))" } ?? ""
            text = "\(plan.endpoint) redirects (HTTP \(response.status))\(location); redirects are not followed: give that URL's base (the ingest's own URL) to `farmgate enroll`. Nothing was exchanged: the token is unused"
        case (400, _) where message.lowercased().contains("https port") || message.lowercased().contains("speak plain http"):
            // nginx: "The plain HTTP request was sent to HTTPS port".
            text = "\(plan.endpoint) is an HTTPS port (HTTP 400: \(message)): use https:// in the URL"
        default:
            text = "the ingest answered HTTP \(response.status): \(message)"
        }
        throw Failure(description: text, exitCode: 1)
    }

    // MARK: After the exchange

    /// Writes the key (mode 0600, owned by ``Request/owner``) and then the configuration. Blocking file I/O.
    public static func apply(_ plan: Plan, answer: EnrollmentAnswer) throws(Failure) -> Outcome {
        try checkDevice(answer, plan: plan)
        let text = try edited(plan, device: plan.device ?? answer.device)
        do {
            try AtomicFile.write(Array((answer.key + "\n").utf8), to: plan.keyFile, mode: 0o600, owner: plan.request.owner)
        } catch {
            throw Failure(
                description: "\(error.description). The ingest has issued the key: run the same command again within a few minutes to get it again",
                exitCode: 73)
        }
        // The configuration keeps its mode and owner; a new one is 0644 (it holds no secret: the key is in key_file).
        var mode: mode_t = 0o644
        var owner: AtomicFile.Owner?
        var info = stat()
        if plan.configExists, stat(plan.configTarget, &info) == 0 {
            mode = info.st_mode & 0o7777
            owner = AtomicFile.Owner(uid: info.st_uid, gid: info.st_gid, name: "the file's owner")
        }
        do {
            try AtomicFile.write(Array(text.utf8), to: plan.configTarget, mode: mode, owner: owner)
        } catch {
            throw Failure(description: "the key is in \(plan.keyFile), but \(error.description); set [upload] endpoint and key_file by hand", exitCode: 73)
        }
        var problem: String?
        do { _ = try AgentConfiguration.load(path: plan.request.configPath) } catch { problem = error.description }
        return Outcome(
            answer: answer, keyFile: plan.keyFile, configPath: plan.request.configPath, deviceIDWritten: plan.device == nil,
            configurationProblem: problem)
    }
}
