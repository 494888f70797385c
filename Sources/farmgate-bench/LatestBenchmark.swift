import ArgumentParser
import CLinux
import FarmgateIngest
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging
import Prometheus
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

/// `farmgate-bench latest`: the read API's `latest` served from the in-memory cache, on loopback.
///
/// 1. One device of `--sensors` sensors (`GET /v1/farms/bench/latest?device=dev-000`), `--clients` keep-alive
///    connections each with one request outstanding at all times (closed loop), driven by `--client-threads` threads
///    with epoll: reads/s and the latency distribution.
/// 2. The farm-wide answer of `--devices` devices in pages of `--page-limit` sensors, `--sweepers` connections each
///    walking every page after the other (`next` → `cursor`): bytes per page, pages/s, whole-farm sweeps/s.
///
/// The ingest runs in this process on an embedded SQLite store with every device's readings stored; the clients run on
/// the same machine and take CPU from it: the figures are for the ingest and its load generator sharing the cores.
/// Bounded: loopback only, each phase `--seconds` long. Prints, never asserts.
struct LatestBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "latest", abstract: "Latest values from the cache: one device under many keep-alive clients, and the farm-wide answer in pages.")

    @Option(help: "Seconds each phase lasts.")
    var seconds = 10

    @Option(help: "Keep-alive client connections reading one device's latest values.")
    var clients = 200

    @Option(help: "Threads driving those connections (epoll loop).")
    var clientThreads = 2

    @Option(help: "Sensors per device.")
    var sensors = 50

    @Option(help: "Devices of the farm (the farm-wide answer).")
    var devices = 200

    @Option(help: "Sensors per page of the farm-wide answer.")
    var pageLimit = 1000

    @Option(help: "Connections sweeping the farm-wide answer page by page.")
    var sweepers = 4

    func validate() throws {
        guard (1...600).contains(seconds) else { throw ValidationError("--seconds must be from 1 to 600") }
        guard (1...2000).contains(clients) else { throw ValidationError("--clients must be from 1 to 2000") }
        guard (1...64).contains(clientThreads), clientThreads <= clients else { throw ValidationError("--client-threads must be from 1 to 64 and at most --clients") }
        guard (1...1000).contains(sensors) else { throw ValidationError("--sensors must be from 1 to 1000") }
        guard (1...5000).contains(devices) else { throw ValidationError("--devices must be from 1 to 5000") }
        guard (1...10_000).contains(pageLimit) else { throw ValidationError("--page-limit must be from 1 to 10000") }
        guard (1...64).contains(sweepers) else { throw ValidationError("--sweepers must be from 1 to 64") }
    }

    func run() async throws {
        let logger = Logger.bench
        let directory = NSTemporaryDirectory() + "farmgate-bench-latest-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }

        let store = try await runOffPool { try SQLiteIngestStore(path: directory + "/ingest.sqlite", logger: logger) }
        defer { store.close() }
        try await store.migrate()
        let admin = IngestAdmin(store: store)
        _ = try await admin.createFarm(name: "bench")
        let now = Timestamp.now()
        print("loading \(devices) devices × \(sensors) sensors …")
        for index in 0..<devices {
            let device = try DeviceID(String(format: "dev-%03d", index))
            let key = try await admin.createDevice(farm: "bench", device: device)
            guard let identity = try await store.deviceCredential(keyID: key.keyID)?.identity else { throw ValidationError("the bench device was not created") }
            let descriptors = try (0..<sensors).map { sensor in
                SensorDescriptor(id: try SensorID("tank\(sensor / 3 + 1).\(["ph", "ec", "temp"][sensor % 3])"), quantity: [Quantity.ph, .electricalConductivity, .temperature][sensor % 3])
            }
            let readings = descriptors.enumerated().map { offset, descriptor in
                Reading(
                    sensor: descriptor.id, sequence: UInt64(offset + 1), timestamp: Timestamp(microseconds: now.microseconds - Int64(sensors - offset) * 1_000_000),
                    value: [6.02, 1412.5, 21.5625][offset % 3], quality: offset % 17 == 0 ? [.compensated] : [])
            }
            _ = try await store.store(Batch(device: device, sensors: descriptors, readings: readings), for: identity, receivedAt: now)
        }
        let token = try await admin.createReadToken(farm: "bench", role: .viewer).text

        let (configuration, port) = try LocalIngest.readerConfiguration()
        let app = buildApplication(configuration: configuration, store: store, registry: PrometheusCollectorRegistry(), logger: logger, now: { now })
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: [app], logger: logger))
        let (seconds, clients, clientThreads, pageLimit, sweepers, sensorCount, deviceCount) = (seconds, clients, clientThreads, pageLimit, sweepers, sensors, devices)
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            do {
                try await runOffPool(name: "bench-wait") { try BenchConnection.waitForListener(port: port) }
                let one = Array("GET /v1/farms/bench/latest?device=dev-000 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(token)\r\n\r\n".utf8)
                // Warm-up: fills the cache and the connection paths.
                _ = try await runOffPool(name: "bench-warmup") {
                    let connection = try BenchConnection(port: port)
                    for _ in 0..<200 { _ = connection.request(one) }
                }

                print("\nlatest of one \(sensorCount)-sensor device: \(clients) keep-alive clients on \(clientThreads) threads, closed loop, \(seconds) s")
                let duration = Duration.seconds(seconds)
                let perThread = (0..<clientThreads).map { clients / clientThreads + ($0 < clients % clientThreads ? 1 : 0) }
                let started = ContinuousClock.now
                let results = try await withThrowingTaskGroup(of: ClosedLoop.Result.self) { loops in
                    for (index, count) in perThread.enumerated() {
                        loops.addTask {
                            try await runOffPool(name: "bench-latest-\(index)") {
                                try ClosedLoop.run(port: port, connections: count, duration: duration) { _ in one }
                            }
                        }
                    }
                    var all: [ClosedLoop.Result] = []
                    for try await result in loops { all.append(result) }
                    return all
                }
                let elapsed = started.duration(to: .now).seconds
                let merged = ClosedLoop.Result.merged(results)
                print(
                    String(
                        format: "  %.0f reads/s (%d in %.1f s, %d failed), %d bytes per answer; latency p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms",
                        Double(merged.latencies.count) / elapsed, merged.latencies.count, elapsed, merged.failures, merged.bytesPerAnswer, merged.percentile(0.5),
                        merged.percentile(0.9), merged.percentile(0.99), merged.percentile(1)))
                print(String(format: "  against the FastAPI baseline's 7,100 reads/s: %.1f×", Double(merged.latencies.count) / elapsed / 7_100))

                print("\nfarm-wide latest of \(deviceCount) devices (\(deviceCount * sensorCount) sensors) in pages of \(pageLimit): \(sweepers) connections sweeping, \(seconds) s")
                let sweepStart = ContinuousClock.now
                let sweeps = try await withThrowingTaskGroup(of: ClosedLoop.Result.self) { loops in
                    for index in 0..<sweepers {
                        loops.addTask {
                            try await runOffPool(name: "bench-sweep-\(index)") {
                                try ClosedLoop.sweep(port: port, token: token, limit: pageLimit, duration: duration)
                            }
                        }
                    }
                    var all: [ClosedLoop.Result] = []
                    for try await result in loops { all.append(result) }
                    return all
                }
                let sweepElapsed = sweepStart.duration(to: .now).seconds
                let pages = ClosedLoop.Result.merged(sweeps)
                let pagesPerSweep = (deviceCount * sensorCount + pageLimit - 1) / pageLimit
                print(
                    String(
                        format: "  %.0f pages/s, %.1f whole-farm sweeps/s (%d pages each), %d bytes per page (%.0f kB/s); page latency p50 %.2f ms, p99 %.2f ms (%d failed)",
                        Double(pages.latencies.count) / sweepElapsed, Double(pages.latencies.count) / sweepElapsed / Double(pagesPerSweep), pagesPerSweep,
                        pages.bytesPerAnswer, Double(pages.bytes) / sweepElapsed / 1000, pages.percentile(0.5), pages.percentile(0.99), pages.failures))
                await group.triggerGracefulShutdown()
                while try await tasks.next() != nil {}
            } catch {
                tasks.cancelAll()
                throw error
            }
        }
    }
}

