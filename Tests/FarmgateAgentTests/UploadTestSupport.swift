import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

// MARK: - A stand-in for farmgate-ingest

/// Decodes every batch like the ingest, remembers what it stored (content included), and answers with a real
/// ``IngestReceipt``, unless a rule or the script says otherwise. Like the real ingest it is idempotent on the sequence and
/// compares content: a re-sent sequence with equal content is a duplicate, with different content a `sequence_conflict`.
/// `GET /v1/device` answers the highest stored sequence (``DeviceState``).
final class FakeIngest: Sendable {
    struct Rules: Sendable {
        /// Readings with this value are rejected one by one in the receipt (`out_of_range`).
        var rejectValue: Double?
        /// A batch holding a reading with this value is refused whole with 422.
        var poisonValue: Double?
        /// What the ingest holds before the test starts (another life of this device).
        var preloaded: [Reading] = []
        /// Overrides the answer to batch request `n` (counting batch POSTs only, from 0; the batch is still decoded and
        /// logged). Its second argument is the decoded batch and its content type.
        var script: @Sendable (Int, ScriptedBatch) -> TestResponse? = { _, _ in nil }
        /// Overrides the answer to device-state request `n` (counting `GET /v1/device` only, from 0).
        var deviceState: @Sendable (Int) -> TestResponse? = { _ in nil }
    }

    /// What a scripted answer may look at.
    struct ScriptedBatch: Sendable {
        var readings: [Reading]
        var contentType: String
    }

    struct Log: Sendable {
        /// How many times each sequence was stored or found a duplicate.
        var stored: [UInt64: Int] = [:]
        /// What is stored under each sequence.
        var contents: [UInt64: Reading] = [:]
        /// The sequences of every batch, decoded, in arrival order (refused ones included).
        var batches: [[UInt64]] = []
        var authorizations: Set<String> = []
        var contentTypes: [String] = []
        var duplicates = 0
        var conflicts = 0
    }

    private final class State: Sendable {
        let log = Mutex(Log())
        let batchCount = Atomic<Int>(0)
        let deviceCount = Atomic<Int>(0)
    }

    static let key = "fgd_testkey2_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

    let server: TestHTTPServer
    private let state: State

