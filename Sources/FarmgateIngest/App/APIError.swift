public import FarmgateWire
import Foundation
public import Hummingbird

/// An error answer: an HTTP status with a JSON ``APIErrorBody`` whose code is stable and whose message says how to fix it.
public struct APIError: Error, HTTPResponseError, Sendable, CustomStringConvertible {
    public var status: HTTPResponse.Status
    /// Stable, machine-readable.
    public var code: String
    /// For a person: what was wrong and how to fix it.
    public var message: String
    /// Extra headers (`Retry-After`, `WWW-Authenticate`).
    public var headers: HTTPFields
    /// With `unsupported_format_version`: the binary format versions this ingest reads (``APIErrorBody/Detail/acceptedVersions``).
    public var acceptedVersions: [Int]?
    /// With `stale_context`: the ingest's newest readings of the frame's sensors (``APIErrorBody/Detail/context``).
    public var context: [ContextEntryJSON]?

    public init(
        _ status: HTTPResponse.Status, code: String, message: String, headers: HTTPFields = [:], acceptedVersions: [Int]? = nil,
        context: [ContextEntryJSON]? = nil
    ) {
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.acceptedVersions = acceptedVersions
        self.context = context
    }

    public var description: String { "\(status.code) \(code): \(message)" }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        var headers = self.headers
        headers[.contentType] = jsonContentType
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: jsonBuffer(APIErrorBody(code: code, message: message, acceptedVersions: acceptedVersions, context: self.context))))
    }

    // MARK: The errors the ingest answers with

    static func unauthorized(_ message: String) -> APIError {
        APIError(.unauthorized, code: "unauthorized", message: message, headers: [.wwwAuthenticate: "Bearer"])
    }

    static func revoked(_ what: String) -> APIError {
        APIError(
            .unauthorized, code: "revoked",
            message: "this \(what) has been revoked; ask the operator of the ingest for a new one", headers: [.wwwAuthenticate: "Bearer"])
    }

    /// 503 for a store call that failed with `error`: says why when the store knows (its disk is full, its file was
    /// removed under it), so that the operator reading the agent's status looks in the right place; else that the store
    /// cannot be reached.
    static func unavailable(_ error: (any Error)? = nil, retryAfterSeconds: Int = 5) -> APIError {
        let reason =
            switch error.flatMap(StoreWriteProblem.init) {
            case .diskFull?: "the ingest cannot write to its store right now: the store's disk is full (SQLITE_FULL)"
            case .fileReplaced?:
                "the ingest's store file was removed or replaced while it ran, and nothing it stores would last until its operator restarts it"
            case nil: "the ingest cannot reach its store right now"
            }
        return APIError(
            .serviceUnavailable, code: IngestErrorCode.unavailable, message: "\(reason); nothing was stored, retry after the Retry-After delay",
            headers: [.retryAfter: String(retryAfterSeconds)])
    }

    /// 501 for a method the ingest implements on no path (RFC 9110 §9.1); `method` nil when the HTTP parser refused it
    /// before it was read.
    static func methodNotImplemented(_ method: String?) -> APIError {
        let what =
            method.map { "the ingest implements no method \(String($0.prefix(100)).debugDescription)" } ?? "the ingest does not implement the request's method"
        return APIError(
            .notImplemented, code: "method_not_implemented",
            message: "\(what); it serves GET, HEAD, POST, PUT and DELETE (methods are case-sensitive), see the HTTP API in the README")
    }

    /// Converts any error to an API error; errors that are not ours become 500 `internal_error` (their details are logged,
    /// not sent).
    static func from(_ error: any Error) -> APIError? {
        switch error {
        case let error as APIError:
            return error
        case let error as HTTPError:
            return APIError(error.status, code: defaultCode(for: error.status), message: error.body ?? defaultMessage(for: error.status), headers: error.headers)
        default:
            return nil
        }
    }

    static func defaultCode(for status: HTTPResponse.Status) -> String {
        switch status.code {
        case 400: "bad_request"
        case 401: "unauthorized"
        case 403: "forbidden"
        case 404: "not_found"
        case 405: "method_not_allowed"
        case 413: "payload_too_large"
        case 415: "unsupported_media_type"
        case 429: "rate_limited"
        case 503: "unavailable"
        default: status.code >= 500 ? "internal_error" : "bad_request"
        }
    }

    static func defaultMessage(for status: HTTPResponse.Status) -> String {
        switch status.code {
        case 404: "no such resource; see the HTTP API in the README for the paths the ingest serves"
        case 405: "this method is not allowed on this path; see the HTTP API in the README"
        case 413: "the request body is too large; send smaller batches"
        default: status.reasonPhrase
        }
    }
}

let jsonEncoder: JSONEncoder = {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return encoder
}()

/// `value` as a JSON body. Encoding our own plain structs cannot fail; if it ever did, the answer is a fixed error body.
func jsonBuffer(_ value: some Encodable) -> ByteBuffer {
    do {
        return ByteBuffer(bytes: try jsonEncoder.encode(value))
    } catch {
        return ByteBuffer(string: #"{"error":{"code":"internal_error","message":"the answer could not be encoded"}}"#)
    }
}

/// A 200 (or `status`) answer with `value` as JSON.
func jsonResponse(_ value: some Encodable, status: HTTPResponse.Status = .ok) -> Response {
    jsonResponse(body: jsonBuffer(value), status: status)
}

/// The `Content-Type` of every JSON answer.
let jsonContentType = "application/json; charset=utf-8"

/// A 200 (or `status`) answer whose body is already JSON.
func jsonResponse(body: ByteBuffer, status: HTTPResponse.Status = .ok) -> Response {
    Response(status: status, headers: [.contentType: jsonContentType], body: ResponseBody(byteBuffer: body))
}
