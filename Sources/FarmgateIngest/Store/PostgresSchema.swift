/// The schema of the PostgreSQL store, as an ordered list of migrations (numbered apart from SQLite's).
///
/// Never edit a migration that has shipped: add a new one at the end. `schema_migrations` records which ones ran;
/// ``PostgresIngestStore/migrate()`` applies the pending ones in one transaction under `pg_advisory_xact_lock`, so that
/// several instances starting at once apply each exactly once (the others wait, then find nothing to do).
///
/// ## Readings (migration 5)
/// `readings` holds chunks (``PostgresReadingChunk``): one row per device, sensor and UTC day of a group commit, with
/// the first and last timestamp and sequence as columns and the readings as arrays: `sequence_offsets` and
/// `time_offsets` (`int4`, from the first sequence and the first timestamp), `reading_values` (`float8`, exactly what the
/// site sent, so that nothing depends on a resolution that may change) and `flags` (`int2`, NULL when every one is zero).
/// A chunk spans at most 4,096 sequences, 30 minutes and 1,024 readings, so the chunks holding a sequence or a time are
/// found by a bounded range scan of `(device_id, first_sequence)` or `(sensor_id, first_ts)`. The view `reading_rows`
/// unfolds them into one row per reading for ad-hoc SQL.
///
/// The table is partitioned by `RANGE (first_ts)`, one partition per UTC day (`readings_YYYYMMDD`); a chunk never
/// crosses a day, so it lies wholly in its day's partition and retention drops whole days. Partitions are created ahead
/// by ``PostgresIngestStore/createPartitions(now:)`` (at start and every six hours), with a `DEFAULT` partition for what
/// falls outside (a backlog older than the first partition, a clock-unsynchronised reading far ahead). When a day's
/// partition is created later, the chunks the default partition holds for that day move into it in the transaction that
/// attaches it. (Migrations 5 and 11 made partitions with the SQL functions `farmgate_create_partitions` and
/// `farmgate_create_rollup_partitions`, which stay in the database; the store no longer calls them: they move rows in
/// one transaction for every partition, under `query_timeout`.)
///
/// ## Rollups (migrations 4 and 11)
/// `rollups_1m`, `rollups_1h` and `rollups_1d` (see ``RollupLevel``). `rollups_1m` is partitioned by `RANGE
/// (bucket_us)`, one partition per UTC calendar month (`rollups_1m_YYYYMM`) and a default partition, made ahead by
/// ``PostgresIngestStore/createPartitions(now:)`` beside the readings' days, so that its retention drops whole months
/// (``partitionedMinuteRollups``); the hourly and daily tables are not partitioned.
///
/// ## Idempotency across partitions
/// PostgreSQL cannot enforce a unique index across partitions unless it contains the partition key, and (device,
/// sequence) does not; a row-level unique index would also vanish with a dropped partition, after which a re-sent
/// reading would be stored again. So the authority on "was (device, sequence) ever stored" is `stored_sequences`: per
/// device, the closed ranges `[first_sequence, last_sequence]` of sequences ever stored. A site numbers its readings
/// consecutively, so a device has one range plus one per gap (quarantined readings, a recovered buffer's jump): a few
/// rows, however many readings. The write transaction locks the device rows (`SELECT ... FOR NO KEY UPDATE`, in id order), so
/// two requests of one device are serialised and the range check and the insert cannot interleave; requests of
/// different devices never wait on each other. A sequence inside a range whose chunk is still present is compared
/// (duplicate or `sequence_conflict`); one inside a range whose chunk is gone (its partition dropped) was stored and
/// acknowledged once, and cannot be compared: it is a duplicate when its timestamp is older than `retention_cutoff`
/// (migration 14: the newest raw cut-off a retention run applied, recorded in the transaction that drops), else a
/// `sequence_conflict` (the removed reading was older, so this is another one numbered alike: a site buffer replaced
/// after retention numbers from 1 again). Retention never touches `stored_sequences`.
///
/// ## Size
/// One row per reading (migration 1) cost 100.6 bytes per reading on disk: the heap's 24-byte tuple header and 4-byte
/// line pointer around 34 bytes of data, and a B-tree entry. Chunks pay those once per chunk. Measured on PostgreSQL 15
/// by `farmgate-bench postgres` (1,000,000 readings of 60 sensors every 10 s stored in 1000-reading batches, about 17
/// readings per chunk, `VACUUM ANALYZE`, `sum(pg_total_relation_size)` over the partitions): see the README's figure.
enum PostgresSchema {
    struct Migration: Sendable {
        let version: Int
        let name: String
        let statements: [String]
    }

