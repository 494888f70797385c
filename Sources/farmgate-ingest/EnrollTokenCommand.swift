import ArgumentParser
import FarmgateCLI
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Foundation

// MARK: enroll-token

struct EnrollTokenCommand: AsyncParsableCommand, SubcommandsOnly {
    static let configuration = CommandConfiguration(
        commandName: "enroll-token", abstract: "One-time tokens a site exchanges for its device key (farmgate enroll).",
        subcommands: [Create.self, List.self, Revoke.self])

    struct Create: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create",
            abstract: "Create a one-time enrollment token for a device and print it (shown only once).",
            discussion: """
                On the site, `farmgate enroll <ingest URL> <token>` exchanges the token for the device's key and writes it \
                where the agent reads it. The device need not exist: the exchange creates it; if it exists, it gets a new key \
                and its old key stops working (its sensors and readings are kept). A token works once, until it expires; \
                the store keeps only its hash.
                """)

        @OptionGroup var device: DeviceCommand.DeviceOptions

        @Option(help: ArgumentHelp("How long the token can be used: 1m to 30d, e.g. 30m, 24h, 7d.", valueName: "duration"))
        var ttl: String = "24h"

        @OptionGroup var options: ConfigOption

        func validate() throws {
            _ = try ttlDuration()
        }

        func ttlDuration() throws -> Duration {
            guard let duration = ConfigTable.parseDuration(ttl) else {
                throw ValidationError("--ttl \(ttl) is not a duration; give one such as 30m, 24h or 7d")
            }
            guard duration >= .seconds(60), duration <= IngestAdmin.maximumEnrollmentTTL else {
                throw ValidationError("--ttl must be between 1m and 30d (got \(ttl)): a token is a credential until it is used")
            }
            return duration
        }

        func run() async throws {
            let id = try device.deviceID
            let farm = device.farm
            let ttl = try ttlDuration()
            let (token, record) = try await options.administer(creatingStore: true) { admin in
                try await admin.createEnrollmentToken(farm: farm, device: id, ttl: ttl, in: try enrollmentStore(admin))
            }
            print(token.text)
            print(
                "Enrollment token for device \(id) of farm \(farm), valid until \(RFC3339.format(record.expiresAt)) (\(ConfigTable.format(ttl))), once. It is shown only once: the store keeps its hash.")
            print("On the site, as root: farmgate enroll <this ingest's URL> <the token>")
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "list",
            abstract: "List enrollment tokens that can still be used, newest first (--all: used, expired and revoked ones too).",
            discussion: """
                Columns: KEY ID (the <id> of fge_<id>_<secret>; the secret is never stored, so never shown), FARM, DEVICE, \
                CREATED, EXPIRES (RFC 3339, UTC), STATE: unused, used at <time> from <client address>, expired, or revoked at \
                <time>. --json prints an array of objects with key_id, farm, device, created, expires, state (unused, used, \
                expired, revoked) and, as they apply, used_at, used_by, action (created, rotated) and revoked_at.
                """)

        @Option(help: "Only this farm's.") var farm: String?
        @Flag(help: "Also tokens that can no longer be used: used, expired and revoked.") var all = false
        @Flag(help: "Print JSON.") var json = false
        @OptionGroup var options: ConfigOption

        func validate() throws {
            if let farm { try validateFarmArgument(farm) }
        }

        func run() async throws {
            let now = Timestamp.now()
            let (farm, all) = (self.farm, self.all)
            let tokens = try await options.administer { admin in
                try await admin.enrollmentTokens(farm: farm, all: all, in: try enrollmentStore(admin), now: now)
            }
            let listings = tokens.map { EnrollmentTokenListing($0, now: now) }
            if json { return try printJSON(listings) }
            if listings.isEmpty {
                let scope = farm.map { " in farm \($0)" } ?? ""
                print(
                    all
                        ? "No enrollment tokens\(scope); make one with `farmgate-ingest enroll-token create`."
                        : "No usable enrollment tokens\(scope) (--all shows used, expired and revoked ones too); make one with `farmgate-ingest enroll-token create`.")
                return
            }
            print("KEY ID\tFARM\tDEVICE\tCREATED\tEXPIRES\tSTATE")
            for token in listings {
                print("\(token.keyID)\t\(token.farm)\t\(token.device)\t\(token.created)\t\(token.expires)\t\(token.stateText)")
            }
        }
    }

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "revoke",
            abstract: "Revoke an unused enrollment token: exchanging it is refused from now on (410 token_revoked).",
            discussion: """
                Give the token's id (as `enroll-token list` shows it) or the whole token fge_<id>_<secret>. A running ingest \
                refuses the token at once (it reads tokens from the store on every exchange). \
                Revoking only withdraws the token: a token that was already used is not revoked, and the device key its \
                exchange produced keeps working (withdraw that with `farmgate-ingest device revoke --farm F --device D`); \
                if the same answer could still be fetched again with it (the 10 minutes after the exchange), that is \
                stopped. A token already revoked, expired or used is left as it is: the command says so and exits 0, since \
                the token cannot enroll anything either way. An unknown id exits 1; a malformed id, or a key that is no \
                enrollment token, exits 64.
                """)

        @Argument(help: ArgumentHelp("The token's id (8 characters a-z 2-7), or the whole token fge_<id>_<secret>.", valueName: "key-id"))
        var token: String

        @OptionGroup var options: ConfigOption

        func validate() throws {
            _ = try keyID()
        }

        /// The token id of the argument: the id itself, or the `<id>` of a whole `fge_` token.
        func keyID() throws -> String { try keyIDArgument(token, kind: .enrollment) }

        func run() async throws {
            let keyID = try keyID()
            let outcome = try await options.administer { admin in
                do {
                    return try await admin.revokeEnrollmentToken(keyID: keyID, in: try enrollmentStore(admin))
                } catch IngestStoreError.notFound(let what) where what.hasPrefix("enrollment token") {
                    throw failure("\(IngestStoreError.notFound(what)); `farmgate-ingest enroll-token list --all` lists this ingest's tokens")
                }
            }
            switch outcome {
            case .revoked(let record):
                print(
                    "Revoked enrollment token \(keyID) (device \(record.device) of farm \(record.farm)); exchanging it is refused from now on. Make a new one with `farmgate-ingest enroll-token create --farm \(record.farm) --device \(record.device)`.")
            case .alreadyRevoked(let record):
                let when = record.revokedAt.map { RFC3339.format($0) } ?? "an earlier time"
                print("Enrollment token \(keyID) was already revoked at \(when); nothing changed.")
            case .expired(let record):
                print("Enrollment token \(keyID) expired unused at \(RFC3339.format(record.expiresAt)); it no longer works, nothing changed.")
            case .alreadyUsed(let record, let forgot):
                let when = record.usedAt.map { RFC3339.format($0) } ?? "an earlier time"
                print(
                    "Enrollment token \(keyID) was already used at \(when) from \(record.usedBy ?? "an unknown address") for device \(record.device) of farm \(record.farm); it cannot be used again, so it was not revoked."
                        + (forgot ? " Its exchange can no longer be repeated to fetch the device key again." : ""))
                print(
                    "The device key it produced keeps working; to withdraw it: farmgate-ingest device revoke --farm \(record.farm) --device \(record.device)")
            }
        }
    }
}

/// The store in its ``EnrollmentStore`` role.
private func enrollmentStore(_ admin: IngestAdmin) throws -> any EnrollmentStore {
    guard let store = admin.store as? any EnrollmentStore else { throw IngestStoreError.notFound("enrollment support in this store") }
    return store
}
