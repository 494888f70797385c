import FarmgateWire

/// The control socket's quarantine commands, as `farmgate quarantine` sends them.
///
/// | command | arguments | answer (`quarantine`) |
/// |---|---|---|
/// | `quarantine.list` | `code` (optional), `after` (a sequence number, default 0), `limit` (1 to 1000, default 1000) | `readings`, `next_after` |
/// | `quarantine.requeue` | exactly one of `all` = `true`, `code`, `sequences` (decimal numbers joined by commas) | `requeue` |
/// | `quarantine.drop` | the same selectors | `drop` |
///
/// `quarantine.list` answers one page, in ascending sequence order; `next_after` is the `after` of the next page, absent
/// on the last one. The first page (`after` 0) also carries the quarantined calibration events (`calibrations`, with the
/// same `code` filter): they are few, and never more than the buffer's events. `all` and `code` requeue or drop
/// quarantined calibration events too (counted in the outcome's `calibrations`); `sequences` selects readings only. The CLI asks page after page, so an export of any size streams through in bounded memory.
///
/// `quarantine.requeue` and `quarantine.drop` answer once the whole selection is done, which for a large quarantine takes
/// minutes: the buffer works through it in chunks (``ReadingBuffer/quarantineChunkSize``) between its commits, so the
/// agent stays responsive meanwhile, and the CLI waits for these two answers far longer than for the others.
public struct QuarantineCommands: Sendable {
    /// The commands this type answers.
    public static let commands = ["quarantine.list", "quarantine.requeue", "quarantine.drop"]
    /// The most sequence numbers one requeue or drop may name (the request is one line of at most 64 KiB).
    public static let maximumSequences = 5_000

    let buffer: ReadingBuffer

    public init(buffer: ReadingBuffer) {
        self.buffer = buffer
    }

    /// Answers `request`, or an error naming what was wrong with it.
    public func answer(_ request: ControlRequest) async -> ControlAnswer {
        let arguments = request.arguments ?? [:]
        do {
            switch request.command {
            case "quarantine.list":
                let code = try arguments["code"].map(Self.code)
                let after = try arguments["after"].map { text -> UInt64 in
                    guard let value = UInt64(text) else { throw ArgumentError("after must be a sequence number, not \"\(text.prefix(40))\"") }
                    return value
                } ?? 0
                let limit = try arguments["limit"].map { text -> Int in
                    guard let value = Int(text), (1...ReadingBuffer.maximumQuarantinePage).contains(value) else {
                        throw ArgumentError("limit must be 1 to \(ReadingBuffer.maximumQuarantinePage), not \"\(text.prefix(40))\"")
                    }
                    return value
                } ?? ReadingBuffer.maximumQuarantinePage
                let page = try await buffer.quarantinePage(code: code, after: after, limit: limit)
                let next = page.count == limit ? page.last?.sequence : nil
                var answer = QuarantineAnswer(readings: page, nextAfter: next)
                if after == 0 { answer.calibrations = try await buffer.quarantinedCalibrations(code: code) }
                return ControlAnswer(ok: true, quarantine: answer)
            case "quarantine.requeue":
                let selection = try Self.selection(arguments)
                var outcome = try await buffer.requeue(selection)
                // Calibration events have ids, not sequences: `all` and `code` select them too.
                switch selection {
                case .all: outcome.calibrations = Self.some(try await buffer.requeueCalibrations())
                case .code(let code): outcome.calibrations = Self.some(try await buffer.requeueCalibrations(code: code))
                default: break
                }
                return ControlAnswer(ok: true, quarantine: QuarantineAnswer(requeue: outcome))
            case "quarantine.drop":
                let selection = try Self.selection(arguments)
                var outcome = try await buffer.dropQuarantined(selection)
                switch selection {
                case .all: outcome.calibrations = Self.some(try await buffer.dropQuarantinedCalibrations())
                case .code(let code): outcome.calibrations = Self.some(try await buffer.dropQuarantinedCalibrations(code: code))
                default: break
                }
                return ControlAnswer(ok: true, quarantine: QuarantineAnswer(drop: outcome))
            default:
                return ControlAnswer(ok: false, error: "unknown quarantine command \"\(request.command)\"")
            }
        } catch let error as ArgumentError {
            return ControlAnswer(ok: false, error: "\(request.command): \(error.description)")
        } catch {
            return ControlAnswer(ok: false, error: "\(request.command): cannot use the buffer: \(error)")
        }
    }

    /// The selection the arguments name: exactly one of `all`, `code`, `sequences`.
    static func selection(_ arguments: [String: String]) throws(ArgumentError) -> QuarantineSelection {
        let given = ["all", "code", "sequences"].filter { arguments[$0] != nil }
        guard given.count == 1 else {
            throw ArgumentError("name exactly one of all, code or sequences (got \(given.isEmpty ? "none" : given.joined(separator: ", ")))")
        }
        if let all = arguments["all"] {
            guard all == "true" else { throw ArgumentError("all must be \"true\"") }
            return .all
        }
        if let code = arguments["code"] { return .code(try Self.code(code)) }
        let text = arguments["sequences"] ?? ""
        var sequences: [UInt64] = []
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard let value = UInt64(part), value > 0 else {
                throw ArgumentError("sequences must be sequence numbers joined by commas; \"\(part.prefix(40))\" is not one")
            }
            sequences.append(value)
        }
        guard sequences.count <= maximumSequences else {
            throw ArgumentError("at most \(maximumSequences) sequence numbers at once (got \(sequences.count)); select by code or all instead")
        }
        return .sequences(sequences)
    }

    /// A count, or nil when zero (an outcome without calibration events reads as it did before they existed).
    static func some(_ count: Int) -> Int? { count > 0 ? count : nil }

    static func code(_ text: String) throws(ArgumentError) -> String {
        guard QuarantineReason.isCode(text) else {
            throw ArgumentError("code must be a reason code such as timestamp_in_future (1 to 64 of a-z, 0-9, _), not \"\(text.prefix(80))\"")
        }
        return text
    }

    struct ArgumentError: Error, CustomStringConvertible {
        let description: String
        init(_ description: String) { self.description = description }
    }
}

/// What a quarantine command answers (one of the fields, by command).
public struct QuarantineAnswer: Codable, Sendable {
    /// `quarantine.list`: one page, ascending by sequence.
    public var readings: [QuarantinedReading]?
    /// `quarantine.list`: the `after` of the next page; nil on the last page.
    public var nextAfter: UInt64?
    public var requeue: RequeueOutcome?
    public var drop: DropOutcome?
    /// `quarantine.list`, first page: calibration events the ingest refused for good, oldest first.
    public var calibrations: [QuarantinedCalibration]?

    public init(readings: [QuarantinedReading]? = nil, nextAfter: UInt64? = nil, requeue: RequeueOutcome? = nil, drop: DropOutcome? = nil) {
        self.readings = readings
        self.nextAfter = nextAfter
        self.requeue = requeue
        self.drop = drop
    }

    enum CodingKeys: String, CodingKey {
        case readings
        case nextAfter = "next_after"
        case requeue, drop, calibrations
    }
}