    /// The key of the advisory lock that serialises migrations and partition creation across instances.
    static let migrationLock: Int64 = 0x6661_726D_6761_7465  // "farmgate"
    /// The key of the advisory lock that serialises partition creation across instances.
    static let partitionLock: Int64 = 0x6661_726D_7061_7274  // "farmpart"

    /// The key of the advisory lock that one retention run holds, so that with several instances each run happens once.
    static let retentionLock: Int64 = 0x6661_726D_7265_746E  // "farmretn"

    /// Migration 4's rollup tables (see ``RollupLevel``; columns ``rollupColumns``, which migration 11 uses again) and
    /// the rollups of the readings already stored. Sensors are
    /// never deleted, so the tables carry no foreign key. Created unpartitioned; migration 11 partitions `rollups_1m` by
    /// month (``partitionedMinuteRollups``), the hourly and daily tables stay as they are.
    static let rollupColumns = """
        bucket_us bigint NOT NULL, sum_value double precision NOT NULL, min_value double precision, max_value double precision,
        last_us bigint, last_sequence bigint, last_value double precision, sensor_id integer NOT NULL, count integer NOT NULL,
        valid_count integer NOT NULL, PRIMARY KEY (sensor_id, bucket_us)
        """

    static var rollupStatements: [String] {
        RollupLevel.allCases.flatMap { level -> [String] in
            let valid = "FILTER (WHERE flags & 2 = 0)"
            let latest = "ORDER BY timestamp_us DESC, sequence DESC) \(valid))[1]"
            return [
                """
                CREATE TABLE \(level.table) (\(rollupColumns))
                """,
                """
                INSERT INTO \(level.table) (sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_sequence, last_value)
                SELECT sensor_id, timestamp_us - timestamp_us % \(level.width), count(*), count(*) \(valid), coalesce(sum(value) \(valid), 0),
                    min(value) \(valid), max(value) \(valid), (array_agg(timestamp_us \(latest), (array_agg(sequence \(latest),
                    (array_agg(value \(latest)
                FROM readings GROUP BY 1, 2
                """,
            ]
        }
    }

    static let bookkeeping = """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            applied_at_us bigint NOT NULL
        )
        """

