import FarmgateSupport

/// The tables of the site buffer and how a file is brought up to the current version.
///
/// - `schema_version`: one row per migration applied; the highest is the file's version.
/// - `counters`: named integers that must survive restarts and the deletion of every reading:
///   `last_sequence` (at least the last device-wide sequence number assigned whenever no reading or quarantined reading
///   carries it: written only by transactions that delete or renumber, not by every commit; never reused), `dropped` (readings discarded by the quota
///   policy or the in-memory cap), `duplicates_ignored` (samples equal in sensor and timestamp to a buffered reading).
/// - `sensors`: one row per sensor id, with the quantity and resolution its readings' `steps` are counted in.
///   `configured` is 0 for a sensor no longer registered; such a row stays while readings or quarantined readings refer to it.
/// - `readings`: committed, unacknowledged readings. `sequence` is the rowid. Values are whole `steps` of the sensor's resolution.
///   The UNIQUE index on (timestamp, sensor) (version 5; (sensor, timestamp) before) is what deduplicates.
/// - `quarantine`: readings the ingest refused for good, with the reason and when (UTC microseconds). From version 3 the
///   reason is also kept split into its stable `code` (`timestamp_in_future`, `encoding_failed`, ...; `unknown` when the
///   reason has none) and its `message`, so that an installer can list, requeue or drop by code; `reason` keeps the whole
///   `code: message` text. Counters `quarantine_trimmed` (quarantined readings deleted by the quota policy) and
///   `quarantine_dropped` (deleted by an installer with `farmgate quarantine drop`).
/// - `boots` (version 2): one row per kernel boot id that readings were taken in while the clock was not synchronised.
///   Versions 2 to 6 stamped each such reading in `readings.boot` (its key) and `readings.boottime` (CLOCK_BOOTTIME in
///   microseconds); from version 7 those columns are always NULL (no bytes) and the stamps live in `clock_stamps`.
/// - `clock_stamps` (version 7): runs of readings taken while the clock was not synchronised, one row per run rather than
///   two columns and an index entry per reading: readings `first...last` (those that exist) were taken in boot `boot` with
///   the wall clock `clock_offset` microseconds ahead of CLOCK_BOOTTIME (as the run's first reading had it; whole
///   milliseconds, rounded up, for runs migrated from version 6), so each one's
///   boot time is its `timestamp − clock_offset`. The newest run is open (`last` = 9223372036854775807): the readings
///   committed after it join it without a write until one does not. A reading leaves its run when its time is repaired
///   or when a request carrying it leaves (see ``BufferStore/freezeForSending(_:)``): a row is rewritten per run and
///   request, not per reading.
/// - `calibrations` (version 4): finished calibration events, kept until the ingest acknowledged them. From version 5 an
///   event the ingest refused for good stays in the table with `quarantined_at`, `code` and `message` set, and is no
///   longer sent (see ``ReadingBuffer/quarantineCalibrations(_:)``).
enum BufferSchema {
    /// One step of the schema: the statements that take a file from `version - 1` to `version`, run in one transaction.
    /// Never edit a migration that has shipped: append a new one.
    struct Migration: Sendable {
        let version: Int64
        let sql: String
    }

    /// Every migration, in order. A new file gets all of them; an older file the ones above its version.
    static let migrations: [Migration] = [
        Migration(version: 1, sql: version1),
        Migration(version: 2, sql: version2),
        Migration(version: 3, sql: version3),
        Migration(version: 4, sql: version4),
        Migration(version: 5, sql: version5),
        Migration(version: 6, sql: version6),
        Migration(version: 7, sql: version7),
    ]

    /// The version this build writes. A file with a higher version was written by a newer Farmgate and is not touched.
    static var currentVersion: Int64 { migrations.last?.version ?? 0 }

    static let counterLastSequence = "last_sequence"
    static let counterDropped = "dropped"
    static let counterDuplicatesIgnored = "duplicates_ignored"
    static let counterQuarantineTrimmed = "quarantine_trimmed"
    static let counterQuarantineDropped = "quarantine_dropped"

    /// Statements that create version 1 from an empty file. Run inside one transaction.
    static let version1 = """
        CREATE TABLE IF NOT EXISTS schema_version(
            version INTEGER PRIMARY KEY,
            applied_at INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS counters(
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS sensors(
            key INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            quantity TEXT NOT NULL,
            resolution_numerator INTEGER NOT NULL,
            resolution_denominator INTEGER NOT NULL,
            configured INTEGER NOT NULL DEFAULT 1
        );
        CREATE TABLE IF NOT EXISTS readings(
            sequence INTEGER PRIMARY KEY,
            sensor INTEGER NOT NULL,
            timestamp INTEGER NOT NULL,
            steps INTEGER NOT NULL,
            quality INTEGER NOT NULL
        );
        CREATE UNIQUE INDEX IF NOT EXISTS readings_sensor_timestamp ON readings(sensor, timestamp);
        CREATE TABLE IF NOT EXISTS quarantine(
            sequence INTEGER PRIMARY KEY,
            sensor INTEGER NOT NULL,
            timestamp INTEGER NOT NULL,
            steps INTEGER NOT NULL,
            quality INTEGER NOT NULL,
            reason TEXT NOT NULL,
            quarantined_at INTEGER NOT NULL
        );
        CREATE INDEX IF NOT EXISTS quarantine_sensor ON quarantine(sensor);
        """

    /// Version 2: what repairs the time of a reading taken before the clock was set (see ``ReadingBuffer/observeClock(_:)``).
    /// Adding NULL columns rewrites nothing: an existing file migrates in milliseconds whatever its size.
    static let version2 = """
        CREATE TABLE IF NOT EXISTS boots(
            key INTEGER PRIMARY KEY,
            boot_id TEXT NOT NULL UNIQUE,
            first_seen INTEGER NOT NULL
        );
        ALTER TABLE readings ADD COLUMN boot INTEGER;
        ALTER TABLE readings ADD COLUMN boottime INTEGER;
        CREATE INDEX IF NOT EXISTS readings_boot ON readings(boot, boottime) WHERE boot IS NOT NULL;
        """