/// Closed-loop HTTP/1.1 load over keep-alive loopback connections, on the calling thread (blocking, epoll).
enum ClosedLoop {
    struct Result: Sendable {
        var latencies: [Double] = []
        var failures = 0
        var bytes = 0

        var bytesPerAnswer: Int { latencies.isEmpty ? 0 : bytes / latencies.count }

        func percentile(_ p: Double) -> Double {
            let sorted = latencies.sorted()
            guard !sorted.isEmpty else { return 0 }
            return sorted[min(sorted.count - 1, Int((Double(sorted.count - 1) * p).rounded()))]
        }

        static func merged(_ results: [Result]) -> Result {
            var all = Result()
            for result in results {
                all.latencies += result.latencies
                all.failures += result.failures
                all.bytes += result.bytes
            }
            return all
        }
    }

    /// One request outstanding on each of `connections` connections until `duration` passes.
    static func run(port: Int, connections count: Int, duration: Duration, request: (Int) -> [UInt8]) throws -> Result {
        var connections = try (0..<count).map { _ in try BenchConnection(port: port) }
        var sentAt = [ContinuousClock.Instant](repeating: .now, count: count)
        var result = Result()
        let end = ContinuousClock.now + duration
        var index = 0
        for slot in 0..<count {
            sentAt[slot] = .now
            guard connections[slot].send(request(index)) else { throw ValidationError("cannot send to 127.0.0.1:\(port)") }
            index += 1
        }
        // epoll, not poll(2): poll walks every connection's socket on each call, which cost the load generator (and so
        // the ingest sharing its cores) more than reading the answers did.
        let epoll = epoll_create1(0)
        guard epoll >= 0 else { throw ValidationError("epoll_create1 failed (errno \(errno))") }
        defer { close(epoll) }
        func watch(_ slot: Int) {
            var event = epoll_event()
            event.events = EPOLLIN.rawValue
            event.data.u64 = UInt64(slot)
            _ = epoll_ctl(epoll, EPOLL_CTL_ADD, connections[slot].fd, &event)
        }
        for slot in 0..<count { watch(slot) }
        var events = [epoll_event](repeating: epoll_event(), count: count)
        var scratch = [UInt8](repeating: 0, count: 65_536)
        while ContinuousClock.now < end {
            let ready = epoll_wait(epoll, &events, Int32(count), 100)
            if ready <= 0 { continue }
            for event in events[0..<Int(ready)] {
                let slot = Int(event.data.u64)
                switch connections[slot].receiveAvailable(scratch: &scratch) {
                case .pending:
                    continue
                case .answered(let status, let bodyBytes):
                    result.latencies.append(sentAt[slot].duration(to: .now) / .milliseconds(1))
                    result.bytes += bodyBytes
                    if status != 200 { result.failures += 1 }
                case .closed:
                    result.failures += 1
                    connections[slot] = try BenchConnection(port: port)
                    watch(slot)
                }
                guard ContinuousClock.now < end else { break }
                sentAt[slot] = .now
                if !connections[slot].send(request(index)) { result.failures += 1 }
                index += 1
            }
        }
        return result
    }

