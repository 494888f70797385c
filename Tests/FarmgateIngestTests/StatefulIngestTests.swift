import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Prometheus
import Testing

@testable import FarmgateIngest

/// Stateful frames (format version 4) through the real router and SQLite store: tables declared once and kept in the
/// store, contexts checked against the store's newest readings, the 409 answers and compact receipts.
@Suite("Ingest: stateful frames (format version 4)")
struct StatefulIngestTests {
    /// A three-sensor site's readings: `count` readings from `first`, every sensor every 10 s, noisy values.
    static func readings(from first: UInt64, count: Int) throws -> [Reading] {
        let ids = try ["tank1.ec", "tank1.ph", "tank1.temp"].map(sensorID)
        let start = testNow.microseconds - 3_600_000_000
        return (0..<count).map { k in
            let sequence = first + UInt64(k)
            let sensor = Int(sequence % 3)
            let tick = Int64(sequence / 3)
            let value = [1500 + Double(tick % 7), 6.0 + Double(tick % 5) / 100, 21.0 + Double(tick % 3) / 16][sensor]
            return Reading(
                sensor: ids[sensor], sequence: sequence, timestamp: Timestamp(microseconds: start + tick * 10_000_000 + Int64(sensor) * 3_000 + Int64(tick % 3)),
                value: value)
        }
    }

    static func table() throws -> SensorTable {
        try SensorTable([
            SensorDescriptor(id: try sensorID("tank1.ec"), quantity: .electricalConductivity, resolution: try Resolution(numerator: 1, denominator: 10)),
            SensorDescriptor(id: try sensorID("tank1.ph"), quantity: .ph),
            SensorDescriptor(id: try sensorID("tank1.temp"), quantity: .temperature, resolution: try Resolution(numerator: 1, denominator: 16)),
        ])
    }

    /// What the agent sends to an ingest that reads version 4: the key in Farmgate-Key, the compact receipt accepted.
    static func headers(_ key: APIKey) -> HTTPFields {
        var headers: HTTPFields = [:]
        headers[HTTPField.Name(IngestProtocol.deviceKeyHeader)!] = key.text
        headers[.contentType] = IngestProtocol.binaryBatchMediaType
        headers[.accept] = "\(IngestProtocol.compactReceiptMediaType), application/json"
        return headers
    }

