public import FarmgateWire

/// The administration behind `farmgate-ingest farm create|list`, `device create|list|revoke|rotate-key`,
/// `token create|list|revoke` and `export`,
/// as a library so that tests run the same code as the command line.
public struct IngestAdmin: Sendable {
    public let store: any AdministrationStore

    public init(store: any AdministrationStore) {
        self.store = store
    }

    /// Creates a farm named `name` (1 to 64 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or digit).
    public func createFarm(name: String) async throws -> FarmRecord {
        try validateFarmName(name)
        return try await store.createFarm(name: name, createdAt: .now())
    }

    /// Registers a device and returns its new API key. The key is shown only now: the store keeps its hash.
    public func createDevice(farm: String, device: DeviceID) async throws -> APIKey {
        try await newKey(.device, collision: "API key id") { key in
            _ = try await store.createDevice(farm: farm, device: device, keyID: key.keyID, secretHash: key.secretHash, createdAt: .now())
        }
    }

    /// Revokes a device: its key stops working within the credential cache time of running ingests (seconds).
    /// Returns false when it was revoked already. Throws ``IngestStoreError/notFound(_:)`` naming the farm or the device.
    @discardableResult
    public func revokeDevice(farm: String, device: DeviceID) async throws -> Bool {
        try await requireFarm(farm)
        return try await store.revokeDevice(farm: farm, device: device, revokedAt: .now())
    }

    /// Gives a device a new API key and returns it (shown only now: the store keeps its hash). The old key is replaced
    /// in the store, so it stops working at once for new lookups; a running ingest may still accept it from its
    /// credential cache for at most the cache's time to live (seconds). A revoked device becomes usable again with the
    /// new key: this is how a site whose key was revoked, lost or leaked gets back in, keeping its readings and sensors.
    public func rotateDeviceKey(farm: String, device: DeviceID) async throws -> APIKey {
        try await requireFarm(farm)
        return try await newKey(.device, collision: "API key id") { key in
            try await store.rotateDeviceKey(farm: farm, device: device, keyID: key.keyID, secretHash: key.secretHash, rotatedAt: .now())
        }
    }

    /// Creates a read token for `farm` and returns it. It is shown only now: the store keeps its hash.
    public func createReadToken(farm: String, role: ReadRole) async throws -> APIKey {
        try await newKey(.readToken, collision: "token id") { key in
            try await store.createReadToken(farm: farm, role: role, keyID: key.keyID, secretHash: key.secretHash, createdAt: .now())
        }
    }

    /// An unknown farm is named as such, not as an unknown device in it.
    private func requireFarm(_ farm: String) async throws {
        guard try await store.farm(named: farm) != nil else { throw IngestStoreError.notFound("farm '\(farm)'") }
    }

    /// Every farm, by name.
    public func farms() async throws -> [FarmRecord] { try await store.farms() }

    /// The devices of `farm`, by id. Throws ``IngestStoreError/notFound(_:)`` for an unknown farm.
    public func devices(farm: String) async throws -> [DeviceIdentity] {
        guard let record = try await store.farm(named: farm) else { throw IngestStoreError.notFound("farm '\(farm)'") }
        return try await store.devices(farmID: record.id)
    }

    /// The read tokens of `farm` (every farm's when nil), newest first. Throws ``IngestStoreError/notFound(_:)`` for an
    /// unknown farm.
    public func readTokens(farm: String?) async throws -> [ReadTokenRecord] {
        if let farm, try await store.farm(named: farm) == nil { throw IngestStoreError.notFound("farm '\(farm)'") }
        return try await store.readTokens(farm: farm)
    }

    /// Revokes a read token: requests with it are refused within the credential cache time of running ingests
    /// (seconds). Returns false when it was revoked already.
    public func revokeReadToken(keyID: String) async throws -> Bool {
        try await store.revokeReadToken(keyID: keyID)
    }

