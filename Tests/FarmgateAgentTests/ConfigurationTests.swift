@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

@Suite("Agent configuration")
struct ConfigurationTests {
    static let minimal = """
        [device]
        id = "site-1"

        [[sensor]]
        id = "tank1.ph"
        driver = "simulated"
        quantity = "ph"
        """

    func parse(_ text: String) throws(ConfigurationError) -> AgentConfiguration {
        try AgentConfiguration.parse(ConfigDocument.parse(text, file: "/etc/farmgate/agent.toml"))
    }

    func error(_ text: String) -> ConfigurationError? {
        do {
            _ = try parse(text)
            return nil
        } catch {
            return error
        }
    }

    // A tester, 2026-12-07: a port pasted with its own quotes and a comment, or with a line break, passed config check.
    @Test("A serial port with a quote, a line break, a CR or spaces at an end is refused naming port, for EZO and Modbus alike")
    func portThatIsNoPath() throws {
        for driver in ["ezo", "modbus"] {
            let extra = driver == "modbus" ? "\nslave = 1\naddress = 0\n" : "\n"
            for port in [#"\"/dev/ttyA\"\ninterval = \"5s\""#, #"\"/dev/ttyC\" # note"#, #"/dev/ttyD\r"#, #" /dev/ttyE"#, #""#] {
                let text = """
                    [device]
                    id = "site-1"

                    [[sensor]]
                    id = "tank1.ph"
                    driver = "\(driver)"
                    quantity = "ph"
                    port = "\(port)"
                    """ + extra
                let refused = try #require(error(text), "\(driver) \(port)")
                #expect(refused.key?.hasSuffix("port") == true, "\(driver) \(port): \(refused)")
                #expect(!refused.description.contains("\r") && !refused.description.contains("\n"), "\(refused.description)")
            }
            let good = error(
                "[device]\nid = \"site-1\"\n\n[[sensor]]\nid = \"tank1.ph\"\ndriver = \"\(driver)\"\nquantity = \"ph\"\nport = \"/dev/serial/by-id/usb-FTDI_A#1-if00\"" + extra)
            #expect(good == nil, "\(String(describing: good))")
        }
    }

    @Test("Defaults are the documented ones")
    func defaults() throws {
        let configuration = try parse(Self.minimal)
        #expect(configuration.device.rawValue == "site-1")
        #expect(configuration.buffer == BufferConfiguration())
        #expect(configuration.upload == nil)
        #expect(configuration.controlSocket == "/run/farmgate/control.sock")
        #expect(configuration.sensors.count == 1)
        let sensor = try #require(configuration.sensors.first)
        #expect(sensor.interval == .seconds(10))
        #expect(sensor.descriptor.resolution == .hundredth)
        #expect(sensor.deadband == 0)
    }

    @Test("Relative paths resolve against the file's directory")
    func relativePaths() throws {
        let configuration = try parse(
            Self.minimal + """

                [buffer]
                path = "data/buffer.sqlite"
                [control]
                socket = "../run/control.sock"
                """)
        #expect(configuration.buffer.path == "/etc/farmgate/data/buffer.sqlite")
        #expect(configuration.controlSocket == "/etc/run/control.sock")
    }

    @Test("An unknown key names the line and suggests the right one")
    func unknownKey() throws {
        let text = Self.minimal.replacingOccurrences(of: "quantity = \"ph\"", with: "quantity = \"ph\"\nintervall = \"5s\"")
        let failure = try #require(error(text))
        #expect(failure.line == 8)
        #expect(failure.key == "sensor \"tank1.ph\": intervall")
        #expect(failure.message.contains("did you mean 'interval'"))
        #expect(failure.description.hasPrefix("/etc/farmgate/agent.toml:8: "))
    }

    @Test(
        "Bad values are refused with file, line, key and what is allowed",
        arguments: [
            ("interval = \"ten\"", "interval", "must be a duration"),
            ("interval = \"10ms\"", "interval", "must be between 100ms and 1d"),
            ("resolution = \"0\"", "resolution", "invalid resolution"),
            ("deadband = -1", "deadband", "must be between"),
            ("expected_min = 9\nexpected_max = 3", "expected_max", "must not be below expected_min"),
        ])
    func badValues(line: String, key: String, message: String) throws {
        let text = Self.minimal + "\n" + line
        let failure = try #require(error(text))
        #expect(failure.key?.hasSuffix(key) == true, "\(failure)")
        #expect(failure.message.contains(message), "\(failure)")
        #expect(failure.line != nil)
    }

