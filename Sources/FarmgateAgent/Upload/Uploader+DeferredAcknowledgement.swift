/// Draining a backlog, the deletion of a batch the ingest acknowledged runs while the next request is in flight, not
/// before it is read and encoded: the buffer deletes on its own thread while the ingest stores, so a backlog drains at the
/// pace of the ingest alone.
///
/// The contract is the one of a deletion that did not happen (a power cut just after the answer): the readings stay in
/// the buffer and would go again as duplicates, which the ingest answers as such. Until the deletion has run, the next
/// batch is read leaving the acknowledged sequences out (``PendingReadings/pending(limit:from:excluding:)``); the
/// deletion starts just before that batch's request leaves and is awaited as soon as its answer (or failure) is back,
/// before anything else touches the buffer. Only a whole batch accepted as sent (no refusal, no calibration event, no
/// `sequence_conflict`) is deferred, and only while the backlog holds more than one batch besides it; otherwise, and
/// before asking the ingest for its state, on a stop and before the final flush, the deletion runs at once.
extension Uploader {
    /// Acknowledged readings whose deletion has not run yet.
    struct DeferredAcknowledgement {
        /// The sequences to delete.
        var sequences: [UInt64]
        /// From the lowest to the highest of them: every unheld pending reading in this range is one of them (a batch is
        /// a contiguous run of the backlog's unheld readings), so reading around it leaves out exactly these.
        var range: ClosedRange<UInt64>
        /// The deletion, once started.
        var deletion: Task<Void, any Error>?
    }

    /// Starts the deferred deletion, if any, on the buffer's thread (called just before a request leaves).
    func startDeferredDeletion(_ loop: inout LoopState) {
        guard var deferred = loop.deferred, deferred.deletion == nil else { return }
        let (source, sequences) = (self.source, deferred.sequences)
        deferred.deletion = Task { try await source.acknowledge(sequences) }
        loop.deferred = deferred
    }

    /// Runs (or waits for) the deferred deletion. Returns the wait when it failed: the readings stay pending and go again
    /// (the ingest answers them as duplicates), after the backoff a failed buffer write costs.
    func settleAcknowledgement(_ loop: inout LoopState) async -> Duration? {
        guard let deferred = loop.deferred else { return nil }
        loop.deferred = nil
        do {
            if let deletion = deferred.deletion {
                try await deletion.value
            } else {
                try await source.acknowledge(deferred.sequences)
            }
            return nil
        } catch {
            return bufferFailed("cannot delete the readings the ingest acknowledged", error, status: nil, &loop)
        }
    }
}
