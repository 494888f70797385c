import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization

/// A GPIO line without hardware, driven by the **line-event protocol**: for tests, and for demos and end-to-end runs of
/// the real agent on machines without GPIO chips (`backend = "events"`, `events_file = "..."`).
///
/// The protocol is text, one command per line; `#` starts a comment and blank lines are ignored. Times are seconds on
/// the event clock (the kernel's CLOCK_MONOTONIC for real lines) with up to nine decimals, and levels are physical
/// (before `active_low`):
///
/// ```
/// level 1             the level the line reads when it is requested (default 0); set it before the driver starts
/// rise 1200.000123    a rising edge (low to high) at that time
/// fall 1200.050000    a falling edge
/// now 1260            the clock now reads 1260 s (it never goes back; delivered edges advance it too)
/// name 17 GPIO17       the chip's line 17 is named GPIO17 (for `farmgate config check`, which resolves names to offsets)
/// unplug              the chip vanishes: requests fail and a requested line fails (the driver reads `disconnected`)
/// replug              the chip is back (the driver requests the line again)
/// ```
///
/// `level`, `now`, `unplug` and `replug` take effect when fed; edges are queued and delivered, in order, to the line's
/// thread, which applies them (``undelivered`` is 0 once it has: wait for that before reading). One backend is one line: give each
/// sensor its own (or, with `events_file`, its own file; the file is followed as lines are appended, like `tail -f`).
///
/// An events file that is truncated, rewritten or replaced (another inode, as an editor or `mv` leaves it) is read
/// again from its start, as `tail -F` does, rather than from where the old file ended. A line of the file that means
/// nothing is logged with its line number and why, and skipped. The agent's backends remember how far they delivered
/// the file (``init(file:positionFile:logger:)``), so that a restarted agent resumes there instead of replaying it.
public final class ScriptedGPIOBackend: GPIOBackend {
    /// A line of the protocol that means nothing.
    public struct ScriptError: Error, Sendable, CustomStringConvertible {
        public var line: String
        public var reason: String
        public var description: String { "line-event protocol: \"\(line)\": \(reason)" }
    }

    private struct State {
        var level = 0
        var clock: Int64 = 0
        var present = true
        /// Bumped by `unplug`: a line requested before fails.
        var generation = 0
        var queue: [GPIOEdgeEvent] = []
        /// Edges handed to the line's thread by the last wait, until it comes back for more (having applied them).
        var inFlight = 0
        /// Line names declared with `name`, by name.
        var names: [String: Int] = [:]
        var follower = FileFollower()
        /// Where the agent left the file when it last ran (from the position file): the lines before are its past, taken
        /// for the line's state only. Dropped once passed, or when the file is another one.
        var resume: FileFollower.Position?
        /// The position last written to the position file.
        var saved: FileFollower.Position?
        /// Added to the times of the events file's lines: a file truncated or replaced is a new clock (it may start at 0
        /// again), continued from the line's clock when it was, so that the line's clock never goes back.
        var fileClockOffset: Int64 = 0
    }

    private let state = Mutex(State())
    private let file: String?
    /// Where the agent remembers how far it has delivered the file (nil: not remembered; the file is read from its start).
    private let positionFile: String?
    private let logger: Logger

    /// An in-memory line, fed with ``feed(_:)``.
    public init() {
        file = nil
        positionFile = nil
        logger = Logger(label: "farmgate.gpio.events") { _ in SwiftLogNoOpLogHandler() }
    }

