import Synchronization

/// Checks bearer keys against the store, caching found credentials for a short time.
///
/// A cached credential is trusted for at most ``cacheTTL``, so a revocation takes effect within that time.
/// Unknown key ids are never cached, so a new device works at once.
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
    }

    private let store: any IngestStore
    /// How long a credential read from the store is trusted.
    public let cacheTTL: Duration
    private let maxEntries: Int
    private let cache = Mutex(Cache())

    /// - Parameters:
    ///   - cacheTTL: how long a credential read from the store is trusted; `.zero` disables the cache. Default 2 seconds.
    ///   - maxEntries: how many credentials of each kind are cached at most.
    public init(store: any IngestStore, cacheTTL: Duration = .seconds(2), maxEntries: Int = 10_000) {
        self.store = store
        self.cacheTTL = cacheTTL
        self.maxEntries = maxEntries
    }

    /// Checks a device key.
    ///
    /// - Throws: when the store cannot be reached.
    public func authenticateDevice(_ key: APIKey) async throws -> DeviceResult {
        guard key.kind == .device,
            let credential = try await cached(key, in: \.devices, fetch: { try await store.deviceCredential(keyID: key.keyID) })
        else { return .invalid }
        guard constantTimeEquals(credential.secretHash, key.secretHash) else { return .invalid }
        return credential.revoked ? .revoked : .authenticated(credential.identity)
    }

    /// Checks a read token.
    ///
    /// - Throws: when the store cannot be reached.
    public func authenticateReader(_ key: APIKey) async throws -> ReaderResult {
        guard key.kind == .readToken,
            let credential = try await cached(key, in: \.readers, fetch: { try await store.readTokenCredential(keyID: key.keyID) })
        else { return .invalid }
        guard constantTimeEquals(credential.secretHash, key.secretHash) else { return .invalid }
        return credential.revoked ? .revoked : .authenticated(credential.farm, credential.role)
    }

    /// The credential of `key`'s id: from the cache while fresh, else from the store (and then cached when found).
    private func cached<Credential: Sendable>(
        _ key: APIKey, in table: WritableKeyPath<Cache, [String: Entry<Credential>]>,
        fetch: () async throws -> Credential?
    ) async throws -> Credential? {
        let now = ContinuousClock.now
        if let fresh = cache.withLock({ cache in cache[keyPath: table][key.keyID].flatMap { $0.expires > now ? $0.credential : nil } }) {
            return fresh
        }
        guard let found = try await fetch() else { return nil }
        guard cacheTTL > .zero else { return found }
        let entry = Entry(credential: found, expires: now + cacheTTL)
        let limit = maxEntries
        cache.withLock { cache in
            if cache[keyPath: table].count >= limit { cache[keyPath: table] = cache[keyPath: table].filter { $0.value.expires > now } }
            if cache[keyPath: table].count >= limit { cache[keyPath: table].removeAll() }
            cache[keyPath: table][key.keyID] = entry
        }
        return found
    }
}