    @Test("A file with CRLF line endings is located like one with LF: the same line for the same error")
    func crlfLinesAreCounted() throws {
        for line in ["interval = \"10ms\"", "bogus = 1", "deadband = -1"] {
            let lf = Self.minimal + "\n" + line + "\n"
            let crlf = lf.replacingOccurrences(of: "\n", with: "\r\n")
            let expected = try #require(error(lf))
            let failure = try #require(error(crlf))
            #expect(expected.line != nil)
            #expect(failure.line == expected.line && failure.key == expected.key, "\(line): CRLF \(failure), LF \(expected)")
        }
    }

    @Test(
        "Numbers too large for a duration (or NaN, infinite) are located errors naming the range, never a trap",
        arguments: [
            ("interval = 1e300", "1e+300 seconds"),
            ("interval = 1e20", "1e+20 seconds"),
            ("interval = -1e300", "-1e+300 seconds"),
            ("interval = nan", "nan seconds"),
            ("interval = inf", "inf seconds"),
            ("interval = 9223372036854775807", "9223372036854775807 seconds"),
            ("interval = -9223372036854775808", "-9223372036854775808 seconds"),
            ("interval = \"99999999999999999999d\"", "\"99999999999999999999d\""),
        ])
    func hugeDurations(line: String, got: String) throws {
        let failure = try #require(error(Self.minimal + "\n" + line))
        #expect(failure.file == "/etc/farmgate/agent.toml")
        #expect(failure.line == 8)
        #expect(failure.key == "sensor \"tank1.ph\": interval")
        #expect(failure.message == "must be a duration between 100ms and 1d (got \(got))", "\(failure)")
    }

