import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Logging
import Testing

@testable import FarmgateIngest

@Suite("[storage] PostgreSQL keys")
struct StorageConfigurationTests {
    @Test("a URL selects PostgreSQL with the documented defaults; the pool keys override them")
    func urlAndPoolKeys() async throws {
        let plain = try IngestConfiguration.parse(
            "[storage]\nurl = \"postgresql://farm%40gate:s%3Acret@db.example:6432/farmgate?sslmode=require\"\n", file: "ingest.toml", baseDirectory: "/etc")
        let postgres = try #require(plain.storage.postgres)
        #expect(postgres.endpoint == .tcp(host: "db.example", port: 6432))
        #expect(postgres.username == "farm@gate" && postgres.password == "s:cret" && postgres.database == "farmgate")
        #expect(postgres.tls == .require)
        #expect(postgres.poolSize == 10 && postgres.connectTimeout == .seconds(10) && postgres.queryTimeout == .seconds(30))
        #expect(!plain.storage.displayName.contains("s:cret") && !plain.storage.displayName.contains("s%3Acret"))

        let directory = NSTemporaryDirectory() + "farmgate-storage-config-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        _ = try await TestCertificates.make(in: directory)
        let tuned = try IngestConfiguration.parse(
            """
            [storage]
            url = "postgresql://farmgate@db/farmgate"
            pool_size = 32
            connect_timeout = "3s"
            query_timeout = "0s"
            tls = "verify-full"
            ca_file = "ca.pem"
            """, file: "ingest.toml", baseDirectory: directory)
        let settings = try #require(tuned.storage.postgres)
        #expect(settings.poolSize == 32 && settings.connectTimeout == .seconds(3) && settings.queryTimeout == .zero)
        #expect(settings.tls == .verifyFull && settings.caFile == directory + "/ca.pem")
        #expect(settings.endpoint == .tcp(host: "db", port: 5432))
    }

    @Test("a socket URL names the socket file; FARMGATE_INGEST_DATABASE_URL wins over the file")
    func socketAndEnvironment() throws {
        let configuration = try IngestConfiguration.parse(
            "[storage]\nurl = \"postgresql://a@db/x\"\n", file: "ingest.toml", baseDirectory: "/etc",
            environment: ["FARMGATE_INGEST_DATABASE_URL": "postgresql://farmgate@/farmgate?host=/run/postgresql"])
        let postgres = try #require(configuration.storage.postgres)
        #expect(postgres.endpoint == .unixSocket(path: "/run/postgresql/.s.PGSQL.5432"))
        #expect(postgres.tls == .disable)
        #expect(try IngestConfiguration.parse("", file: "f", baseDirectory: "/").storage.postgres == nil)
    }

