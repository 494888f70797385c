import FarmgateAgent
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Synchronization
import Testing

/// A loopback ingest that reads binary format versions 2 and 3 and the JSON form like `farmgate-ingest`: idempotent on
/// reading sequences and on event ids, answering `calibrations` in the receipt of a batch that carried events. What it says
/// in `accepted_versions` (which a test may change while it runs), and whether it answers a version 3 frame or counts its
/// events, is up to the test. JSON batches are logged as version 0.
final class EventIngest: Sendable {
    struct Rules: Sendable {
        /// `accepted_versions` in `GET /v1/device` (nil: the member is absent, as from an ingest before version 3).
        var acceptedVersions: [Int]? = [2, 3]
        /// Answer a version 3 frame 415 `unsupported_format_version` (accepted_versions [2]).
        var refuseVersion3 = false
        /// Leave `calibrations` out of the receipt of frame `n` (counting batch POSTs from 0).
        var uncounted: @Sendable (Int) -> Bool = { _ in false }
        /// Refuse every frame carrying events 422 (an ingest that cannot take an event: its fault is the event's, not the readings').
        var refuseEvents = false
        /// Refuse every frame carrying one of these events 422 (and take the others).
        var refuseEventIDs: Set<String> = []
        /// Refuse frames with more readings than this 413 `too_many_readings`.
        var maxReadings = Int.max
        /// Refuse every binary frame 415 `unsupported_format_version` (an ingest that takes only JSON).
        var refuseBinary = false
    }

    struct Log: Sendable {
        /// Every batch POST in arrival order: its frame version, reading sequences and event ids.
        var frames: [(version: UInt8, sequences: [UInt64], events: [String])] = []
        var storedReadings: Set<UInt64> = []
        /// How many times each event was stored (it must never be more than once).
        var storedEvents: [String: Int] = [:]
        var eventDuplicates = 0
        /// `GET /v1/device` questions answered.
        var deviceQuestions = 0
    }

    private final class State: Sendable {
        let log = Mutex(Log())
        let posts = Atomic<Int>(0)
        let acceptedVersions: Mutex<[Int]?>
        let refuseBinary: Mutex<Bool>

        init(acceptedVersions: [Int]?, refuseBinary: Bool) {
            self.acceptedVersions = Mutex(acceptedVersions)
            self.refuseBinary = Mutex(refuseBinary)
        }
    }

    let server: TestHTTPServer
    private let shared: State

    init(_ rules: Rules = Rules()) throws {
        let shared = State(acceptedVersions: rules.acceptedVersions, refuseBinary: rules.refuseBinary)
        self.shared = shared
        server = try TestHTTPServer { request, _ in
            if request.method == "GET" {
                let highest = shared.log.withLock { log -> UInt64? in
                    log.deviceQuestions += 1
                    return log.storedReadings.max()
                }
                let answer = DeviceState(
                    device: testDevice.rawValue, highestSequence: highest, acceptedVersions: shared.acceptedVersions.withLock { $0 })
                let body = (try? JSONEncoder().encode(answer)).map { Array($0) } ?? []
                return .reply(200, headers: ["Content-Type": "application/json"], body: body)
            }
            let frame: BatchFrame
            let json = request.headers["content-type"] == IngestProtocol.jsonBatchMediaType
            if !json && shared.refuseBinary.withLock({ $0 }) {
                return .error(415, IngestErrorCode.unsupportedFormatVersion, "only JSON is read here", acceptedVersions: [])
            }
            do {
                if json {
                    let decoded = try BatchJSON.decode(request.body)
                    frame = BatchFrame(version: 0, batch: decoded.batch, calibrations: decoded.calibrations)
                } else {
                    frame = try BatchCodec.decodeFrame(request.body)
                }
            } catch {
                return .error(400, IngestErrorCode.malformedBatch, "\(error)")
            }
            let index = shared.posts.add(1, ordering: .sequentiallyConsistent).oldValue
            shared.log.withLock {
                $0.frames.append((frame.version, frame.batch.readings.map(\.sequence), frame.calibrations.map(\.id)))
            }
            if frame.batch.readings.count > rules.maxReadings {
                return .error(413, IngestErrorCode.tooManyReadings, "more than \(rules.maxReadings) readings")
            }
            if !frame.calibrations.isEmpty && (rules.refuseEvents || frame.calibrations.contains { rules.refuseEventIDs.contains($0.id) }) {
                return .error(422, "invalid_calibration", "the calibration event cannot be stored")
            }
            if frame.version == 3 && rules.refuseVersion3 {
                return .error(415, IngestErrorCode.unsupportedFormatVersion, "format version 3 is not read here", acceptedVersions: [2])
            }
            return shared.log.withLock { log -> TestResponse in
                var accepted = 0
                var duplicates = 0
                for reading in frame.batch.readings {
                    if log.storedReadings.insert(reading.sequence).inserted { accepted += 1 } else { duplicates += 1 }
                }
                var receipt = IngestReceipt(accepted: accepted, duplicates: duplicates)
                var eventsAccepted = 0
                var eventsDuplicate = 0
                for event in frame.calibrations {
                    if log.storedEvents[event.id] == nil {
                        log.storedEvents[event.id] = 1
                        eventsAccepted += 1
                    } else {
                        log.eventDuplicates += 1
                        eventsDuplicate += 1
                    }
                }
                if !frame.calibrations.isEmpty && !rules.uncounted(index) {
                    receipt.calibrations = CalibrationReceipt(accepted: eventsAccepted, duplicates: eventsDuplicate)
                }
                return .receipt(receipt)
            }
        }
    }

