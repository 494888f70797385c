import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

/// The real `farmgate` binary against an ingest that tells it to slow down.
@Suite("End to end: Retry-After", .serialized)
struct RetryAfterTests {
    @Test("429 and 503 with Retry-After are obeyed to the second, then everything is delivered")
    func obeysRetryAfter() async throws {
        let farm = try await Farm()
        // A misbehaving ingest: 429 "come back in 2 s", then 503 "in 1 s", then it acknowledges every batch.
        let posts = Atomic<Int>(0)
        let server = try TestHTTPServer { request, _ in
            // An ingest older than GET /v1/device; only batches count in the script.
            if request.method == "GET" { return .json(404, #"{"error":{"code":"not_found","message":"no route"}}"#) }
            switch posts.add(1, ordering: .sequentiallyConsistent).oldValue {
            case 0: return .json(429, #"{"error":{"code":"rate_limited","message":"slow down"}}"#, headers: ["Retry-After": "2"])
            case 1: return .json(503, #"{"error":{"code":"unavailable","message":"busy"}}"#, headers: ["Retry-After": "1"])
            default:
                guard let batch = try? BatchCodec.decode(request.body) else {
                    return .json(400, #"{"error":{"code":"malformed_batch","message":"undecodable"}}"#)
                }
                let receipt = IngestReceipt(accepted: batch.readings.count, duplicates: 0, rejected: [])
                let body = (try? JSONEncoder().encode(receipt)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
                return .json(200, body)
            }
        }
        defer { server.stop() }
        let keyFile = try farm.dir.write("k.key", "fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n")
        // backoff_initial is 100 ms: an agent that ignored Retry-After would come back ten times sooner.
        let config = try farm.agentConfig("agent.toml", device: "site-9", keyFile: keyFile, sensors: 3, interval: "100ms", endpoint: server.url)
        let agent = try farm.startAgent(config: config, log: "agent.log")

        let sent = await eventually(timeout: .seconds(20)) { server.requests.filter { $0.method == "POST" }.count >= 4 }
        #expect(sent, "the agent stopped sending: \(agent.log)")
        let requests = server.requests.filter { $0.method == "POST" }
        #expect(requests.allSatisfy { $0.path == IngestProtocol.batchesPath && $0.headers["authorization"] == "Bearer fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef" })
        let afterTooMany = requests[0].receivedAt.duration(to: requests[1].receivedAt)
        let afterUnavailable = requests[1].receivedAt.duration(to: requests[2].receivedAt)
        #expect(afterTooMany >= .milliseconds(1_950), "second request came \(afterTooMany) after the 429")
        #expect(afterTooMany < .seconds(4))
        #expect(afterUnavailable >= .milliseconds(950), "third request came \(afterUnavailable) after the 503")

        let drained = try await eventually(timeout: .seconds(15), every: .milliseconds(200)) {
            guard let status = try await farm.agentStatus(config: config) else { return false }
            return status.upload?.lastHTTPStatus == 200 && status.buffer.quarantined == 0 && (status.upload?.uploadedTotal ?? 0) > 0
        }
        #expect(drained, "\(agent.log)")
        #expect(await agent.stop(SIGTERM) == 0)
    }
}
