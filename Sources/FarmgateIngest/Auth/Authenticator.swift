import Synchronization

/// Checks bearer keys against the store, caching found credentials for a short time.
///
/// A cached credential is trusted for at most ``cacheTTL``, so a revocation takes effect within that time.
///
/// Unknown key ids are remembered too, for ``negativeCacheTTL`` (off by default, 2 s in `serve`): a client repeating a
/// wrong key is answered from memory instead of the store's single reader thread, and a device created after a failed
/// attempt works within that time. That cache holds at most `maxEntries` ids: a flood of random ids replaces its
/// expired entries and, when all are fresh, starts it afresh, so memory stays bounded (the per-address limit on failed
/// authentications, ``FailedAuthenticationLimiter``, is what keeps such a flood away from the store).
public final class Authenticator: Sendable {
    /// The result of checking a device key.
    public enum DeviceResult: Sendable, Hashable {
        case authenticated(DeviceIdentity)
        /// No such key id, or the secret does not match.
        case invalid
        /// The key was valid but its device is revoked.
        case revoked
    }

    /// The result of checking a read token.
    public enum ReaderResult: Sendable, Hashable {
        case authenticated(FarmRecord, ReadRole)
        case invalid
        case revoked
    }

    private struct Entry<Credential: Sendable>: Sendable {
        var credential: Credential
        var expires: ContinuousClock.Instant
    }

    private struct Cache {
        var devices: [String: Entry<DeviceCredential>] = [:]
        var readers: [String: Entry<ReadTokenCredential>] = [:]
        /// Unknown key ids (prefixed by their kind) and when each stops being trusted as unknown.
        var unknown: [String: ContinuousClock.Instant] = [:]
        /// Keys that authenticated within ``Authenticator/provenTTL``: their id (prefixed by kind) and secret's hash.
        var proven: [String: Entry<[UInt8]>] = [:]
    }

    /// How long a key that authenticated counts as proven (``isProven(_:)``).
    public static let provenTTL: Duration = .seconds(86_400)

    private let store: any CredentialStore
    /// How long a credential read from the store is trusted.
    public let cacheTTL: Duration
    /// How long a key id the store did not know is answered as unknown without asking again.
    public let negativeCacheTTL: Duration
    private let maxEntries: Int
    private let cache = Mutex(Cache())

    /// - Parameters:
    ///   - cacheTTL: how long a credential read from the store is trusted; `.zero` disables the cache. Default 2 seconds.
    ///   - negativeCacheTTL: how long an unknown key id is remembered as unknown; `.zero` (the default) disables it.
    ///   - maxEntries: how many credentials of each kind, and how many unknown ids, are cached at most.
    public init(store: any CredentialStore, cacheTTL: Duration = .seconds(2), negativeCacheTTL: Duration = .zero, maxEntries: Int = 10_000) {
        self.store = store
        self.cacheTTL = cacheTTL
        self.negativeCacheTTL = negativeCacheTTL
        self.maxEntries = maxEntries
    }

    /// Checks a device key.
    ///
    /// - Throws: when the store cannot be reached.
    public func authenticateDevice(_ key: APIKey) async throws -> DeviceResult {
        guard key.kind == .device,
            let credential = try await cached(key, in: \.devices, fetch: { try await store.deviceCredential(keyID: key.keyID) })
        else { return .invalid }
        let hash = key.secretHash
        guard constantTimeEquals(credential.secretHash, hash) else { return .invalid }
        guard !credential.revoked else { return .revoked }
        remember(key, hash: hash)
        return .authenticated(credential.identity)
    }

    /// Checks a read token.
    ///
    /// - Throws: when the store cannot be reached.
    public func authenticateReader(_ key: APIKey) async throws -> ReaderResult {
        guard key.kind == .readToken,
            let credential = try await cached(key, in: \.readers, fetch: { try await store.readTokenCredential(keyID: key.keyID) })
        else { return .invalid }
        let hash = key.secretHash
        guard constantTimeEquals(credential.secretHash, hash) else { return .invalid }
        guard !credential.revoked else { return .revoked }
        remember(key, hash: hash)
        return .authenticated(credential.farm, credential.role)
    }

