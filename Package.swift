// swift-tools-version:6.2
import PackageDescription

// Farmgate: two programs that move hydroponic water-quality readings from farm sites to an ingest service.
//
//   farmgate         the site binary (daemon `farmgate agent` + installer CLI). Links no server framework.
//   farmgate-ingest  the upload service (Hummingbird 2, SQLite or PostgreSQL).
//
// Target layout (see README "Code map"):
//   FarmgateWire    what crosses the wire; no I/O
//   FarmgateSupport plumbing both programs share: SQLite connections, dedicated threads for blocking C calls,
//                   TOML documents that know the line of every key
//   FarmgateAgent   the site daemon as a library
//   FarmgateIngest  the ingest as a library
//   C*              module maps over Debian's -dev packages

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "farmgate",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "farmgate", targets: ["farmgate"]),
        .executable(name: "farmgate-ingest", targets: ["farmgate-ingest"]),
        .executable(name: "farmgate-bench", targets: ["farmgate-bench"]),
        .library(name: "FarmgateWire", targets: ["FarmgateWire"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.6.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.0.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.5.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.0.0"),
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.0"),
        // The ingest's PostgreSQL store (pooled PostgresClient). FarmgateIngest only: the site binary never links it.
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.21.0"),
        // The ingest's PostgreSQL pool behind one atomic reference (a pool replaced after an outage, read with one load
        // per store call). Already in the graph through swift-nio and postgres-nio.
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.2.0"),
        // The ingest's alert webhooks (non-blocking HTTP over the NIO event loops it already runs), and TLS for the
        // tests' SMTP sink (STARTTLS). FarmgateIngest and the tests only: the site binary never links them.
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.21.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.27.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.65.0"),
        // HTTP/2 frames, for the ingest's stream handler that ends a response on its last DATA frame (Hummingbird's
        // HummingbirdHTTP2 is built on it).
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.30.0"),
    ],
    targets: [
        // MARK: C libraries from Debian (see README "Building")
        .systemLibrary(name: "CSQLite", pkgConfig: "sqlite3", providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(name: "CCurl", pkgConfig: "libcurl", providers: [.apt(["libcurl4-openssl-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        // Modbus RTU master for the agent's `modbus` driver (and the slave the tests run on a pseudo-terminal).
        .systemLibrary(name: "CModbus", pkgConfig: "libmodbus", providers: [.apt(["libmodbus-dev"])]),
        // GPIO character-device access (libgpiod 1.6, the v1 API) for the agent's `gpio` driver.
        .systemLibrary(name: "CGPIOD", pkgConfig: "libgpiod", providers: [.apt(["libgpiod-dev"])]),
        // Linux headers Glibc's Swift module leaves out (adjtimex); no library to link.
        .systemLibrary(name: "CLinux"),

        // MARK: Libraries
        .target(
            name: "FarmgateWire",
            dependencies: ["CZstd", "CZlib"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "FarmgateSupport",
            dependencies: [
                "CLinux",
                "CSQLite",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "FarmgateAgent",
            dependencies: [
                "FarmgateWire",
                "FarmgateSupport",
                "CCurl",
                "CLinux",
                "CModbus",
                "CGPIOD",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "FarmgateIngest",
            dependencies: [
                "FarmgateWire",
                "FarmgateSupport",
                .product(name: "Hummingbird", package: "hummingbird"),
                // The ingest's own TLS and HTTP/2 ([server] tls_certificate, tls_key, http2).
                .product(name: "HummingbirdHTTP2", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                // The verify-full host-name check's own TLS connection (PostgresServerCertificate.swift).
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                // SIGHUP: the TLS certificate read again.
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                // E-mail notifications through libcurl's SMTP (STARTTLS, AUTH), on threads of their own.
                "CCurl",
            ],
            swiftSettings: swiftSettings
        ),

        // The command-line rules both programs share (a group without its subcommand, `help` of no command).
        .target(
            name: "FarmgateCLI",
            dependencies: [.product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: swiftSettings
        ),

        // MARK: Executables (argument parsing and wiring only)
        .executableTarget(
            name: "farmgate",
            dependencies: [
                "FarmgateAgent",
                "FarmgateWire",
                "FarmgateSupport",
                "FarmgateCLI",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            // The order `make install` and `make deb` link the agent's code in (Tests/tools/site-order-file.sh).
            exclude: ["farmgate.order"],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "farmgate-ingest",
            dependencies: [
                "FarmgateIngest",
                "FarmgateCLI",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "farmgate-bench",
            dependencies: [
                "CLinux",
                "FarmgateSupport",
                "FarmgateWire",
                "FarmgateAgent",
                "FarmgateIngest",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                // The local webhook receiver of `farmgate-bench notify`.
                .product(name: "Hummingbird", package: "hummingbird"),
                // The TLS line-protocol sink of `farmgate-bench wire` (its baseline).
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: swiftSettings
        ),

        // MARK: Tests
        .target(
            name: "FarmgateTestSupport",
            dependencies: [
                "CModbus",
                "FarmgateSupport",
                .product(name: "Logging", package: "swift-log"),
                // The SMTP sink (STARTTLS with a test certificate).
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            path: "Tests/FarmgateTestSupport",
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "FarmgateWireTests",
            dependencies: [
                "FarmgateSupport",
                "FarmgateWire",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "FarmgateAgentTests",
            dependencies: [
                "FarmgateAgent",
                "FarmgateSupport",
                "FarmgateWire",
                "FarmgateTestSupport",
                "farmgate",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                // Only as the oracle the configuration parser is tested against.
                .product(name: "TOMLKit", package: "TOMLKit"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "FarmgateIngestTests",
            dependencies: [
                "FarmgateIngest",
                // The agent's libcurl client against the ingest's own TLS and HTTP/2 (IngestTLSTests).
                "FarmgateAgent",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                // TLSRecordShapingTests: the ingest's TLS handlers on an embedded channel.
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                "FarmgateSupport",
                "FarmgateTestSupport",
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "FarmgateBenchTests",
            dependencies: [
                "farmgate-bench",
                "FarmgateSupport",
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "EndToEndTests",
            dependencies: [
                "FarmgateWire",
                "FarmgateIngest",
                "FarmgateSupport",
                "FarmgateAgent",
                "FarmgateTestSupport",
                "farmgate",
                "farmgate-ingest",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
    ]
)

// MARK: Fuzzing (libFuzzer harnesses for the decoders that take untrusted bytes)
// Only with FARMGATE_FUZZ set, so a normal `swift build` / `swift build --build-tests` never sees them.
// Build and run with Tests/tools/fuzz.sh wire|site.
if Context.environment["FARMGATE_FUZZ"] != nil {
    package.targets.append(contentsOf: [
        .executableTarget(
            name: "FuzzWire",
            dependencies: ["FarmgateWire"],
            path: "Tests/Fuzz/FuzzWire",
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "FuzzSite",
            dependencies: ["FarmgateAgent", "FarmgateSupport", "FarmgateWire"],
            path: "Tests/Fuzz/FuzzSite",
            swiftSettings: swiftSettings
        ),
    ])
}