    @Test("Durations at the edges of what a key can hold still parse; sizes too large are errors naming the range")
    func durationAndSizeEdges() throws {
        let table = try ConfigDocument.parse("a = 999999999999\nb = 999999999999.5\nc = \"11574074d\"\nd = 1e12\ne = \"9999999999GiB\"", file: "x.toml")
        #expect(try table.duration("a") == .seconds(999_999_999_999))
        #expect(try table.duration("b") == .milliseconds(999_999_999_999_500))
        #expect(try table.duration("c") == .seconds(11_574_074 * 86_400))
        #expect(throws: ConfigurationError(file: "x.toml", line: 4, key: "d", message: "must be a duration at most 1000000000000 seconds (got 1000000000000.0 seconds)")) {
            try table.duration("d")
        }
        #expect(throws: ConfigurationError(file: "x.toml", line: 5, key: "e", message: "must be a size between 1048576 and 1125899906842624 bytes (got \"9999999999GiB\")")) {
            try table.byteSize("e", in: (1 << 20)...(Int64(1) << 50))
        }
    }

    @Test("Unknown driver and quantity list what exists")
    func unknownDriverAndQuantity() throws {
        let driver = try #require(error(Self.minimal.replacingOccurrences(of: "\"simulated\"", with: "\"ezo-ph\"")))
        #expect(driver.message.contains("unknown driver \"ezo-ph\"; available: \(DriverRegistry.standard.names.joined(separator: ", "))"))
        #expect(driver.message.contains("simulated"))
        let quantity = try #require(error(Self.minimal.replacingOccurrences(of: "\"ph\"", with: "\"acidity\"")))
        #expect(quantity.message.contains("one of: ph, ec, temperature"))
        #expect(quantity.line == 7)
    }

    @Test("Duplicate sensor ids, a missing device and no sensors are refused")
    func structure() throws {
        let duplicate = try #require(error(Self.minimal + "\n" + Self.minimal.split(separator: "\n").dropFirst(2).joined(separator: "\n")))
        #expect(duplicate.message.contains("already used by sensor #1"))
        let noDevice = try #require(error("[[sensor]]\nid = \"a\"\ndriver = \"simulated\"\nquantity = \"ph\""))
        #expect(noDevice.message.contains("missing [device] section"))
        let noSensors = try #require(error("[device]\nid = \"x\""))
        #expect(noSensors.message.contains("no sensors configured"))
        let badDevice = try #require(error(Self.minimal.replacingOccurrences(of: "site-1", with: "site 1")))
        #expect(badDevice.key == "device.id")
        #expect(badDevice.message.contains("contains ' '"))
    }

    @Test("Invalid TOML reports the parser's line")
    func invalidTOML() throws {
        let failure = try #require(error("[device]\nid = \"x\"\n\n[[sensor]\nid = 3"))
        #expect(failure.line == 4)
        #expect(failure.message.hasPrefix("not valid TOML"))
    }

    @Test("Upload section: key or key_file, a real URL, a device key")
    func upload() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("fg-config-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try "fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n".write(to: dir.appendingPathComponent("device.key"), atomically: true, encoding: .utf8)
        let path = dir.appendingPathComponent("agent.toml").path
        let good = Self.minimal + "\n[upload]\nendpoint = \"https://ingest.example.net\"\nkey_file = \"device.key\"\nbatch_max_age = \"2s\""
        let configuration = try AgentConfiguration.parse(ConfigDocument.parse(good, file: path))
        #expect(configuration.upload?.deviceKey == "fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        #expect(configuration.upload?.batchMaxAge == .seconds(2))
        #expect(configuration.upload?.batchMaxReadings == 1000)
        #expect(configuration.upload?.backlogBatchMaxReadings == UploadConfiguration.defaultBacklogBatchMaxReadings)
        let upload = Self.minimal + "\n[upload]\nendpoint = \"https://ingest.example.net\"\nkey = \"fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\n"
        // Backlog batches: their own size, the default raised to a larger live batch, never below it.
        let sized = try AgentConfiguration.parse(ConfigDocument.parse(upload + "backlog_batch_readings = 20000", file: path))
        #expect(sized.upload?.backlogBatchMaxReadings == 20000)
        let largeLive = try AgentConfiguration.parse(ConfigDocument.parse(upload + "batch_max_readings = 8000", file: path))
        #expect(largeLive.upload?.backlogBatchMaxReadings == 8000)
        let smaller = try #require(error(upload + "batch_max_readings = 2000\nbacklog_batch_readings = 500"))
        #expect(smaller.key == "upload.backlog_batch_readings")
        #expect(smaller.message.contains("at least batch_max_readings (2000)"))
        let huge = try #require(error(upload + "backlog_batch_readings = 1000000"))
        #expect(huge.key == "upload.backlog_batch_readings")

        let ftp = try #require(error(Self.minimal + "\n[upload]\nendpoint = \"ftp://x\"\nkey = \"fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\""))
        #expect(ftp.key == "upload.endpoint")
        let both = try #require(error(Self.minimal + "\n[upload]\nendpoint = \"http://x\"\nkey = \"fgd_a_b\"\nkey_file = \"k\""))
        #expect(both.message.contains("either key or key_file"))
        let notAKey = try #require(error(Self.minimal + "\n[upload]\nendpoint = \"http://x\"\nkey = \"hunter2\""))
        #expect(notAKey.message.contains("not a device key"))
        // A key cut short in copying, or another kind of credential, is refused now, not by a 401 on every upload; the
        // message gives the form and never the key.
        let whole = "fgd_testkey2_" + String(repeating: "0123456789abcdef", count: 4)
        let secret = String(repeating: "0123456789abcdef", count: 4)
        for (text, says) in [
            (String(whole.dropLast()), "is not a whole device key"), (whole + "0", "is not a whole device key"),
            (whole.uppercased().replacingOccurrences(of: "FGD_", with: "fgd_"), "its key id (the 8 characters after fgd_) holds a character other than a-z and 2-7"),
            (String(whole.dropLast()) + "g", "its secret (the 64 characters after the second _) holds a character other than 0-9 and a-f"),
            ("fgd_testkey2-" + secret, "the character after its key id is not _"),
            (String(whole.dropLast()) + "é", "this one has 77"),
            ("fgd_short", "this one has 9"), ("fgr_" + whole.dropFirst(4), "is a fgr_ credential, not a device key"),
        ] {
            let refused = try #require(error(Self.minimal + "\n[upload]\nendpoint = \"https://x\"\nkey = \"\(text)\""), "\(text)")
            #expect(refused.key == "upload.key" && refused.message.contains(says), "\(text): \(refused.message)")
            #expect(!refused.description.contains(String(text.dropFirst(4))), "the key was shown: \(refused.description)")
        }
        // A key in the wrong place (unquoted, pasted as a path, an id or into the endpoint) is never shown either
        // (before the fix, a tester 2026-12-06: each message held the whole key, and so did the log and `status`).
        for misplaced in [
            "\n[upload]\nendpoint = \"https://x\"\nkey = \(whole)\n", "\n[upload]\nendpoint = \"https://x\"\nkey_file = \"\(whole)\"\n",
            "\n[upload]\nendpoint = \"https://x\"\nkey = \"\(whole)\"\nca_file = \"\(whole)\"\n",
            "\n[upload]\nendpoint = \"https://x/?key=\(whole)\"\nkey = \"\(whole)\"\n",
            // In the path (a tester, 2026-12-07: taken, and printed in full by config check, status and the log).
            "\n[upload]\nendpoint = \"https://x/\(whole)\"\nkey = \"\(whole)\"\n",
        ] {
            let refused = try #require(error(Self.minimal + misplaced), "\(misplaced)")
            #expect(!refused.description.contains(secret.prefix(12)), "the key was shown: \(refused.description)")
            #expect(refused.description.contains("fgd_testkey2…"), "\(refused.description)")
        }
        let asDevice = try #require(error(Self.minimal.replacingOccurrences(of: "id = \"", with: "id = \"\(whole)") ))
        #expect(!asDevice.description.contains(secret.prefix(12)), "\(asDevice.description)")
        // A key file with a byte order mark (Windows editors add one) holds the key all the same.
        try ("\u{FEFF}" + whole + "\r\n").write(to: dir.appendingPathComponent("bom.key"), atomically: true, encoding: .utf8)
        let bom = try AgentConfiguration.parse(ConfigDocument.parse(
            Self.minimal + "\n[upload]\nendpoint = \"https://x\"\nkey_file = \"\(dir.appendingPathComponent("bom.key").path)\"\n", file: path))
        #expect(bom.upload?.deviceKey == whole)
        let emptySocket = try #require(error(Self.minimal + "\n[control]\nsocket = \"\"\n"))
        #expect(emptySocket.key == "control.socket" && emptySocket.message.contains("must not be empty"), "\(emptySocket)")
        try "fgd_cut\n".write(to: dir.appendingPathComponent("cut.key"), atomically: true, encoding: .utf8)
        let cut = try #require(error(Self.minimal + "\n[upload]\nendpoint = \"https://x\"\nkey_file = \"\(dir.appendingPathComponent("cut.key").path)\""))
        #expect(cut.key == "upload.key_file" && cut.message.contains("cut.key is not a whole device key"), "\(cut.message)")
    }
}

