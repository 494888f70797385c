import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Testing

/// `farmgate-ingest`'s admin commands on a SQLite `[storage] path` that names no file. The real binary.
@Suite struct IngestMissingStoreTests {
    static func config(_ dir: Scratch, path: String) throws -> String {
        try dir.write("ingest.toml", "[server]\nhost = \"127.0.0.1\"\nport = \(try freePort())\n\n[storage]\npath = \"\(path)\"\n")
    }

    /// Before the fix (a tester, 2026-12-06) a mistyped path made the directories and a new empty store, and `farm list`
    /// said "No farms", `device list` and `export` "farm 'f1' does not exist": it looked like lost data. The commands
    /// that only read, change or remove records now exit 74 naming the path, and create nothing.
    @Test func commandsThatOnlyReadRefuseAStoreThatDoesNotExist() async throws {
        let dir = try Scratch(prefix: "fg-nostore")
        let config = try Self.config(dir, path: "typo/ingest.sqlite")
        let store = dir.file("typo/ingest.sqlite")
        for arguments in [
            ["farm", "list"], ["farm", "list", "--json"], ["device", "list", "--farm", "f1"], ["export", "--farm", "f1"],
            ["token", "list", "--farm", "f1"], ["enroll-token", "list"], ["device", "revoke", "--farm", "f1", "--device", "gw1"],
            ["device", "rotate-key", "--farm", "f1", "--device", "gw1"], ["retention", "run", "--dry-run"], ["retention", "run"],
            ["alert", "list", "--farm", "f1"], ["alert", "rule", "list", "--farm", "f1"], ["alert", "receiver", "list", "--farm", "f1"],
            ["alert", "outbox", "list"],
        ] {
            let result = try await runCommand(Farm.ingestBinary, arguments + ["--config", config])
            #expect(result.status == 74, "\(arguments): \(result.status) \(result.stdout) \(result.stderr)")
            #expect(
                result.stderr.contains("the store \(store) does not exist, nor does its directory \(dir.file("typo"))")
                    && result.stderr.contains("Check [storage] path in \(config)") && result.stderr.contains("`farmgate-ingest migrate` or `serve` creates the store"),
                "\(arguments): \(result.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("typo")), "\(arguments) made the directory")
        }
        // The directory exists, the file does not.
        try FileManager.default.createDirectory(atPath: dir.file("typo"), withIntermediateDirectories: false)
        let listed = try await runCommand(Farm.ingestBinary, ["farm", "list", "--config", config])
        #expect(listed.status == 74 && listed.stderr.contains("the store \(store) does not exist; nothing was created"), "\(listed.stderr)")
        #expect(!FileManager.default.fileExists(atPath: store))
        // A link to a file that is gone.
        try FileManager.default.createSymbolicLink(atPath: store, withDestinationPath: dir.file("gone.sqlite"))
        let linked = try await runCommand(Farm.ingestBinary, ["farm", "list", "--config", config])
        #expect(linked.status == 74 && linked.stderr.contains("symbolic link to a file that does not exist"), "\(linked.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.file("gone.sqlite")))
        // An empty file is no store either (a tester, 2026-12-07: `retention run` built one in it).
        try FileManager.default.removeItem(atPath: store)
        #expect(FileManager.default.createFile(atPath: store, contents: Data()))
        let empty = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        #expect(empty.status == 74 && empty.stderr.contains("an empty file is there, not a store"), "\(empty.stderr)")
        #expect((try FileManager.default.attributesOfItem(atPath: store)[.size] as? Int) == 0)
    }