    /// Draws a key and stores it with `insert`; on a key id collision (one in 2^40, reported by the store as
    /// `alreadyExists` starting with `collision`) draws another, up to five times.
    private func newKey(_ kind: APIKey.Kind, collision: String, _ insert: (APIKey) async throws -> Void) async throws -> APIKey {
        for attempt in 1...5 {
            let key = APIKey.generate(kind: kind)
            do {
                try await insert(key)
                return key
            } catch IngestStoreError.alreadyExists(let what) where what.hasPrefix(collision) && attempt < 5 {
                continue
            }
        }
        throw IngestStoreError.alreadyExists(collision)
    }

    /// Writes every stored reading of `farm` in (device, sequence) order, a page at a time, so that memory stays bounded
    /// whatever the size of the farm.
    ///
    /// - Parameters:
    ///   - format: CSV with a header line, or one JSON object per line.
    ///   - pageSize: readings fetched from the store at once.
    ///   - write: receives the text in pieces, each ending with a newline.
    /// - Returns: the number of readings written.
    @discardableResult
    public func export(farm: String, format: ExportFormat, pageSize: Int = 5_000, write: (String) throws -> Void) async throws -> Int {
        guard let record = try await store.farm(named: farm) else { throw IngestStoreError.notFound("farm '\(farm)'") }
        if format == .csv { try write("device,sensor,sequence,timestamp,value,flags\n") }
        var count = 0
        for device in try await store.devices(farmID: record.id) {
            var after: UInt64?
            while true {
                let page = try await store.exportPage(device: device, afterSequence: after, limit: pageSize)
                guard let last = page.last else { break }
                var text = ""
                for row in page { text += format.line(row) }
                try write(text)
                count += page.count
                after = last.sequence
                if page.count < pageSize { break }
            }
        }
        return count
    }
}

/// How `export` writes readings.
public enum ExportFormat: String, Sendable, CaseIterable {
    /// `device,sensor,sequence,timestamp,value,flags` with flags joined by `|`.
    case csv
    /// `{"device":...,"sensor":...,"sequence":...,"timestamp":...,"value":...,"flags":[...]}` per line.
    case jsonl

    /// One reading as a line, with its newline.
    public func line(_ row: ExportRow) -> String {
        let timestamp = RFC3339.format(row.timestamp)
        let flags = flagNames(row.quality)
        switch self {
        case .csv:
            // Identifiers cannot contain commas or quotes, so no field needs quoting.
            return "\(row.device),\(row.sensor),\(row.sequence),\(timestamp),\(formatValue(row.value)),\(flags.joined(separator: "|"))\n"
        case .jsonl:
            let flagList = flags.map { "\"\($0)\"" }.joined(separator: ",")
            return
                "{\"device\":\"\(row.device)\",\"sensor\":\"\(row.sensor)\",\"sequence\":\(row.sequence),\"timestamp\":\"\(timestamp)\",\"value\":\(formatValue(row.value)),\"flags\":[\(flagList)]}\n"
        }
    }
}

/// A finite value in its shortest exact decimal form (`6.42`, `21`, `1250.5`).
func formatValue(_ value: Double) -> String {
    guard value.isFinite else { return "null" }
    if value == value.rounded(), value.magnitude < 1e15 { return String(Int64(value)) }
    return "\(value)"
}

/// Why a farm name is refused.
public struct FarmNameError: Error, Sendable, Hashable, CustomStringConvertible {
    public let name: String
    public var description: String {
        "invalid farm name '\(name.prefix(80))': use 1 to 64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
    }
}

/// Farm names follow the identifier rules of devices and sensors, so they fit URLs and file names unquoted.
public func validateFarmName(_ name: String) throws(FarmNameError) {
    // DeviceID enforces exactly these rules; reuse them rather than repeat them.
    do { _ = try DeviceID(name) } catch { throw FarmNameError(name: name) }
}
