import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import Testing

@testable import FarmgateAgent

@Suite("ReadingBuffer crash safety")
struct BufferCrashTests {
    /// Runs `farmgate debug buffer-writer` on one file and SIGKILLs it at a random moment, several times over. Every sequence
    /// number the child reported as committed must be in the file, the sequence numbers must be exactly 1...N, and the file
    /// must pass quick_check.
    @Test("readings reported committed survive SIGKILL at random moments")
    func sigkillAtRandomMoments() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let path = scratch.file("site/buffer.sqlite")
        let binary = builtExecutable("farmgate", environmentOverride: "FARMGATE_BINARY")
        #expect(FileManager.default.isExecutableFile(atPath: binary), "farmgate binary at \(binary)")
        var reported: [UInt64] = []
        var rounds: [(lifetime: Int, lines: Int)] = []
        for round in 0..<7 {
            let output = scratch.file("writer-\(round).out")
            let errors = scratch.file("writer-\(round).err")
            #expect(FileManager.default.createFile(atPath: output, contents: nil))
            #expect(FileManager.default.createFile(atPath: errors, contents: nil))
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = [
                "debug", "buffer-writer", "--path", path, "--sensors", "12", "--rate", "5000", "--commit-interval-ms", "20",
            ]
            process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
            process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errors))
            try process.run()
            let lifetime = Int.random(in: 200...1_500)
            try await Task.sleep(for: .milliseconds(lifetime))
            #expect(process.isRunning, "the writer died by itself: \((try? String(contentsOfFile: errors, encoding: .utf8)) ?? "")")
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            #expect(process.terminationReason == .uncaughtSignal)
            #expect(process.terminationStatus == SIGKILL)

            let text = try String(contentsOfFile: output, encoding: .utf8)
            let lines = text.split(separator: "\n")
            let sequences = lines.compactMap { UInt64($0) }
            #expect(sequences.count == lines.count, "every line is a whole sequence number: \(text.suffix(200))")
            #expect(sequences == sequences.sorted(), "committed sequence numbers only grow")
            if let last = reported.last, let first = sequences.first { #expect(first >= last, "no sequence goes backwards after a kill") }
            reported += sequences
            rounds.append((lifetime, sequences.count))
        }
        let highest = try #require(reported.max(), "the writer committed nothing in \(rounds)")

        let buffer = try ReadingBuffer(
            configuration: BufferConfiguration(path: path), logger: Logger(label: "test") { _ in SwiftLogNoOpLogHandler() })
        #expect(try await buffer.integrityProblems().isEmpty)
        let sequences = try await buffer.pending(limit: 10_000_000, from: .oldest).map(\.sequence)
        let count = UInt64(sequences.count)
        #expect(count >= highest, "every reported commit is present (highest reported \(highest), stored \(count))")
        #expect(sequences.first == 1)
        #expect(sequences == Array(1...max(1, count)), "one gap-free range from 1")
        let statistics = try await buffer.statistics()
        #expect(statistics.lastSequence == count)
        #expect(statistics.duplicatesIgnored == 0)
        try await buffer.close()

        // And SQLite itself, opened independently, agrees that the file is healthy.
        let connection = try SQLiteConnection(path: path, mode: .readOnly)
        #expect(try connection.integrityProblems(quick: true).isEmpty)
    }
    // A tester, 2026-12-07: the writer run beside a running agent committed into its buffer, and the agent then took
    // every new reading for a duplicate.
    @Test("the buffer writer takes the agent's buffer locks: a second one on the same file is refused, and writes nothing")
    func writerTakesTheBufferLock() async throws {
        let scratch = try Scratch(prefix: "fg-buffer")
        let path = scratch.file("site/buffer.sqlite")
        let binary = builtExecutable("farmgate", environmentOverride: "FARMGATE_BINARY")
        let first = Process()
        first.executableURL = URL(fileURLWithPath: binary)
        first.arguments = ["debug", "buffer-writer", "--path", path, "--sensors", "2", "--rate", "100"]
        first.standardOutput = FileHandle.nullDevice
        first.standardError = FileHandle.nullDevice
        try first.run()
        defer { kill(first.processIdentifier, SIGKILL) }
        #expect(await eventually(timeout: .seconds(20)) { FileManager.default.fileExists(atPath: path + ".lock") })
        try await Task.sleep(for: .milliseconds(500))
        let second = try await runOffPool { () throws -> (status: Int32, stdout: String, stderr: String) in
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["debug", "buffer-writer", "--path", path, "--sensors", "2", "--rate", "100"]
            let out = Pipe()
            let err = Pipe()
            process.standardOutput = out
            process.standardError = err
            try process.run()
            // A writer that is not refused runs until killed: end it, so that the test fails rather than hangs.
            let pid = process.processIdentifier
            DispatchQueue.global().asyncAfter(deadline: .now() + 15) { kill(pid, SIGKILL) }
            let stdout = out.fileHandleForReading.readDataToEndOfFile()
            let stderr = err.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            return (process.terminationStatus, String(decoding: stdout, as: UTF8.self), String(decoding: stderr, as: UTF8.self))
        }
        #expect(second.status != 0, "\(second.stdout)\(second.stderr)")
        #expect(second.stderr.contains("another farmgate agent is running on the buffer"), "\(second.stderr)")
        #expect(second.stdout.isEmpty, "the second writer committed: \(second.stdout.prefix(200))")
    }
}
