import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Testing

@testable import FarmgateIngest

/// The ingest's side of the delivery contract: whole-request errors only for whole-request causes, each with its own
/// code; sequence conflicts; `GET /v1/device`; readings from unsynchronised clocks; answers never much larger than requests.
@Suite("Delivery contract over HTTP")
struct DeliveryContractTests {
    static func post(_ client: some TestClientProtocol, _ body: [UInt8], headers: HTTPFields) async throws -> HummingbirdTesting.TestResponse {
        try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: buffer(body))
    }

    @Test("a binary batch of an unknown format version is 415 unsupported_format_version with accepted_versions [2, 3, 4]")
    func unsupportedVersion() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var newer = try BatchCodec.encode(try phBatch(sequences: 1...10))
        newer[3] = 5
        let frame = newer
        try await fixture.app().test(.router) { client in
            let response = try await Self.post(client, frame, headers: binaryHeaders(fixture.deviceKey))
            let message = try expectError(response, .unsupportedMediaType, IngestErrorCode.unsupportedFormatVersion)
            #expect(try decode(APIErrorBody.self, response).error.acceptedVersions == [2, 3, 4])
            #expect(message.contains("version 5"))
            #expect(message.contains("reads version 2, 3, 4"))
            #expect(message.contains("JSON"))
        }
    }

    @Test("a body that ends early is 400 incomplete_body: binary frame, zstd inside it, JSON text, gzip and zstd encodings")
    func truncatedBodies() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let frame = try BatchCodec.encode(try phBatch(sequences: 1...200))
        let json = BatchJSON.encode(try phBatch(sequences: 1...200))
        try await fixture.app().test(.router) { client in
            let cases: [(String, [UInt8], HTTPFields)] = [
                ("binary frame cut in its header", Array(frame.prefix(4)), binaryHeaders(fixture.deviceKey)),
                ("binary frame cut inside its zstd frames", Array(frame.prefix(frame.count / 2)), binaryHeaders(fixture.deviceKey)),
                ("JSON cut in the middle", Array(json.prefix(json.count / 2)), jsonHeaders(fixture.deviceKey)),
                ("JSON cut inside a string", Array(json.prefix(12)), jsonHeaders(fixture.deviceKey)),
                ("gzip cut short", Array(Gzip.compress(json).dropLast(20)), jsonHeaders(fixture.deviceKey, encoding: "gzip")),
                ("zstd cut short", Array(Zstd.compress(json).prefix(40)), jsonHeaders(fixture.deviceKey, encoding: "zstd")),
            ]
            for (name, body, headers) in cases {
                let response = try await Self.post(client, body, headers: headers)
                #expect(response.status == .badRequest, "\(name)")
                let error = try decode(APIErrorBody.self, response).error
                #expect(error.code == IngestErrorCode.incompleteBody, "\(name): \(error.message)")
                #expect(error.message.contains("send it again"), "\(name)")
            }
            // Complete bytes that are not a batch stay malformed (never retried as transient).
            let complete: [(String, [UInt8], HTTPFields)] = [
                // An empty body arrived whole (a cut before the first byte of a declared length is the HTTP layer's).
                ("empty binary body", [], binaryHeaders(fixture.deviceKey)),
                ("JSON with trailing garbage", json + Array(" x".utf8), jsonHeaders(fixture.deviceKey)),
                ("not a frame", Array("garbage!".utf8), binaryHeaders(fixture.deviceKey)),
                ("a frame with a corrupt zstd body", Array(frame.prefix(5)) + Array(repeating: 0x41, count: 64), binaryHeaders(fixture.deviceKey)),
            ]
            for (name, body, headers) in complete {
                try expectError(try await Self.post(client, body, headers: headers), .badRequest, IngestErrorCode.malformedBatch)
                _ = name
            }
        }
    }

    /// How a test cuts or breaks a request's body; each leaves the ingest with nothing to store.
    enum BodyBreak: String, CaseIterable, CustomTestStringConvertible {
        /// Half the declared body, then the sending side closed.
        case half
        /// A whole batch and two more bytes declared, the connection closed before those two.
        case wholeBatchShortOfLength
        /// Chunked: a whole batch in one chunk, then a chunk-size line that is not hexadecimal.
        case badChunkSize
        /// Chunked: a whole batch in one chunk, then bytes where the chunk's CRLF belongs.
        case bytesAfterChunk
        /// Chunked: a whole batch in one chunk, then the sending side closed without the last chunk.
        case noLastChunk

        var testDescription: String { rawValue }

        func request(_ json: [UInt8], key: String) -> [UInt8] {
            let start = "POST \(IngestProtocol.batchesPath) HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\n"
            let chunk = Array((start + "Transfer-Encoding: chunked\r\n\r\n" + String(json.count, radix: 16) + "\r\n").utf8) + json
            switch self {
            case .half: return Array((start + "Content-Length: \(json.count)\r\n\r\n").utf8) + json.prefix(json.count / 2)
            case .wholeBatchShortOfLength: return Array((start + "Content-Length: \(json.count + 2)\r\n\r\n").utf8) + json
            case .badChunkSize: return chunk + Array("\r\nZZ\r\n".utf8)
            case .bytesAfterChunk: return chunk + Array("XX".utf8)
            case .noLastChunk: return chunk + Array("\r\n".utf8)
            }
        }
    }

    // A tester, 2026-12-07: a body broken after a whole batch had arrived was stored, and the client told 400, because
    // the application's body stream just ended when the connection closed.
    @Test("a body cut in transit or broken partway is answered 400 and nothing of it is stored, even when a whole batch arrived", arguments: BodyBreak.allCases)
    func bodyCutInTransit(cut: BodyBreak) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let json = BatchJSON.encode(try phBatch(sequences: 1...50))
        let request = cut.request(json, key: fixture.deviceKey.text)
        try await fixture.app().test(.live) { client in
            let port = try #require(client.port)
            // Send, close the sending side, read the answer: plain blocking socket calls, off the concurrency pool.
            let answer = try await runOffPool(name: "test-raw-http") { () throws -> (status: Int, head: String, body: [UInt8])? in
                let connection = try RawConnection(port: port)
                _ = connection.send(request)
                shutdown(connection.fd, Int32(SHUT_WR))
                return connection.readResponse(timeout: .seconds(10))
            }
            let response = try #require(answer, "no answer")
            let body = String(decoding: response.body, as: UTF8.self)
            #expect(response.status == 400, "\(response.head)\(body)")
            if [.half, .wholeBatchShortOfLength, .noLastChunk].contains(cut) { #expect(body.contains(#""code":"incomplete_body""#), "\(body)") }
            // The application's store call, if one were made, runs beside the answer: give it the time to.
            try await Task.sleep(for: .milliseconds(300))
        }
        // Nothing of the cut batch was stored.
        #expect(try await fixture.store.highestSequence(device: try await fixture.identity(device: "d1")) == nil)
    }

    // A tester, 2026-12-07: a batch and a request the parser refuses, sent in one write, got the refusal alone: the
    // batch was stored and its answer never came, so the client took the refusal for the batch's answer.
    @Test("a refused request pipelined behind whole ones is answered after their answers, in order, then the connection closed")
    func refusalAfterPipelinedRequests() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let json = BatchJSON.encode(try phBatch(sequences: 1...5))
        let key = fixture.deviceKey.text
        let post = Array(
            "POST \(IngestProtocol.batchesPath) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\nContent-Length: \(json.count)\r\n\r\n".utf8) + json
        // A batch, a good request, one without Host; then a POST without any framing whose JSON follows as if it were
        // the next request (the parser refuses its first bytes as a method).
        let pipelined = post + Array("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n".utf8)
        let unframed =
            Array("POST \(IngestProtocol.batchesPath) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\n\r\n".utf8) + json
        try await fixture.app().test(.live) { client in
            let port = try #require(client.port)
            let (first, second) = try await runOffPool(name: "test-raw-http") { () throws -> ([(status: Int, head: String, body: [UInt8])], [(status: Int, head: String, body: [UInt8])]) in
                let one = try RawConnection(port: port)
                _ = one.send(pipelined)
                let first = one.readResponses(3, timeout: .seconds(10))
                let oneClosed = one.readUntilClosed(timeout: .seconds(5)).closed
                let two = try RawConnection(port: port)
                _ = two.send(unframed)
                let second = two.readResponses(2, timeout: .seconds(10))
                return (oneClosed ? first : [], second)
            }
            #expect(first.map(\.status) == [200, 200, 400], "\(first.map(\.head)); closed after?")
            let batchAnswer = String(decoding: first.first?.body ?? [], as: UTF8.self)
            let refusal = String(decoding: first.last?.body ?? [], as: UTF8.self)
            #expect(batchAnswer.contains(#""accepted":5"#), "\(batchAnswer)")
            #expect(refusal.contains("needs a Host header"), "\(refusal)")
            #expect(second.map(\.status) == [400, 501], "\(second.map { $0.head + String(decoding: $0.body, as: UTF8.self) })")
        }
        #expect(try await fixture.store.highestSequence(device: try await fixture.identity(device: "d1")) == 5)
    }

    @Test("the issue's reproduction: seq 1 with 6.02, then seq 1 with 7.31, is a sequence_conflict, never a duplicate")
    func sequenceConflict() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        @Sendable func body(_ value: String) -> [UInt8] {
            Array(
                """
                {"device":"d1","sensors":[{"id":"tank9.ph","quantity":"ph"}],
                 "readings":[{"sensor":"tank9.ph","seq":1,"ts":"2025-12-31T23:00:00Z","value":\(value)}]}
                """.utf8)
        }
        try await fixture.app().test(.router) { client in
            let first = try decode(IngestReceipt.self, try await Self.post(client, body("6.02"), headers: jsonHeaders(fixture.deviceKey)))
            #expect(first.accepted == 1)
            let again = try decode(IngestReceipt.self, try await Self.post(client, body("6.020"), headers: jsonHeaders(fixture.deviceKey)))
            #expect(again == IngestReceipt(accepted: 0, duplicates: 1, rejected: []))
            let second = try decode(IngestReceipt.self, try await Self.post(client, body("7.31"), headers: jsonHeaders(fixture.deviceKey)))
            #expect(second.accepted == 0)
            #expect(second.duplicates == 0)
            #expect(second.rejectedCount == 1)
            let group = try #require(second.rejection(of: 1))
            #expect(group.code == RejectionCode.sequenceConflict)
            #expect(group.message.contains("stored 6.02, sent 7.31"))
        }
    }

    @Test("GET /v1/device answers the highest stored sequence to the device's own key; revoked and other keys are 401")
    func deviceState() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            let empty = try await client.execute(uri: IngestProtocol.deviceStatePath, method: .get, headers: bearer(fixture.deviceKey))
            #expect(empty.status == .ok)
            #expect(String(buffer: empty.body) == #"{"accepted_versions":[2,3,4],"device":"d1","highest_sequence":null}"#)

            _ = try await postJSON(client, try phBatch(sequences: [3, 1_000, 17]), key: fixture.deviceKey)
            _ = try await postJSON(client, try phBatch(device: "d2", sequences: [5_000]), key: fixture.secondDeviceKey)
            let state = try decode(
                DeviceState.self, try await client.execute(uri: IngestProtocol.deviceStatePath, method: .get, headers: bearer(fixture.deviceKey)))
            #expect(state == DeviceState(device: "d1", highestSequence: 1_000, acceptedVersions: [2, 3, 4]))

            try expectError(try await client.execute(uri: IngestProtocol.deviceStatePath, method: .get), .unauthorized, "unauthorized")
            try expectError(
                try await client.execute(uri: IngestProtocol.deviceStatePath, method: .get, headers: bearer(fixture.readToken)), .unauthorized,
                "unauthorized")
            try await IngestAdmin(store: fixture.store).revokeDevice(farm: "f1", device: try deviceID("d1"))
            try expectError(
                try await client.execute(uri: IngestProtocol.deviceStatePath, method: .get, headers: bearer(fixture.deviceKey)), .unauthorized,
                "revoked")
        }
    }

    @Test("readings flagged clock_unsynchronized are taken while plausible; others keep future_tolerance")
    func unsynchronizedClock() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let ph = try sensorID("tank1.ph")
        let day: Int64 = 86_400_000_000
        func reading(_ sequence: UInt64, _ offset: Int64, unsynchronized: Bool) -> Reading {
            Reading(
                sensor: ph, sequence: sequence, timestamp: Timestamp(microseconds: testNow.microseconds + offset), value: 6.5,
                quality: unsynchronized ? .clockUnsynchronized : [])
        }
        let batch = Batch(
            device: try deviceID("d1"), sensors: [SensorDescriptor(id: ph, quantity: .ph)],
            readings: [
                reading(1, 30 * day, unsynchronized: true),  // a stale clock a month ahead: taken
                reading(2, 366 * day, unsynchronized: true),  // at the limit: taken
                reading(3, 367 * day, unsynchronized: true),  // beyond: refused
                reading(4, 30 * day, unsynchronized: false),  // a synchronised clock a month ahead: refused
                reading(5, Timestamp.earliestPlausible.microseconds - testNow.microseconds - 1, unsynchronized: true),  // 1999: refused
            ])
        try await fixture.app().test(.router) { client in
            let receipt = try decode(IngestReceipt.self, try await postJSON(client, batch, key: fixture.deviceKey))
            #expect(receipt.accepted == 2)
            #expect(receipt.rejection(of: 3)?.code == RejectionCode.timestampInFuture)
            #expect(receipt.rejection(of: 3)?.message.contains("366 days") == true)
            #expect(receipt.rejection(of: 4)?.code == RejectionCode.timestampInFuture)
            #expect(receipt.rejection(of: 5)?.code == RejectionCode.timestampImplausible)
        }
        // A configured limit applies.
        var limits = IngestConfiguration.Limits()
        limits.unsynchronizedFutureLimit = .seconds(7 * 86_400)
        let later = Batch(device: batch.device, sensors: batch.sensors, readings: [reading(10, 8 * day, unsynchronized: true)])
        try await fixture.app(limits: limits).test(.router) { client in
            let receipt = try decode(IngestReceipt.self, try await postJSON(client, later, key: fixture.deviceKey))
            #expect(receipt.rejection(of: 10)?.code == RejectionCode.timestampInFuture)
        }
    }

    @Test("a member twice in any object is 400 malformed_batch naming it, never first-wins")
    func duplicateMembers() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let documents = [
            (#"{"device":"d1","device":"d2","sensors":[],"readings":[]}"#, "device"),
            (#"{"device":"d1","sensors":[{"id":"a","quantity":"ph","quantity":"ec"}],"readings":[]}"#, "quantity"),
            (#"{"device":"d1","sensors":[{"id":"a","quantity":"ph"}],"readings":[{"sensor":"a","seq":1,"seq":2,"ts":0,"value":6}]}"#, "seq"),
            (#"{"device":"d1","extension":{"x":{"deep":1,"deep":2}}}"#, "deep"),
        ]
        try await fixture.app().test(.router) { client in
            for (document, member) in documents {
                let message = try expectError(
                    try await Self.post(client, Array(document.utf8), headers: jsonHeaders(fixture.deviceKey)), .badRequest,
                    IngestErrorCode.malformedBatch)
                #expect(message.contains("\"\(member)\" appears more than once"), "\(message)")
            }
        }
    }

    @Test("100,000 readings naming one undeclared 250-character sensor get a receipt under 2 KB; a missing seq has no sequence")
    func answerAmplification() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let sensor = String(repeating: "s", count: 250)
        var text = #"{"device":"d1","sensors":[{"id":"tank1.ph","quantity":"ph"}],"readings":["#
        for sequence in 1...100_000 {
            text += #"{"sensor":"\#(sensor)","seq":\#(sequence),"ts":1767222000000000,"value":6.5},"#
        }
        text += #"{"sensor":"tank1.ph","ts":1767222000000000,"value":6.5}]}"#
        let json = Array(text.utf8)
        let body = Zstd.compress(json)
        var limits = IngestConfiguration.Limits()
        limits.maxReadingsPerBatch = 200_000
        limits.maxDecompressedBytes = 64 << 20
        try await fixture.app(limits: limits).test(.router) { client in
            let response = try await Self.post(client, body, headers: jsonHeaders(fixture.deviceKey, encoding: "zstd"))
            #expect(response.status == .ok)
            #expect(response.body.readableBytes < 2_048, "a receipt of \(response.body.readableBytes) bytes for \(json.count) bytes of JSON")
            let receipt = try decode(IngestReceipt.self, response)
            #expect(receipt.accepted == 0)
            #expect(receipt.rejectedCount == 100_001)
            let unknown = try #require(receipt.rejected.first { $0.code == RejectionCode.unknownSensor })
            #expect(unknown.count == 100_000)
            #expect(unknown.sequences == [SequenceRun(first: 1, last: 100_000)])
            #expect(unknown.sensor.count <= IngestReceipt.maxEchoedSensorLength)
            // The reading without seq is reported as missing: no sequence at all, never 0.
            let missing = try #require(receipt.rejected.first { $0.code == RejectionCode.invalidSequence })
            #expect(missing.count == 1)
            #expect(missing.sequences.isEmpty)
            #expect(receipt.rejection(of: 0) == nil)
            let raw = try #require(
                try JSONSerialization.jsonObject(with: Data(response.body.readableBytesView)) as? [String: Any])
            let groups = try #require(raw["rejected"] as? [[String: Any]])
            let rawMissing = try #require(groups.first { $0["code"] as? String == RejectionCode.invalidSequence })
            #expect((rawMissing["sequences"] as? [Any])?.isEmpty == true)
        }
    }

    @Test("a sequence past what the ingest stores (2^63 and up) is invalid_sequence reported without a sequence, like a missing one")
    func sequencePastInt64IsReportedWithoutASequence() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let text = """
            {"device": "d1", "sensors": [{"id": "tank1.ph", "quantity": "ph"}], "readings": [
              {"sensor": "tank1.ph", "seq": 1, "ts": "2025-12-31T23:00:00Z", "value": 6.5},
              {"sensor": "tank1.ph", "seq": 9223372036854775808, "ts": "2025-12-31T23:00:01Z", "value": 6.5},
              {"sensor": "tank1.ph", "seq": 18446744073709551619, "ts": "2025-12-31T23:00:02Z", "value": 6.5}]}
            """
        try await fixture.app().test(.router) { client in
            let response = try await Self.post(client, Array(text.utf8), headers: jsonHeaders(fixture.deviceKey))
            #expect(response.status == .ok)
            let receipt = try decode(IngestReceipt.self, response)
            #expect(receipt.accepted == 1)
            let invalid = receipt.rejected.filter { $0.code == RejectionCode.invalidSequence }
            #expect(invalid.map(\.count).reduce(0, +) == 2)
            #expect(invalid.allSatisfy { $0.sequences.isEmpty }, "\(invalid)")
        }
    }
}
