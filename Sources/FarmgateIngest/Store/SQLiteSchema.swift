/// The schema of the embedded SQLite store, as an ordered list of migrations.
///
/// Never edit a migration that has shipped: add a new one at the end. `schema_migrations` records which ones ran.
enum SQLiteSchema {
    struct Migration: Sendable {
        let version: Int
        let name: String
        let sql: String
    }

    static let bookkeeping = """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at_us INTEGER NOT NULL
        );
        """

    static let migrations: [Migration] = [
        Migration(
            version: 1, name: "farms, devices, read tokens, sensors, readings, latest",
            sql: """
                CREATE TABLE farms (
                    id INTEGER PRIMARY KEY,
                    name TEXT NOT NULL UNIQUE,
                    created_at_us INTEGER NOT NULL
                );
                CREATE TABLE devices (
                    id INTEGER PRIMARY KEY,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    name TEXT NOT NULL,
                    key_id TEXT NOT NULL UNIQUE,
                    secret_sha256 BLOB NOT NULL,
                    revoked INTEGER NOT NULL DEFAULT 0,
                    created_at_us INTEGER NOT NULL,
                    revoked_at_us INTEGER,
                    UNIQUE (farm_id, name)
                );
                CREATE TABLE read_tokens (
                    id INTEGER PRIMARY KEY,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    role TEXT NOT NULL CHECK (role IN ('viewer')),
                    key_id TEXT NOT NULL UNIQUE,
                    secret_sha256 BLOB NOT NULL,
                    revoked INTEGER NOT NULL DEFAULT 0,
                    created_at_us INTEGER NOT NULL
                );
                CREATE INDEX read_tokens_by_farm ON read_tokens(farm_id);
                CREATE TABLE sensors (
                    id INTEGER PRIMARY KEY,
                    device_id INTEGER NOT NULL REFERENCES devices(id),
                    name TEXT NOT NULL,
                    quantity TEXT NOT NULL,
                    resolution_numerator INTEGER NOT NULL,
                    resolution_denominator INTEGER NOT NULL,
                    first_seen_us INTEGER NOT NULL,
                    UNIQUE (device_id, name)
                );
                CREATE TABLE readings (
                    device_id INTEGER NOT NULL REFERENCES devices(id),
                    sequence INTEGER NOT NULL CHECK (sequence >= 0),
                    sensor_id INTEGER NOT NULL REFERENCES sensors(id),
                    timestamp_us INTEGER NOT NULL,
                    value REAL NOT NULL,
                    flags INTEGER NOT NULL,
                    received_at_us INTEGER NOT NULL,
                    PRIMARY KEY (device_id, sequence)
                ) WITHOUT ROWID;
                CREATE INDEX readings_by_sensor_time ON readings(sensor_id, timestamp_us, sequence);
                CREATE TABLE latest (
                    sensor_id INTEGER PRIMARY KEY REFERENCES sensors(id),
                    sequence INTEGER NOT NULL,
                    timestamp_us INTEGER NOT NULL,
                    value REAL NOT NULL,
                    flags INTEGER NOT NULL
                );
                """),
        Migration(
            version: 2, name: "devices.highest_sequence: the highest sequence ever stored per device",
            sql: """
                ALTER TABLE devices ADD COLUMN highest_sequence INTEGER;
                UPDATE devices SET highest_sequence = (SELECT max(sequence) FROM readings WHERE readings.device_id = devices.id);
                """),
        Migration(
            version: 3, name: "calibrations: calibration events, once per (device, event id)",
            sql: """
                CREATE TABLE calibrations (
                    id INTEGER PRIMARY KEY,
                    device_id INTEGER NOT NULL REFERENCES devices(id),
                    event_id TEXT NOT NULL,
                    sensor TEXT NOT NULL,
                    time_us INTEGER NOT NULL,
                    circuit TEXT NOT NULL,
                    event TEXT NOT NULL,
                    received_at_us INTEGER NOT NULL,
                    UNIQUE (device_id, event_id)
                );
                CREATE INDEX calibrations_by_sensor ON calibrations(device_id, sensor, time_us);
                """),
        Migration(
            version: 4, name: "alerting: receivers and the notification outbox",
            sql: """
                CREATE TABLE alert_receivers (
                    id INTEGER PRIMARY KEY,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    name TEXT NOT NULL,
                    kind TEXT NOT NULL CHECK (kind IN ('webhook', 'email')),
                    url TEXT NOT NULL,
                    secret TEXT,
                    username TEXT,
                    email_from TEXT,
                    email_to TEXT,
                    max_per_minute INTEGER NOT NULL DEFAULT 60,
                    created_at_us INTEGER NOT NULL,
                    UNIQUE (farm_id, name)
                );
                CREATE TABLE alert_outbox (
                    id INTEGER PRIMARY KEY,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    receiver_id INTEGER NOT NULL REFERENCES alert_receivers(id),
                    alert_id INTEGER NOT NULL,
                    transition_id INTEGER NOT NULL,
                    idempotency_key TEXT NOT NULL UNIQUE,
                    payload TEXT NOT NULL,
                    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivering', 'delivered', 'dead')),
                    attempts INTEGER NOT NULL DEFAULT 0,
                    next_attempt_at_us INTEGER NOT NULL,
                    claimed_by TEXT,
                    claimed_until_us INTEGER,
                    last_error TEXT,
                    created_at_us INTEGER NOT NULL,
                    delivered_at_us INTEGER
                );
                CREATE INDEX alert_outbox_due ON alert_outbox(next_attempt_at_us) WHERE state IN ('pending', 'delivering');
                CREATE INDEX alert_outbox_by_alert ON alert_outbox(alert_id);
                """),
        Migration(
            version: 5, name: "alert rules, alerts and their transitions, silences, the engine's watermarks; admin read tokens",
            sql: """
                CREATE TABLE read_tokens_v5 (
                    id INTEGER PRIMARY KEY,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    role TEXT NOT NULL CHECK (role IN ('viewer', 'admin')),
                    key_id TEXT NOT NULL UNIQUE,
                    secret_sha256 BLOB NOT NULL,
                    revoked INTEGER NOT NULL DEFAULT 0,
                    created_at_us INTEGER NOT NULL
                );
                INSERT INTO read_tokens_v5(id, farm_id, role, key_id, secret_sha256, revoked, created_at_us)
                    SELECT id, farm_id, role, key_id, secret_sha256, revoked, created_at_us FROM read_tokens;
                DROP TABLE read_tokens;
                ALTER TABLE read_tokens_v5 RENAME TO read_tokens;
                CREATE INDEX read_tokens_by_farm ON read_tokens(farm_id);
                CREATE TABLE alert_rules (
                    id INTEGER PRIMARY KEY,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    name TEXT NOT NULL,
                    definition TEXT NOT NULL,
                    updated_at_us INTEGER NOT NULL,
                    UNIQUE (farm_id, name)
                );
                CREATE TABLE alerts (
                    id INTEGER PRIMARY KEY,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    rule TEXT NOT NULL,
                    device_id INTEGER NOT NULL,
                    sensor_id INTEGER NOT NULL DEFAULT 0,
                    device TEXT,
                    sensor TEXT,
                    fingerprint TEXT NOT NULL,
                    state TEXT NOT NULL CHECK (state IN ('inactive', 'pending', 'firing', 'resolved')),
                    pending_since_us INTEGER,
                    starts_at_us INTEGER,
                    ends_at_us INTEGER,
                    last_reading_us INTEGER,
                    value REAL,
                    acknowledged_at_us INTEGER,
                    acknowledged_by TEXT,
                    late_from_us INTEGER,
                    late_to_us INTEGER,
                    late_due_us INTEGER,
                    version INTEGER NOT NULL DEFAULT 0,
                    updated_at_us INTEGER NOT NULL,
                    UNIQUE (farm_id, rule, device_id, sensor_id)
                );
                CREATE INDEX alerts_by_device ON alerts(device_id);
                CREATE INDEX alerts_by_farm_change ON alerts(farm_id, updated_at_us);
                CREATE INDEX alerts_late_due ON alerts(late_due_us) WHERE late_due_us IS NOT NULL;
                CREATE TABLE alert_transitions (
                    id INTEGER PRIMARY KEY,
                    alert_id INTEGER NOT NULL REFERENCES alerts(id),
                    from_state TEXT NOT NULL,
                    to_state TEXT NOT NULL,
                    at_us INTEGER NOT NULL,
                    value REAL,
                    late INTEGER NOT NULL DEFAULT 0,
                    silenced INTEGER NOT NULL DEFAULT 0,
                    notified INTEGER NOT NULL DEFAULT 1,
                    recorded_at_us INTEGER NOT NULL
                );
                CREATE INDEX alert_transitions_by_alert ON alert_transitions(alert_id, at_us);
                CREATE TABLE alert_silences (
                    id INTEGER PRIMARY KEY,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    matchers TEXT NOT NULL,
                    starts_at_us INTEGER NOT NULL,
                    ends_at_us INTEGER NOT NULL,
                    created_by TEXT NOT NULL,
                    comment TEXT NOT NULL
                );
                CREATE TABLE alert_watermarks (
                    device_id INTEGER PRIMARY KEY REFERENCES devices(id),
                    sequence INTEGER NOT NULL
                );
                INSERT INTO alert_watermarks(device_id, sequence) SELECT id, highest_sequence FROM devices WHERE highest_sequence IS NOT NULL;
                """),
        Migration(
            version: 6, name: "rollups at 1 minute, 1 hour and 1 day per sensor, built from the readings already stored",
            sql: SQLiteSchema.rollupTables),
        Migration(
            version: 7, name: "enrollment_tokens: one-time tokens a site exchanges for its device key",
            sql: """
                CREATE TABLE enrollment_tokens (
                    id INTEGER PRIMARY KEY,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    device_name TEXT NOT NULL,
                    key_id TEXT NOT NULL UNIQUE,
                    secret_sha256 BLOB NOT NULL,
                    created_at_us INTEGER NOT NULL,
                    expires_at_us INTEGER NOT NULL,
                    used_at_us INTEGER,
                    used_by TEXT,
                    device_id INTEGER REFERENCES devices(id),
                    action TEXT CHECK (action IN ('created', 'rotated')),
                    sealed_key BLOB
                );
                CREATE INDEX enrollment_tokens_by_device ON enrollment_tokens(farm_id, device_name);
                """),
        Migration(
            version: 8, name: "alert delivery: per-receiver pacing, last attempt, due rows by receiver",
            sql: """
                ALTER TABLE alert_receivers ADD COLUMN next_send_at_us INTEGER NOT NULL DEFAULT 0;
                ALTER TABLE alert_outbox ADD COLUMN last_attempt_at_us INTEGER;
                CREATE INDEX alert_outbox_due_by_receiver ON alert_outbox(receiver_id, next_attempt_at_us)
                    WHERE state IN ('pending', 'delivering');
                CREATE INDEX alert_outbox_by_state ON alert_outbox(state, id);
                """),
        // Like PostgreSQL's migration 9 (see `PostgresSchema.sensorTables`): one row per configuration of a device's
        // sensors, the 16 newest kept per device; devices are never deleted, so no cascade.
        Migration(
            version: 9, name: "sensor_tables: the sensor tables devices declare for stateful frames (format version 4)",
            sql: """
                CREATE TABLE sensor_tables (
                    device_id INTEGER NOT NULL REFERENCES devices(id),
                    hash INTEGER NOT NULL,
                    encoded BLOB NOT NULL,
                    declared_us INTEGER NOT NULL,
                    PRIMARY KEY (device_id, hash)
                ) WITHOUT ROWID;
                """),
        // `enroll-token revoke` withdraws an unused token; `enroll-token list` shows it revoked. No backfill: no token
        // was revoked before.
        Migration(
            version: 10, name: "enrollment_tokens.revoked_at_us: enrollment tokens withdrawn before they were used",
            sql: "ALTER TABLE enrollment_tokens ADD COLUMN revoked_at_us INTEGER;"),
        // Retention of alert history (`[retention] alert_history`): the transitions recorded before the cut-off are
        // found by `recorded_at_us`, and each one is kept when it is its alert's newest, which `(alert_id, id)` answers
        // with one seek (as it does the engine's `max(id)` per alert). Without them the first transaction of 5,000
        // deletes on a million transitions of 20 alerts did not end within 15 minutes (each row's newer one was looked
        // for along the alert's `(alert_id, at_us)` entries from its oldest); with them it takes 10–30 ms of CPU. Like
        // PostgreSQL's migration 12.
        Migration(
            version: 11, name: "alert_transitions by recorded time and by (alert, id): retention of alert history",
            sql: """
                CREATE INDEX alert_transitions_by_recorded ON alert_transitions(recorded_at_us);
                CREATE INDEX alert_transitions_newest ON alert_transitions(alert_id, id);
                """),
        // The engine merges a notification into the receiver's newest row of the alert while no claim has touched it
        // (`OutboxCoalescing`). `transitions` and `first_transition_at_us` say what a row stands for (an older row
        // stands for its one transition; when it happened is in its payload, so NULL), `coalesced_at_us` when a
        // notification was last merged in (the time its text is told as of). `(alert_id, receiver_id, id)` finds the
        // newest row with one seek, and answers what `(alert_id)` did. Like PostgreSQL's migration 13.
        Migration(
            version: 12, name: "alert_outbox: notifications of a flapping alert merged into the receiver's row not sent yet",
            sql: """
                ALTER TABLE alert_outbox ADD COLUMN transitions INTEGER NOT NULL DEFAULT 1;
                ALTER TABLE alert_outbox ADD COLUMN first_transition_at_us INTEGER;
                ALTER TABLE alert_outbox ADD COLUMN coalesced_at_us INTEGER;
                CREATE INDEX alert_outbox_newest ON alert_outbox(alert_id, receiver_id, id);
                DROP INDEX alert_outbox_by_alert;
                """),
        // A sequence in `retired_sequences` sent again is a duplicate only when its timestamp is older than the raw
        // cut-off of the run that removed it: a newer reading cannot be the removed one, and is a `sequence_conflict`
        // (a site buffer replaced after retention numbers from 1 again). `retention_cutoff` holds the newest raw cut-off
        // any run applied (see ``SQLiteIngestStore/runRetention(_:now:options:)``). Ranges retired before this migration
        // are judged as before, duplicates, for every reading older than the migration (their runs' cut-offs were
        // older still; unknown, they were not recorded): the row starts at the migration's time when any exist.
        // Like PostgreSQL's migration 14.
        Migration(
            version: 13, name: "retention_cutoff: a reading newer than the raw cut-off that retired its sequence is a sequence_conflict",
            sql: """
                CREATE TABLE retention_cutoff (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    raw_us INTEGER NOT NULL
                );
                INSERT INTO retention_cutoff(id, raw_us)
                SELECT 1, CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)
                WHERE EXISTS (SELECT 1 FROM retired_sequences);
                """),
        // A receiver's grouping: how long a new alert's first notification waits, and how long after an alert's last
        // notification to the receiver its next one waits, taking the alert's changes meanwhile (`OutboxCoalescing.due`).
        // 0 is no wait, as before. Like PostgreSQL's migration 15.
        Migration(
            version: 14, name: "alert_receivers.group_wait_us, group_interval_us: a receiver's notifications wait to take an alert's next changes",
            sql: """
                ALTER TABLE alert_receivers ADD COLUMN group_wait_us INTEGER NOT NULL DEFAULT 0;
                ALTER TABLE alert_receivers ADD COLUMN group_interval_us INTEGER NOT NULL DEFAULT 0;
                """),
        // The alert engine's check for changed rules and silences (`alertConfigurationStamp`) reads one row: a counter
        // that triggers move on every change to either table. Before, it summed both tables, which grew with the
        // silences kept and took a rule removed and added again (the same row id reused) for unchanged.
        Migration(
            version: 15, name: "alert_configuration_version: a counter every change to alert_rules or alert_silences moves",
            sql: """
                CREATE TABLE alert_configuration_version (
                    id INTEGER PRIMARY KEY CHECK (id = 1),
                    version INTEGER NOT NULL
                );
                INSERT INTO alert_configuration_version(id, version) VALUES (1, 0);
                """ + alertConfigurationTriggers),
        // Two alert engines on one store evaluating one device (instances on PostgreSQL; here tests) are serialised by
        // the device's evaluation cursor (`AlertEvaluationCursor`); no row is a device none evaluated yet.
        Migration(
            version: 16, name: "alert_cursors: every evaluation of a device's readings moves its row, so that engines evaluate a device one at a time",
            sql: """
                CREATE TABLE alert_cursors (
                    device_id INTEGER PRIMARY KEY REFERENCES devices(id),
                    version INTEGER NOT NULL,
                    newest_us INTEGER
                );
                """),
        // The newest cut-off a retention run applied to each rollup level (`1m`, `1h`, `1d`), kept at its highest: a
        // level's retention raised since brings nothing back, so `resolution=auto` must not pick it for a span it lost.
        // No row: no run removed anything of that level. Like PostgreSQL's migration 18.
        Migration(
            version: 17, name: "rollup_cutoffs: what retention removed of each rollup level, so that auto never picks a level for a span it lost",
            sql: """
                CREATE TABLE rollup_cutoffs (
                    level TEXT PRIMARY KEY,
                    cutoff_us INTEGER NOT NULL
                );
                """),
        // The recipients an e-mail notification already reached, one per line: a retry sends only to the others, so
        // one address a server refuses neither holds the message from the rest nor sends it twice to those who have
        // it. Like PostgreSQL's migration 20.
        Migration(
            version: 18, name: "alert_outbox.reached: the recipients of an e-mail notification it already reached",
            sql: """
                ALTER TABLE alert_outbox ADD COLUMN reached TEXT;
                """),
        // An `INTEGER PRIMARY KEY` without AUTOINCREMENT takes max(id) + 1: once retention (or a removed receiver) had
        // deleted the newest rows, a new notification got the id of one deleted, so an id in a log line or a script's
        // `outbox retry 57` could name another notification than it did. The table is made again with AUTOINCREMENT
        // (SQLite cannot add it in place); its ids, and the highest one in `sqlite_sequence`, carry over. PostgreSQL's
        // identity column never reused one.
        Migration(
            version: 19, name: "alert_outbox: ids never reused after rows are deleted (AUTOINCREMENT)",
            sql: """
                CREATE TABLE alert_outbox_v19 (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    farm_id INTEGER NOT NULL REFERENCES farms(id),
                    receiver_id INTEGER NOT NULL REFERENCES alert_receivers(id),
                    alert_id INTEGER NOT NULL,
                    transition_id INTEGER NOT NULL,
                    idempotency_key TEXT NOT NULL UNIQUE,
                    payload TEXT NOT NULL,
                    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivering', 'delivered', 'dead')),
                    attempts INTEGER NOT NULL DEFAULT 0,
                    next_attempt_at_us INTEGER NOT NULL,
                    claimed_by TEXT,
                    claimed_until_us INTEGER,
                    last_error TEXT,
                    created_at_us INTEGER NOT NULL,
                    delivered_at_us INTEGER,
                    last_attempt_at_us INTEGER,
                    transitions INTEGER NOT NULL DEFAULT 1,
                    first_transition_at_us INTEGER,
                    coalesced_at_us INTEGER,
                    reached TEXT
                );
                INSERT INTO alert_outbox_v19(id, farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, state,
                        attempts, next_attempt_at_us, claimed_by, claimed_until_us, last_error, created_at_us, delivered_at_us,
                        last_attempt_at_us, transitions, first_transition_at_us, coalesced_at_us, reached)
                    SELECT id, farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, state,
                        attempts, next_attempt_at_us, claimed_by, claimed_until_us, last_error, created_at_us, delivered_at_us,
                        last_attempt_at_us, transitions, first_transition_at_us, coalesced_at_us, reached
                    FROM alert_outbox;
                DROP TABLE alert_outbox;
                ALTER TABLE alert_outbox_v19 RENAME TO alert_outbox;
                CREATE INDEX alert_outbox_due ON alert_outbox(next_attempt_at_us) WHERE state IN ('pending', 'delivering');
                CREATE INDEX alert_outbox_due_by_receiver ON alert_outbox(receiver_id, next_attempt_at_us)
                    WHERE state IN ('pending', 'delivering');
                CREATE INDEX alert_outbox_by_state ON alert_outbox(state, id);
                CREATE INDEX alert_outbox_newest ON alert_outbox(alert_id, receiver_id, id);
                """),
    ]

