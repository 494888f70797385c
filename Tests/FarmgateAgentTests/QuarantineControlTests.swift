import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

@testable import FarmgateAgent

/// The quarantine commands through the real control socket, against a real buffer file.
@Suite("Quarantine over the control socket")
struct QuarantineControlTests {
    let quiet = Logger(label: "test.quarantine.control") { _ in SwiftLogNoOpLogHandler() }

    /// A buffer with `count` quarantined pH readings (every third `unknown_sensor`, the others `timestamp_in_future`) and a
    /// control server answering quarantine commands for it.
    final class Site {
        let scratch: Scratch
        let buffer: ReadingBuffer
        let socket: String
        let server: Task<Void, any Error>
        let sequences: [UInt64]

        init(count: Int, logger: Logger) async throws {
            scratch = try Scratch(prefix: "fg-qc", in: URL(fileURLWithPath: "/tmp"))
            let path = scratch.file("buffer.sqlite")
            let buffer = try await runOffPool { try ReadingBuffer(configuration: BufferConfiguration(path: path), logger: logger) }
            self.buffer = buffer
            let ph = try SensorID("tank1.ph")
            try await buffer.register([SensorDescriptor(id: ph, quantity: .ph)])
            let base = Timestamp.now().microseconds - 3_600_000_000
            try await buffer.append((0..<count).map { Sample(sensor: ph, timestamp: Timestamp(microseconds: base + Int64($0) * 1_000_000), value: 6.075) })
            let last = try await buffer.flush()
            sequences = Array((last - UInt64(count) + 1)...last)
            var reasons: [UInt64: String] = [:]
            for (index, sequence) in sequences.enumerated() {
                reasons[sequence] = index % 3 == 0 ? "unknown_sensor: not declared" : "timestamp_in_future: 2 days ahead"
            }
            try await buffer.quarantine(reasons)
            socket = scratch.file("control.sock")
            let commands = QuarantineCommands(buffer: buffer)
            let control = ControlServer(path: socket, logger: logger) { request in ControlServer.encode(await commands.answer(request)) }
            server = Task { try await control.run() }
            let socket = self.socket
            let up = await eventually(timeout: .seconds(60)) { (try? await Self.send(ControlRequest(command: "quarantine.list"), socket)) != nil }
            #expect(up)
        }

        static func send(_ request: ControlRequest, _ socket: String) async throws -> ControlAnswer {
            let bytes = try await runOffPool { try ControlClient.send(request, to: socket) }
            return try JSONDecoder().decode(ControlAnswer.self, from: Data(bytes))
        }

        func send(_ command: String, _ arguments: [String: String]? = nil) async throws -> ControlAnswer {
            try await Self.send(ControlRequest(command: command, arguments: arguments), socket)
        }

        func stop() async throws {
            server.cancel()
            _ = try? await server.value
            try await buffer.close()
        }
    }

    @Test("list pages through 2,500 quarantined readings by sequence; by code; values at the sensor's resolution")
    func listPages() async throws {
        let site = try await Site(count: 2_500, logger: quiet)
        var seen: [UInt64] = []
        var after: UInt64 = 0
        var pages = 0
        while true {
            let answer = try await site.send("quarantine.list", ["after": String(after)])
            #expect(answer.ok, "\(String(describing: answer.error))")
            let readings = answer.quarantine?.readings ?? []
            #expect(readings.count <= 1_000)
            seen += readings.map(\.sequence)
            pages += 1
            guard let next = answer.quarantine?.nextAfter else { break }
            after = next
        }
        #expect(seen == site.sequences)
        #expect(pages == 3)
        let unknown = try await site.send("quarantine.list", ["code": "unknown_sensor", "limit": "1000"])
        #expect(unknown.quarantine?.readings?.count == 834)
        #expect(unknown.quarantine?.readings?.first?.value == 6.08)
        #expect(unknown.quarantine?.readings?.first?.message == "not declared")
        #expect(unknown.quarantine?.nextAfter == nil)
        try await site.stop()
    }

