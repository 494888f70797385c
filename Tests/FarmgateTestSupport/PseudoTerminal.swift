import Foundation

/// Pseudo-terminals for the serial simulators: the simulator holds the master side, the driver under test opens the
/// slave path as it would open `/dev/ttyUSB0`.
public enum PseudoTerminal {
    /// `TIOCSPTLCK` (`_IOW('T', 0x31, int)`) and `TIOCGPTN` (`_IOR('T', 0x30, unsigned int)`), the same on x86-64 and arm64.
    private static let setLock: UInt = 0x4004_5431
    private static let getNumber: UInt = 0x8004_5430

    /// A new pseudo-terminal: its master descriptor and the path of its slave side.
    ///
    /// What glibc's posix_openpt, unlockpt and ptsname do on Linux (Swift's Glibc module leaves them out; grantpt has
    /// nothing to do on devpts): open the multiplexer, clear the slave's lock, ask for the slave's number.
    public static func open(nonBlocking: Bool = false) throws -> (master: Int32, path: String) {
        let master = Foundation.open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | (nonBlocking ? O_NONBLOCK : 0))
        guard master >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        var unlock: Int32 = 0
        var number: UInt32 = 0
        guard ioctl(master, setLock, &unlock) == 0, ioctl(master, getNumber, &number) == 0 else {
            let code = errno
            close(master)
            throw POSIXError(POSIXErrorCode(rawValue: code) ?? .EIO)
        }
        return (master, "/dev/pts/\(number)")
    }
}
