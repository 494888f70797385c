import FarmgateWire
public import Logging
public import ServiceLifecycle

/// `serve`'s retention schedule: a run right after start, then every `[retention] interval`, until the group's graceful
/// shutdown (a run in progress stops at its next transaction on SQLite; what it removed stays removed, the next run
/// goes on from there).
///
/// One run at a time: on SQLite a run holds a lock file beside the database (`<path>.retention.lock`; a scheduled run
/// that finds `farmgate-ingest retention run` holding it skips, logged). With several instances on one PostgreSQL each
/// scheduled run happens once: a run takes an advisory try-lock (an instance that finds it taken skips), and skips too when another instance completed a run less than half an
/// interval ago, measured by the database's clock (instances' clocks may disagree by minutes; `now` only sets the
/// cut-offs). Every run is logged (what went, or why it was skipped) and counted in ``RetentionMetrics``.
public struct RetentionService: Service {
    let store: any RetentionStore
    let retention: IngestConfiguration.Retention
    let metrics: RetentionMetrics?
    let logger: Logger
    let now: @Sendable () -> Timestamp

    /// - Parameters:
    ///   - store: the store to keep within `retention`; migrated first (harmless when `serve` already did).
    ///   - metrics: where runs are counted (`serve` passes the registry `/metrics` renders).
    ///   - now: the clock cut-offs are computed from.
    public init(
        store: any RetentionStore, retention: IngestConfiguration.Retention, metrics: RetentionMetrics?, logger: Logger,
        now: @escaping @Sendable () -> Timestamp = { Timestamp.now() }
    ) {
        self.store = store
        self.retention = retention
        self.metrics = metrics
        self.logger = logger
        self.now = now
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown {
            var migrated = false
            while !Task.isCancelled {
                if migrated {
                    _ = await runOnce()
                } else {
                    // The schema must have the rollup tables before a run; migrate() is safe to call again. Failed, it is
                    // tried again at the next run's time (nothing is deleted meanwhile).
                    do {
                        try await store.migrate()
                        migrated = true
                        continue
                    } catch is CancellationError {
                        return
                    } catch {
                        if Task.isCancelled { return }
                        logger.error(
                            "retention cannot run: the store's schema could not be brought up to date; trying again at the next run",
                            metadata: ["error": "\(error)", "next_in": "\(retention.interval)"])
                    }
                }
                do { try await Task.sleep(for: retention.interval) } catch { return }
            }
        }
    }

    /// One scheduled run: logged and counted, never thrown (the next run tries again).
    @discardableResult
    func runOnce() async -> RetentionReport? {
        let started = ContinuousClock.now
        let at = now()
        do {
            var report = try await store.runRetention(retention, now: at, options: RetentionRunOptions(skipIfRanWithin: retention.interval / 2))
            report.duration = ContinuousClock.now - started
            metrics?.record(report, endedAt: Double(Timestamp.now().microseconds) / 1e6)
            Self.log(report, logger: logger)
            return report
        } catch is CancellationError {
            return nil
        } catch {
            metrics?.recordFailure()
            logger.error(
                "retention run failed; the next run will try again", metadata: ["error": "\(String(reflecting: error))", "retention.interval": "\(retention.interval)"])
            return nil
        }
    }

    /// Logs what a run removed (info) or why it was skipped: at info when another run holds the lock (on SQLite a
    /// `farmgate-ingest retention run` beside `serve`; on PostgreSQL another instance's run in progress), at debug when
    /// another instance completed one recently (the usual case with several instances).
    public static func log(_ report: RetentionReport, logger: Logger) {
        switch report.skipped {
        case .runningElsewhere?:
            logger.info("retention run skipped", metadata: ["retention.reason": "\(report.lines.joined(separator: " "))"])
            return
        case .ranRecently?:
            logger.debug("retention run skipped", metadata: ["retention.reason": "\(report.lines.joined(separator: " "))"])
            return
        case nil:
            break
        }
        var metadata: Logger.Metadata = [
            "retention.partitions_dropped": "\(report.partitionsDropped.count)",
            "retention.raw_rows_deleted": "\(report.rawRowsDeleted)",
            "retention.rows_in_dropped_partitions": "\(report.rowsInDroppedPartitions)",
            "retention.duration": "\(report.duration)",
        ]
        if let first = report.partitionsDropped.first, let last = report.partitionsDropped.last {
            metadata["retention.partitions"] = "\(first)…\(last)"
        }
        if let first = report.minuteRollupPartitionsDropped.first, let last = report.minuteRollupPartitionsDropped.last {
            metadata["retention.rollups_1m_partitions_dropped"] = "\(report.minuteRollupPartitionsDropped.count)"
            metadata["retention.rollups_1m_partitions"] = "\(first)…\(last)"
            metadata["retention.rows_in_dropped_rollups_1m_partitions"] = "\(report.rowsInDroppedMinuteRollupPartitions)"
        }
        if let cutoff = report.rawCutoff { metadata["retention.raw_cutoff"] = "\(RFC3339.format(cutoff))" }
        for level in RollupLevel.allCases { metadata["retention.\(level.table)_deleted"] = "\(report.rollupRowsDeleted[level] ?? 0)" }
        metadata["retention.delivered_notifications_deleted"] = "\(report.deliveredNotificationsDeleted)"
        metadata["retention.dead_notifications_deleted"] = "\(report.deadNotificationsDeleted)"
        metadata["retention.alert_transitions_deleted"] = "\(report.alertTransitionsDeleted)"
        if let cutoff = report.alertHistoryCutoff { metadata["retention.alert_history_cutoff"] = "\(RFC3339.format(cutoff))" }
        logger.info(report.dryRun ? "retention dry run" : "retention run completed", metadata: metadata)
    }
}
