import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `farmgate-ingest retention run [--dry-run]`, the real binary on a real SQLite file.
@Suite struct RetentionCommandTests {
    static let day: Int64 = 86_400_000_000

    /// A migrated store with farm f1, device d1 and sensor tank1.ph: 100 readings 45 days old and 50 from the last
    /// hour; 1-minute rollups 100 days old (30 rows) and recent (10 rows); 1-hour rollups 100 days old (5 rows).
    static func prepare(_ scratch: Scratch, retention: String) async throws -> (config: String, database: String) {
        let database = scratch.file("ingest.sqlite")
        let config = try scratch.write("ingest.toml", "[storage]\npath = \"ingest.sqlite\"\n\n[retention]\n" + retention)
        #expect(try await runCommand(Farm.ingestBinary, ["farm", "create", "f1", "--config", config]).status == 0)
        #expect(try await runCommand(Farm.ingestBinary, ["device", "create", "--farm", "f1", "--device", "d1", "--config", config]).status == 0)
        let now = Timestamp.now().microseconds
        try await runOffPool {
            let db = try SQLiteConnection(path: database, mode: .readWrite)
            try db.transaction {
                try db.execute(
                    """
                    INSERT INTO sensors(id, device_id, name, quantity, resolution_numerator, resolution_denominator, first_seen_us)
                    SELECT 1, id, 'tank1.ph', 'ph', 1, 100, 0 FROM devices WHERE name = 'd1';
                    UPDATE devices SET highest_sequence = 150;
                    """)
                for sequence in 1...150 {
                    let time = sequence <= 100 ? now - 45 * day + Int64(sequence) * 1_000_000 : now - 3_600_000_000 + Int64(sequence) * 1_000_000
                    try db.query(
                        "INSERT INTO readings(device_id, sequence, sensor_id, timestamp_us, value, flags, received_at_us) SELECT id, ?, 1, ?, 6.5, 0, ? FROM devices",
                        [.integer(Int64(sequence)), .integer(time), .integer(now)])
                }
                for (table, start, count) in [("rollups_1m", now - 100 * day, 30), ("rollups_1m", now - 3_600_000_000, 10), ("rollups_1h", now - 100 * day, 5)] {
                    let width: Int64 = table == "rollups_1m" ? 60_000_000 : 3_600_000_000
                    for index in 0..<count {
                        let bucket = (start / width + Int64(index)) * width
                        try db.query(
                            "INSERT INTO \(table)(sensor_id, bucket_us, count, valid_count, sum_value) VALUES (1, ?, 1, 0, 0)", [.integer(bucket)])
                    }
                }
            }
        }
        return (config, database)
    }

    static func count(_ database: String, _ sql: String) async throws -> Int64 {
        try await runOffPool { try SQLiteConnection(path: database, mode: .readWrite).queryInt(sql) ?? -1 }
    }

    @Test func dryRunCountsAndARunRemovesWhatIsOlderThanEachPeriod() async throws {
        let scratch = try Scratch(prefix: "fg-retention")
        let (config, database) = try await Self.prepare(scratch, retention: "raw = \"30d\"\nrollup_1m = \"60d\"\n")

        let dry = try await runCommand(Farm.ingestBinary, ["retention", "run", "--dry-run", "--config", config])
        #expect(dry.status == 0, "\(dry.stderr)")
        #expect(dry.stdout.contains("(dry run: nothing removed): raw 30d, 1m rollups 60d, 1h rollups forever, 1d rollups forever"), "\(dry.stdout)")
        #expect(dry.stdout.contains(": would remove 100 rows"), "\(dry.stdout)")
        #expect(dry.stdout.contains("1m rollups before") && dry.stdout.contains("would remove 30 rows"), "\(dry.stdout)")
        #expect(try await Self.count(database, "SELECT count(*) FROM readings") == 150)

        let run = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        #expect(run.status == 0, "\(run.stderr)")
        #expect(run.stdout.contains(": removed 100 rows") && run.stdout.contains("removed 30 rows"), "\(run.stdout)")
        #expect(run.stdout.contains("1h rollups: kept forever"), "\(run.stdout)")
        #expect(try await Self.count(database, "SELECT count(*) FROM readings") == 50)
        #expect(try await Self.count(database, "SELECT min(sequence) FROM readings") == 101)
        #expect(try await Self.count(database, "SELECT count(*) FROM rollups_1m") == 10)
        #expect(try await Self.count(database, "SELECT count(*) FROM rollups_1h") == 5)
        // The deleted sequences are remembered as one range, so that they stay duplicates if sent again.
        #expect(try await Self.count(database, "SELECT count(*) FROM retired_sequences") == 1)
        #expect(try await Self.count(database, "SELECT last_sequence - first_sequence + 1 FROM retired_sequences") == 100)

        let again = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        #expect(again.status == 0 && again.stdout.contains(": removed 0 rows"), "\(again.stdout)")
    }

    /// Adds `count` readings of tank1.ph 45 days old (sequences from 1,000) to a prepared file: a run takes seconds.
    static func addOldReadings(_ database: String, count: Int) async throws {
        let start = Timestamp.now().microseconds - 45 * day
        try await runOffPool {
            let db = try SQLiteConnection(path: database, mode: .readWrite, busyTimeoutMilliseconds: 30_000)
            try db.transaction {
                try db.query(
                    """
                    WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
                    INSERT INTO readings(device_id, sequence, sensor_id, timestamp_us, value, flags, received_at_us)
                    SELECT d.id, 1000 + n.i, 1, ? + n.i * 1000, 6.5, 0, ? FROM n, devices d
                    """, [.integer(Int64(count - 1)), .integer(start), .integer(start)])
                try db.query("UPDATE devices SET highest_sequence = ?", [.integer(Int64(1000 + count))])
            }
        }
    }

