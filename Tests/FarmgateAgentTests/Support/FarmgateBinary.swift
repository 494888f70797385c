import Foundation

/// The `farmgate` executable that `swift build` put beside this test bundle (the test target depends on it, so it is built).
enum FarmgateBinary {
    /// The path of the built `farmgate`, or of `$FARMGATE_BINARY` when set.
    static var path: String {
        if let override = ProcessInfo.processInfo.environment["FARMGATE_BINARY"], !override.isEmpty { return override }
        var candidates: [URL] = []
        // On Linux `swift test` runs .build/<triple>/debug/<Package>PackageTests.xctest; the products sit beside it.
        var bundle = Bundle.main.bundleURL
        if bundle.pathExtension == "xctest" { bundle = bundle.deletingLastPathComponent() }
        candidates.append(bundle)
        if let first = CommandLine.arguments.first {
            candidates.append(URL(fileURLWithPath: first).resolvingSymlinksInPath().deletingLastPathComponent())
        }
        for directory in candidates {
            let path = directory.appendingPathComponent("farmgate").path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return candidates[0].appendingPathComponent("farmgate").path
    }
}

/// A scratch directory under /tmp, removed when the value is released.
final class BufferScratch {
    let url: URL
    var path: String { url.path }

    init() throws {
        url = URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("fg-buffer-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }

    func file(_ name: String) -> String { url.appendingPathComponent(name).path }

    /// The names in the directory (or in its subdirectory `subdirectory`), sorted.
    func names(in subdirectory: String = "") -> [String] {
        let directory = subdirectory.isEmpty ? path : file(subdirectory)
        return ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted()
    }

    deinit { try? FileManager.default.removeItem(at: url) }
}
