#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Standard output or error written with `write(2)`, unbuffered: live lines show as they come even through a pipe.
/// (Foundation's `FileHandle.standardOutput.write` without Foundation.) Lines written with `print` go through stdio's
/// buffer instead; do not mix the two for one stream.
public enum StandardStream: Int32, Sendable {
    case output = 1
    case error = 2

    /// Writes all of `text`; a closed or broken stream drops the rest silently (there is nowhere to report it).
    public func write(_ text: String) {
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let count = bytes.withUnsafeBytes { Glibc.write(rawValue, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { return }
            bytes = bytes.dropFirst(count)
        }
    }
}
