import FarmgateWire
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

/// Sequence numbers the ingest already holds: asked at start, after a `sequence_conflict`, after a 415 and every
/// ``UploadConfiguration/deviceCheckInterval``; repaired by raising the buffer's counter and renumbering only the readings
/// the ingest refused. The same answer says which binary format versions the ingest reads (calibration events, a way back
/// from a JSON fallback).
extension Uploader {
    /// What the ingest said about the sequences it holds for this device.
    enum IngestHighest {
        /// Its highest stored sequence (nil: it holds nothing of this device).
        case known(UInt64?)
        /// It does not answer `GET /v1/device` (an ingest older than the endpoint).
        case unsupported
        /// No usable answer now; asked again later.
        case unavailable
        /// Its highest stored sequence is above any this agent numbers (``BufferStore/maximumSequenceFloor``, 2^62):
        /// another sender used this device's key with numbers that large. The rest of the answer (format versions) is
        /// used; readings refused `sequence_conflict` cannot be renumbered above it.
        case implausible(UInt64)
    }

    /// Asks `GET /v1/device` and raises the buffer's counter above the ingest's highest sequence when it is below (the
    /// buffer lost its history). Logs loudly when it jumps.
    func learnDeviceState(_ loop: inout LoopState) async -> IngestHighest {
        let response: HTTPResponse
        heartbeat.beat(within: heartbeatAllowance)
        do {
            response = try await client.get(deviceStateURL, headers: [authorization, HTTPHeader("Accept", "application/json")])
        } catch {
            if error.kind != .cancelled {
                logger.notice(
                    "Cannot ask the ingest which sequence numbers it holds; asking again later",
                    metadata: ["error": "\(error)", "upload.url": "\(deviceStateURL)"])
            }
            loop.deviceCheck.postpone()
            return .unavailable
        }
        switch response.status {
        case 200:
            guard let answer = try? JSONDecoder().decode(DeviceState.self, from: Data(response.body)) else {
                logger.warning("The ingest's answer to GET \(IngestProtocol.deviceStatePath) is not a device state; asking again later")
                loop.deviceCheck.postpone()
                return .unavailable
            }
            guard answer.device == device.rawValue else {
                logger.error(
                    "The ingest says this device key belongs to another device: check device.id and upload.key_file in the agent configuration",
                    metadata: ["device": "\(device)", "ingest.device": "\(answer.device)"])
                loop.deviceCheck.postpone()
                return .unavailable
            }
            var implausible: UInt64?
            if let highest = answer.highestSequence, highest > UInt64(BufferStore.maximumSequenceFloor) {
                // Not a history this buffer lost: the counter stays, and the answer's other parts still count.
                logger.error(
                    "The ingest holds a sequence number for this device above any this agent numbers: another sender used this device's key with sequence numbers that large. New readings keep their numbers; readings the ingest refuses as sequence_conflict are quarantined",
                    metadata: ["ingest.highest_sequence": "\(highest)", "agent.highest_numbered": "\(BufferStore.maximumSequenceFloor)"])
                implausible = highest
            } else if let highest = answer.highestSequence {
                do {
                    if let previous = try await source.advanceSequence(past: highest) {
                        logger.error(
                            "The ingest holds sequence numbers above this buffer's last one: the buffer lost its history (replaced, re-imaged or deleted). New readings are numbered above the ingest's highest; buffered readings it refuses as sequence_conflict are renumbered and sent again",
                            metadata: [
                                "buffer.last_sequence": "\(previous)", "ingest.highest_sequence": "\(highest)",
                                "buffer.next_sequence": "\(highest + 1)",
                            ])
                    }
                } catch {
                    logger.error(
                        "Cannot raise the buffer's sequence counter above the ingest's highest sequence; asking again later",
                        metadata: ["error": "\(error)", "ingest.highest_sequence": "\(highest)"])
                    loop.deviceCheck.postpone()
                    return .unavailable
                }
            }
            loop.deviceCheck.answered()
            let versions = answer.effectiveAcceptedVersions
            let readsEvents = versions.contains(Int(BatchCodec.eventsFormatVersion))
            if readsEvents != loop.acceptsEvents {
                if readsEvents {
                    logger.info("The ingest reads batch format version 3: calibration events go with the readings",
                        metadata: ["ingest.accepted_versions": "\(versions)"])
                } else {
                    logger.info("The ingest does not read batch format version 3: calibration events wait in the buffer",
                        metadata: ["ingest.accepted_versions": "\(versions)"])
                }
            }
            loop.acceptsEvents = readsEvents
            let readsStateful = versions.contains(Int(BatchCodec.statefulFormatVersion))
            if readsStateful != loop.acceptsStateful && configuration.stateful {
                logger.info(
                    readsStateful
                        ? "The ingest reads batch format version 4: binary batches go as stateful frames"
                        : "The ingest does not read batch format version 4: binary batches go as self-contained frames",
                    metadata: ["ingest.accepted_versions": "\(versions)"])
            }
            if !readsStateful { loop.session.reset() }
            loop.acceptsStateful = readsStateful
            returnToBinaryIfRead(versions, &loop)
            state.withLock {
                $0.ingestHighestSequence = answer.highestSequence
                $0.ingestAcceptedVersions = versions
            }
            logger.info(
                "The ingest reported the highest sequence it holds for this device",
                metadata: ["ingest.highest_sequence": "\(answer.highestSequence.map(String.init) ?? "none")"])
            if let implausible { return .implausible(implausible) }
            return .known(answer.highestSequence)
        case 404, 405, 501:
            logger.notice(
                "The ingest does not report the sequence numbers it holds (an older ingest); sequence numbers are not checked against it",
                metadata: ["http.status": "\(response.status)", "upload.url": "\(deviceStateURL)"])
            loop.deviceCheck.answered()
            loop.acceptsEvents = false
            loop.acceptsStateful = false
            return .unsupported
        default:
            logger.notice(
                "The ingest did not say which sequence numbers it holds; asking again later",
                metadata: ["http.status": "\(response.status)", "reason": "\(Refusal(response).reason)"])
            // A 429 or 503 with `Retry-After` is obeyed here as for batches (up to `retry_after_max`).
            let asked = response.status == 429 || response.status == 503 ? askedDelay(response) : nil
            loop.deviceCheck.postpone(atLeast: asked ?? .zero)
            return .unavailable
        }
    }

