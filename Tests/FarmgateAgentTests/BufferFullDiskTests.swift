import FarmgateSupport
import FarmgateTestSupport
import FarmgateWire
import Foundation
import Logging
import ServiceLifecycle
import Testing

@testable import FarmgateAgent

/// The buffer on a file system that is really full (a small tmpfs, not `max_page_count`): the WAL cannot grow, so
/// without the reserve no delete could run and nothing acknowledged could ever make room.
@Suite("Buffer on a really full file system")
struct BufferFullDiskTests {
    /// A tmpfs of `size` mounted at a new directory for `body`, unmounted afterwards. Needs root (CI runs as root);
    /// fails, never skips, without it.
    static func withSmallFileSystem<T>(size: String, _ body: (String) async throws -> T) async throws -> T {
        let scratch = try Scratch(prefix: "fg-fullfs")
        let mountPoint = scratch.file("fs")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let mounted = try runTool("/bin/mount", ["-t", "tmpfs", "-o", "size=\(size),mode=0700", "tmpfs", mountPoint])
        guard mounted.status == 0 else {
            throw TestFileSystemUnavailable(description: "cannot mount a tmpfs at \(mountPoint) (\(mounted.output)): this test needs root, as CI runs")
        }
        defer { _ = try? runTool("/bin/umount", ["-l", mountPoint]) }
        return try await body(mountPoint)
    }

    struct TestFileSystemUnavailable: Error, CustomStringConvertible {
        var description: String
    }