    /// Walks the farm-wide answer page by page (following `next`) again and again until `duration` passes.
    static func sweep(port: Int, token: String, limit: Int, duration: Duration) throws -> Result {
        let connection = try BenchConnection(port: port)
        var result = Result()
        let end = ContinuousClock.now + duration
        var cursor: String?
        while ContinuousClock.now < end {
            let path = "/v1/farms/bench/latest?limit=\(limit)" + (cursor.map { "&cursor=\($0)" } ?? "")
            let started = ContinuousClock.now
            guard connection.send(Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \(token)\r\n\r\n".utf8)) else {
                throw ValidationError("cannot send to 127.0.0.1:\(port)")
            }
            var answer: BenchConnection.Received = .pending
            var body: [UInt8] = []
            while case .pending = answer { answer = connection.receiveBlocking(body: &body) }
            guard case .answered(let status, let bytes) = answer, status == 200 else {
                result.failures += 1
                break
            }
            result.latencies.append(started.duration(to: .now) / .milliseconds(1))
            result.bytes += bytes
            // `"next":"…"` or `"next":null` closes the answer.
            let tail = String(decoding: body.suffix(200), as: UTF8.self)
            if let range = tail.range(of: #""next":""#), let close = tail[range.upperBound...].firstIndex(of: "\"") {
                cursor = String(tail[range.upperBound..<close])
            } else {
                cursor = nil
            }
        }
        return result
    }
}

