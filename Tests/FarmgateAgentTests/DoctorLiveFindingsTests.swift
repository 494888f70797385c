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
}
