import Foundation

/// A scratch directory `<prefix>-<8 random characters>` under `base`, removed when the value is released.
public final class Scratch {
    public let url: URL
    public var path: String { url.path }

    /// - Parameters:
    ///   - prefix: the start of the directory's name.
    ///   - base: the directory to create it in (the temporary directory unless told; pass a short one such as /tmp where
    ///     Unix socket paths inside must stay under 108 bytes).
    public init(prefix: String = "fg", in base: URL = URL(fileURLWithPath: NSTemporaryDirectory())) throws {
        url = base.appendingPathComponent("\(prefix)-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }

    /// The path of `name` inside the directory.
    public func file(_ name: String) -> String { url.appendingPathComponent(name).path }

    /// Writes `text` to `name` inside the directory and returns its path.
    public func write(_ name: String, _ text: String) throws -> String {
        let path = file(name)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// The names in the directory (or in its subdirectory `subdirectory`), sorted.
    public func names(in subdirectory: String = "") -> [String] {
        let directory = subdirectory.isEmpty ? path : file(subdirectory)
        return ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted()
    }

    deinit { try? FileManager.default.removeItem(at: url) }
}
