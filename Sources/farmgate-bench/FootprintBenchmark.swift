import ArgumentParser
import FarmgateAgent
import FarmgateSupport
import FarmgateWire
import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// `farmgate-bench footprint`: what the site agent costs a Raspberry Pi. Runs the real `farmgate agent` binary (use a
/// release build) with simulated sensors uploading to a real ingest on loopback (inside this process, so that the agent's
/// figures are its own), and reads the agent's own counters from /proc:
/// - bytes written per buffered reading: `write_bytes` of /proc/PID/io (what the process made the kernel send to the
///   storage layer, counted when a page is dirtied), over the readings the buffer committed in the same window;
/// - peak resident memory: `VmHWM` of /proc/PID/status at the end of the run;
/// - CPU share: user + system time of /proc/PID/stat over the window, as a share of one core.
/// The window starts after `--warmup` (the buffer file created, the first batches acknowledged) and lasts `--seconds`.
/// Prints, never asserts.
struct FootprintBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "footprint",
        abstract: "The agent's disk writes per reading, peak memory and CPU share with simulated sensors and a local ingest.")

    @Option(help: "The farmgate binary to run (default: the one beside this benchmark; build it with -c release).")
    var agent: String?

    @Option(help: "Simulated sensors.")
    var sensors = 50

    @Option(help: "Read interval of every sensor (a duration such as 1s or 500ms).")
    var interval = "1s"

    @Option(help: "Seconds measured.")
    var seconds = 60

    @Option(help: "Seconds before the measurement starts.")
    var warmup = 10

    @Option(help: "Extra lines for the agent's [buffer] section, e.g. 'commit_interval = \"1s\"' (default: the defaults).")
    var bufferSettings: String = ""

    @Option(help: """
        The agent's [clock] section (default 'check = false': this machine's clock may never report synchronised, and a \
        reading taken unsynchronised costs more, see the README). 'check = true' measures the unsynchronised path.
        """)
    var clockSettings = "check = false"

    @Option(help: "Keep the agent's files in this directory instead of a temporary one.")
    var keep: String?

    func validate() throws {
        guard sensors > 0, seconds > 0, warmup >= 0 else { throw ValidationError("--sensors and --seconds must be positive") }
    }

    func run() async throws {
        let logger = Logger.bench
        let binary = agent ?? (URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path + "/farmgate")
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw ValidationError("no farmgate binary at \(binary); build it with `swift build -c release --product farmgate` or pass --agent")
        }
        let directory = keep ?? (NSTemporaryDirectory() + "farmgate-bench-footprint-" + UUID().uuidString)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { if keep == nil { try? FileManager.default.removeItem(atPath: directory) } }

        let device = try DeviceID("footprint-site")
        let (sensors, interval, seconds, warmup, bufferSettings, clockSettings) = (
            self.sensors, self.interval, self.seconds, self.warmup, self.bufferSettings, self.clockSettings
        )
        let figures = try await LocalIngest.withRunning(directory: directory, device: device, now: nil, logger: logger) { ingest in
            let config = try Self.writeConfiguration(
                directory: directory, ingest: ingest, device: device, sensors: sensors, interval: interval, bufferSettings: bufferSettings,
                clockSettings: clockSettings)
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["agent", "--config", config]
            let log = directory + "/agent.log"
            guard FileManager.default.createFile(atPath: log, contents: nil) else { throw ValidationError("cannot create \(log)") }
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
            process.standardError = handle
            process.standardOutput = handle
            try process.run()
            let pid = process.processIdentifier
            defer {
                if process.isRunning {
                    kill(pid, SIGTERM)
                    process.waitUntilExit()
                }
            }
            let socket = directory + "/control.sock"
            try await Task.sleep(for: .seconds(warmup))
            guard process.isRunning else { throw ValidationError("the agent stopped; its log is \(log)") }
            let before = try await Sample.take(pid: pid, socket: socket)
            try await Task.sleep(for: .seconds(seconds))
            guard process.isRunning else { throw ValidationError("the agent stopped; its log is \(log)") }
            let after = try await Sample.take(pid: pid, socket: socket)
            let hwm = Sample.statusField(pid: pid, "VmHWM") ?? 0
            let rss = Sample.statusField(pid: pid, "VmRSS") ?? 0
            let split = ["RssAnon", "RssFile", "RssShmem"].map { Sample.statusField(pid: pid, $0) ?? 0 }
            let mappings = Mapping.resident(pid: pid)
            kill(pid, SIGTERM)
            process.waitUntilExit()
            return Figures(
                before: before, after: after, vmHWMKiB: hwm, vmRSSKiB: rss, anonFileShmemKiB: split, mappings: mappings,
                status: process.terminationStatus)
        }
        let readings = Double(figures.after.committed - figures.before.committed)
        let written = Double(figures.after.writeBytes - figures.before.writeBytes)
        let elapsed = figures.after.at - figures.before.at
        let cpu = Double(figures.after.cpuTicks - figures.before.cpuTicks) / Double(sysconf(Int32(_SC_CLK_TCK))) / elapsed.seconds
        print("agent: \(binary)")
        print("\(sensors) simulated sensors every \(interval), \(String(format: "%.1f", elapsed.seconds)) s measured after \(warmup) s")
        print("readings committed: \(Int(readings)) (\(String(format: "%.1f", readings / elapsed.seconds))/s), acknowledged by the ingest: \(figures.after.uploaded - figures.before.uploaded)")
        print("bytes written: \(Int(written)) = \(String(format: "%.1f", readings > 0 ? written / readings : 0)) per reading (write_bytes, /proc/PID/io)")
        print("peak resident: \(String(format: "%.1f", Double(figures.vmHWMKiB) / 1024)) MB (VmHWM), now \(String(format: "%.1f", Double(figures.vmRSSKiB) / 1024)) MB (VmRSS)")
        let (anon, file, shmem) = (figures.anonFileShmemKiB[0], figures.anonFileShmemKiB[1], figures.anonFileShmemKiB[2])
        print("resident now by kind: anonymous \(Self.megabytes(anon)) MB, file-backed \(Self.megabytes(file)) MB, shared memory \(Self.megabytes(shmem)) MB")
        print("resident now by mapping (/proc/PID/smaps, Rss; of which anonymous, i.e. written or private):")
        for mapping in figures.mappings.prefix(16) {
            print("  \(Self.megabytes(mapping.rssKiB).padding(toLength: 6, withPad: " ", startingAt: 0)) MB (\(Self.megabytes(mapping.anonymousKiB)) anonymous)  \(mapping.name)")
        }
        print("CPU: \(String(format: "%.2f", cpu * 100)) % of one core (utime + stime, /proc/PID/stat)")
        print("agent exit status after SIGTERM: \(figures.status)")
    }

    static func megabytes(_ kib: Int) -> String {
        String(format: "%.1f", Double(kib) / 1024)
    }

    struct Figures: Sendable {
        var before: Sample
        var after: Sample
        var vmHWMKiB: Int
        var vmRSSKiB: Int
        var anonFileShmemKiB: [Int]
        var mappings: [Mapping]
        var status: Int32
    }

    /// Resident memory of one mapped object (a file, or `[heap]`, `[stack]`, `[anonymous]`), summed over its mappings
    /// in /proc/PID/smaps; `anonymousKiB` is the part no file backs (written private pages, heap, stacks).
    struct Mapping: Sendable {
        var name: String
        var rssKiB = 0
        var anonymousKiB = 0

        /// Every mapped object, the most resident first.
        static func resident(pid: Int32) -> [Mapping] {
            // Read to the end: a /proc file reports size 0, and smaps is longer than one read.
            guard let handle = FileHandle(forReadingAtPath: "/proc/\(pid)/smaps"), let data = try? handle.readToEnd() else { return [] }
            try? handle.close()
            let text = String(decoding: data, as: UTF8.self)
            var byName: [String: Mapping] = [:]
            var current = "[anonymous]"
            for line in text.split(separator: "\n") {
                let fields = line.split(separator: " ", omittingEmptySubsequences: true)
                guard let first = fields.first else { continue }
                if first.hasSuffix(":") {
                    guard fields.count >= 2, let kib = Int(fields[1]) else { continue }
                    if first == "Rss:" { byName[current, default: Mapping(name: current)].rssKiB += kib }
                    if first == "Anonymous:" { byName[current, default: Mapping(name: current)].anonymousKiB += kib }
                } else if fields.count >= 5, first.contains("-") {
                    // A mapping's header: range, permissions, offset, device, inode, then the path if any.
                    current = fields.count >= 6 ? fields[5...].joined(separator: " ") : "[anonymous]"
                    if current.hasPrefix("[stack:") { current = "[stack]" }
                }
            }
            return byName.values.sorted { $0.rssKiB > $1.rssKiB }
        }
    }

    /// The agent's counters at one moment.
    struct Sample: Sendable {
        var at: ContinuousClock.Instant
        var writeBytes: Int
        var cpuTicks: Int
        var committed: UInt64
        var uploaded: Int64

        static func take(pid: Int32, socket: String) async throws -> Sample {
            let answer = try await runOffPool { try ControlClient.send(ControlRequest(command: "status"), to: socket) }
            let decoded = try JSONDecoder().decode(ControlAnswer.self, from: Data(answer))
            guard let status = decoded.status else { throw ValidationError("the agent's status: \(decoded.error ?? "no answer")") }
            return Sample(
                at: .now, writeBytes: ioField(pid: pid, "write_bytes") ?? 0, cpuTicks: cpuTicks(pid: pid),
                committed: status.buffer.lastSequence, uploaded: status.upload?.uploadedTotal ?? 0)
        }

        static func ioField(pid: Int32, _ name: String) -> Int? {
            field(in: "/proc/\(pid)/io", name)
        }

        /// A `Name: value kB` line of /proc/PID/status, in KiB.
        static func statusField(pid: Int32, _ name: String) -> Int? {
            field(in: "/proc/\(pid)/status", name)
        }

        static func field(in path: String, _ name: String) -> Int? {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
            for line in text.split(separator: "\n") where line.hasPrefix(name + ":") {
                return Int(line.dropFirst(name.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "")
            }
            return nil
        }

        /// utime + stime in clock ticks (fields 14 and 15 of /proc/PID/stat, counted after the parenthesised name).
        static func cpuTicks(pid: Int32) -> Int {
            guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                let close = text.lastIndex(of: ")")
            else { return 0 }
            let fields = text[text.index(after: close)...].split(separator: " ")
            // After ")": state is field 3, so utime (14) and stime (15) are at offsets 11 and 12.
            guard fields.count > 12 else { return 0 }
            return (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
        }
    }

    static func writeConfiguration(
        directory: String, ingest: LocalIngest, device: DeviceID, sensors: Int, interval: String, bufferSettings: String,
        clockSettings: String
    ) throws -> String {
        var text = """
            [device]
            id = "\(device)"

            [buffer]
            path = "buffer.sqlite"
            \(bufferSettings)

            [upload]
            endpoint = "\(ingest.endpoint)"
            key = "\(ingest.deviceKey)"

            [control]
            socket = "control.sock"

            [log]
            level = "warning"

            [clock]
            \(clockSettings)

            """
        let quantities = ["ph", "ec", "temperature"]
        for index in 0..<sensors {
            text += """

                [[sensor]]
                id = "tank\(index / 3 + 1).\(quantities[index % 3])"
                driver = "simulated"
                quantity = "\(quantities[index % 3])"
                interval = "\(interval)"

                """
        }
        let path = directory + "/agent.toml"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }
}
