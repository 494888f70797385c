import FarmgateTestSupport
import FarmgateAgent
import Foundation
import Logging
import Synchronization
import Testing

@Suite("Upload HTTP client (libcurl against a loopback server)")
struct UploadHTTPClientTests {
    let logger = Logger(label: "test.http")

    func client(
        requestTimeout: Duration = .seconds(10), caFile: String? = nil, maxResponseBytes: Int = 1 << 20
    ) throws -> HTTPClient {
        try HTTPClient(
            configuration: .init(
                connectTimeout: .seconds(5), requestTimeout: requestTimeout, caFile: caFile, maxResponseBytes: maxResponseBytes,
                useProxyEnvironment: false),
            logger: logger)
    }

    @Test func postsHeadersAndBodyAndReadsTheAnswer() async throws {
        let server = try TestHTTPServer { request, _ in
            .reply(
                201, headers: ["Content-Type": "application/json", "Retry-After": "7", "X-Echo": request.headers["x-test"] ?? "none"],
                body: request.body.reversed())
        }
        let http = try client()
        let response = try await http.post(
            server.url + "/v1/batches", headers: [HTTPHeader("X-Test", "hello"), HTTPHeader("Content-Type", "application/octet-stream")],
            body: [1, 2, 3, 0, 255])
        #expect(response.status == 201)
        #expect(response.body == [255, 0, 3, 2, 1])
        #expect(response.header("content-type") == "application/json")
        #expect(response.header("RETRY-AFTER") == "7")
        #expect(response.header("x-echo") == "hello")
        #expect(!response.bodyTruncated)
        let request = try #require(server.requests.first)
        #expect(request.method == "POST")
        #expect(request.path == "/v1/batches")
        #expect(request.headers["content-type"] == "application/octet-stream")
        #expect(request.headers["content-length"] == "5")
        #expect(request.headers["expect"] == nil)
        #expect(request.body == [1, 2, 3, 0, 255])
    }

    @Test func reusesOneConnectionForSeveralRequests() async throws {
        let server = try TestHTTPServer { _, index in .reply(200, body: Array("answer \(index)".utf8)) }
        let http = try client()
        for index in 0..<5 {
            let response = try await http.post(server.url + "/x", headers: [], body: Array(repeating: UInt8(index), count: 2000))
            #expect(String(decoding: response.body, as: UTF8.self) == "answer \(index)")
        }
        #expect(server.requests.count == 5)
        #expect(server.connectionCount == 1)
        #expect(server.requests.allSatisfy { $0.connection == 1 })
    }

    @Test func reconnectsAfterTheServerClosedTheConnection() async throws {
        // A kept-alive connection that closes without an answer: libcurl re-sends once on a fresh connection; when that
        // one closes too, the request fails. The next request connects again.
        let server = try TestHTTPServer(script: [.reply(200), .close, .close], then: .reply(204))
        let http = try client()
        #expect(try await http.post(server.url, headers: [], body: [1]).status == 200)
        let error = await #expect(throws: HTTPClientError.self) { try await http.post(server.url, headers: [], body: [2]) }
        #expect(error?.kind == .transport)
        #expect(try await http.post(server.url, headers: [], body: [3]).status == 204)
        #expect(server.requests.map(\.body) == [[1], [2], [2], [3]])
        #expect(server.connectionCount == 3)
    }

    /// A tester (2026-12-06): bytes that are not HTTP were shown in `status` as a "configuration error", sending the
    /// installer to agent.toml for what is the peer.
    @Test func anAnswerThatIsNotHTTPIsATransportError() async throws {
        let server = try TestHTTPServer { _, _ in .raw(Array("\u{1}\u{2}garbage that is not HTTP\r\n".utf8)) }
        let http = try client()
        let error = await #expect(throws: HTTPClientError.self) { try await http.post(server.url, headers: [], body: [1]) }
        #expect(error?.kind == .transport, "\(String(describing: error))")
        #expect(error?.description.contains("the answer is not HTTP") == true, "\(String(describing: error))")
    }

    @Test func capsTheResponseBody() async throws {
        let server = try TestHTTPServer { _, _ in .reply(200, body: Array(repeating: 7, count: 100_000)) }
        let http = try client(maxResponseBytes: 1000)
        let response = try await http.post(server.url, headers: [], body: [])
        #expect(response.status == 200)
        #expect(response.body.count == 1000)
        #expect(response.bodyTruncated)
        #expect(server.requests.first?.body == [])
    }

    @Test func abandonsAHangingServerAfterTheRequestTimeout() async throws {
        let server = try TestHTTPServer { _, _ in .hang }
        let http = try client(requestTimeout: .milliseconds(800))
        let started = ContinuousClock.now
        let error = await #expect(throws: HTTPClientError.self) { try await http.post(server.url, headers: [], body: [1]) }
        let elapsed = ContinuousClock.now - started
        #expect(error?.kind == .timedOut)
        #expect(elapsed >= .milliseconds(700))
        #expect(elapsed < .seconds(5))
    }

