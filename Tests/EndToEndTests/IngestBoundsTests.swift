import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing

/// The real `farmgate-ingest serve` against hostile bodies, and its key rotation through the real CLI.
@Suite("End to end: ingest bounds and key rotation", .serialized)
struct IngestBoundsTests {
    /// Sends one request to the real ingest; returns the status and body.
    static func request(
        _ endpoint: String, method: String = "POST", path: String = IngestProtocol.batchesPath, key: String, body: Data? = nil,
        headers: [String: String] = [:]
    ) async throws -> (Int, Data) {
        guard let url = URL(string: endpoint + path) else { throw URLError(.badURL) }
        var request = URLRequest(url: url)
        request.httpMethod = method
        request.setValue("Bearer \(key)", forHTTPHeaderField: "Authorization")
        for (name, value) in headers { request.setValue(value, forHTTPHeaderField: name) }
        request.httpBody = body
        // The bombs test memory, not speed: four 32 MiB parses in a debug build on a loaded 2-core CI machine have
        // taken over 60 s.
        request.timeoutInterval = 300
        let (data, response) = try await URLSession.shared.data(for: request)
        return ((response as? HTTPURLResponse)?.statusCode ?? 0, data)
    }

    /// The peak resident set (VmHWM) of process `pid`, in bytes.
    static func peakResidentBytes(pid: Int32) throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }),
            let kilobytes = line.split(separator: " ").dropFirst().first.flatMap({ Int($0) })
        else { throw CocoaError(.fileReadCorruptFile) }
        return kilobytes * 1024
    }

    /// Four JSON bombs at once: 3 kB of zstd that expand to just under the 32 MiB decompressed limit, nearly all of it one
    /// unknown member (an array of 16 million zeros). Built as a tree, each took about 500 MB (four: 960 MB).
    ///
    /// The bound: each request must hold its decompressed body (32 MiB) and, while the decompressor's output array
    /// doubles, briefly half of it again (48 MiB); four at once are at most 4 × 48 = 192 MiB, and the process itself
    /// (Hummingbird, SQLite, the Swift runtime of a debug build) has about 30 MB resident. 260 MB leaves room for
    /// allocator slack and is far below what a tree costs (the old parser exceeded it with a single request).
    @Test("four 32 MiB JSON bombs with one huge unknown member keep the real ingest's peak memory under 320 MB")
    func jsonBombs() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-1")
        try await farm.startIngest()
        let ingest = try #require(farm.ingest)

        let head = Array(#"{"device":"site-1","sensors":[],"readings":[],"x":["#.utf8)
        let tail = Array("0]}".utf8)
        let limit = 32 << 20
        var json = head
        json.reserveCapacity(limit)
        let pairs = (limit - head.count - tail.count - 16) / 2
        for _ in 0..<pairs { json.append(contentsOf: [UInt8(ascii: "0"), UInt8(ascii: ",")]) }
        json += tail
        #expect(json.count <= limit)
        let bomb = Data(Zstd.compress(json, level: 19))
        #expect(bomb.count < 10_000)
        json = []

        let before = try Self.peakResidentBytes(pid: ingest.pid)
        let endpoint = farm.endpoint
        let results = try await withThrowingTaskGroup(of: (Int, Data).self) { group in
            for _ in 0..<4 {
                group.addTask {
                    try await Self.request(
                        endpoint, key: key, body: bomb, headers: ["Content-Type": "application/json", "Content-Encoding": "zstd"])
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        for (status, body) in results {
            #expect(status == 200, "\(String(decoding: body, as: UTF8.self))")
            let receipt = try JSONDecoder().decode(IngestReceipt.self, from: body)
            #expect(receipt == IngestReceipt(accepted: 0, duplicates: 0, rejected: []))
        }
        let peak = try Self.peakResidentBytes(pid: ingest.pid)
        print("farmgate-ingest peak resident: \(before / 1_000_000) MB before, \(peak / 1_000_000) MB after four JSON bombs")
        // Four bodies of 32 MiB each decompressed at once are 128 MiB; the debug build's per-thread allocator arenas add to
        // it (186 MB when this was written, 262 MB once in a full run on 2026-12-05). Unbounded, it was about 960 MB.
        #expect(peak < 320_000_000, "peak resident \(peak / 1_000_000) MB (\(before / 1_000_000) MB before the bombs)")
        // Still serving.
        #expect(await farm.httpStatus("/readyz") == 200)
        await ingest.stop()
    }

    // Before the fix (a tester, 2026-12-05) nothing answered the expectation: curl waited a second before every body of
    // 1 MiB or more, and a client that waits for 100 Continue waited until its own timeout.
    @Test("Expect: 100-continue is answered 100 Continue as the head arrives, then the body's answer; not without a body or on HTTP/1.0")
    func expectContinue() async throws {
        let farm = try await Farm(name: "expect")
        let key = try await farm.createDevice("site-e", farm: "expect")
        try await farm.startIngest()
        let body = BatchJSON.encode(
            Batch(
                device: try DeviceID("site-e"), sensors: [SensorDescriptor(id: try SensorID("t.ph"), quantity: .ph)],
                readings: [Reading(sensor: try SensorID("t.ph"), sequence: 1, timestamp: .now(), value: 6.5)]))
        let port = farm.port
        let outcome = try await runOffPool(name: "expect-continue") { () throws -> [Int?] in
            let connection = try RawConnection(port: port)
            let head = "POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\nContent-Length: \(body.count)\r\n"
            _ = connection.send(head + "Expect: 100-Continue\r\n\r\n")
            let interim = connection.readResponse(timeout: .milliseconds(900))?.status
            _ = connection.send(body)
            let stored = connection.readResponse(timeout: .seconds(10))?.status
            // Without the expectation the first answer is the final one; with it on a request without a body, too.
            _ = connection.send(head + "\r\n")
            _ = connection.send(body)
            let plain = connection.readResponse(timeout: .seconds(10))?.status
            _ = connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n")
            let bodiless = connection.readResponse(timeout: .seconds(10))?.status
            // HTTP/1.0 knows no 100: the request waits for its body.
            let old = try RawConnection(port: port)
            _ = old.send(head.replacingOccurrences(of: "HTTP/1.1", with: "HTTP/1.0") + "Expect: 100-continue\r\n\r\n")
            let early = old.readResponse(timeout: .milliseconds(500))?.status
            _ = old.send(body)
            let oldAnswer = old.readResponse(timeout: .seconds(10))?.status
            return [interim, stored, plain, bodiless, early, oldAnswer]
        }
        #expect(outcome == [100, 200, 200, 200, nil, 200], "interim, stored, plain, bodiless, HTTP/1.0 early, HTTP/1.0 answer")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    // Before the fix (a tester, 2026-12-06) bytes after a `Connection: close` request made the parser's error the
    // answer: 400 "not valid HTTP/1.1" for a batch that was committed.
    @Test("bytes after a request that closes its connection are ignored: that request gets its own answer, then the close")
    func bytesAfterClose() async throws {
        let farm = try await Farm(name: "close")
        let key = try await farm.createDevice("site-c", farm: "close")
        try await farm.startIngest()
        let port = farm.port
        func body(_ sequence: UInt64) throws -> [UInt8] {
            BatchJSON.encode(
                Batch(
                    device: try DeviceID("site-c"), sensors: [SensorDescriptor(id: try SensorID("t.ph"), quantity: .ph)],
                    readings: [Reading(sensor: try SensorID("t.ph"), sequence: sequence, timestamp: .now(), value: 6.5)]))
        }
        let first = try body(1), second = try body(2)
        let answers = try await runOffPool(name: "bytes-after-close") { () throws -> [(Int?, Bool)] in
            var answers: [(Int?, Bool)] = []
            for (version, connection, batch) in [("HTTP/1.1", "Connection: close\r\n", first), ("HTTP/1.0", "", second)] {
                let socket = try RawConnection(port: port)
                let head = "POST /v1/batches \(version)\r\nHost: x\r\nAuthorization: Bearer \(key)\r\nContent-Type: application/json\r\n\(connection)Content-Length: \(batch.count)\r\n\r\n"
                _ = socket.send(Array(head.utf8) + batch + Array("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
                let answer = socket.readResponse(timeout: .seconds(10))
                answers.append((answer?.status, socket.readUntilClosed(timeout: .seconds(5)).closed))
            }
            return answers
        }
        #expect(answers.map(\.0) == [200, 200] && answers.allSatisfy(\.1), "\(answers)")
        #expect(await farm.ingest?.stop(SIGTERM) == 0)
    }

    @Test("device rotate-key: a new key printed once like device create, the old key refused, a revoked device usable again")
    func rotateKey() async throws {
        let farm = try await Farm()
        let oldKey = try await farm.createDevice("site-1")
        try await farm.startIngest()
        let ingest = try #require(farm.ingest)

        func batch(_ sequence: UInt64) throws -> Data {
            let sensor = try SensorID("tank1.ph")
            return Data(
                BatchJSON.encode(
                    Batch(
                        device: try DeviceID("site-1"), sensors: [SensorDescriptor(id: sensor, quantity: .ph)],
                        readings: [Reading(sensor: sensor, sequence: sequence, timestamp: .now(), value: 6.5)])))
        }
        let json = ["Content-Type": "application/json"]
        #expect(try await Self.request(farm.endpoint, key: oldKey, body: try batch(1), headers: json).0 == 200)

        _ = try await farm.admin(["device", "revoke", "--farm", "e2e", "--device", "site-1"])
        let refused = try await eventually(timeout: .seconds(10), every: .milliseconds(200)) {
            try await Self.request(farm.endpoint, key: oldKey, body: try batch(2), headers: json).0 == 401
        }
        #expect(refused, "the revoked key was still accepted")

        let created = try await farm.admin(["device", "create", "--farm", "e2e", "--device", "site-2"])
        let output = try await farm.admin(["device", "rotate-key", "--farm", "e2e", "--device", "site-1"])
        let lines = output.split(separator: "\n")
        let newKey = String(try #require(lines.first))
        #expect(newKey.hasPrefix("fgd_"))
        #expect(newKey != oldKey)
        #expect(lines.count == created.split(separator: "\n").count, "same shape as device create:\n\(output)\n\(created)")
        #expect(output.contains("shown only once"))
        #expect(lines.last?.contains("key_file") == true)

        // The new key works at once (the revoked device is usable again), with its sequences kept.
        #expect(try await Self.request(farm.endpoint, key: newKey, body: try batch(3), headers: json).0 == 200)
        let (status, body) = try await Self.request(farm.endpoint, method: "GET", path: IngestProtocol.deviceStatePath, key: newKey)
        #expect(status == 200)
        let state = try JSONDecoder().decode(DeviceState.self, from: body)
        #expect(state.device == "site-1" && state.highestSequence == 3, "\(state)")
        // The old key stays refused: from the credential cache ("revoked") for at most its lifetime (2 s), then as a key
        // the store no longer knows.
        #expect(try await Self.request(farm.endpoint, key: oldKey, body: try batch(4), headers: json).0 == 401)
        let unknownKey = try await eventually(timeout: .seconds(10), every: .milliseconds(250)) {
            let (status, body) = try await Self.request(farm.endpoint, key: oldKey, body: try batch(4), headers: json)
            #expect(status == 401)
            return String(decoding: body, as: UTF8.self).contains(#""code":"unauthorized""#)
        }
        #expect(unknownKey, "the old key was not replaced in the store")

        // Unknown devices and bad arguments fail clearly.
        let unknown = try await runCommand(
            Farm.ingestBinary, ["device", "rotate-key", "--farm", "e2e", "--device", "nope", "--config", farm.ingestConfig])
        #expect(unknown.status == 1)
        #expect(unknown.stderr.contains("device 'nope' in farm 'e2e' does not exist"))
        let invalid = try await runCommand(
            Farm.ingestBinary, ["device", "rotate-key", "--farm", "e2e", "--device", "a b", "--config", farm.ingestConfig])
        #expect(invalid.status == 64)
        await ingest.stop()
    }

    @Test("SIGTERM with an upload stalled mid-body: the graceful stop ends within its 10 s limit and names the service it cut")
    func gracefulStopIsBounded() async throws {
        let farm = try await Farm()
        let key = try await farm.createDevice("site-1")
        try await farm.startIngest()
        let ingest = try #require(farm.ingest)

        // Headers and one byte of a 1,000-byte body, then nothing: the server holds the request for `body_timeout`
        // (60 s by default), so a graceful stop that waits for requests in flight would wait that long.
        let stalled = try RawConnection(port: farm.port)
        #expect(stalled.send(
            "POST \(IngestProtocol.batchesPath) HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(key)\r\n"
                + "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"))
        try await Task.sleep(for: .milliseconds(500))

        let started = ContinuousClock.now
        _ = await ingest.stop(SIGTERM, timeout: .seconds(40))
        let took = ContinuousClock.now - started
        #expect(took < .seconds(25), "the stop took \(took): \(ingest.log.suffix(2000))")
        #expect(took >= .seconds(9), "the stop did not wait for the request in flight (\(took)): \(ingest.log.suffix(2000))")
        let log = ingest.log
        #expect(log.contains("service stopping"), "\(log.suffix(2000))")
        // The server is the service cut; those before it in the stop order stopped gracefully, and the store after it
        // still ended (cancelled with the rest, it closes its database either way).
        let lines = log.split(separator: "\n")
        #expect(lines.contains { $0.contains("service cancelled: the graceful stop passed its limit") && $0.contains("Application") }, "\(log.suffix(2000))")
        #expect(lines.contains { $0.contains("service stopped") && $0.contains("RetentionService") }, "\(log.suffix(2000))")
        #expect(lines.contains { ($0.contains("service stopped") || $0.contains("service cancelled")) && $0.contains("SQLiteIngestStore") }, "\(log.suffix(2000))")
        withExtendedLifetime(stalled) {}
    }
}