    init(_ rules: Rules = Rules()) throws {
        let state = State()
        state.log.withLock { log in
            for reading in rules.preloaded {
                log.contents[reading.sequence] = reading
            }
        }
        self.state = state
        server = try TestHTTPServer { request, _ in
            if request.method == "GET" {
                guard request.path == IngestProtocol.deviceStatePath else { return .json(404, #"{"error":{"code":"not_found","message":"no route"}}"#) }
                let index = state.deviceCount.add(1, ordering: .sequentiallyConsistent).oldValue
                if let scripted = rules.deviceState(index) { return scripted }
                guard request.headers["authorization"] == "Bearer \(FakeIngest.key)" else {
                    return .json(401, #"{"error":{"code":"unauthorized","message":"unknown device key"}}"#)
                }
                let highest = state.log.withLock { $0.contents.keys.max() }
                let body = (try? JSONEncoder().encode(DeviceState(device: testDevice.rawValue, highestSequence: highest))).map { Array($0) } ?? []
                return .reply(200, headers: ["Content-Type": "application/json"], body: body)
            }
            let contentType = request.headers["content-type"] ?? ""
            let readings: [Reading]
            do {
                if contentType == IngestProtocol.jsonBatchMediaType {
                    readings = try BatchJSON.decode(request.body).batch.readings
                } else {
                    readings = try BatchCodec.decode(request.body).readings
                }
            } catch {
                return .json(400, #"{"error":{"code":"malformed_batch","message":"\#(error)"}}"#)
            }
            let index = state.batchCount.add(1, ordering: .sequentiallyConsistent).oldValue
            state.log.withLock {
                $0.batches.append(readings.map(\.sequence).sorted())
                $0.authorizations.insert(request.headers["authorization"] ?? "")
                $0.contentTypes.append(contentType)
            }
            if let scripted = rules.script(index, ScriptedBatch(readings: readings, contentType: contentType)) { return scripted }
            guard request.headers["authorization"] == "Bearer \(FakeIngest.key)" else {
                return .json(401, #"{"error":{"code":"unauthorized","message":"unknown device key"}}"#)
            }
            if let poison = rules.poisonValue, let bad = readings.first(where: { abs($0.value - poison) < 1e-6 }) {
                return .json(422, #"{"error":{"code":"invalid_batch","message":"reading \#(bad.sequence) cannot be stored"}}"#)
            }
            return .receipt(state.log.withLock { log in FakeIngest.store(readings, in: &log, rules: rules) })
        }
    }

    /// Stores `readings` as the ingest does and returns its receipt.
    private static func store(_ readings: [Reading], in log: inout Log, rules: Rules) -> IngestReceipt {
        var accepted = 0
        var duplicates = 0
        var rejections: [RejectedReading] = []
        for reading in readings {
            if let reject = rules.rejectValue, abs(reading.value - reject) < 1e-6 {
                rejections.append(
                    RejectedReading(
                        sequence: reading.sequence, sensor: reading.sensor.rawValue, code: "out_of_range",
                        message: "value \(reading.value) is out of range"))
            } else if let held = log.contents[reading.sequence] {
                if held.sensor == reading.sensor, held.timestamp == reading.timestamp, abs(held.value - reading.value) < 1e-9,
                    held.quality == reading.quality
                {
                    duplicates += 1
                    log.stored[reading.sequence, default: 0] += 1
                } else {
                    rejections.append(
                        RejectedReading(
                            sequence: reading.sequence, sensor: reading.sensor.rawValue, code: RejectionCode.sequenceConflict,
                            message: "sequence \(reading.sequence) holds another reading"))
                    log.conflicts += 1
                }
            } else {
                accepted += 1
                log.stored[reading.sequence] = 1
                log.contents[reading.sequence] = reading
            }
        }
        log.duplicates += duplicates
        return IngestReceipt(accepted: accepted, duplicates: duplicates, rejections: rejections)
    }

    var url: String { server.url }
    var log: Log { state.log.withLock { $0 } }
    /// The batch requests (`POST /v1/batches`), in arrival order.
    var requests: [RecordedRequest] { server.requests.filter { $0.method == "POST" } }
    /// The device-state requests (`GET /v1/device`), in arrival order.
    var deviceRequests: [RecordedRequest] { server.requests.filter { $0.method == "GET" } }

    /// Waits until at least `count` batches arrived, or `timeout` passed. Returns whether they did.
    func waitForBatches(_ count: Int, timeout: Duration = .seconds(10)) async -> Bool {
        await eventually(timeout: timeout) { requests.count >= count }
    }
}

extension TestResponse {
    /// A 200 with `receipt` as its JSON body.
    static func receipt(_ receipt: IngestReceipt) -> TestResponse {
        let body = (try? JSONEncoder().encode(receipt)).map { Array($0) } ?? []
        return .reply(200, headers: ["Content-Type": "application/json"], body: body)
    }

    /// An ``APIErrorBody`` answer.
    static func error(_ status: Int, _ code: String, _ message: String, acceptedVersions: [Int]? = nil, headers: [String: String] = [:]) -> TestResponse {
        let body = APIErrorBody(code: code, message: message, acceptedVersions: acceptedVersions)
        let text = (try? JSONEncoder().encode(body)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return .json(status, text, headers: headers)
    }
}

// MARK: - Helpers

/// A real ``ReadingBuffer`` in a temporary directory, filled with committed readings of three sensors.
final class TestBuffer: Sendable {
    let buffer: ReadingBuffer
    let directory: URL
    /// The sequence numbers committed, ascending.
    let sequences: [UInt64]

    static let sensors: [SensorDescriptor] = [
        SensorDescriptor(id: constantSensorID("tank1.ph"), quantity: .ph),
        SensorDescriptor(id: constantSensorID("tank1.ec"), quantity: .electricalConductivity),
        SensorDescriptor(id: constantSensorID("tank1.temp"), quantity: .temperature),
    ]

    /// `count` readings spread over the three sensors, 10 ms apart, ending now. `value(i)` overrides the value of reading `i`.
    init(count: Int, value: @Sendable (Int) -> Double? = { _ in nil }) async throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("farmgate-upload-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        buffer = try ReadingBuffer(
            configuration: BufferConfiguration(path: directory.appendingPathComponent("buffer.sqlite").path),
            logger: Logger(label: "test.buffer"))
        try await buffer.register(Self.sensors)
        try await Self.append(count: count, to: buffer, value: value)
        sequences = try await buffer.pending(limit: count + 10, from: .oldest).map(\.sequence)
    }

    static func append(count: Int, to buffer: ReadingBuffer, value: @Sendable (Int) -> Double? = { _ in nil }) async throws {
        let now = Timestamp.now().microseconds
        var samples: [Sample] = []
        for i in 0..<count {
            let sensor = sensors[i % 3]
            let timestamp = Timestamp(microseconds: now - Int64(count - i) * 10_000)
            let normal: Double =
                switch sensor.quantity {
                case .ph: 6.0 + Double(i % 50) / 100
                case .electricalConductivity: 1200 + Double(i % 100) / 10
                default: 21 + Double(i % 32) / 16
                }
            samples.append(Sample(sensor: sensor.id, timestamp: timestamp, value: value(i) ?? normal))
        }
        try await buffer.append(samples)
        try await buffer.flush()
    }

    deinit {
        try? FileManager.default.removeItem(at: directory)
    }

    func statistics() async throws -> BufferStatistics { try await buffer.statistics() }
}

func uploadConfiguration(
    _ url: String, format: UploadConfiguration.Format = .binary, batchMaxReadings: Int = 100, backlogBatchMaxReadings: Int? = nil,
    batchMaxBytes: Int = 256 << 10,
    requestTimeout: Duration = .seconds(5), backoffInitial: Duration = .milliseconds(30), backoffMax: Duration = .seconds(1),
    key: String = FakeIngest.key
) -> UploadConfiguration {
    UploadConfiguration(
        endpoint: url + "/", deviceKey: key, format: format, batchMaxReadings: batchMaxReadings,
        // Unless a test asks for larger backlog batches, every batch has one size (what most tests count on).
        backlogBatchMaxReadings: backlogBatchMaxReadings ?? batchMaxReadings, batchMaxBytes: batchMaxBytes,
        batchMaxAge: .milliseconds(200), connectTimeout: .seconds(2), requestTimeout: requestTimeout,
        stallTimeout: requestTimeout, backoffInitial: backoffInitial, backoffMax: backoffMax, pollInterval: .milliseconds(20),
        useProxyEnvironment: false)
}

let testDevice: DeviceID = {
    // A constant of the test, not input: it is valid.
    guard let device = try? DeviceID("greenhouse-2") else { preconditionFailure("constant device id is valid") }
    return device
}()

func constantSensorID(_ text: String) -> SensorID {
    // Constants of the test, not input: they are valid.
    guard let id = try? SensorID(text) else { preconditionFailure("constant sensor id \(text) is valid") }
    return id
}

/// Runs an uploader in a task for the duration of `body`, then cancels it.
func withUploader(
    source: any PendingReadings, configuration: UploadConfiguration,
    _ body: (Uploader) async throws -> Void
) async throws {
    let uploader = try Uploader(device: testDevice, source: source, configuration: configuration, logger: Logger(label: "test.upload"))
    let task = Task { try await uploader.run() }
    do {
        try await body(uploader)
    } catch {
        task.cancel()
        _ = await task.result
        throw error
    }
    task.cancel()
    _ = await task.result
}

extension Duration {
    var seconds: Double { self / .seconds(1) }
}

/// A gate the test opens; the fake ingest fails until then.
final class Gate: Sendable {
    private let open = Atomic<Bool>(false)
    func release() { open.store(true, ordering: .sequentiallyConsistent) }
    var isOpen: Bool { open.load(ordering: .sequentiallyConsistent) }
}