    static func runTool(_ path: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    static let logger = Logger(label: "test.buffer.fullfs") { _ in SwiftLogNoOpLogHandler() }

    /// A buffer in `directory` committing only when flushed, with sensor `tank1.ph` registered.
    static func openBuffer(in directory: String, whenFull: BufferFullPolicy) async throws -> (ReadingBuffer, BufferConfiguration, SensorID) {
        let configuration = BufferConfiguration(
            path: directory + "/buffer.sqlite", commitInterval: .seconds(3_600), quotaBytes: 512 << 20, whenFull: whenFull)
        let buffer = try ReadingBuffer(configuration: configuration, logger: logger)
        let sensor = try SensorID("tank1.ph")
        try await buffer.register([SensorDescriptor(id: sensor, quantity: .ph)])
        return (buffer, configuration, sensor)
    }

    /// Something else fills the file system at `directory`: a file written until a write fails. Returns its path.
    static func fillUp(_ directory: String) throws -> String {
        let filler = directory + "/filler"
        #expect(FileManager.default.createFile(atPath: filler, contents: nil))
        let handle = try #require(FileHandle(forWritingAtPath: filler))
        let block = Data(repeating: 7, count: 64 << 10)
        while (try? handle.write(contentsOf: block)) != nil {}
        try? handle.close()
        return filler
    }

    @Test("a full file system: acknowledged readings are still deleted (the reserve), and the samples waiting commit after")
    func acknowledgementsMakeRoom() async throws {
        try await Self.withSmallFileSystem(size: "16m") { directory in
            let path = directory + "/buffer.sqlite"
            let buffer = try ReadingBuffer(
                configuration: BufferConfiguration(path: path, commitInterval: .seconds(1), quotaBytes: 512 << 20, whenFull: .dropNewest),
                logger: Self.logger)
            let sensor = try SensorID("tank1.ph")
            try await buffer.register([SensorDescriptor(id: sensor, quantity: .ph)])
            let reserve = path + ".reserve"
            #expect(FileManager.default.fileExists(atPath: reserve), "the reserve is made at open")
            // Fill the file system: commits of 5,000 samples until one fails for want of space.
            var next = 0
            var committed: UInt64 = 0
            var full = false
            while !full, next < 2_000_000 {
                let samples = (next..<next + 5_000).map {
                    Sample(sensor: sensor, timestamp: Timestamp(microseconds: Int64($0) * 1_000_000), value: 6 + Double($0 % 100) / 100)
                }
                next += 5_000
                try await buffer.append(samples)
                do {
                    committed = try await buffer.flush()
                } catch {
                    #expect((error as? SQLiteError)?.isDiskFull == true, "\(error)")
                    full = true
                }
            }
            #expect(full, "the file system never filled")
            #expect(committed > 0)
            let waiting = try await buffer.statistics().uncommitted
            #expect(waiting > 0)
            // The ingest acknowledges everything stored: the deletes must run although the disk is full.
            let pending = try await buffer.pending(limit: 1_000_000, from: .oldest)
            #expect(pending.count == Int(committed))
            for start in stride(from: 0, to: pending.count, by: 1_000) {
                try await buffer.acknowledge(pending[start..<min(start + 1_000, pending.count)].map(\.sequence))
            }
            #expect(try await buffer.statistics().pending == 0)
            #expect(!FileManager.default.fileExists(atPath: reserve), "the reserve was given back for the deletes")
            // The samples that waited in memory fit in the pages the deletes freed.
            let last = try await buffer.flush()
            #expect(last == committed + UInt64(waiting))
            #expect(try await buffer.statistics().uncommitted == 0)
            #expect(try await buffer.pending(limit: 1_000_000, from: .oldest).count == waiting)
            try await buffer.close()
        }
    }

    /// A tester (2026-12-06) filled the disk of a site whose clock was not set: the reserve was given back for the small
    /// write before a request leaves, the commits waiting took all of it, and from then on no request could leave and no
    /// acknowledgement could be deleted for 16 minutes while the ingest was reachable; `drop_oldest` then deleted
    /// committed readings. With the reserve given back, commits now keep its room for the deletes.
    @Test("once the reserve is given back, commits leave its room free: the next acknowledgements are still deleted, and what waited commits into the pages they free")
    func commitsLeaveTheReserveRoom() async throws {
        try await Self.withSmallFileSystem(size: "16m") { directory in
            let path = directory + "/buffer.sqlite"
            let buffer = try ReadingBuffer(
                configuration: BufferConfiguration(path: path, commitInterval: .seconds(3_600), quotaBytes: 512 << 20, whenFull: .dropNewest),
                logger: Self.logger)
            let sensor = try SensorID("tank1.ph")
            try await buffer.register([SensorDescriptor(id: sensor, quantity: .ph)])
            var next = 0
            func append(_ count: Int) async throws {
                let samples = (next..<next + count).map {
                    Sample(sensor: sensor, timestamp: Timestamp(microseconds: Int64($0) * 1_000_000), value: 6 + Double($0 % 100) / 100)
                }
                next += count
                try await buffer.append(samples)
            }
            // Commits until the file system is full; the last samples wait in memory.
            var full = false
            while !full, next < 2_000_000 {
                try await append(5_000)
                do { _ = try await buffer.flush() } catch { full = (error as? SQLiteError)?.isDiskFull == true }
            }
            #expect(full, "the file system never filled")
            let pending = try await buffer.pending(limit: 1_000_000, from: .oldest)
            #expect(pending.count > 10_000)
            // The first acknowledgement needs the reserve.
            try await buffer.acknowledge(pending.prefix(500).map(\.sequence))
            #expect(!FileManager.default.fileExists(atPath: path + ".reserve"))
            // More samples arrive and the committer runs: it must not take the room the reserve gave back.
            try await append(20_000)
            await #expect(throws: (any Error).self) { _ = try await buffer.flush() }
            // The uploader goes on: each acknowledgement is deleted (the commits may have taken what lay beyond the
            // reserve's room, and sent those readings are acknowledged too).
            var acknowledged = 500
            for start in stride(from: 500, to: pending.count, by: 2_000) {
                let part = pending[start..<min(start + 2_000, pending.count)].map(\.sequence)
                try await buffer.acknowledge(part)
                acknowledged += part.count
            }
            let since = try await buffer.pending(limit: 1_000_000, from: .oldest)
            try await buffer.acknowledge(since.map(\.sequence))
            acknowledged += since.count
            #expect(try await buffer.statistics().pending == 0)
            // What waited commits into the pages the deletes freed; nothing was dropped.
            _ = try await buffer.flush()
            let statistics = try await buffer.statistics()
            #expect(statistics.uncommitted == 0 && statistics.dropped == 0, "\(statistics)")
            #expect(statistics.pending == next - acknowledged)
            try await buffer.close()
        }
    }

    @Test(
        "a queue that grew while the disk was full commits what fits, oldest first, as space comes back (in chunks, not one transaction that never fits); every sample stored or counted",
        arguments: [BufferFullPolicy.dropNewest, .dropOldest])
    func largeQueueCommitsInChunks(policy: BufferFullPolicy) async throws {
        try await Self.withSmallFileSystem(size: "8m") { directory in
            let (buffer, _, sensor) = try await Self.openBuffer(in: directory, whenFull: policy)
            // Something else fills the file system while samples pile up in memory.
            let filler = try Self.fillUp(directory)
            let samples = (0..<95_000).map {
                Sample(sensor: sensor, timestamp: Timestamp(microseconds: 1_790_000_000_000_000 + Int64($0) * 1_000_000), value: 6 + Double($0 % 100) / 100)
            }
            try await buffer.append(samples)
            await #expect(throws: (any Error).self) { try await buffer.flush() }
            #expect(try await buffer.statistics().uncommitted == samples.count)
            // Some space comes back (2 MB): less than all the samples take (about 4 MB), so what fits is committed,
            // oldest first, and the rest waits; one transaction of all of them would commit nothing.
            try FileManager.default.removeItem(atPath: filler)
            var fs = statvfs()
            #expect(statvfs(directory, &fs) == 0)
            let free = Int(fs.f_bavail) * Int(fs.f_frsize)
            #expect(FileManager.default.createFile(atPath: filler, contents: Data(repeating: 7, count: max(0, free - (2 << 20)))))
            // drop_oldest may commit everything, deleting the oldest stored readings for the newest (each such commit
            // frees what it takes); drop_newest commits what fits and the rest waits.
            do {
                _ = try await buffer.flush()
                #expect(policy == .dropOldest, "everything fitted in 2 MB")
            } catch {
                #expect((error as? SQLiteError)?.isDiskFull == true, "\(error)")
            }
            var statistics = try await buffer.statistics()
            #expect(statistics.pending >= 20_000, "\(statistics.pending) committed with 2 MB free")
            // drop_oldest, with half the memory queue waiting, deletes the oldest stored readings to make room (counted).
            #expect(Int64(statistics.pending + statistics.uncommitted) + statistics.dropped == Int64(samples.count))
            #expect(policy == .dropOldest || statistics.dropped == 0)
            // The rest once the disk has room.
            try FileManager.default.removeItem(atPath: filler)
            _ = try await buffer.flush()
            statistics = try await buffer.statistics()
            #expect(statistics.uncommitted == 0 && Int64(statistics.pending) + statistics.dropped == Int64(samples.count))
            let stored = try await buffer.pending(limit: 100_000, from: .oldest)
            #expect(stored.map(\.timestamp) == samples.suffix(stored.count).map(\.timestamp))
            try await buffer.close()
        }
    }

    @Test("samples the memory queue dropped are counted at once, and a reload hands the count on with the samples")
    func droppedInMemoryCountedAcrossAReload() async throws {
        try await Self.withSmallFileSystem(size: "16m") { directory in
            let (buffer, configuration, sensor) = try await Self.openBuffer(in: directory, whenFull: .dropOldest)
            let filler = try Self.fillUp(directory)
            // 1,500 more than the memory queue holds: the oldest 1,500 go, and say so at once.
            let total = ReadingBuffer.maximumQueuedSamples + 1_500
            let samples = (0..<total).map { Sample(sensor: sensor, timestamp: Timestamp(microseconds: 1_790_000_000_000_000 + Int64($0) * 1_000_000), value: 6.5) }
            try await buffer.append(samples)
            await #expect(throws: (any Error).self) { try await buffer.flush() }
            #expect(try await buffer.statistics().dropped == 1_500)
            // A reload: the next generation gets the samples and the count.
            let left = buffer.takeUncommitted()
            #expect(left.samples.count == ReadingBuffer.maximumQueuedSamples && left.dropped == 1_500)
            try? await buffer.close()
            try FileManager.default.removeItem(atPath: filler)
            let next = try ReadingBuffer(configuration: configuration, logger: Self.logger)
            try await next.register([SensorDescriptor(id: sensor, quantity: .ph)])
            try next.adopt(left.samples, dropped: left.dropped)
            #expect(try await next.statistics().dropped == 1_500)
            #expect(try await next.flush() == UInt64(ReadingBuffer.maximumQueuedSamples))
            #expect(try await next.statistics().dropped == 1_500)
            try await next.close()
            // Counted in the file: the count survives a restart too.
            let reopened = try ReadingBuffer(configuration: configuration, logger: Self.logger)
            #expect(try await reopened.statistics().dropped == 1_500)
            try await reopened.close()
        }
    }

    @Test("a stop on a full disk keeps the samples it could not commit, for the buffer of the next generation (a reload)")
    func stopOnFullDiskKeepsTheQueue() async throws {
        try await Self.withSmallFileSystem(size: "4m") { directory in
            let (buffer, configuration, sensor) = try await Self.openBuffer(in: directory, whenFull: .dropNewest)
            // Something else fills the file system.
            let filler = try Self.fillUp(directory)
            let group = ServiceGroup(services: [buffer], logger: Self.logger)
            let running = Task { try await group.run() }
            let samples = (0..<2_000).map { Sample(sensor: sensor, timestamp: Timestamp(microseconds: Int64($0) * 1_000_000), value: 6.5) }
            try await buffer.append(samples)
            await group.triggerGracefulShutdown()
            // The stop does not fail the group (a reload goes on) and the samples stay in memory.
            try await running.value
            let left = buffer.takeUncommitted().samples
            #expect(left.count == 2_000)
            try? await buffer.close()
            // The next generation queues them, and commits them once there is room.
            try FileManager.default.removeItem(atPath: filler)
            let next = try ReadingBuffer(configuration: configuration, logger: Self.logger)
            try await next.register([SensorDescriptor(id: sensor, quantity: .ph)])
            try await next.append(left)
            #expect(try await next.flush() == 2_000)
            #expect(try await next.pending(limit: 10_000, from: .oldest).map(\.timestamp) == samples.map(\.timestamp))
            try await next.close()
        }
    }
}
