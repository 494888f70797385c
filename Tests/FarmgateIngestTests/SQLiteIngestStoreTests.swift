import FarmgateSupport
import FarmgateWire
import Foundation
import Testing

@testable import FarmgateIngest

@Suite("SQLite store")
struct SQLiteIngestStoreTests {
    @Test("the same batch stored twice is stored once and counted as duplicates the second time")
    func sameBatchTwice() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        let batch = try phBatch(sequences: 1...100)

        let first = try await fixture.store.store(batch, for: device, receivedAt: testNow)
        #expect(first.tally == Tally(accepted: 100, duplicates: 0, rejected: 0))
        let second = try await fixture.store.store(batch, for: device, receivedAt: testNow)
        #expect(second.tally == Tally(accepted: 0, duplicates: 100, rejected: 0))

        let rows = try await storedSequences(fixture, device: device)
        #expect(rows == Array(1...100))
    }

    @Test("batches re-cut differently after a crash store every reading exactly once")
    func recutBatches() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")

        let a = try await fixture.store.store(try phBatch(sequences: 1...40), for: device, receivedAt: testNow)
        let b = try await fixture.store.store(try phBatch(sequences: 30...70), for: device, receivedAt: testNow)
        let c = try await fixture.store.store(try phBatch(sequences: [75, 71, 72, 75, 60]), for: device, receivedAt: testNow)
        #expect(a.accepted == 40 && a.duplicates == 0)
        #expect(b.accepted == 30 && b.duplicates == 11)
        // 75 twice in one batch: stored once, the second counted as a duplicate; 60 was stored before.
        #expect(c.accepted == 3 && c.duplicates == 2)

        let rows = try await storedSequences(fixture, device: device)
        #expect(rows == Array(1...72) + [75])
    }

    @Test("sequences are per device: the same sequence from two devices is two readings")
    func sequencesPerDevice() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let d1 = try await fixture.identity(device: "d1")
        let d2 = try await fixture.identity(device: "d2")
        #expect(try await fixture.store.store(try phBatch(device: "d1", sequences: 1...5), for: d1, receivedAt: testNow).accepted == 5)
        #expect(try await fixture.store.store(try phBatch(device: "d2", sequences: 1...5), for: d2, receivedAt: testNow).accepted == 5)
    }

    @Test("a sensor registered with one quantity refuses readings declared with another, one by one")
    func sensorConflict() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        _ = try await fixture.store.store(try phBatch(sequences: 1...3), for: device, receivedAt: testNow)

        let ph = try sensorID("tank1.ph")
        let temp = try sensorID("tank1.temp")
        let time = Timestamp(microseconds: testNow.microseconds - 1_000_000)
        let batch = Batch(
            device: try deviceID("d1"),
            sensors: [SensorDescriptor(id: ph, quantity: .electricalConductivity), SensorDescriptor(id: temp, quantity: .temperature)],
            readings: [
                Reading(sensor: ph, sequence: 10, timestamp: time, value: 1200),
                Reading(sensor: temp, sequence: 11, timestamp: time, value: 21.5),
            ])
        let outcome = try await fixture.store.store(batch, for: device, receivedAt: testNow)
        #expect(outcome.accepted == 1)
        #expect(outcome.rejected.map(\.code) == [RejectionCode.sensorConflict])
        #expect(outcome.rejected.first?.sequence == 10)
        #expect(outcome.rejected.first?.message.contains("ph") == true)
    }

    @Test("latest moves only forward in time, whatever order batches arrive in")
    func latestOnlyForward() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        _ = try await fixture.store.store(try phBatch(sequences: 50...60, value: 7.0), for: device, receivedAt: testNow)
        // An older backlog arrives afterwards: latest must stay at sequence 60.
        _ = try await fixture.store.store(try phBatch(sequences: 1...49, value: 5.0), for: device, receivedAt: testNow)
        let latest = try await fixture.store.latestReadings(farmID: device.farmID)
        #expect(latest.count == 1)
        #expect(latest.first?.sequence == 60)
        #expect(latest.first?.value == 7.0)
        #expect(latest.first?.quantity == .ph)
    }

    @Test("readings come back in time order within [from, to) and up to the limit")
    func readingsRange() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let device = try await fixture.identity(device: "d1")
        let start = Timestamp(microseconds: testNow.microseconds - 3_600_000_000)
        // Sequences in reverse time order: the time order is not the sequence order.
        let sensor = try sensorID("tank1.ph")
        let readings = (1...20).map { i in
            Reading(sensor: sensor, sequence: UInt64(i), timestamp: Timestamp(microseconds: start.microseconds + Int64(21 - i) * 1_000_000), value: 6)
        }
        let batch = Batch(device: device.device, sensors: [SensorDescriptor(id: sensor, quantity: .ph)], readings: readings)
        _ = try await fixture.store.store(batch, for: device, receivedAt: testNow)

        guard let record = try await fixture.store.sensor(farmID: device.farmID, device: device.device, sensor: sensor) else {
            Issue.record("sensor not registered")
            return
        }
        let from = Timestamp(microseconds: start.microseconds + 5_000_000)
        let to = Timestamp(microseconds: start.microseconds + 10_000_000)
        let rows = try await fixture.store.readings(sensorRowID: record.rowID, from: from, to: to, limit: 100)
        #expect(rows.map(\.timestamp.microseconds) == (5..<10).map { start.microseconds + Int64($0) * 1_000_000 })
        #expect(rows.map(\.sequence) == [16, 15, 14, 13, 12])
        let limited = try await fixture.store.readings(sensorRowID: record.rowID, from: nil, to: nil, limit: 3)
        #expect(limited.map(\.sequence) == [20, 19, 18])
    }

    @Test("migrate is idempotent and the data survives reopening the file")
    func migrateAndReopen() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/nested/dir/ingest.sqlite"
        let store = try SQLiteIngestStore(path: path, logger: testLogger)
        #expect(try await store.migrate().map(\.version) == SQLiteSchema.migrations.map(\.version))
        #expect(try await store.migrate().isEmpty)
        _ = try await store.createFarm(name: "f1", createdAt: testNow)
        store.close()

        let reopened = try SQLiteIngestStore(path: path, logger: testLogger)
        defer { reopened.close() }
        #expect(try await reopened.migrate().isEmpty)
        #expect(try await reopened.farm(named: "f1")?.name == "f1")
        try await reopened.ping()

        // The file is in WAL mode with full synchronisation.
        let connection = try SQLiteConnection(path: path, mode: .readOnly)
        #expect(try connection.query("PRAGMA journal_mode").first?.first?.string == "wal")
    }

    @Test("a store that was never migrated is not ready")
    func unmigratedIsNotReady() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let store = try SQLiteIngestStore(path: directory.path + "/ingest.sqlite", logger: testLogger)
        defer { store.close() }
        await #expect(throws: (any Error).self) { try await store.ping() }
    }

    @Test("administration refuses duplicates and unknown farms with clear errors")
    func administrationErrors() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let admin = IngestAdmin(store: fixture.store)
        await #expect(throws: IngestStoreError.alreadyExists("farm 'f1'")) { _ = try await admin.createFarm(name: "f1") }
        await #expect(throws: IngestStoreError.alreadyExists("device 'd1' in farm 'f1'")) {
            _ = try await admin.createDevice(farm: "f1", device: try deviceID("d1"))
        }
        await #expect(throws: IngestStoreError.notFound("farm 'nope'")) { _ = try await admin.createDevice(farm: "nope", device: try deviceID("d1")) }
        await #expect(throws: IngestStoreError.notFound("device 'zz' in farm 'f1'")) { try await admin.revokeDevice(farm: "f1", device: try deviceID("zz")) }
        // An unknown farm is named, not an unknown device in it.
        await #expect(throws: IngestStoreError.notFound("farm 'nope'")) { try await admin.revokeDevice(farm: "nope", device: try deviceID("d1")) }
        await #expect(throws: IngestStoreError.notFound("farm 'nope'")) { _ = try await admin.rotateDeviceKey(farm: "nope", device: try deviceID("d1")) }
        await #expect(throws: IngestStoreError.notFound("farm 'nope'")) { _ = try await admin.createReadToken(farm: "nope", role: .viewer) }
        await #expect(throws: FarmNameError.self) { _ = try await admin.createFarm(name: "bad name") }
    }

    @Test("only the SHA-256 of a key's secret is stored")
    func onlyHashesStored() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let connection = try SQLiteConnection(path: fixture.store.path, mode: .readOnly)
        let stored = try connection.query("SELECT key_id, secret_sha256 FROM devices WHERE key_id = ?", [.text(fixture.deviceKey.keyID)])
        #expect(stored.count == 1)
        guard case .blob(let hash) = stored.first?[1] else {
            Issue.record("no hash stored")
            return
        }
        #expect(hash == fixture.deviceKey.secretHash)
        #expect(hash.count == 32)
        let dump = try connection.query("SELECT * FROM devices").flatMap { $0 }.compactMap(\.string)
        #expect(!dump.contains { $0.contains(fixture.deviceKey.secret) })
    }

    @Test("text is bound with its byte count: a NUL inside is stored and read back whole, not cut off there")
    func textWithNULIsBoundWhole() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let connection = try SQLiteConnection(path: directory.path + "/text.sqlite")
        try connection.execute("CREATE TABLE t (value TEXT NOT NULL)")
        for text in ["p\u{0}H", "\u{0}", "", "é\u{0}ü", String(repeating: "x", count: 100) + "\u{0}tail"] {
            try connection.execute("DELETE FROM t")
            _ = try connection.query("INSERT INTO t VALUES (?)", [.text(text)])
            let rows = try connection.query("SELECT value, length(CAST(value AS BLOB)) FROM t")
            #expect(rows.first?[0].string == text, "\(text.debugDescription)")
            #expect(rows.first?[1].int64 == Int64(text.utf8.count), "\(text.debugDescription)")
            // And found by it: the whole text is compared, not its part before the NUL.
            #expect(try connection.queryInt("SELECT count(*) FROM t WHERE value = ?", [.text(text)]) == 1)
        }
    }

    @Test("migration 19 makes alert_outbox again with AUTOINCREMENT: every row and column carried, indexes back, ids not reused")
    func outboxIdsAreNotReusedAfterMigration19() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/ingest.sqlite"
        let columns = "SELECT * FROM alert_outbox ORDER BY id"
        let indexes = "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'alert_outbox' AND sql IS NOT NULL ORDER BY name"
        let (before, indexesBefore) = try await runOffPool { () throws -> ([[SQLiteValue]], [[SQLiteValue]]) in
            let db = try sqliteIngestFile(at: path, migratedTo: 18)
            try db.execute(
                """
                INSERT INTO farms(id, name, created_at_us) VALUES (1, 'f1', 0);
                INSERT INTO alert_receivers(id, farm_id, name, kind, url, created_at_us) VALUES (1, 1, 'grower', 'webhook', 'http://127.0.0.1:9/', 0);
                INSERT INTO alert_outbox(farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, state, attempts,
                    next_attempt_at_us, claimed_by, claimed_until_us, last_error, created_at_us, delivered_at_us, last_attempt_at_us,
                    transitions, first_transition_at_us, coalesced_at_us, reached)
                VALUES (1, 1, 7, 70, 'k1', '{}', 'dead', 5, 10, NULL, NULL, 'HTTP 500', 1, NULL, 9, 1, NULL, NULL, 'a@example.net'),
                       (1, 1, 7, 71, 'k2', '{"a":1}', 'delivering', 1, 20, 'host:1', 99, NULL, 2, NULL, 19, 3, 15, 18, NULL),
                       (1, 1, 8, 80, 'k3', '{}', 'delivered', 1, 30, NULL, NULL, NULL, 3, 31, 30, 1, NULL, NULL, NULL);
                """)
            return (try db.query(columns), try db.query(indexes))
        }
        let store = try SQLiteIngestStore(path: path, logger: testLogger)
        defer { store.close() }
        #expect(try await store.migrate().map(\.version) == Array(19...SQLiteSchema.currentVersion))
        store.close()
        try await runOffPool {
            let db = try SQLiteConnection(path: path)
            #expect(try db.query(columns) == before)
            #expect(try db.query(indexes) == indexesBefore)
            #expect(try db.queryInt("SELECT count(*) FROM sqlite_master WHERE name = 'alert_outbox_v19'") == 0)
            // The newest row goes (retention, a removed receiver); the next one still gets a new id.
            try db.execute("DELETE FROM alert_outbox WHERE id = 3")
            try db.execute(
                """
                INSERT INTO alert_outbox(farm_id, receiver_id, alert_id, transition_id, idempotency_key, payload, next_attempt_at_us, created_at_us)
                VALUES (1, 1, 9, 90, 'k4', '{}', 0, 4)
                """)
            #expect(try db.queryInt("SELECT id FROM alert_outbox WHERE idempotency_key = 'k4'") == 4)
            #expect(try db.integrityProblems(quick: false).isEmpty)
        }
    }

    func storedSequences(_ fixture: Fixture, device: DeviceIdentity) async throws -> [UInt64] {
        var sequences: [UInt64] = []
        var after: UInt64?
        while true {
            let page = try await fixture.store.exportPage(device: device, afterSequence: after, limit: 7)
            guard let last = page.last else { break }
            sequences += page.map(\.sequence)
            after = last.sequence
        }
        return sequences
    }
}