    @Test("a calibration event refused for good is listed on the first page with its code, filtered by code, and counted in status")
    func calibrationEvents() async throws {
        let site = try await Site(count: 3, logger: quiet)
        let event = CalibrationEvent(
            id: "cal-q-1", sensor: try SensorID("tank1.ph"), time: Timestamp(microseconds: 1_790_000_000_000_000), circuit: "pH", firmware: "2.16",
            points: [.init(name: "mid", reference: 7, at: Timestamp(microseconds: 1_789_999_000_000_000), reading: 7.01)], calibratedPoints: 1,
            slope: nil)
        try await site.buffer.recordCalibration(event)
        try await site.buffer.quarantineCalibrations(["cal-q-1": "malformed_batch: calibration event 1: event cal-q-1 has 0 points"])
        let first = try await site.send("quarantine.list")
        #expect(first.quarantine?.calibrations?.map(\.event) == [event])
        #expect(first.quarantine?.calibrations?.first?.code == "malformed_batch")
        #expect(first.quarantine?.calibrations?.first?.message == "calibration event 1: event cal-q-1 has 0 points")
        #expect(try await site.send("quarantine.list", ["code": "unknown_sensor"]).quarantine?.calibrations?.isEmpty == true)
        #expect(try await site.send("quarantine.list", ["after": "1"]).quarantine?.calibrations == nil, "only on the first page")
        let statistics = try await site.buffer.statistics()
        #expect(statistics.quarantinedCalibrations == 1 && statistics.pendingCalibrations == 0)
        #expect(try await site.buffer.pendingCalibrations(limit: 8).isEmpty, "never sent again")
        let status = AgentStatus(
            device: "site", version: "test", pid: 1, startedAt: Timestamp(microseconds: 0), now: Timestamp(microseconds: 2_000_000),
            clockSynchronized: true, buffer: statistics, upload: nil, uploadEndpoint: nil, sensors: [], recentQuarantine: [])
        #expect(status.humanReadable().contains("1 calibration event refused for good (farmgate quarantine list)"), "\(status.humanReadable())")

        // Requeue by code sends it again (sequences select readings only); drop all deletes it for good.
        #expect(try await site.send("quarantine.requeue", ["sequences": String(site.sequences[0])]).quarantine?.requeue?.calibrations == nil)
        #expect(try await site.send("quarantine.requeue", ["code": "unknown_sensor"]).quarantine?.requeue?.calibrations == nil)
        #expect(try await site.send("quarantine.requeue", ["code": "malformed_batch"]).quarantine?.requeue?.calibrations == 1)
        #expect(try await site.buffer.pendingCalibrations(limit: 8) == [event])
        try await site.buffer.quarantineCalibrations(["cal-q-1": "malformed_batch: again"])
        #expect(try await site.send("quarantine.drop", ["all": "true"]).quarantine?.drop?.calibrations == 1)
        #expect(try await site.buffer.quarantinedCalibrations().isEmpty)
        #expect(try await site.buffer.pendingCalibrations(limit: 8).isEmpty)
        try await site.stop()
    }

    @Test("requeue and drop by code and by sequence; status counts follow")
    func requeueAndDrop() async throws {
        let site = try await Site(count: 9, logger: quiet)
        let requeued = try await site.send("quarantine.requeue", ["code": "timestamp_in_future"])
        #expect(requeued.ok)
        #expect(requeued.quarantine?.requeue == RequeueOutcome(requeued: 6, conflicting: [], notFound: []))
        let pending = try await site.buffer.pending(limit: 100, from: .oldest).map(\.sequence)
        #expect(pending == site.sequences.enumerated().filter { $0.offset % 3 != 0 }.map(\.element))

        let dropped = try await site.send("quarantine.drop", ["sequences": "\(site.sequences[0]),\(site.sequences[3]),99999"])
        #expect(dropped.quarantine?.drop == DropOutcome(dropped: 2, notFound: [99999]))
        let statistics = try await site.buffer.statistics()
        #expect(statistics.quarantined == 1 && statistics.quarantinedByCode == ["unknown_sensor": 1] && statistics.quarantineDropped == 2)
        let rest = try await site.send("quarantine.drop", ["all": "true"])
        #expect(rest.quarantine?.drop?.dropped == 1)
        try await site.stop()
    }

    @Test(
        "Bad arguments get an error naming what was wrong, and change nothing",
        arguments: [
            ("quarantine.requeue", [:], "exactly one of all, code or sequences"),
            ("quarantine.drop", ["all": "true", "code": "x"], "exactly one of all, code or sequences"),
            ("quarantine.drop", ["all": "yes"], "all must be \"true\""),
            ("quarantine.requeue", ["code": "Not-A-Code"], "code must be a reason code"),
            ("quarantine.requeue", ["sequences": "1,x"], "\"x\" is not one"),
            ("quarantine.drop", ["sequences": "0"], "\"0\" is not one"),
            ("quarantine.list", ["limit": "5000"], "limit must be 1 to 1000"),
            ("quarantine.list", ["after": "-1"], "after must be a sequence number"),
        ] as [(String, [String: String], String)])
    func badArguments(command: String, arguments: [String: String], expected: String) async throws {
        let site = try await Site(count: 3, logger: quiet)
        let answer = try await site.send(command, arguments)
        #expect(!answer.ok)
        #expect(answer.error?.contains(expected) == true, "\(String(describing: answer.error))")
        #expect(try await site.buffer.statistics().quarantined == 3)
        try await site.stop()
    }
}