    /// Before the fix (a tester, 2026-12-07) a user who may not write the store (serve's) got SQLite's "attempt to write a
    /// readonly database" and nothing else.
    @Test func aStoreTheUserCannotWriteSaysWhatToRun() async throws {
        guard geteuid() == 0, let nobody = getpwnam("nobody") else { return }  // needs root to act as another user
        let dir = try Scratch(prefix: "fg-rostore")
        let config = try Self.config(dir, path: "ingest.sqlite")
        let store = dir.file("ingest.sqlite")
        let made = try await runCommand(Farm.ingestBinary, ["farm", "create", "f1", "--config", config])
        #expect(made.status == 0, "\(made.stderr)")
        chmod(dir.path, 0o755)
        chmod(config, 0o644)
        let uid = nobody.pointee.pw_uid
        let refused = try await runCommand(
            "/usr/bin/setpriv", ["--reuid=\(uid)", "--regid=\(nobody.pointee.pw_gid)", "--clear-groups", "--", Farm.ingestBinary, "farm", "create", "f2", "--config", config])
        #expect(refused.status == 74, "\(refused.stderr)")
        #expect(
            refused.stderr.contains("cannot write the store \(store) as user nobody") && refused.stderr.contains("sudo -u farmgate-ingest")
                && refused.stderr.contains("sudo chown nobody: \(dir.path) \(store)*"), "\(refused.stderr)")
    }

    /// `serve` on a PostgreSQL that does not answer exits 74 (systemd starts it again). Its message had ended with what
    /// the running service does ("the ingest checks every second and serves again"), which a process that exits does not.
    @Test func serveOnAnUnreachableDatabaseExitsWithoutPromisingToRetry() async throws {
        let dir = try Scratch(prefix: "fg-nodb")
        let config = try dir.write(
            "ingest.toml", "[server]\nhost = \"127.0.0.1\"\nport = \(try freePort())\n\n[storage]\nurl = \"postgresql://farmgate@127.0.0.1:\(try freePort())/farmgate\"\n")
        let result = try await runCommand(Farm.ingestBinary, ["serve", "--config", config])
        #expect(result.status == 74, "\(result.stderr)")
        // The last line, the reason for the exit (the log before it is the service's, which did check).
        let last = result.stderr.split(separator: "\n").last.map(String.init) ?? ""
        #expect(last.hasPrefix("farmgate-ingest: the service stopped: cannot migrate the store"), "\(result.stderr)")
        #expect(last.contains("PostgreSQL is unreachable") && !last.contains("checks every second"), "\(last)")
    }

    /// A newcomer's order (README Quickstart, examples/demo.sh): farm create first, on no store yet, then device and
    /// token create; each command that creates records makes the store when it is missing, and so do migrate and the
    /// enroll-token and receiver ones. The read commands then work on it.
    @Test func commandsThatCreateRecordsMakeTheStoreOnAFreshInstall() async throws {
        let dir = try Scratch(prefix: "fg-nostore")
        for (index, first) in [
            ["farm", "create", "f1"], ["migrate"], ["device", "create", "--farm", "f1", "--device", "gw1"],
            ["token", "create", "--farm", "f1", "--role", "viewer"], ["enroll-token", "create", "--farm", "f1", "--device", "gw1"],
            ["alert", "receiver", "add", "--farm", "f1", "--name", "ops", "--webhook", "https://hooks.example/x"],
        ].enumerated() {
            let config = try Self.config(dir, path: "fresh\(index)/data/ingest.sqlite")
            let result = try await runCommand(Farm.ingestBinary, first + ["--config", config])
            // A fresh store has no farm f1: the commands after farm create say so (exit 1), but the store is made.
            #expect(result.status == (index < 2 ? 0 : 1), "\(first): \(result.stderr)")
            #expect(!result.stderr.contains("does not exist;"), "\(first): \(result.stderr)")
            #expect(FileManager.default.fileExists(atPath: dir.file("fresh\(index)/data/ingest.sqlite")), "\(first) did not make the store")
        }
        let config = try Self.config(dir, path: "demo/ingest.sqlite")
        for arguments in [
            ["farm", "create", "demo-farm"], ["device", "create", "--farm", "demo-farm", "--device", "gw1"],
            ["token", "create", "--farm", "demo-farm", "--role", "viewer"], ["farm", "list"], ["device", "list", "--farm", "demo-farm"],
            ["retention", "run", "--dry-run"],
        ] {
            let result = try await runCommand(Farm.ingestBinary, arguments + ["--config", config])
            #expect(result.status == 0, "\(arguments): \(result.stderr)")
        }
    }
}
