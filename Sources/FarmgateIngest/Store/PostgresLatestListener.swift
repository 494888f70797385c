import FarmgateSupport
import FarmgateWire
public import Logging
public import Metrics
import NIOCore
import PostgresNIO
public import ServiceLifecycle
import Synchronization

/// Keeps this instance's ``LatestCache`` consistent with commits made by other instances on the same PostgreSQL: one
/// connection of its own that `LISTEN`s on ``PostgresLatestNotice/channel``.
///
/// - Once `LISTEN` is in place, the cache is turned on (``LatestCache/enable()``): from then on every commit of any
///   instance is heard, so whatever a farm's fill reads later can be kept up to date.
/// - A notification marks its device stale at once (reads of it wait, never see the older value), then the device's
///   rows of `latest` are read again on this connection, the devices of notifications that arrived meanwhile in the
///   same query, and merged. So a commit acknowledged by another instance is served here at most the notification's
///   delivery plus one small query later (milliseconds on one network).
/// - When the connection is lost (a database restart, a network cut), notifications may be missed: the cache is emptied
///   and turned off, so every `latest` is read from the store, and the listener reconnects with backoff (100 ms doubling
///   to 5 s), turning the cache on again once it listens.
/// - A connection can also go silent without being closed (half-open TCP: a NAT or firewall that dropped its state, a
///   failover that left no host to send a reset): nothing arrives, nothing fails, and the cache would serve what it holds
///   forever. So every ``Liveness/interval`` the listener sends its `LISTEN` again on the same connection (a no-op for the
///   server, which answers it like any statement) and requires the answer within ``Liveness/timeout``. Without it, the
///   connection is closed and handled as a lost one: the cache turned off at once, the reconnect counted, one warning
///   logged. A commit another instance acknowledged is then missing here for at most interval + timeout (10 s), from
///   the last answered probe to the deadline of the next. The probe is that same `LISTEN` statement, so that the
///   session still shows as `LISTEN "farmgate_latest";` in `pg_stat_activity` between notifications.
///
/// Its connection is ``PostgresSettings/forListening``: `[storage] listen_url` when set, else the pool's `url`. It must
/// reach PostgreSQL directly, or through PgBouncer in session mode: in transaction mode `LISTEN` does not hold (the
/// server connection goes back to PgBouncer's pool after the statement). Behind a transaction-mode PgBouncer set
/// `listen_url` to the database itself. This instance's own commits are heard too (they also reach the cache through
/// the ``CommitFeed``); their refresh finds nothing newer.
public struct PostgresLatestListener: Service {
    /// How often the listening connection must prove it is alive, and how long its answer may take.
    public struct Liveness: Sendable, Hashable {
        /// The time from one answered probe to the next probe.
        public var interval: Duration
        /// How long a probe may go unanswered before the connection is taken for dead.
        public var timeout: Duration

        /// Every 5 s, answered within 5 s: a commit heard nowhere costs at most 10 s of staleness. A healthy answer takes
        /// milliseconds (one round trip, no disk), so the deadline holds through a busy server or a loaded host, and a
        /// probe costs the server one statement per instance every 5 s.
        public static let standard = Liveness(interval: .seconds(5), timeout: .seconds(5))

        public init(interval: Duration, timeout: Duration) {
            self.interval = interval
            self.timeout = timeout
        }
    }

    let settings: PostgresSettings
    let cache: LatestCache
    let logger: Logger
    let liveness: Liveness
    private let reconnects: Counter
    private let silences: Counter

    /// - Parameter metrics: where the listener's counters go; `serve` bootstraps the global factory with the registry
    ///   `/metrics` renders.
    public init(
        settings: PostgresSettings, cache: LatestCache, logger: Logger, liveness: Liveness = .standard,
        metrics: any MetricsFactory = MetricsSystem.factory
    ) {
        self.settings = settings
        self.cache = cache
        self.logger = logger
        self.liveness = liveness
        reconnects = Counter(label: "farmgate_ingest_latest_listener_reconnects_total", factory: metrics)
        silences = Counter(label: "farmgate_ingest_latest_listener_probe_timeouts_total", factory: metrics)
    }