extension ConfigurationTests {
    @Test("An empty [buffer] path is refused where it is written, not when the agent starts")
    func emptyBufferPath() throws {
        for value in ["\"\"", "\"  \""] {
            let failure = try #require(error(Self.minimal + "\n[buffer]\npath = \(value)"))
            #expect(failure.key == "buffer.path" && failure.line == 9, "\(failure)")
            #expect(failure.message.contains("must not be empty"), "\(failure)")
        }
    }

    // Before the fix (a tester, 2026-12-05) a socket under a file passed `config check`; the agent then exited 1 at
    // start and systemd restarted it until its start limit.
    @Test("A control socket or buffer whose directory could never be made (a file in the way) is refused, located")
    func aFileInTheWayOfTheSocketOrBufferDirectory() async throws {
        let dir = try Scratch(prefix: "fg-in-the-way")
        let file = try dir.write("plain", "a file")
        for (section, key) in [("control", "socket"), ("buffer", "path")] {
            for path in [file + "/x.sock", file + "/deeper/still/x.sock"] {
                let failure = try #require(error(Self.minimal + "\n[\(section)]\n\(key) = \"\(path)\"\n"), "\(path)")
                #expect(failure.key == "\(section).\(key)" && failure.message.contains("\(file) is not a directory"), "\(failure)")
            }
            // A directory that does not exist yet is made by the agent: fine.
            #expect(error(Self.minimal + "\n[\(section)]\n\(key) = \"\(dir.file("new/sub/x.sock"))\"\n") == nil)
        }
        // The buffer itself as a directory or a device (before the fix, a tester 2026-12-06: the check passed, and the
        // agent said to chown the path, or as root made /dev/null-journal).
        for (path, says) in [(dir.path, "is a directory"), ("/dev/null", "not a regular file")] {
            let failure = try #require(error(Self.minimal + "\n[buffer]\npath = \"\(path)\"\n"), "\(path)")
            #expect(failure.key == "buffer.path" && failure.message.contains(says), "\(failure)")
        }
        // Another program's file is refused, and left as it is (a tester, 2026-12-07: a text file was moved aside to
        // notes.txt.corrupt-<time> at start, the ingest's store was converted to 1 KiB pages). A buffer of the agent's
        // own, and an empty file, are fine.
        let notes = try dir.write("notes.txt", "hello notes\n")
        let other = dir.file("other.sqlite")
        try SQLiteConnection(path: other).execute("CREATE TABLE farms(id TEXT); INSERT INTO farms VALUES ('f1')")
        for (path, says) in [(notes, "is not a SQLite database"), (other, "is a SQLite database of another program (its tables: farms)")] {
            let failure = try #require(error(Self.minimal + "\n[buffer]\npath = \"\(path)\"\n"), "\(path)")
            #expect(failure.key == "buffer.path" && failure.message.contains(says) && failure.message.contains("not a Farmgate buffer"), "\(failure)")
        }
        #expect(try String(contentsOfFile: notes, encoding: .utf8) == "hello notes\n")
        #expect(try SQLiteConnection(path: other, mode: .readOnly).query("PRAGMA journal_mode").first?.first?.string == "delete")
        let empty = try dir.write("empty.sqlite", "")
        #expect(error(Self.minimal + "\n[buffer]\npath = \"\(empty)\"\n") == nil)
        let own = dir.file("own/buffer.sqlite")
        let buffer = try ReadingBuffer(configuration: BufferConfiguration(path: own), logger: Logger(label: "t"))
        try await buffer.close()
        #expect(error(Self.minimal + "\n[buffer]\npath = \"\(own)\"\n") == nil)
        // A path ending in / or with a name longer than a file name may be.
        let slash = try #require(error(Self.minimal + "\n[buffer]\npath = \"buf/\"\n"))
        #expect(slash.key == "buffer.path" && slash.message.contains("ends in /"), "\(slash)")
        let long = try #require(error(Self.minimal + "\n[buffer]\npath = \"\(String(repeating: "b", count: 300))\"\n"))
        #expect(long.key == "buffer.path" && long.message.contains("300 bytes long"), "\(long)")
        // A socket path longer than Linux's sun_path takes is refused at the key, with the bound --socket says (a tester,
        // 2026-12-07: located at the section, and 103 bytes).
        let socket107 = "/tmp/" + String(repeating: "s", count: 102)
        #expect(error(Self.minimal + "\n[control]\nsocket = \"\(socket107)\"\n") == nil)
        let longSocket = try #require(error(Self.minimal + "\n[control]\nsocket = \"\(socket107)x\"\n"))
        #expect(longSocket.key == "control.socket" && longSocket.message.contains("108 bytes, longer than a Unix socket path may be (107)"), "\(longSocket)")
        // The control socket on the buffer's .reserve file.
        let reserve = try #require(error(Self.minimal + "\n[buffer]\npath = \"\(dir.file("b.sqlite"))\"\n[control]\nsocket = \"\(dir.file("b.sqlite.reserve"))\"\n"))
        #expect(reserve.message.contains(".reserve file"), "\(reserve)")
    }

