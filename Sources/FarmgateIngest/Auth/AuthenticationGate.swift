import Hummingbird
import Logging

/// Authenticates requests in the order that keeps unauthenticated floods away from the store:
///
/// 1. a client address over its limit of failed authentications is answered 429 with `Retry-After` at once, unless
///    its key authenticated within a day (``Authenticator/isProven(_:)``, from memory), so the store does not see the
///    flood, and the sites that share the address (a carrier's NAT) keep uploading;
/// 2. the key's form is checked (no store access);
/// 3. the ``Authenticator`` answers from its caches (known and unknown ids) or, only then, asks the store.
///
/// Every 401 (no key, a malformed key, an unknown or wrong key, a revoked one) takes a token from the client address's
/// bucket; successes take none. A legitimate agent whose key was revoked retries with backoff and never reaches the
/// limit; a flood of wrong keys reaches it after `auth_failure_burst` attempts and then costs the store at most
/// `auth_failures_per_second` look-ups per second and address.
struct AuthenticationGate: Sendable {
    let authenticator: Authenticator
    let failures: FailedAuthenticationLimiter
    let logger: Logger

    /// The device of the key in `request`, or the error to answer.
    func device(_ request: Request, client: ClientAddress) async throws(APIError) -> DeviceIdentity {
        let key = try admitted(request, expected: .device, client: client)
        let result: Authenticator.DeviceResult
        do {
            result = try await authenticator.authenticateDevice(key)
        } catch {
            logger.storeFailure("store failed during authentication", level: .warning, error: error)
            throw APIError.unavailable()
        }
        switch result {
        case .authenticated(let identity):
            return identity
        case .invalid:
            failures.recordFailure(client)
            throw APIError.unauthorized(
                "the device key is not valid; check the key in the agent configuration, or give the device a new one with `farmgate-ingest device rotate-key`")
        case .revoked:
            failures.recordFailure(client)
            throw APIError.revoked("device key")
        }
    }

    /// The well-formed key of `request`, unless its address is over its limit of failed authentications and the key is
    /// not one that authenticated lately (then 429). A malformed key counts as a failure.
    private func admitted(_ request: Request, expected: APIKey.Kind, client: ClientAddress) throws(APIError) -> APIKey {
        var limited: APIError?
        do { try failures.admit(client) } catch { limited = error }
        let key: APIKey
        do {
            key = try bearerKey(request, expected: expected)
        } catch {
            if let limited { throw limited }
            failures.recordFailure(client)
            throw error
        }
        if let limited, !authenticator.isProven(key) { throw limited }
        return key
    }

    /// The farm, role and key id of the read token in `request`, or the error to answer.
    func reader(_ request: Request, client: ClientAddress) async throws(APIError) -> (farm: FarmRecord, role: ReadRole, keyID: String) {
        let key = try admitted(request, expected: .readToken, client: client)
        let result: Authenticator.ReaderResult
        do {
            result = try await authenticator.authenticateReader(key)
        } catch {
            logger.storeFailure("store failed during authentication", level: .warning, error: error)
            throw APIError.unavailable()
        }
        switch result {
        case .authenticated(let farm, let role):
            return (farm, role, key.keyID)
        case .invalid:
            failures.recordFailure(client)
            throw APIError.unauthorized("the read token is not valid; create one with `farmgate-ingest token create --farm NAME --role viewer`")
        case .revoked:
            failures.recordFailure(client)
            throw APIError.revoked("read token")
        }
    }
}
