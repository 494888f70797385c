import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// The uploader asks `GET /v1/device` again every `device_check_interval` and after a 415, so that what the ingest reads
/// (format version 3 for calibration events, the binary form after a fallback) is learnt without restarting the agent.
@Suite("Uploader: asks the ingest again what it reads, so that an upgrade needs no agent restart")
struct UploadDeviceCheckTests {
    static func configuration(_ url: String, format: UploadConfiguration.Format = .binary, interval: Duration) -> UploadConfiguration {
        var configuration = uploadConfiguration(url, format: format)
        configuration.deviceCheckInterval = interval
        return configuration
    }

    /// `GET /v1/device` lists version 4 (answered by an upgraded instance), the batches reach one that reads the key
    /// only in `Authorization` (an older instance behind the same address): its 401 to a key sent in `Farmgate-Key`
    /// sends the key as `Authorization` and the readings are delivered, not held with "re-enroll this device".
    @Test func a401ToTheKeyHeaderSendsTheKeyAsAuthorization() async throws {
        let data = try await TestBuffer(count: 30)
        let state = DeviceState(device: testDevice.rawValue, highestSequence: nil, acceptedVersions: [2, 3, 4])
        let body = try Array(JSONEncoder().encode(state))
        let ingest = try FakeIngest(FakeIngest.Rules(deviceState: { _ in .reply(200, headers: ["Content-Type": "application/json"], body: body) }))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, format: .json)) { uploader throws in
            #expect(try await eventually(timeout: .seconds(20)) { try await data.statistics().pending == 0 }, "\(uploader.status())")
            #expect(uploader.status().held == nil)
        }
        #expect(ingest.log.authorizations == ["", "Bearer \(FakeIngest.key)"], "the first batch carried the key in Farmgate-Key only")
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences))
    }

    /// An ingest that cannot be reached has not said what it reads: the status must not say it refuses version 4.
    @Test func anUnreachableIngestIsNotSaidToRefuseVersion4() async throws {
        let data = try await TestBuffer(count: 10)
        let port = try freePort()  // nobody listens
        try await withUploader(source: data.buffer, configuration: uploadConfiguration("http://127.0.0.1:\(port)")) { uploader throws in
            #expect(await eventually(timeout: .seconds(30)) { uploader.status().consecutiveFailures >= 2 })
            let frames = uploader.status().frames
            #expect(frames?.contains("until the ingest answers") == true, "\(String(describing: frames))")
            #expect(frames?.contains("does not read") != true, "\(String(describing: frames))")
        }
    }

    /// A reload builds a new uploader carrying the old one's status: the failures in a row since the last success go on
    /// counting (the metric and `status` say "since the last success"), unless the endpoint changed.
    @Test func failuresInARowCarryOnAcrossAReload() async throws {
        let data = try await TestBuffer(count: 10)
        let port = try freePort()  // nobody listens
        let configuration = uploadConfiguration("http://127.0.0.1:\(port)")
        let first = try Uploader(device: testDevice, source: data.buffer, configuration: configuration, logger: Logger(label: "test.upload"))
        let task = Task { try await first.run() }
        #expect(await eventually(timeout: .seconds(30)) { first.status().consecutiveFailures >= 3 })
        task.cancel()
        _ = await task.result
        let before = first.status().consecutiveFailures
        let second = try Uploader(
            device: testDevice, source: data.buffer, configuration: configuration, logger: Logger(label: "test.upload"), carrying: first.status())
        #expect(second.status().consecutiveFailures == before)
        let secondTask = Task { try await second.run() }
        #expect(await eventually(timeout: .seconds(30)) { second.status().consecutiveFailures > before })
        secondTask.cancel()
        _ = await secondTask.result
        // Another endpoint starts afresh.
        let elsewhere = try Uploader(
            device: testDevice, source: data.buffer, configuration: uploadConfiguration("http://127.0.0.1:\(try freePort())/other"),
            logger: Logger(label: "test.upload"), carrying: second.status())
        #expect(elsewhere.status().consecutiveFailures == 0)
    }

    /// A 503 (or 429) with `Retry-After` to the device question is obeyed as for batches: one question, then none until
    /// the time asked (before, the question went again after the uploader's own backoff, every second or so).
    @Test func theDeviceQuestionObeysRetryAfter() async throws {
        let data = try await TestBuffer(count: 10)
        let ingest = try FakeIngest(
            FakeIngest.Rules(deviceState: { _ in .error(503, "unavailable", "the database is down", headers: ["Retry-After": "4"]) }))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(100), backoffMax: .milliseconds(500))
        try await withUploader(source: data.buffer, configuration: configuration) { _ throws in
            #expect(await eventually { ingest.deviceRequests.count >= 1 })
            try await Task.sleep(for: .seconds(3))
            #expect(ingest.deviceRequests.count == 1, "asked again before the 4 s the ingest asked for")
            #expect(await eventually(timeout: .seconds(10)) { ingest.deviceRequests.count >= 2 })
        }
    }

    @Test func eventsHeldBackForAnOlderIngestFlowOnceItSaysItReadsVersion3() async throws {
        let data = try await TestBuffer(count: 10)
        try await data.buffer.recordCalibration(UploadCalibrationTests.event(1))
        let ingest = try EventIngest(EventIngest.Rules(acceptedVersions: [2]))
        try await withUploader(source: data.buffer, configuration: Self.configuration(ingest.url, interval: .milliseconds(400))) { uploader throws in
            // Batches flow as version 2, the event waits, and the ingest is asked again meanwhile.
            #expect(try await UploadCalibrationTests.feed(data) { ingest.log.frames.count >= 3 && ingest.log.deviceQuestions >= 2 })
            #expect(ingest.log.frames.allSatisfy { $0.version == 2 && $0.events.isEmpty })
            #expect(try await data.buffer.pendingCalibrationCount() == 1)
            #expect(uploader.status().ingestAcceptedVersions == [2])

            ingest.setAcceptedVersions([2, 3])  // the ingest was upgraded
            #expect(try await UploadCalibrationTests.feed(data) { try await data.buffer.pendingCalibrationCount() == 0 })
            #expect(uploader.status().ingestAcceptedVersions == [2, 3])
        }
        let log = ingest.log
        #expect(log.storedEvents == ["cal-test-1": 1])
        #expect(log.frames.filter { !$0.events.isEmpty }.map(\.version) == [3])
    }

    @Test func withTheDefaultIntervalTheIngestIsAskedOnlyAtStart() async throws {
        let data = try await TestBuffer(count: 10)
        let ingest = try EventIngest(EventIngest.Rules(acceptedVersions: [2]))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { _ throws in
            #expect(try await UploadCalibrationTests.feed(data) { ingest.log.frames.count >= 4 })
        }
        #expect(ingest.log.deviceQuestions == 1, "one question per 10 minutes, not one per batch")
    }

    @Test func afterAFallbackToJSONEventsGoInTheJSONForm() async throws {
        let data = try await TestBuffer(count: 10)
        try await data.buffer.recordCalibration(UploadCalibrationTests.event(1))
        // An ingest that reads JSON only: it refuses the version 3 frame and then the version 2 one with 415.
        let ingest = try EventIngest(EventIngest.Rules(refuseBinary: true))
        try await withUploader(source: data.buffer, configuration: Self.configuration(ingest.url, interval: .seconds(600))) { uploader throws in
            #expect(try await UploadCalibrationTests.feed(data) { try await data.buffer.pendingCalibrationCount() == 0 })
            #expect(try await eventually { try await data.statistics().pending == 0 })
            let status = uploader.status()
            #expect(status.format == UploadConfiguration.Format.json.rawValue)
            #expect(status.formatFallback != nil)
            #expect(status.held == nil)
        }
        let log = ingest.log
        #expect(log.storedEvents == ["cal-test-1": 1])
        #expect(log.frames.filter { !$0.events.isEmpty }.map(\.version).last == 0, "delivered in JSON: \(log.frames.map(\.version))")
        // Asked at start, then again after the 415s (not once per batch).
        #expect(log.deviceQuestions >= 2 && log.deviceQuestions <= 4, "\(log.deviceQuestions)")
    }

    @Test func aFallbackToJSONReturnsToBinaryOnceTheIngestReadsItAgain() async throws {
        let data = try await TestBuffer(count: 10)
        let ingest = try EventIngest(EventIngest.Rules(refuseBinary: true))
        try await withUploader(source: data.buffer, configuration: Self.configuration(ingest.url, interval: .milliseconds(500))) { uploader throws in
            #expect(await eventually { uploader.status().formatFallback != nil })
            #expect(try await eventually { try await data.statistics().pending == 0 })
            ingest.setRefuseBinary(false)
            #expect(
                try await UploadCalibrationTests.feed(data) {
                    uploader.status().format == UploadConfiguration.Format.binary.rawValue && ingest.log.frames.last?.version == 2
                })
            #expect(uploader.status().formatFallback == nil)
            #expect(uploader.status().held == nil)
        }
        let versions = ingest.log.frames.map(\.version)
        // JSON while binary was refused (refused frames are not logged), binary again after.
        #expect(versions.first == 0 && versions.last == 2, "\(versions)")
        #expect(try await data.statistics().quarantined == 0)
    }
}
