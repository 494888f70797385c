import FarmgateTestSupport
import Foundation
import Testing

/// What the site binary may load on a Pi: full Foundation brings ICU (about 10 MB resident), a server framework or a
/// PostgreSQL client has no business on a site. A new `import Foundation` or a dependency that pulls one in fails here.
@Suite("The site binary's libraries")
struct SiteBinaryTests {
    @Test("farmgate loads FoundationEssentials only: no full Foundation, no ICU, no NIO, no PostgreSQL client")
    func noFullFoundation() async throws {
        let binary = builtExecutable("farmgate")
        let linked = try await runCommand("/usr/bin/ldd", [binary])
        #expect(linked.status == 0, "\(linked.stderr)")
        let libraries = linked.stdout.split(separator: "\n").compactMap { line in
            line.trimmingCharacters(in: .whitespaces).split(separator: " ").first.map(String.init)
        }
        #expect(libraries.contains { $0.hasPrefix("libFoundationEssentials") }, "\(libraries)")
        for forbidden in ["libFoundation.so", "libFoundationInternationalization", "lib_FoundationICU", "libFoundationNetworking"] {
            #expect(!libraries.contains { $0.hasPrefix(forbidden) }, "farmgate links \(forbidden): \(libraries)")
        }
        let symbols = try await runCommand("/usr/bin/nm", ["-j", binary])
        #expect(symbols.status == 0, "\(symbols.stderr)")
        for module in ["NIOCore", "PostgresNIO", "Hummingbird", "TOMLKit"] {
            #expect(!symbols.stdout.contains(module), "farmgate contains \(module) symbols")
        }
    }
}