    var url: String { server.url }
    var log: Log { shared.log.withLock { $0 } }

    /// What `GET /v1/device` says from now on (an ingest upgraded or rolled back while the agent runs).
    func setAcceptedVersions(_ versions: [Int]?) { shared.acceptedVersions.withLock { $0 = versions } }

    /// Whether binary frames are refused 415 from now on.
    func setRefuseBinary(_ refuse: Bool) { shared.refuseBinary.withLock { $0 = refuse } }
}

/// Calibration events travel in version 3 frames beside the readings, only to an ingest that reads version 3, and leave the
/// buffer only when a receipt counted them; whatever happens to them, readings flow as before.
@Suite("Uploader: calibration events go once, with the readings, to an ingest that reads them")
struct UploadCalibrationTests {
    static func event(_ n: Int) -> CalibrationEvent {
        CalibrationEvent(
            id: "cal-test-\(n)", sensor: constantSensorID("tank1.ph"), time: Timestamp(microseconds: Timestamp.now().microseconds - Int64(n)),
            circuit: "pH", firmware: "2.16",
            points: [.init(name: "mid", reference: 7, at: Timestamp(microseconds: Timestamp.now().microseconds - 60_000_000), reading: 7.02)],
            calibratedPoints: 1, slope: nil)
    }

    /// Readings keep arriving while the uploader runs, so that batches keep being cut.
    static func feed(_ data: TestBuffer, until done: @escaping @Sendable () async throws -> Bool) async throws -> Bool {
        try await eventually(timeout: .seconds(20)) {
            try await TestBuffer.append(count: 3, to: data.buffer)
            return try await done()
        }
    }