    static let migrations: [Migration] = [
        Migration(
            version: 1, name: "farms, devices, read tokens, sensors, stored sequence ranges, readings by day, latest",
            statements: [
                """
                CREATE TABLE farms (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    name text NOT NULL UNIQUE,
                    created_at_us bigint NOT NULL
                )
                """,
                """
                CREATE TABLE devices (
                    id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    farm_id bigint NOT NULL REFERENCES farms(id),
                    name text NOT NULL,
                    key_id text NOT NULL UNIQUE,
                    secret_sha256 bytea NOT NULL,
                    revoked boolean NOT NULL DEFAULT false,
                    created_at_us bigint NOT NULL,
                    revoked_at_us bigint,
                    highest_sequence bigint,
                    UNIQUE (farm_id, name)
                )
                """,
                """
                CREATE TABLE read_tokens (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    farm_id bigint NOT NULL REFERENCES farms(id),
                    role text NOT NULL CHECK (role IN ('viewer')),
                    key_id text NOT NULL UNIQUE,
                    secret_sha256 bytea NOT NULL,
                    revoked boolean NOT NULL DEFAULT false,
                    created_at_us bigint NOT NULL
                )
                """,
                "CREATE INDEX read_tokens_by_farm ON read_tokens(farm_id)",
                """
                CREATE TABLE sensors (
                    id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    device_id integer NOT NULL REFERENCES devices(id),
                    name text NOT NULL,
                    quantity text NOT NULL,
                    resolution_numerator bigint NOT NULL,
                    resolution_denominator bigint NOT NULL,
                    first_seen_us bigint NOT NULL,
                    UNIQUE (device_id, name)
                )
                """,
                """
                CREATE TABLE stored_sequences (
                    device_id integer NOT NULL REFERENCES devices(id),
                    first_sequence bigint NOT NULL,
                    last_sequence bigint NOT NULL,
                    PRIMARY KEY (device_id, first_sequence),
                    CHECK (first_sequence >= 0 AND first_sequence <= last_sequence)
                )
                """,
                """
                CREATE TABLE readings (
                    timestamp_us bigint NOT NULL,
                    sequence bigint NOT NULL,
                    value double precision NOT NULL,
                    device_id integer NOT NULL,
                    sensor_id integer NOT NULL,
                    flags smallint NOT NULL
                ) PARTITION BY RANGE (timestamp_us)
                """,
                "CREATE TABLE readings_default PARTITION OF readings DEFAULT",
                "CREATE INDEX readings_by_device_sequence ON readings (device_id, sequence)",
                "CREATE INDEX readings_by_time ON readings USING brin (timestamp_us)",
                """
                CREATE TABLE latest (
                    sensor_id integer PRIMARY KEY REFERENCES sensors(id),
                    sequence bigint NOT NULL,
                    timestamp_us bigint NOT NULL,
                    value double precision NOT NULL,
                    flags smallint NOT NULL
                )
                """,
                """
                CREATE FUNCTION farmgate_create_partitions(first_day date, days integer) RETURNS integer
                LANGUAGE plpgsql AS $$
                DECLARE
                    day date;
                    low bigint;
                    high bigint;
                    partition text;
                    created integer := 0;
                BEGIN
                    FOR i IN 0 .. days - 1 LOOP
                        day := first_day + i;
                        partition := 'readings_' || to_char(day, 'YYYYMMDD');
                        CONTINUE WHEN to_regclass(partition) IS NOT NULL;
                        low := (extract(epoch FROM day::timestamp) * 1000000)::bigint;
                        high := low + 86400000000;
                        EXECUTE format('CREATE TABLE %I (LIKE readings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', partition);
                        EXECUTE format(
                            'WITH moved AS (DELETE FROM readings_default WHERE timestamp_us >= %s AND timestamp_us < %s RETURNING *) '
                            'INSERT INTO %I SELECT * FROM moved', low, high, partition);
                        EXECUTE format('ALTER TABLE readings ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', partition, low, high);
                        created := created + 1;
                    END LOOP;
                    RETURN created;
                END
                $$
                """,
            ]),
        Migration(
            version: 2, name: "alerting: receivers and the notification outbox",
            statements: [
                """
                CREATE TABLE alert_receivers (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    farm_id bigint NOT NULL REFERENCES farms(id),
                    name text NOT NULL,
                    kind text NOT NULL CHECK (kind IN ('webhook', 'email')),
                    url text NOT NULL,
                    secret text,
                    username text,
                    email_from text,
                    email_to text,
                    max_per_minute integer NOT NULL DEFAULT 60,
                    created_at_us bigint NOT NULL,
                    UNIQUE (farm_id, name)
                )
                """,
                """
                CREATE TABLE alert_outbox (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    farm_id bigint NOT NULL REFERENCES farms(id),
                    receiver_id bigint NOT NULL REFERENCES alert_receivers(id),
                    alert_id bigint NOT NULL,
                    transition_id bigint NOT NULL,
                    idempotency_key text NOT NULL UNIQUE,
                    payload text NOT NULL,
                    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivering', 'delivered', 'dead')),
                    attempts integer NOT NULL DEFAULT 0,
                    next_attempt_at_us bigint NOT NULL,
                    claimed_by text,
                    claimed_until_us bigint,
                    last_error text,
                    created_at_us bigint NOT NULL,
                    delivered_at_us bigint
                )
                """,
                "CREATE INDEX alert_outbox_due ON alert_outbox (next_attempt_at_us) WHERE state IN ('pending', 'delivering')",
                "CREATE INDEX alert_outbox_by_alert ON alert_outbox (alert_id)",
            ]),
        Migration(
            version: 3, name: "alert rules, alerts and their transitions, silences, the engine's watermarks; admin read tokens",
            statements: [
                "ALTER TABLE read_tokens DROP CONSTRAINT read_tokens_role_check",
                "ALTER TABLE read_tokens ADD CONSTRAINT read_tokens_role_check CHECK (role IN ('viewer', 'admin'))",
                """
                CREATE TABLE alert_rules (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    farm_id bigint NOT NULL REFERENCES farms(id),
                    name text NOT NULL,
                    definition text NOT NULL,
                    updated_at_us bigint NOT NULL,
                    UNIQUE (farm_id, name)
                )
                """,
                """
                CREATE TABLE alerts (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    farm_id bigint NOT NULL REFERENCES farms(id),
                    rule text NOT NULL,
                    device_id bigint NOT NULL,
                    sensor_id bigint NOT NULL DEFAULT 0,
                    device text,
                    sensor text,
                    fingerprint text NOT NULL,
                    state text NOT NULL CHECK (state IN ('inactive', 'pending', 'firing', 'resolved')),
                    pending_since_us bigint,
                    starts_at_us bigint,
                    ends_at_us bigint,
                    last_reading_us bigint,
                    value double precision,
                    acknowledged_at_us bigint,
                    acknowledged_by text,
                    late_from_us bigint,
                    late_to_us bigint,
                    late_due_us bigint,
                    version bigint NOT NULL DEFAULT 0,
                    updated_at_us bigint NOT NULL,
                    UNIQUE (farm_id, rule, device_id, sensor_id)
                )
                """,
                "CREATE INDEX alerts_by_device ON alerts (device_id)",
                "CREATE INDEX alerts_by_farm_change ON alerts (farm_id, updated_at_us)",
                "CREATE INDEX alerts_late_due ON alerts (late_due_us) WHERE late_due_us IS NOT NULL",
                """
                CREATE TABLE alert_transitions (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    alert_id bigint NOT NULL REFERENCES alerts(id),
                    from_state text NOT NULL,
                    to_state text NOT NULL,
                    at_us bigint NOT NULL,
                    value double precision,
                    late boolean NOT NULL DEFAULT false,
                    silenced boolean NOT NULL DEFAULT false,
                    notified boolean NOT NULL DEFAULT true,
                    recorded_at_us bigint NOT NULL
                )
                """,
                "CREATE INDEX alert_transitions_by_alert ON alert_transitions (alert_id, at_us)",
                """
                CREATE TABLE alert_silences (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    farm_id bigint NOT NULL REFERENCES farms(id),
                    matchers text NOT NULL,
                    starts_at_us bigint NOT NULL,
                    ends_at_us bigint NOT NULL,
                    created_by text NOT NULL,
                    comment text NOT NULL
                )
                """,
                """
                CREATE TABLE alert_watermarks (
                    device_id integer PRIMARY KEY REFERENCES devices(id),
                    sequence bigint NOT NULL
                )
                """,
                "INSERT INTO alert_watermarks(device_id, sequence) SELECT id, highest_sequence FROM devices WHERE highest_sequence IS NOT NULL",
            ]),
        Migration(
            version: 4, name: "rollups at 1 minute, 1 hour and 1 day per sensor (built from the stored readings), retention runs",
            statements: rollupStatements + [
                """
                CREATE TABLE maintenance_runs (
                    job text PRIMARY KEY,
                    finished_at_us bigint NOT NULL,
                    summary text NOT NULL
                )
                """
            ]),
        Migration(
            version: 5, name: "readings as chunks: one row per device, sensor and day with arrays of offsets, values and flags",
            statements: chunkedReadings),
        Migration(
            version: 6, name: "enrollment_tokens: one-time tokens a site exchanges for its device key",
            statements: [
                """
                CREATE TABLE enrollment_tokens (
                    id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                    farm_id bigint NOT NULL REFERENCES farms(id),
                    device_name text NOT NULL,
                    key_id text NOT NULL UNIQUE,
                    secret_sha256 bytea NOT NULL,
                    created_at_us bigint NOT NULL,
                    expires_at_us bigint NOT NULL,
                    used_at_us bigint,
                    used_by text,
                    device_id integer REFERENCES devices(id),
                    action text CHECK (action IN ('created', 'rotated')),
                    sealed_key bytea
                )
                """,
                "CREATE INDEX enrollment_tokens_by_device ON enrollment_tokens (farm_id, device_name)",
            ]),
        Migration(
            version: 7, name: "calibrations: calibration events, once per (device, event id)",
            statements: PostgresSchema.calibrations),
        Migration(
            version: 8, name: "alert delivery: per-receiver pacing, last attempt, due rows by receiver",
            statements: [
                "ALTER TABLE alert_receivers ADD COLUMN next_send_at_us bigint NOT NULL DEFAULT 0",
                "ALTER TABLE alert_outbox ADD COLUMN last_attempt_at_us bigint",
                """
                CREATE INDEX alert_outbox_due_by_receiver ON alert_outbox (receiver_id, next_attempt_at_us)
                WHERE state IN ('pending', 'delivering')
                """,
                "CREATE INDEX alert_outbox_by_state ON alert_outbox (state, id)",
            ]),
        Migration(
            version: 9, name: "sensor_tables: the sensor tables devices declare for stateful frames (format version 4)",
            statements: PostgresSchema.sensorTables),
        // Like SQLite's migration 10: `enroll-token revoke` withdraws an unused token. Adding a nullable column without a
        // default rewrites nothing.
        Migration(
            version: 10, name: "enrollment_tokens.revoked_at_us: enrollment tokens withdrawn before they were used",
            statements: ["ALTER TABLE enrollment_tokens ADD COLUMN revoked_at_us bigint"]),
        Migration(
            version: 11, name: "rollups_1m partitioned by month (rollups_1m_YYYYMM and a default): retention drops whole months",
            statements: PostgresSchema.partitionedMinuteRollups),
        // Like SQLite's migration 11: retention of alert history finds the transitions recorded before its cut-off by
        // `recorded_at_us` and keeps each alert's newest, which `(alert_id, id)` answers with one index probe (and the
        // engine's `max(id)` per alert with an index-only scan). Built in the migration's transaction, which holds the
        // engine's writes of transitions for as long as it takes: seconds for millions of rows.
        Migration(
            version: 12, name: "alert_transitions by recorded time and by (alert, id): retention of alert history",
            statements: [
                "CREATE INDEX alert_transitions_by_recorded ON alert_transitions (recorded_at_us)",
                "CREATE INDEX alert_transitions_newest ON alert_transitions (alert_id, id)",
            ]),
        // Like SQLite's migration 12: the engine merges a notification into the receiver's newest row of the alert
        // while no claim has touched it (`OutboxCoalescing`). `transitions` and `first_transition_at_us` say what a
        // row stands for (an older row stands for its one transition; when it happened is in its payload, so NULL),
        // `coalesced_at_us` when a notification was last merged in (the time its text is told as of). Columns without
        // a default or with a constant one rewrite nothing. `(alert_id, receiver_id, id)` finds the newest row with
        // one probe, and answers what `(alert_id)` did.
        Migration(
            version: 13, name: "alert_outbox: notifications of a flapping alert merged into the receiver's row not sent yet",
            statements: [
                "ALTER TABLE alert_outbox ADD COLUMN transitions integer NOT NULL DEFAULT 1",
                "ALTER TABLE alert_outbox ADD COLUMN first_transition_at_us bigint",
                "ALTER TABLE alert_outbox ADD COLUMN coalesced_at_us bigint",
                "CREATE INDEX alert_outbox_newest ON alert_outbox (alert_id, receiver_id, id)",
                "DROP INDEX alert_outbox_by_alert",
            ]),
        // Like SQLite's migration 13: a sequence whose chunk retention removed is a duplicate only when the reading sent
        // again is older than the newest raw cut-off a run applied; a newer one is a `sequence_conflict`. Chunks dropped
        // before this migration are judged as before, duplicates, for every reading older than the last retention run
        // (`maintenance_runs`: its cut-off, and every earlier run's, was older still); no run, no row.
        Migration(
            version: 14, name: "retention_cutoff: a reading newer than the raw cut-off that retired its sequence is a sequence_conflict",
            statements: [
                """
                CREATE TABLE retention_cutoff (
                    id integer PRIMARY KEY CHECK (id = 1),
                    raw_us bigint NOT NULL
                )
                """,
                "INSERT INTO retention_cutoff(id, raw_us) SELECT 1, finished_at_us FROM maintenance_runs WHERE job = 'retention'",
            ]),
        // Like SQLite's migration 14: a receiver's grouping (`OutboxCoalescing.due`). 0 is no wait, as before.
        Migration(
            version: 15, name: "alert_receivers.group_wait_us, group_interval_us: a receiver's notifications wait to take an alert's next changes",
            statements: [
                "ALTER TABLE alert_receivers ADD COLUMN group_wait_us bigint NOT NULL DEFAULT 0",
                "ALTER TABLE alert_receivers ADD COLUMN group_interval_us bigint NOT NULL DEFAULT 0",
            ]),
        // Like SQLite's migration 15: the alert engine's check for changed rules and silences reads one counter that a
        // statement trigger on either table moves (in the changing transaction, so every instance sees the change
        // with it), instead of summing both tables.
        Migration(
            version: 16, name: "alert_configuration_version: a counter every change to alert_rules or alert_silences moves",
            statements: [
                """
                CREATE TABLE alert_configuration_version (
                    id integer PRIMARY KEY CHECK (id = 1),
                    version bigint NOT NULL
                )
                """,
                "INSERT INTO alert_configuration_version(id, version) VALUES (1, 0)",
                """
                CREATE FUNCTION farmgate_alert_configuration_changed() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    UPDATE alert_configuration_version SET version = version + 1 WHERE id = 1;
                    RETURN NULL;
                END $$
                """,
                """
                CREATE TRIGGER alert_rules_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON alert_rules
                FOR EACH STATEMENT EXECUTE FUNCTION farmgate_alert_configuration_changed()
                """,
                """
                CREATE TRIGGER alert_silences_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON alert_silences
                FOR EACH STATEMENT EXECUTE FUNCTION farmgate_alert_configuration_changed()
                """,
            ]),
        // Like SQLite's migration 16: see `AlertEvaluationCursor`. No row is a device none evaluated yet (version 0).
        Migration(
            version: 17, name: "alert_cursors: every evaluation of a device's readings moves its row, so that instances evaluate a device one at a time",
            statements: [
                """
                CREATE TABLE alert_cursors (
                    device_id integer PRIMARY KEY REFERENCES devices(id),
                    version bigint NOT NULL,
                    newest_us bigint
                )
                """
            ]),
        // Like SQLite's migration 17: the newest cut-off a retention run applied to each rollup level.
        Migration(
            version: 18, name: "rollup_cutoffs: what retention removed of each rollup level, so that auto never picks a level for a span it lost",
            statements: [
                """
                CREATE TABLE rollup_cutoffs (
                    level text PRIMARY KEY,
                    cutoff_us bigint NOT NULL
                )
                """
            ]),
        // PostgreSQL only: room on each page for the rows that every batch updates (see ``updateRoom``).
        Migration(
            version: 19, name: "fillfactor: room on each page for the rows every batch updates, so that their updates stay HOT",
            statements: PostgresSchema.updateRoom),
        // Like SQLite's migration 18: the recipients of an e-mail notification it already reached, one per line.
        Migration(
            version: 20, name: "alert_outbox.reached: the recipients of an e-mail notification it already reached",
            statements: ["ALTER TABLE alert_outbox ADD COLUMN IF NOT EXISTS reached text"]),
    ]

