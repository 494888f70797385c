#if canImport(Glibc)
import Glibc
#endif

/// How a serial port is framed: baud, data bits, parity, stop bits. EZO circuits and most RS-485 transmitters use 9600 8N1.
public struct SerialSettings: Sendable, Hashable, CustomStringConvertible {
    public enum Parity: String, Sendable, Hashable, CaseIterable {
        case none, even, odd

        var letter: String {
            switch self {
            case .none: "N"
            case .even: "E"
            case .odd: "O"
            }
        }
    }

    public var baud: Int
    public var dataBits: Int
    public var parity: Parity
    public var stopBits: Int

    public init(baud: Int = 9600, dataBits: Int = 8, parity: Parity = .none, stopBits: Int = 1) {
        self.baud = baud
        self.dataBits = dataBits
        self.parity = parity
        self.stopBits = stopBits
    }

    /// `9600 8N1`.
    public var description: String { "\(baud) \(dataBits)\(parity.letter)\(stopBits)" }

    /// The bauds termios can set, in order.
    public static let supportedBauds: [Int] = [1200, 2400, 4800, 9600, 19200, 38400, 57600, 115_200, 230_400]

    /// The termios constant for `baud`, or nil when termios has none.
    static func speed(for baud: Int) -> speed_t? {
        switch baud {
        case 1200: speed_t(B1200)
        case 2400: speed_t(B2400)
        case 4800: speed_t(B4800)
        case 9600: speed_t(B9600)
        case 19200: speed_t(B19200)
        case 38400: speed_t(B38400)
        case 57600: speed_t(B57600)
        case 115_200: speed_t(B115200)
        case 230_400: speed_t(B230400)
        default: nil
        }
    }
}