    @Test(
        "A control socket on one of the agent's own files is refused, located at [control] socket",
        arguments: [
            ("socket = \"/var/lib/farmgate/buffer.sqlite\"", "the buffer ([buffer] path)"),
            ("socket = \"/var/lib/farmgate/buffer.sqlite-wal\"", "the buffer's -wal file"),
            ("socket = \"/var/lib/farmgate//buffer.sqlite-shm\"", "the buffer's -shm file"),
            ("socket = \"/var/lib/farmgate/./buffer.sqlite.seq\"", "the buffer's .seq sidecar"),
            ("socket = \"/var/lib/node_exporter/farmgate.prom\"", "the metrics file ([metrics] textfile)"),
            ("socket = \"agent.toml\"", "the configuration file itself"),
            ("socket = \"../farmgate/agent.toml\"", "the configuration file itself"),
        ])
    func controlSocketOnOwnFiles(line: String, what: String) throws {
        let text = Self.minimal + "\n[metrics]\ntextfile = \"/var/lib/node_exporter/farmgate.prom\"\n[control]\n" + line
        let failure = try #require(error(text))
        #expect(failure.key == "control.socket" && failure.line == 11, "\(failure)")
        #expect(failure.message.contains("is \(what)"), "\(failure)")
        #expect(failure.message.contains("Give each its own path"), "\(failure)")
        // Beside them, it is fine.
        #expect(throws: Never.self) { try parse(Self.minimal + "\n[control]\nsocket = \"/var/lib/farmgate/control.sock\"") }
    }

    @Test("The default control socket named as the buffer is refused at [buffer] path")
    func defaultSocketAsBuffer() throws {
        let failure = try #require(error(Self.minimal + "\n[buffer]\npath = \"/run/farmgate/control.sock\""))
        #expect(failure.key == "buffer.path" && failure.line == 9, "\(failure)")
        #expect(failure.message.contains("is the buffer ([buffer] path)"), "\(failure)")
    }

