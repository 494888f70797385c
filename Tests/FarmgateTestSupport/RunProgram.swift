import FarmgateSupport
import Foundation

/// Which of a program's output streams ``runProgram(_:_:capturing:)`` returns.
public enum CapturedOutput: Sendable {
    /// Standard output and standard error, interleaved as written.
    case both
    /// Standard output; standard error goes where the test's goes.
    case standardOutput
    /// Standard error; standard output is thrown away.
    case standardError
}

/// Runs `executable` with `arguments` to its end and returns its exit status and what it printed on `capturing`.
/// Spawned, read and waited for on a thread of its own, never on the concurrency pool, so other tests keep running
/// on time.
public func runProgram(_ executable: String, _ arguments: [String], capturing: CapturedOutput = .both) async throws -> (status: Int32, output: String) {
    try await runOffPool(name: "test-program") {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let pipe = Pipe()
        switch capturing {
        case .both:
            process.standardOutput = pipe
            process.standardError = pipe
        case .standardOutput:
            process.standardOutput = pipe
        case .standardError:
            process.standardError = pipe
            process.standardOutput = FileHandle.nullDevice
        }
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
