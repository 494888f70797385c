import FarmgateWire

/// The `resolution` of the range query: raw readings or one rollup level, or `auto` to let the span decide.
enum ReadResolution: String, CaseIterable, Sendable {
    case raw
    case minute = "1m"
    case hour = "1h"
    case day = "1d"
    case auto

    /// What a query reads once `auto` is decided.
    enum Resolved: Sendable, Hashable {
        case raw
        case rollup(RollupLevel)

        var name: String {
            switch self {
            case .raw: "raw"
            case .rollup(let level): level.rawValue
            }
        }
    }

    /// About how many points per sensor `auto` keeps an answer under.
    static let autoTargetPoints = 2_000

    /// The span `auto` reads when `from` is absent: the day before `to`.
    static let autoDefaultSpan: Int64 = 86_400_000_000

    /// The accepted values, for the error that names them.
    static var accepted: String { allCases.map(\.rawValue).joined(separator: ", ") }

    /// What `auto` reads for `from..<to`: raw readings when the sensor stored at most ``autoTargetPoints`` there and
    /// raw readings are still kept from `from` on, else the finest rollup level with at most that many buckets in the
    /// span that is still kept from `from` on (1 day when none is).
    ///
    /// - Parameters:
    ///   - keptFrom: retention's cut-off of each resolution (nil: kept forever); a level whose cut-off is after `from`
    ///     has lost part of the span, so a coarser one that still holds it is read instead.
    ///   - storedReadings: how many readings the sensor stored in the span (from the hourly rollups).
    static func decideAuto(
        from: Timestamp, to: Timestamp, keptFrom: (Resolved) -> Timestamp?, storedReadings: () async throws -> Int
    ) async rethrows -> Resolved {
        let span = max(0, to.microseconds - from.microseconds)
        func kept(_ resolution: Resolved) -> Bool { keptFrom(resolution).map { from >= $0 } ?? true }
        if kept(.raw), try await storedReadings() <= autoTargetPoints {
            return .raw
        }
        for level in RollupLevel.allCases where span / level.width <= Int64(autoTargetPoints) && kept(.rollup(level)) {
            return .rollup(level)
        }
        return .rollup(.day)
    }
}