    /// Migration 15's triggers: every insert, update or delete of an alert rule or silence moves the counter.
    static var alertConfigurationTriggers: String {
        ["alert_rules", "alert_silences"].flatMap { table in
            ["INSERT", "UPDATE", "DELETE"].map { event in
                """
                CREATE TRIGGER \(table)_\(event.lowercased())_version AFTER \(event) ON \(table)
                BEGIN UPDATE alert_configuration_version SET version = version + 1 WHERE id = 1; END;
                """
            }
        }.joined(separator: "\n")
    }

    /// Migration 6: the rollup tables (see ``RollupLevel``), and the rollups of every reading already stored, so that
    /// a store that ran before rollups existed does not lose its history's summaries when retention deletes raw
    /// readings. Sensors are never deleted, so the tables carry no foreign key (one lookup less per upsert).
    /// `retired_sequences` holds, per device, the ranges of sequences whose readings retention deleted, so that such
    /// a reading sent again is not stored twice (PostgreSQL's `stored_sequences` does that there): a duplicate when
    /// older than `retention_cutoff` (migration 13), else a `sequence_conflict`.
    static var rollupTables: String {
        RollupLevel.allCases.map { level in
            let width = level.width
            return """
                CREATE TABLE \(level.table) (
                    sensor_id INTEGER NOT NULL,
                    bucket_us INTEGER NOT NULL,
                    count INTEGER NOT NULL,
                    valid_count INTEGER NOT NULL,
                    sum_value REAL NOT NULL,
                    min_value REAL,
                    max_value REAL,
                    last_us INTEGER,
                    last_sequence INTEGER,
                    last_value REAL,
                    PRIMARY KEY (sensor_id, bucket_us)
                ) WITHOUT ROWID;
                INSERT INTO \(level.table)(sensor_id, bucket_us, count, valid_count, sum_value, min_value, max_value)
                SELECT sensor_id, timestamp_us - timestamp_us % \(width), count(*), sum((flags & 2) = 0),
                    total(CASE WHEN flags & 2 = 0 THEN value END), min(CASE WHEN flags & 2 = 0 THEN value END),
                    max(CASE WHEN flags & 2 = 0 THEN value END)
                FROM readings GROUP BY 1, 2;
                UPDATE \(level.table) SET (last_us, last_sequence, last_value) = (
                    SELECT r.timestamp_us, r.sequence, r.value FROM readings r
                    WHERE r.sensor_id = \(level.table).sensor_id AND r.timestamp_us >= \(level.table).bucket_us
                        AND r.timestamp_us < \(level.table).bucket_us + \(width) AND r.flags & 2 = 0
                    ORDER BY r.timestamp_us DESC, r.sequence DESC LIMIT 1)
                WHERE valid_count > 0;
                """
        }.joined(separator: "\n") + """

            CREATE TABLE retired_sequences (
                device_id INTEGER NOT NULL REFERENCES devices(id),
                first_sequence INTEGER NOT NULL,
                last_sequence INTEGER NOT NULL CHECK (first_sequence <= last_sequence),
                PRIMARY KEY (device_id, first_sequence)
            ) WITHOUT ROWID;
            """
    }

    static var currentVersion: Int { migrations.last?.version ?? 0 }
}