    @Test("The metrics file, the key file and the buffer cannot be one file: the agent would overwrite readings or the key")
    func ownFilesApart() throws {
        let scratch = try Scratch(prefix: "fg-own-files")
        let key = "fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        func load(_ body: String) -> ConfigurationError? {
            do {
                _ = try AgentConfiguration.load(path: try scratch.write("agent.toml", Self.minimal + "\n[control]\nsocket = \"c.sock\"\n" + body))
                return nil
            } catch {
                return error as? ConfigurationError
            }
        }
        let upload = { (file: String) in "[upload]\nendpoint = \"http://127.0.0.1:9\"\nkey_file = \"\(file)\"\n" }
        for file in ["shared.prom", "buffer.sqlite", "buffer.sqlite-wal", "data/../buffer.sqlite.seq"] {
            _ = try scratch.write(file.replacingOccurrences(of: "data/../", with: ""), key)
        }
        // The tester's case: the metrics text replaced a buffer of unsent readings at the next write.
        var failure = try #require(load("[buffer]\npath = \"shared.prom\"\n[metrics]\ntextfile = \"shared.prom\"\n"))
        #expect(failure.key == "metrics.textfile", "\(failure)")
        #expect(failure.message.contains("the metrics file ([metrics] textfile) is the buffer ([buffer] path)"), "\(failure)")
        failure = try #require(load(upload("shared.prom") + "[metrics]\ntextfile = \"./shared.prom\"\n"))
        #expect(failure.key == "metrics.textfile" && failure.message.contains("is the device key file"), "\(failure)")
        for file in ["buffer.sqlite", "buffer.sqlite-wal", "data/../buffer.sqlite.seq"] {
            failure = try #require(load("[buffer]\npath = \"buffer.sqlite\"\n" + upload(file)))
            #expect(failure.key == "upload.key_file" && failure.message.contains("the device key file ([upload] key_file) is the buffer"), "\(failure)")
        }
        #expect(load("[buffer]\npath = \"buffer.sqlite\"\n" + upload("shared.prom") + "[metrics]\ntextfile = \"farmgate.prom\"\n") == nil)
    }

    @Test("A control socket path where a file that is not a socket exists is refused: the agent could not start")
    func controlSocketOnAFile() throws {
        let scratch = try Scratch(prefix: "fg-socket-file")
        _ = try scratch.write("notasocket", "x")
        let config = try scratch.write("agent.toml", Self.minimal + "\n[control]\nsocket = \"notasocket\"\n")
        #expect {
            try AgentConfiguration.load(path: config)
        } throws: { error in
            guard let error = error as? ConfigurationError else { return false }
            return error.key == "control.socket" && error.message.contains("exists and is not a socket")
        }
        _ = try scratch.write("agent.toml", Self.minimal + "\n[control]\nsocket = \"free.sock\"\n")
        #expect(throws: Never.self) { try AgentConfiguration.load(path: config) }
    }

    @Test(
        "An endpoint libcurl would refuse at every upload is refused in the configuration",
        arguments: [
            ("http://127.0.0.1:99999", "port"), ("http://127.0.0.1:0", "port"), ("http://host:80x", "port"), ("http://exa mple.com", "host"),
            ("http://:8080", "no host"), ("http://[zz]:80", "IPv6"), ("http://[::1", "closing ]"), ("ftp://host", "http:// or https://"),
            ("http://host/?a=1", "query"), ("http://host:+80", "port"), ("http://[fe80::1%25]:80", "IPv6"),
            ("http://user:s3cret@host", "user name or password"), ("https://u@ingest.example.net", "user name or password"),
            ("htps://user:s3cret@host", "http:// or https://"), ("http://user:s3cret@host/#x", "user name or password"), (" http://user:s3cret@host", "http:// or https://"),
            // A tester, 2026-12-07: libcurl refused these only when connecting, at every upload.
            ("http://256.1.1.1", "not an IPv4 address"), ("http://10.0.0:8080", "not an IPv4 address"), ("http://-host", "starts or ends with -"),
            ("http://ingest-.example.net", "starts or ends with -"), ("http://ingest..example.net", "empty label"), ("https://.example.net", "empty label"),
            ("http://\(String(repeating: "a", count: 64)).example", "longer than 63"),
        ])
    func badEndpoints(endpoint: String, problem: String) throws {
        let failure = try #require(error(Self.minimal + "\n[upload]\nendpoint = \"\(endpoint)\"\nkey = \"fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\""))
        #expect(failure.key == "upload.endpoint", "\(failure)")
        #expect(failure.message.contains(problem), "\(failure)")
        #expect(!failure.message.contains("s3cret"), "a password was echoed: \(failure)")
    }

    @Test("Endpoints with a port, an IPv6 address or an internationalised name are fine")
    func goodEndpoints() throws {
        for endpoint in ["http://[::1]:8080", "https://ingest.example.net", "HTTPS://Ingest.Example.NET:443/base", "http://host_1:65535",
            "https://bücher.example", "http://host:/", "http://[fe80::1%25eth0]:8080/", "http://192.0.2.255:8080", "https://ingest.example.net./",
            "http://3com.example"] {
            #expect(throws: Never.self, "\(endpoint)") {
                try parse(Self.minimal + "\n[upload]\nendpoint = \"\(endpoint)\"\nkey = \"fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"")
            }
        }
    }

    @Test("A metrics file in a directory that does not exist is a warning of config check, not an error; in one that exists, none")
    func metricsDirectoryMissing() throws {
        let scratch = try Scratch(prefix: "fg-metrics-dir")
        let missing = try parse(Self.minimal + "\n[metrics]\ntextfile = \"\(scratch.file("nope/farmgate.prom"))\"")
        #expect(missing.warnings.map(\.key) == ["metrics.textfile"], "\(missing.warnings)")
        #expect(missing.warnings.first?.message.contains("does not exist: the agent writes no metrics until it does") == true, "\(missing.warnings)")
        let present = try parse(Self.minimal + "\n[metrics]\ntextfile = \"\(scratch.file("farmgate.prom"))\"")
        #expect(present.warnings.isEmpty, "\(present.warnings)")
    }

    @Test("A backoff_max shorter than backoff_initial is refused, naming both")
    func backoffOrder() throws {
        let upload = "\n[upload]\nendpoint = \"https://ingest.example.net\"\nkey = \"fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\n"
        let failure = try #require(error(Self.minimal + upload + "backoff_initial = \"10m\"\nbackoff_max = \"1m\""))
        #expect(failure.key == "upload.backoff_max" && failure.message.contains("shorter than backoff_initial (10m)"), "\(failure)")
        let initialOnly = try #require(error(Self.minimal + upload + "backoff_initial = \"10m\""), "10m against the default 5m")
        #expect(initialOnly.key == "upload.backoff_initial", "\(initialOnly)")
        #expect(throws: Never.self) { try parse(Self.minimal + upload + "backoff_initial = \"5m\"\nbackoff_max = \"5m\"") }
    }

    @Test("A ca_file that holds no PEM certificate (a key, the configuration itself) is refused where it is named")
    func caFileWithoutCertificate() async throws {
        let scratch = try Scratch(prefix: "fg-ca")
        let certificates = try await TestCertificates.make(in: scratch.path)
        for (file, fine) in [(certificates.keyFile, false), ("/dev/null", false), (scratch.path, false), (certificates.caFile, true)] {
            let text = Self.minimal + "\n[upload]\nendpoint = \"https://ingest.example.net\"\nkey = \"fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"\nca_file = \"\(file)\""
            if fine {
                #expect(throws: Never.self) { try parse(text) }
            } else {
                let failure = try #require(error(text))
                #expect(failure.key == "upload.ca_file" && (failure.message.contains("holds no PEM certificate") || failure.message.contains("cannot read")), "\(failure)")
            }
        }
    }

    @Test("A negative or signed resolution is refused, not read as its magnitude")
    func signedResolution() throws {
        for value in ["-0.01", "\"-0.01\"", "\"+0.01\"", "\"-1/16\""] {
            let failure = try #require(error(Self.minimal + "\nresolution = \(value)"), "\(value)")
            #expect(failure.key?.hasSuffix("resolution") == true, "\(failure)")
        }
        #expect(try parse(Self.minimal + "\nresolution = 0.05").sensors.first?.descriptor.resolution.description == "1/20")
    }

    /// `count` simulated sensors, `[[sensor]]` tables of four lines after the three of the `[device]` section.
    static func sensors(_ count: Int) -> String {
        "[device]\nid = \"site-1\"\n\n"
            + (1...count).map { "[[sensor]]\nid = \"s\($0)\"\ndriver = \"simulated\"\nquantity = \"ph\"\n" }.joined()
    }

    @Test("More sensors than one sensor table holds are refused, naming the limit, at the first one too many")
    func tooManySensors() throws {
        #expect(SensorTable.maxSensors == 4_096)
        let most = try parse(Self.sensors(SensorTable.maxSensors))
        #expect(most.sensors.count == SensorTable.maxSensors)
        let failure = try #require(error(Self.sensors(SensorTable.maxSensors + 1)))
        #expect(failure.key == "sensor #4097", "\(failure)")
        #expect(failure.line == 4 + 4 * SensorTable.maxSensors, "\(failure)")
        #expect(failure.message.contains("4097 sensors configured, more than the 4096 one device can send"), "\(failure)")
    }

    @Test(
        "A resolution coarser than a tenth of the quantity's physical range is refused",
        arguments: [
            ("ph", "\"1000000\""), ("ph", "\"2\""), ("ph", "100"), ("temperature", "\"25\""), ("ec", "\"1000000\""),
            ("state", "\"2\""), ("specific_gravity", "\"0.1\""), ("humidity", "\"20\""),
        ])
    func coarseResolution(quantity: String, resolution: String) throws {
        let text = Self.minimal.replacingOccurrences(of: "\"ph\"", with: "\"\(quantity)\"") + "\nresolution = \(resolution)"
        let failure = try #require(error(text))
        #expect(failure.key == "sensor \"tank1.ph\": resolution" && failure.line == 8, "\(failure)")
        #expect(failure.message.contains("coarser than a tenth of the whole range of \(quantity)"), "\(failure)")
        #expect(failure.message.contains("give a step of at most"), "\(failure)")
    }

    @Test("Coarse resolutions within a tenth of the range, and every quantity's default, are accepted")
    func acceptedResolutions() throws {
        for (quantity, resolution) in [("ph", "\"1\""), ("ph", "\"1.8\""), ("state", "\"1\""), ("ec", "\"1000\""), ("temperature", "\"1/16\"")] {
            let text = Self.minimal.replacingOccurrences(of: "\"ph\"", with: "\"\(quantity)\"") + "\nresolution = \(resolution)"
            #expect(throws: Never.self, "\(quantity) \(resolution)") { try parse(text) }
        }
        for quantity in Quantity.allCases {
            #expect(quantity.coarseResolutionProblem(quantity.defaultResolution) == nil, "\(quantity)")
        }
    }

    @Test(
        "An endpoint with a query or a fragment is refused, saying what to remove",
        arguments: [
            ("https://h/?x=1", "without a query: remove \"?x=1\""), ("https://h?x=1", "without a query: remove \"?x=1\""),
            ("https://h/ingest?", "without a query: remove \"?\""), ("https://h/#top", "without a fragment: remove \"#top\""),
        ])
    func endpointWithQuery(endpoint: String, phrase: String) throws {
        let failure = try #require(error(Self.minimal + "\n[upload]\nendpoint = \"\(endpoint)\"\nkey = \"fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\""))
        #expect(failure.key == "upload.endpoint" && failure.line == 9, "\(failure)")
        #expect(failure.message.contains(phrase), "\(failure)")
        #expect(throws: Never.self) {
            try parse(Self.minimal + "\n[upload]\nendpoint = \"https://h/ingest/\"\nkey = \"fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"")
        }
    }
}