    /// After a fallback to JSON, goes back to the binary form once the ingest says it reads this build's version again
    /// (upgraded, or a proxy fixed), but not before a whole ``UploadConfiguration/deviceCheckInterval`` since the fallback:
    /// an ingest that lists the version and refuses it costs one extra request per interval, never one per batch.
    func returnToBinaryIfRead(_ versions: [Int], _ loop: inout LoopState) {
        guard let since = loop.fellBackAt, loop.format == .json, configuration.format == .binary,
            versions.contains(Int(BatchCodec.formatVersion)), ContinuousClock.now - since >= configuration.deviceCheckInterval
        else { return }
        loop.format = .binary
        loop.fellBackAt = nil
        logger.notice(
            "The ingest reads this agent's binary batch format again; sending binary batches",
            metadata: ["ingest.accepted_versions": "\(versions)"])
        state.withLock {
            $0.format = UploadConfiguration.Format.binary.rawValue
            $0.formatFallback = nil
        }
    }

    /// Renumbers readings refused `sequence_conflict` above max(the ingest's highest, the buffer's last), so that they are
    /// sent again under numbers nobody used. Returns a wait when that cannot happen now (the readings stay as they are and
    /// meet the same conflict at the next attempt), nil when they were renumbered.
    func repairConflicts(_ conflicts: [UInt64], _ loop: inout LoopState) async -> Duration? {
        logger.error(
            "The ingest holds other readings under sequence numbers of this batch (sequence_conflict): this site's buffer lost its history. Asking the ingest for its highest sequence and renumbering these readings",
            metadata: ["readings": "\(conflicts.count)", "sequences": "\(Self.describe(conflicts))"])
        let floor: UInt64
        switch await learnDeviceState(&loop) {
        case .known(let highest):
            floor = highest ?? 0
        case .unsupported:
            floor = 0
        case .unavailable:
            return failed(
                result: "sequence_conflict on \(conflicts.count) readings; cannot ask the ingest for its highest sequence yet",
                status: nil, cause: .sequenceConflict, delay: loop.backoff.nextDelay(), &loop)
        case .implausible(let highest):
            // No number is left above the ingest's: kept aside (quarantine), never resent in a loop. Once the ingest's
            // operator has removed the other sender's readings, `farmgate quarantine requeue --code sequence_conflict`.
            let reason = "\(RejectionCode.sequenceConflict): the ingest holds another reading under this sequence, and its highest sequence for this device (\(highest)) is above any this agent numbers (another sender used this device's key); ask the ingest's operator, then requeue"
            if let wait = await quarantine(Dictionary(conflicts.map { ($0, reason) }, uniquingKeysWith: { first, _ in first }), status: nil, &loop) {
                return wait
            }
            logger.error(
                "Quarantined readings the ingest refused as sequence_conflict: no sequence number is left above the ingest's highest for this device",
                metadata: ["readings": "\(conflicts.count)", "sequences": "\(Self.describe(conflicts))", "ingest.highest_sequence": "\(highest)"])
            return nil
        }
        let moved: [SequenceRenumbering]
        do {
            moved = try await source.renumber(conflicts, above: floor)
        } catch {
            return bufferFailed("cannot renumber the readings the ingest refused as sequence_conflict", error, status: nil, &loop)
        }
        guard !moved.isEmpty else { return nil }
        let again = conflicts.contains { loop.renumbered.contains($0) }
        if loop.renumbered.count > 1_000_000 { loop.renumbered = [] }
        loop.renumbered.formUnion(moved.map(\.new))
        state.withLock { $0.renumberedTotal += Int64(moved.count) }
        metrics.renumbered.increment(by: Int64(moved.count))
        logger.error(
            "Renumbered readings the ingest refused as sequence_conflict; they are sent again under their new numbers",
            metadata: [
                "readings": "\(moved.count)", "from": "\(Self.describe(moved.map(\.old)))", "to": "\(Self.describe(moved.map(\.new)))",
                "ingest.highest_sequence": "\(floor)",
            ])
        guard again else { return nil }
        // Numbers this run chose above the ingest's highest were taken again: another sender numbers readings for this
        // device (two sites with one key?). Keep the readings, but do not race it at full speed.
        logger.error(
            "Readings renumbered above the ingest's highest sequence met sequence_conflict again: is another site using this device's key?",
            metadata: ["readings": "\(moved.count)"])
        return failed(
            result: "sequence_conflict again on renumbered readings: is another site using this device's key?", status: nil,
            cause: .sequenceConflict, delay: loop.backoff.nextDelay(), &loop)
    }

    /// Ascending sequences as runs: `1-40, 52, 60-61`, at most 20 runs.
    static func describe(_ sequences: [UInt64]) -> String {
        var runs: [(UInt64, UInt64)] = []
        for sequence in sequences.sorted() {
            if let last = runs.last, last.1 != UInt64.max, last.1 + 1 == sequence {
                runs[runs.count - 1].1 = sequence
            } else if runs.last?.1 != sequence {
                runs.append((sequence, sequence))
            }
        }
        var text = runs.prefix(20).map { $0.0 == $0.1 ? "\($0.0)" : "\($0.0)-\($0.1)" }.joined(separator: ", ")
        if runs.count > 20 { text += ", ... (\(runs.count) runs)" }
        return text
    }
}
