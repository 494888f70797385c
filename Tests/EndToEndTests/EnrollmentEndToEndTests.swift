import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

/// Enrollment with the real binaries: `farmgate-ingest enroll-token create`, `farmgate-ingest serve`, `farmgate enroll`,
/// then a real agent uploading with the key it wrote.
@Suite("Enrollment end to end", .serialized)
struct EnrollmentEndToEndTests {
    /// The site's configuration before enrollment: comments, a device id, sensors, no [upload].
    static func siteConfig(device: String) -> String {
        """
        # North greenhouse: three tanks (keep this comment)
        [device]
        id = "\(device)"

        [buffer]
        path = "\(device)/buffer.sqlite"   # beside this file
        commit_interval = "100ms"

        [control]
        socket = "\(device)/control.sock"

        [clock]
        check = false

        [[sensor]]
        id = "tank1.ph"
        driver = "simulated"
        quantity = "ph"
        interval = "200ms"
        fault_rate = 0
        latency = "0ms"

        """
    }

    /// The token `enroll-token create` printed (its first line).
    static func token(_ farm: Farm, device: String, ttl: String = "1h") async throws -> String {
        let output = try await farm.admin(["enroll-token", "create", "--farm", "e2e", "--device", device, "--ttl", ttl])
        let token = try #require(output.split(separator: "\n").first.map(String.init))
        #expect(token.hasPrefix("fge_"))
        #expect(output.contains("valid until"))
        return token
    }

    /// `farmgate enroll` as the tests' user; as root the key goes to `nobody`.
    static func enroll(_ farm: Farm, _ token: String, config: String, endpoint: String? = nil) async throws -> (status: Int32, stdout: String, stderr: String) {
        var arguments = ["enroll", endpoint ?? farm.endpoint, token, "--config", config]
        if geteuid() == 0 { arguments += ["--owner", "nobody"] }
        return try await runCommand(Farm.agentBinary, arguments)
    }

