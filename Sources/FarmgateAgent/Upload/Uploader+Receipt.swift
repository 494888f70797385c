import FarmgateWire
import FarmgateSupport
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Metrics
import Synchronization

/// What a 2xx answer acknowledges: the receipt must add up to the batch, or it acknowledges nothing.
extension Uploader {
    func acknowledge(
        _ group: ArraySlice<Reading>, events: [CalibrationEvent], response: HTTPResponse, frame: StatefulFrame? = nil, _ loop: inout LoopState
    ) async -> Attempt {
        let status = response.status
        let compact = response.header("Content-Type").map {
            $0.split(separator: ";").first?.trimmingWhitespace().lowercased() == IngestProtocol.compactReceiptMediaType
        } ?? false
        let parsed = compact ? IngestReceipt(compact: response.body) : try? JSONDecoder().decode(IngestReceipt.self, from: Data(response.body))
        guard let receipt = parsed else {
            // Re-sending is safe (the ingest is idempotent); a receipt we cannot read acknowledges nothing.
            logger.warning("The ingest answered without a readable receipt", metadata: ["http.status": "\(status)"])
            return .stop(failed(result: "\(status): the answer is not a receipt", status: status, delay: loop.backoff.nextDelay(), &loop))
        }
        var refusedBy: [UInt64: RejectionGroup] = [:]
        for reading in group {
            if let rejected = receipt.rejection(of: reading.sequence) { refusedBy[reading.sequence] = rejected }
        }
        let rejectedTotal = Self.rejectedTotal(receipt, batch: group.count)
        if let answer = receipt.calibrations, !Self.countsEvents(answer, sent: events.count) {
            // Counts no ingest can give for these events: the receipt is not of this batch (a broken or hostile ingest),
            // so it acknowledges nothing, readings included, like a reading count that does not add up.
            logger.warning(
                "The ingest's receipt does not count the calibration events of the batch: not an acknowledgement; nothing is deleted, the batch is sent again",
                metadata: [
                    "calibration.events": "\(events.count)", "receipt.calibrations.accepted": "\(answer.accepted)",
                    "receipt.calibrations.duplicates": "\(answer.duplicates)",
                ])
            let result =
                "\(status): the receipt's calibration counts (\(answer.accepted) accepted, \(answer.duplicates) duplicates) "
                + "do not add up to the \(events.count) calibration event\(events.count == 1 ? "" : "s") sent; not an acknowledgement"
            return .stop(failed(result: result, status: status, delay: loop.backoff.nextDelay(), &loop))
        }
        guard let refused = rejectedTotal,
            receipt.accepted >= 0, receipt.duplicates >= 0, receipt.accepted <= group.count, receipt.duplicates <= group.count,
            receipt.accepted + receipt.duplicates + refused == group.count, refusedBy.count == refused
        else {
            // Not an acknowledgement: deleting on its word could lose readings it never stored. Nothing is deleted or
            // quarantined; the batch goes again (the ingest is idempotent).
            logger.warning(
                "The ingest's receipt does not add up to the batch: not an acknowledgement; nothing is deleted, the batch is sent again",
                metadata: [
                    "batch.readings": "\(group.count)", "receipt.accepted": "\(receipt.accepted)",
                    "receipt.duplicates": "\(receipt.duplicates)", "receipt.rejected": "\(receipt.rejected.map(\.count))",
                    "receipt.rejected_named": "\(refusedBy.count)",
                ])
            let result =
                "\(status): the receipt does not add up to the batch of \(group.count) (\(receipt.accepted) accepted, "
                + "\(receipt.duplicates) duplicates, \(rejectedTotal.map(String.init) ?? "?") rejected, \(refusedBy.count) named); not an acknowledgement"
            return .stop(failed(result: result, status: status, delay: loop.backoff.nextDelay(), &loop))
        }
        var conflicts: [UInt64] = []
        var reasons: [UInt64: String] = [:]
        for (sequence, rejection) in refusedBy {
            if rejection.code == RejectionCode.sequenceConflict {
                conflicts.append(sequence)
            } else {
                reasons[sequence] = "\(rejection.code): \(rejection.message)"
            }
        }
        if !reasons.isEmpty {
            logger.warning("The ingest rejected readings; moving them to quarantine", metadata: ["readings": "\(reasons.count)"])
            if let wait = await quarantine(reasons, status: status, &loop) { return .stop(wait) }
        }
        let acknowledged = group.map(\.sequence).filter { refusedBy[$0] == nil }
        if let wait = await settleAcknowledgement(&loop) { return .stop(wait) }  // none is left here; never two at once
        if loop.pipelining, refusedBy.isEmpty, events.isEmpty, let first = acknowledged.min(), let last = acknowledged.max() {
            // Deleted while the next batch is in flight (see ``DeferredAcknowledgement``).
            loop.deferred = DeferredAcknowledgement(sequences: acknowledged, range: first...last)
        } else {
            do {
                try await source.acknowledge(acknowledged)
            } catch {
                return .stop(bufferFailed("cannot delete the readings the ingest acknowledged", error, status: status, &loop))
            }
        }
        if let frame {
            // The ingest holds the table now, and every reading it did not refuse: the next frame predicts from them.
            loop.session.delivered(frame, acknowledged: group.filter { refusedBy[$0.sequence] == nil })
            loop.stateRefusals = 0
        }
        if !events.isEmpty {
            // Sent once per delivery: the rest of a halved batch goes without them, whatever this receipt says of them.
            loop.outgoingEvents = []
            if let wait = await acknowledgeEvents(events, receipt: receipt, status: status, &loop) { return .stop(wait) }
        }
        loop.backoff.reset()
        metrics.delivered.increment()
        metrics.accepted.increment(by: Int64(receipt.accepted))
        metrics.duplicates.increment(by: Int64(receipt.duplicates))
        metrics.rejected.increment(by: Int64(refused))
        let result = "\(status): \(receipt.accepted) accepted, \(receipt.duplicates) duplicates, \(refused) rejected"
        logger.debug(
            "Batch delivered",
            metadata: [
                "batch.readings": "\(group.count)", "batch.first": "\(group.first?.sequence ?? 0)", "batch.last": "\(group.last?.sequence ?? 0)",
                "receipt.accepted": "\(receipt.accepted)", "receipt.duplicates": "\(receipt.duplicates)", "receipt.rejected": "\(refused)",
            ])
        let cleared = state.withLock { state -> UploadHold? in
            let held = state.held
            state.held = nil
            state.lastSuccessAt = Timestamp.now()
            state.lastResult = result
            state.lastHTTPStatus = status
            state.consecutiveFailures = 0
            state.nextAttemptAt = nil
            state.currentBackoffSeconds = 0
            state.uploadedTotal += Int64(receipt.accepted)
            state.duplicatesTotal += Int64(receipt.duplicates)
            state.rejectedTotal += Int64(refused)
            return held
        }
        if let cleared {
            metrics.held.record(0)
            logger.notice(
                "Upload hold cleared: the ingest acknowledged a batch",
                metadata: ["error.code": "\(cleared.code)", "hold.since": "\(cleared.since)", "hold.refusals": "\(cleared.refusals)"])
        }
        if !conflicts.isEmpty, let wait = await repairConflicts(conflicts.sorted(), &loop) { return .stop(wait) }
        return .delivered
    }