    /// A line that follows `file`, reading commands as they are appended.
    /// - Parameter logger: where lines of the file that mean nothing are reported.
    /// - Parameter positionFile: where the file's identity and the offset delivered so far are kept (the agent keeps it
    ///   beside the buffer): a restarted agent resumes there, taking the lines before it for the line's state (its level,
    ///   clock and names) without delivering their edges again, as a real line does not repeat its past. Nil: the file
    ///   is read from its start.
    public init(file: String, positionFile: String? = nil, logger: Logger = Logger(label: "farmgate.gpio.events")) {
        self.file = file
        self.positionFile = positionFile
        var logger = logger
        logger[metadataKey: "events_file"] = "\(file)"
        self.logger = logger
        if let positionFile, let saved = Self.readPosition(positionFile) {
            // Only the file the agent left, at least as long as it was: a replaced or truncated one is read from its start.
            var status = stat()
            if stat(file, &status) == 0, UInt64(status.st_dev) == saved.device, UInt64(status.st_ino) == saved.inode,
                status.st_size >= off_t(clamping: saved.offset)
            {
                state.withLock { $0.resume = saved; $0.saved = saved }
            }
        }
    }

    /// The position file for `file` beside the buffer at `prefix`: `<prefix>.gpio-events.<hash of the path>`.
    static func positionFile(prefix: String, file: String) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in file.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        let hex = String(hash, radix: 16)
        return "\(prefix).gpio-events.\(String(repeating: "0", count: 16 - hex.count) + hex)"
    }

    /// `device inode offset`, or nil when the file is missing or holds something else (then the events file is read
    /// from its start).
    static func readPosition(_ path: String) -> FileFollower.Position? {
        guard let text = try? FileSystem.text(path, limit: 4096) else { return nil }
        let words = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard words.count >= 3, let device = UInt64(words[0]), let inode = UInt64(words[1]), let offset = UInt64(words[2]) else {
            return nil
        }
        return FileFollower.Position(device: device, inode: inode, offset: offset)
    }

    /// Remembers `position` (atomically, without fsync: a test backend; a crash only replays a little).
    private func savePosition(_ position: FileFollower.Position) {
        guard let positionFile, let file else { return }
        do {
            try DurableFile.replace(
                positionFile, with: Array("\(position.device) \(position.inode) \(position.offset) \(file)\n".utf8),
                temporary: positionFile + ".tmp", mode: 0o644, durably: false)
        } catch {
            logger.warning("Cannot remember the position in the GPIO events file", metadata: ["error": "\(error)"])
        }
    }

    /// Applies one or more protocol lines.
    /// Applies one or more protocol lines, all at once: the line's thread sees none or all of them (up to a bad line,
    /// which is refused after the lines before it took effect).
    public func feed(_ text: String) throws(ScriptError) {
        try state.withLock { state throws(ScriptError) in
            for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
                try Self.apply(String(raw), to: &state)
            }
        }
    }

    /// Edges fed but not yet applied: still queued, or handed to the line's thread, which has not come back for more.
    public var undelivered: Int { state.withLock { $0.queue.count + $0.inFlight } }

    public func now() -> Int64 { state.withLock { $0.clock } }

    /// The clock, and whether edges fed are not yet applied by the line's thread (``undelivered``), read at once.
    public func clockReading() -> (now: Int64, pending: Bool) {
        state.withLock { ($0.clock, !$0.queue.isEmpty || $0.inFlight > 0) }
    }

    public func open(_ request: GPIOLineRequest) throws(SensorError) -> any GPIOLine {
        if let file, !FileManager.default.fileExists(atPath: file) {
            // No file, no line: as a missing chip, the sensor is not readable (the line is requested again, with backoff,
            // and is read once the file exists), rather than reading the default level.
            throw SensorError(
                .disconnected, "GPIO chip \(request.chip) not found: the events file \(file) does not exist (backend = \"events\")")
        }
        if let file, FileSystem.isDirectory(file) {
            // A directory reads as an empty file: a line at level 0 that never changes, stored as a real state (a tester,
            // 2026-12-07). As a missing file, it is no chip.
            throw SensorError(
                .disconnected, "GPIO chip \(request.chip) not found: the events file \(file) is a directory (backend = \"events\"); name a file")
        }
        pumpFile()
        let generation = try state.withLock { state throws(SensorError) -> Int in
            guard state.present else {
                throw SensorError(.disconnected, "GPIO chip \(request.chip) not found (the event script unplugged it)")
            }
            return state.generation
        }
        return ScriptedLine(backend: self, generation: generation, name: request.name)
    }

    public func lookUp(chip: GPIOChipSelector, line: GPIOLineSelector) -> GPIOLineLookup {
        if let file, !FileManager.default.fileExists(atPath: file) {
            return .noChip("the events file \(file) does not exist yet")
        }
        if let file, FileSystem.isDirectory(file) {
            return .noChip("the events file \(file) is a directory")
        }
        pumpFile()
        return state.withLock { state in
            guard state.present else { return .noChip("GPIO chip \(chip) not found (the event script unplugged it)") }
            switch line {
            case .offset(let offset): return .found(chip: chip.description, offset: offset)
            case .name(let name):
                guard let offset = state.names[name] else {
                    let declared = state.names.sorted { $0.value < $1.value }.map { "\($0.value)=\($0.key)" }.joined(separator: ", ")
                    return .noLine("\(chip) has no line named \"\(name)\" (the event script names: \(declared.isEmpty ? "none" : declared))")
                }
                return .found(chip: chip.description, offset: offset)
            }
        }
    }

    fileprivate func level(generation: Int, name: String) throws(SensorError) -> Int {
        try state.withLock { state throws(SensorError) -> Int in
            guard state.present, state.generation == generation else { throw Self.gone(name) }
            return state.level
        }
    }

    fileprivate func take(generation: Int, name: String, timeout: Duration) throws(SensorError) -> [GPIOEdgeEvent] {
        let deadline = ContinuousClock.now + timeout
        while true {
            pumpFile()
            let (events, save) = try state.withLock { state throws(SensorError) -> ([GPIOEdgeEvent], FileFollower.Position?) in
                guard state.present, state.generation == generation else { throw Self.gone(name) }
                let events = state.queue
                state.queue = []
                state.inFlight = events.count
                for event in events {
                    state.clock = max(state.clock, event.timestamp)
                    state.level = event.edge == .rising ? 1 : 0
                }
                // Every edge read so far is now the line's: remember how far the file is delivered.
                guard positionFile != nil, state.resume == nil, let position = state.follower.position, position != state.saved else {
                    return (events, nil)
                }
                state.saved = position
                return (events, position)
            }
            if let save { savePosition(save) }
            if !events.isEmpty || ContinuousClock.now >= deadline { return events }
            sleepBlocking(.milliseconds(2))
        }
    }

    private static func gone(_ name: String) -> SensorError {
        SensorError(.disconnected, "GPIO line \(name) is gone (the event script unplugged its chip)")
    }

    /// - Parameter past: the line is the file's past (before where a previous agent left it): an edge only sets the
    ///   level and the clock, it is not delivered.
    private static func apply(_ raw: String, to state: inout State, past: Bool = false, clockOffset: Int64 = 0) throws(ScriptError) {
        let text = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        let words = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).map(String.init)
        guard let command = words.first?.lowercased() else { return }
        switch (command, words.count) {
        case ("rise", 2) where past, ("fall", 2) where past:
            let time = Self.shifted(try Self.time(words[1], line: raw), by: clockOffset)
            state.clock = max(state.clock, time)
            state.level = command == "rise" ? 1 : 0
        case ("rise", 2), ("fall", 2):
            let time = Self.shifted(try Self.time(words[1], line: raw), by: clockOffset)
            state.queue.append(GPIOEdgeEvent(command == "rise" ? .rising : .falling, at: time))
        case ("level", 2):
            guard let level = Int(words[1]), level == 0 || level == 1 else {
                throw ScriptError(line: raw, reason: "a level is 0 or 1")
            }
            state.level = level
        case ("now", 2):
            let time = Self.shifted(try Self.time(words[1], line: raw), by: clockOffset)
            state.clock = max(state.clock, time)
        case ("unplug", 1):
            state.present = false
            state.generation += 1
            state.queue = []
            state.inFlight = 0
        case ("replug", 1):
            state.present = true
        case ("name", 3):
            guard let offset = Int(words[1]), (0...511).contains(offset) else {
                throw ScriptError(line: raw, reason: "a line offset is between 0 and 511")
            }
            let name = words[2]
            state.names[name] = offset
        default:
            throw ScriptError(
                line: raw, reason: "expected `rise SECONDS`, `fall SECONDS`, `level 0|1`, `now SECONDS`, `name OFFSET NAME`, `unplug` or `replug`")
        }
    }

    /// `time` on the line's clock, for a file whose clock starts at `offset` (saturating: a clock never wraps).
    private static func shifted(_ time: Int64, by offset: Int64) -> Int64 {
        let (sum, overflow) = time.addingReportingOverflow(offset)
        return overflow ? .max : sum
    }

    /// Seconds with up to nine decimals, parsed exactly into nanoseconds.
    static func time(_ text: String, line: String) throws(ScriptError) -> Int64 {
        let parts = text.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        let fraction = parts.count == 2 ? String(parts[1]) : ""
        guard let seconds = Int64(parts[0]), seconds >= 0, seconds < 9_000_000_000, fraction.count <= 9,
            fraction.allSatisfy(\.isASCII), fraction.allSatisfy(\.isNumber),
            let nanoseconds = Int64(fraction + String(repeating: "0", count: 9 - fraction.count))
        else {
            throw ScriptError(line: line, reason: "a time is seconds with up to 9 decimals, such as 1200.000123")
        }
        return seconds * 1_000_000_000 + nanoseconds
    }

    /// Reads what was appended to the events file since the last call and applies its complete lines, all at once
    /// (as ``feed(_:)``); a line that means nothing is logged and skipped (a test writing the file sees it never take
    /// effect). Reads run under the state's lock, so that two threads pumping at once never apply a line twice.
    private func pumpFile() {
        guard let file else { return }
        let (restarted, refused) = state.withLock { state -> (Bool, [(number: Int, error: ScriptError)]) in
            let (restarted, lines) = state.follower.read(file)
            if restarted {
                // Another file, or the file written anew: its times are a new clock, which continues the line's.
                state.fileClockOffset = state.clock
            }
            if let resume = state.resume, restarted || state.follower.position.map({ !$0.sameFile(as: resume) }) ?? false {
                // Another file than the one the agent left (replaced, truncated): read from its start.
                state.resume = nil
            }
            var refused: [(number: Int, error: ScriptError)] = []
            for (number, end, line) in lines {
                let past = state.resume.map { end <= $0.offset } ?? false
                do throws(ScriptError) {
                    try Self.apply(line, to: &state, past: past, clockOffset: state.fileClockOffset)
                } catch {
                    if !past { refused.append((number, error)) }
                }
            }
            if let resume = state.resume, let position = state.follower.position, position.offset >= resume.offset {
                state.resume = nil
            }
            return (restarted, refused)
        }
        if restarted {
            logger.info("GPIO events file was truncated or replaced; reading it again from its start")
        }
        for (number, error) in refused {
            logger.warning(
                "Skipping a line of the GPIO events file that means nothing",
                metadata: ["line": "\(number)", "text": "\(error.line)", "reason": "\(error.reason)"])
        }
    }
}

