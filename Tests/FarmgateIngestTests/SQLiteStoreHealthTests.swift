import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Prometheus
import Testing

@testable import FarmgateIngest

/// What the SQLite store tells uploads and `/readyz` when it can answer queries but cannot store durably: its file was
/// removed or replaced under the running ingest (tester 18, F2: every upload was acknowledged into the unlinked file and
/// lost at the restart, nothing logged, `/readyz` 200), or its disk is full (F6: "cannot reach its store", `/readyz` 200).
@Suite("SQLite store health: removed file, full disk")
struct SQLiteStoreHealthTests {
    /// A store with farm `f1` and device `d1`, logging into `log`, and the app over it.
    struct Served {
        let directory: TemporaryDirectory
        let store: SQLiteIngestStore
        let key: APIKey
        let log = LogRecorder()

        var path: String { directory.path + "/ingest.sqlite" }

        init() async throws {
            directory = try TemporaryDirectory()
            store = try SQLiteIngestStore(path: directory.path + "/ingest.sqlite", logger: log.logger())
            try await store.migrate()
            let admin = IngestAdmin(store: store)
            _ = try await admin.createFarm(name: "f1")
            key = try await admin.createDevice(farm: "f1", device: try deviceID("d1"))
        }

        func app() -> some ApplicationProtocol {
            var configuration = IngestConfiguration()
            configuration.server.port = 0
            return buildApplication(
                configuration: configuration, store: store, registry: .init(), logger: testLogger, now: { testNow }, credentialCacheTTL: .zero)
        }

        func close() {
            store.close()
            directory.remove()
        }
    }

    @Test("with the store's files removed under it, uploads are 503 (not acknowledged), /readyz is 503, and one error says to restart")
    func filesRemoved() async throws {
        let served = try await Served()
        defer { served.close() }
        try await served.app().test(.router) { client in
            #expect(try await postJSON(client, try phBatch(sequences: 1...10), key: served.key).status == .ok)
            #expect(try await client.execute(uri: "/readyz", method: .get).status == .ok)
            for suffix in ["", "-wal", "-shm"] { try FileManager.default.removeItem(atPath: served.path + suffix) }

            // The first upload after the removal commits into the unlinked file, and is still not acknowledged; the next
            // ones are refused before anything is written.
            for sequences: ClosedRange<UInt64> in [11...20, 21...30] {
                let response = try await postJSON(client, try phBatch(sequences: sequences), key: served.key)
                let message = try expectError(response, .serviceUnavailable, IngestErrorCode.unavailable)
                #expect(message.contains("store file was removed or replaced") && message.contains("restart"), "\(message)")
                #expect(response.headers[.retryAfter] != nil)
            }
            let ready = try await client.execute(uri: "/readyz", method: .get)
            let readiness = try expectError(ready, .serviceUnavailable, "not_ready")
            #expect(readiness.contains("removed or replaced") && readiness.contains("\(served.path) no longer exists"), "\(readiness)")
        }
        let errors = served.log.all.filter { $0.hasPrefix("error") }
        #expect(errors.count == 1, "\(errors)")
        #expect(errors.first?.contains("the SQLite store file was removed or replaced under the running ingest; restart farmgate-ingest serve") == true)
        #expect(errors.first?.contains("is lost when serve stops") == true, "\(errors)")
    }

    @Test("a file moved into the store's place, or its WAL removed, is found at the next commit, which is not acknowledged")
    func fileReplacedOrWALRemoved() async throws {
        for replace in [true, false] {
            let served = try await Served()
            defer { served.close() }
            let device = try await identity(served.store)
            _ = try await served.store.store(try phBatch(sequences: 1...10), for: device, receivedAt: testNow)
            if replace {
                // A copy moved over the path (a restore): the same bytes, another inode.
                try FileManager.default.copyItem(atPath: served.path, toPath: served.path + ".copy")
                #expect(rename(served.path + ".copy", served.path) == 0)
            } else {
                try FileManager.default.removeItem(atPath: served.path + "-wal")
            }
            await #expect {
                _ = try await served.store.store(try phBatch(sequences: 11...20), for: device, receivedAt: testNow)
            } throws: { error in
                "\(error)".contains("the store file was removed or replaced while the ingest ran")
                    && "\(error)".contains(replace ? "\(served.path) is now another file" : "-wal no longer exists")
            }
            await #expect(throws: SQLiteIngestStoreError.self) { try await served.store.ping() }
        }
    }

    @Test("an admin command's store opened and closed beside the running one, and many commits, do not look like a removed file")
    func noFalseAlarm() async throws {
        let served = try await Served()
        defer { served.close() }
        let device = try await identity(served.store)
        for start in stride(from: UInt64(1), to: 2_000, by: 100) {
            _ = try await served.store.store(try phBatch(sequences: start...(start + 99)), for: device, receivedAt: testNow)
            if start % 500 == 1 {
                // As `farmgate-ingest device list` beside `serve`: its close must not remove the WAL serve has open.
                let command = try SQLiteIngestStore(path: served.path, logger: testLogger)
                try await command.migrate()
                _ = try await command.farms()
                command.close()
            }
        }
        try await served.store.ping()
        #expect(try await served.store.highestSequence(device: device) == 2_000)
        #expect(served.log.all.filter { $0.hasPrefix("error") }.isEmpty, "\(served.log.all)")
    }

    @Test("a commit that fails for a full disk is 503 saying so, /readyz is 503 until a commit succeeds, then 200")
    func diskFull() async throws {
        let served = try await Served()
        defer { served.close() }
        try await served.app().test(.router) { client in
            #expect(try await postJSON(client, try phBatch(sequences: 1...10), key: served.key).status == .ok)
            // SQLite's own page limit gives the SQLITE_FULL a full disk gives: no page can be added to the file.
            try await served.store.writer.withValue { db in
                let pages = try db.connection.queryInt("PRAGMA page_count") ?? 1
                try db.connection.execute("PRAGMA max_page_count = \(pages)")
            }
            let refused = try await postJSON(client, try phBatch(sequences: 11...3_000), key: served.key)
            let message = try expectError(refused, .serviceUnavailable, IngestErrorCode.unavailable)
            #expect(message.contains("the store's disk is full (SQLITE_FULL)") && !message.contains("cannot reach"), "\(message)")
            let ready = try await client.execute(uri: "/readyz", method: .get)
            let readiness = try expectError(ready, .serviceUnavailable, "not_ready")
            #expect(readiness.contains("disk of the store \(served.path) is full"), "\(readiness)")
            // Still 503 on the next probe: the flag is the last commit's, not the probe's.
            #expect(try await client.execute(uri: "/readyz", method: .get).status == .serviceUnavailable)

            try await served.store.writer.withValue { db in try db.connection.execute("PRAGMA max_page_count = 1073741823") }
            #expect(try await postJSON(client, try phBatch(sequences: 11...3_000), key: served.key).status == .ok)
            #expect(try await client.execute(uri: "/readyz", method: .get).status == .ok)
        }
    }

    func identity(_ store: SQLiteIngestStore) async throws -> DeviceIdentity {
        let farm = try #require(try await store.farm(named: "f1"))
        return try #require(try await store.devices(farmID: farm.id).first)
    }
}