@Suite("Deadband")
struct DeadbandTests {
    @Test("Off by default: every value is stored")
    func off() {
        var gate = Deadband(deadband: 0, heartbeat: .seconds(60))
        for i in 0..<10 {
            #expect(gate.admit(6.0, at: Timestamp(microseconds: Int64(i) * 1_000_000)) == .store)
        }
    }

    @Test("Suppresses small changes until the heartbeat, stores real changes at once")
    func on() {
        var gate = Deadband(deadband: 0.05, heartbeat: .seconds(60))
        let s = { (seconds: Int64) in Timestamp(microseconds: seconds * 1_000_000) }
        #expect(gate.admit(6.00, at: s(0)) == .store)
        #expect(gate.admit(6.02, at: s(10)) == .suppress)
        #expect(gate.admit(5.98, at: s(20)) == .suppress)
        #expect(gate.admit(6.06, at: s(30)) == .store)
        #expect(gate.admit(6.07, at: s(40)) == .suppress)
        #expect(gate.admit(6.07, at: s(90)) == .heartbeat)
        #expect(gate.admit(6.07, at: s(100)) == .suppress)
        // A clock that jumps backwards (NTP sync after boot) does not silence the sensor.
        #expect(gate.admit(6.07, at: s(5)) == .heartbeat)
    }
}