    @Test func aTokenBecomesAKeyTheAgentUploadsWith() async throws {
        let farm = try await Farm()
        try await farm.startIngest()
        let token = try await Self.token(farm, device: "site-9")
        let config = try farm.dir.write("site-9.toml", Self.siteConfig(device: "site-9"))

        let enrolled = try await Self.enroll(farm, token, config: config)
        #expect(enrolled.status == 0, "\(enrolled.stderr)")
        #expect(enrolled.stdout.contains("Enrolled as device site-9 of farm e2e (a new device)"), "\(enrolled.stdout)")
        let keyPath = farm.dir.file("device.key")
        let key = try String(contentsOfFile: keyPath, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(key.hasPrefix("fgd_"))
        #expect(!enrolled.stdout.contains(key) && !enrolled.stderr.contains(key), "the key is never printed")
        let attributes = try FileManager.default.attributesOfItem(atPath: keyPath)
        #expect((attributes[.posixPermissions] as? NSNumber)?.intValue == 0o600)
        if geteuid() == 0 { #expect((attributes[.ownerAccountID] as? NSNumber)?.uint32Value == AtomicFile.Owner.user(named: "nobody")?.uid) }
        let written = try String(contentsOfFile: config, encoding: .utf8)
        #expect(written.hasPrefix("# North greenhouse: three tanks (keep this comment)\n[device]\nid = \"site-9\""))
        #expect(written.contains("path = \"site-9/buffer.sqlite\"   # beside this file"))
        #expect(written.contains("[upload]\nendpoint = \"\(farm.endpoint)\"\nkey_file = \"\(keyPath)\""))

        // The same token again at once (the answer was lost): the same key, no second device.
        let again = try await Self.enroll(farm, token, config: config)
        #expect(again.status == 0, "\(again.stderr)")
        #expect(again.stdout.contains("same key again"))
        #expect(try String(contentsOfFile: keyPath, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) == key)

        let agent = try farm.startAgent(config: config, log: "agent-site-9.log")
        let stored = await eventually(timeout: .seconds(30), every: .milliseconds(300)) {
            ((try? await farm.storedSequences(device: "site-9")) ?? []).count >= 3
        }
        await agent.stop()
        #expect(stored, "the agent did not upload with the enrolled key: \(agent.log)")

        let log = farm.ingest?.log ?? ""
        let tokenID = String(token.dropFirst(4).prefix(8))
        #expect(log.contains("device enrolled") && log.contains("enroll.token=\(tokenID)") && log.contains("device.id=site-9"))
        #expect(log.contains("enrollment answered again"))
        #expect(!log.contains(key) && !log.contains(token), "neither the key nor the token is logged")
    }

    @Test func aTokenForAnotherDeviceIsRefusedAndStaysUsable() async throws {
        let farm = try await Farm()
        try await farm.startIngest()
        let token = try await Self.token(farm, device: "site-7")
        let config = try farm.dir.write("site.toml", Self.siteConfig(device: "site-6"))
        let refused = try await Self.enroll(farm, token, config: config)
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("wrong device") && refused.stderr.contains("site-7"), "\(refused.stderr)")
        #expect(try String(contentsOfFile: config, encoding: .utf8) == Self.siteConfig(device: "site-6"), "nothing written")
        #expect(!FileManager.default.fileExists(atPath: farm.dir.file("device.key")))

        try Self.siteConfig(device: "site-7").write(toFile: config, atomically: true, encoding: .utf8)
        let enrolled = try await Self.enroll(farm, token, config: config)
        #expect(enrolled.status == 0, "\(enrolled.stderr)")
    }

    @Test func anExistingDeviceGetsANewKeyAndTheOldOneStops() async throws {
        let farm = try await Farm()
        let oldKey = try await farm.createDevice("site-5")
        try await farm.startIngest()
        let token = try await Self.token(farm, device: "site-5")
        let config = try farm.dir.write("site.toml", Self.siteConfig(device: "site-5"))
        let enrolled = try await Self.enroll(farm, token, config: config)
        #expect(enrolled.status == 0, "\(enrolled.stderr)")
        #expect(enrolled.stdout.contains("an existing device: it has a new key"), "\(enrolled.stdout)")
        let newKey = try String(contentsOfFile: farm.dir.file("device.key"), encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(newKey != oldKey)
        let refused = await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            (try? await farm.post(Data(), key: oldKey, contentType: "application/json").0) == 401
        }
        #expect(refused, "the old key still works")
    }

    @Test func anUnreachableIngestIsAClearError() async throws {
        let farm = try await Farm()
        let config = try farm.dir.write("site.toml", Self.siteConfig(device: "site-4"))
        let result = try await Self.enroll(farm, "fge_abcdefgh_" + String(repeating: "a", count: 64), config: config, endpoint: "http://127.0.0.1:\(try freePort())")
        #expect(result.status == 1)
        #expect(result.stderr.contains("cannot reach the ingest"), "\(result.stderr)")
        #expect(try String(contentsOfFile: config, encoding: .utf8) == Self.siteConfig(device: "site-4"))
    }

    // A tester, 2026-12-07: `--owner ''` said "the user  does not exist", `--key-file ''` wrote into the current
    // directory, `doctor --user ''` said "there is no user ".
    @Test func emptyOptionsAreUsageErrors() async throws {
        let token = "fge_abcdefgh_" + String(repeating: "a", count: 64)
        for option in ["--owner", "--key-file", "--ca-file"] {
            let result = try await runCommand(Farm.agentBinary, ["enroll", "http://127.0.0.1:9", token, option, ""])
            #expect(result.status == 64 && result.stderr.contains("\(option) is empty"), "\(option): \(result.stderr)")
        }
        let doctor = try await runCommand(Farm.agentBinary, ["doctor", "--user", ""])
        #expect(doctor.status == 64 && doctor.stderr.contains("--user is empty"), "\(doctor.stderr)")
    }

    @Test func enrollTokenCreateChecksItsArguments() async throws {
        let farm = try await Farm()
        let badTTL = try await runCommand(
            Farm.ingestBinary, ["enroll-token", "create", "--farm", "e2e", "--device", "d", "--ttl", "90d", "--config", farm.ingestConfig])
        #expect(badTTL.status == 64 && badTTL.stderr.contains("--ttl must be between 1m and 30d"), "\(badTTL.stderr)")
        let noFarm = try await runCommand(
            Farm.ingestBinary, ["enroll-token", "create", "--farm", "nowhere", "--device", "d", "--config", farm.ingestConfig])
        #expect(noFarm.status == 1 && noFarm.stderr.contains("farm 'nowhere' does not exist"), "\(noFarm.stderr)")
        // The outbox listing of an unknown farm is the same error, not an empty table.
        let noOutbox = try await runCommand(Farm.ingestBinary, ["alert", "outbox", "list", "--farm", "nowhere", "--config", farm.ingestConfig])
        #expect(noOutbox.status == 1 && noOutbox.stderr.contains("farm 'nowhere' does not exist"), "\(noOutbox.stderr)")
        let outbox = try await runCommand(Farm.ingestBinary, ["alert", "outbox", "list", "--farm", "e2e", "--config", farm.ingestConfig])
        #expect(outbox.status == 0, "\(outbox.stderr)")
    }

    /// `farmgate-ingest ARGUMENTS --config …` with its status and output, for commands expected to fail.
    static func ingestCommand(_ farm: Farm, _ arguments: [String]) async throws -> (status: Int32, stdout: String, stderr: String) {
        try await runCommand(Farm.ingestBinary, arguments + ["--config", farm.ingestConfig])
    }

    /// The objects `enroll-token list --json` printed.
    static func listedJSON(_ farm: Farm, _ arguments: [String] = []) async throws -> [[String: String]] {
        let output = try await farm.admin(["enroll-token", "list", "--json"] + arguments)
        let parsed = try JSONSerialization.jsonObject(with: Data(output.utf8))
        return try #require(parsed as? [[String: String]], "not an array of objects of strings: \(output)")
    }

    @Test func listShowsUsableTokensAndRevokeStopsOneAtOnce() async throws {
        let farm = try await Farm()
        try await farm.startIngest()
        let revokedToken = try await Self.token(farm, device: "site-3")
        let keptToken = try await Self.token(farm, device: "site-2", ttl: "2h")
        let revokedID = String(revokedToken.dropFirst(4).prefix(8))
        let keptID = String(keptToken.dropFirst(4).prefix(8))

        let table = try await farm.admin(["enroll-token", "list"])
        let lines = table.split(separator: "\n").map(String.init)
        #expect(lines.first == "KEY ID\tFARM\tDEVICE\tCREATED\tEXPIRES\tSTATE", "\(table)")
        #expect(lines.count == 3, "\(table)")
        #expect(lines.dropFirst().first?.hasPrefix("\(keptID)\te2e\tsite-2\t") == true, "newest first: \(table)")
        #expect(lines.last?.hasPrefix("\(revokedID)\te2e\tsite-3\t") == true && lines.last?.hasSuffix("\tunused") == true, "\(table)")
        let secrets = [revokedToken, keptToken].map { String($0.dropFirst(13)) }
        #expect(secrets.allSatisfy { !table.contains($0) }, "never a secret")

        let listed = try await Self.listedJSON(farm, ["--farm", "e2e"])
        #expect(listed.map { $0["key_id"] } == [keptID, revokedID])
        let first = try #require(listed.first)
        #expect(first["farm"] == "e2e" && first["device"] == "site-2" && first["state"] == "unused")
        #expect(first["created"].flatMap(RFC3339.parse) != nil && first["expires"].flatMap(RFC3339.parse) != nil)

        // Revoked by its whole text: the running ingest refuses it at once, and the site says why.
        let revoked = try await farm.admin(["enroll-token", "revoke", revokedToken])
        #expect(revoked.contains("Revoked enrollment token \(revokedID) (device site-3 of farm e2e)"), "\(revoked)")
        let config = try farm.dir.write("site-3.toml", Self.siteConfig(device: "site-3"))
        let refused = try await Self.enroll(farm, revokedToken, config: config)
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("the token was revoked") && refused.stderr.contains("enroll-token create --farm e2e --device site-3"), "\(refused.stderr)")
        #expect(!FileManager.default.fileExists(atPath: farm.dir.file("device.key")))

        #expect(try await Self.listedJSON(farm).map { $0["key_id"] } == [keptID], "by default only usable tokens")
        let all = try await Self.listedJSON(farm, ["--all"])
        let gone = try #require(all.first { $0["key_id"] == revokedID })
        #expect(gone["state"] == "revoked" && gone["revoked_at"].flatMap(RFC3339.parse) != nil)
        let allTable = try await farm.admin(["enroll-token", "list", "--all"])
        #expect(allTable.contains("\tsite-3\t") && allTable.contains("\trevoked at "), "\(allTable)")

        // Again by id: a no-op that says so.
        let again = try await farm.admin(["enroll-token", "revoke", revokedID])
        #expect(again.contains("was already revoked at") && again.contains("nothing changed"), "\(again)")

        // The other token still enrolls; then it is listed as used, and revoking it leaves its key alone.
        let keptConfig = try farm.dir.write("site-2.toml", Self.siteConfig(device: "site-2"))
        let enrolled = try await Self.enroll(farm, keptToken, config: keptConfig)
        #expect(enrolled.status == 0, "\(enrolled.stderr)")
        let used = try await farm.admin(["enroll-token", "revoke", keptID])
        #expect(used.contains("was already used at") && used.contains("it was not revoked"), "\(used)")
        #expect(used.contains("The device key it produced keeps working") && used.contains("device revoke --farm e2e --device site-2"), "\(used)")
        let key = try String(contentsOfFile: farm.dir.file("device.key"), encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(await farm.httpStatus(IngestProtocol.deviceStatePath, bearer: key) == 200, "the device key keeps working")
        let usedEntry = try #require(try await Self.listedJSON(farm, ["--all"]).first { $0["key_id"] == keptID })
        #expect(usedEntry["state"] == "used" && usedEntry["used_by"] == "127.0.0.1" && usedEntry["action"] == "created", "\(usedEntry)")
        #expect(try await farm.admin(["enroll-token", "list"]).contains("No usable enrollment tokens"))
    }

    @Test func listAndRevokeRefuseBadInput() async throws {
        let farm = try await Farm()
        let unknown = try await Self.ingestCommand(farm, ["enroll-token", "revoke", "abcdefgh"])
        #expect(unknown.status == 1 && unknown.stderr.contains("enrollment token 'abcdefgh' does not exist"), "\(unknown.stderr)")
        #expect(unknown.stderr.contains("enroll-token list --all"), "\(unknown.stderr)")
        let mangled = try await Self.ingestCommand(farm, ["enroll-token", "revoke", "fge_x"])
        #expect(mangled.status == 64 && mangled.stderr.contains("'fge_x' is not an enrollment token"), "\(mangled.stderr)")
        let malformed = try await Self.ingestCommand(farm, ["enroll-token", "revoke", "ABC-1"])
        #expect(malformed.status == 64 && malformed.stderr.contains("'ABC-1' is not an enrollment token id"), "\(malformed.stderr)")
        let deviceKey = try await farm.createDevice("d1")
        let notAToken = try await Self.ingestCommand(farm, ["enroll-token", "revoke", deviceKey])
        #expect(notAToken.status == 64 && notAToken.stderr.contains("that is a device key"), "\(notAToken.stderr)")
        #expect(!notAToken.stderr.contains(String(deviceKey.dropFirst(13))), "the key's secret is not echoed")
        let noFarm = try await Self.ingestCommand(farm, ["enroll-token", "list", "--farm", "nowhere"])
        #expect(noFarm.status == 1 && noFarm.stderr.contains("farm 'nowhere' does not exist"), "\(noFarm.stderr)")
        let badFarm = try await Self.ingestCommand(farm, ["enroll-token", "list", "--farm", "no farm"])
        #expect(badFarm.status == 64, "\(badFarm.stderr)")
    }

    /// The state `enroll-token list --all --json` shows for the token `token`.
    static func tokenState(_ farm: Farm, _ token: String) async throws -> String? {
        let id = String(token.dropFirst(4).prefix(8))
        return try await Self.listedJSON(farm, ["--all"]).first { $0["key_id"] == id }?["state"]
    }

    // Before the fix `-c ''` and FARMGATE_CONFIG='' spent the token and then failed to write (exit 73), the key landing in
    // the parent of the working directory.
    @Test func anEmptyConfigurationPathIsRefusedAndTheTokenStaysUnused() async throws {
        let farm = try await Farm()
        try await farm.startIngest()
        let token = try await Self.token(farm, device: "site-8")
        let work = farm.dir.file("work/here")
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        // Run from `work`, so that a key written "beside" an empty path would land in the scratch directory.
        let shell = ["-c", #"cd "$1" && shift && exec "$@""#, "sh", work, Farm.agentBinary, "enroll", farm.endpoint, token]
            + (geteuid() == 0 ? ["--owner", "nobody"] : [])
        for (arguments, environment) in [(["-c", ""], [String: String]()), ([], ["FARMGATE_CONFIG": ""]), (["-c", farm.dir.file("new") + "/"], [:])] {
            let result = try await runCommand("/bin/sh", shell + arguments, environment: environment)
            #expect(result.status == 64, "\(arguments) \(environment): \(result.stderr)")
            #expect(result.stderr.contains("configuration path"), "\(result.stderr)")
        }
        #expect(try await Self.tokenState(farm, token) == "unused")
        #expect(!FileManager.default.fileExists(atPath: farm.dir.file("work/device.key")))
        #expect(!FileManager.default.fileExists(atPath: farm.dir.file("new")))
    }

    // Before the fix a user who may write the directory but not give a file to root had the token spent, then got exit
    // 73 "cannot chown …/.agent.toml.tmp-N" and an unedited configuration.
    @Test func aConfigurationOwnedByRootRunAsAnotherUserIsRefusedBeforeTheExchange() async throws {
        guard geteuid() == 0, let nobody = AtomicFile.Owner.user(named: "nobody") else { return }  // needs root to set it up
        let farm = try await Farm()
        try await farm.startIngest()
        let token = try await Self.token(farm, device: "site-1")
        let site = farm.dir.file("nobody-site")
        try FileManager.default.createDirectory(atPath: site, withIntermediateDirectories: false)
        chown(site, nobody.uid, nobody.gid)
        let config = site + "/agent.toml"
        try Self.siteConfig(device: "site-1").write(toFile: config, atomically: true, encoding: .utf8)
        chmod(config, 0o644)
        let result = try await runCommand(
            "/usr/bin/setpriv",
            ["--reuid=\(nobody.uid)", "--regid=\(nobody.gid)", "--clear-groups", "--", Farm.agentBinary, "enroll", farm.endpoint, token, "-c", config])
        #expect(result.status == 73, "\(result.stderr)")
        #expect(result.stderr.contains("belongs to root") && result.stderr.contains("sudo"), "\(result.stderr)")
        #expect(try await Self.tokenState(farm, token) == "unused", "nothing was sent")
        #expect(try String(contentsOfFile: config, encoding: .utf8) == Self.siteConfig(device: "site-1"))
        #expect(!FileManager.default.fileExists(atPath: site + "/device.key"))
        // As root the same token then enrolls.
        let enrolled = try await Self.enroll(farm, token, config: config)
        #expect(enrolled.status == 0, "\(enrolled.stderr)")
    }
}
