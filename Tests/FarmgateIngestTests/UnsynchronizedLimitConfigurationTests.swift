import FarmgateSupport
import Testing

@testable import FarmgateIngest

@Suite("Configuration: [limits] unsynchronized_future_limit")
struct UnsynchronizedLimitConfigurationTests {
    @Test("the default is 366 days and the key is read")
    func defaultAndKey() throws {
        #expect(try IngestConfiguration.parse("", file: "ingest.toml", baseDirectory: "/").limits.unsynchronizedFutureLimit == .seconds(366 * 86_400))
        let configuration = try IngestConfiguration.parse(
            "[limits]\nunsynchronized_future_limit = \"30d\"\n", file: "ingest.toml", baseDirectory: "/")
        #expect(configuration.limits.unsynchronizedFutureLimit == .seconds(30 * 86_400))
    }

    @Test(
        "bad values are located errors; the limit may not be tighter than future_tolerance",
        arguments: [
            ("[limits]\nunsynchronized_future_limit = \"later\"\n", "ingest.toml:2: limits.unsynchronized_future_limit: must be a duration"),
            (
                "[limits]\nfuture_tolerance = \"1h\"\nunsynchronized_future_limit = \"10m\"\n",
                "ingest.toml:3: limits.unsynchronized_future_limit: unsynchronized_future_limit (600 s) must be at least future_tolerance (3600 s)"
            ),
            ("[limits]\nunsynchronized_futur_limit = \"1d\"\n", "ingest.toml:2: limits.unsynchronized_futur_limit: unknown key; did you mean 'unsynchronized_future_limit'?"),
        ])
    func errors(text: String, expected: String) {
        do {
            _ = try IngestConfiguration.parse(text, file: "ingest.toml", baseDirectory: "/")
            Issue.record("accepted an invalid configuration")
        } catch {
            #expect(error.description.hasPrefix(expected), "\(error.description)")
        }
    }
}