    /// Version 3: quarantine keeps the code apart from the message, and two counters of readings deleted from quarantine.
    ///
    /// Old rows are backfilled from their `code: message` reason with the rule of ``QuarantineReason/init(parsing:)``: the
    /// text before the first `": "` is the code when it is 1 to 64 characters of `a-z`, `0-9` and `_`; otherwise the code
    /// is `unknown` and the message is the whole reason.
    static let version3 = """
        ALTER TABLE quarantine ADD COLUMN code TEXT NOT NULL DEFAULT 'unknown';
        ALTER TABLE quarantine ADD COLUMN message TEXT NOT NULL DEFAULT '';
        UPDATE quarantine SET
            code = CASE
                WHEN instr(reason, ': ') BETWEEN 2 AND 65
                    AND substr(reason, 1, instr(reason, ': ') - 1) NOT GLOB '*[^a-z0-9_]*'
                THEN substr(reason, 1, instr(reason, ': ') - 1)
                ELSE 'unknown' END,
            message = CASE
                WHEN instr(reason, ': ') BETWEEN 2 AND 65
                    AND substr(reason, 1, instr(reason, ': ') - 1) NOT GLOB '*[^a-z0-9_]*'
                THEN substr(reason, instr(reason, ': ') + 2)
                ELSE reason END;
        CREATE INDEX IF NOT EXISTS quarantine_code ON quarantine(code, sequence);
        INSERT OR IGNORE INTO counters(name, value) VALUES ('quarantine_trimmed', 0);
        INSERT OR IGNORE INTO counters(name, value) VALUES ('quarantine_dropped', 0);
        """

    /// Version 4: finished calibrations waiting for the ingest (see ``ReadingBuffer/recordCalibration(_:)``). `event` is the
    /// event's JSON as it is uploaded; `id` (the event's own id) is unique, so recording it twice keeps one row.
    static let version4 = """
        CREATE TABLE IF NOT EXISTS calibrations(
            key INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            sensor TEXT NOT NULL,
            time INTEGER NOT NULL,
            event TEXT NOT NULL,
            recorded_at INTEGER NOT NULL
        );
        """

    /// Version 5: calibration events the ingest refuses for good are quarantined in place (NULL columns: an existing file
    /// migrates without rewriting a row). `quarantined_at` NULL means the event waits to be sent.
    static let version5 = """
        ALTER TABLE calibrations ADD COLUMN quarantined_at INTEGER;
        ALTER TABLE calibrations ADD COLUMN code TEXT;
        ALTER TABLE calibrations ADD COLUMN message TEXT;
        """

    /// Version 6: the index that deduplicates readings is ordered by time first, `(timestamp, sensor)` instead of
    /// `(sensor, timestamp)`. Same uniqueness, but a group commit of readings from many sensors now appends to the index's
    /// last page instead of touching one page per sensor: with 50 sensors that was most of what a commit wrote to the SD
    /// card. Rebuilding the index reads the table once (seconds for millions of readings on a Pi), at the first start.
    static let version6 = """
        DROP INDEX IF EXISTS readings_sensor_timestamp;
        CREATE UNIQUE INDEX IF NOT EXISTS readings_timestamp_sensor ON readings(timestamp, sensor);
        """

    /// Version 7: boot stamps as runs (`clock_stamps`). Per reading they cost two columns and an entry in `readings_boot`
    /// written at commit, and all three rewritten when a request carrying the reading left: with the clock unsynchronised
    /// that doubled what the buffer wrote to the SD card per reading (169 bytes against 85). A run costs a row when it
    /// starts or ends, and one row rewritten per request that leaves.
    ///
    /// Existing stamps become runs: consecutive readings (by sequence, no other reading between them) of one boot whose
    /// `timestamp − boottime`, rounded up to whole milliseconds, is the same (gaps and islands over window functions).
    static let version7 = """
        CREATE TABLE IF NOT EXISTS clock_stamps(
            first INTEGER PRIMARY KEY,
            last INTEGER NOT NULL,
            boot INTEGER NOT NULL,
            clock_offset INTEGER NOT NULL
        );
        INSERT INTO clock_stamps(first, last, boot, clock_offset)
        SELECT min(sequence), max(sequence), boot, clock_offset FROM (
            SELECT sequence, boot, clock_offset,
                row_number() OVER (ORDER BY sequence)
                    - row_number() OVER (PARTITION BY boot, clock_offset ORDER BY sequence) AS island
            FROM (
                SELECT sequence, boot,
                    CASE WHEN boot IS NULL OR boottime IS NULL THEN NULL
                        WHEN timestamp - boottime >= 0 THEN (timestamp - boottime + 999) / 1000 * 1000
                        ELSE (timestamp - boottime) / 1000 * 1000 END AS clock_offset
                FROM readings))
        WHERE clock_offset IS NOT NULL
        GROUP BY boot, clock_offset, island;
        UPDATE readings SET boot = NULL, boottime = NULL WHERE boot IS NOT NULL OR boottime IS NOT NULL;
        DROP INDEX IF EXISTS readings_boot;
        """

    /// The version of the file behind `connection`, 0 for an empty file.
    static func version(of connection: SQLiteConnection) throws(SQLiteError) -> Int64 {
        let hasTable = try connection.queryInt(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'") ?? 0
        guard hasTable > 0 else { return 0 }
        return try connection.queryInt("SELECT max(version) FROM schema_version") ?? 0
    }
}