    /// Whether `key` (its id and secret) authenticated within ``provenTTL``, from memory only: an address over its limit
    /// of failed authentications is still served for such a key (``AuthenticationGate``). Many sites can share one
    /// public address (a carrier's NAT); one client's flood of wrong keys there would otherwise hold all their uploads.
    /// The key is then checked as any other (a revocation still applies).
    func isProven(_ key: APIKey) -> Bool {
        let now = ContinuousClock.now
        guard let entry = cache.withLock({ $0.proven["\(key.kind.rawValue)/\(key.keyID)"] }), entry.expires > now else { return false }
        return constantTimeEquals(entry.credential, key.secretHash)
    }

    private func remember(_ key: APIKey, hash: [UInt8]) {
        let now = ContinuousClock.now
        let limit = maxEntries
        let name = "\(key.kind.rawValue)/\(key.keyID)"
        cache.withLock { cache in
            // Refreshed at most once a minute per key: the common case is a read of the table only.
            if let entry = cache.proven[name], entry.expires > now + Self.provenTTL - .seconds(60), entry.credential == hash { return }
            if cache.proven.count >= limit { cache.proven = cache.proven.filter { $0.value.expires > now } }
            if cache.proven.count >= limit { cache.proven.removeAll(keepingCapacity: true) }
            cache.proven[name] = Entry(credential: hash, expires: now + Self.provenTTL)
        }
    }

    /// A read token's farm and role when its credential is cached and fresh, the secret matches and it is not revoked;
    /// nil in every other case (the caller then goes through ``authenticateReader(_:)``, which answers the rest). Never
    /// asks the store.
    ///
    /// - Parameter secretHash: `key.secretHash`, which the caller may have kept from an earlier request.
    func cachedReader(_ key: APIKey, secretHash: [UInt8]) -> (FarmRecord, ReadRole)? {
        guard key.kind == .readToken else { return nil }
        let now = ContinuousClock.now
        guard let credential = cache.withLock({ Self.fresh(key.keyID, in: $0.readers, now: now) }),
            constantTimeEquals(credential.secretHash, secretHash), !credential.revoked
        else { return nil }
        return (credential.farm, credential.role)
    }

    /// The cached credential of `keyID` while it is fresh.
    private static func fresh<Credential>(_ keyID: String, in table: [String: Entry<Credential>], now: ContinuousClock.Instant) -> Credential? {
        table[keyID].flatMap { $0.expires > now ? $0.credential : nil }
    }

    /// The credential of `key`'s id: from the cache while fresh, else from the store (and then cached when found).
    private func cached<Credential: Sendable>(
        _ key: APIKey, in table: WritableKeyPath<Cache, [String: Entry<Credential>]>,
        fetch: () async throws -> Credential?
    ) async throws -> Credential? {
        let now = ContinuousClock.now
        let unknownKey = key.kind.rawValue + key.keyID
        let (fresh, knownUnknown) = cache.withLock { cache in
            (
                Self.fresh(key.keyID, in: cache[keyPath: table], now: now),
                cache.unknown[unknownKey].map { $0 > now } ?? false
            )
        }
        if let fresh { return fresh }
        if knownUnknown { return nil }
        let limit = maxEntries
        guard let found = try await fetch() else {
            guard negativeCacheTTL > .zero else { return nil }
            let expires = now + negativeCacheTTL
            cache.withLock { cache in
                if cache.unknown.count >= limit { cache.unknown = cache.unknown.filter { $0.value > now } }
                if cache.unknown.count >= limit { cache.unknown.removeAll(keepingCapacity: true) }
                cache.unknown[unknownKey] = expires
            }
            return nil
        }
        guard cacheTTL > .zero else { return found }
        let entry = Entry(credential: found, expires: now + cacheTTL)
        cache.withLock { cache in
            cache.unknown[unknownKey] = nil
            if cache[keyPath: table].count >= limit { cache[keyPath: table] = cache[keyPath: table].filter { $0.value.expires > now } }
            if cache[keyPath: table].count >= limit { cache[keyPath: table].removeAll() }
            cache[keyPath: table][key.keyID] = entry
        }
        return found
    }

    /// How many unknown key ids are remembered (tests check the bound).
    var unknownCount: Int { cache.withLock { $0.unknown.count } }
}
