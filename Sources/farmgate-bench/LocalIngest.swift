import ArgumentParser
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Logging
import Prometheus
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// A real ingest (Hummingbird on a loopback port, SQLite store) inside the benchmark process, with one farm and device.
struct LocalIngest {
    var port: Int
    var deviceKey: String
    var store: SQLiteIngestStore

    var endpoint: String { "http://127.0.0.1:\(port)" }

    /// A fresh SQLite ingest store in `directory` with farm `bench` and `device` in it; returns the store and the
    /// device's key.
    static func openStore(directory: String, device: DeviceID, logger: Logger) async throws -> (SQLiteIngestStore, APIKey) {
        let path = directory + "/ingest.sqlite"
        let store = try await runOffPool { try SQLiteIngestStore(path: path, logger: logger) }
        do {
            try await store.migrate()
            let admin = IngestAdmin(store: store)
            _ = try await admin.createFarm(name: "bench")
            return (store, try await admin.createDevice(farm: "bench", device: device))
        } catch {
            store.close()
            throw error
        }
    }

    /// Starts the ingest, runs `body` while it serves, then shuts it down gracefully.
    ///
    /// - Parameter now: the ingest's clock; generated readings lie in a fixed window, so they are judged by its end. nil: the
    ///   real clock (for live agents).
    static func withRunning<T: Sendable>(
        directory: String, device: DeviceID, now: Timestamp?, logger: Logger, _ body: @escaping @Sendable (LocalIngest) async throws -> T
    ) async throws -> T {
        let (store, key) = try await openStore(directory: directory, device: device, logger: logger)
        defer { store.close() }

        let port = try freePort()
        var configuration = IngestConfiguration()
        configuration.server.port = port
        configuration.limits.requestsPerSecond = 1_000_000
        configuration.limits.burst = 1_000_000
        let app = buildApplication(
            configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: logger,
            now: { now ?? Timestamp.now() })
        let ingest = LocalIngest(port: port, deviceKey: key.text, store: store)
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: [app], logger: logger))
        return try await withThrowingTaskGroup(of: T?.self) { tasks in
            tasks.addTask {
                try await group.run()
                return nil
            }
            do {
                try await waitForListener(port: port)
                let result = try await body(ingest)
                await group.triggerGracefulShutdown()
                while try await tasks.next() != nil {}
                return result
            } catch {
                tasks.cancelAll()
                throw error
            }
        }
    }

    /// A configuration serving on 127.0.0.1 at a free port (returned) whose read rate limit never throttles a benchmark.
    static func readerConfiguration() throws -> (IngestConfiguration, port: Int) {
        var configuration = IngestConfiguration()
        let port = try freePort()
        configuration.server.host = "127.0.0.1"
        configuration.server.port = port
        configuration.limits.readRequestsPerSecond = 10_000_000
        configuration.limits.readBurst = 10_000_000
        return (configuration, port)
    }

    /// Waits until something accepts TCP connections on the port.
    private static func waitForListener(port: Int) async throws {
        for _ in 0..<200 {
            // A connect to loopback answers at once (accepted or refused): no need to leave the concurrency pool.
            if (try? BenchConnection(port: port)) != nil { return }
            try await Task.sleep(for: .milliseconds(25))
        }
        throw ValidationError("the ingest did not start on port \(port)")
    }

    /// A TCP port that was free a moment ago on the loopback interface.
    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ValidationError("cannot create a socket") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw ValidationError("cannot find a free port") }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

extension Duration {
    var seconds: Double { self / .seconds(1) }
}
