import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import ServiceLifecycle
import Testing

// MARK: - Tests

@Suite("Uploader against a loopback ingest, with the real SQLite buffer")
struct UploadUploaderTests {
    @Test func serverErrorsThenSuccessDeliverEverythingAndDeleteOnlyAfterTheAck() async throws {
        let data = try await TestBuffer(count: 250)
        let gate = Gate()
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { index, _ in
                if gate.isOpen { return nil }
                return [TestResponse.reply(500), .reply(502), .close, .json(503, "{}")][index % 4]
            }))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(await eventually { uploader.status().consecutiveFailures >= 3 })
            // Failures only: nothing was deleted, nothing quarantined.
            let during = try await data.statistics()
            #expect(during.pending == 250)
            #expect(during.quarantined == 0)
            #expect(uploader.status().lastSuccessAt == nil)
            gate.release()
            // The buffer is acknowledged first, then the status counts the batch.
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 250 })
            let status = uploader.status()
            #expect(status.consecutiveFailures == 0)
            #expect(status.lastHTTPStatus == 200)
            #expect(status.lastResult?.hasPrefix("200: ") == true)
            #expect(status.lastSuccessAt != nil)
            #expect(status.nextAttemptAt == nil)
        }
        let log = ingest.log
        #expect(Set(log.stored.keys) == Set(data.sequences))
        #expect(log.authorizations == ["Bearer \(FakeIngest.key)"])
        #expect(Set(log.contentTypes) == [IngestProtocol.binaryBatchMediaType])
        #expect(ingest.requests.allSatisfy { $0.path == IngestProtocol.batchesPath && $0.method == "POST" })
        #expect(log.batches.allSatisfy { $0.count <= 100 })
    }

    @Test func aPartialBatchWaitsForBatchMaxAgeAndAFullOneGoesAtOnce() async throws {
        let data = try await TestBuffer(count: 0)
        let ingest = try FakeIngest()
        var configuration = uploadConfiguration(ingest.url, batchMaxReadings: 90)
        configuration.batchMaxAge = .seconds(3)
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            // 6 fresh readings, the oldest 60 ms old: a partial batch, held until it is 3 s old.
            let partialAt = ContinuousClock.now
            try await TestBuffer.append(count: 6, to: data.buffer)
            #expect(await eventually(timeout: .seconds(10)) { ingest.log.batches.count == 1 })
            let waited = ContinuousClock.now - partialAt
            #expect(waited >= .milliseconds(2_900), "sent after \(waited), before batch_max_age")
            #expect(ingest.log.batches.first?.count == 6)
            // 90 readings at once fill a batch: sent without waiting for its age.
            let fullAt = ContinuousClock.now
            try await TestBuffer.append(count: 90, to: data.buffer)
            #expect(await eventually(timeout: .seconds(10)) { ingest.log.batches.count == 2 })
            let fullWaited = ContinuousClock.now - fullAt
            #expect(fullWaited < .seconds(2), "a full batch waited \(fullWaited)")
            #expect(ingest.log.batches.last?.count == 90)
            // The ingest logs the batch before the uploader has its answer and acknowledges: wait for the acknowledgement.
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
    }

    // Retry-After beyond backoffMax (1.2 s here) is still obeyed; only retryAfterMax (1.5 s here) caps it.
    @Test(arguments: [(429, "1", 1.0), (503, "1", 1.0), (429, "2", 1.5), (503, "3600", 1.5)])
    func retryAfterIsObeyedAndCapped(status: Int, retryAfter: String, expectedSeconds: Double) async throws {
        let data = try await TestBuffer(count: 10)
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { index, _ in
                index == 0 ? .json(status, #"{"error":{"code":"rate_limited","message":"slow down"}}"#, headers: ["Retry-After": retryAfter]) : nil
            }))
        var configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(10), backoffMax: .milliseconds(1200))
        configuration.retryAfterMax = .milliseconds(1500)
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await ingest.waitForBatches(1))
            #expect(await eventually { uploader.status().lastHTTPStatus == status })
            #expect(uploader.status().lastResult == "\(status): rate_limited: slow down")
            #expect(abs(uploader.status().currentBackoffSeconds - expectedSeconds) < 0.01)
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
        let requests = ingest.requests
        #expect(requests.count == 2)
        let gap = (requests[1].receivedAt - requests[0].receivedAt).seconds
        #expect(gap >= expectedSeconds)
        #expect(gap < expectedSeconds + 1.5)
    }

    @Test func backoffGrowsIsJitteredAndCapped() async throws {
        let data = try await TestBuffer(count: 5)
        let ingest = try FakeIngest(FakeIngest.Rules(script: { _, _ in .reply(500) }))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(20), backoffMax: .milliseconds(250))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            var backoffs: [Double] = []
            var lastSeen = 0
            // Read each backoff the uploader chose, by watching the failure count advance.
            #expect(
                await eventually(timeout: .seconds(15)) {
                    let status = uploader.status()
                    if status.consecutiveFailures > lastSeen {
                        lastSeen = status.consecutiveFailures
                        backoffs.append(status.currentBackoffSeconds)
                    }
                    return backoffs.count >= 12
                })
            #expect(backoffs.allSatisfy { $0 >= 0 && $0 <= 0.25 })
            #expect(Set(backoffs).count > 6, "full jitter: the waits differ")
            #expect(uploader.status().lastResult?.hasPrefix("500") == true)
            #expect(uploader.status().lastHTTPStatus == 500)
        }
        let requests = ingest.requests
        let gaps = zip(requests.dropFirst(), requests).map { ($0.receivedAt - $1.receivedAt).seconds }
        // Uncapped, the twelfth wait alone would be 20 ms × 2^11 = 41 s: 1.5 s of slack for a loaded machine still shows the cap.
        #expect(gaps.allSatisfy { $0 < 0.25 + 1.5 }, "capped at backoffMax (plus scheduling slack): \(gaps)")
        #expect(try await data.statistics().pending == 5)
    }

    @Test func aPoisonBatchIsSplitUntilTheBadReadingIsQuarantined() async throws {
        let badIndex = 18  // a pH reading: 13.37 is exact at 0.01
        let data = try await TestBuffer(count: 40, value: { $0 == badIndex ? 13.37 : nil })
        let ingest = try FakeIngest(FakeIngest.Rules(poisonValue: 13.37))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, batchMaxReadings: 40)) { uploader throws in
            #expect(
                try await eventually {
                    try await data.statistics().pending == 0 && uploader.status().quarantinedTotal == 1
                        && uploader.status().uploadedTotal == 39
                })
        }
        let badSequence = data.sequences[badIndex]
        let quarantined = try await data.buffer.quarantined(limit: 10)
        #expect(quarantined.map(\.sequence) == [badSequence])
        #expect(quarantined.first?.reason == "invalid_batch: reading \(badSequence) cannot be stored")
        #expect(try await data.statistics().quarantined == 1)
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences).subtracting([badSequence]))
        // Halving isolates one reading of 40 in about 2·log2(40) requests, not 40.
        #expect(ingest.requests.count <= 14)
    }

    @Test func readingsRejectedInAReceiptAreQuarantinedAndTheRestAcknowledged() async throws {
        let data = try await TestBuffer(count: 30, value: { $0 == 4 || $0 == 22 ? 1999.9 : nil })
        let ingest = try FakeIngest(FakeIngest.Rules(rejectValue: 1999.9))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 28 })
            let status = uploader.status()
            #expect(status.rejectedTotal == 2)
            #expect(status.quarantinedTotal == 2)
            #expect(status.lastResult == "200: 28 accepted, 0 duplicates, 2 rejected")
        }
        let quarantined = try await data.buffer.quarantined(limit: 10)
        #expect(Set(quarantined.map(\.sequence)) == [data.sequences[4], data.sequences[22]])
        #expect(quarantined.allSatisfy { $0.reason == "out_of_range: value 1999.9 is out of range" })
        #expect(ingest.requests.count == 1)
    }

    @Test func aHangingIngestIsAbandonedAfterTheTimeoutAndRetried() async throws {
        let data = try await TestBuffer(count: 20)
        // Two requests hang; the status of the first timeout is visible while the second one waits.
        let ingest = try FakeIngest(FakeIngest.Rules(script: { index, _ in index < 2 ? .hang : nil }))
        let configuration = uploadConfiguration(ingest.url, requestTimeout: .milliseconds(700), backoffInitial: .milliseconds(10))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { uploader.status().lastResult?.hasPrefix("timed out: ") == true })
            #expect(try await data.statistics().pending == 20)
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().lastHTTPStatus == 200 })
        }
        let requests = ingest.requests
        // Required: the timing checks below index the three requests (a failed count must not crash the test process).
        try #require(requests.count == 3)
        #expect(Set(requests.map(\.connection)).count == 3, "an abandoned connection is not reused")
        #expect((requests[1].receivedAt - requests[0].receivedAt).seconds >= 0.65)
        #expect((requests[2].receivedAt - requests[1].receivedAt).seconds >= 0.65)
    }

    @Test func afterAnOutageTheNewestReadingsGoFirstWhileTheBacklogDrains() async throws {
        let data = try await TestBuffer(count: 1000)
        // Readings taken after the outage began, committed last.
        try await TestBuffer.append(count: 9, to: data.buffer)
        let all = try await data.buffer.pending(limit: 2000, from: .oldest).map(\.sequence)
        let freshest = try #require(all.last)
        let oldest = try #require(all.first)
        let ingest = try FakeIngest()
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, batchMaxReadings: 100)) { uploader throws in
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 1009 })
            #expect(uploader.status().duplicatesTotal == 0)
        }
        let batches = ingest.log.batches
        // Required: the checks below index the batches (a failed count crashed the whole test process once).
        try #require(batches.count == 11)
        #expect(batches[0].contains(freshest), "the newest readings go in the first request")
        #expect(batches[1].contains(oldest), "then the oldest")
        #expect(batches[2].max() ?? 0 > batches[3].max() ?? 0, "and they keep alternating")
        #expect(Set(ingest.log.stored.keys) == Set(all))
        #expect(ingest.server.connectionCount == 1, "every batch on one kept-alive connection")
    }

    @Test func backlogBatchesFromTheOldestEndCarryTheBacklogSize() async throws {
        let data = try await TestBuffer(count: 1050)
        let all = try await data.buffer.pending(limit: 2000, from: .oldest).map(\.sequence)
        let ingest = try FakeIngest()
        let configuration = uploadConfiguration(ingest.url, batchMaxReadings: 100, backlogBatchMaxReadings: 400)
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 1050 })
        }
        let batches = ingest.log.batches
        // Live (newest) batches keep batch_max_readings, backlog (oldest) ones carry up to 400; the last 50, one batch or
        // less, go as an ordinary batch once batch_max_age has passed.
        try #require(batches.map(\.count) == [100, 400, 100, 400, 50])
        #expect(batches[0].max() == all.last, "the newest readings go first")
        #expect(batches[1] == Array(all.prefix(400)), "then the 400 oldest, in order")
        #expect(Set(ingest.log.stored.keys) == Set(all))
        #expect(ingest.log.duplicates == 0)
    }

    @Test func batchesOverTheByteLimitAreHalvedAndJSONWorks() async throws {
        let data = try await TestBuffer(count: 60)
        let ingest = try FakeIngest()
        let configuration = uploadConfiguration(ingest.url, format: .json, batchMaxReadings: 60, batchMaxBytes: 1500)
        try await withUploader(source: data.buffer, configuration: configuration) { _ throws in
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
        #expect(ingest.requests.allSatisfy { $0.body.count <= 1500 })
        #expect(ingest.requests.count >= 4, "60 readings of JSON do not fit in 1500 bytes")
        #expect(Set(ingest.log.contentTypes) == [IngestProtocol.jsonBatchMediaType])
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences))
    }

    @Test func aReadingThatCannotBeEncodedIsQuarantined() async throws {
        let data = try await TestBuffer(count: 9)
        let source = ForgetfulSource(data.buffer, forgetting: TestBuffer.sensors[2].id)
        let ingest = try FakeIngest()
        try await withUploader(source: source, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().quarantinedTotal == 3 })
        }
        let quarantined = try await data.buffer.quarantined(limit: 10)
        #expect(quarantined.count == 3)
        #expect(quarantined.allSatisfy { $0.sensor == "tank1.temp" && $0.reason.hasPrefix("encoding_failed: ") })
        #expect(ingest.log.stored.count == 6)
    }

    @Test func gracefulShutdownFinishesTheRequestInFlightThenReturns() async throws {
        let data = try await TestBuffer(count: 150)
        // The first answer, a server error, comes 600 ms late; shutdown is triggered while it is in flight.
        let ingest = try FakeIngest(FakeIngest.Rules(script: { index, _ in index == 0 ? .delayed(.milliseconds(600), .reply(599)) : nil }))
        let uploader = try Uploader(
            device: testDevice, source: data.buffer, configuration: uploadConfiguration(ingest.url), logger: Logger(label: "test.upload"))
        let group = ServiceGroup(services: [uploader], logger: Logger(label: "test.group"))
        let started = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            #expect(await ingest.waitForBatches(1))
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        let elapsed = ContinuousClock.now - started
        #expect(elapsed >= .milliseconds(550), "the request in flight was allowed to finish")
        #expect(uploader.status().lastHTTPStatus == 599)
        #expect(ingest.requests.count == 1, "no request starts after the shutdown")
        #expect(try await data.statistics().pending == 150)
    }

    /// A request that would outlast systemd's `TimeoutStopSec=` (a 60 s `request_timeout` and an ingest that answers after
    /// 40 s) is abandoned when the stop's allowance (here the 5 s floor: the final flush is off) has passed; its readings
    /// stay pending.
    @Test func gracefulShutdownAbandonsARequestThatOutlastsTheStopAllowance() async throws {
        let data = try await TestBuffer(count: 50)
        let ingest = try FakeIngest(FakeIngest.Rules(script: { index, _ in index == 0 ? .delayed(.seconds(40), .reply(599)) : nil }))
        var configuration = uploadConfiguration(ingest.url, requestTimeout: .seconds(60))
        configuration.shutdownFlushTimeout = .zero
        let uploader = try Uploader(device: testDevice, source: data.buffer, configuration: configuration, logger: Logger(label: "test.upload"))
        #expect(uploader.stopAllowance == .seconds(5))
        let group = ServiceGroup(services: [uploader], logger: Logger(label: "test.group"))
        var stopped = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            #expect(await ingest.waitForBatches(1))
            stopped = ContinuousClock.now
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        let elapsed = ContinuousClock.now - stopped
        #expect(elapsed >= .milliseconds(4500), "the request in flight had its allowance: \(elapsed)")
        #expect(elapsed < .seconds(15), "the stop did not wait for the request's 40 s: \(elapsed)")
        #expect(uploader.status().lastHTTPStatus == nil, "no answer was recorded")
        #expect(try await data.statistics().pending == 50)
    }

    /// An ingest older than GET /v1/device (404) that accepts every batch after half a second.
    static func slowIngest() throws -> TestHTTPServer {
        try TestHTTPServer { request, _ in
            if request.method == "GET" { return .json(404, #"{"error":{"code":"not_found","message":"no route"}}"#) }
            let readings = (try? BatchCodec.decode(request.body).readings) ?? []
            let receipt = IngestReceipt(accepted: readings.count, duplicates: 0, rejected: [])
            let body = (try? JSONEncoder().encode(receipt)).map { Array($0) } ?? []
            return .delayed(.milliseconds(500), .reply(200, headers: ["Content-Type": "application/json"], body: body))
        }
    }

    /// How a shutdown ends the uploader: a stop with the final flush (the default), a stop without it, and a reload,
    /// which stops the services like a stop but whose next uploader carries on at once (flushing first held sampling back
    /// at every reload).
    enum Shutdown: String, CaseIterable, Sendable {
        case stop, stopWithoutFlush, reload
    }

    /// With the final flush on (the default), the rest of the backlog follows the request in flight; with it off, or on
    /// a reload, only the acknowledgement of the request in flight is kept.
    @Test(arguments: Shutdown.allCases)
    func gracefulShutdownKeepsTheAcknowledgementOfTheRequestInFlight(shutdown: Shutdown) async throws {
        let finalFlush = shutdown == .stop
        let data = try await TestBuffer(count: 150)
        let slow = try Self.slowIngest()
        var configuration = uploadConfiguration(slow.url)
        if shutdown == .stopWithoutFlush { configuration.shutdownFlushTimeout = .zero }
        let uploader = try Uploader(
            device: testDevice, source: data.buffer, configuration: configuration, logger: Logger(label: "test.upload"),
            reloading: { shutdown == .reload })
        let group = ServiceGroup(services: [uploader], logger: Logger(label: "test.group"))
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            #expect(await eventually { slow.requests.contains { $0.method == "POST" } })
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        let posts = slow.requests.filter { $0.method == "POST" }
        #expect(slow.requests.first?.path == IngestProtocol.deviceStatePath, "the device state is asked first")
        if finalFlush {
            #expect(posts.count == 2)
            #expect(try await data.statistics().pending == 0, "the final flush sent the last 50")
            #expect(uploader.status().uploadedTotal == 150)
        } else {
            #expect(posts.count == 1)
            #expect(try await data.statistics().pending == 50, "the acknowledged batch of 100 was deleted before returning")
            #expect(uploader.status().uploadedTotal == 100)
        }
    }
}

/// The real buffer, except that it has lost the descriptor of one sensor: that sensor's readings cannot be encoded.
struct ForgetfulSource: PendingReadings {
    let base: ReadingBuffer
    let forgotten: SensorID

    init(_ base: ReadingBuffer, forgetting sensor: SensorID) {
        self.base = base
        self.forgotten = sensor
    }

    func pending(limit: Int, from end: BacklogEnd, excluding excluded: ClosedRange<UInt64>?) async throws -> [Reading] {
        try await base.pending(limit: limit, from: end, excluding: excluded)
    }
    func advanceSequence(past sequence: UInt64) async throws -> UInt64? { try await base.advanceSequence(past: sequence) }
    func renumber(_ sequences: [UInt64], above floor: UInt64) async throws -> [SequenceRenumbering] {
        try await base.renumber(sequences, above: floor)
    }
    func descriptors(for sensors: Set<SensorID>) async throws -> [SensorDescriptor] {
        try await base.descriptors(for: sensors).filter { $0.id != forgotten }
    }
    func acknowledge(_ sequences: [UInt64]) async throws { try await base.acknowledge(sequences) }
    func quarantine(_ reasons: [UInt64: String]) async throws { try await base.quarantine(reasons) }
    func statistics() async throws -> BufferStatistics { try await base.statistics() }
    func flush() async throws -> UInt64 { try await base.flush() }
}