    static var currentVersion: Int { migrations.last?.version ?? 0 }
}

extension PostgresSchema {
    /// The fill factor of the tables whose rows the write transaction updates (nearly) every time: each sensor's
    /// `latest` row and its hourly and daily rollup, a device's sequence range, its `highest_sequence`, and the alert
    /// engine's per-device rows. Migration 19 (``updateRoom``).
    static let updatedTableFillFactors: [(table: String, fillFactor: Int)] = [
        ("latest", 50), (RollupLevel.day.table, 50), (RollupLevel.hour.table, 70), ("stored_sequences", 50), ("devices", 50),
        ("alert_watermarks", 50), ("alert_cursors", 50),
    ]

    /// The fill factor of every `rollups_1m` partition (migration 19 sets it on those that exist, and
    /// ``PostgresIngestStore/createPartitions(now:)`` makes new ones with it): a batch inserts most of its 1-minute buckets
    /// and updates the one each sensor's previous batch left open, a row inserted moments before on a recent page.
    static let minuteRollupFillFactor = 70

    /// Migration 19: room on each page for the rows that every batch updates, so that PostgreSQL can update them in
    /// place (a heap-only tuple: the new version on the same page, no new index entry), as it cannot on a full page.
    /// At the default fill factor of 100 a full page sends the new version elsewhere, with a new entry in every index and
    /// a dead tuple and index entry for vacuum. Measured with `farmgate-bench postgres` (2026-12-07): at 100, 23–32 %
    /// of the updates of `latest`, `rollups_1h` and `rollups_1d` and 1–3 % of those of `rollups_1m` were HOT; with the
    /// fill factors here 83–100 %, and the ingest took 267–314 k readings/s (median 297 k) against 223–276 k (median
    /// 251 k) in four alternating runs. `rollups_1m` took about the same room per row after `VACUUM` either way (186 and
    /// 189 bytes: the dead versions cost what the free room does). Existing pages keep their rows; the new fill factor
    /// applies to pages filled from now on (a `VACUUM FULL` of a table applies it at once).
    static var updateRoom: [String] {
        updatedTableFillFactors.map { "ALTER TABLE \($0.table) SET (fillfactor = \($0.fillFactor))" } + [
            forEachPartition(of: RollupLevel.minute.table, execute: "'ALTER TABLE %I SET (fillfactor = \(minuteRollupFillFactor))', child.relname")
        ]
    }

