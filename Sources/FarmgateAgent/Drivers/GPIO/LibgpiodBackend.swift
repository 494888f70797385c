import CGPIOD
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// GPIO through libgpiod 1.6 (the v1 API Debian 12 ships): the only file that calls libgpiod, so that moving to the
/// 2.x API (line settings, request configs, edge-event buffers) changes this file alone.
public final class LibgpiodBackend: GPIOBackend {
    public init() {}

    public func open(_ request: GPIOLineRequest) throws(SensorError) -> any GPIOLine {
        try LibgpiodLine(request)
    }

    public func now() -> Int64 {
        Self.clock(CLOCK_MONOTONIC)
    }

    public func lookUp(chip chipSelector: GPIOChipSelector, line lineSelector: GPIOLineSelector) -> GPIOLineLookup {
        let opened: OpaquePointer? =
            switch chipSelector {
            case .number(let number): gpiod_chip_open_by_number(UInt32(clamping: number))
            case .name(let text): gpiod_chip_open_lookup(text)
            }
        guard let chip = opened else { return .noChip(LibgpiodLine.chipError(errno, chip: chipSelector).message) }
        defer { gpiod_chip_close(chip) }
        let name = String(cString: gpiod_chip_name(chip))
        let count = Int(gpiod_chip_num_lines(chip))
        switch lineSelector {
        case .offset(let offset):
            guard offset >= 0, offset < count else {
                return .noLine("\(name) has lines 0-\(count - 1), not \(offset); `gpioinfo \(name)` lists them")
            }
            return .found(chip: name, offset: offset)
        case .name(let lineName):
            guard let line = gpiod_chip_find_line(chip, lineName) else {
                return .noLine("\(name) has no line named \"\(lineName)\"; `gpioinfo \(name)` lists the names and offsets")
            }
            return .found(chip: name, offset: Int(gpiod_line_offset(line)))
        }
    }

    static func clock(_ id: clockid_t) -> Int64 {
        var now = timespec()
        clock_gettime(id, &now)
        return Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec)
    }
}

/// A line requested for both-edge events; chip and line are released in deinit.
final class LibgpiodLine: GPIOLine {
    private let chip: OpaquePointer
    private let line: OpaquePointer
    private let name: String
    /// Kernels before 5.7 stamp line events with CLOCK_REALTIME, later ones with CLOCK_MONOTONIC: the offset that
    /// brings an event's timestamp onto the monotonic clock, decided on the first event.
    private var realtimeOffset: Int64?

    init(_ request: GPIOLineRequest) throws(SensorError) {
        name = request.name
        let opened: OpaquePointer?
        switch request.chip {
        case .number(let number): opened = gpiod_chip_open_by_number(UInt32(clamping: number))
        case .name(let text): opened = gpiod_chip_open_lookup(text)
        }
        guard let chip = opened else {
            throw Self.chipError(errno, chip: request.chip)
        }
        let found: OpaquePointer?
        switch request.line {
        case .offset(let offset):
            guard offset >= 0, offset < Int(gpiod_chip_num_lines(chip)) else {
                let count = gpiod_chip_num_lines(chip)
                gpiod_chip_close(chip)
                throw SensorError(.fault, "\(request.chip) has lines 0-\(Int(count) - 1), not \(offset); `gpioinfo \(request.chip)` lists them")
            }
            found = gpiod_chip_get_line(chip, UInt32(offset))
        case .name(let lineName):
            found = gpiod_chip_find_line(chip, lineName)
        }
        guard let line = found else {
            gpiod_chip_close(chip)
            throw SensorError(.fault, "\(request.chip) has no line \(request.line); `gpioinfo \(request.chip)` lists the names and offsets")
        }
        var flags: Int32 = 0
        switch request.bias {
        case .asIs: break
        case .disable: flags |= Int32(GPIOD_LINE_REQUEST_FLAG_BIAS_DISABLE)
        case .pullUp: flags |= Int32(GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_UP)
        case .pullDown: flags |= Int32(GPIOD_LINE_REQUEST_FLAG_BIAS_PULL_DOWN)
        }
        // Active-low is applied by the caller, not the kernel, so that the logic is the same with every backend.
        if gpiod_line_request_both_edges_events_flags(line, request.consumer, flags) != 0 {
            let code = errno
            gpiod_chip_close(chip)
            throw SensorError(
                code == EBUSY ? .fault : .disconnected,
                code == EBUSY
                    ? "\(request.name) is already requested by another program (`gpioinfo` shows its user)"
                    : "cannot request \(request.name) for edge events: \(String(cString: strerror(code)))")
        }
        self.chip = chip
        self.line = line
    }

