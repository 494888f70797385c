import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

/// Whole-request refusals against the loopback ingest, with the real SQLite buffer: a reading goes to quarantine only when
/// bisection isolated it while the rest of its batch was accepted; a systematic refusal holds the queue and quarantines nothing.
@Suite("Uploader: whole-request refusals never quarantine a backlog")
struct UploadRefusalTests {
    @Test func aRefusalBothHalvesShareHoldsTheQueueQuarantinesNothingAndClearsAtTheNextSuccess() async throws {
        let data = try await TestBuffer(count: 250)
        let gate = Gate()
        // What an older ingest answers an agent whose codec it does not share: every batch, whatever it holds.
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { _, _ in
                gate.isOpen ? nil : .error(400, IngestErrorCode.malformedBatch, "unsupported format version 3 (this build reads version 2)")
            }))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(20), backoffMax: .milliseconds(200))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { (uploader.status().held?.refusals ?? 0) >= 3 })
            let status = uploader.status()
            let held = try #require(status.held)
            #expect(held.httpStatus == 400)
            #expect(held.code == IngestErrorCode.malformedBatch)
            #expect(held.message == "unsupported format version 3 (this build reads version 2)")
            #expect(held.reason.contains("both halves"), "\(held.reason)")
            #expect(status.lastResult == "400: malformed_batch: unsupported format version 3 (this build reads version 2) (held)")
            #expect(status.quarantinedTotal == 0)
            #expect(status.consecutiveFailures >= 3)
            let during = try await data.statistics()
            #expect(during.pending == 250)
            #expect(during.quarantined == 0)
            gate.release()
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 250 })
            #expect(uploader.status().held == nil, "a success clears the hold")
            #expect(uploader.status().consecutiveFailures == 0)
        }
        let log = ingest.log
        // While held, each attempt sent the batch and its two halves, never smaller pieces.
        #expect(log.batches.allSatisfy { $0.count >= 50 }, "\(log.batches.map(\.count))")
        #expect(Set(log.stored.keys) == Set(data.sequences))
        #expect(log.duplicates == 0)
        #expect(try await data.statistics().quarantined == 0)
    }

    @Test func aReadingRefusedAloneWithNothingAcceptedHoldsUntilMoreReadingsShowItIsTheCause() async throws {
        // One pending reading, refused: nothing shows whether the reading or the ingest is at fault.
        let data = try await TestBuffer(count: 1, value: { _ in 13.37 })
        let ingest = try FakeIngest(FakeIngest.Rules(poisonValue: 13.37))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(20), backoffMax: .milliseconds(300))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { uploader.status().held != nil })
            let held = try #require(uploader.status().held)
            #expect(held.httpStatus == 422)
            #expect(held.code == "invalid_batch")
            #expect(held.reason.contains("single reading"), "\(held.reason)")
            #expect(try await data.statistics().pending == 1)
            #expect(try await data.statistics().quarantined == 0)
            // More readings come: bisection now sees the others accepted and isolates the poison.
            try await TestBuffer.append(count: 30, to: data.buffer)
            #expect(
                try await eventually {
                    let statistics = try await data.statistics()
                    return statistics.pending == 0 && statistics.quarantined == 1
                })
            #expect(await eventually { uploader.status().held == nil })
            #expect(uploader.status().uploadedTotal == 30)
        }
        let quarantined = try await data.buffer.quarantined(limit: 10)
        #expect(quarantined.map(\.sequence) == [data.sequences[0]])
        #expect(quarantined.first?.reason == "invalid_batch: reading \(data.sequences[0]) cannot be stored")
    }

    @Test func twoAdjacentPoisonReadingsAreBothQuarantinedOnceTheRestOfTheBatchIsAccepted() async throws {
        let data = try await TestBuffer(count: 40)
        let poisoned: Set<UInt64> = [data.sequences[17], data.sequences[18]]
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { _, batch in
                guard let bad = batch.readings.first(where: { poisoned.contains($0.sequence) }) else { return nil }
                return .error(422, "invalid_batch", "reading \(bad.sequence) cannot be stored")
            }))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, batchMaxReadings: 40)) { uploader throws in
            #expect(
                try await eventually {
                    try await data.statistics().pending == 0 && uploader.status().quarantinedTotal == 2 && uploader.status().uploadedTotal == 38
                })
            #expect(uploader.status().held == nil)
        }
        let quarantined = try await data.buffer.quarantined(limit: 10)
        #expect(Set(quarantined.map(\.sequence)) == poisoned)
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences).subtracting(poisoned))
    }

    @Test func aRefusalThatStartsInTheMiddleOfABisectionHoldsInsteadOfQuarantiningTheRest() async throws {
        let data = try await TestBuffer(count: 40)
        let gate = Gate()
        // The whole batch is refused (a poison reading, it seems), its first half taken, and from then on the ingest
        // refuses everything (a bad deploy), until the gate opens.
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { index, _ in
                if gate.isOpen || index == 1 { return nil }
                return .error(422, "invalid_batch", "the ingest cannot store readings right now")
            }))
        let configuration = uploadConfiguration(ingest.url, batchMaxReadings: 40, backoffInitial: .milliseconds(20), backoffMax: .milliseconds(200))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { uploader.status().held != nil })
            let held = try #require(uploader.status().held)
            // The first hold says "and so was a reading the ingest took earlier" (the probe); the held queue is tried again
            // after its backoff, and a later try, whose delivery took nothing yet, says only that both halves were refused
            // alike: either may be the one seen here (1 run in 10 saw the later one).
            #expect(held.reason.contains("the refusal is systematic, not caused by a reading"), "\(held.reason) batches: \(ingest.log.batches.map { "\($0.first ?? 0)-\($0.last ?? 0)" })")
            #expect(ingest.log.batches.contains([20]), "the probe of a reading taken earlier was never sent: \(ingest.log.batches)")
            #expect(try await data.statistics().quarantined == 0, "readings were quarantined for a refusal of everything")
            #expect(try await data.statistics().pending == 20)
            gate.release()
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
        #expect(try await data.statistics().quarantined == 0)
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences))
    }

    /// Answers the agent must retry as they are: no split, no hold, nothing quarantined.
    @Test(arguments: [
        TestResponse.error(400, IngestErrorCode.incompleteBody, "the body ended after 120 of 2048 bytes"),
        .reply(500), .json(502, "<html>Bad Gateway</html>"), .close,
    ])
    func transientFailuresAreRetriedWithoutSplittingOrHolding(answer: TestResponse) async throws {
        let data = try await TestBuffer(count: 40)
        let ingest = try FakeIngest(FakeIngest.Rules(script: { index, _ in index < 3 ? answer : nil }))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(20), backoffMax: .milliseconds(200))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 40 })
            #expect(uploader.status().held == nil)
        }
        #expect(ingest.log.batches.map(\.count) == [40, 40, 40, 40], "retried whole, never split")
        #expect(try await data.statistics().quarantined == 0)
    }

    /// The same readings answered `incomplete_body` every time: the ingest got the whole HTTP body each time, so the frame
    /// cannot be read (an encoder's fault, a damaged row); after a few tries it is bisected like a malformed one, and the
    /// reading that causes it is isolated and quarantined, instead of the queue being retried forever.
    @Test func theSameBatchCutShortEveryTimeIsBisectedAndItsCauseQuarantined() async throws {
        let data = try await TestBuffer(count: 40)
        let poison = data.sequences[25]
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { _, batch in
                batch.readings.contains { $0.sequence == poison }
                    ? .error(400, IngestErrorCode.incompleteBody, "the binary batch ends early (value stream: needs 2 bytes but only 1 remain)") : nil
            }))
        let configuration = uploadConfiguration(ingest.url, batchMaxReadings: 40, backoffInitial: .milliseconds(20), backoffMax: .milliseconds(100))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(try await eventually(timeout: .seconds(20)) { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 39 })
            #expect(uploader.status().held == nil)
        }
        #expect(ingest.log.batches.prefix(Uploader.maxIncompleteBodies).allSatisfy { $0.count == 40 }, "retried whole first: \(ingest.log.batches.map(\.count))")
        let quarantined = try await data.buffer.quarantined(limit: 10)
        #expect(quarantined.map(\.sequence) == [poison])
        #expect(quarantined.first?.reason.hasPrefix("incomplete_body:") == true, "\(String(describing: quarantined.first?.reason))")
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences).subtracting([poison]))
    }

    /// Refusals no reading can cause: the queue is held at the first one, the batch is never split.
    @Test(arguments: [
        (401, IngestErrorCode.unauthorized), (401, IngestErrorCode.revoked), (403, IngestErrorCode.deviceMismatch),
        (415, IngestErrorCode.unsupportedMediaType), (415, IngestErrorCode.unsupportedEncoding), (404, "not_found"),
    ])
    func refusalsNoReadingCanCauseHoldAtOnceWithoutSplitting(status: Int, code: String) async throws {
        let data = try await TestBuffer(count: 40)
        let gate = Gate()
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { _, _ in gate.isOpen ? nil : .error(status, code, "refused for the test") }))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(20), backoffMax: .milliseconds(200))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { (uploader.status().held?.refusals ?? 0) >= 3 })
            let held = try #require(uploader.status().held)
            #expect(held.httpStatus == status)
            #expect(held.code == code)
            #expect(held.message == "refused for the test")
            #expect(ingest.log.batches.allSatisfy { $0.count == 40 }, "held at once, never split: \(ingest.log.batches.map(\.count))")
            // Held means backing off, jittered and capped like any failure (not one fixed wait).
            #expect(uploader.status().currentBackoffSeconds <= 0.2)
            #expect(try await data.statistics().pending == 40)
            gate.release()
            #expect(try await eventually { try await data.statistics().pending == 0 })
            // The hold clears with the acknowledgement's bookkeeping, just after the buffer deleted the readings.
            #expect(await eventually { uploader.status().held == nil })
        }
        #expect(try await data.statistics().quarantined == 0)
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences))
    }

    @Test(arguments: [301, 308])
    func aRedirectHoldsAndSaysWhereItPoints(status: Int) async throws {
        let data = try await TestBuffer(count: 40)
        let gate = Gate()
        // What nginx answers an agent configured with http:// when the site moved to https://.
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { _, _ in
                gate.isOpen ? nil : .reply(status, headers: ["Location": "https://ingest.example/v1/batches"], body: [])
            }))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(20), backoffMax: .milliseconds(200))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { (uploader.status().held?.refusals ?? 0) >= 2 })
            let held = try #require(uploader.status().held)
            #expect(held.httpStatus == status)
            #expect(held.reason.contains("redirects to https://ingest.example/v1/batches"), "\(held.reason)")
            #expect(held.reason.contains("upload.endpoint"), "\(held.reason)")
            #expect(ingest.log.batches.allSatisfy { $0.count == 40 }, "held at once, never split: \(ingest.log.batches.map(\.count))")
            #expect(try await data.statistics().pending == 40)
            gate.release()
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
        #expect(try await data.statistics().quarantined == 0)
    }

    @Test func payloadTooLargeHalvesUntilTheIngestTakesTheBatches() async throws {
        let data = try await TestBuffer(count: 60)
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { _, batch in
                batch.readings.count > 10 ? .error(413, IngestErrorCode.tooManyReadings, "at most 10 readings in a batch") : nil
            }))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, batchMaxReadings: 60)) { uploader throws in
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 60 })
            #expect(uploader.status().held == nil)
        }
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences))
        #expect(try await data.statistics().quarantined == 0)
        // 60 → 30, 30 → 15 × 4 → 7 or 8 × 8: every piece of more than 10 was refused, nothing was bisected further.
        #expect(ingest.log.batches.allSatisfy { $0.count >= 7 }, "\(ingest.log.batches.map(\.count))")
    }

    @Test func aSingleReadingStillTooLargeHoldsAndIsNotQuarantined() async throws {
        let data = try await TestBuffer(count: 3)
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { _, _ in .error(413, IngestErrorCode.payloadTooLarge, "the body is larger than 0 bytes") }))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(20), backoffMax: .milliseconds(200))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { (uploader.status().held?.refusals ?? 0) >= 2 })
            let held = try #require(uploader.status().held)
            #expect(held.code == IngestErrorCode.payloadTooLarge)
            #expect(held.reason.contains("single reading"), "\(held.reason)")
        }
        let statistics = try await data.statistics()
        #expect(statistics.pending == 3)
        #expect(statistics.quarantined == 0)
    }

    @Test func anUnsupportedFormatVersionFallsBackToJSONAndSaysSo() async throws {
        let data = try await TestBuffer(count: 30)
        let ingest = try FakeIngest(
            FakeIngest.Rules(script: { _, batch in
                guard batch.contentType == IngestProtocol.binaryBatchMediaType else { return nil }
                return .error(
                    415, IngestErrorCode.unsupportedFormatVersion, "this ingest reads binary batch format version 1", acceptedVersions: [1])
            }))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 30 })
            let status = uploader.status()
            #expect(status.format == "json")
            let fallback = try #require(status.formatFallback)
            #expect(fallback.contains("version \(BatchCodec.formatVersion)") && fallback.contains("it reads: 1"), "\(fallback)")
            #expect(status.held == nil)
            #expect(status.quarantinedTotal == 0)
        }
        #expect(ingest.log.contentTypes == [IngestProtocol.binaryBatchMediaType, IngestProtocol.jsonBatchMediaType])
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences))
    }

    /// Receipts that are not acknowledgements of the batch they answer.
    enum BadReceipt: String, CaseIterable, Sendable {
        /// One reading short.
        case countsShort
        /// The counts add up, but the rejected reading is not named: the agent cannot tell which one it is.
        case rejectionUnnamed
        /// Counts that would overflow when added.
        case hugeCounts

        func receipt(for readings: [Reading]) -> IngestReceipt {
            switch self {
            case .countsShort:
                IngestReceipt(accepted: readings.count - 1, duplicates: 0)
            case .rejectionUnnamed:
                IngestReceipt(
                    accepted: readings.count - 1, duplicates: 0,
                    rejected: [RejectionGroup(code: "out_of_range", sensor: "tank1.ph", message: "too high", count: 1, sequences: [])])
            case .hugeCounts:
                IngestReceipt(accepted: Int.max, duplicates: Int.max)
            }
        }
    }

    @Test(arguments: BadReceipt.allCases)
    func aReceiptThatDoesNotAddUpAcknowledgesNothing(bad: BadReceipt) async throws {
        let data = try await TestBuffer(count: 30)
        let ingest = try FakeIngest(FakeIngest.Rules(script: { index, batch in index < 2 ? .receipt(bad.receipt(for: batch.readings)) : nil }))
        let configuration = uploadConfiguration(ingest.url, backoffInitial: .milliseconds(200), backoffMax: .milliseconds(400))
        try await withUploader(source: data.buffer, configuration: configuration) { uploader throws in
            #expect(await eventually { uploader.status().consecutiveFailures >= 1 })
            let status = uploader.status()
            #expect(status.lastResult?.contains("does not add up") == true, "\(status.lastResult ?? "")")
            #expect(status.lastSuccessAt == nil)
            #expect(try await data.statistics().pending == 30, "nothing deleted on the word of a receipt that does not add up")
            #expect(try await eventually { try await data.statistics().pending == 0 && uploader.status().uploadedTotal == 30 })
        }
        #expect(ingest.requests.count == 3)
        #expect(try await data.statistics().quarantined == 0)
        #expect(Set(ingest.log.stored.keys) == Set(data.sequences))
    }
}