    /// A `DO` block that runs `EXECUTE format(<arguments>)` for each partition of `parent` (its name is
    /// `child.relname`), then `then`.
    static func forEachPartition(of parent: String, execute arguments: String, then: String = "") -> String {
        """
        DO $$
        DECLARE
            child record;
        BEGIN
            FOR child IN
                SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = '\(parent)'::regclass
            LOOP
                EXECUTE format(\(arguments));
            END LOOP;
            \(then)
        END
        $$
        """
    }

    /// Migration 11: `rollups_1m` becomes `PARTITION BY RANGE (bucket_us)`, one partition per UTC calendar month
    /// (`rollups_1m_YYYYMM`) and a `DEFAULT` partition (`rollups_1m_default`) for buckets outside every month made,
    /// so that its retention drops whole months instead of deleting a year-old month row by row: at 60 sensors a month
    /// is 2.6 million rows, which a `DELETE` writes to the WAL one by one and leaves for vacuum. Same columns, same
    /// primary key `(sensor_id, bucket_us)`: it holds the partition key, so it is enforced across partitions and the
    /// write transaction's `ON CONFLICT (sensor_id, bucket_us)` upsert (``RollupSQL/merge(table:excluded:)``) works on
    /// the parent as before; a range query for one sensor prunes to the months it spans.
    ///
    /// Partitions are created like the readings' days (``PostgresIngestStore/createPartitions(now:)``: last month
    /// through two months ahead): an existing month is skipped; a new one is filled with the default partition's rows of
    /// that month in the transaction that attaches it. The existing rows move in this migration's transaction (the
    /// table renamed, the new one made, partitions for the months that have rows made by
    /// `farmgate_create_rollup_partitions(first_month, months)`, `INSERT ... SELECT`, the old table dropped), as
    /// migration 5 did for readings.
    ///
    /// `rollups_1h` and `rollups_1d` stay unpartitioned: they hold 24 and 1 rows per sensor and day (a year of 60 sensors
    /// is 525,600 and 21,900 rows, against 31.5 million at 1 minute) and are kept forever by default, so there is
    /// little to drop, and a configured retention deletes few rows by primary key.
    static let partitionedMinuteRollups: [String] = [
        "ALTER TABLE rollups_1m RENAME TO rollups_1m_v4",
        "ALTER TABLE rollups_1m_v4 RENAME CONSTRAINT rollups_1m_pkey TO rollups_1m_v4_pkey",
        """
        CREATE TABLE rollups_1m (\(rollupColumns)) PARTITION BY RANGE (bucket_us)
        """,
        "CREATE TABLE rollups_1m_default PARTITION OF rollups_1m DEFAULT",
        """
        CREATE FUNCTION farmgate_create_rollup_partitions(first_month date, months integer) RETURNS integer
        LANGUAGE plpgsql AS $$
        DECLARE
            month_start timestamp;
            low bigint;
            high bigint;
            partition text;
            created integer := 0;
        BEGIN
            FOR i IN 0 .. months - 1 LOOP
                month_start := date_trunc('month', first_month::timestamp) + make_interval(months => i);
                partition := 'rollups_1m_' || to_char(month_start, 'YYYYMM');
                CONTINUE WHEN to_regclass(partition) IS NOT NULL;
                low := (extract(epoch FROM month_start) * 1000000)::bigint;
                high := (extract(epoch FROM month_start + interval '1 month') * 1000000)::bigint;
                EXECUTE format('CREATE TABLE %I (LIKE rollups_1m INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', partition);
                EXECUTE format(
                    'WITH moved AS (DELETE FROM rollups_1m_default WHERE bucket_us >= %s AND bucket_us < %s RETURNING *) '
                    'INSERT INTO %I SELECT * FROM moved', low, high, partition);
                EXECUTE format('ALTER TABLE rollups_1m ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', partition, low, high);
                created := created + 1;
            END LOOP;
            RETURN created;
        END
        $$
        """,
        """
        SELECT farmgate_create_rollup_partitions(month_start, 1) FROM (
            SELECT DISTINCT date_trunc('month', timestamp 'epoch' + (bucket_us / 1000000) * interval '1 second')::date AS month_start FROM rollups_1m_v4
        ) months
        """,
        """
        INSERT INTO rollups_1m (sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_sequence, last_value)
        SELECT sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value, last_us, last_sequence, last_value FROM rollups_1m_v4
        """,
        "DROP TABLE rollups_1m_v4",
    ]