    deinit {
        gpiod_line_release(line)
        gpiod_chip_close(chip)
    }

    func level() throws(SensorError) -> Int {
        let value = gpiod_line_get_value(line)
        guard value >= 0 else {
            throw SensorError(.disconnected, "cannot read \(name): \(String(cString: strerror(errno)))")
        }
        return Int(value)
    }

    func waitForEvents(timeout: Duration) throws(SensorError) -> [GPIOEdgeEvent] {
        let components = timeout.components
        var deadline = timespec(tv_sec: Int(components.seconds), tv_nsec: Int(components.attoseconds / 1_000_000_000))
        let ready = gpiod_line_event_wait(line, &deadline)
        if ready == 0 { return [] }
        if ready < 0 {
            if errno == EINTR { return [] }
            throw SensorError(.disconnected, "waiting for edges on \(name) failed: \(String(cString: strerror(errno)))")
        }
        var buffer = [gpiod_line_event](repeating: gpiod_line_event(), count: 64)
        let count = gpiod_line_event_read_multiple(line, &buffer, UInt32(buffer.count))
        guard count >= 0 else {
            throw SensorError(.disconnected, "reading edges of \(name) failed: \(String(cString: strerror(errno)))")
        }
        return buffer.prefix(Int(count)).map { event in
            let stamp = Int64(event.ts.tv_sec) * 1_000_000_000 + Int64(event.ts.tv_nsec)
            let edge: GPIOEdge = event.event_type == Int32(GPIOD_LINE_EVENT_RISING_EDGE) ? .rising : .falling
            return GPIOEdgeEvent(edge, at: stamp - offset(for: stamp))
        }
    }

    private func offset(for stamp: Int64) -> Int64 {
        if let realtimeOffset { return realtimeOffset }
        let monotonic = LibgpiodBackend.clock(CLOCK_MONOTONIC)
        let realtime = LibgpiodBackend.clock(CLOCK_REALTIME)
        let offset = abs(stamp - realtime) < abs(stamp - monotonic) ? realtime - monotonic : 0
        realtimeOffset = offset
        return offset
    }

    static func chipError(_ code: Int32, chip: GPIOChipSelector) -> SensorError {
        switch code {
        case ENOENT, ENODEV, ENXIO:
            SensorError(
                .disconnected,
                "GPIO chip \(chip) not found (/dev/\(chip) does not exist); `gpiodetect` lists the chips (a Raspberry Pi 5 on older kernels has its header on gpiochip4)")
        case EACCES, EPERM:
            SensorError(
                .disconnected,
                "permission denied opening /dev/\(chip): add the agent's user to the gpio group (`sudo usermod -aG gpio farmgate`) and restart it")
        default:
            SensorError(.disconnected, "cannot open GPIO chip \(chip): \(String(cString: strerror(code)))")
        }
    }
}

extension LibgpiodBackend {
    /// The GPIO chips under `deviceDirectory` (`gpiochip*`) with every line's name and user, for `farmgate scan`.
    /// - Throws: ``SensorError`` saying so when there is no chip at all, or a chip cannot be opened (permission).
    public static func chips(in deviceDirectory: String = "/dev") throws(SensorError) -> [GPIOChipInfo] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: deviceDirectory)) ?? [])
            .filter { $0.hasPrefix("gpiochip") && Int($0.dropFirst(8)) != nil }
            .sorted { Int($0.dropFirst(8)) ?? 0 < Int($1.dropFirst(8)) ?? 0 }
        guard !names.isEmpty else {
            throw SensorError(
                .disconnected,
                "no GPIO chip: \(deviceDirectory) has no gpiochip device (this machine has no GPIO header, or its GPIO driver is not loaded; on a Raspberry Pi `ls /dev/gpiochip*` lists them)")
        }
        var chips: [GPIOChipInfo] = []
        for name in names {
            let path = deviceDirectory + "/" + name
            guard let chip = gpiod_chip_open(path) else {
                throw LibgpiodLine.chipError(errno, chip: .name(name))
            }
            defer { gpiod_chip_close(chip) }
            var lines: [GPIOChipInfo.Line] = []
            for offset in 0..<gpiod_chip_num_lines(chip) {
                guard let line = gpiod_chip_get_line(chip, offset) else { continue }
                lines.append(
                    GPIOChipInfo.Line(
                        offset: Int(offset), name: gpiod_line_name(line).map { String(cString: $0) },
                        consumer: gpiod_line_consumer(line).map { String(cString: $0) }))
            }
            chips.append(
                GPIOChipInfo(
                    name: String(cString: gpiod_chip_name(chip)), label: String(cString: gpiod_chip_label(chip)), lines: lines))
        }
        return chips
    }
}
