import FarmgateWire
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import Logging
import NIOCore
import Prometheus
import Testing

@testable import FarmgateIngest

/// A directory under the system's temporary directory, removed by ``remove()``.
struct TemporaryDirectory {
    let path: String

    init() throws {
        path = NSTemporaryDirectory() + "farmgate-ingest-tests-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    func remove() {
        try? FileManager.default.removeItem(atPath: path)
    }
}

let testLogger: Logger = {
    var logger = Logger(label: "farmgate-ingest-tests")
    logger.logLevel = .critical
    return logger
}()

/// 2026-01-01T00:00:00Z, the clock of every test that does not say otherwise.
let testNow = Timestamp(microseconds: 1_767_225_600_000_000)

func sensorID(_ text: String) throws -> SensorID { try SensorID(text) }

func deviceID(_ text: String) throws -> DeviceID { try DeviceID(text) }

/// A batch of `device` with readings of `tank1.ph` (pH) at `sequences`, stamped `start` (default an hour before ``testNow``) plus `sequence` seconds.
func phBatch(device: String = "d1", sequences: some Sequence<UInt64>, value: Double = 6.5, start: Timestamp? = nil) throws -> Batch {
    let startTime = start ?? Timestamp(microseconds: testNow.microseconds - 3_600_000_000)
    let sensor = try sensorID("tank1.ph")
    let readings = sequences.map { sequence in
        Reading(sensor: sensor, sequence: sequence, timestamp: Timestamp(microseconds: startTime.microseconds + Int64(sequence) * 1_000_000), value: value)
    }
    return Batch(device: try deviceID(device), sensors: [SensorDescriptor(id: sensor, quantity: .ph)], readings: readings)
}

/// A store in a fresh temporary directory with two farms:
/// `f1` (device `d1`, device `d2`, a viewer token) and `f2` (device `e1`, a viewer token).
struct Fixture {
    let directory: TemporaryDirectory
    let store: SQLiteIngestStore
    let deviceKey: APIKey
    let secondDeviceKey: APIKey
    let otherFarmDeviceKey: APIKey
    let readToken: APIKey
    let otherFarmReadToken: APIKey

    init() async throws {
        directory = try TemporaryDirectory()
        store = try SQLiteIngestStore(path: directory.path + "/ingest.sqlite", logger: testLogger)
        try await store.migrate()
        let admin = IngestAdmin(store: store)
        _ = try await admin.createFarm(name: "f1")
        _ = try await admin.createFarm(name: "f2")
        deviceKey = try await admin.createDevice(farm: "f1", device: try deviceID("d1"))
        secondDeviceKey = try await admin.createDevice(farm: "f1", device: try deviceID("d2"))
        otherFarmDeviceKey = try await admin.createDevice(farm: "f2", device: try deviceID("e1"))
        readToken = try await admin.createReadToken(farm: "f1", role: .viewer)
        otherFarmReadToken = try await admin.createReadToken(farm: "f2", role: .viewer)
    }

    func identity(farm: String = "f1", device: String) async throws -> DeviceIdentity {
        guard let farmRecord = try await store.farm(named: farm),
            let found = try await store.devices(farmID: farmRecord.id).first(where: { $0.device.rawValue == device })
        else { throw IngestStoreError.notFound(device) }
        return found
    }

    func app(
        limits: IngestConfiguration.Limits = IngestConfiguration.Limits(), registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
        cacheTTL: Duration = .zero, commits: CommitFeed = CommitFeed(), retention: IngestConfiguration.Retention = IngestConfiguration.Retention()
    ) -> some ApplicationProtocol {
        var configuration = IngestConfiguration()
        configuration.server.port = 0
        configuration.limits = limits
        configuration.retention = retention
        return buildApplication(
            configuration: configuration, store: store, registry: registry, logger: testLogger, now: { testNow }, credentialCacheTTL: cacheTTL,
            commits: commits)
    }

    func close() {
        store.close()
        directory.remove()
    }
}

func bearer(_ key: APIKey) -> HTTPFields {
    [.authorization: "Bearer \(key.text)"]
}

func jsonHeaders(_ key: APIKey, encoding: String? = nil) -> HTTPFields {
    var headers = bearer(key)
    headers[.contentType] = "application/json"
    if let encoding { headers[.contentEncoding] = encoding }
    return headers
}

func binaryHeaders(_ key: APIKey) -> HTTPFields {
    var headers = bearer(key)
    headers[.contentType] = IngestProtocol.binaryBatchMediaType
    return headers
}

func buffer(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }

func decode<T: Decodable>(_ type: T.Type, _ response: TestResponse) throws -> T {
    try JSONDecoder().decode(T.self, from: Data(response.body.readableBytesView))
}

/// Posts `batch` as JSON and returns the response.
func postJSON(_ client: some TestClientProtocol, _ batch: Batch, key: APIKey) async throws -> TestResponse {
    try await client.execute(uri: IngestProtocol.batchesPath, method: .post, headers: jsonHeaders(key), body: buffer(BatchJSON.encode(batch)))
}

/// Asserts that `response` is an error with `status` and `code`, and returns its message.
@discardableResult
func expectError(_ response: TestResponse, _ status: HTTPResponse.Status, _ code: String, sourceLocation: SourceLocation = #_sourceLocation) throws
    -> String
{
    #expect(response.status == status, sourceLocation: sourceLocation)
    let body = try decode(APIErrorBody.self, response)
    #expect(body.error.code == code, sourceLocation: sourceLocation)
    #expect(!body.error.message.isEmpty, sourceLocation: sourceLocation)
    return body.error.message
}