    /// Deletes `events` from the buffer when the receipt counted every one of them (`calibrations.accepted + duplicates`
    /// equals the number sent, which ``acknowledge(_:events:response:frame:_:)`` checked before deleting any reading); a
    /// receipt without `calibrations` leaves them for a later batch (the ingest is idempotent on event ids). Returns the
    /// wait when the buffer failed, else nil.
    func acknowledgeEvents(_ events: [CalibrationEvent], receipt: IngestReceipt, status: Int, _ loop: inout LoopState) async -> Duration? {
        guard let answer = receipt.calibrations, Self.countsEvents(answer, sent: events.count) else {
            logger.warning(
                "The ingest's receipt does not count the calibration events of the batch; they stay in the buffer and are sent again",
                metadata: ["calibration.events": "\(events.count)", "receipt.calibrations": "absent"])
            return nil
        }
        if events.count == 1 { loop.singleEventDeliveries = max(0, loop.singleEventDeliveries - 1) }
        do {
            try await source.acknowledgeCalibrations(events.map(\.id))
        } catch {
            return bufferFailed("cannot delete the calibration events the ingest acknowledged", error, status: status, &loop)
        }
        state.withLock { $0.calibrationsUploadedTotal = ($0.calibrationsUploadedTotal ?? 0) + Int64(events.count) }
        metrics.calibrations.increment(by: Int64(events.count))
        logger.info(
            "Calibration events delivered",
            metadata: [
                "calibration.events": "\(events.count)", "receipt.accepted": "\(answer.accepted)", "receipt.duplicates": "\(answer.duplicates)",
            ])
        return nil
    }

    /// Whether `answer` counts exactly the `sent` events: each count in `0...sent` (so that their sum cannot overflow,
    /// whatever an ingest writes) and together `sent`. The ingest counts every event it was sent, stored or already had.
    static func countsEvents(_ answer: CalibrationReceipt, sent: Int) -> Bool {
        (0...sent).contains(answer.accepted) && (0...sent).contains(answer.duplicates) && answer.accepted + answer.duplicates == sent
    }

    /// The sum of the receipt's rejection counts, or nil when one is negative or larger than the batch (not a receipt of it).
    static func rejectedTotal(_ receipt: IngestReceipt, batch: Int) -> Int? {
        var total = 0
        for group in receipt.rejected {
            guard group.count >= 0, group.count <= batch else { return nil }
            total += group.count
            guard total <= batch else { return nil }
        }
        return total
    }
}
