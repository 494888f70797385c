import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Prometheus
import Synchronization
import Testing

@testable import FarmgateIngest

@Suite("POST /v1/batches")
struct BatchUploadTests {
    @Test("a JSON batch is stored and a repeat is answered with duplicates")
    func jsonBatchAndRepeat() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let batch = try phBatch(sequences: 1...10)
        try await fixture.app().test(.router) { client in
            let first = try await postJSON(client, batch, key: fixture.deviceKey)
            #expect(first.status == .ok)
            #expect(try decode(IngestReceipt.self, first) == IngestReceipt(accepted: 10, duplicates: 0, rejected: []))
            let second = try await postJSON(client, batch, key: fixture.deviceKey)
            #expect(try decode(IngestReceipt.self, second) == IngestReceipt(accepted: 0, duplicates: 10, rejected: []))
        }
    }

    @Test("a sensor declared coarser than a tenth of its quantity's range is malformed_batch naming it, before a re-sent value could pass as a duplicate; at the bound it is stored")
    func coarseResolutionRefused() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        @Sendable func declared(_ resolution: String, value: Double) throws -> Batch {
            var batch = try phBatch(sequences: 1...1, value: value)
            batch.sensors[0].resolution = try Resolution(parsing: resolution)
            return batch
        }
        try await fixture.app().test(.router) { client in
            #expect(try await postJSON(client, try declared("0.01", value: 6.0), key: fixture.deviceKey).status == .ok)
            // The same sequence with 9.0: at a step of 5 both are 5, which passed as a duplicate (the sender deletes it).
            for step in ["5", "1000000", "1.81"] {
                let response = try await postJSON(client, try declared(step, value: 9.0), key: fixture.deviceKey)
                let message = try expectError(response, .badRequest, IngestErrorCode.malformedBatch)
                #expect(message.contains("sensor 'tank1.ph' is declared with resolution"), "\(message)")
                #expect(message.contains("coarser than a tenth of the whole range of ph"), "\(message)")
                let binary = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey),
                    body: buffer(try BatchCodec.encode(try declared(step, value: 9.0))))
                try expectError(binary, .badRequest, IngestErrorCode.malformedBatch)
            }
            let conflict = try await postJSON(client, try declared("1.8", value: 9.0), key: fixture.deviceKey)
            #expect(try decode(IngestReceipt.self, conflict).rejected.map(\.code) == [RejectionCode.sequenceConflict])
        }
        let stored = try await fixture.store.exportPage(device: try await fixture.identity(device: "d1"), afterSequence: nil, limit: 10)
        #expect(stored.map(\.value) == [6.0])
    }

    @Test("a JSON value with more decimals than its sensor declares is stored on the resolution's grid, and a re-send is judged in whole steps")
    func jsonValueOffTheGrid() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        @Sendable func body(_ value: String, sequence: Int) -> ByteBuffer {
            buffer(Array(#"{"device": "d1", "sensors": [{"id": "tank1.ph", "quantity": "ph", "resolution": "0.01"}], "readings": [{"sensor": "tank1.ph", "seq": \#(sequence), "ts": "2025-12-31T23:00:00Z", "value": \#(value)}]}"#.utf8))
        }
        try await fixture.app().test(.router) { client in
            func post(_ value: String, sequence: Int = 7) async throws -> IngestReceipt {
                let response = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey), body: body(value, sequence: sequence))
                #expect(response.status == .ok)
                return try decode(IngestReceipt.self, response)
            }
            #expect(try await post("6.004").accepted == 1)
            // 6.004 and 6.0 are the same reading at 0.01 (600 steps); 6.01 and 6.013 are 601 steps: another reading.
            #expect(try await post("6.0").duplicates == 1)
            #expect(try await post("6.0049").duplicates == 1)
            for other in ["6.01", "6.013"] {
                let receipt = try await post(other)
                #expect(receipt.rejected.map(\.code) == [RejectionCode.sequenceConflict], "\(other): \(receipt)")
                #expect(receipt.rejected.first?.message.contains("stored 6.0, sent 6.01") == true, "\(receipt)")
            }
            // A tie is rounded as written, half away from zero (its double, 1.00499999…, would round down): a sender
            // that sends the same reading again rounded the README's way has a duplicate, not a conflict.
            #expect(try await post("1.005", sequence: 8).accepted == 1)
            #expect(try await post("1.01", sequence: 8).duplicates == 1)
        }
        let stored = try await fixture.store.exportPage(device: try await fixture.identity(device: "d1"), afterSequence: nil, limit: 10)
        #expect(stored.map(\.value) == [6.0, 1.01])
    }

    @Test("a query parameter the route does not take is 400 invalid_parameter naming it, on uploads, the device state and the probes; nothing is stored")
    func unknownParametersRefused() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            let upload = try await client.execute(
                uri: IngestProtocol.batchesPath + "?dry_run=true", method: .post, headers: jsonHeaders(fixture.deviceKey),
                body: buffer(BatchJSON.encode(try phBatch(sequences: 1...3))))
            let message = try expectError(upload, .badRequest, "invalid_parameter")
            #expect(message.contains("'dry_run'") && message.contains("takes no query parameters"), "\(message)")
            let device = try await client.execute(uri: IngestProtocol.deviceStatePath + "?x=1", method: .get, headers: bearer(fixture.deviceKey))
            try expectError(device, .badRequest, "invalid_parameter")
            for probe in ["/healthz?verbose=1", "/readyz?full"] {
                try expectError(try await client.execute(uri: probe, method: .get), .badRequest, "invalid_parameter")
            }
            #expect(try await client.execute(uri: "/healthz", method: .get).status == .ok)
        }
        #expect(try await fixture.store.exportPage(device: try await fixture.identity(device: "d1"), afterSequence: nil, limit: 10).isEmpty)
    }

    @Test("the compact receipt goes only to a client whose Accept weighs it above 0 and at least as much as JSON")
    func acceptWeights() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let compact = IngestProtocol.compactReceiptMediaType
        try await fixture.app().test(.router) { client in
            for (index, (accept, wantsCompact)) in [
                ("\(compact), application/json", true), (compact, true), ("\(compact);q=0", false),
                ("application/json, \(compact);q=0.1", false), ("\(compact);q=0.8, */*;q=0.5", true), ("*/*", false),
                ("\(compact);q=0.5, application/*", false),
            ].enumerated() {
                var headers = jsonHeaders(fixture.deviceKey)
                headers[.accept] = accept
                let sequence = UInt64(index + 1)
                let response = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: buffer(BatchJSON.encode(try phBatch(sequences: sequence...sequence))))
                #expect(response.status == .ok)
                let type = response.headers[.contentType] ?? ""
                #expect((type == compact) == wantsCompact, "Accept: \(accept) got \(type)")
            }
        }
    }

    @Test("each commit hands its new readings, and only those, to the commit observers")
    func commitObserversSeeNewReadingsOnly() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let recorder = RecordingCommitObserver()
        try await fixture.app(commits: CommitFeed([recorder])).test(.router) { client in
            _ = try await postJSON(client, try phBatch(sequences: 1...10), key: fixture.deviceKey)
            _ = try await postJSON(client, try phBatch(sequences: 1...10), key: fixture.deviceKey)
            _ = try await postJSON(client, try phBatch(sequences: 8...12), key: fixture.deviceKey)
        }
        let batches = recorder.batches.withLock { $0 }
        #expect(batches.map { $0.readings.map(\.sequence) } == [Array(1...10), [11, 12]])
        #expect(batches.allSatisfy { $0.device.device.rawValue == "d1" && $0.receivedAt == testNow })
    }

    @Test("a binary batch is stored", arguments: ["identity", "gzip", "zstd"])
    func binaryBatch(encoding: String) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let frame = try BatchCodec.encode(try phBatch(sequences: 1...1000))
        let body: [UInt8] =
            switch encoding {
            case "gzip": Gzip.compress(frame)
            case "zstd": Zstd.compress(frame)
            default: frame
            }
        var headers = binaryHeaders(fixture.deviceKey)
        headers[.contentEncoding] = encoding
        try await fixture.app().test(.router) { [headers] client in
            let response = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: buffer(body))
            #expect(response.status == .ok)
            #expect(try decode(IngestReceipt.self, response).accepted == 1000)
        }
    }

    @Test("a gzip- or zstd-encoded JSON batch is stored", arguments: ["gzip", "zstd", "GZIP"])
    func compressedJSON(encoding: String) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let json = BatchJSON.encode(try phBatch(sequences: 1...50))
        let body = encoding.lowercased() == "gzip" ? Gzip.compress(json) : Zstd.compress(json)
        try await fixture.app().test(.router) { client in
            let response = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey, encoding: encoding), body: buffer(body))
            #expect(response.status == .ok)
            #expect(try decode(IngestReceipt.self, response).accepted == 50)
        }
    }

    @Test("invalid readings are rejected one by one and the rest of the batch is stored")
    func perReadingValidation() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let ph = try sensorID("tank1.ph")
        let temp = try sensorID("tank1.temp")
        let ok = Timestamp(microseconds: testNow.microseconds - 60_000_000)
        let batch = Batch(
            device: try deviceID("d1"),
            sensors: [SensorDescriptor(id: ph, quantity: .ph), SensorDescriptor(id: temp, quantity: .temperature)],
            readings: [
                Reading(sensor: ph, sequence: 1, timestamp: ok, value: 6.2),
                Reading(sensor: ph, sequence: 2, timestamp: ok, value: .nan),
                Reading(sensor: ph, sequence: 3, timestamp: ok, value: 17),
                Reading(sensor: temp, sequence: 4, timestamp: Timestamp(microseconds: testNow.microseconds + 11 * 60_000_000), value: 20),
                Reading(sensor: temp, sequence: 5, timestamp: Timestamp(microseconds: 0), value: 20),
                Reading(sensor: temp, sequence: 6, timestamp: Timestamp(microseconds: testNow.microseconds + 9 * 60_000_000), value: 20),
                Reading(sensor: temp, sequence: 7, timestamp: ok, value: -.infinity),
            ])
        try await fixture.app().test(.router) { client in
            let response = try await postJSON(client, batch, key: fixture.deviceKey)
            #expect(response.status == .ok)
            let receipt = try decode(IngestReceipt.self, response)
            #expect(receipt.accepted == 2)
            #expect(receipt.duplicates == 0)
            let expected: [(UInt64, String)] = [
                (2, RejectionCode.notFinite), (3, RejectionCode.outOfRange), (4, RejectionCode.timestampInFuture),
                (5, RejectionCode.timestampImplausible), (7, RejectionCode.notFinite),
            ]
            for (sequence, code) in expected {
                #expect(receipt.rejection(of: sequence)?.code == code, "sequence \(sequence)")
            }
            #expect(receipt.rejection(of: 1) == nil && receipt.rejection(of: 6) == nil)
            #expect(receipt.rejectedCount == 5)
            #expect(receipt.rejected.allSatisfy { !$0.message.isEmpty })
            #expect(receipt.accepted + receipt.duplicates + receipt.rejectedCount == batch.readings.count)
        }
    }

    @Test("JSON readings that cannot be represented are counted as rejected")
    func jsonPreRejected() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let json = """
            {"device": "d1", "sensors": [{"id": "tank1.ph", "quantity": "ph"}],
             "readings": [{"sensor": "tank1.ph", "seq": 1, "ts": "2025-12-31T23:00:00Z", "value": 6.1},
                          {"sensor": "tank9.ph", "seq": 2, "ts": "2025-12-31T23:00:00Z", "value": 6.1},
                          {"sensor": "tank1.ph", "seq": 3, "ts": "yesterday", "value": 6.1}]}
            """
        try await fixture.app().test(.router) { client in
            let response = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey), body: buffer(Array(json.utf8)))
            #expect(response.status == .ok)
            let receipt = try decode(IngestReceipt.self, response)
            #expect(receipt.accepted == 1)
            #expect(receipt.rejectedCount == 2 && receipt.rejected.count == 2)
            #expect(receipt.rejected.contains { $0.sensor == "tank9.ph" && $0.code == "unknown_sensor" })
        }
    }

    @Test("a sensor already registered with another quantity is rejected as sensor_conflict")
    func sensorConflictOverHTTP() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let ph = try sensorID("tank1.ph")
        let time = Timestamp(microseconds: testNow.microseconds - 1_000_000)
        let conflicting = Batch(
            device: try deviceID("d1"), sensors: [SensorDescriptor(id: ph, quantity: .temperature)],
            readings: [Reading(sensor: ph, sequence: 100, timestamp: time, value: 20)])
        try await fixture.app().test(.router) { client in
            _ = try await postJSON(client, try phBatch(sequences: 1...2), key: fixture.deviceKey)
            let receipt = try decode(IngestReceipt.self, try await postJSON(client, conflicting, key: fixture.deviceKey))
            #expect(receipt.accepted == 0)
            #expect(receipt.rejected.map(\.code) == [RejectionCode.sensorConflict])
        }
    }

    @Test("a batch for another device than the key's is refused with device_mismatch")
    func deviceMismatch() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            let response = try await postJSON(client, try phBatch(device: "d2", sequences: 1...3), key: fixture.deviceKey)
            let message = try expectError(response, .forbidden, "device_mismatch")
            #expect(message.contains("d2") && message.contains("d1"))
        }
    }

    @Test(
        "an unsupported Content-Type or Content-Encoding is answered 415",
        arguments: [
            ("text/plain", nil, "unsupported_media_type"), (nil, nil, "unsupported_media_type"),
            ("application/json", "br", "unsupported_encoding"), ("application/json", "gzip, zstd", "unsupported_encoding"),
        ] as [(String?, String?, String)])
    func unsupported(contentType: String?, encoding: String?, code: String) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var headers = bearer(fixture.deviceKey)
        if let contentType { headers[.contentType] = contentType }
        if let encoding { headers[.contentEncoding] = encoding }
        try await fixture.app().test(.router) { [headers] client in
            let response = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: buffer(BatchJSON.encode(try phBatch(sequences: 1...1))))
            try expectError(response, .unsupportedMediaType, code)
        }
    }

    @Test("Content-Type parameters and case are ignored")
    func contentTypeParameters() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var headers = bearer(fixture.deviceKey)
        headers[.contentType] = "Application/JSON; charset=utf-8"
        try await fixture.app().test(.router) { [headers] client in
            let response = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: buffer(BatchJSON.encode(try phBatch(sequences: 1...1))))
            #expect(response.status == .ok)
        }
    }

    @Test("undecodable bodies are answered 400 malformed_batch naming the problem")
    func malformed() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.router) { client in
            let json = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey), body: buffer(Array(#"{"device": 5}"#.utf8)))
            let jsonMessage = try expectError(json, .badRequest, "malformed_batch")
            #expect(jsonMessage.contains("device"))

            let binary = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey), body: buffer(Array("garbage!".utf8)))
            let binaryMessage = try expectError(binary, .badRequest, "malformed_batch")
            #expect(binaryMessage.contains("binary"))
            #expect(binaryMessage.contains("FGB"))

            let gzip = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey, encoding: "gzip"),
                body: buffer(Array("not gzip at all".utf8)))
            let gzipMessage = try expectError(gzip, .badRequest, "malformed_batch")
            #expect(gzipMessage.contains("gzip"))

            // An empty body arrived whole: not "cut in transit", which a sender retries for ever (before the fix, a
            // tester 2026-12-06: incomplete_body, in both formats).
            for headers in [jsonHeaders(fixture.deviceKey), binaryHeaders(fixture.deviceKey)] {
                let empty = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: buffer([]))
                #expect(try expectError(empty, .badRequest, "malformed_batch").contains("empty body"))
            }
        }
    }

    @Test("a body over max_body_bytes is answered 413, in the router and over a real socket")
    func bodyTooLarge() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let limits = IngestConfiguration.Limits(maxBodyBytes: 4096, maxDecompressedBytes: 1 << 20)
        let body = buffer([UInt8](repeating: UInt8(ascii: " "), count: 10_000))
        try await fixture.app(limits: limits).test(.router) { client in
            let response = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey), body: body)
            try expectError(response, .contentTooLarge, "payload_too_large")
        }
        try await fixture.app(limits: limits).test(.live) { client in
            let response = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey), body: body)
            try expectError(response, .contentTooLarge, "payload_too_large")
            // The keep-alive connection still serves the next request after the unread body.
            #expect(try await postJSON(client, try phBatch(sequences: 1...3), key: fixture.deviceKey).status == .ok)
        }
    }

    @Test("a gzip or zstd bomb is answered 413 without expanding it fully", arguments: ["gzip", "zstd"])
    func decompressionBomb(encoding: String) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let zeros = [UInt8](repeating: 0, count: 64 << 20)
        let bomb = encoding == "gzip" ? Gzip.compress(zeros, level: 9) : Zstd.compress(zeros, level: 3)
        #expect(bomb.count < 1 << 20)
        try await fixture.app().test(.router) { client in
            let response = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey, encoding: encoding), body: buffer(bomb))
            try expectError(response, .contentTooLarge, "decompressed_too_large")
        }
    }

    // A tester, 2026-12-07: a 140-byte batch compressed with `zstd --ultra -22` (a 128 MiB window) was answered 413
    // "expands to more than 33554432 bytes; send smaller batches", which halving never cures.
    @Test("a small zstd body whose frame asks for a window beyond the decoder's is 415 naming the window; within it, stored")
    func zstdWindowBeyondTheLimit() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let json = BatchJSON.encode(try phBatch(sequences: 1...3))
        // A zstd frame by hand (RFC 8878): no content size, a window of 2^(10 + exponent) bytes, one raw block.
        @Sendable func frame(windowExponent: UInt8) -> [UInt8] {
            let header = UInt32(1 | json.count << 3)
            return [0x28, 0xB5, 0x2F, 0xFD, 0x00, windowExponent << 3]
                + [UInt8(header & 0xFF), UInt8(header >> 8 & 0xFF), UInt8(header >> 16 & 0xFF)] + json
        }
        #expect(try Zstd.decompress(frame(windowExponent: 13), maxOutput: 1 << 20) == json)
        #expect(throws: CompressionError.self) { try Zstd.decompress(frame(windowExponent: 17), maxOutput: 32 << 20) }
        try await fixture.app().test(.router) { client in
            let refused = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey, encoding: "zstd"),
                body: buffer(frame(windowExponent: 17)))
            let message = try expectError(refused, .unsupportedMediaType, "unsupported_encoding")
            #expect(message.contains("window is larger than the 32 MiB this decoder allows"), "\(message)")
            let stored = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey, encoding: "zstd"),
                body: buffer(frame(windowExponent: 15)))
            #expect(try decode(IngestReceipt.self, stored) == IngestReceipt(accepted: 3, duplicates: 0, rejected: []))
        }
    }

    @Test("more readings than max_readings_per_batch is 413 too_many_readings, in JSON and binary")
    func tooManyReadings() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let limits = IngestConfiguration.Limits(maxReadingsPerBatch: 10)
        let frame = try BatchCodec.encode(try phBatch(sequences: 1...11))
        try await fixture.app(limits: limits).test(.router) { client in
            try expectError(try await postJSON(client, try phBatch(sequences: 1...11), key: fixture.deviceKey), .contentTooLarge, "too_many_readings")
            try expectError(
                try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: binaryHeaders(fixture.deviceKey), body: buffer(frame)),
                .contentTooLarge, "too_many_readings")
            #expect(try await postJSON(client, try phBatch(sequences: 1...10), key: fixture.deviceKey).status == .ok)
        }
    }

    @Test("over the device's rate the answer is 429 with an integer Retry-After of at least one second")
    func rateLimited() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        // One token per 100 s: a loaded CI machine that stalls this test for many seconds between requests still
        // has no token to give back before the third.
        let limits = IngestConfiguration.Limits(requestsPerSecond: 0.01, burst: 2)
        try await fixture.app(limits: limits).test(.router) { client in
            #expect(try await postJSON(client, try phBatch(sequences: 1...1), key: fixture.deviceKey).status == .ok)
            #expect(try await postJSON(client, try phBatch(sequences: 2...2), key: fixture.deviceKey).status == .ok)
            let limited = try await postJSON(client, try phBatch(sequences: 3...3), key: fixture.deviceKey)
            try expectError(limited, .tooManyRequests, "rate_limited")
            let retryAfter = limited.headers[.retryAfter].flatMap { Int($0) }
            #expect(retryAfter != nil)
            #expect((retryAfter ?? 0) >= 1 && (retryAfter ?? 0) <= 100)
            // Another device has its own bucket.
            #expect(try await postJSON(client, try phBatch(device: "d2", sequences: 1...1), key: fixture.secondDeviceKey).status == .ok)
        }
    }

    @Test("past uploads_in_flight slow uploads of one device, its next is 429 rate_limited with Retry-After; another device is not held up")
    func uploadsInFlightPerDevice() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        // A bucket that never runs dry here: only the in-flight cap (default 4) can refuse.
        let limits = IngestConfiguration.Limits(requestsPerSecond: 1_000, burst: 1_000)
        #expect(limits.uploadsInFlight == 4)
        let registry = PrometheusCollectorRegistry()
        try await fixture.app(limits: limits, registry: registry).test(.live) { client in
            let port = try #require(client.port)
            let key = fixture.deviceKey.text
            let body = BatchJSON.encode(try phBatch(sequences: 1...3))
            // Four slow uploads: the head and half the body sent, the rest held back.
            let held = try await runOffPool(name: "slow-uploads") { () throws -> [RawConnection] in
                try (0..<4).map { _ in
                    let connection = try RawConnection(port: port)
                    connection.send(
                        "POST \(IngestProtocol.batchesPath) HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\nContent-Length: \(body.count)\r\n\r\n")
                    connection.send(Array(body.prefix(body.count / 2)))
                    return connection
                }
            }
            // Once the four are being read, the device's next upload is refused at once. A probe that races one of the four
            // to a slot may be taken instead, and that one refused: either way it is the cap at work.
            let empty = try phBatch(sequences: [UInt64]())
            var refusal: (head: String, body: [UInt8])?
            var answeredEarly: Set<Int> = []
            let refused = try await eventually(timeout: .seconds(10), every: .milliseconds(20)) {
                let response = try await postJSON(client, empty, key: fixture.deviceKey)
                if response.status == .tooManyRequests {
                    let head = response.headers.map { "\($0.name.canonicalName.lowercased()): \($0.value)" }.joined(separator: "\r\n")
                    refusal = (head, Array(response.body.readableBytesView))
                    return true
                }
                let early = try await runOffPool(name: "slow-uploads") { held.map { $0.readResponse(timeout: .milliseconds(1)) } }
                for (index, answer) in early.enumerated() {
                    guard let answer else { continue }
                    answeredEarly.insert(index)
                    if answer.status == 429 { refusal = (answer.head.lowercased(), answer.body) }
                }
                return refusal != nil
            }
            #expect(refused, "a fifth upload was accepted while four were in flight")
            let answer = try #require(refusal)
            let error = try JSONDecoder().decode(APIErrorBody.self, from: Data(answer.body)).error
            #expect(error.code == "rate_limited" && error.message.contains("4 uploads in flight"), "\(error.message)")
            #expect(answer.head.contains("retry-after: 1"), "\(answer.head)")
            // Its own policy, with nothing left: not the device bucket's requests to spare.
            #expect(answer.head.contains("ratelimit: \"in_flight\";r=0;t=1") && answer.head.contains("ratelimit-remaining: 0"), "\(answer.head)")
            #expect(answer.head.contains("ratelimit-policy: \"in_flight\";q=4;w=1"), "\(answer.head)")
            // Another device has its own slots.
            #expect(try await postJSON(client, try phBatch(device: "d2", sequences: 1...1), key: fixture.secondDeviceKey).status == .ok)
            // One slow upload ends: it is stored, and its slot is free again.
            let slow = try #require(held.indices.first { !answeredEarly.contains($0) })
            let finished = try await runOffPool(name: "slow-uploads") {
                held[slow].send(Array(body.dropFirst(body.count / 2)))
                return held[slow].readResponse(timeout: .seconds(10))
            }
            #expect(finished?.status == 200)
            #expect(try await postJSON(client, empty, key: fixture.deviceKey).status == .ok)
            let metrics = String(buffer: try await client.execute(uri: "/metrics", method: .get).body)
            let limited = try PrometheusText.parse(metrics).first { $0.name == "farmgate_ingest_batches_total" && $0.labels["result"] == "rate_limited" }
            #expect((limited?.value ?? 0) >= 1, "counted as rate_limited")
            withExtendedLifetime(held) {}
        }
    }

    @Test("a store that fails is answered 503 with Retry-After")
    func storeFailure() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let app = fixture.app()
        try await app.test(.router) { client in
            // Make the commit fail: drop a table the transaction writes, behind the store's back.
            let connection = try SQLiteConnection(path: fixture.store.path, mode: .readWrite)
            try connection.execute("DROP TABLE latest")
            let response = try await postJSON(client, try phBatch(sequences: 1...1), key: fixture.deviceKey)
            try expectError(response, .serviceUnavailable, IngestErrorCode.unavailable)
            #expect(response.headers[.retryAfter].flatMap { Int($0) } ?? 0 >= 1)
        }
    }

    @Test("metrics count batches by result and readings by outcome, without per-device labels")
    func metrics() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let registry = PrometheusCollectorRegistry()
        try await fixture.app(registry: registry).test(.router) { client in
            _ = try await postJSON(client, try phBatch(sequences: 1...5), key: fixture.deviceKey)
            _ = try await postJSON(client, try phBatch(sequences: 1...7), key: fixture.deviceKey)
            _ = try await postJSON(client, try phBatch(device: "d2", sequences: 1...1), key: fixture.deviceKey)
            let response = try await client.execute(uri: "/metrics", method: .get)
            #expect(response.status == .ok)
            let text = String(buffer: response.body)
            #expect(text.contains(#"farmgate_ingest_batches_total{result="stored"} 2"#))
            #expect(text.contains(#"farmgate_ingest_batches_total{result="forbidden"} 1"#))
            #expect(text.contains(#"farmgate_ingest_readings_total{outcome="accepted"} 7"#))
            #expect(text.contains(#"farmgate_ingest_readings_total{outcome="duplicate"} 5"#))
            #expect(text.contains("farmgate_ingest_http_request_duration_seconds_count{route=\"/v1/batches\",status=\"2xx\"} 2"))
            #expect(!text.contains("d1"))
            // Plain HTTP: no certificate expiry to alert on, not even a zero.
            #expect(!text.contains("farmgate_ingest_tls_certificate_expiry"))
        }
    }
}

final class RecordingCommitObserver: CommitObserver {
    let batches = Mutex<[CommittedBatch]>([])
    func committed(_ batch: CommittedBatch) { batches.withLock { $0.append(batch) } }
}
