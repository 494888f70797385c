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

/// Refusals whose message named another cause than the request's (tester 20, F4): a repeated key header read as a
/// malformed key, both body framings and HTTP/2's preface as the parser's internal error names, junk after a gzip
/// member as a bad gzip header; and an HTTP/0.9 request line that got no answer until `header_timeout`.
@Suite("Refusal messages")
struct RefusalMessageTests {
    @Test("two Authorization or two Farmgate-Key headers, each a valid key, are 401 saying the header was given twice")
    func repeatedKeyHeader() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let batch = buffer(BatchJSON.encode(try phBatch(sequences: 1...1)))
        try await fixture.app().test(.router) { client in
            for (name, value) in [
                (HTTPField.Name.authorization, "Bearer \(fixture.deviceKey.text)"), (deviceKeyField, fixture.deviceKey.text),
            ] {
                var headers: HTTPFields = [.contentType: "application/json"]
                headers.append(HTTPField(name: name, value: value))
                headers.append(HTTPField(name: name, value: value))
                let response = try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: headers, body: batch)
                let message = try expectError(response, .unauthorized, "unauthorized")
                #expect(message == "the request has 2 \(name.rawName) headers; send the key in exactly one", "\(message)")
            }
            var reads = HTTPFields()
            reads.append(HTTPField(name: .authorization, value: "Bearer \(fixture.readToken.text)"))
            reads.append(HTTPField(name: .authorization, value: "Bearer \(fixture.readToken.text)"))
            let read = try await client.execute(uri: "/v1/farms/f1/latest", method: .get, headers: reads)
            #expect(try expectError(read, .unauthorized, "unauthorized").contains("2 Authorization headers"))
            // One of each is still the Authorization one, as before.
            var both = bearer(fixture.deviceKey)
            both[deviceKeyField] = fixture.secondDeviceKey.text
            both[.contentType] = "application/json"
            #expect(try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: both, body: batch).status == .ok)
        }
    }

    @Test("a gzip body with bytes after its member says so, not that the gzip header is wrong; a second member is still read")
    func gzipTrailingBytes() async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        let json = BatchJSON.encode(try phBatch(sequences: 1...3))
        try await fixture.app().test(.router) { client in
            for junk in [[UInt8]("junk".utf8), [0x0a], [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]] {
                let response = try await client.execute(
                    uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey, encoding: "gzip"),
                    body: buffer(Gzip.compress(json) + junk))
                let message = try expectError(response, .badRequest, IngestErrorCode.malformedBatch)
                #expect(
                    message == "the gzip body has bytes after the end of its compressed data (gzip: \(junk.count) bytes follow the end of the compressed data); send the compressed data alone",
                    "\(message)")
            }
            let two = Gzip.compress(Array(json[..<10])) + Gzip.compress(Array(json[10...]))
            let response = try await client.execute(
                uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(fixture.deviceKey, encoding: "gzip"), body: buffer(two))
            #expect(try decode(IngestReceipt.self, response).accepted == 3)
        }
    }

    @Test(
        "both body framings, Transfer-Encoding twice, a bare LF after the version, HTTP/2's preface and an HTTP/0.9 request line are answered at once, saying what to send instead",
        arguments: [
            (
                "POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                400, "bad_request", "both Content-Length and Transfer-Encoding"
            ),
            (
                "POST /v1/batches HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400, "bad_request",
                "drop Content-Length and keep Transfer-Encoding: chunked"
            ),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "http_version_not_supported", "HTTP/2 only over TLS, chosen by ALPN in the handshake: on this connection send HTTP/1.1"),
            ("GET /healthz\r\n", 505, "http_version_not_supported", "send HTTP/1.1"),
            ("GET /healthz\n", 505, "http_version_not_supported", "send HTTP/1.1"),
            // A tester, 2026-12-07: the version is fine here, the line's end is not (it was 505).
            ("GET /healthz HTTP/1.1\nHost: x\n\n", 400, "bad_request", "the request line ends with a bare LF; end every line of the head with CRLF"),
            // A tester, 2026-12-07: llhttp's "unknown (http_parser error)".
            (
                "POST /v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400,
                "bad_request", "more than one Transfer-Encoding field"
            ),
        ])
    func answeredAtOnce(request: String, status: Int, code: String, says: String) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        var configuration = IngestConfiguration()
        configuration.server.port = 0
        // Far beyond the wait below: an answer is not the header timeout's 408.
        configuration.server.headerTimeout = .seconds(60)
        let app = buildApplication(configuration: configuration, store: fixture.store, registry: .init(), logger: testLogger, now: { testNow })
        try await app.test(.live) { client in
            let port = try #require(client.port)
            let started = ContinuousClock.now
            let (answer, closed) = try await runOffPool(name: "raw-http") { () throws -> ((status: Int, head: String, body: [UInt8])?, Bool) in
                let connection = try RawConnection(port: port)
                _ = connection.send(request)
                let answer = connection.readResponse(timeout: .seconds(5))
                return (answer, connection.readUntilClosed(timeout: .seconds(5)).closed)
            }
            let response = try #require(answer, "no answer to \(request.debugDescription)")
            #expect(started.duration(to: .now) < .seconds(3))
            #expect(response.status == status, "\(response.head)")
            let body = try JSONDecoder().decode(APIErrorBody.self, from: Data(response.body))
            #expect(body.error.code == code)
            #expect(body.error.message.contains(says), "\(body.error.message)")
            #expect(closed)
        }
    }
}

extension RefusalMessageTests {
    /// A pipelined request whose head is cut by the end of a read, after a whole request in that read: the next read
    /// begins inside the head (`Bearer KEY`, `d2 HTTP/1.1`), which looks like an HTTP/0.9 request line but is not one.
    /// It was answered 505 and the connection closed, which lost the answers still on their way to a pipelining client.
    @Test(
        "the rest of a pipelined head that a read cut is not taken for an HTTP/0.9 request line",
        arguments: [["two words\r\n\r\n"], ["words\r\n\r\n"], ["two words\r\n", "\r\n"]])
    func cutPipelinedHead(rest: [String]) async throws {
        let fixture = try await Fixture()
        defer { fixture.close() }
        try await fixture.app().test(.live) { client in
            let port = try #require(client.port)
            let answers = try await runOffPool(name: "raw-http") { () throws -> [(status: Int, head: String, body: [UInt8])] in
                let connection = try RawConnection(port: port)
                _ = connection.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nX-Note: ")
                // The first answer, so that no request is open when the rest of the second head arrives, in reads of its own.
                var answers = connection.readResponses(1, timeout: .seconds(5))
                for piece in rest {
                    Thread.sleep(forTimeInterval: 0.2)
                    _ = connection.send(piece)
                }
                answers += connection.readResponses(1, timeout: .seconds(5))
                return answers
            }
            #expect(answers.map(\.status) == [200, 200], "\(answers.map { $0.head })")
        }
    }
}