    /// Migration 9: the sensor tables devices declared in stateful frames (``WireStateStore``), by device and
    /// ``SensorTable/hash`` (stored as the bigint of the same 64 bits), holding the ``SensorTable/encoded`` bytes as
    /// declared. No time-based retention: a row is one configuration of a device's sensors, and a table a device declared
    /// once may be named by its frames at any time after. Bounded instead by count: declaring a table keeps only the 16
    /// newest of the device (`maxSensorTablesPerDevice`); a device whose table was pruned declares it again after a 409
    /// `unknown_sensor_table`. Devices are never deleted (revocation and key rotation keep the row), so the foreign key
    /// needs no cascade.
    static let sensorTables = [
        """
        CREATE TABLE sensor_tables (
            device_id integer NOT NULL REFERENCES devices(id),
            hash bigint NOT NULL,
            encoded bytea NOT NULL,
            declared_us bigint NOT NULL,
            PRIMARY KEY (device_id, hash)
        )
        """
    ]

    /// Migration 7: calibration events as SQLite keeps them (its migration 3): the event's JSON as it arrived, beside the
    /// columns the read route needs. `(device_id, event_id)` is unique: an event re-sent after a lost acknowledgement is a
    /// duplicate, never a second calibration. Events are few (a handful per probe and year), so no partitioning.
    static let calibrations = [
        """
        CREATE TABLE calibrations (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            device_id integer NOT NULL REFERENCES devices(id),
            event_id text NOT NULL,
            sensor text NOT NULL,
            time_us bigint NOT NULL,
            circuit text NOT NULL,
            event text NOT NULL,
            received_at_us bigint NOT NULL,
            UNIQUE (device_id, event_id)
        )
        """,
        "CREATE INDEX calibrations_by_sensor ON calibrations (device_id, sensor, time_us)",
    ]

