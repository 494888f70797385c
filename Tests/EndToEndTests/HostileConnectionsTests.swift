import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing

/// The real `farmgate-ingest serve` holding thousands of idle and slow connections.
@Suite("End to end: hostile connections", .serialized)
struct HostileConnectionsTests {
    static let idleConnections = 2_000
    static let slowConnections = 50

    @Test("2,000 idle keep-alive connections, 50 slowloris heads and a trickling body: normal requests stay fast, the slow ones are closed on time")
    func holdsIdleAndSlowConnections() async throws {
        let limit = raiseOpenFileLimit()
        try #require(limit > Self.idleConnections + Self.slowConnections + 500, "the open-file limit (\(limit)) is too low for this test")
        let farm = try await Farm()
        _ = try farm.dir.write(
            "ingest.toml",
            """
            [server]
            host = "127.0.0.1"
            port = \(farm.port)
            header_timeout = "4s"
            body_timeout = "4s"
            idle_timeout = "15s"

            [storage]
            path = "ingest/ingest.sqlite"

            [log]
            level = "info"
            """)
        let deviceKey = try await farm.createDevice("site-h")
        let tokenOutput = try await farm.admin(["token", "create", "--farm", "e2e", "--role", "viewer"])
        let readToken = try #require(
            tokenOutput.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\"" }).first { $0.hasPrefix("fgr_") }.map(String.init))
        try await farm.startIngest()
        let port = farm.port

        // 1. Two thousand keep-alive connections, each after one answered request (what idle agents hold).
        let idle = try await runOffPool(name: "idle-connections") {
            try (0..<Self.idleConnections).map { _ -> (RawConnection, ContinuousClock.Instant) in
                let connection = try RawConnection(port: port)
                connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                guard connection.readResponse(timeout: .seconds(10))?.status == 200 else { throw POSIXError(.ECONNRESET) }
                return (connection, ContinuousClock.now)
            }
        }

        // 2. Fifty slowloris heads (a byte a second) and a body trickling a byte a second, on a thread of their own.
        let body = BatchJSON.encode(
            Batch(
                device: try DeviceID("site-h"), sensors: [SensorDescriptor(id: try SensorID("t.ph"), quantity: .ph)],
                readings: [Reading(sensor: try SensorID("t.ph"), sequence: 1, timestamp: .now(), value: 6.5)]))
        async let slow = runOffPool(name: "slow-connections") { () throws -> (heads: [Double?], headAnswers: Int, body: Double?, bodyAnswer: String) in
            let start = ContinuousClock.now
            let heads = try (0..<Self.slowConnections).map { _ in try RawConnection(port: port) }
            let trickle = try RawConnection(port: port)
            trickle.send(
                "POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \(deviceKey)\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            var headClosed = [Double?](repeating: nil, count: heads.count)
            var bodyClosed: Double?
            let head = Array("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ".utf8) + Array(repeating: UInt8(ascii: "a"), count: 100)
            for second in 0..<14 {
                let now = start.duration(to: .now) / .seconds(1)
                for (index, connection) in heads.enumerated() where headClosed[index] == nil {
                    if connection.checkClosed() || !connection.send([head[second]]) { headClosed[index] = now }
                }
                if bodyClosed == nil, trickle.checkClosed() || !trickle.send(" ") { bodyClosed = now }
                if headClosed.allSatisfy({ $0 != nil }) && bodyClosed != nil { break }
                Thread.sleep(forTimeInterval: 1)
            }
            let answered = heads.filter { String(decoding: $0.drained, as: UTF8.self).hasPrefix("HTTP/1.1 408") }.count
            return (headClosed, answered, bodyClosed, String(decoding: trickle.drained, as: UTF8.self))
        }

        // 3. Meanwhile a normal client: health, an authenticated upload and an authenticated read, each quickly.
        var slowest: Duration = .zero
        for round in 0..<5 {
            let start = ContinuousClock.now
            let health = await farm.httpStatus("/healthz")
            let upload = try await farm.post(Data(body), key: deviceKey, contentType: "application/json")
            let read = await readStatus(farm: farm, token: readToken)
            slowest = max(slowest, start.duration(to: .now))
            #expect(health == 200, "round \(round): /healthz answered \(String(describing: health))")
            #expect(upload.0 == 200, "round \(round): the upload answered \(upload.0): \(String(decoding: upload.1, as: UTF8.self))")
            #expect(read == 200, "round \(round): the read answered \(String(describing: read))")
            try await Task.sleep(for: .seconds(1))
        }
        #expect(slowest < .seconds(3), "three normal requests took \(slowest) while the slow connections were held")

        // 4. The slow ones were closed after their 4 s timeouts (checked once a second), with a 408 JSON answer.
        let result = try await slow
        for (index, closedAt) in result.heads.enumerated() {
            guard let closedAt else {
                Issue.record("slowloris connection \(index) was never closed")
                continue
            }
            #expect(closedAt >= 3.5 && closedAt <= 10, "slowloris connection \(index) closed after \(closedAt) s")
        }
        #expect(result.headAnswers == Self.slowConnections, "only \(result.headAnswers) slowloris connections got a 408")
        let bodyClosedAt = try #require(result.body, "the trickling body was never closed")
        #expect(bodyClosedAt >= 3.5 && bodyClosedAt <= 10, "the trickling body was closed after \(bodyClosedAt) s")
        #expect(result.bodyAnswer.hasPrefix("HTTP/1.1 408"), "\(result.bodyAnswer)")

        // 5. The idle connections outlived the header and body timeouts, and are closed after idle_timeout.
        let youngest = idle.map(\.1).max() ?? .now
        let openAfterSlowOnes = idle.filter { $0.1.duration(to: .now) < .seconds(13) }.filter { !$0.0.checkClosed() }.count
        let young = idle.filter { $0.1.duration(to: .now) < .seconds(13) }.count
        #expect(openAfterSlowOnes == young, "\(young - openAfterSlowOnes) idle connections were closed before idle_timeout")
        let allClosed = await eventually(timeout: .seconds(40), every: .milliseconds(500)) { idle.allSatisfy { $0.0.checkClosed() } }
        #expect(allClosed, "idle connections still open \(youngest.duration(to: .now)) after the last was answered")
        #expect(youngest.duration(to: .now) >= .seconds(14), "idle connections were closed before idle_timeout")
        await farm.ingest?.stop()
    }

    func readStatus(farm: Farm, token: String) async -> Int? {
        guard let url = URL(string: farm.endpoint + "/v1/farms/e2e/latest") else { return nil }
        var request = URLRequest(url: url)
        request.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization")
        request.timeoutInterval = 5
        guard let (_, response) = try? await URLSession.shared.data(for: request) else { return nil }
        return (response as? HTTPURLResponse)?.statusCode
    }
}
