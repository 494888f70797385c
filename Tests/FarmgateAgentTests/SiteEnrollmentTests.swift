@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// `farmgate enroll`'s library over real HTTP (libcurl, a loopback server, TLS by socat with openssl certificates), with
/// real files.
@Suite("Site enrollment (libcurl, TLS, files)")
struct SiteEnrollmentTests {
    let logger = Logger(label: "test.enroll")
    static let token = "fge_abcdefgh_" + String(repeating: "a", count: 64)
    static let key = "fgd_keyidabc_" + String(repeating: "b", count: 64)
    static let config = """
        # the site's own notes
        [device]
        id = "site-9"

        [[sensor]]
        id = "tank1.ph"
        driver = "simulated"
        quantity = "ph"

        """

    static func answer(repeated: Bool = false) -> TestResponse {
        .json(200, #"{"farm":"f1","device":"site-9","key":"\#(key)","action":"created","repeated":\#(repeated)}"#)
    }

    /// The key file's owner in these tests: `nobody` when the tests run as root (as in CI), else the current user.
    static var owner: AtomicFile.Owner? { geteuid() == 0 ? AtomicFile.Owner.user(named: "nobody") : nil }

    @Test func overTLSWithTheGivenCAItWritesTheKeyAndPointsUploadAtTheIngest() async throws {
        let pki = try await TestPKI()
        defer { pki.remove() }
        let server = try TestHTTPServer(script: [Self.answer()])
        let tls = try await TLSTerminator(port: try freePort(), backendPort: server.port, pki: pki)
        defer { tls.stop() }
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let endpoint = "https://127.0.0.1:\(tls.port)/"
        var request = SiteEnrollment.Request(endpoint: endpoint, token: Self.token, configPath: config, caFile: pki.caFile, owner: Self.owner)
        request.retries = 0
        let plan = try SiteEnrollment.prepare(request)
        #expect(plan.keyFile == dir.file("device.key") && plan.device == "site-9")
        let answer = try await SiteEnrollment.exchange(plan, logger: logger)
        let outcome = try SiteEnrollment.apply(plan, answer: answer)
        #expect(outcome.answer.key == Self.key && !outcome.deviceIDWritten && outcome.configurationProblem == nil)

        let sent = try #require(server.requests.first)
        #expect(sent.method == "POST" && sent.path == EnrollmentProtocol.path)
        #expect(sent.headers["authorization"] == "Bearer \(Self.token)")
        #expect(try JSONDecoder().decode(EnrollmentRequest.self, from: Data(sent.body)).device == "site-9")

        #expect(try String(contentsOfFile: dir.file("device.key"), encoding: .utf8) == Self.key + "\n")
        var info = stat()
        #expect(stat(dir.file("device.key"), &info) == 0)
        #expect(info.st_mode & 0o777 == 0o600)
        if let owner = Self.owner { #expect(info.st_uid == owner.uid) }
        let written = try String(contentsOfFile: config, encoding: .utf8)
        #expect(written.hasPrefix("# the site's own notes\n[device]\nid = \"site-9\"\n"))
        let loaded = try AgentConfiguration.load(path: config)
        #expect(loaded.upload?.endpoint == "https://127.0.0.1:\(tls.port)")
        #expect(loaded.upload?.deviceKey == Self.key)
        #expect(loaded.upload?.caFile == pki.caFile)
        #expect(dir.names().filter { $0.contains(".tmp-") }.isEmpty, "no temporary file left behind")
    }

    @Test func anUntrustedCertificateIsATLSFailureAndNothingIsWritten() async throws {
        let pki = try await TestPKI()
        defer { pki.remove() }
        let server = try TestHTTPServer(script: [Self.answer()])
        let tls = try await TLSTerminator(port: try freePort(), backendPort: server.port, pki: pki)
        defer { tls.stop() }
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        var request = SiteEnrollment.Request(endpoint: "https://127.0.0.1:\(tls.port)", token: Self.token, configPath: config)
        request.retries = 0
        let plan = try SiteEnrollment.prepare(request)
        let failure = await #expect(throws: SiteEnrollment.Failure.self) { try await SiteEnrollment.exchange(plan, logger: logger) }
        #expect(failure?.description.contains("TLS failure") == true)
        #expect(failure?.description.contains("--ca-file") == true)
        #expect(server.requests.isEmpty)
        #expect(!FileManager.default.fileExists(atPath: dir.file("device.key")))
        #expect(try String(contentsOfFile: config, encoding: .utf8) == Self.config)
    }

    @Test func anAnswerLostOnTheWayIsAskedForAgainWithTheSameToken() async throws {
        let server = try TestHTTPServer(script: [.close, Self.answer(repeated: true)])
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let plan = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: config))
        let answer = try await SiteEnrollment.exchange(plan, logger: logger)
        #expect(answer.key == Self.key && answer.repeated)
        #expect(server.requests.count == 2)
        #expect(server.requests.allSatisfy { $0.headers["authorization"] == "Bearer \(Self.token)" })
    }