    @Test func eventsGoOnceInAVersion3FrameAndAreDeletedWhenTheReceiptCountsThem() async throws {
        let data = try await TestBuffer(count: 30)
        for n in 1...3 { try await data.buffer.recordCalibration(Self.event(n)) }
        #expect(try await data.statistics().pendingCalibrations == 3)
        let ingest = try EventIngest()
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(
                try await eventually {
                    let events = try await data.buffer.pendingCalibrationCount()
                    let pending = try await data.statistics().pending
                    return events == 0 && pending == 0
                })
            #expect(await eventually { uploader.status().calibrationsUploadedTotal == 3 })
            #expect(uploader.status().ingestAcceptedVersions == [2, 3])
            // Later batches carry no events and go as version 2.
            try await TestBuffer.append(count: 5, to: data.buffer)
            #expect(try await eventually { try await data.statistics().pending == 0 })
        }
        let log = ingest.log
        #expect(log.storedEvents == ["cal-test-1": 1, "cal-test-2": 1, "cal-test-3": 1])
        #expect(log.eventDuplicates == 0, "each event is sent once")
        let withEvents = log.frames.filter { !$0.events.isEmpty }
        #expect(withEvents.count == 1)
        #expect(withEvents.first?.version == 3)
        #expect(withEvents.first?.events == ["cal-test-1", "cal-test-2", "cal-test-3"])
        #expect(log.frames.filter { $0.events.isEmpty }.allSatisfy { $0.version == 2 })
        #expect(log.frames.count >= 2)
        #expect(log.storedReadings.count == 35)
        #expect(try await data.statistics().pendingCalibrations == 0)
    }

    @Test func moreEventsThanOneBatchCarriesGoInSeveralBatchesEachOnce() async throws {
        let data = try await TestBuffer(count: 10)
        for n in 1...(Uploader.maxEventsPerBatch + 3) { try await data.buffer.recordCalibration(Self.event(n)) }
        let ingest = try EventIngest()
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { _ throws in
            #expect(try await Self.feed(data) { try await data.buffer.pendingCalibrationCount() == 0 })
        }
        let log = ingest.log
        #expect(log.storedEvents.count == Uploader.maxEventsPerBatch + 3)
        #expect(log.storedEvents.values.allSatisfy { $0 == 1 })
        #expect(log.eventDuplicates == 0)
        #expect(log.frames.allSatisfy { $0.events.count <= Uploader.maxEventsPerBatch })
    }

    @Test func aReceiptThatDoesNotCountTheEventsKeepsThemAndTheyGoAgain() async throws {
        let data = try await TestBuffer(count: 20)
        try await data.buffer.recordCalibration(Self.event(1))
        // The first frame's receipt leaves calibrations out (an ingest that stored the readings but says nothing of events).
        let ingest = try EventIngest(EventIngest.Rules(uncounted: { $0 == 0 }))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(await eventually { ingest.log.frames.count >= 1 })
            // The ingest has the frame; its answer reaches the agent a moment later.
            #expect(try await eventually { try await data.statistics().pending == 0 }, "the readings of the batch are acknowledged as today")
            #expect(try await Self.feed(data) { try await data.buffer.pendingCalibrationCount() == 0 })
            #expect(await eventually { uploader.status().calibrationsUploadedTotal == 1 })
        }
        let log = ingest.log
        let carrying = log.frames.filter { $0.events == ["cal-test-1"] }
        #expect(carrying.count == 2, "sent again after a receipt that did not count it: \(log.frames.map(\.events))")
        #expect(carrying.allSatisfy { $0.version == 3 })
        #expect(log.eventDuplicates == 1, "the ingest had it already the second time")
        #expect(log.storedEvents == ["cal-test-1": 1])
    }

    @Test func anIngestThatDoesNotListVersion3GetsVersion2ReadingsAndTheEventsWait() async throws {
        let data = try await TestBuffer(count: 20)
        try await data.buffer.recordCalibration(Self.event(1))
        let ingest = try EventIngest(EventIngest.Rules(acceptedVersions: nil))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(try await Self.feed(data) { ingest.log.frames.count >= 3 })
            #expect(try await eventually { try await data.statistics().pending == 0 })
            #expect(uploader.status().ingestAcceptedVersions == [2])
            #expect(uploader.status().held == nil)
        }
        let log = ingest.log
        #expect(log.frames.allSatisfy { $0.version == 2 && $0.events.isEmpty })
        #expect(try await data.buffer.pendingCalibrationCount() == 1, "the event waits for an ingest that reads it")
        #expect(try await data.statistics().quarantined == 0)
    }

    @Test func a415ToVersion3ResendsTheReadingsAsVersion2AtOnceAndKeepsTheEvents() async throws {
        let data = try await TestBuffer(count: 20)
        try await data.buffer.recordCalibration(Self.event(1))
        // It says it reads 3 but refuses it (a proxy, a rolled-back ingest behind one name).
        let ingest = try EventIngest(EventIngest.Rules(refuseVersion3: true))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(try await Self.feed(data) { ingest.log.frames.count >= 4 })
            #expect(try await eventually { try await data.statistics().pending == 0 })
            let status = uploader.status()
            #expect(status.held == nil)
            #expect(status.format == UploadConfiguration.Format.binary.rawValue, "no fallback to JSON: version 2 is read")
            #expect(status.formatFallback == nil)
            #expect(status.quarantinedTotal == 0)
        }
        let log = ingest.log
        #expect(log.frames.first?.version == 3)
        #expect(log.frames.first?.events == ["cal-test-1"])
        // The same readings went again at once as version 2, and no later frame carried events.
        #expect(log.frames.count >= 2)
        if log.frames.count >= 2 {
            #expect(log.frames[1].version == 2)
            #expect(log.frames[1].sequences == log.frames[0].sequences)
        }
        #expect(log.frames.dropFirst().allSatisfy { $0.version == 2 && $0.events.isEmpty })
        #expect(log.storedEvents.isEmpty)
        #expect(try await data.buffer.pendingCalibrationCount() == 1)
        #expect(try await data.statistics().quarantined == 0)
    }

    @Test func inJSONEventsGoInTheCalibrationsMemberOnceAndAreDeletedWhenTheReceiptCountsThem() async throws {
        let data = try await TestBuffer(count: 10)
        try await data.buffer.recordCalibration(Self.event(1))
        try await data.buffer.recordCalibration(Self.event(2))
        let ingest = try EventIngest()
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, format: .json)) { uploader throws in
            #expect(try await Self.feed(data) { try await data.buffer.pendingCalibrationCount() == 0 })
            #expect(await eventually { uploader.status().calibrationsUploadedTotal == 2 })
        }
        let log = ingest.log
        #expect(log.frames.allSatisfy { $0.version == 0 }, "every batch went as JSON")
        #expect(log.storedEvents == ["cal-test-1": 1, "cal-test-2": 1])
        #expect(log.eventDuplicates == 0)
        #expect(log.frames.filter { !$0.events.isEmpty }.map(\.events) == [["cal-test-1", "cal-test-2"]])
    }

    @Test func inJSONEventsWaitForAnIngestThatDoesNotListVersion3() async throws {
        let data = try await TestBuffer(count: 10)
        try await data.buffer.recordCalibration(Self.event(1))
        let ingest = try EventIngest(EventIngest.Rules(acceptedVersions: [2]))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, format: .json)) { _ throws in
            #expect(try await Self.feed(data) { ingest.log.frames.count >= 3 })
        }
        #expect(ingest.log.frames.allSatisfy { $0.version == 0 && $0.events.isEmpty })
        #expect(try await data.buffer.pendingCalibrationCount() == 1)
    }

    @Test func aBatchHalvedForSizeCarriesItsEventsOnOneHalfOnly() async throws {
        let data = try await TestBuffer(count: 3000, value: { i in Double((i * 7919) % 10007) / 13 })
        try await data.buffer.recordCalibration(Self.event(1))
        let ingest = try EventIngest()
        // Small enough that 3000 readings are halved before they fit, large enough for an event and a few hundred readings.
        let configuration = uploadConfiguration(ingest.url, batchMaxReadings: 3000, batchMaxBytes: 3000)
        try await withUploader(source: data.buffer, configuration: configuration) { _ throws in
            #expect(
                try await eventually {
                    let events = try await data.buffer.pendingCalibrationCount()
                    let pending = try await data.statistics().pending
                    return events == 0 && pending == 0
                })
        }
        let log = ingest.log
        #expect(log.frames.count > 1, "the batch was halved: \(log.frames.map(\.sequences.count))")
        #expect(log.frames.filter { !$0.events.isEmpty }.count == 1)
        #expect(log.storedEvents == ["cal-test-1": 1])
        #expect(log.storedReadings.count == 3000)
        // Halving went by the readings, not down to single readings because of the event.
        #expect(log.frames.allSatisfy { $0.sequences.count >= 100 }, "\(log.frames.map(\.sequences.count))")
    }

    @Test func aBatchRefused413IsHalvedAndItsEventsGoWithOneHalfOnly() async throws {
        let data = try await TestBuffer(count: 80)
        try await data.buffer.recordCalibration(Self.event(1))
        try await data.buffer.recordCalibration(Self.event(2))
        let ingest = try EventIngest(EventIngest.Rules(maxReadings: 20))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url, batchMaxReadings: 80)) { uploader throws in
            #expect(
                try await eventually {
                    let events = try await data.buffer.pendingCalibrationCount()
                    let pending = try await data.statistics().pending
                    return events == 0 && pending == 0
                })
            #expect(uploader.status().held == nil)
        }
        let log = ingest.log
        #expect(log.frames.first?.sequences.count == 80, "the whole batch was tried first")
        #expect(log.frames.first?.events == ["cal-test-1", "cal-test-2"])
        // After the refusal the events went once more, on the first half that was accepted, and never again.
        let accepted = log.frames.filter { $0.sequences.count <= 20 }
        #expect(accepted.filter { !$0.events.isEmpty }.count == 1, "\(log.frames.map { "\($0.sequences.count)/\($0.events.count)" })")
        #expect(log.storedEvents == ["cal-test-1": 1, "cal-test-2": 1])
        #expect(log.eventDuplicates == 0)
        #expect(log.storedReadings.count == 80)
        #expect(try await data.statistics().quarantined == 0)
    }

    @Test func anEventRefused422WhileItsReadingsAloneAreAcceptedIsQuarantinedAndNeverSentAgain() async throws {
        let data = try await TestBuffer(count: 40)
        try await data.buffer.recordCalibration(Self.event(1))
        let ingest = try EventIngest(EventIngest.Rules(refuseEvents: true))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(try await Self.feed(data) { ingest.log.frames.count >= 4 })
            #expect(try await eventually { try await data.statistics().pending == 0 })
            #expect(uploader.status().held == nil)
            #expect(uploader.status().quarantinedTotal == 0, "no reading pays for the event")
            #expect(uploader.status().calibrationsQuarantinedTotal == 1)
        }
        let log = ingest.log
        #expect(log.frames.first?.events == ["cal-test-1"])
        if log.frames.count >= 2 {
            #expect(log.frames[1].sequences == log.frames[0].sequences, "the same readings went again at once")
            #expect(log.frames[1].events.isEmpty)
        }
        #expect(log.frames.filter { !$0.events.isEmpty }.count == 1, "never sent again")
        let statistics = try await data.statistics()
        #expect(statistics.quarantined == 0)
        #expect(statistics.pendingCalibrations == 0)
        #expect(statistics.quarantinedCalibrations == 1)
        let quarantined = try await data.buffer.quarantinedCalibrations()
        #expect(quarantined.first?.event.id == "cal-test-1")
        #expect(quarantined.first?.code == "invalid_calibration")
        #expect(quarantined.first?.message == "the calibration event cannot be stored")
        #expect(try await data.buffer.quarantinedCalibrations(code: "malformed_batch").isEmpty)
    }

    @Test func oneBadEventAmongSeveralIsFoundAndQuarantinedAndTheOthersAreDeliveredOnce() async throws {
        let data = try await TestBuffer(count: 40)
        for n in 1...4 { try await data.buffer.recordCalibration(Self.event(n)) }
        let ingest = try EventIngest(EventIngest.Rules(refuseEventIDs: ["cal-test-3"]))
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(
                try await Self.feed(data) {
                    let quarantined = try await data.statistics().quarantinedCalibrations
                    let pending = try await data.buffer.pendingCalibrationCount()
                    return quarantined == 1 && pending == 0
                })
            #expect(uploader.status().held == nil)
            #expect(uploader.status().quarantinedTotal == 0)
        }
        let log = ingest.log
        #expect(log.storedEvents == ["cal-test-1": 1, "cal-test-2": 1, "cal-test-4": 1])
        #expect(log.eventDuplicates == 0)
        #expect(try await data.buffer.quarantinedCalibrations().map(\.event.id) == ["cal-test-3"])
        // Together once, then one per batch: the bad one was refused twice in all (with the others, then alone).
        #expect(log.frames.filter { $0.events.contains("cal-test-3") }.count == 2, "\(log.frames.map(\.events))")
        #expect(try await data.statistics().quarantined == 0)
    }

    @Test func eventsAreNotBlamedWhenTheirReadingsAreRefusedAloneToo() async throws {
        let data = try await TestBuffer(count: 40)
        try await data.buffer.recordCalibration(Self.event(1))
        // Every batch is refused 422: the readings (or the ingest) are at fault, not the event.
        let ingest = try TestHTTPServer { request, _ in
            if request.method == "GET" {
                let body = (try? JSONEncoder().encode(DeviceState(device: testDevice.rawValue, highestSequence: nil, acceptedVersions: [2, 3]))).map { Array($0) } ?? []
                return .reply(200, headers: ["Content-Type": "application/json"], body: body)
            }
            return .error(422, "invalid_reading", "nothing is taken today")
        }
        try await withUploader(source: data.buffer, configuration: uploadConfiguration(ingest.url)) { uploader throws in
            #expect(await eventually { uploader.status().held != nil })
        }
        let statistics = try await data.statistics()
        #expect(statistics.quarantinedCalibrations == 0)
        #expect(statistics.pendingCalibrations == 1)
    }
}
