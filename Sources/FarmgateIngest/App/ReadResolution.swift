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

    /// What `auto` reads for `from..<to`: raw readings when the sensor has at most ``autoTargetPoints`` of them there
    /// and raw readings are still kept from `from` on, else the finest rollup level with at most that many buckets in
    /// the span that is still kept from `from` on (1 day when none is).
    ///
    /// The raw readings are counted by reading them: `storedAtLeast` (the hourly rollups of the hours wholly inside the
    /// span, cheap whatever its length) rules raw out without reading when it is already over the target; otherwise
    /// `raw` reads at most one reading more than the target, which is then the answer itself when it holds no more
    /// than the target. So the decision is exact at every span: an estimate by whole hours would count the readings of
    /// the two hours a span touches at its ends (a 30-minute span across an hour boundary counted as two hours), and
    /// one from rollups that retention removed would count nothing.
    ///
    /// - Parameters:
    ///   - keptFrom: retention's cut-off of each resolution (nil: kept forever); a level whose cut-off is after `from`
    ///     has lost part of the span, so a coarser one that still holds it is read instead.
    ///   - storedAtLeast: a lower bound of the sensor's readings in the span.
    ///   - raw: the sensor's raw readings in the span, at most `limit` of them, in time order.
    /// - Returns: the resolution, and the raw readings when it is raw.
    ///   - target: the most points the answer may hold (``autoTargetPoints``, or the request's `limit` when smaller: the
    ///     level is then picked so that one answer holds the whole span, and paging never changes the level).
    static func decideAuto<Row>(
        from: Timestamp, to: Timestamp, target: Int = autoTargetPoints, keptFrom: (Resolved) -> Timestamp?, storedAtLeast: () async throws -> Int,
        raw: (_ limit: Int) async throws -> [Row]
    ) async rethrows -> (resolved: Resolved, rows: [Row]) {
        func kept(_ resolution: Resolved) -> Bool { keptFrom(resolution).map { from >= $0 } ?? true }
        if kept(.raw), try await storedAtLeast() <= target {
            let rows = try await raw(target + 1)
            if rows.count <= target { return (.raw, rows) }
        }
        for level in RollupLevel.allCases where buckets(of: level, from: from, to: to) <= Int64(target) && kept(.rollup(level)) {
            return (.rollup(level), [])
        }
        return (.rollup(.day), [])
    }

    /// The buckets of `level` that `from..<to` overlaps (the answer holds those, partial ones at either end too).
    static func buckets(of level: RollupLevel, from: Timestamp, to: Timestamp) -> Int64 {
        guard to > from else { return 0 }
        return (level.bucket(of: to.microseconds - 1) - level.bucket(of: from.microseconds)) / level.width + 1
    }
}