    public func run() async throws {
        let settings = self.settings.forListening
        // One connection of its own, opened directly (not through a pool, which would wait and retry inside without a
        // word): a connection that cannot be opened (a wrong password in listen_url, the server down) fails each attempt
        // within connect_timeout, and is logged and counted.
        let configuration = try settings.connectionConfiguration()
        await cancelWhenGracefulShutdown {
            var backoff = Duration.milliseconds(100)
            var failuresInARow = 0
            var connectionID = 0
            while !Task.isCancelled {
                let attempt = ContinuousClock.now
                var listened = false
                // What ended following: postgres-nio's `listen` may replace it with the error of its own clean-up on the
                // closed connection.
                var ended: (any Error)?
                do {
                    connectionID += 1
                    let connection = try await PostgresConnection.connect(configuration: configuration, id: connectionID, logger: self.logger)
                    do {
                        try await connection.listen(on: PostgresLatestNotice.channel) { notifications in
                            listened = true
                            failuresInARow = 0
                            self.cache.enable()
                            self.logger.info(
                                "listening for other instances' commits; latest values are served from memory", metadata: ["store.listen": "\(settings.redacted)"])
                            do {
                                try await self.follow(notifications, connection: connection)
                            } catch {
                                ended = error
                                throw error
                            }
                        }
                        try? await connection.close()
                    } catch {
                        try? await connection.close()
                        throw error
                    }
                } catch is CancellationError {
                    break
                } catch let caught {
                    if Task.isCancelled { break }
                    let error = ended ?? caught
                    if error is ListenerSilent { self.silences.increment() }
                    failuresInARow = listened ? 1 : failuresInARow + 1
                    // The first failure in a row is a warning, then one a minute or so (every 12th at the 5 s backoff).
                    let level: Logger.Level = failuresInARow == 1 || failuresInARow % 12 == 0 ? .warning : .debug
                    let message: Logger.Message =
                        listened
                        ? "lost the connection that hears other instances' commits; latest values are read from the store until it is back"
                        : "cannot open the connection that hears other instances' commits; latest values are read from the store until it opens"
                    self.logger.log(
                        level: level, message,
                        metadata: [
                            "store.listen": "\(settings.redacted)", "error": "\(Logger.describe(storeError: error))", "retry_in": "\(backoff)",
                            "failures_in_a_row": "\(failuresInARow)",
                        ])
                }
                self.cache.invalidateAll()
                guard !Task.isCancelled else { break }
                // A connection that held for a while starts the backoff over.
                if attempt.duration(to: .now) > .seconds(30) { backoff = .milliseconds(100) }
                self.reconnects.increment()
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(5))
            }
        }
        cache.invalidateAll()
    }

    /// Marks devices stale as notifications arrive, and refreshes them from `latest` in rounds on the same connection,
    /// while probing that connection (``probe(_:silence:)``). Ends with an error when the connection is lost, or with
    /// ``ListenerSilent`` when a probe went unanswered (the connection then closed).
    private func follow(_ notifications: PostgresNotificationSequence, connection: PostgresConnection) async throws {
        let silence = Silence()
        do {
            try await follow(notifications, connection: connection, silence: silence)
        } catch {
            // Following ended with its connection (or the listener stops): closed now, not waited for, so that
            // postgres-nio's clean-up after `listen` fails at once rather than wait for an answer on a dead socket.
            let _: EventLoopFuture<Void> = connection.close()
            // Closing the silent connection fails whatever waited on it, often before the probe's own error arrives.
            if let silent = silence.state.withLock({ $0 }) { throw silent }
            throw error
        }
        let _: EventLoopFuture<Void> = connection.close()
        // Following ends only with its connection. The refresh task ends without an error when the notifications end, and
        // may be the first task the group reports: a lost connection all the same.
        if let silent = silence.state.withLock({ $0 }) { throw silent }
        throw ListenerEnded()
    }


    private func follow(_ notifications: PostgresNotificationSequence, connection: PostgresConnection, silence: Silence) async throws {
        let pending = PendingRefreshes()
        let (wakeups, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        // Not a task group: after a database restart under load a refresh (or the notifications) was seen never to end
        // on its dead connection, even cancelled, and a group would wait for it for ever: no reconnection, `latest`
        // served stale from memory, and a graceful stop that never ended. The first to end ends following.
        try await firstToEnd([
            {
                defer { wake.finish() }
                for try await notification in notifications {
                    guard let (farmID, rowID, device) = PostgresLatestNotice.parse(notification.payload) else {
                        self.logger.warning("ignoring a notification this ingest did not write", metadata: ["payload": "\(notification.payload.prefix(100))"])
                        continue
                    }
                    guard let token = self.cache.markStale(farmID: farmID, device: device) else { continue }
                    pending.state.withLock { $0[rowID] = PendingRefreshes.Item(farmID: farmID, rowID: rowID, device: device, token: token) }
                    wake.yield()
                }
                throw ListenerEnded()
            },
            {
                for await _ in wakeups {
                    let round = pending.state.withLock { pending in
                        defer { pending = [:] }
                        return Array(pending.values)
                    }
                    guard !round.isEmpty else { continue }
                    let rows = try await self.latest(devices: round.map(\.rowID), connection: connection)
                    for item in round {
                        self.cache.refreshed(farmID: item.farmID, device: item.device, readings: rows[item.rowID] ?? [], token: item.token)
                    }
                }
            },
            {
                while true {
                    try await Task.sleep(for: self.liveness.interval)
                    try await self.probe(connection, silence: silence)
                }
            },
        ])
    }

    /// Sends the `LISTEN` statement again on `connection` and waits for its answer. When none comes within
    /// ``Liveness/timeout`` the silence is recorded, the cache turned off and the connection closed, which fails this
    /// probe, ends the notifications and fails a refresh waiting on it: ``follow(_:connection:)`` then ends. Cancelled
    /// (the listener stops), it closes the connection too, so that a silent one cannot hold the shutdown.
    private func probe(_ connection: PostgresConnection, silence: Silence) async throws {
        let timeout = liveness.timeout
        // The first to end wins, the other is not waited for (a query on a silent connection may never end).
        try await firstToEnd([
            {
                try await Task.sleep(for: timeout)
                let silent = silence.state.withLock { state in
                    state = state ?? ListenerSilent(timeout: timeout)
                    return state ?? ListenerSilent(timeout: timeout)
                }
                // Commits may have gone unheard since the last answer: no read is served from memory from now on.
                self.cache.invalidateAll()
                let _: EventLoopFuture<Void> = connection.close()
                throw silent
            },
            {
                try await withTaskCancellationHandler {
                    for try await _ in try await connection.query(Self.probeStatement, logger: self.logger) {}
                } onCancel: {
                    // Not waited for: closing a channel is local and completes on its event loop.
                    let _: EventLoopFuture<Void> = connection.close()
                }
            },
        ])
    }

    /// What postgres-nio sent to start listening, byte for byte: already listening, the server does nothing but answer.
    private static var probeStatement: PostgresQuery {
        PostgresQuery(unsafeSQL: #"LISTEN "\#(PostgresLatestNotice.channel)";"#)
    }

    /// The probe that went unanswered, once one did.
    private final class Silence: Sendable {
        let state = Mutex<ListenerSilent?>(nil)
    }

    /// A probe went unanswered: the connection was closed as silent.
    struct ListenerSilent: Error, CustomStringConvertible {
        let timeout: Duration
        var description: String { "the connection answered no liveness probe within \(timeout) (silent, not closed); closed it" }
    }

    /// Devices heard of and not yet refreshed, by device row id, with their newest stale token.
    private final class PendingRefreshes: Sendable {
        struct Item: Sendable {
            var farmID: Int64
            var rowID: Int64
            var device: DeviceID
            var token: UInt64
        }
        let state = Mutex<[Int64: Item]>([:])
    }

    private struct ListenerEnded: Error, CustomStringConvertible {
        var description: String { "the notification stream ended" }
    }

    /// The `latest` rows of the devices with row ids `devices`, by device row id.
    private func latest(devices: [Int64], connection: PostgresConnection) async throws -> [Int64: [LatestReading]] {
        var found: [Int64: [LatestReading]] = [:]
        let rows = try await connection.query(
            """
            SELECT d.id::int8, d.name, s.name, s.quantity, l.sequence, l.timestamp_us, l.value, l.flags
            FROM latest l JOIN sensors s ON s.id = l.sensor_id JOIN devices d ON d.id = s.device_id
            WHERE s.device_id = ANY(\(devices))
            """, logger: logger)
        for try await (rowID, device, sensor, quantity, sequence, timestamp, value, flags) in rows.decode(
            (Int64, String, String, String, Int64, Int64, Double, Int16).self)
        {
            found[rowID, default: []].append(
                LatestReading(
                    device: try pgDeviceID(device), sensor: try pgSensorID(sensor), quantity: try pgQuantity(quantity), sequence: UInt64(clamping: sequence),
                    timestamp: Timestamp(microseconds: timestamp), value: value, quality: QualityFlags(rawValue: UInt16(bitPattern: flags))))
        }
        return found
    }
}
