@testable import FarmgateAgent
import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Testing

/// What `farmgate doctor` takes from the running agent beyond its buffer's depth: failed buffer writes and a metrics
/// file it no longer rewrites (found by a black-box tester: with the disk full, doctor called both ok).
@Suite("Doctor: the running agent's failures")
struct DoctorLiveFindingsTests {
    let now = Timestamp(microseconds: 1_767_225_600_000_000)

    func status(startedSecondsAgo: Int64, errors: BufferErrors? = nil) -> AgentStatus {
        var status = TextfileMetricsTests.status()
        status.startedAt = Timestamp(microseconds: now.microseconds - startedSecondsAgo * 1_000_000)
        status.now = now
        status.buffer.errors = errors
        return status
    }

    // A tester, 2026-12-07: 47 MiB free of a 182 MiB data partition, an 8 MiB quota, was "almost full" (exit 1).
    @Test("almost full is under 64 MiB free, or under a tenth of a file system smaller than 640 MiB")
    func almostFull() {
        let mib: Int64 = 1 << 20
        #expect(Doctor.almostFull(free: 50 * mib, size: 32_000 * mib))
        #expect(!Doctor.almostFull(free: 70 * mib, size: 32_000 * mib))
        #expect(!Doctor.almostFull(free: 47 * mib, size: 182 * mib))
        #expect(Doctor.almostFull(free: 17 * mib, size: 182 * mib))
        #expect(!Doctor.almostFull(free: 2 * mib + mib / 2, size: 3 * mib))
        #expect(Doctor.almostFull(free: 0, size: 3 * mib))
    }

    @Test("a buffer write that failed within the hour is a problem naming the operation, its message and the counts; older or none is not")
    func bufferFailures() {
        let failure = { (secondsAgo: Int64) in
            BufferErrors(
                commit: 23, acknowledge: 2,
                last: BufferFailure(operation: "commit", message: "database or disk is full", at: Timestamp(microseconds: now.microseconds - secondsAgo * 1_000_000)))
        }
        let recent = Doctor.bufferFailureFinding(path: "/var/lib/farmgate/buffer.sqlite", errors: failure(600), now: now)
        #expect(recent?.status == .problem)
        #expect(recent?.message.contains("commit failed 10 min ago: database or disk is full") == true, "\(recent?.message ?? "")")
        #expect(recent?.message.contains("23 commit and 2 acknowledge failures") == true)
        #expect(recent?.fix?.contains("df -h /var/lib/farmgate") == true)
        #expect(Doctor.bufferFailureFinding(path: "/b", errors: failure(7_200), now: now) == nil)
        #expect(Doctor.bufferFailureFinding(path: "/b", errors: BufferErrors(), now: now) == nil)
        #expect(Doctor.bufferFailureFinding(path: "/b", errors: nil, now: now) == nil)
    }

    @Test("a metrics file the running agent has not rewritten for over twice its interval is a warning; a fresh one, a young agent or none running is not")
    func staleMetrics() throws {
        let scratch = try Scratch(prefix: "fg-doctor")
        let path = scratch.file("farmgate.prom")
        let metrics = MetricsFileConfiguration(path: path, interval: .seconds(15))
        // Missing while the agent runs long enough to have written it.
        let missing = Doctor.metricsFreshnessFinding(metrics, status: status(startedSecondsAgo: 600), now: now)
        #expect(missing?.status == .warning)
        #expect(missing?.message.contains("has not written this file") == true, "\(missing?.message ?? "")")
        #expect(FileManager.default.createFile(atPath: path, contents: Data("x 1\n".utf8)))
        func touch(secondsAgo: Int64) {
            let seconds = now.microseconds / 1_000_000 - secondsAgo
            var times = [timespec(tv_sec: Int(seconds), tv_nsec: 0), timespec(tv_sec: Int(seconds), tv_nsec: 0)]
            #expect(utimensat(AT_FDCWD, path, &times, 0) == 0)
        }
        touch(secondsAgo: 27)
        #expect(Doctor.metricsFreshnessFinding(metrics, status: status(startedSecondsAgo: 600), now: now) == nil)
        touch(secondsAgo: 41)
        let stale = Doctor.metricsFreshnessFinding(metrics, status: status(startedSecondsAgo: 600), now: now)
        #expect(stale?.status == .warning)
        #expect(stale?.message.contains("not rewritten for 41 s (every 15 s expected)") == true, "\(stale?.message ?? "")")
        // An agent that started 30 s ago may not have written yet; without an agent nothing rewrites the file.
        #expect(Doctor.metricsFreshnessFinding(metrics, status: status(startedSecondsAgo: 30), now: now) == nil)
        #expect(Doctor.metricsFreshnessFinding(metrics, status: nil, now: now) == nil)
        #expect(Doctor.metricsFreshnessFinding(nil, status: status(startedSecondsAgo: 600), now: now) == nil)
    }

