import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Testing

@testable import FarmgateIngest

/// `[storage] listen_url` (and `FARMGATE_INGEST_LISTEN_URL`) and the group commit's keys: defaults, overrides, and
/// located errors.
@Suite("[storage] listen_url and group-commit keys")
struct PostgresWritesConfigurationTests {
    static func parse(_ text: String, environment: [String: String] = [:]) throws -> PostgresSettings {
        try #require(try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/etc", environment: environment).storage.postgres)
    }

    @Test("without the keys: LISTEN uses url, half the pool writes (1 to 8), groups of 64 batches or 64,000 readings")
    func defaults() throws {
        let settings = try Self.parse("[storage]\nurl = \"postgresql://farmgate@db/farmgate\"\n")
        #expect(settings.listen == nil)
        #expect(settings.forListening == settings)
        #expect(settings.writeTransactions == nil && settings.effectiveWriteTransactions == 5)
        #expect(settings.groupMaxBatches == 64 && settings.groupMaxReadings == 64_000)
        let limits = PostgresIngestStore.groupCommitLimits(settings)
        #expect(limits.concurrency == 5 && limits.maximumBatches == 64 && limits.maximumReadings == 64_000)
        for (pool, writers) in [(1, 1), (2, 1), (3, 1), (10, 5), (16, 8), (100, 8)] {
            let sized = try Self.parse("[storage]\nurl = \"postgresql://farmgate@db/farmgate\"\npool_size = \(pool)\n")
            #expect(sized.effectiveWriteTransactions == writers, "pool_size \(pool)")
        }
    }

    @Test("the keys set the group commit's limits and where the listener connects")
    func keysApply() throws {
        let settings = try Self.parse(
            """
            [storage]
            url = "postgresql://farmgate@/farmgate?host=/run/pgbouncer&port=6432"
            listen_url = "postgresql://farmgate:s%3Acret@db.example:5432/farmgate?sslmode=require"
            pool_size = 20
            connect_timeout = "3s"
            query_timeout = "7s"
            write_transactions = 12
            group_max_batches = 1
            group_max_readings = 5000
            """)
        #expect(settings.endpoint == .unixSocket(path: "/run/pgbouncer/.s.PGSQL.6432"))
        #expect(settings.writeTransactions == 12 && settings.effectiveWriteTransactions == 12)
        let limits = PostgresIngestStore.groupCommitLimits(settings)
        #expect(limits.concurrency == 12 && limits.maximumBatches == 1 && limits.maximumReadings == 5000)
        let listen = settings.forListening
        #expect(listen.endpoint == .tcp(host: "db.example", port: 5432))
        #expect(listen.password == "s:cret" && listen.tls == .require && listen.database == "farmgate")
        #expect(listen.connectTimeout == .seconds(3))
        #expect(!listen.redacted.contains("s:cret"))
    }

    @Test("FARMGATE_INGEST_LISTEN_URL sets listen_url and wins over the file's, also beside FARMGATE_INGEST_DATABASE_URL alone")
    func environment() throws {
        let overridden = try Self.parse(
            "[storage]\nurl = \"postgresql://farmgate@bouncer/farmgate\"\nlisten_url = \"postgresql://farmgate@file/farmgate\"\n",
            environment: ["FARMGATE_INGEST_LISTEN_URL": "postgresql://farmgate@env/farmgate"])
        #expect(overridden.forListening.endpoint == .tcp(host: "env", port: 5432))
        #expect(overridden.endpoint == .tcp(host: "bouncer", port: 5432))
        let onlyEnvironment = try Self.parse(
            "",
            environment: [
                "FARMGATE_INGEST_DATABASE_URL": "postgresql://farmgate@bouncer:6432/farmgate",
                "FARMGATE_INGEST_LISTEN_URL": "postgresql://farmgate@/farmgate?host=/run/postgresql",
            ])
        #expect(onlyEnvironment.endpoint == .tcp(host: "bouncer", port: 6432))
        #expect(onlyEnvironment.forListening.endpoint == .unixSocket(path: "/run/postgresql/.s.PGSQL.5432"))
        #expect(onlyEnvironment.forListening.tls == .disable)
        // Empty is unset, as for the database URL.
        let empty = try Self.parse("[storage]\nurl = \"postgresql://farmgate@db/farmgate\"\n", environment: ["FARMGATE_INGEST_LISTEN_URL": ""])
        #expect(empty.listen == nil)
    }

