import ArgumentParser
import FarmgateIngest
import FarmgateWire
import Foundation

// The listing commands of farms, devices and read tokens, and the revocation of a read token: what an operator needs to
// see what the ingest holds and to withdraw a leaked token (an `admin` one can silence every alert of its farm).

struct FarmList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list", abstract: "List the farms, by name (--json: an array of names).")

    @Flag(help: "Print JSON.") var json = false
    @OptionGroup var options: ConfigOption

    func run() async throws {
        let farms = try await options.administer { try await $0.farms() }
        if json { return try printJSON(farms.map(\.name)) }
        if farms.isEmpty { return print("No farms; make one with `farmgate-ingest farm create NAME`.") }
        for farm in farms { print(farm.name) }
    }
}

struct DeviceList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list", abstract: "List a farm's devices, by id (--json: an array of ids). An unknown farm exits 1.")

    @Option(help: "The farm whose devices to list.") var farm: String
    @Flag(help: "Print JSON.") var json = false
    @OptionGroup var options: ConfigOption

    func validate() throws { try validateFarmArgument(farm) }

    func run() async throws {
        let farm = self.farm
        let devices = try await options.administer { try await $0.devices(farm: farm) }
        if json { return try printJSON(devices.map(\.device.rawValue)) }
        if devices.isEmpty { return print("No devices in farm \(farm); register one with `farmgate-ingest device create` or an enrollment token.") }
        for device in devices { print(device.device.rawValue) }
    }
}

/// A read token as `token list --json` prints it.
struct ReadTokenListing: Encodable {
    var keyID: String
    var farm: String
    var role: String
    var created: String
    var state: String

    enum CodingKeys: String, CodingKey {
        case keyID = "key_id"
        case farm, role, created, state
    }

    init(_ record: ReadTokenRecord) {
        keyID = record.keyID
        farm = record.farm
        role = record.role.rawValue
        created = RFC3339.format(record.createdAt)
        state = record.revoked ? "revoked" : "active"
    }
}

struct ReadTokenList: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list",
        abstract: "List read tokens, newest first.",
        discussion: """
            Columns: KEY ID (the <id> of fgr_<id>_<secret>; the secret is never stored, so never shown), FARM, ROLE, \
            CREATED (RFC 3339, UTC), STATE (active or revoked). --json prints an array of objects with key_id, farm, role, \
            created and state. An unknown --farm exits 1.
            """)

    @Option(help: "Only this farm's.") var farm: String?
    @Flag(help: "Print JSON.") var json = false
    @OptionGroup var options: ConfigOption

    func validate() throws {
        if let farm { try validateFarmArgument(farm) }
    }

    func run() async throws {
        let farm = self.farm
        let listings = try await options.administer { try await $0.readTokens(farm: farm) }.map(ReadTokenListing.init)
        if json { return try printJSON(listings) }
        if listings.isEmpty {
            return print("No read tokens\(farm.map { " in farm \($0)" } ?? ""); make one with `farmgate-ingest token create`.")
        }
        print("KEY ID\tFARM\tROLE\tCREATED\tSTATE")
        for token in listings { print("\(token.keyID)\t\(token.farm)\t\(token.role)\t\(token.created)\t\(token.state)") }
    }
}

struct ReadTokenRevoke: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "revoke",
        abstract: "Revoke a read token: requests with it are refused (401 revoked) within seconds.",
        discussion: """
            Give the token's id (as `token list` shows it) or the whole token fgr_<id>_<secret>. A running ingest trusts a \
            token it checked for at most its credential cache's 2 seconds. A token already revoked is left as it is: the \
            command says so and exits 0. An unknown id exits 1; a malformed id, or a key that is no read token, exits 64. \
            A revoked token cannot be restored: create a new one.
            """)

    @Argument(help: ArgumentHelp("The token's id (8 characters a-z 2-7), or the whole token fgr_<id>_<secret>.", valueName: "key-id"))
    var token: String

    @OptionGroup var options: ConfigOption

    func validate() throws { _ = try keyID() }

    /// The token id of the argument: the id itself, or the `<id>` of a whole `fgr_` token.
    func keyID() throws -> String { try keyIDArgument(token, kind: .readToken) }

    func run() async throws {
        let keyID = try keyID()
        let changed = try await options.administer { admin in
            do {
                return try await admin.revokeReadToken(keyID: keyID)
            } catch IngestStoreError.notFound(let what) {
                throw failure("\(IngestStoreError.notFound(what)); `farmgate-ingest token list` lists this ingest's read tokens")
            }
        }
        print(
            changed
                ? "Revoked read token \(keyID): requests with it are refused within seconds."
                : "Read token \(keyID) was revoked already; nothing changed.")
    }
}

/// The key id of a command-line argument naming a key of `kind`: the id itself, or the `<id>` of the whole key
/// (`fgr_<id>_<secret>`). Never echoes what may be a secret: at most a mangled key's first 12 characters, and of another
/// kind's key its kind and id.
func keyIDArgument(_ argument: String, kind: APIKey.Kind) throws -> String {
    func name(_ kind: APIKey.Kind) -> String {
        switch kind {
        case .device: "a device key"
        case .readToken: "a read token"
        case .enrollment: "an enrollment token"
        }
    }
    func list(_ kind: APIKey.Kind) -> String { kind == .enrollment ? "enroll-token list" : kind == .readToken ? "token list" : "device list" }
    let text = argument.trimmingCharacters(in: .whitespacesAndNewlines)
    if text.contains("_") {
        guard let key = APIKey(parsing: text) else {
            let shown = text.count > 12 ? "\(text.prefix(12))…" : text
            throw ValidationError(
                "'\(shown)' is not \(name(kind)) (\(kind.rawValue)_<id>_<secret>) or a token id; copy the id from `farmgate-ingest \(list(kind))`")
        }
        guard key.kind == kind else {
            let revoke =
                switch key.kind {
                case .device: "revoke a device with `farmgate-ingest device revoke`"
                case .readToken: "revoke it with `farmgate-ingest token revoke`"
                case .enrollment: "revoke it with `farmgate-ingest enroll-token revoke`"
                }
            throw ValidationError("that is \(name(key.kind)) (\(key.kind.rawValue)_\(key.keyID)_…), not \(name(kind)); \(revoke)")
        }
        return key.keyID
    }
    guard APIKey.isKeyID(text) else {
        throw ValidationError(
            "'\(text.prefix(40))' is not \(name(kind)) id: an id is \(APIKey.keyIDLength) characters of a-z and 2-7, as `farmgate-ingest \(list(kind))` shows it")
    }
    return text
}
