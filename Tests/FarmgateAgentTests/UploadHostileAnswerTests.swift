import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Synchronization
import Testing

/// Answers an ingest may give that must never crash the agent, make it resend at once forever, or lose readings: a receipt
/// whose calibration counts are absurd, a `Retry-After` that asks for no wait at all, a buffer that cannot delete.
@Suite("Uploader: hostile or broken answers and a failing buffer")
struct UploadHostileAnswerTests {
    /// A loopback ingest that reads version 3 (events) and answers the first `badAnswers` batches with `calibrations` as
    /// given, then honestly.
    static func eventIngest(calibrations: CalibrationReceipt, badAnswers: Int) throws -> TestHTTPServer {
        let posts = Atomic<Int>(0)
        return try TestHTTPServer { request, _ in
            if request.method == "GET" {
                let answer = DeviceState(device: testDevice.rawValue, highestSequence: nil, acceptedVersions: [2, 3])
                return .reply(200, headers: ["Content-Type": "application/json"], body: (try? JSONEncoder().encode(answer)).map { Array($0) } ?? [])
            }
            guard let frame = try? BatchCodec.decodeFrame(request.body) else {
                return .error(400, IngestErrorCode.malformedBatch, "cannot decode")
            }
            let index = posts.add(1, ordering: .sequentiallyConsistent).oldValue
            var receipt = IngestReceipt(accepted: frame.batch.readings.count, duplicates: 0)
            if !frame.calibrations.isEmpty {
                receipt.calibrations =
                    index < badAnswers ? calibrations : CalibrationReceipt(accepted: frame.calibrations.count, duplicates: 0)
            }
            return .receipt(receipt)
        }
    }

    // Before the fix, Int.max + 1 trapped after the readings were deleted, and again at every delivery of the same events.
    @Test(arguments: [
        CalibrationReceipt(accepted: Int.max, duplicates: 1), CalibrationReceipt(accepted: -1, duplicates: 2),
        CalibrationReceipt(accepted: 0, duplicates: 0), CalibrationReceipt(accepted: 2, duplicates: 0),
    ])
    func aReceiptWithImpossibleCalibrationCountsAcknowledgesNothingAndBacksOff(calibrations: CalibrationReceipt) async throws {
        let data = try await TestBuffer(count: 12)
        try await data.buffer.recordCalibration(UploadCalibrationTests.event(1))
        let server = try Self.eventIngest(calibrations: calibrations, badAnswers: 2)
        let configuration = uploadConfiguration(server.url, backoffInitial: .milliseconds(50), backoffMax: .milliseconds(200))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { uploader.status().consecutiveFailures >= 1 })
            let status = uploader.status()
            #expect(status.lastResult?.contains("calibration") == true, "\(status.lastResult ?? "nil")")
            #expect(status.uploadedTotal == 0)
            // Not an acknowledgement: every reading and the event are still in the buffer.
            #expect(try await data.statistics().pending == 12)
            #expect(try await data.buffer.pendingCalibrationCount() == 1)
            // The honest answer that follows settles everything.
            #expect(
                try await eventually {
                    let pending = try await data.statistics().pending
                    let events = try await data.buffer.pendingCalibrationCount()
                    return pending == 0 && events == 0
                })
            #expect(await eventually { uploader.status().consecutiveFailures == 0 && uploader.status().calibrationsUploadedTotal == 1 })
        }
        let posts = server.requests.filter { $0.method == "POST" }
        #expect(posts.count >= 3)
    }

    // Before the fix, `Retry-After: 0` (or leading zeros cut to 0, or a date in the agent's past) re-posted the batch at once.
    @Test(arguments: ["0", "000000000000000", "000000000000001", "Sun, 06 Nov 1994 08:49:37 GMT"])
    func aRetryAfterOfNothingStillWaitsAtLeastASecond(retryAfter: String) async throws {
        let data = try await TestBuffer(count: 10)
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { index, _ in
                index < 2 ? .json(503, #"{"error":{"code":"overloaded","message":"later"}}"#, headers: ["Retry-After": retryAfter]) : nil
            }))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(10), backoffMax: .milliseconds(100))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await ingest.waitForBatches(1))
            #expect(await eventually { uploader.status().lastHTTPStatus == 503 })
            #expect(uploader.status().currentBackoffSeconds >= 1)
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
        let requests = ingest.requests
        #expect(requests.count == 3)
        for (later, earlier) in zip(requests.dropFirst(), requests).prefix(2) {
            #expect((later.receivedAt - earlier.receivedAt).seconds >= 1, "waited at least a second after Retry-After: \(retryAfter)")
        }
    }

    // A box without RTC may be years off: an HTTP-date is measured against the answer's own Date header.
    @Test func aRetryAfterDateIsMeasuredAgainstTheAnswersDateHeader() async throws {
        let data = try await TestBuffer(count: 10)
        let headers = ["Retry-After": "Sun, 06 Nov 1994 08:49:39 GMT", "Date": "Sun, 06 Nov 1994 08:49:37 GMT"]
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { index, _ in
                index == 0 ? .json(429, #"{"error":{"code":"rate_limited","message":"slow down"}}"#, headers: headers) : nil
            }))
        var configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(10), backoffMax: .milliseconds(100))
        configuration.retryAfterMax = .milliseconds(1500)
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { uploader.status().lastHTTPStatus == 429 })
            // Two seconds after the ingest's Date, capped at retry_after_max: not the one-second floor of a date "in the past".
            #expect(abs(uploader.status().currentBackoffSeconds - 1.5) < 0.01)
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
        let requests = ingest.requests
        #expect(requests.count == 2)
        #expect((requests[1].receivedAt - requests[0].receivedAt).seconds >= 1.5)
    }

    // Before the fix, a buffer that could not delete made the uploader post the same batch every second, with no failure shown.
    @Test func aBufferThatCannotDeleteIsAFailureWithBackoffAndIsShown() async throws {
        let data = try await TestBuffer(count: 20)
        let path = data.directory.appendingPathComponent("buffer.sqlite").path
        // A real SQLite error on every delete, as a read-only remount or an I/O error would give.
        let sabotage = try SQLiteConnection(path: path, mode: .readWrite, busyTimeoutMilliseconds: 5_000)
        try sabotage.execute(
            "CREATE TRIGGER refuse_delete BEFORE DELETE ON readings BEGIN SELECT RAISE(ABORT, 'simulated I/O error'); END")
        let ingest = try FakeIngest()
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .seconds(1), backoffMax: .seconds(4))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually(timeout: .seconds(20)) { uploader.status().consecutiveFailures >= 2 })
            let status = uploader.status()
            #expect(status.lastResult?.contains("buffer") == true, "\(status.lastResult ?? "nil")")
            #expect(status.currentBackoffSeconds >= 1)
            #expect(status.nextAttemptAt != nil)
            let statistics = try await data.statistics()
            #expect(statistics.pending == 20)
            #expect((statistics.errors?.acknowledge ?? 0) >= 2)
            #expect(statistics.errors?.last?.operation == "acknowledge")
            #expect(statistics.errors?.last?.message.contains("simulated I/O error") == true)
            // The same batch went once per failure, not once a second.
            #expect(ingest.requests.count <= status.consecutiveFailures + 1)
            try sabotage.execute("DROP TRIGGER refuse_delete")
            #expect(try await eventually(timeout: .seconds(20)) { try await data.statistics().pending == 0 })
            #expect(await eventually { uploader.status().consecutiveFailures == 0 })
        }
    }
}