    @Test("[storage] tls and ca_file apply to listen_url too")
    func tlsAppliesToBoth() async throws {
        let directory = NSTemporaryDirectory() + "farmgate-listen-config-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        _ = try await TestCertificates.make(in: directory)
        let configuration = try IngestConfiguration.parse(
            """
            [storage]
            url = "postgresql://farmgate@bouncer/farmgate"
            listen_url = "postgresql://farmgate@db/farmgate"
            tls = "verify-full"
            ca_file = "ca.pem"
            """, file: "ingest.toml", baseDirectory: directory)
        let listen = try #require(configuration.storage.postgres?.forListening)
        #expect(listen.tls == .verifyFull && listen.caFile == directory + "/ca.pem")
    }

    @Test(
        "bad values are located errors that say what to write",
        arguments: [
            ("[storage]\nlisten_url = \"postgresql://u@h/d\"\n", "ingest.toml:2: storage.listen_url: applies to PostgreSQL only"),
            ("[storage]\ngroup_max_batches = 4\n", "ingest.toml:2: storage.group_max_batches: applies to PostgreSQL only"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\nlisten_url = \"mysql://u@h/d\"\n", "ingest.toml:3: storage.listen_url: must start with postgresql://"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\nlisten_url = \"postgresql://u@/d\"\n", "ingest.toml:3: storage.listen_url: names no host"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\nlisten_url = 5\n", "ingest.toml:3: storage.listen_url: must be a string"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\nwrite_transactions = 0\n", "ingest.toml:3: storage.write_transactions: must be between 1 and 1000"),
            (
                "[storage]\nurl = \"postgresql://u@h/d\"\npool_size = 4\nwrite_transactions = 4\n",
                "ingest.toml:4: storage.write_transactions: must be at most 3 with pool_size = 4"
            ),
            ("[storage]\nurl = \"postgresql://u@h/d\"\nwrite_transactions = 10\n", "ingest.toml:3: storage.write_transactions: must be at most 9 with pool_size = 10"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\ngroup_max_batches = 0\n", "ingest.toml:3: storage.group_max_batches: must be between 1 and 10000"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\ngroup_max_readings = \"64k\"\n", "ingest.toml:3: storage.group_max_readings: must be an integer"),
            ("[storage]\nurl = \"postgresql://u@h/d\"\ngroup_max_readings = 0\n", "ingest.toml:3: storage.group_max_readings: must be between 1 and 10000000"),
            (
                "[storage]\nurl = \"postgresql://u@h/d\"\nlisten_url = \"postgresql://u@/d?host=/run/pg\"\ntls = \"require\"\n",
                "ingest.toml:4: storage.tls: applies to listen_url too, which names a Unix socket"
            ),
            (
                "[storage]\nurl = \"postgresql://u@h/d\"\nlisten_url = \"postgresql://u@h/d?sslmode=require&sslrootcert=/x.pem\"\n",
                "ingest.toml:3: storage.listen_url: a CA file (ca_file or sslrootcert) is only used with verify-full"
            ),
            (
                "[storage]\nurl = \"postgresql://u@h/d\"\nlisten_url = \"postgresql://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem\"\n",
                "ingest.toml:3: storage.listen_url: cannot read the CA file /nonexistent/ca.pem"
            ),
            ("[storage]\nurl = \"postgresql://u@h/d\"\nlisten_uri = \"postgresql://u@h/d\"\n", "ingest.toml:3: storage.listen_uri: unknown key; did you mean 'listen_url'?"),
        ])
    func badValues(text: String, expected: String) {
        #expect {
            _ = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/etc")
        } throws: { error in
            let description = (error as? ConfigurationError)?.description ?? "\(error)"
            if !description.hasPrefix(expected) { Issue.record("got: \(description)") }
            return description.hasPrefix(expected)
        }
    }

    @Test("FARMGATE_INGEST_LISTEN_URL: without PostgreSQL, or malformed, names the variable")
    func badEnvironment() {
        for (environment, expected) in [
            (["FARMGATE_INGEST_LISTEN_URL": "postgresql://u@h/d"], "environment: FARMGATE_INGEST_LISTEN_URL: applies to PostgreSQL only"),
            (
                ["FARMGATE_INGEST_DATABASE_URL": "postgresql://u@h/d", "FARMGATE_INGEST_LISTEN_URL": "postgres:/x"],
                "environment: FARMGATE_INGEST_LISTEN_URL: must start with postgresql://"
            ),
        ] {
            #expect {
                _ = try IngestConfiguration.parse("", file: "ingest.toml", baseDirectory: "/etc", environment: environment)
            } throws: { error in
                (error as? ConfigurationError)?.description.hasPrefix(expected) == true
            }
        }
    }
}