    @Test func cancellingTheTaskAbandonsTheRequest() async throws {
        let server = try TestHTTPServer { _, _ in .hang }
        let http = try client(requestTimeout: .seconds(30))
        let task = Task { try await http.post(server.url, headers: [], body: [1]) }
        #expect(await server.waitForRequests(1))
        let started = ContinuousClock.now
        task.cancel()
        let result = await task.result
        #expect(ContinuousClock.now - started < .seconds(5))
        #expect(throws: HTTPClientError.self) { try result.get() }
        if case .failure(let error as HTTPClientError) = result { #expect(error.kind == .cancelled) }
    }

    @Test("beforeSending runs once the connection is up, before the request; false withholds it and nothing reaches the server")
    func beforeSendingWithholds() async throws {
        let server = try TestHTTPServer { _, _ in .reply(200) }
        let http = try client()
        let calls = Counter()
        let withheld = await #expect(throws: HTTPClientError.self) {
            try await http.post(server.url + "/v1/batches", headers: [], body: [1, 2, 3], beforeSending: { calls.increment(); return false })
        }
        #expect(withheld?.kind == .withheld)
        #expect(calls.value == 1)
        #expect(server.requests.isEmpty, "a withheld request sends nothing")
        // The connection was up when the check ran (the server accepts it in its own time, after libcurl let it go).
        #expect(await eventually { server.connectionCount == 1 }, "the check ran after the connection was up")
        // The next request on the same handle goes, and the check that said yes ran before it did.
        let response = try await http.post(server.url + "/v1/batches", headers: [], body: [4], beforeSending: { calls.increment(); return true })
        #expect(response.status == 200)
        #expect(calls.value == 2)
        #expect(server.requests.map(\.body) == [[4]])
        // Without a check the client never calls the last one.
        #expect(try await http.post(server.url, headers: [], body: [5]).status == 200)
        #expect(calls.value == 2)
    }

    @Test("A request that cannot connect never calls beforeSending: nothing of it can have reached the server")
    func beforeSendingNotCalledWithoutConnection() async throws {
        let port = try freePort()
        let http = try client()
        let calls = Counter()
        let error = await #expect(throws: HTTPClientError.self) {
            try await http.post("http://127.0.0.1:\(port)/", headers: [], body: [1], beforeSending: { calls.increment(); return true })
        }
        #expect(error?.kind == .connectFailed)
        #expect(calls.value == 0)
    }

    @Test func connectionRefusedIsNamed() async throws {
        let port = try freePort()  // bound and released, never listened on: connections are refused
        let http = try client()
        let error = await #expect(throws: HTTPClientError.self) { try await http.post("http://127.0.0.1:\(port)/", headers: [], body: [1]) }
        #expect(error?.kind == .connectFailed)
        #expect(error?.summary == "connection refused")
        #expect(error?.description.contains("127.0.0.1") == true)
    }

    @Test func tlsToAPlainHTTPPortFailsClearly() async throws {
        let server = try TestHTTPServer { _, _ in .reply(200) }
        let http = try client()
        let error = await #expect(throws: HTTPClientError.self) {
            try await http.post("https://127.0.0.1:\(server.port)/", headers: [], body: [1])
        }
        #expect(error?.kind == .tls)
        #expect(error?.description.hasPrefix("TLS failure: ") == true)
        #expect((error?.detail.count ?? 0) > 5)
    }

    @Test func aMissingCAFileIsRefusedUpFront() throws {
        let path = "/nonexistent/farmgate-test/ca.pem"
        let error = #expect(throws: HTTPClientError.self) { try client(caFile: path) }
        #expect(error?.kind == .configuration)
        #expect(error?.description.contains(path) == true)
    }

    @Test func aCAFileThatIsNotPEMFailsTheTLSHandshakeClearly() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("farmgate-ca-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let caFile = directory.appendingPathComponent("ca.pem").path
        try Data("not a certificate\n".utf8).write(to: URL(fileURLWithPath: caFile))
        let server = try TestHTTPServer { _, _ in .reply(200) }
        let http = try client(caFile: caFile)
        let error = await #expect(throws: HTTPClientError.self) {
            try await http.post("https://127.0.0.1:\(server.port)/", headers: [], body: [1])
        }
        #expect(error?.kind == .tls)
        #expect(server.requests.isEmpty)
    }
}

/// Counts calls from any thread (the HTTP client's callbacks run on its own).
final class Counter: Sendable {
    private let count = Atomic<Int>(0)
    func increment() { count.add(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}