    /// Posts `frame`; returns the response.
    static func post(_ client: some TestClientProtocol, _ frame: StatefulFrame, key: APIKey) async throws -> TestResponse {
        try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers(key), body: buffer(frame.bytes))
    }

    /// The compact receipt of `response`, which must be one.
    static func compactReceipt(_ response: TestResponse, sourceLocation: SourceLocation = #_sourceLocation) throws -> IngestReceipt {
        #expect(response.status == .ok, sourceLocation: sourceLocation)
        #expect(response.headers[.contentType] == IngestProtocol.compactReceiptMediaType, sourceLocation: sourceLocation)
        return try #require(IngestReceipt(compact: Array(response.body.readableBytesView)), sourceLocation: sourceLocation)
    }

    /// Every stored reading of d1, by sequence.
    static func stored(_ fixture: Fixture) async throws -> [UInt64: ExportRow] {
        let device = try await fixture.identity(device: "d1")
        var all: [UInt64: ExportRow] = [:]
        var after: UInt64?
        while true {
            let page = try await fixture.store.exportPage(device: device, afterSequence: after, limit: 500)
            guard let last = page.last else { return all }
            for row in page { all[row.sequence] = row }
            after = last.sequence
        }
    }

    @Test("GET /v1/device lists version 4; the first frame declares the table, later ones name it and predict; every reading stored once, answered in a few bytes")
    func liveSite() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let table = try Self.table()
        try await fixture.app().test(.router) { client in
            let state = try decode(DeviceState.self, try await client.execute(uri: IngestProtocol.deviceStatePath, method: .get, headers: bearer(fixture.deviceKey)))
            #expect(state.acceptedVersions == [2, 3, 4])
            var session = WireSession()
            var sent: [Reading] = []
            for round in 0..<6 {
                let readings = try Self.readings(from: UInt64(1 + round * 30), count: 30)
                let frame = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: readings), table: table)
                #expect(frame.declaredTable == (round == 0))
                #expect(frame.usedContext == (round > 0))
                let response = try await Self.post(client, frame, key: fixture.deviceKey)
                #expect(response.body.readableBytes <= 3, "a receipt without rejections costs a few bytes")
                let receipt = try Self.compactReceipt(response)
                #expect(receipt.accepted == 30 && receipt.duplicates == 0)
                session.delivered(frame, acknowledged: readings)
                sent += readings
            }
            // Without the compact type in Accept the receipt is JSON, as before.
            let json = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey),
                body: buffer(try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: try Self.readings(from: 181, count: 9)), table: table).bytes))
            #expect(try decode(IngestReceipt.self, json).accepted == 9)
        }
        let stored = try await Self.stored(fixture)
        let want = try Self.readings(from: 1, count: 189)
        #expect(stored.count == want.count)
        let resolutions = Dictionary(uniqueKeysWithValues: try Self.table().sensors.map { ($0.id, $0.resolution) })
        for reading in want {
            let got = stored[reading.sequence]
            #expect(got?.sensor == reading.sensor && got?.timestamp == reading.timestamp, "seq \(reading.sequence)")
            #expect(got.flatMap { resolutions[reading.sensor]?.quantize($0.value) } == resolutions[reading.sensor]?.quantize(reading.value), "seq \(reading.sequence)")
        }
    }

    @Test("a table never declared is 409 unknown_sensor_table; a declared one is kept in the store, so another instance on the same store decodes frames that name it")
    func tables() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let table = try Self.table()
        let first = try Self.readings(from: 1, count: 30)
        // A sender that believes the table known (as after an ingest whose store was replaced).
        var believing = WireSession()
        let declaring = try believing.encode(Batch(device: try deviceID("d1"), sensors: [], readings: []), table: table)
        believing.delivered(declaring, acknowledged: [])
        let believer = believing
        let session = try await fixture.app().test(.router) { client in
            let undeclared = try believer.encode(Batch(device: try deviceID("d1"), sensors: [], readings: first), table: table)
            #expect(!undeclared.declaredTable)
            let message = try expectError(try await Self.post(client, undeclared, key: fixture.deviceKey), .conflict, IngestErrorCode.unknownSensorTable)
            #expect(message.contains("declared"))
            var session = WireSession()
            let frame = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: first), table: table)
            #expect(try Self.compactReceipt(try await Self.post(client, frame, key: fixture.deviceKey)).accepted == 30)
            session.delivered(frame, acknowledged: first)
            // Another device of the farm cannot use d1's table.
            let otherDevice = try believer.encode(Batch(device: try deviceID("d2"), sensors: [], readings: []), table: table)
            _ = try expectError(try await Self.post(client, otherDevice, key: fixture.secondDeviceKey), .conflict, IngestErrorCode.unknownSensorTable)
            return session
        }
        // A second instance (its own memory) on the same store: the table comes from the store, the context too.
        try await fixture.app().test(.router) { client in
            let next = try Self.readings(from: 31, count: 30)
            let frame = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: next), table: table)
            #expect(!frame.declaredTable && frame.usedContext)
            #expect(try Self.compactReceipt(try await Self.post(client, frame, key: fixture.deviceKey)).accepted == 30)
        }
    }

    @Test("a declared table of more sensors than [limits] sensors_per_device is 422 sensor_table_too_large and is not kept; one within it is")
    func tablesAreBoundedBySensorsPerDevice() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var limits = IngestConfiguration.Limits()
        limits.sensorsPerDevice = 50
        let descriptors = try (0..<51).map { SensorDescriptor(id: try sensorID("s\($0)"), quantity: .ph) }
        let (tooLarge, fits) = (try SensorTable(descriptors), try SensorTable(Array(descriptors.prefix(50))))
        try await fixture.app(limits: limits).test(.router) { client in
            let large = try WireSession().encode(Batch(device: try deviceID("d1"), sensors: [], readings: []), table: tooLarge)
            let message = try expectError(try await Self.post(client, large, key: fixture.deviceKey), .unprocessableContent, IngestErrorCode.sensorTableTooLarge)
            #expect(message.contains("51 sensors") && message.contains("sensors_per_device"), "\(message)")
            // Not kept: a frame naming it is refused as unknown.
            var believing = WireSession()
            believing.delivered(large, acknowledged: [])
            let naming = try believing.encode(Batch(device: try deviceID("d1"), sensors: [], readings: []), table: tooLarge)
            _ = try expectError(try await Self.post(client, naming, key: fixture.deviceKey), .conflict, IngestErrorCode.unknownSensorTable)
            let within = try WireSession().encode(Batch(device: try deviceID("d1"), sensors: [], readings: []), table: fits)
            #expect(try await Self.post(client, within, key: fixture.deviceKey).status == .ok)
        }
    }

    @Test("a declared table with a sensor coarser than its quantity allows is malformed_batch and is not kept")
    func coarseTableRefused() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let coarse = try SensorTable([SensorDescriptor(id: try sensorID("tank1.ph"), quantity: .ph, resolution: try Resolution(parsing: "5"))])
        try await fixture.app().test(.router) { client in
            var session = WireSession()
            let readings = [Reading(sensor: try sensorID("tank1.ph"), sequence: 1, timestamp: Timestamp(microseconds: testNow.microseconds - 60_000_000), value: 5)]
            let frame = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: readings), table: coarse)
            try expectError(try await Self.post(client, frame, key: fixture.deviceKey), .badRequest, IngestErrorCode.malformedBatch)
            // The table was not kept: a frame naming it is 409 unknown_sensor_table.
            session.delivered(frame, acknowledged: [])
            let named = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: readings), table: coarse)
            #expect(!named.declaredTable)
            try expectError(try await Self.post(client, named, key: fixture.deviceKey), .conflict, IngestErrorCode.unknownSensorTable)
        }
        #expect(try await Self.stored(fixture).isEmpty)
    }

    @Test("a frame that declares a table and then fails to decode leaves no table behind: a frame naming it is 409 unknown_sensor_table")
    func failedFrameKeepsNoTable() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let table = try Self.table()
        // The head (with the table) decodes; the readings do not: more than max_readings_per_batch.
        let tooMany = try WireSession().encode(Batch(device: try deviceID("d1"), sensors: [], readings: try Self.readings(from: 1, count: 30)), table: table)
        #expect(tooMany.declaredTable)
        var believing = WireSession()
        believing.delivered(tooMany, acknowledged: [])
        let named = try believing.encode(Batch(device: try deviceID("d1"), sensors: [], readings: try Self.readings(from: 1, count: 6)), table: table)
        #expect(!named.declaredTable)
        try await fixture.app(limits: IngestConfiguration.Limits(maxReadingsPerBatch: 10)).test(.router) { client in
            try expectError(try await Self.post(client, tooMany, key: fixture.deviceKey), .contentTooLarge, IngestErrorCode.tooManyReadings)
            let d1 = try await fixture.identity(device: "d1")
            #expect(try await fixture.store.sensorTable(deviceRowID: d1.rowID, hash: table.hash) == nil)
            // Neither memory nor the store holds it.
            try expectError(try await Self.post(client, named, key: fixture.deviceKey), .conflict, IngestErrorCode.unknownSensorTable)
            // Declared in a frame that decodes, it is kept, and named frames decode against it.
            let declaring = try WireSession().encode(Batch(device: try deviceID("d1"), sensors: [], readings: try Self.readings(from: 1, count: 6)), table: table)
            #expect(try Self.compactReceipt(try await Self.post(client, declaring, key: fixture.deviceKey)).accepted == 6)
            #expect(try await fixture.store.sensorTable(deviceRowID: d1.rowID, hash: table.hash) == table.encoded)
            #expect(try Self.compactReceipt(try await Self.post(client, named, key: fixture.deviceKey)).duplicates == 6)
        }
    }

    @Test("a context other than the ingest's is 409 stale_context with the ingest's newest readings; against those the same readings are stored")
    func staleContext() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let table = try Self.table()
        try await fixture.app().test(.router) { client in
            var session = WireSession()
            let first = try Self.readings(from: 1, count: 30)
            let frame = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: first), table: table)
            _ = try Self.compactReceipt(try await Self.post(client, frame, key: fixture.deviceKey))
            // The answer is lost: the session saw only the first three acknowledged (an older answer), then sends the
            // readings again with the next ones, predicting from those three.
            let again = first + (try Self.readings(from: 31, count: 30))
            session.delivered(frame, acknowledged: Array(first.prefix(3)))
            let stale = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: again), table: table)
            #expect(stale.usedContext)
            let response = try await Self.post(client, stale, key: fixture.deviceKey)
            try expectError(response, .conflict, IngestErrorCode.staleContext)
            let context = try #require(try decode(APIErrorBody.self, response).error.context)
            #expect(Set(context.map(\.sensor)) == ["tank1.ec", "tank1.ph", "tank1.temp"])
            #expect(context.map(\.sequence).max() == 30)
            let resend = session.refused(code: IngestErrorCode.staleContext, ingestContext: context)
            #expect(resend)
            let resent = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: again), table: table)
            let receipt = try Self.compactReceipt(try await Self.post(client, resent, key: fixture.deviceKey))
            #expect(receipt.accepted == 30 && receipt.duplicates == 30)
        }
        #expect(try await Self.stored(fixture).count == 60)
    }

    @Test("a frame sent again after its answer was lost decodes against the context before it (its readings duplicates), a third time too; one from two commits back is 409 stale_context")
    func resentFrame() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let table = try Self.table()
        let device = try deviceID("d1")
        try await fixture.app().test(.router) { client in
            var session = WireSession()
            let first = try Self.readings(from: 1, count: 30)
            let opening = try session.encode(Batch(device: device, sensors: [], readings: first), table: table)
            _ = try Self.compactReceipt(try await Self.post(client, opening, key: fixture.deviceKey))
            session.delivered(opening, acknowledged: first)
            let second = try Self.readings(from: 31, count: 30)
            let frame = try session.encode(Batch(device: device, sensors: [], readings: second), table: table)
            #expect(frame.usedContext)
            let stored = try Self.compactReceipt(try await Self.post(client, frame, key: fixture.deviceKey))
            #expect(stored.accepted == 30 && stored.duplicates == 0)
            // Its answer is lost: the same bytes again (as libcurl resends on a new connection), and once more.
            for _ in 0..<2 {
                let again = try Self.compactReceipt(try await Self.post(client, frame, key: fixture.deviceKey))
                #expect(again.accepted == 0 && again.duplicates == 30)
            }
            session.delivered(frame, acknowledged: second)
            let third = try session.encode(Batch(device: device, sensors: [], readings: try Self.readings(from: 61, count: 30)), table: table)
            _ = try Self.compactReceipt(try await Self.post(client, third, key: fixture.deviceKey))
            // Only the context before the last commit is kept: the second frame now predicts from one two commits back.
            try expectError(try await Self.post(client, frame, key: fixture.deviceKey), .conflict, IngestErrorCode.staleContext)
        }
        #expect(try await Self.stored(fixture).count == 90)
    }

    @Test("another instance's commits: memory that missed them is reloaded from the store before a frame is refused")
    func otherInstance() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let table = try Self.table()
        let device = try deviceID("d1")
        let instanceA = fixture.app()
        let instanceB = fixture.app()
        func send(_ app: some ApplicationProtocol, _ session: WireSession, _ readings: [Reading]) async throws -> WireSession {
            try await app.test(.router) { client in
                var session = session
                let frame = try session.encode(Batch(device: device, sensors: [], readings: readings), table: table)
                let receipt = try Self.compactReceipt(try await Self.post(client, frame, key: fixture.deviceKey))
                #expect(receipt.accepted == readings.count)
                session.delivered(frame, acknowledged: readings)
                return session
            }
        }
        // B learns the table and context, A stores the next batches, then B gets one again: its memory is stale.
        var session = try await send(instanceB, WireSession(), try Self.readings(from: 1, count: 30))
        session = try await send(instanceA, session, try Self.readings(from: 31, count: 30))
        session = try await send(instanceA, session, try Self.readings(from: 61, count: 30))
        session = try await send(instanceB, session, try Self.readings(from: 91, count: 30))
        _ = try await send(instanceA, session, try Self.readings(from: 121, count: 30))
        #expect(try await Self.stored(fixture).count == 150)
    }

    @Test("readings the validator refuses come back in a JSON receipt that names them, and do not enter the context")
    func rejections() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let table = try Self.table()
        try await fixture.app().test(.router) { client in
            var session = WireSession()
            var readings = try Self.readings(from: 1, count: 30)
            readings[29].timestamp = Timestamp(microseconds: testNow.microseconds + 86_400_000_000)
            let frame = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: readings), table: table)
            let response = try await Self.post(client, frame, key: fixture.deviceKey)
            #expect(response.status == .ok)
            #expect(response.headers[.contentType]?.hasPrefix("application/json") == true)
            let receipt = try decode(IngestReceipt.self, response)
            #expect(receipt.accepted == 29 && receipt.rejection(of: 30)?.code == RejectionCode.timestampInFuture)
            session.delivered(frame, acknowledged: readings.prefix(29))
            let next = try session.encode(Batch(device: try deviceID("d1"), sensors: [], readings: try Self.readings(from: 31, count: 30)), table: table)
            #expect(next.usedContext)
            #expect(try Self.compactReceipt(try await Self.post(client, next, key: fixture.deviceKey)).accepted == 30)
        }
    }

    @Test("the device key in Farmgate-Key: a device key works, a read token or garbage is 401, Authorization wins when both are sent")
    func keyHeader() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let body = buffer(try BatchCodec.encode(try phBatch(sequences: 1...3)))
        let keyField = HTTPField.Name(IngestProtocol.deviceKeyHeader)!
        try await fixture.app().test(.router) { client in
            var headers: HTTPFields = [.contentType: IngestProtocol.binaryBatchMediaType]
            headers[keyField] = fixture.deviceKey.text
            #expect(try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: body).status == .ok)
            headers[keyField] = fixture.readToken.text
            _ = try expectError(
                try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: body), .unauthorized, "unauthorized")
            headers[keyField] = "fgd_nonsense"
            _ = try expectError(
                try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: body), .unauthorized, "unauthorized")
            // Authorization wins: a good Farmgate-Key does not rescue a wrong bearer key.
            headers[keyField] = fixture.deviceKey.text
            headers[.authorization] = "Bearer \(fixture.secondDeviceKey.text)"
            _ = try expectError(
                try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: body), .forbidden,
                IngestErrorCode.deviceMismatch)
            // Reads take read tokens in Authorization only.
            var read: HTTPFields = [:]
            read[keyField] = fixture.readToken.text
            _ = try expectError(try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: read), .unauthorized, "unauthorized")
        }
    }

    @Test("hostile version 4 frames: cut short they are 400, mutated never a 5xx")
    func hostile() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let table = try Self.table()
        let frame = try WireSession().encode(Batch(device: try deviceID("d1"), sensors: [], readings: try Self.readings(from: 1, count: 60)), table: table, compressionLevel: 3)
        try await fixture.app().test(.router) { client in
            var rng = SystemRandomNumberGenerator()
            for cut in stride(from: 5, to: frame.bytes.count, by: max(1, frame.bytes.count / 25)) {
                let response = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: Self.headers(fixture.deviceKey), body: buffer(Array(frame.bytes[..<cut])))
                #expect(response.status == .badRequest, "cut at \(cut)")
            }
            for _ in 0..<40 {
                var mutated = frame.bytes
                mutated[Int.random(in: 5..<mutated.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
                let response = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: Self.headers(fixture.deviceKey), body: buffer(mutated))
                #expect(response.status.code < 500)
            }
        }
    }
}