    /// Two runs at once on one SQLite file: one runs, the other finds its lock (`<path>.retention.lock`), says so and
    /// exits 75, as on PostgreSQL. Before, both ran (exit 0 twice, each reporting part of the rows).
    @Test func twoRunsAtOnceOnOneSQLiteFileRunOnce() async throws {
        let scratch = try Scratch(prefix: "fg-retention")
        let (config, database) = try await Self.prepare(scratch, retention: "raw = \"30d\"\n")
        try await Self.addOldReadings(database, count: 200_000)
        async let first = runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        async let second = runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        let results = try await [first, second]
        #expect(results.map(\.status).sorted() == [0, 75], "\(results)")
        let ran = try #require(results.first { $0.status == 0 })
        let skipped = try #require(results.first { $0.status == 75 })
        #expect(ran.stdout.contains(": removed 200100 rows"), "\(ran.stdout)")
        #expect(
            skipped.stdout.contains("Skipped: another farmgate-ingest is running retention on this database now; nothing was removed."),
            "\(skipped.stdout)")
        #expect(try await Self.count(database, "SELECT count(*) FROM readings") == 50)
    }

    /// While another process holds `<path>.retention.lock` (a run of `serve` or of the command), a run does nothing and
    /// exits 75; once it is let go, the run goes ahead.
    @Test func aRunWhileAnotherHoldsTheLockExits75() async throws {
        let scratch = try Scratch(prefix: "fg-retention")
        let (config, database) = try await Self.prepare(scratch, retention: "raw = \"30d\"\n")
        let lockPath = try #require(realpath(database, nil).map { pointer in
            defer { free(pointer) }
            return String(cString: pointer)
        }) + ".retention.lock"
        let descriptor = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        #expect(descriptor >= 0 && flock(descriptor, LOCK_EX | LOCK_NB) == 0)
        let held = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        close(descriptor)
        #expect(held.status == 75, "\(held.stdout) \(held.stderr)")
        #expect(held.stdout.contains("Skipped: another farmgate-ingest is running retention"), "\(held.stdout)")
        #expect(try await Self.count(database, "SELECT count(*) FROM readings") == 150)
        let run = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        #expect(run.status == 0 && run.stdout.contains(": removed 100 rows"), "\(run.stdout) \(run.stderr)")
    }

    @Test func anInvalidPeriodIsALocatedConfigurationError() async throws {
        let scratch = try Scratch(prefix: "fg-retention")
        let config = try scratch.write("ingest.toml", "[storage]\npath = \"ingest.sqlite\"\n\n[retention]\nraw = \"2h\"\n")
        let result = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", config])
        #expect(result.status == 78)
        #expect(result.stderr.contains("ingest.toml:5: retention.raw: must be between 1d and"), "\(result.stderr)")
        #expect(result.stderr.contains("(got \"2h\")"), "the value as written: \(result.stderr)")
        let zero = try scratch.write("zero.toml", "[storage]\npath = \"ingest.sqlite\"\n\n[retention]\nraw = \"0d\"\n")
        let none = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", zero])
        #expect(none.status == 78 && none.stderr.contains("retention.raw: must be between 1d and 36600d (got \"0d\")"), "\(none.stderr)")
        let forever = try scratch.write("forever.toml", "[storage]\npath = \"ingest.sqlite\"\n[retention]\nraw = \"forever\"\nrollup_1m = \"sometimes\"\n")
        let other = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", forever])
        #expect(other.status == 78)
        #expect(other.stderr.contains("retention.rollup_1m: must be a duration of at least one day such as \"90d\", or \"forever\""), "\(other.stderr)")
        // A coarser rollup kept for less time than a finer one (hours gone where minutes remain) is refused, naming both.
        for (body, message) in [
            ("rollup_1m = \"365d\"\nrollup_1h = \"30d\"\n", "retention.rollup_1h: keeps rollup_1h for 30d, less than rollup_1m (365d)"),
            ("rollup_1m = \"forever\"\nrollup_1d = \"3650d\"\n", "levels.toml:5: retention.rollup_1d: keeps rollup_1d for 3650d, less than rollup_1h (forever)"),
            ("rollup_1h = \"400d\"\nrollup_1d = \"100d\"\n", "retention.rollup_1d: keeps rollup_1d for 100d, less than rollup_1h (400d)"),
        ] {
            let path = try scratch.write("levels.toml", "[storage]\npath = \"ingest.sqlite\"\n[retention]\n" + body)
            let refused = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", path])
            #expect(refused.status == 78, "\(body): \(refused.stderr)")
            #expect(refused.stderr.contains(message), "\(body): \(refused.stderr)")
        }
        // Equal periods, and the defaults with a longer hourly level, are fine.
        let fine = try scratch.write("fine.toml", "[storage]\npath = \"ingest.sqlite\"\n[retention]\nrollup_1m = \"400d\"\nrollup_1h = \"400d\"\nrollup_1d = \"forever\"\n")
        // (retention run makes no store: on a fresh install migrate or serve does.)
        let migrated = try await runCommand(Farm.ingestBinary, ["migrate", "--config", fine])
        #expect(migrated.status == 0, "\(migrated.stderr)")
        let accepted = try await runCommand(Farm.ingestBinary, ["retention", "run", "--config", fine])
        #expect(accepted.status == 0, "\(accepted.stderr)")
    }
}
