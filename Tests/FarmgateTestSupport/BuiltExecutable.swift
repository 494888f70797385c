import Foundation

/// The path of the executable `name` that `swift build` put beside the test bundle (a test target that depends on the
/// executable target gets it built), or of `$<environmentOverride>` when that variable is given and set.
public func builtExecutable(_ name: String, environmentOverride: String? = nil) -> String {
    if let variable = environmentOverride, let override = ProcessInfo.processInfo.environment[variable], !override.isEmpty {
        return override
    }
    var candidates: [URL] = []
    // On Linux `swift test` runs .build/<triple>/debug/<Package>PackageTests.xctest; the products sit beside it.
    var bundle = Bundle.main.bundleURL
    if bundle.pathExtension == "xctest" { bundle = bundle.deletingLastPathComponent() }
    candidates.append(bundle)
    if let first = CommandLine.arguments.first {
        candidates.append(URL(fileURLWithPath: first).resolvingSymlinksInPath().deletingLastPathComponent())
    }
    for directory in candidates {
        let path = directory.appendingPathComponent(name).path
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return candidates[0].appendingPathComponent(name).path
}