/// Follows a growing text file as `tail -F` does: hands out each complete line once, numbered, and starts again from
/// the top when the file was truncated or replaced.
///
/// A replacement is a new inode (or device); a truncation shows as a file shorter than what was read, or as the bytes
/// just before the read position no longer being the ones read there (a file truncated and refilled beyond its old
/// length between two reads). A file that was rewritten with the same text up to the read position is, rightly,
/// followed as if it had only grown.
struct FileFollower {
    /// How many bytes before the read position are compared to tell a rewritten file from a grown one.
    static let tailLength = 64

    /// A file and an offset in it: where the complete lines read so far end.
    struct Position: Sendable, Hashable {
        var device: UInt64
        var inode: UInt64
        var offset: UInt64

        func sameFile(as other: Position) -> Bool { device == other.device && inode == other.inode }
    }

    private var identity: (device: UInt64, inode: UInt64)?
    private var offset: UInt64 = 0

    /// The file read and where its complete lines read so far end; nil before it was read.
    var position: Position? {
        identity.map { Position(device: $0.device, inode: $0.inode, offset: offset - UInt64(partialLine.count)) }
    }
    /// The last bytes read (at most ``tailLength``), which must still be in the file just before ``offset``.
    private var tail: [UInt8] = []
    private var partialLine: [UInt8] = []
    /// Complete lines handed out since the file's start.
    private var lineCount = 0

