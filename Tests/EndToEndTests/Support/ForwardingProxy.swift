import FarmgateTestSupport
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// A loopback HTTP server between a real agent and a real ingest: it answers what `intercept` says, and forwards every
/// other request to `upstream` and its answer back. Each request is handled on the test server's own connection thread
/// (blocking there is fine: never the concurrency pool).
final class ForwardingProxy: Sendable {
    let server: TestHTTPServer

    /// - Parameters:
    ///   - upstream: The real ingest's base URL.
    ///   - intercept: The answer to give instead of forwarding, or nil to forward.
    ///   - answer: What the client gets for a forwarded request, given the upstream's answer (by default that answer; a
    ///     `.close` loses an answer the ingest gave).
    init(
        to upstream: String, intercept: @escaping @Sendable (RecordedRequest) -> TestResponse?,
        answer: @escaping @Sendable (RecordedRequest, TestResponse) -> TestResponse = { $1 }
    ) throws {
        server = try TestHTTPServer { request, _ in
            if let given = intercept(request) { return given }
            return answer(request, ForwardingProxy.forward(request, to: upstream))
        }
    }

    var url: String { server.url }

    func stop() { server.stop() }

    /// Sends `request` to `upstream` and waits for the answer; a 502 when there is none.
    private static func forward(_ request: RecordedRequest, to upstream: String) -> TestResponse {
        guard let url = URL(string: upstream + request.path) else { return .reply(502) }
        var outgoing = URLRequest(url: url)
        outgoing.httpMethod = request.method
        outgoing.timeoutInterval = 10
        for (name, value) in request.headers where !["host", "content-length", "connection"].contains(name) {
            outgoing.setValue(value, forHTTPHeaderField: name)
        }
        if request.method == "POST" { outgoing.httpBody = Data(request.body) }
        let answer = Mutex2<TestResponse>(.reply(502))
        let done = DispatchSemaphore(value: 0)
        let task = URLSession.shared.dataTask(with: outgoing) { data, response, _ in
            if let response = response as? HTTPURLResponse {
                var headers: [String: String] = [:]
                for name in ["Content-Type", "Retry-After"] {
                    if let value = response.value(forHTTPHeaderField: name) { headers[name] = value }
                }
                answer.set(.reply(response.statusCode, headers: headers, body: Array(data ?? Data())))
            }
            done.signal()
        }
        task.resume()
        done.wait()
        return answer.get()
    }
}