    @Test(
        "bad storage values are located errors that say what to write",
        arguments: [
            ("[storage]\nurl = \"mysql://x@y/z\"\n", "ingest.toml:2: storage.url: must start with postgresql://"),
            ("[storage]\nurl = \"postgresql://db.example/farmgate\"\n", "ingest.toml:2: storage.url: names no user"),
            ("[storage]\nurl = \"postgresql://u@/farmgate\"\n", "ingest.toml:2: storage.url: names no host; for a Unix socket add ?host="),
            ("[storage]\nurl = \"postgresql://u@h/d?sslmode=verify-ca\"\n", "ingest.toml:2: storage.url: sslmode 'verify-ca' is not supported"),
            ("[storage]\nurl = \"postgresql://u@h/d?options=x\"\n", "ingest.toml:2: storage.url: has the parameter 'options'"),
            ("[storage]\npool_size = 4\n", "ingest.toml:2: storage.pool_size: applies to PostgreSQL only"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\npool_size = 0\n", "ingest.toml:3: storage.pool_size:"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\nquery_timeout = \"10ms\"\n", "ingest.toml:3: storage.query_timeout: must be at least 100ms"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\ntls = \"maybe\"\n", "ingest.toml:3: storage.tls:"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\nca_file = \"/nonexistent/ca.pem\"\n", "ingest.toml:3: storage.ca_file: a CA file is only used with tls = \"verify-full\""),
            ("[storage]\nurl = \"postgresql://u@h/d\"\ntls = \"verify-full\"\nca_file = \"/nonexistent/ca.pem\"\n", "ingest.toml:4: storage.ca_file: cannot read the CA file /nonexistent/ca.pem"),
            ("[storage]\nurl = \"postgresql://u@/d?host=/run/pg\"\ntls = \"require\"\n", "ingest.toml:3: storage.tls: the URL names a Unix socket"),
            // Foundation keeps a port's low 16 bits: 98751 connected to 33215.
            ("[storage]\nurl = \"postgresql://u@h:98751/d\"\n", "ingest.toml:2: storage.url: port '98751' is not a port number"),
            ("[storage]\nurl = \"postgresql://u:p@[::1]:70000/d\"\n", "ingest.toml:2: storage.url: port '70000' is not a port number"),
            ("[storage]\nurl = \"postgresql://u@h:5432/d\"\nlisten_url = \"postgresql://u@h:65536/d\"\n", "ingest.toml:3: storage.listen_url: port '65536'"),
            // The user wrote sslmode and sslrootcert, not tls and ca_file: the error says it in those terms.
            ("[storage]\nurl = \"postgresql://u@h/d?sslmode=require&sslrootcert=/nonexistent/ca.pem\"\n",
             "ingest.toml:2: storage.url: sslrootcert is only used with sslmode=verify-full (the URL's sslmode is require); set sslmode=verify-full or remove sslrootcert"),
        ])
    func badValues(text: String, expected: String) {
        #expect {
            _ = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/etc")
        } throws: { error in
            (error as? ConfigurationError)?.description.hasPrefix(expected) == true
        }
    }

    @Test("a port above 65535 in FARMGATE_INGEST_DATABASE_URL or FARMGATE_INGEST_LISTEN_URL is refused, naming the variable")
    func portOutOfRangeInTheEnvironment() {
        for (variable, environment) in [
            ("FARMGATE_INGEST_DATABASE_URL", ["FARMGATE_INGEST_DATABASE_URL": "postgresql://u@h:98751/d"]),
            ("FARMGATE_INGEST_LISTEN_URL", ["FARMGATE_INGEST_DATABASE_URL": "postgresql://u@h/d", "FARMGATE_INGEST_LISTEN_URL": "postgresql://u@h:98751/d"]),
        ] {
            #expect {
                _ = try IngestConfiguration.parse("", file: "ingest.toml", baseDirectory: "/etc", environment: environment)
            } throws: { error in
                (error as? ConfigurationError)?.description.hasPrefix("environment: \(variable): port '98751' is not a port number") == true
            }
        }
        let fine = try? IngestConfiguration.parse("[storage]\nurl = \"postgresql://u@h:65535/d\"\n", file: "ingest.toml", baseDirectory: "/etc")
        #expect(fine?.storage.postgres?.endpoint == .tcp(host: "h", port: 65_535))
    }

    @Test("the CA file of FARMGATE_INGEST_DATABASE_URL is reported against the variable, not the file's url it overrides")
    func caFileOfTheEnvironmentURL() {
        #expect {
            _ = try IngestConfiguration.parse(
                "[storage]\nurl = \"postgresql://u@h/d\"\n", file: "ingest.toml", baseDirectory: "/etc",
                environment: ["FARMGATE_INGEST_DATABASE_URL": "postgresql://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"])
        } throws: { error in
            (error as? ConfigurationError)?.description.hasPrefix("environment: FARMGATE_INGEST_DATABASE_URL: cannot read the CA file /nonexistent/ca.pem") == true
        }
        // Without a [storage] table the CA file is checked all the same (it was not checked at all).
        #expect {
            _ = try IngestConfiguration.parse(
                "", file: "ingest.toml", baseDirectory: "/etc",
                environment: ["FARMGATE_INGEST_DATABASE_URL": "postgresql://u@h/d?sslmode=require&sslrootcert=/nonexistent/ca.pem"])
        } throws: { error in
            (error as? ConfigurationError)?.description.hasPrefix("environment: FARMGATE_INGEST_DATABASE_URL: sslrootcert is only used with sslmode=verify-full") == true
        }
    }

    @Test("a ca_file that holds no PEM certificate is a located configuration error")
    func caFileThatIsNotPEM() throws {
        let directory = NSTemporaryDirectory() + "farmgate-storage-config-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try Data("not a certificate\n".utf8).write(to: URL(fileURLWithPath: directory + "/ca.pem"))
        #expect {
            _ = try IngestConfiguration.parse(
                "[storage]\nurl = \"postgresql://u@h/d\"\ntls = \"verify-full\"\nca_file = \"ca.pem\"\n", file: "ingest.toml", baseDirectory: directory)
        } throws: { error in
            (error as? ConfigurationError)?.description.hasPrefix("ingest.toml:4: storage.ca_file: the CA file \(directory)/ca.pem holds no PEM certificate") == true
        }
        #expect {
            _ = try IngestConfiguration.parse(
                "[storage]\nurl = \"postgresql://u@h/d?sslmode=verify-full&sslrootcert=\(directory)/ca.pem\"\n", file: "ingest.toml", baseDirectory: directory)
        } throws: { error in
            (error as? ConfigurationError)?.description.hasPrefix("ingest.toml:2: storage.url: the CA file \(directory)/ca.pem holds no PEM certificate") == true
        }
    }

    @Test("a bad FARMGATE_INGEST_DATABASE_URL names the variable")
    func badEnvironment() {
        #expect {
            _ = try IngestConfiguration.parse("", file: "ingest.toml", baseDirectory: "/etc", environment: ["FARMGATE_INGEST_DATABASE_URL": "postgres:/x"])
        } throws: { error in
            (error as? ConfigurationError)?.description.hasPrefix("environment: FARMGATE_INGEST_DATABASE_URL: must start with postgresql://") == true
        }
    }

    // A tester, 2026-12-07: `farm list` on the agent's buffer migrated it (a schema_migrations table was left in it), and
    // /dev/null as the store made /dev/null-journal.
    @Test("a SQLite path naming another program's file is a configuration error, and the file is left as it is")
    func storagePathOnAForeignFile() throws {
        let directory = try TemporaryDirectory()
        let notes = directory.path + "/notes.txt"
        #expect(FileManager.default.createFile(atPath: notes, contents: Data("notes\n".utf8)))
        let buffer = directory.path + "/buffer.sqlite"
        try SQLiteConnection(path: buffer).execute("CREATE TABLE schema_version(version INTEGER); CREATE TABLE readings(sequence INTEGER)")
        for (path, says) in [
            (notes, "is not a SQLite database"), (buffer, "is a SQLite database of another program (its tables: readings, schema_version)"),
            ("/dev/null", "is not a regular file (a device, a socket or a pipe)"), (directory.path, "is a directory"),
        ] {
            #expect {
                _ = try IngestConfiguration.parse("[storage]\npath = \"\(path)\"\n", file: "ingest.toml", baseDirectory: directory.path)
            } throws: { error in
                let text = (error as? ConfigurationError)?.description ?? ""
                return text.hasPrefix("ingest.toml:2: storage.path: \(path) \(says): not a Farmgate ingest store")
            }
        }
        #expect(try String(contentsOfFile: notes, encoding: .utf8) == "notes\n")
        #expect(try SQLiteConnection(path: buffer, mode: .readOnly).queryInt("SELECT count(*) FROM sqlite_master") == 2)
        // The ingest's own store, and an empty file, are fine.
        let store = directory.path + "/ingest.sqlite"
        try SQLiteConnection(path: store).execute("CREATE TABLE schema_migrations(version INTEGER)")
        #expect(FileManager.default.createFile(atPath: directory.path + "/empty.sqlite", contents: Data()))
        for path in [store, directory.path + "/empty.sqlite", directory.path + "/new.sqlite"] {
            #expect(try IngestConfiguration.parse("[storage]\npath = \"\(path)\"\n", file: "ingest.toml", baseDirectory: directory.path).storage.path == path)
        }
    }

    @Test("a SQLite path under a regular file is a configuration error naming the file; with PostgreSQL the path is not used")
    func storagePathUnderAFile() throws {
        let directory = try TemporaryDirectory()
        let blocker = directory.path + "/notadir"
        #expect(FileManager.default.createFile(atPath: blocker, contents: Data("x".utf8)))
        let text = "[storage]\npath = \"notadir/data/ingest.sqlite\"\n"
        #expect {
            _ = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: directory.path)
        } throws: { error in
            (error as? ConfigurationError)?.description
                == "ingest.toml:2: storage.path: \(blocker) is not a directory, so the SQLite store \(blocker)/data/ingest.sqlite cannot be made there: give a path in a directory"
        }
        let postgres = try IngestConfiguration.parse(text + "url = \"postgresql://u@h/d\"\n", file: "ingest.toml", baseDirectory: directory.path)
        #expect(postgres.storage.postgres != nil)
        // The store itself says which directory it could not make, in its own words, not Foundation's.
        #expect {
            _ = try SQLiteIngestStore(path: "/proc/self/nosuch/ingest.sqlite", logger: Logger(label: "t"))
        } throws: { error in
            "\(error)" == "cannot create the directory /proc/self/nosuch: No such file or directory"
        }
    }
}
