import ArgumentParser
import FarmgateIngest
import FarmgateWire
import Foundation
import Hummingbird
import Logging
import Synchronization

/// `farmgate-bench notify`: notifications delivered per second from the outbox of an embedded SQLite store to a local
/// webhook receiver (a Hummingbird server on loopback that answers 200), through the real delivery workers: claims,
/// pacing, Alertmanager rendering, HMAC signature, AsyncHTTPClient, and the completion written back. Prints, never asserts.
struct NotifyBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "notify", abstract: "Notifications per second delivered from the outbox to a local webhook receiver.")

    @Option(help: "Notifications to deliver.")
    var notifications = 2000

    @Option(help: "Receivers (webhooks) they are spread over.")
    var receivers = 4

    @Option(help: "Deliveries in flight per receiver ([notify] per_receiver).")
    var perReceiver = 8

    func validate() throws {
        guard notifications > 0, receivers > 0, perReceiver > 0 else { throw ValidationError("--notifications, --receivers and --per-receiver must be positive") }
    }

    func run() async throws {
        let logger = Logger.bench
        let directory = NSTemporaryDirectory() + "farmgate-bench-notify-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }

        let received = Atomic<Int>(0)
        let router = Router()
        router.post("/hook/{receiver}") { request, _ -> HTTPResponse.Status in
            _ = try await request.body.collect(upTo: 1 << 20)
            received.add(1, ordering: .relaxed)
            return .ok
        }
        let port = Atomic<Int>(0)
        var serverLogger = logger
        // The server is cancelled at the end, which it would log as an error.
        serverLogger.logLevel = .critical
        let app = Application(
            router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { channel in port.store(channel.localAddress?.port ?? 0, ordering: .relaxed) }, logger: serverLogger)

        let store = try SQLiteIngestStore(path: directory + "/ingest.sqlite", logger: logger)
        defer { store.close() }
        try await store.migrate()
        _ = try await store.createFarm(name: "bench", createdAt: .now())

        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await app.runService() }
            defer { group.cancelAll() }
            while port.load(ordering: .relaxed) == 0 { try await Task.sleep(for: .milliseconds(10)) }
            let base = "http://127.0.0.1:\(port.load(ordering: .relaxed))/hook/"
            let admin = AlertDeliveryAdmin(store: store)
            var ids: [Int64] = []
            for index in 0..<receivers {
                ids.append(
                    try await admin.addReceiver(
                        farm: "bench", AlertReceiverSpec(name: "r\(index)", kind: .webhook, url: base + "r\(index)", secret: "bench-secret", maxPerMinute: 100_000)
                    ).id)
            }
            let enqueueStart = ContinuousClock.now
            for index in 0..<notifications {
                let notification = AlertNotification(
                    farm: "bench", rule: "ph-low", alertID: Int64(index + 1), transitionID: Int64(index + 1), fingerprint: "fp-\(index)", status: .firing,
                    severity: "critical", labels: ["alertname": "ph-low", "device": "site-1", "sensor": "tank\(index % 20).ph"],
                    summary: "pH below 5.5 on site-1 tank\(index % 20).ph", startsAt: .now(), value: 5.3)
                _ = try await store.enqueueNotification(notification, receiverID: ids[index % receivers], dueAt: .now())
            }
            let enqueueSeconds = seconds(ContinuousClock.now - enqueueStart)

            let configuration = NotifyConfiguration(
                requestTimeout: .seconds(10), claimTimeout: .seconds(60), perReceiver: perReceiver, maxInFlight: perReceiver * receivers,
                pollInterval: .milliseconds(20))
            let delivery = try NotificationDelivery(store: store, configuration: configuration, logger: logger)
            let started = ContinuousClock.now
            group.addTask { try await delivery.run() }
            while try await store.outboxCounts()[.delivered, default: 0] < notifications {
                try await Task.sleep(for: .milliseconds(20))
            }
            let elapsed = seconds(ContinuousClock.now - started)
            print("\(notifications) notifications to \(receivers) webhook receivers on 127.0.0.1, \(perReceiver) in flight per receiver, SQLite outbox")
            print(String(format: "enqueued (one transaction each): %.0f notifications/s", Double(notifications) / enqueueSeconds))
            print(String(format: "delivered: %.0f notifications/s (%.2f s; %d requests received)", Double(notifications) / elapsed, elapsed, received.load(ordering: .relaxed)))
        }
    }

    private func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }
}