    @Test(arguments: [
        (410, "token_expired", "the token has expired"), (410, "token_used", "already used"), (410, "token_revoked", "was revoked"), (401, "invalid_token", "does not accept this token"),
        (409, "device_mismatch", "wrong device"), (404, "not_found", "no enrollment endpoint"),
    ])
    func refusalsSayWhatHappened(status: Int, code: String, phrase: String) async throws {
        let server = try TestHTTPServer(script: [.json(status, #"{"error":{"code":"\#(code)","message":"the ingest's words"}}"#)])
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let plan = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: config))
        let failure = await #expect(throws: SiteEnrollment.Failure.self) { try await SiteEnrollment.exchange(plan, logger: logger) }
        #expect(failure?.description.contains(phrase) == true, "\(failure?.description ?? "")")
        #expect(failure?.exitCode == 1)
        #expect(server.requests.count == 1, "a refusal is not retried")
    }

    // A tester, 2026-12-07: a redirect was told "the ingest answered HTTP 302: " and nothing more.
    @Test func aRedirectNamesWhereAndIsNotFollowed() async throws {
        let server = try TestHTTPServer(script: [.reply(302, headers: ["Location": "https://ingest.example.net/v1/enroll"])])
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let plan = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: config))
        let failure = await #expect(throws: SiteEnrollment.Failure.self) { try await SiteEnrollment.exchange(plan, logger: logger) }
        let text = failure?.description ?? ""
        #expect(text.contains("redirects (HTTP 302) to https://ingest.example.net/v1/enroll") && text.contains("the token is unused"), "\(text)")
        #expect(server.requests.count == 1)
    }

    @Test func anIngestNobodyListensOnIsUnreachable() async throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        var request = SiteEnrollment.Request(endpoint: "http://127.0.0.1:\(try freePort())", token: Self.token, configPath: config)
        request.retries = 0
        let plan = try SiteEnrollment.prepare(request)
        let failure = await #expect(throws: SiteEnrollment.Failure.self) { try await SiteEnrollment.exchange(plan, logger: logger) }
        #expect(failure?.description.contains("cannot reach the ingest") == true, "\(failure?.description ?? "")")
    }

    @Test func localProblemsAreFoundBeforeTheTokenIsUsed() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let broken = try dir.write("broken.toml", "[device\nid = ")
        let notTOML = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: broken))
        }
        #expect(notTOML?.exitCode == 78)
        let config = try dir.write("agent.toml", Self.config)
        let unwritable = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(
                SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, keyFile: "/proc/farmgate/device.key"))
        }
        #expect(unwritable?.exitCode == 73)
        let deviceKey = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.key, configPath: config))
        }
        #expect(deviceKey?.description.contains("device key") == true)
        #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "ftp://i.example", token: Self.token, configPath: config))
        }
    }

    @Test func aKeyPathThatIsADirectoryOrTheConfigurationIsRefusedBeforeTheTokenIsUsed() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        try FileManager.default.createDirectory(atPath: dir.file("keys"), withIntermediateDirectories: false)
        try FileManager.default.createSymbolicLink(atPath: dir.file("other-name.toml"), withDestinationPath: config)
        let given: [(String, String)] = [
            (dir.file("keys"), "is a directory"), (dir.file("keys") + "/", "is a directory"), (config, "is the configuration file itself"),
            (dir.file("keys/../agent.toml"), "is the configuration file itself"), (dir.file("other-name.toml"), "is the configuration file itself"),
        ]
        for (keyFile, phrase) in given {
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, keyFile: keyFile))
            }
            #expect(failure?.description.contains("--key-file") == true && failure?.description.contains(phrase) == true, "\(failure?.description ?? "")")
            #expect(failure?.exitCode == 64)
        }
        // The same from the configuration's own [upload] key_file.
        for (keyFile, phrase) in [
            ("keys", "is a directory"), ("configured.toml", "is the configuration file itself"),
            ("./keys/../configured.toml", "is the configuration file itself"),
        ] {
            let configured = try dir.write("configured.toml", Self.config + "\n[upload]\nendpoint = \"https://i.example\"\nkey_file = \"\(keyFile)\"\n")
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: configured))
            }
            #expect(failure?.description.contains("[upload] key_file") == true && failure?.description.contains(phrase) == true, "\(failure?.description ?? "")")
            #expect(failure?.exitCode == 78)
        }
        #expect(try String(contentsOfFile: config, encoding: .utf8) == Self.config)
        #expect(dir.names(in: "keys").isEmpty)
    }

    // A tester, 2026-12-07: --key-file naming another site's agent.toml, or notes, replaced it with the key.
    @Test func aKeyPathOnAFileThatIsNoDeviceKeyIsRefusedAnOldKeyOrAnEmptyFileIsReplaced() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let other = try dir.write("other-site.toml", "[device]\nid = \"elsewhere\"\n")
        let notes = try dir.write("notes.txt", "important notes\n")
        let big = try dir.write("big.bin", String(repeating: "x", count: 10_000))
        for victim in [other, notes, big] {
            let before = try String(contentsOfFile: victim, encoding: .utf8)
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, keyFile: victim))
            }
            #expect(failure?.description.contains("holds something other than a device key") == true, "\(failure?.description ?? "")")
            #expect(failure?.exitCode == 64)
            #expect(try String(contentsOfFile: victim, encoding: .utf8) == before)
        }
        // An earlier key (being replaced) and an empty file prepared by the installer are taken.
        let oldKey = try dir.write("old.key", "fgd_abcdefgh_" + String(repeating: "0", count: 64) + "\n")
        let empty = try dir.write("empty.key", "")
        for keyFile in [oldKey, empty] {
            _ = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, keyFile: keyFile))
        }
    }

    @Test func aKeyPathThatIsADeviceAFIFOOrTheCAFileIsRefusedBeforeTheTokenIsUsed() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let fifo = dir.file("key.fifo")
        #expect(mkfifo(fifo, 0o600) == 0)
        let ca = try dir.write("ca.pem", "-----BEGIN CERTIFICATE-----\n")
        let given: [(key: String, ca: String?, phrase: String)] = [
            ("/dev/null", nil, "is a device node"), (fifo, nil, "is a FIFO"), (ca, ca, "is the CA file"),
            (dir.file("new-dir") + "/", nil, "is a directory (it ends in /)"),
        ]
        for (keyFile, caFile, phrase) in given {
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(
                    SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, caFile: caFile, keyFile: keyFile))
            }
            #expect(failure?.description.contains(phrase) == true, "\(failure?.description ?? "")")
            #expect(failure?.exitCode == 64)
        }
        // A CA file with no certificate in it (a tester, 2026-12-07: a private key was taken to the ingest, and the failed
        // handshake blamed the ingest's certificate), or an empty path.
        let key = try dir.write("server.key", "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
        for (caFile, phrase) in [(key, "\(key) holds no PEM certificate"), ("", "the CA file's path is empty"), (dir.file("none.pem"), "cannot read the CA file")] {
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, caFile: caFile))
            }
            #expect(failure?.description.hasPrefix("--ca-file: ") == true && failure?.description.contains(phrase) == true, "\(failure?.description ?? "")")
            #expect(failure?.exitCode == 64)
        }
        // The configuration's own ca_file, named again as the key.
        let configured = try dir.write("configured.toml", Self.config + "\n[upload]\nendpoint = \"https://i.example\"\nca_file = \"ca.pem\"\n")
        let failure = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: configured, keyFile: ca))
        }
        #expect(failure?.description.contains("is the CA file") == true, "\(failure?.description ?? "")")
        var info = stat()
        #expect(lstat(fifo, &info) == 0 && info.st_mode & S_IFMT == S_IFIFO, "the FIFO is still there")
        #expect(try String(contentsOfFile: ca, encoding: .utf8) == "-----BEGIN CERTIFICATE-----\n")
        #expect(!FileManager.default.fileExists(atPath: dir.file("new-dir")))
    }

    @Test func aConfigurationOrKeyFileThatIsAFIFOIsRefusedAtOnceNotWaitedOn() throws {
        let dir = try Scratch(prefix: "fg-fifo")
        let fifoConfig = dir.file("agent.fifo")
        #expect(mkfifo(fifoConfig, 0o600) == 0)
        let started = ContinuousClock.now
        #expect(throws: (any Error).self) { try FileSystem.text(fifoConfig) }
        let read = #expect(throws: FileSystem.Failure.self) { try FileSystem.bytes(fifoConfig) }
        #expect(read?.description.contains("not a regular file") == true, "\(read?.description ?? "")")
        let directory = #expect(throws: FileSystem.Failure.self) { try FileSystem.bytes(dir.path) }
        #expect(directory?.description.contains("is a directory") == true, "\(directory?.description ?? "")")
        // A configuration whose key_file is a FIFO: a located error, not a wait for a writer.
        let keyFifo = dir.file("key.fifo")
        #expect(mkfifo(keyFifo, 0o600) == 0)
        let config = try dir.write(
            "agent.toml", Self.config + "\n[upload]\nendpoint = \"https://i.example\"\nkey_file = \"key.fifo\"\n")
        let failure = #expect(throws: (any Error).self) { try AgentConfiguration.load(path: config) }
        #expect("\(failure.map { "\($0)" } ?? "")".contains("not a regular file"), "\(failure.map { "\($0)" } ?? "")")
        #expect(ContinuousClock.now - started < .seconds(5))
    }

    @Test func anEndpointWithAQueryIsRefusedBeforeTheTokenIsUsed() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let failure = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example/?x=1", token: Self.token, configPath: config))
        }
        #expect(failure?.description.contains("remove \"?x=1\"") == true, "\(failure?.description ?? "")")
        #expect(failure?.exitCode == 64)
        // A URL [upload] endpoint would refuse, and plain http:// to another machine (the token and key in clear).
        for (url, phrase) in [
            ("https://127.0.0.1:99999", "port"), ("https://127.0.0.1:0", "port"), ("http://ingest.example.net", "in clear"),
            ("http://192.0.2.10:8080", "in clear"),
        ] {
            let refused = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: url, token: Self.token, configPath: config))
            }
            #expect(refused?.description.contains(phrase) == true && refused?.exitCode == 64, "\(url): \(refused?.description ?? "")")
        }
        // A token thousands of characters long is refused here, not sent.
        let long = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(
                SiteEnrollment.Request(endpoint: "https://i.example", token: "fge_" + String(repeating: "a", count: 100_000), configPath: config))
        }
        #expect(long?.description.contains("100004 characters long") == true && long?.exitCode == 64, "\(long?.description ?? "")")
        // http:// to this machine stays possible (an ingest on the same box, tests).
        for url in ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"] {
            #expect(throws: Never.self, "\(url)") {
                _ = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: url, token: Self.token, configPath: config))
            }
        }
    }

    @Test func anAnswerForAnotherDeviceThanTheConfiguredOneWritesNothing() async throws {
        let other = TestResponse.json(200, #"{"farm":"f1","device":"other-7","key":"\#(Self.key)","action":"rotated","repeated":false}"#)
        let server = try TestHTTPServer(script: [other])
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let plan = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: config))
        #expect(plan.device == "site-9")
        let failure = await #expect(throws: SiteEnrollment.Failure.self) { try await SiteEnrollment.exchange(plan, logger: logger) }
        #expect(failure?.exitCode == 1)
        let text = failure?.description ?? ""
        #expect(text.contains("wrong device: the ingest enrolled device \"other-7\"") && text.contains("[device] id = \"site-9\""), "\(text)")
        #expect(text.contains("the key was not written") && text.contains("old key no longer works"), "\(text)")
        // apply refuses such an answer too, before writing anything.
        let answer = EnrollmentAnswer(farm: "f1", device: "other-7", key: Self.key, action: .created, repeated: false)
        let applied = #expect(throws: SiteEnrollment.Failure.self) { try SiteEnrollment.apply(plan, answer: answer) }
        #expect(applied?.exitCode == 1)
        #expect(!FileManager.default.fileExists(atPath: dir.file("device.key")))
        #expect(try String(contentsOfFile: config, encoding: .utf8) == Self.config)
        #expect(dir.names() == ["agent.toml"])
    }

    // Found by fuzzing the answer: a key cut short, or one carrying a line break and TOML after it, was written over the
    // working key file as it came.
    @Test(arguments: [#"fgd_"#, #"fgd_\n[upload]\nendpoint=\"http://evil\""#, "fgd_keyidabc_" + String(repeating: "B", count: 64)])
    func anAnswerWhoseKeyIsNotAWholeDeviceKeyWritesNothing(key: String) async throws {
        let server = try TestHTTPServer(script: [.json(200, #"{"farm":"f1","device":"site-9","key":"\#(key)","action":"rotated","repeated":false}"#)])
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let working = "fgd_workingk_" + String(repeating: "c", count: 64) + "\n"
        let keyFile = try dir.write("device.key", working)
        let plan = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: config, keyFile: keyFile))
        let failure = await #expect(throws: SiteEnrollment.Failure.self) { try await SiteEnrollment.exchange(plan, logger: logger) }
        #expect(failure?.exitCode == 1)
        #expect(failure?.description.contains("not a whole device key") == true, "\(failure?.description ?? "")")
        #expect(failure?.description.contains("evil") == false, "the key is never printed")
        // apply refuses such an answer too, before writing anything.
        let answer = EnrollmentAnswer(farm: "f1", device: "site-9", key: key.replacingOccurrences(of: "\\n", with: "\n"), action: .rotated, repeated: false)
        #expect(throws: SiteEnrollment.Failure.self) { try SiteEnrollment.apply(plan, answer: answer) }
        #expect(try String(contentsOfFile: keyFile, encoding: .utf8) == working)
        #expect(try String(contentsOfFile: config, encoding: .utf8) == Self.config)
    }

    @Test func aMissingConfigurationIsCreatedWithTheTokensDevice() async throws {
        let server = try TestHTTPServer(script: [Self.answer()])
        let dir = try Scratch(prefix: "fg-enroll")
        let config = dir.file("etc/agent.toml")
        // Made in a directory that exists (a mistyped path's missing directory is refused: see the link test).
        try FileManager.default.createDirectory(atPath: dir.file("etc"), withIntermediateDirectories: true)
        let plan = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: config))
        #expect(plan.device == nil)
        let outcome = try SiteEnrollment.apply(plan, answer: try await SiteEnrollment.exchange(plan, logger: logger))
        #expect(server.requests.first?.body.isEmpty == true, "no [device] id: no device named in the request")
        #expect(outcome.deviceIDWritten)
        #expect(outcome.configurationProblem?.contains("sensor") == true, "no sensors yet: \(outcome.configurationProblem ?? "")")
        let document = try ConfigDocument.load(path: config)
        #expect(try document.table("device")?.string("id") == "site-9")
        #expect(try document.table("upload")?.string("key_file") == dir.file("etc/device.key"))
    }

    // Before the fix only a directory and the configuration itself were refused: a --key-file naming the buffer had its
    // pending readings replaced by the key (a tester lost 318 that way), after the token was spent.
    @Test func aKeyPathOnOneOfTheAgentsOwnFilesIsRefusedBeforeTheTokenIsUsed() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write(
            "agent.toml",
            Self.config + "\n[buffer]\npath = \"data/buffer.sqlite\"\n\n[metrics]\ntextfile = \"metrics/farmgate.prom\"\n\n[control]\nsocket = \"run/control.sock\"\n")
        try FileManager.default.createDirectory(atPath: dir.file("data"), withIntermediateDirectories: false)
        let buffer = try dir.write("data/buffer.sqlite", "the readings")
        try FileManager.default.createSymbolicLink(atPath: dir.file("state"), withDestinationPath: dir.file("data"))
        let given: [(String, String)] = [
            (buffer, "the agent's buffer"), (dir.file("data/../data/buffer.sqlite"), "the agent's buffer"),
            (dir.file("state/buffer.sqlite"), "the agent's buffer"), (buffer + "-wal", "-wal"), (buffer + "-shm", "-shm"),
            (buffer + ".seq", ".seq sidecar"), (buffer + ".reserve", ".reserve file"), (dir.file("metrics/farmgate.prom"), "the metrics file"),
            (dir.file("run/control.sock"), "control socket"),
        ]
        for (keyFile, phrase) in given {
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, keyFile: keyFile))
            }
            #expect(failure?.description.contains("--key-file") == true && failure?.description.contains(phrase) == true, "\(keyFile): \(failure?.description ?? "")")
            #expect(failure?.description.contains("the token is unused") == true)
            #expect(failure?.exitCode == 64)
        }
        // The same from [upload] key_file, and the default buffer when the configuration does not name one.
        let configured = try dir.write("configured.toml", Self.config + "\n[buffer]\npath = \"data/buffer.sqlite\"\n\n[upload]\nkey_file = \"data/buffer.sqlite-wal\"\n")
        let fromFile = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: configured))
        }
        #expect(fromFile?.exitCode == 78 && fromFile?.description.contains("[upload] key_file") == true, "\(fromFile?.description ?? "")")
        let defaults = try dir.write("defaults.toml", Self.config)
        let defaultBuffer = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(
                SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: defaults, keyFile: "/var/lib/farmgate/buffer.sqlite"))
        }
        #expect(defaultBuffer?.description.contains("the agent's buffer") == true, "\(defaultBuffer?.description ?? "")")
        #expect(try String(contentsOfFile: buffer, encoding: .utf8) == "the readings")
        // A key file of its own is fine.
        let plan = try SiteEnrollment.prepare(
            SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, keyFile: dir.file("data/device.key")))
        #expect(plan.keyFile == dir.file("data/device.key"))
    }

    // Before the fix (a tester, 2026-12-05) two configurations in one directory both used device.key beside them, and
    // enrolling the second replaced the first device's key: that agent's uploads were refused from then on.
    @Test func aKeyFileAnotherDevicesConfigurationReadsIsRefusedBeforeTheTokenIsUsed() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let first = try dir.write("agent-a.toml", Self.config.replacingOccurrences(of: "site-9", with: "site-a"))
        _ = first
        let key = try dir.write("device.key", Self.key)
        let second = try dir.write("agent-b.toml", Self.config)
        for (keyFile, code) in [(String?.none, Int32(78)), (key, 64), (dir.file("./device.key"), 64)] {
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: second, keyFile: keyFile))
            }
            #expect(failure?.description.contains("is the key of device \"site-a\" (\(first) reads it)") == true, "\(failure?.description ?? "")")
            #expect(failure?.description.contains("the token is unused") == true && failure?.exitCode == code, "\(failure?.description ?? "")")
        }
        // A neighbour in the middle of an edit (it does not parse; its agent runs the file it loaded) is read line by
        // line, and one that names no device yet counts as another site's (before the fix, a tester 2026-12-06: the
        // key was replaced in both cases).
        let siteA = Self.config.replacingOccurrences(of: "site-9", with: "site-a")
        for (neighbour, says) in [(siteA + "\ngarbage = = =\n", "device \"site-a\""), (siteA.replacingOccurrences(of: "id = \"site-a\"", with: ""), "another site")] {
            _ = try dir.write("agent-a.toml", neighbour)
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: second))
            }
            #expect(failure?.description.contains("is the key of \(says)") == true, "\(failure?.description ?? "")")
        }
        // Whatever the neighbour's name (before the fix, a tester 2026-12-06: only *.toml was read).
        try FileManager.default.moveItem(atPath: first, toPath: dir.file("agent-a.conf"))
        let renamed = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: second))
        }
        #expect(renamed?.description.contains("(\(dir.file("agent-a.conf")) reads it)") == true, "\(renamed?.description ?? "")")
        try FileManager.default.moveItem(atPath: dir.file("agent-a.conf"), toPath: first)
        // An ingest's configuration beside it reads no key.
        _ = try dir.write("agent-a.toml", "[server]\nport = 8080\n")
        #expect(try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: second)).keyFile == key)
        _ = try dir.write("agent-a.toml", siteA)
        // A configuration without a device id yet cannot take another device's key either.
        let unnamed = try dir.write("agent-c.toml", "[[sensor]]\nid = \"t\"\ndriver = \"simulated\"\nquantity = \"ph\"\n")
        #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: unnamed))
        }
        try FileManager.default.removeItem(atPath: unnamed)
        // Its own key file is fine, and so is the shared one once the other configuration names a key of its own.
        #expect(try SiteEnrollment.prepare(
            SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: second, keyFile: dir.file("site-9.key"))).keyFile == dir.file("site-9.key"))
        _ = try dir.write("agent-a.toml", Self.config.replacingOccurrences(of: "site-9", with: "site-a") + "\n[upload]\nendpoint = \"https://i.example\"\nkey_file = \"a.key\"\n")
        #expect(try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: second)).keyFile == key)
        // The same device's configuration under two names shares its key.
        _ = try dir.write("agent-a.toml", Self.config)
        #expect(try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: second)).keyFile == key)
        #expect(try String(contentsOfFile: key, encoding: .utf8) == Self.key)
    }

    // Before the fix (a tester, 2026-12-06) a second `make install` (which leaves the template as agent.toml.example),
    // a package upgrade (agent.toml.dpkg-dist) or an editor's backup beside the configuration was taken for another site
    // naming no device yet, and re-enrolling (key rotation) was refused with exit 78.
    @Test func installersPackagesAndEditorsLeftoverCopiesAreNoOtherSite() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let key = try dir.write("device.key", Self.key)
        // The shipped template: a [device] table with no id, the default key file.
        let template = "[device]\n# id = \"greenhouse-1\"\n\n[buffer]\npath = \"buffer.sqlite\"\n"
        let leftovers = [
            "agent.toml.example", "agent.toml.dpkg-dist", "agent.toml.dpkg-old", "agent.toml.dpkg-new", "agent.toml.ucf-dist",
            "agent.toml.ucf-old", "agent.toml.orig", "agent.toml.bak", "agent.toml~", "agent.toml.old", "agent.toml.rpmnew",
            "agent.toml.pacnew", "#agent.toml#", "AGENT.TOML.BAK",
        ]
        for name in leftovers {
            let copy = try dir.write(name, template)
            #expect(try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config)).keyFile == key, "\(name)")
            // A backup of another device's configuration is no running site either.
            _ = try dir.write(name, Self.config.replacingOccurrences(of: "site-9", with: "site-a"))
            #expect(try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config)).keyFile == key, "\(name)")
            try FileManager.default.removeItem(atPath: copy)
        }
        // A copy that names this configuration's device is this site, under any name.
        _ = try dir.write("agent-copy.toml", Self.config)
        #expect(try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config)).keyFile == key)
        // Any other name is still read by its content: a disabled site's file still counts.
        for name in ["agent.toml.disabled", "agent-b.toml", "example.toml"] {
            let other = try dir.write(name, template)
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config))
            }
            #expect(failure?.description.contains("another site") == true && failure?.exitCode == 78, "\(name): \(failure?.description ?? "")")
            try FileManager.default.removeItem(atPath: other)
        }
        #expect(try String(contentsOfFile: key, encoding: .utf8) == Self.key)
    }

    // Before the fix (a tester, 2026-12-06) a key file under a regular file was refused as a permission problem: "run
    // farmgate enroll as root", exit 73.
    @Test func aKeyFileUnderARegularFileIsAPathError() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let blocker = try dir.write("notadir", "x")
        let given = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(
                SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, keyFile: blocker + "/device.key"))
        }
        #expect(given?.exitCode == 64, "\(given?.description ?? "")")
        #expect(given?.description.hasPrefix("\(blocker) is not a directory, so \(blocker)/device.key cannot be written there: give --key-file") == true,
            "\(given?.description ?? "")")
        _ = try dir.write("agent.toml", Self.config + "\n[upload]\nendpoint = \"https://i.example\"\nkey_file = \"notadir/device.key\"\n")
        let configured = #expect(throws: SiteEnrollment.Failure.self) {
            try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config))
        }
        #expect(configured?.exitCode == 78 && configured?.description.contains("correct [upload] key_file in \(config)") == true, "\(configured?.description ?? "")")
    }

    // Before the fix `-c ''` (or FARMGATE_CONFIG set to nothing, or a directory) passed every check, the token was spent,
    // and then the write failed (exit 73); with '' the key landed in the parent of the working directory.
    @Test func aConfigurationPathThatNamesNoFileIsRefusedBeforeTheTokenIsUsed() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        for path in ["", "  ", dir.path, dir.path + "/", dir.file("newdir") + "/", dir.file("newdir/.."), dir.file(".")] {
            let failure = #expect(throws: SiteEnrollment.Failure.self) {
                try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: path))
            }
            #expect(failure?.exitCode == 64, "\(path): \(failure?.description ?? "")")
            #expect(failure?.description.contains("configuration path") == true, "\(path): \(failure?.description ?? "")")
        }
        #expect(dir.names().isEmpty)
    }

    // Before the fix the editor did not see [upload] in a CRLF file and added a second one: refused as "defined twice".
    @Test func aConfigurationWithCRLFEndingsIsEnrolledAndKeepsThem() async throws {
        let server = try TestHTTPServer(script: [Self.answer()])
        let dir = try Scratch(prefix: "fg-enroll")
        let original = (Self.config + "\n[upload]\nendpoint = \"https://old.example\"\n").replacingOccurrences(of: "\n", with: "\r\n")
        let config = try dir.write("agent.toml", original)
        let plan = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: config))
        let outcome = try SiteEnrollment.apply(plan, answer: try await SiteEnrollment.exchange(plan, logger: logger))
        #expect(outcome.configurationProblem == nil, "\(outcome.configurationProblem ?? "")")
        let written = try FileSystem.bytes(config)
        let lines = written.split(separator: UInt8(ascii: "\n"))
        #expect(lines.allSatisfy { $0.last == UInt8(ascii: "\r") }, "every line keeps CRLF: \(String(decoding: written, as: UTF8.self))")
        let loaded = try AgentConfiguration.load(path: config)
        #expect(loaded.upload?.endpoint == server.url && loaded.upload?.deviceKey == Self.key)
    }

    // Before the fix the link was replaced by a regular file and its target, the file the installer keeps, left unedited.
    @Test func aSymlinkedConfigurationHasItsTargetEditedAndStaysALink() async throws {
        let server = try TestHTTPServer(script: [Self.answer(), Self.answer(repeated: true)])
        let dir = try Scratch(prefix: "fg-enroll")
        try FileManager.default.createDirectory(atPath: dir.file("real"), withIntermediateDirectories: false)
        try FileManager.default.createDirectory(atPath: dir.file("etc"), withIntermediateDirectories: false)
        let target = try dir.write("real/real.toml", Self.config)
        chmod(target, 0o640)
        let link = dir.file("etc/agent.toml")
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "../real/real.toml")
        let plan = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: link))
        #expect(plan.configTarget == target)
        #expect(plan.keyFile == dir.file("etc/device.key"), "relative to the link's directory, as the agent reads it")
        _ = try SiteEnrollment.apply(plan, answer: try await SiteEnrollment.exchange(plan, logger: logger))
        var info = stat()
        #expect(lstat(link, &info) == 0 && info.st_mode & S_IFMT == S_IFLNK, "the link stays a link")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: link) == "../real/real.toml")
        #expect(stat(target, &info) == 0 && info.st_mode & 0o777 == 0o640, "the target keeps its mode")
        #expect(try AgentConfiguration.load(path: link).upload?.deviceKey == Self.key)
        #expect(try String(contentsOfFile: target, encoding: .utf8).contains("endpoint = \"\(server.url)\""))
        #expect(dir.names(in: "etc") == ["agent.toml", "device.key"] && dir.names(in: "real") == ["real.toml"], "no temporary file left")

        // A link to a file that does not exist yet, in a directory that does not either: refused before the token is used.
        let dangling = dir.file("etc/new.toml")
        try FileManager.default.createSymbolicLink(atPath: dangling, withDestinationPath: dir.file("real/new/agent.toml"))
        #expect(throws: SiteEnrollment.Failure.self) {
            _ = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: dangling, keyFile: dir.file("etc/new.key")))
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("real/new")), "a directory was made")
        let typo = try #require(
            (try? SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: dir.file("ect/agent.toml")))) == nil ? "refused" : nil,
            "a configuration in a directory that does not exist was accepted")
        #expect(typo == "refused")
        // With its directory there, the file is created where the link points.
        try FileManager.default.createDirectory(atPath: dir.file("real/new"), withIntermediateDirectories: true)
        let second = try SiteEnrollment.prepare(SiteEnrollment.Request(endpoint: server.url, token: Self.token, configPath: dangling, keyFile: dir.file("etc/new.key")))
        _ = try SiteEnrollment.apply(second, answer: try await SiteEnrollment.exchange(second, logger: logger))
        #expect(lstat(dangling, &info) == 0 && info.st_mode & S_IFMT == S_IFLNK)
        #expect(FileManager.default.fileExists(atPath: dir.file("real/new/agent.toml")))
    }

    // Before the fix the process's right to give the new file the old one's owner was found out after the exchange
    // (fchown EPERM, exit 73, the token spent).
    @Test func aConfigurationWhoseOwnerTheProcessCannotKeepIsRefusedBeforeTheExchange() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        var info = stat()
        #expect(stat(config, &info) == 0)
        let stranger = SiteEnrollment.Identity(uid: info.st_uid &+ 4242, gid: info.st_gid &+ 4242, groups: [], name: "someone")
        let failure = #expect(throws: SiteEnrollment.Failure.self) { try SiteEnrollment.checkConfigOwner(config, as: stranger) }
        #expect(failure?.exitCode == 73)
        #expect(failure?.description.contains("sudo") == true && failure?.description.contains("token is unused") == true, "\(failure?.description ?? "")")
        let owner = SiteEnrollment.Identity(uid: info.st_uid, gid: info.st_gid &+ 4242, groups: [info.st_gid], name: "me")
        try SiteEnrollment.checkConfigOwner(config, as: owner)
        let otherGroup = SiteEnrollment.Identity(uid: info.st_uid == 0 ? 4242 : info.st_uid, gid: info.st_gid &+ 1, groups: [], name: "me")
        if info.st_uid != 0 { #expect(throws: SiteEnrollment.Failure.self) { try SiteEnrollment.checkConfigOwner(config, as: otherGroup) } }
        try SiteEnrollment.checkConfigOwner(config, as: SiteEnrollment.Identity(uid: 0, gid: 0, groups: [], name: "root"))
    }

    @Test func aSchemeThatDoesNotMatchThePortSaysWhichToUse() async throws {
        // https:// to a plain HTTP server.
        let plain = try TestHTTPServer(script: [Self.answer()])
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        var request = SiteEnrollment.Request(endpoint: "https://127.0.0.1:\(plain.port)", token: Self.token, configPath: config)
        request.retries = 0
        let plan = try SiteEnrollment.prepare(request)
        let tls = await #expect(throws: SiteEnrollment.Failure.self) { try await SiteEnrollment.exchange(plan, logger: logger) }
        #expect(tls?.description.contains("does not speak TLS on this port") == true && tls?.description.contains("http://") == true, "\(tls?.description ?? "")")

        // http:// to a TLS port.
        let pki = try await TestPKI()
        defer { pki.remove() }
        let backend = try TestHTTPServer(script: [Self.answer()])
        let terminator = try await TLSTerminator(port: try freePort(), backendPort: backend.port, pki: pki)
        defer { terminator.stop() }
        request.endpoint = "http://127.0.0.1:\(terminator.port)"
        let second = try SiteEnrollment.prepare(request)
        let clear = await #expect(throws: SiteEnrollment.Failure.self) { try await SiteEnrollment.exchange(second, logger: logger) }
        #expect(clear?.description.contains("use https://") == true, "\(clear?.description ?? "")")
        #expect(backend.requests.isEmpty)
    }

    // Before the fix a key path through a missing directory and `..` hung prepare: the walk up to an existing parent
    // appended `..` for ever.
    @Test(.timeLimit(.minutes(1))) func aKeyPathThroughAMissingDirectoryAndDotDotIsResolved() throws {
        let dir = try Scratch(prefix: "fg-enroll")
        let config = try dir.write("agent.toml", Self.config)
        let plan = try SiteEnrollment.prepare(
            SiteEnrollment.Request(endpoint: "https://i.example", token: Self.token, configPath: config, keyFile: dir.file("missing/../keys/device.key")))
        #expect(plan.keyFile == dir.file("keys/device.key"))
        #expect(try SiteEnrollment.edited(plan, device: "site-9").contains("key_file = \"\(dir.file("keys/device.key"))\""))
    }
}