    /// The complete lines added since the last call, with their line numbers (from 1); `restarted` when the file was
    /// truncated or replaced and is read from its start again. Nothing when the file cannot be read (yet).
    /// Each line comes with the offset where it ends (after its newline).
    mutating func read(_ path: String) -> (restarted: Bool, lines: [(number: Int, end: UInt64, text: String)]) {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return (false, []) }
        defer { Glibc.close(fd) }
        var status = stat()
        guard fstat(fd, &status) == 0 else { return (false, []) }
        let current = (device: UInt64(status.st_dev), inode: UInt64(status.st_ino))
        var restarted = false
        if let identity, identity != current {
            restarted = true
        } else if status.st_size < off_t(clamping: offset) {
            restarted = true
        } else if !tail.isEmpty {
            let start = offset - UInt64(tail.count)
            restarted = Self.bytes(fd, from: start, count: tail.count) != tail
        }
        if restarted {
            offset = 0
            tail = []
            partialLine = []
            lineCount = 0
        }
        identity = current
        let data = Self.bytes(fd, from: offset, count: nil)
        guard !data.isEmpty else { return (restarted, []) }
        let start = offset
        offset += UInt64(data.count)
        tail = Array((tail + data).suffix(Self.tailLength))
        var lines: [(number: Int, end: UInt64, text: String)] = []
        var pending = partialLine[...]
        var rest = data[...]
        while let newline = rest.firstIndex(of: UInt8(ascii: "\n")) {
            lineCount += 1
            lines.append((lineCount, start + UInt64(newline + 1), String(decoding: pending + rest[..<newline], as: UTF8.self)))
            pending = []
            rest = rest[(newline + 1)...]
        }
        partialLine = Array(pending + rest)
        return (restarted, lines)
    }

    /// `count` bytes of `fd` from `offset` (all to its end when nil); fewer when the file is shorter.
    private static func bytes(_ fd: Int32, from offset: UInt64, count: Int?) -> [UInt8] {
        guard lseek(fd, off_t(clamping: offset), SEEK_SET) >= 0 else { return [] }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while count.map({ bytes.count < $0 }) ?? true {
            let wanted = min(chunk.count, count.map { $0 - bytes.count } ?? chunk.count)
            let read = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, wanted) }
            if read < 0, errno == EINTR { continue }
            guard read > 0 else { break }
            bytes.append(contentsOf: chunk[..<read])
        }
        return bytes
    }
}

/// A line of a ``ScriptedGPIOBackend``.
private final class ScriptedLine: GPIOLine {
    let backend: ScriptedGPIOBackend
    let generation: Int
    let name: String

    init(backend: ScriptedGPIOBackend, generation: Int, name: String) {
        self.backend = backend
        self.generation = generation
        self.name = name
    }

    func level() throws(SensorError) -> Int {
        try backend.level(generation: generation, name: name)
    }

    func waitForEvents(timeout: Duration) throws(SensorError) -> [GPIOEdgeEvent] {
        try backend.take(generation: generation, name: name, timeout: timeout)
    }
}
