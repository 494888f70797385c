import FarmgateSupport
public import FarmgateWire
import Foundation

extension IngestConfiguration {
    /// `[retention]`: how long raw readings, each rollup level, outbox rows and alert history are kept, and how often
    /// retention runs.
    ///
    /// ```toml
    /// [retention]
    /// raw = "90d"           # default 90 days; "forever" keeps raw readings
    /// rollup_1m = "365d"    # default 365 days
    /// rollup_1h = "forever" # default forever
    /// rollup_1d = "forever" # default forever
    /// interval = "1h"       # default 1 hour: how often `serve` runs retention
    /// delivered_notifications = "30d"   # default 30 days: delivered outbox rows, counted from their delivery
    /// dead_notifications = "90d"        # default 90 days: dead letters, counted from their last attempt
    /// alert_history = "365d"            # default 365 days: alert transitions, counted from when they were recorded;
    ///                                   # each alert's newest is always kept
    /// ```
    ///
    /// A period is cut at a whole UTC day: a run removes what lies before the start of the day that is `raw` before now
    /// (PostgreSQL keeps raw readings in one partition per UTC day and drops whole ones). So between `raw` and `raw`
    /// plus one day of raw readings is kept.
    public struct Retention: Sendable, Hashable {
        /// How long raw readings are kept. Default 90 days; nil keeps them forever.
        public var raw: Duration?
        /// How long 1-minute rollups are kept. Default 365 days; nil keeps them forever.
        public var rollup1m: Duration?
        /// How long hourly rollups are kept. Default nil: forever.
        public var rollup1h: Duration?
        /// How long daily rollups are kept. Default nil: forever.
        public var rollup1d: Duration?
        /// How often `serve` runs retention (the first run comes right after start). Default 1 hour.
        public var interval: Duration
        /// How long a delivered notification stays in the outbox after its delivery (`alert outbox list`). Default 30
        /// days; nil keeps them forever.
        public var deliveredNotifications: Duration?
        /// How long a dead letter stays after its last attempt, for `alert outbox retry`. Default 90 days; nil: forever.
        public var deadNotifications: Duration?
        /// How long an alert transition (`alert list`, the alerts API's history) stays after it was recorded. Each
        /// alert's newest transition stays whatever its age. Default 365 days; nil keeps them forever.
        public var alertHistory: Duration?

        /// The shortest period a key accepts: one day (a daily partition is the smallest thing PostgreSQL drops).
        public static let shortestPeriod: Duration = .seconds(86_400)

        /// Creates the section; every parameter defaults as documented on its property.
        public init(
            raw: Duration? = .seconds(90 * 86_400), rollup1m: Duration? = .seconds(365 * 86_400), rollup1h: Duration? = nil,
            rollup1d: Duration? = nil, interval: Duration = .seconds(3600), deliveredNotifications: Duration? = .seconds(30 * 86_400),
            deadNotifications: Duration? = .seconds(90 * 86_400), alertHistory: Duration? = .seconds(365 * 86_400)
        ) {
            self.raw = raw
            self.rollup1m = rollup1m
            self.rollup1h = rollup1h
            self.rollup1d = rollup1d
            self.interval = interval
            self.deliveredNotifications = deliveredNotifications
            self.deadNotifications = deadNotifications
            self.alertHistory = alertHistory
        }

        /// How long `level` is kept (nil: forever).
        public func period(of level: RollupLevel) -> Duration? {
            switch level {
            case .minute: rollup1m
            case .hour: rollup1h
            case .day: rollup1d
            }
        }

        /// Where a run at `now` cuts a period: the start of the UTC day `period` before `now`; nil for forever.
        public static func cutoff(_ period: Duration?, now: Timestamp) -> Timestamp? {
            guard let period else { return nil }
            return Timestamp(microseconds: RollupLevel.day.bucket(of: now.microseconds - period.wholeMicroseconds))
        }

        /// `90d`, `forever`: how a period is written in logs and the command's output.
        public static func describe(_ period: Duration?) -> String {
            guard let period else { return "forever" }
            let seconds = period.components.seconds
            if seconds % 86_400 == 0 { return "\(seconds / 86_400)d" }
            if seconds % 3600 == 0 { return "\(seconds / 3600)h" }
            return "\(seconds)s"
        }

        /// Reads `[retention]`.
        init(section: ConfigTable) throws(ConfigurationError) {
            self.init()
            try section.checkKeys([
                "raw", "rollup_1m", "rollup_1h", "rollup_1d", "interval", "delivered_notifications", "dead_notifications", "alert_history",
            ])
            if section.contains("raw") { raw = try Self.period(section, "raw") }
            if section.contains("rollup_1m") { rollup1m = try Self.period(section, "rollup_1m") }
            if section.contains("rollup_1h") { rollup1h = try Self.period(section, "rollup_1h") }
            if section.contains("rollup_1d") { rollup1d = try Self.period(section, "rollup_1d") }
            if section.contains("delivered_notifications") { deliveredNotifications = try Self.period(section, "delivered_notifications") }
            if section.contains("dead_notifications") { deadNotifications = try Self.period(section, "dead_notifications") }
            if section.contains("alert_history") { alertHistory = try Self.period(section, "alert_history") }
            if let every = try section.duration("interval", in: Duration.seconds(60)...Duration.seconds(7 * 86_400)) { interval = every }
            // A coarser level is what remains of a span once the finer one is gone: keeping it for less time than the
            // finer one would leave minutes where hours are missing, and `auto` reads would find no level for a span.
            let levels: [(key: String, period: Duration?)] = [("rollup_1m", rollup1m), ("rollup_1h", rollup1h), ("rollup_1d", rollup1d)]
            for (finer, coarser) in zip(levels, levels.dropFirst()) {
                guard let coarserPeriod = coarser.period else { continue }
                guard let finerPeriod = finer.period, finerPeriod <= coarserPeriod else {
                    throw section.error(
                        coarser.key,
                        "keeps \(coarser.key) for \(Self.describe(coarser.period)), less than \(finer.key) (\(Self.describe(finer.period))); a coarser rollup must be kept at least as long as a finer one: raise \(coarser.key) or lower \(finer.key)")
                }
            }
        }

        /// A period key: a duration of at least a day, or `"forever"` (nil).
        private static func period(_ section: ConfigTable, _ key: String) throws(ConfigurationError) -> Duration? {
            let hint = "a duration of at least one day such as \"90d\", or \"forever\" to keep everything"
            if case .string(let text)? = section.value(key) {
                if text.trimmingCharacters(in: .whitespaces).lowercased() == "forever" { return nil }
                guard ConfigTable.parseDuration(text) != nil else { throw section.error(key, "must be \(hint) (got \"\(text)\")") }
            }
            let upper = Duration.seconds(100 * 366 * 86_400)
            guard let period = try section.duration(key, in: shortestPeriod...upper) else { return nil }
            return period
        }
    }
}
