#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// Which device a serial port's path opens, so that one adapter named two ways is recognised as one port.
///
/// An installer may name one adapter by its `/dev/serial/by-id/...` link for one sensor and by the link's target
/// (`/dev/ttyUSB0`) for another, or write the path with `/./` or `//`. Compared as text those are two ports: the
/// configuration check would not see that they disagree on the bus settings, and at run time the second bus would find
/// the port locked by the first, in the same agent.
enum SerialDevice {
    /// A key equal for every path that opens one device: the character device's number (`st_rdev`) when the path exists
    /// and is one; otherwise the path with its symbolic links followed (`realpath`) when it exists; otherwise the path
    /// made absolute with `.`, `..` and repeated slashes resolved. A device that is not there (an unplugged adapter
    /// whose by-id link udev removed) can only be compared by how it is written.
    ///
    /// Cheap (one `stat`, at most one `realpath`): device nodes never block these calls.
    static func identity(of path: String) -> String {
        var info = stat()
        if stat(path, &info) == 0 {
            if info.st_mode & S_IFMT == S_IFCHR {
                return "character device \(info.st_rdev)"
            }
            if let real = realpath(path, nil) {
                defer { free(real) }
                return String(cString: real)
            }
        }
        return AgentConfiguration.lexicalPath(path)
    }
}
