import FarmgateSupport
import FarmgateTestSupport
import Foundation
import Testing

@testable import FarmgateIngest

/// Why a PgBouncer test cannot run: it fails (never skips) with what to do.
struct MissingPgBouncer: Error, CustomStringConvertible {
    var description: String
}

/// Debian's PgBouncer (`/usr/sbin/pgbouncer`, installed by `.ci/install-deps`) in **transaction** pooling mode in front of
/// the test cluster, listening on a Unix socket in a scratch directory under /tmp; every database name is forwarded to
/// the same-named database of the cluster (`* =`), trust authentication as on the cluster. Run as root (CI), it drops to
/// the `postgres` user (`-u`), as it refuses to run as root.
///
/// ``settings(for:)`` turns the cluster's settings of a test database into settings that reach that database through
/// PgBouncer; ``admin(_:)`` runs a command of PgBouncer's admin console (`SHOW STATS`, `SHOW CONFIG`) through `psql`.
struct TestPgBouncer: Sendable {
    static let binary = "/usr/sbin/pgbouncer"
    let directory: String
    let port: Int

    /// Starts PgBouncer in front of the cluster named by `FARMGATE_TEST_DATABASE_URL`, runs `body`, and stops it.
    static func with<T: Sendable>(_ body: @Sendable (TestPgBouncer) async throws -> T) async throws -> T {
        guard let url = ProcessInfo.processInfo.environment["FARMGATE_TEST_DATABASE_URL"], !url.isEmpty else { throw MissingTestDatabase() }
        guard case .unixSocket(let socket) = try PostgresSettings(url: url).endpoint,
            let dot = socket.range(of: "/.s.PGSQL.", options: .backwards), let clusterPort = Int(socket[dot.upperBound...])
        else { throw MissingPgBouncer(description: "FARMGATE_TEST_DATABASE_URL must name the cluster's Unix socket (.ci/with-postgres does)") }
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw MissingPgBouncer(description: "\(binary) is missing: install Debian's pgbouncer (.ci/install-deps does); PgBouncer tests fail rather than skip")
        }
        let scratch = try Scratch(prefix: "pgb", in: URL(fileURLWithPath: "/tmp"))
        // PgBouncer, as `postgres`, writes its log here.
        chmod(scratch.path, 0o777)
        let port = try freePort()
        _ = try scratch.write("userlist.txt", "\"farmgate\" \"\"\n")
        let ini = try scratch.write(
            "pgbouncer.ini",
            """
            [databases]
            * = host=\(socket[..<dot.lowerBound]) port=\(clusterPort)

            [pgbouncer]
            listen_port = \(port)
            unix_socket_dir = \(scratch.path)
            auth_type = trust
            auth_file = \(scratch.file("userlist.txt"))
            pool_mode = transaction
            max_client_conn = 500
            default_pool_size = 20
            admin_users = farmgate
            logfile = \(scratch.file("pgbouncer.log"))

            """)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = (getuid() == 0 ? ["-u", "postgres"] : []) + ["-q", ini]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        let bouncer = TestPgBouncer(directory: scratch.path, port: port)
        // SIGKILL, not terminate(): Foundation's Process hands the child the spawning thread's signal mask, and the
        // concurrency pool's threads block SIGTERM and SIGINT, so PgBouncer never saw them and outlived the tests.
        defer {
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            withExtendedLifetime(scratch) {}
        }
        let socketFile = scratch.file(".s.PGSQL.\(port)")
        let deadline = ContinuousClock.now + .seconds(15)
        while !FileManager.default.fileExists(atPath: socketFile) {
            guard process.isRunning, ContinuousClock.now < deadline else {
                let log = (try? String(contentsOfFile: scratch.file("pgbouncer.log"), encoding: .utf8)) ?? ""
                throw MissingPgBouncer(description: "PgBouncer did not start (running: \(process.isRunning)); its log:\n\(log)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        let result = try await body(bouncer)
        // Stop it and wait (off the pool's threads) so that the next test's cluster changes find no connection of it.
        kill(process.processIdentifier, SIGKILL)
        for _ in 0..<250 where process.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        return result
    }

    /// `direct`'s database through PgBouncer: the same user and database, PgBouncer's socket.
    func settings(for direct: PostgresSettings) -> PostgresSettings {
        var settings = direct
        settings.endpoint = .unixSocket(path: directory + "/.s.PGSQL.\(port)")
        settings.tls = .disable
        return settings
    }

    /// The log PgBouncer wrote so far.
    var log: String { (try? String(contentsOfFile: directory + "/pgbouncer.log", encoding: .utf8)) ?? "" }

    /// Runs `command` on PgBouncer's admin console (database `pgbouncer`, simple queries only, so through `psql`) and
    /// returns its rows, columns separated by `|`.
    func admin(_ command: String) async throws -> [[String]] {
        let environment = ProcessInfo.processInfo.environment
        let psql = (environment["FARMGATE_TEST_PGBIN"].map { $0 + "/psql" }).flatMap { FileManager.default.isExecutableFile(atPath: $0) ? $0 : nil }
            ?? "/usr/bin/psql"
        let arguments = ["-X", "-A", "-t", "-F", "|", "-h", directory, "-p", "\(port)", "-U", "farmgate", "-d", "pgbouncer", "-c", command]
        let (status, output) = try await runProgram(psql, arguments)
        guard status == 0 else { throw MissingPgBouncer(description: "psql \(command) on PgBouncer's console failed (\(status)): \(output)") }
        return output.split(separator: "\n").map { $0.split(separator: "|", omittingEmptySubsequences: false).map(String.init) }
    }

    /// PgBouncer's `SHOW STATS` row of `database`, by column name.
    func stats(of database: String) async throws -> [String: Int] {
        let columns = try await admin("SHOW STATS").first { $0.first == database } ?? []
        // 1.18's columns: database, total_xact_count, total_query_count, total_received, total_sent, total_xact_time,
        // total_query_time, total_wait_time, avg_xact_count, ...
        let names = ["database", "total_xact_count", "total_query_count"]
        var found: [String: Int] = [:]
        for (name, value) in zip(names, columns) { found[name] = Int(value) }
        return found
    }
}
