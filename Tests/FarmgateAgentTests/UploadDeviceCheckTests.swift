import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
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