    /// Migration 5: `readings` becomes one row per chunk (``PostgresReadingChunk``), partitioned by the chunk's first
    /// timestamp, one partition per UTC day under the same names as before (`readings_YYYYMMDD`, `readings_default`),
    /// so that partition creation and retention by dropping partitions work as they did. The rows of migration 1 are
    /// converted in the same transaction: grouped by device, sensor, 30 minutes of time and 4,096 sequences (which
    /// keeps every chunk within the limits of ``PostgresReadingChunk``), into partitions made for the days that had one.
    static let chunkedReadings: [String] = [
        forEachPartition(
            of: "readings", execute: "'ALTER TABLE %I RENAME TO %I', child.relname, 'readings_v1_' || substr(child.relname, 10)",
            then: "ALTER TABLE readings RENAME TO readings_v1;"),
        """
        CREATE TABLE readings (
            first_ts bigint NOT NULL,
            last_ts bigint NOT NULL,
            first_sequence bigint NOT NULL,
            last_sequence bigint NOT NULL,
            device_id integer NOT NULL,
            sensor_id integer NOT NULL,
            sequence_offsets integer[] NOT NULL,
            time_offsets integer[] NOT NULL,
            reading_values double precision[] NOT NULL,
            flags smallint[],
            CHECK (last_sequence - first_sequence <= \(PostgresReadingChunk.maximumSequenceSpan)),
            CHECK (last_ts - first_ts <= \(PostgresReadingChunk.maximumTimeSpan))
        ) PARTITION BY RANGE (first_ts)
        """,
        "CREATE TABLE readings_default PARTITION OF readings DEFAULT",
        "CREATE INDEX readings_by_device_first_sequence ON readings (device_id, first_sequence)",
        "CREATE INDEX readings_by_sensor_first_ts ON readings (sensor_id, first_ts)",
        """
        CREATE OR REPLACE FUNCTION farmgate_create_partitions(first_day date, days integer) RETURNS integer
        LANGUAGE plpgsql AS $$
        DECLARE
            day date;
            low bigint;
            high bigint;
            partition text;
            created integer := 0;
        BEGIN
            FOR i IN 0 .. days - 1 LOOP
                day := first_day + i;
                partition := 'readings_' || to_char(day, 'YYYYMMDD');
                CONTINUE WHEN to_regclass(partition) IS NOT NULL;
                low := (extract(epoch FROM day::timestamp) * 1000000)::bigint;
                high := low + 86400000000;
                EXECUTE format('CREATE TABLE %I (LIKE readings INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', partition);
                EXECUTE format(
                    'WITH moved AS (DELETE FROM readings_default WHERE first_ts >= %s AND first_ts < %s RETURNING *) '
                    'INSERT INTO %I SELECT * FROM moved', low, high, partition);
                EXECUTE format('ALTER TABLE readings ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)', partition, low, high);
                created := created + 1;
            END LOOP;
            RETURN created;
        END
        $$
        """,
        """
        SELECT farmgate_create_partitions(to_date(substr(c.relname, 13), 'YYYYMMDD'), 1)
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'readings_v1'::regclass AND c.relname ~ '^readings_v1_[0-9]{8}$'
        """,
        """
        INSERT INTO readings
        SELECT min(timestamp_us), max(timestamp_us), min(sequence), max(sequence), device_id, sensor_id,
            array_agg((sequence - first_sequence)::integer ORDER BY sequence),
            array_agg((timestamp_us - first_ts)::integer ORDER BY sequence),
            array_agg(value ORDER BY sequence),
            CASE WHEN bool_or(flags <> 0) THEN array_agg(flags ORDER BY sequence) END
        FROM (
            SELECT r.*,
                min(sequence) OVER chunk AS first_sequence,
                min(timestamp_us) OVER chunk AS first_ts
            FROM readings_v1 r
            WINDOW chunk AS (PARTITION BY device_id, sensor_id, floor(timestamp_us / 1800000000.0), sequence / 4096)
        ) v
        GROUP BY device_id, sensor_id, floor(timestamp_us / 1800000000.0), sequence / 4096
        """,
        "DROP TABLE readings_v1",
        """
        CREATE VIEW reading_rows AS
        SELECT c.device_id, c.sensor_id, c.first_sequence + u.sequence_offset AS sequence, c.first_ts + u.time_offset AS timestamp_us,
            u.value, coalesce(c.flags[u.position], 0::smallint) AS flags
        FROM readings c,
            unnest(c.sequence_offsets, c.time_offsets, c.reading_values) WITH ORDINALITY AS u(sequence_offset, time_offset, value, position)
        """,
    ]
}