    // Found by a black-box tester: doctor said "No problem found" while `farmgate status` showed an RTD reading -1023
    // and an ORP circuit not answering, every read.
    @Test("a sensor whose last read failed is a warning naming it, its error and failures in a row; a problem after 10 intervals without a reading; the rest one ok line")
    func failingSensors() throws {
        var agent = status(startedSecondsAgo: 600)
        func sensor(_ id: String, errors: Int, lastReadSecondsAgo: Int64?, error: String? = nil) -> SensorStatus {
            SensorStatus(
                id: id, driver: "ezo", quantity: "temperature", unit: "°C", resolution: "1/100", intervalSeconds: 2, lastValue: 21,
                lastReadAt: lastReadSecondsAgo.map { Timestamp(microseconds: now.microseconds - $0 * 1_000_000) },
                lastError: error, lastErrorAt: error == nil ? nil : Timestamp(microseconds: now.microseconds - 1_000_000),
                consecutiveErrors: errors, readsOK: lastReadSecondsAgo == nil ? 0 : 10, readsFailed: Int64(errors), suppressed: 0)
        }
        let rtd = "fault: the EZO RTD circuit on /dev/ttyUSB0 reads -1023: no probe connected; check the PT-100/PT-1000 probe's wires"
        let orp = "timeout: no answer to *OK,? from the EZO circuit on /dev/ttyUSB1 within 1.5s: check its power"
        agent.sensors = [
            sensor("t.temp", errors: 3, lastReadSecondsAgo: 6, error: rtd),
            sensor("t.orp", errors: 2, lastReadSecondsAgo: nil, error: orp),
            sensor("t.ph", errors: 0, lastReadSecondsAgo: 1),
            sensor("t.ec", errors: 0, lastReadSecondsAgo: 1),
        ]
        let findings = Doctor.sensorFindings(status: agent)
        #expect(findings.count == 3, "\(findings)")
        let temp = try #require(findings.first { $0.subject == "t.temp" })
        #expect(temp.check == "sensor" && temp.status == .warning, "3 of its 2 s intervals without a reading: a warning")
        #expect(temp.message.contains("3 in a row") && temp.message.contains(rtd), "\(temp.message)")
        #expect(temp.fix?.contains("farmgate sensor read t.temp") == true)
        // Never read since the configuration was loaded 10 min ago, every 2 s: a problem.
        let orpFinding = try #require(findings.first { $0.subject == "t.orp" })
        #expect(orpFinding.status == .problem)
        #expect(orpFinding.message.contains("2 in a row") && orpFinding.message.contains(orp) && orpFinding.message.contains("no reading since"), "\(orpFinding.message)")
        let rest = try #require(findings.last)
        #expect(rest.status == .ok && rest.message == "the other 2 sensors read without error", "\(rest.message)")
        #expect(!DoctorReport(configuration: "c", device: "t", user: "u", findings: findings).ok)

        // The same sensor silent for 10 of its intervals is a problem.
        agent.sensors = [sensor("t.temp", errors: 10, lastReadSecondsAgo: 20, error: rtd)]
        #expect(Doctor.sensorFindings(status: agent).map(\.status) == [.problem])
        // Every sensor fine: one ok line; no agent: skipped, with why.
        agent.sensors = [sensor("t.ph", errors: 0, lastReadSecondsAgo: 1), sensor("t.ec", errors: 0, lastReadSecondsAgo: nil)]
        let fine = Doctor.sensorFindings(status: agent)
        #expect(fine.count == 1 && fine.first?.status == .ok && fine.first?.message == "2 sensors read without error (1 waiting for a first read)", "\(fine)")
        let none = Doctor.sensorFindings(status: nil)
        #expect(none.count == 1 && none.first?.status == .skipped && none.first?.message.contains("the agent does not answer") == true)
    }
}