extension BenchConnection {
    enum Received {
        case pending
        case answered(status: Int, bodyBytes: Int)
        case closed
    }

    /// Sends all of `bytes`; false when the connection failed.
    func send(_ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if sent <= 0 { return false }
            offset += sent
        }
        return true
    }

    /// Reads what is there without waiting; answers once a whole response has arrived.
    func receiveAvailable(scratch: inout [UInt8]) -> Received {
        var ignored: [UInt8] = []
        return receive(flags: Int32(MSG_DONTWAIT), scratch: &scratch, body: &ignored, keepBody: false)
    }

    /// Waits for more bytes; answers once a whole response has arrived, its body in `body`.
    func receiveBlocking(body: inout [UInt8]) -> Received {
        var scratch = [UInt8](repeating: 0, count: 65_536)
        return receive(flags: 0, scratch: &scratch, body: &body, keepBody: true)
    }

    /// One recv into `scratch` (reused across calls: the load generator must not spend its cores zeroing buffers).
    private func receive(flags: Int32, scratch: inout [UInt8], body: inout [UInt8], keepBody: Bool) -> Received {
        let count = scratch.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, flags) }
        if count == 0 { return .closed }
        if count < 0 { return errno == EAGAIN || errno == EWOULDBLOCK ? .pending : .closed }
        return takeResponse(appending: scratch[0..<count], body: &body, keepBody: keepBody)
    }
}

extension BenchConnection {
    /// Adds `chunk` to what was received and takes one whole response off the front if it is complete.
    fileprivate func takeResponse(appending chunk: ArraySlice<UInt8>, body: inout [UInt8], keepBody: Bool) -> Received {
        pending += chunk
        // Plain byte loops: Foundation's generic firstRange(of:) cost the load generator more CPU than the ingest spent.
        let parsed: (status: Int, headEnd: Int, length: Int)? = pending.withUnsafeBufferPointer { bytes in
            guard bytes.count >= 16 else { return nil }
            var headEnd = -1
            var index = 3
            while index < bytes.count {
                if bytes[index] == 10, bytes[index - 1] == 13, bytes[index - 2] == 10, bytes[index - 3] == 13 {
                    headEnd = index + 1
                    break
                }
                index += 1
            }
            guard headEnd > 12 else { return nil }
            let status = (Int(bytes[9]) - 48) * 100 + (Int(bytes[10]) - 48) * 10 + Int(bytes[11]) - 48
            // "content-length:" in any case: find ':' preceded by "ength" (the only such header the ingest sends).
            var length = 0
            var position = 7
            while position < headEnd {
                if bytes[position] == UInt8(ascii: ":"), bytes[position - 1] | 0x20 == UInt8(ascii: "h"), bytes[position - 2] | 0x20 == UInt8(ascii: "t"),
                    bytes[position - 5] | 0x20 == UInt8(ascii: "e"), bytes[position - 7] == UInt8(ascii: "-")
                {
                    var digit = position + 1
                    while digit < headEnd, bytes[digit] == UInt8(ascii: " ") { digit += 1 }
                    while digit < headEnd, (48...57).contains(bytes[digit]) {
                        length = length * 10 + Int(bytes[digit]) - 48
                        digit += 1
                    }
                    break
                }
                position += 1
            }
            return (status, headEnd, length)
        }
        guard let parsed, pending.count - parsed.headEnd >= parsed.length else { return .pending }
        if keepBody { body = Array(pending[parsed.headEnd..<(parsed.headEnd + parsed.length)]) }
        pending.removeFirst(parsed.headEnd + parsed.length)
        return .answered(status: parsed.status, bodyBytes: parsed.length)
    }

}
