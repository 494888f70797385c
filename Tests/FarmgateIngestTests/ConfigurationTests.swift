import FarmgateSupport
import Foundation
import Logging
import Testing

@testable import FarmgateIngest

@Suite("Configuration")
struct ConfigurationTests {
    @Test("an empty file gives the documented defaults")
    func defaults() throws {
        let configuration = try IngestConfiguration.parse("", file: "ingest.toml", baseDirectory: "/etc/farmgate")
        #expect(configuration == IngestConfiguration())
        #expect(configuration.server.host == "127.0.0.1" && configuration.server.port == 8080)
        #expect(configuration.storage.path == "/var/lib/farmgate-ingest/ingest.sqlite")
        #expect(configuration.limits.maxBodyBytes == 8 << 20)
        #expect(configuration.limits.maxDecompressedBytes == 32 << 20)
        #expect(configuration.limits.maxReadingsPerBatch == 100_000)
        #expect(configuration.limits.futureTolerance == .seconds(600))
        #expect(configuration.limits.requestsPerSecond == 20 && configuration.limits.burst == 40)
        #expect(configuration.limits.uploadsInFlight == 4)
        #expect(configuration.limits.sensorsPerDevice == 1000)
        #expect(configuration.log.level == .info)
    }

    @Test("every key is read, and a relative storage path resolves against the file's directory")
    func everyKey() throws {
        let text = """
            [server]
            host = "0.0.0.0"
            port = 9000
            [storage]
            path = "../data/ingest.sqlite"
            [limits]
            max_body_bytes = "1MiB"
            max_decompressed_bytes = "4MiB"
            max_readings_per_batch = 5000
            future_tolerance = "30s"
            requests_per_second = 2.5
            burst = 5
            uploads_in_flight = 2
            sensors_per_device = 64
            [log]
            level = "debug"
            """
        let configuration = try IngestConfiguration.parse(text, file: "/srv/conf/ingest.toml", baseDirectory: "/srv/conf")
        #expect(configuration.server == .init(host: "0.0.0.0", port: 9000))
        #expect(configuration.storage.path == "/srv/data/ingest.sqlite")
        #expect(
            configuration.limits
                == .init(
                    maxBodyBytes: 1 << 20, maxDecompressedBytes: 4 << 20, maxReadingsPerBatch: 5000, futureTolerance: .seconds(30), requestsPerSecond: 2.5,
                    burst: 5, uploadsInFlight: 2, sensorsPerDevice: 64))
        #expect(configuration.log.level == .debug)
    }

    @Test(
        "errors name the file, line and key",
        arguments: [
            ("[server]\nprot = 1\n", "ingest.toml:2: server.prot: unknown key; did you mean 'port'?"),
            ("[server]\nport = 70000\n", "ingest.toml:2: server.port: must be between 0 and 65535"),
            ("\n\n[limits]\nfuture_tolerance = \"soon\"\n", "ingest.toml:4: limits.future_tolerance: must be a duration"),
            ("[limits]\nmax_body_bytes = \"8 parsecs\"\n", "ingest.toml:2: limits.max_body_bytes: must be a size"),
            ("[limits]\nuploads_in_flight = 0\n", "ingest.toml:2: limits.uploads_in_flight: must be between 1 and 1000"),
            ("[limits]\nsensors_per_device = 0\n", "ingest.toml:2: limits.sensors_per_device: must be between 1 and 1000000"),
            ("[limits]\nmax_body_bytes = \"16MiB\"\nmax_decompressed_bytes = \"8MiB\"\n", "ingest.toml:3: limits.max_decompressed_bytes: must be at least"),
            ("[log]\nlevel = \"loud\"\n", "ingest.toml:2: log.level: must be one of"),
            ("[storage]\npath = 5\n", "ingest.toml:2: storage.path: must be a string"),
            ("[database]\nurl = \"x\"\n", "ingest.toml:1: database: unknown key"),
            ("[server\n", "ingest.toml:1: not valid TOML"),
        ])
    func located(text: String, expected: String) {
        do {
            _ = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/")
            Issue.record("accepted an invalid configuration")
        } catch {
            #expect(error.description.hasPrefix(expected), "\(error.description)")
        }
    }

    @Test("the configuration path: explicit, then the environment variable, then the default")
    func resolvePath() {
        #expect(IngestConfiguration.resolvePath(explicit: "/a.toml", environment: ["FARMGATE_INGEST_CONFIG": "/b.toml"]) == "/a.toml")
        #expect(IngestConfiguration.resolvePath(explicit: nil, environment: ["FARMGATE_INGEST_CONFIG": "/b.toml"]) == "/b.toml")
        #expect(IngestConfiguration.resolvePath(explicit: nil, environment: [:]) == "/etc/farmgate/ingest.toml")
    }

    @Test("the example configuration is valid and stores under demo-data at the top of the checkout")
    func example() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let configuration = try IngestConfiguration.load(path: root.appendingPathComponent("examples/ingest.toml").path)
        #expect(configuration.storage.path == root.appendingPathComponent("demo-data/ingest/ingest.sqlite").standardizedFileURL.path)
        #expect(configuration.server.port == 8080)
    }

    @Test("a missing file is an error naming it")
    func missingFile() {
        #expect(throws: ConfigurationError.self) { try IngestConfiguration.load(path: "/nonexistent/ingest.toml") }
    }
}
