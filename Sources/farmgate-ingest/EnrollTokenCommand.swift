import ArgumentParser
import FarmgateIngest
import FarmgateSupport
import FarmgateWire

// MARK: enroll-token

struct EnrollTokenCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "enroll-token", abstract: "One-time tokens a site exchanges for its device key (farmgate enroll).",
        subcommands: [Create.self])

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
            let (token, record) = try await options.administer { admin in
                guard let store = admin.store as? any EnrollmentStore else {
                    throw IngestStoreError.notFound("enrollment support in this store")
                }
                return try await admin.createEnrollmentToken(farm: farm, device: id, ttl: ttl, in: store)
            }
            print(token.text)
            print(
                "Enrollment token for device \(id) of farm \(farm), valid until \(RFC3339.format(record.expiresAt)) (\(ConfigTable.format(ttl))), once. It is shown only once: the store keeps its hash.")
            print("On the site, as root: farmgate enroll <this ingest's URL> <the token>")
        }
    }
}
